"""The BLAS paths (``gemm``, ``col2im``) with their threads kept one per CPU for a run, and
left where the system puts them: the measurements behind ``threads.placement``.

Usage::

    python benchmarks/bench_placement.py [--repeat 24] [--only NAME]

The run uses every CPU the process may use (placement applies only then; run it under
``taskset -c 0,1`` on a larger machine). Per layer and path it prints the best and median
of ``--repeat`` calls of ``conv_transpose3d`` with placement and without, interleaved,
with PyTorch's median in the same run when it is installed. Then the U-Net 320->256 layer
after rests of 0 to 100 ms (how long the threads take to start again once idle), a short
run right after a parallel Numba kernel placed and free (why short runs are not placed),
and how often two threads, each running single-threaded BLAS products right after one woke the
other, ran on one CPU throughout when placement was off. The CPU model,
its vector features and NumPy's sgemm rate head the table. Nothing here is a pass/fail test.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: Seconds of rest before each timed call, as a script calling the engine now and then has.
IDLE_PAUSE = 0.02

# name, Cin, Cout, spatial, kernel, stride, padding
CASES = [
    ("unet 320->256 8^3 k2", 320, 256, 8, 2, 2, 0),
    ("unet 128->64 32^3 k2", 128, 64, 32, 2, 2, 0),
    ("64->32 16^3 k4 p1", 64, 32, 16, 4, 2, 1),
    ("unet 64->32 64^3 k2", 64, 32, 64, 2, 2, 0),
]


def shared_cpu_runs(runs=40):
    """How often two threads, each running two 512 x 320 @ 320 x 512 products on one BLAS
    thread right after one woke the other, spent them on the same CPU."""
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from convt3d_cli import threads

    if threads.current_cpu() is None:
        return None
    rng = np.random.default_rng(0)
    a = rng.standard_normal((512, 320), dtype=np.float32)
    b = rng.standard_normal((320, 512), dtype=np.float32)

    def job():
        first = threads.current_cpu()
        t = time.perf_counter()
        np.matmul(a, b)
        np.matmul(a, b)
        return first, threads.current_cpu(), (time.perf_counter() - t) * 1e3

    shared, alone, together = 0, [], []
    with ThreadPoolExecutor(1) as pool, threadpool_limits(1, "blas"):
        for _ in range(runs):
            time.sleep(IDLE_PAUSE)
            helper = pool.submit(job)
            mine = job()
            theirs = helper.result()
            same = mine[0] == mine[1] == theirs[0] == theirs[1]
            shared += same
            (together if same else alone).extend([mine[2], theirs[2]])
    return shared, runs, alone, together


#: Rest before each call of the idle table (seconds).
PAUSES = (0.0, 0.001, 0.005, 0.02, 0.1)


def idle_table(torch, n_threads, repeat=15):
    """U-Net 320->256 8^3 k2 s2 after each rest of :data:`PAUSES`: medians (ms) of the blocked
    kernel (its widest blocks that fit this CPU), ``gemm`` and PyTorch. How long a run's threads take to
    start again after they went idle shows here."""
    from convt3d_cli.engine import PreparedLayer, _layer

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 320, 8, 8, 8)).astype(np.float32)
    w = rng.standard_normal((320, 256, 2, 2, 2)).astype(np.float32)
    print(f"\n# U-Net 320->256 8^3 k2 s2 after a rest: medians of {repeat} calls (ms), {n_threads} threads")
    print(f"{'path':14s} " + " ".join(f"{f'{p * 1e3:g} ms':>9s}" for p in PAUSES))
    runs = {}
    blocks = [b for b in _layer.fitting_blocks() if b in ("8x32", "16x16", "5x16", "3x32")]
    for path in ["blocked-" + block for block in blocks] + ["gemm"]:
        layer = PreparedLayer(x.shape, w, None, 2, path=path)
        out = np.empty(layer.output_shape, np.float32)
        runs[path] = (lambda layer=layer, out=out: layer.run_slab(x, 0, 0, layer.output_shape[2], out))
    if torch is not None:
        tx, tw = torch.from_numpy(x), torch.from_numpy(w)

        def run_torch():
            with torch.no_grad():
                torch.nn.functional.conv_transpose3d(tx, tw, stride=2)
        runs["torch"] = run_torch
    for path, run in runs.items():
        run()
        run()
        cells = []
        for pause in PAUSES:
            times = []
            for _ in range(repeat if pause < 0.1 else max(3, repeat // 2)):
                time.sleep(pause)
                t = time.perf_counter()
                run()
                times.append(time.perf_counter() - t)
            cells.append(f"{float(np.median(times)) * 1e3:9.2f}")
        print(f"{path:14s} " + " ".join(cells), flush=True)


def short_table(rounds=8, calls=100):
    """A short ``col2im`` run (0.6 M multiply-adds) right after a parallel Numba kernel, with
    its threads placed regardless of ``_gemm.PLACE_MIN_MACS_PER_THREAD`` and left free:
    ms per pair of calls, medians of ``rounds`` rounds of ``calls`` pairs."""
    from convt3d_cli.engine import _gemm, conv_transpose3d

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 24, 6, 5, 7)).astype(np.float32)
    w = rng.standard_normal((24, 16, 2, 2, 2)).astype(np.float32)
    placement, threshold = _gemm.placement, _gemm.PLACE_MIN_MACS_PER_THREAD
    for path in ("col2im", "blocked"):
        conv_transpose3d(x, w, None, 2, path=path)
    times = {"placed": [], "free": []}
    try:
        _gemm.PLACE_MIN_MACS_PER_THREAD = 0
        for i in range(rounds):
            for mode in (("placed", "free") if i % 2 else ("free", "placed")):
                _gemm.placement = placement if mode == "placed" else (lambda count: None)
                t = time.perf_counter()
                for _ in range(calls):
                    conv_transpose3d(x, w, None, 2, path="blocked")
                    conv_transpose3d(x, w, None, 2, path="col2im")
                times[mode].append((time.perf_counter() - t) * 1e3 / calls)
    finally:
        _gemm.placement, _gemm.PLACE_MIN_MACS_PER_THREAD = placement, threshold
    print(f"\n# a 24->16 6x5x7 k2 blocked run, then col2im on it (0.6 M multiply-adds), {calls} pairs "
          f"a round: ms per pair, median of {rounds} rounds")
    print(f"# col2im placed (threshold ignored) {np.median(times['placed']):.3f}, "
          f"free {np.median(times['free']):.3f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=24)
    ap.add_argument("--only", default=None, help="run cases whose name contains this text")
    args = ap.parse_args()

    from bench_engine import cpu_description, sgemm_gflops

    from convt3d_cli import threads
    from convt3d_cli.engine import _gemm, conv_transpose3d

    n_threads = threads.cores()
    try:
        import torch
        torch.set_num_threads(n_threads)
    except ImportError:
        torch = None
    print(f"# {cpu_description()}; sgemm {sgemm_gflops(n_threads):.0f} GFLOP/s")
    print(f"# threads={n_threads} (every usable CPU); best / median of {args.repeat} calls (ms), "
          f"placed and free interleaved" + ("; torch " + torch.__version__ if torch else "; no torch"))
    header = f"{'case':22s} {'path':7s} {'placed':>15s} {'free':>15s} {'median free/placed':>19s} {'torch':>8s}"
    print(header)
    print("-" * len(header))
    placement = _gemm.placement
    for name, cin, cout, n, k, s, p in CASES:
        if args.only and args.only not in name:
            continue
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, cin, n, n, n)).astype(np.float32)
        w = rng.standard_normal((cin, cout, k, k, k)).astype(np.float32)
        b = rng.standard_normal(cout).astype(np.float32)
        torch_ms = float("nan")
        if torch is not None:
            tx, tw, tb = map(torch.from_numpy, (x, w, b))
            times = []
            with torch.no_grad():
                torch.nn.functional.conv_transpose3d(tx, tw, tb, stride=s, padding=p)
                for _ in range(max(5, args.repeat // 2)):
                    time.sleep(IDLE_PAUSE)
                    t = time.perf_counter()
                    torch.nn.functional.conv_transpose3d(tx, tw, tb, stride=s, padding=p)
                    times.append(time.perf_counter() - t)
            torch_ms = float(np.median(times)) * 1e3
        for path in ("gemm", "col2im"):
            if path == "gemm" and (k != s or p):
                continue
            conv_transpose3d(x, w, b, s, p, path=path)
            times = {"placed": [], "free": []}
            repeat = args.repeat if n <= 32 else max(3, args.repeat // 3)
            for i in range(repeat):
                for mode in (("placed", "free") if i % 2 else ("free", "placed")):
                    _gemm.placement = placement if mode == "placed" else (lambda count: None)
                    time.sleep(IDLE_PAUSE)
                    t = time.perf_counter()
                    conv_transpose3d(x, w, b, s, p, path=path)
                    times[mode].append((time.perf_counter() - t) * 1e3)
            _gemm.placement = placement
            best = {m: min(v) for m, v in times.items()}
            med = {m: float(np.median(v)) for m, v in times.items()}
            cells = " ".join(f"{best[m]:7.2f}/{med[m]:7.2f}" for m in ("placed", "free"))
            print(f"{name:22s} {path:7s} {cells} {med['free'] / med['placed']:18.2f}x {torch_ms:8.2f}", flush=True)
    idle_table(torch, n_threads)
    short_table()
    found = shared_cpu_runs()
    if found is None:
        print("\n# the C library cannot tell a thread's CPU: no count of shared CPUs")
        return
    shared, runs, alone, together = found
    print(f"\n# two threads, each two 512x320 @ 320x512 products on one BLAS thread, free placement:")
    print(f"# both on one CPU throughout in {shared} of {runs} runs; "
          f"median ms per pair of products: {np.median(alone) if alone else float('nan'):.2f} apart, "
          f"{np.median(together) if together else float('nan'):.2f} sharing")


if __name__ == "__main__":
    main()
