"""The blocked kernel's input block against this CPU's L2 cache: the measurements behind
``convt3d_cli.engine._layer.blocked_block_bytes``.

Usage::

    python benchmarks/bench_block_size.py [--threads 2] [--repeat 15] [--sizes 512,256,128] [--only NAME]

Each job of the register-blocked kernel copies the input it reads into a zero-padded
block and then sweeps it once per block of output channels. Per layer this prints
``run_slab`` of the whole layer (the blocked path, the block the tuner would measure
first) with each input-block size in KiB, the sizes timed in turn, best and median of
``--repeat`` calls (ms), the best run's GFLOP/s, and ``d x h`` (D positions x H rows of
one job's block), all against NumPy's sgemm rate measured in the same run. Outputs are
checked to be equal bit for bit across sizes. The header gives the CPU model, its
vector features, its L2 size and the size the rule picks. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

#: Seconds of rest before each timed call (other libraries' and Numba's workers spin a while).
IDLE_PAUSE = 0.02

# name, input shape, weight shape, settings
CASES = [
    ("unet 32->32 64^3 k3 s2 p1 op1", (1, 32, 64, 64, 64), (32, 32, 3, 3, 3),
     dict(stride=2, padding=1, output_padding=1)),
    ("64->64 32^3 k3 s2 p1 op1", (1, 64, 32, 32, 32), (64, 64, 3, 3, 3), dict(stride=2, padding=1, output_padding=1)),
    ("128->64 32^3 k4 s2 p1", (1, 128, 32, 32, 32), (128, 64, 4, 4, 4), dict(stride=2, padding=1)),
    ("oneDNN N4 64->32 16^3 k4 s2 p1", (4, 64, 16, 16, 16), (64, 32, 4, 4, 4), dict(stride=2, padding=1)),
    ("aniso k(1,3,3) s(1,2,2) 16->16 32x64x64", (1, 16, 32, 64, 64), (16, 16, 1, 3, 3),
     dict(stride=(1, 2, 2), padding=(0, 1, 1), output_padding=(0, 1, 1))),
    ("seed N16 3->64 32^3 k3 s2 p1", (16, 3, 32, 32, 32), (3, 64, 3, 3, 3), dict(stride=2, padding=1)),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    ap.add_argument("--sizes", default="512,256,128", help="input-block sizes in KiB, comma-separated")
    ap.add_argument("--only", default=None, help="run cases whose name contains this text")
    args = ap.parse_args()

    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    from bench_engine import cpu_description, sgemm_gflops
    from convt3d_cli.engine import PreparedLayer, _layer

    sizes = [int(size) for size in args.sizes.split(",")]
    gemm = sgemm_gflops(args.threads)
    print(f"# {cpu_description()}; the rule picks {_layer.blocked_block_bytes() // 1024} KiB blocks")
    print(f"# threads={args.threads} numpy sgemm {gemm:.1f} GFLOP/s; best / median of {args.repeat} (ms), "
          f"GFLOP/s of the best, d x h of a job's block")
    rng = np.random.default_rng(0)
    for name, x_shape, w_shape, settings in CASES:
        if args.only and args.only not in name:
            continue
        x = rng.standard_normal(x_shape).astype(np.float32)
        w = (rng.standard_normal(w_shape) * 0.1).astype(np.float32)
        flops = 2.0 * np.prod(x_shape) * np.prod(w_shape[1:])
        runs, reference = {}, None
        for size in sizes:
            _layer.BLOCKED_BLOCK_BYTES = size * 1024
            layer = PreparedLayer(x.shape, w, None, dtype=np.float32, path="blocked", **settings)
            layer.prepare()
            blocking = layer._blocked_plan("blocked").plan.blocking
            out = np.empty(layer.output_shape, np.float32)
            layer.run_slab(x, 0, 0, layer.output_shape[2], out)
            if reference is None:
                reference = out.copy()
            elif not np.array_equal(out, reference):
                sys.exit(f"{name}: {size} KiB blocks changed the result")
            runs[size] = (layer, out, [], f"{blocking.d_chunk}x{blocking.h_tile}")
        _layer.BLOCKED_BLOCK_BYTES = None
        for i in range(args.repeat):
            for size in sizes if i % 2 == 0 else sizes[::-1]:
                layer, out, times, _ = runs[size]
                time.sleep(IDLE_PAUSE)
                start = time.perf_counter()
                layer.run_slab(x, 0, 0, layer.output_shape[2], out)
                times.append(time.perf_counter() - start)
        cells = []
        for size in sizes:
            layer, _, times, shape = runs[size]
            best = min(times)
            cells.append(f"{size:4d} KiB {best * 1e3:7.1f} {np.median(times) * 1e3:7.1f} "
                         f"{flops / best / 1e9:6.1f} GF/s {shape:>6s}")
        print(f"{name:40s} {layer.block_of('blocked'):>5s} | " + " | ".join(cells), flush=True)
    print(f"# numpy sgemm {sgemm_gflops(args.threads):.1f} GFLOP/s at the end")


if __name__ == "__main__":
    main()
