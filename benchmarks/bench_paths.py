"""Every engine kernel forced on the same few-channel layers: the measurements behind
``convt3d_cli.engine._layer.choose_path``.

Usage::

    python benchmarks/bench_paths.py [--threads 2] [--repeat 7] [--only NAME]

Per layer it prints the median time of each kernel (``fir``, the blocked kernel with
each register block ``blocked-CxP`` = C output channels x P positions, ``subpixel``,
``paired``, ``shuffle``, ``gemm`` = NumPy's BLAS, ``col2im`` = NumPy's BLAS and a sum
of taps; ``paired`` serves W stride 2 only, otherwise the layer runs FIR,
``shuffle``/``gemm`` kernel == stride without padding only, and ``col2im`` is shown from
16 input channels per group on, otherwise they show ``-``), the one ``choose_path`` picks, the one
the tuner measures (``engine/_tuner.py``, on a probe slab, stored in a scratch file), and
the fastest. The CPU model, its vector features and NumPy's sgemm rate head the table.
Outputs of all kernels are checked against each other. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

W = 12  # column width
#: Seconds of rest before each timed call: after a parallel Numba kernel its OpenMP workers
#: spin for several ms, and the BLAS paths (gemm, col2im) run slower beside them.
IDLE_PAUSE = 0.02


def paths():
    """Every path, the blocked kernel once per register block the tuner measures on this CPU
    (``blocked`` is one of them) and 8x16, the block it was first tuned with."""
    from convt3d_cli.engine import _layer
    blocked = {"blocked-8x16"} | {"blocked-" + block for block in _layer.fitting_blocks()}
    ordered = tuple(p for p in _layer.BLOCKED_VARIANTS if p in blocked)
    return ("fir",) + ordered + ("subpixel", "paired", "shuffle", "gemm", "col2im")
# name, Cin, Cout, groups, spatial, kernel, padding, output_padding[, stride, batch] (default 2, 1)
CASES = [
    ("1ch 128^3 k3", 1, 1, 1, 128, 3, 1, 1), ("1ch 128^3 k4", 1, 1, 1, 128, 4, 1, 0),
    ("1ch 192^3 k2", 1, 1, 1, 192, 2, 0, 0), ("dw32 64^3 k3", 32, 32, 32, 64, 3, 1, 1),
    ("dw32 64^3 k4", 32, 32, 32, 64, 4, 1, 0), ("1->16 64^3 k3", 1, 16, 1, 64, 3, 1, 1),
    ("1->64 48^3 k3", 1, 64, 1, 48, 3, 1, 1), ("2->1 64^3 k3", 2, 1, 1, 64, 3, 1, 1),
    ("2->4 64^3 k3", 2, 4, 1, 64, 3, 1, 1), ("2->8 64^3 k3", 2, 8, 1, 64, 3, 1, 1),
    ("2->16 64^3 k3", 2, 16, 1, 64, 3, 1, 1), ("2->32 48^3 k3", 2, 32, 1, 48, 3, 1, 1),
    ("2->2 64^3 k4", 2, 2, 1, 64, 4, 1, 0), ("4->4 64^3 k3", 4, 4, 1, 64, 3, 1, 1),
    ("8->1 64^3 k3", 8, 1, 1, 64, 3, 1, 1), ("32->2 64^3 k3", 32, 2, 1, 64, 3, 1, 1),
    ("3->8 64^3 k3", 3, 8, 1, 64, 3, 1, 1),
    # kernel == stride (the shuffle GEMM's layers)
    ("dw32 64^3 k2", 32, 32, 32, 64, 2, 0, 0), ("2->2 64^3 k2", 2, 2, 1, 64, 2, 0, 0),
    ("2->16 64^3 k2", 2, 16, 1, 64, 2, 0, 0), ("4->4 64^3 k2", 4, 4, 1, 64, 2, 0, 0),
    ("8->8 64^3 k2", 8, 8, 1, 64, 2, 0, 0), ("32->32 64^3 k2", 32, 32, 1, 64, 2, 0, 0),
    ("320->256 8^3 k2", 320, 256, 1, 8, 2, 0, 0), ("128->64 32^3 k2", 128, 64, 1, 32, 2, 0, 0),
    ("64->32 64^3 k2", 64, 32, 1, 64, 2, 0, 0),
    # channel-heavy, overlapping taps
    ("64->32 16^3 k4", 64, 32, 1, 16, 4, 1, 0), ("32->32 64^3 k3", 32, 32, 1, 64, 3, 1, 1),
    ("128->64 32^3 k4", 128, 64, 1, 32, 4, 1, 0), ("64->64 32^3 k3", 64, 64, 1, 32, 3, 1, 1),
    ("64->64 s1 32^3 k3", 64, 64, 1, 32, 3, 1, 0, 1, 1),
    # bench_engine's oneDNN cases: batches of 4 and 2, and stride 1
    ("N4 64->32 k4", 64, 32, 1, 16, 4, 1, 0, 2, 4), ("N2 16->16 s1 k3", 16, 16, 1, 32, 3, 1, 0, 1, 2),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--only", default=None, help="run layers whose name contains this text")
    args = ap.parse_args()

    import tempfile

    import numba
    from threadpoolctl import threadpool_limits
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    threadpool_limits(args.threads)
    from bench_engine import cpu_description, sgemm_gflops
    from convt3d_cli.engine import PreparedLayer, _plan, _tuner

    scratch = tempfile.mkdtemp()
    _tuner._path = lambda: os.path.join(scratch, _tuner.FILE_NAME)   # measure afresh, keep the user's file
    print(f"# {cpu_description()}; sgemm {sgemm_gflops(args.threads):.0f} GFLOP/s")
    PATHS = paths()
    print(f"# threads={args.threads}, medians of {args.repeat} (ms); "
          f"the rule's blocked path picks a register block per layer (chosen, tuned)")
    header = (f"{'layer':16s} " + " ".join(f"{p:>{W}s}" for p in PATHS)
              + f" {'chosen':>{W}s} {'tuned':>{W}s} {'fastest':>{W}s}")
    print(header)
    print("-" * len(header))
    for name, cin, cout, groups, n, k, p, op, *rest in CASES:
        s, batch = rest or (2, 1)
        if args.only and args.only not in name:
            continue
        rng = np.random.default_rng(0)
        x = rng.standard_normal((batch, cin, n, n, n)).astype(np.float32)
        w = rng.standard_normal((cin, cout // groups, k, k, k)).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32)
        layers = {}
        for path in PATHS:
            layer = PreparedLayer(x.shape, w, b, s, p, op, 1, groups, path="fir")
            layer.path = path
            if path in ("shuffle", "gemm") and not _plan.shuffle_fits(layer._phases()):
                continue
            if path == "col2im" and cin // groups < 16:
                continue
            layer.path = path if path != "paired" or _plan.paired_fits(layer._phases()[2]) else "fir"
            layers[path] = layer
        os.environ["CONVT3D_TUNE"] = "0"
        chosen = named(PreparedLayer(x.shape, w, b, s, p, op, 1, groups))
        os.environ["CONVT3D_TUNE"] = "1"
        saved, _tuner.TUNE_MIN_MACS = _tuner.TUNE_MIN_MACS, 0
        tuned = named(PreparedLayer(x.shape, w, b, s, p, op, 1, groups))
        _tuner.TUNE_MIN_MACS = saved
        out = np.empty(layer.output_shape, np.float32)
        reference = None
        times = {path: [] for path in layers}
        for it in range(args.repeat + 1):
            for path, layer in layers.items():
                time.sleep(IDLE_PAUSE)
                t = time.perf_counter()
                layer.run_slab(x, 0, 0, layer.output_shape[2], out)
                times[path].append(time.perf_counter() - t)
                if it == 0:
                    if reference is None:
                        reference = out.copy()
                    elif np.abs(out - reference).max() > 1e-4 * np.abs(reference).max():
                        raise SystemExit(f"{name}: the {path} kernel disagrees with fir")
        med = {path: float(np.median(v[1:])) * 1e3 for path, v in times.items()}
        print(f"{name:16s} " + " ".join(f"{med[path]:{W}.2f}" if path in med else f"{'-':>{W}s}" for path in PATHS)
              + f" {chosen:>{W}s} {tuned:>{W}s} {min(med, key=med.get):>{W}s}")


def named(layer):
    """A layer's path as the table's columns name it: ``blocked`` with its register block."""
    return "blocked-" + layer.block if layer.path == "blocked" else layer.path


if __name__ == "__main__":
    main()
