"""Engine benchmark: convt3d against PyTorch's CPU conv_transpose3d, same process, interleaved.

Usage::

    python benchmarks/bench_engine.py [--threads 2] [--repeat 5] [--only NAME] [--quick]

Per case it prints the engine's median time, PyTorch's (when installed) with
the same thread count, the speed-up (of the medians), *best x* (PyTorch's best
time over the engine's best: shared VMs slow whole stretches of runs down by up to
2x, and the best of several interleaved runs is the least disturbed figure of
either), GFLOP/s of the engine's best run and its share of this machine's sgemm
rate (NumPy's BLAS, best of 3, measured at the start and again at the end of the
run: the higher of the two counts, so that a slow stretch of the host does not
inflate the share), the same two for calls that write into a kept ``out=`` array
(*out= ms*, *%out=*: a fresh result's memory pages cost the kernel zeroing them,
7-21 ms for 64-256 MiB on a 2-core VM, which repeated calls with ``out=`` do not
pay; the difference is the page cost, the rest is the kernel; timed after the
others), the output floor (allocating the output, mapping its memory
pages in order as the engine does, and writing it once with all
threads; median like the others), *x floor*
(the median over repeats of engine / floor, the two timed back to back after
the same PyTorch call, in alternating order) and the engine's peak extra memory
as a multiple of the output size (tracemalloc sees NumPy's allocations), and the
path the engine ran: ``measured`` by the tuner on this machine or by the ``rule``.
Nothing here is a pass/fail test: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
import tracemalloc

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# Seconds of rest before each timed call of either library. Both keep worker threads
# spinning for a while after a parallel call (OpenMP's wait policy); a call started
# meanwhile shares the cores with them (benchmarks/README.md, "BLAS for kernel == stride").
IDLE_PAUSE = 0.02

# name, N, Cin, Cout, spatial, kernel, stride, padding, output_padding, dilation, groups, dtype
CASES = [
    ("1ch 128^3 k3 s2 p1 op1", 1, 1, 1, (128,) * 3, 3, 2, 1, 1, 1, 1, "float32"),
    ("1ch 128^3 k4 s2 p1", 1, 1, 1, (128,) * 3, 4, 2, 1, 0, 1, 1, "float32"),
    ("1ch 192^3 k2 s2", 1, 1, 1, (192,) * 3, 2, 2, 0, 0, 1, 1, "float32"),
    ("seed N16 3->64 32^3 k3 s2 p1", 16, 3, 64, (32,) * 3, 3, 2, 1, 0, 1, 1, "float32"),
    ("unet 320->256 8^3 k2 s2", 1, 320, 256, (8,) * 3, 2, 2, 0, 0, 1, 1, "float32"),
    ("unet 128->64 32^3 k2 s2", 1, 128, 64, (32,) * 3, 2, 2, 0, 0, 1, 1, "float32"),
    ("unet 64->32 64^3 k2 s2", 1, 64, 32, (64,) * 3, 2, 2, 0, 0, 1, 1, "float32"),
    ("unet 32->32 64^3 k3 s2 p1 op1", 1, 32, 32, (64,) * 3, 3, 2, 1, 1, 1, 1, "float32"),
    ("depthwise 32ch g32 64^3 k3 s2 p1 op1", 1, 32, 32, (64,) * 3, 3, 2, 1, 1, 1, 32, "float32"),
    ("dilation2 s1 8->8 48^3 k3 p2", 1, 8, 8, (48,) * 3, 3, 1, 2, 0, 2, 1, "float32"),
    ("aniso k(1,3,3) s(1,2,2) 16->16 32x64x64", 1, 16, 16, (32, 64, 64), (1, 3, 3), (1, 2, 2),
     (0, 1, 1), (0, 1, 1), 1, 1, "float32"),
    ("float64 16->8 48^3 k3 s2 p1", 1, 16, 8, (48,) * 3, 3, 2, 1, 0, 1, 1, "float64"),
    ("oneDNN N4 64->32 16^3 k4 s2 p1", 4, 64, 32, (16,) * 3, 4, 2, 1, 0, 1, 1, "float32"),
    ("oneDNN N2 16->16 32^3 k3 s1 p1", 2, 16, 16, (32,) * 3, 3, 1, 1, 0, 1, 1, "float32"),
]


def triple(v):
    return tuple(v) if isinstance(v, tuple) else (v, v, v)


def cpu_description():
    """``AMD EPYC 9R14 (avx2 fma avx512f ...), L2 1024 KiB, 2 logical CPUs``: the CPU model,
    the vector features that decide which kernels win and the L2 cache that sizes the
    blocked kernel's input blocks (from /proc/cpuinfo and sysfs, as the engine reads them;
    "unknown CPU" elsewhere)."""
    from convt3d_cli.engine import _cpu

    model, flags = _cpu.model_and_features()
    l2 = _cpu.l2_bytes()
    return (f"{model} ({' '.join(flags) or 'no AVX2'}), L2 {f'{l2 // 1024} KiB' if l2 else 'unknown'}, "
            f"{os.cpu_count()} logical CPUs")


def sgemm_gflops(threads):
    n = 2048
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    b = a.copy()
    c = np.empty_like(a)
    best = math.inf
    for _ in range(3):
        t = time.perf_counter()
        np.matmul(a, b, out=c)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


# Output columns of the BLAS-shape product (its rate needs no more to settle).
SHAPE_OUTPUT_CAP = 256 * 2 ** 20


def shape_gflops(cout, kernel_volume, cin, columns, dtype):
    """GFLOP/s of NumPy's matmul on a layer's GEMM shape (see the module's notes)."""
    rng = np.random.default_rng(1)
    m = cout * kernel_volume
    columns = max(1, min(columns, SHAPE_OUTPUT_CAP // (m * np.dtype(dtype).itemsize)))
    a = rng.standard_normal((m, cin)).astype(dtype)
    b = rng.standard_normal((cin, columns)).astype(dtype)
    np.matmul(a, b)
    best = math.inf
    for _ in range(3):
        time.sleep(IDLE_PAUSE)
        t = time.perf_counter()
        c = np.matmul(a, b)
        best = min(best, time.perf_counter() - t)
        del c
    return 2.0 * m * cin * columns / best / 1e9


def make_floor():
    from numba import njit, prange

    from convt3d_cli.engine._layer import _fault_in

    @njit(parallel=True, cache=False)
    def fill(flat):
        for i in prange(flat.shape[0]):
            flat[i] = 1.0

    def floor(shape, dtype):
        t = time.perf_counter()
        flat = np.empty(shape, dtype=dtype).reshape(-1)
        _fault_in(flat)   # pages mapped in order, as the engine does
        fill(flat)
        return time.perf_counter() - t
    floor((8,), np.float32)
    floor((8,), np.float64)
    return floor


def path_of(layer):
    """The path the engine ran (the tuner's choice on large layers), a blocked one with
    its register block."""
    if layer.path == "blocked":
        return f"blocked-{layer.block} ({layer.path_source})"
    return f"{layer.path} ({layer.path_source})"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", default=None, help="run cases whose name contains this text")
    ap.add_argument("--quick", action="store_true", help="one repeat, no PyTorch")
    args = ap.parse_args()

    import numba
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    from convt3d_cli.engine import PreparedLayer, conv_transpose3d
    try:
        import torch
        torch.set_num_threads(args.threads)
    except ImportError:
        torch = None
    if args.quick:
        torch = None
        args.repeat = 1

    floor = make_floor()
    gemm_start = sgemm_gflops(args.threads)
    print(f"# {cpu_description()}")
    print(f"# threads={args.threads} numpy sgemm {gemm_start:.1f} GFLOP/s at the start; torch "
          f"{torch.__version__ if torch else 'not installed'}; numba {numba.__version__}; "
          f"{args.repeat} repeats")
    header = (f"{'case':40s} {'engine ms':>10s} {'torch ms':>10s} {'speed-up':>8s} {'best x':>7s} {'GFLOP/s':>8s} "
              f"{'%sgemm':>7s} {'out= ms':>8s} {'%out=':>6s} {'BLAS GF/s':>9s} {'x BLAS':>6s} {'floor ms':>9s} {'x floor':>7s} {'peak/out':>8s}  path")
    print(header)
    print("-" * len(header))
    ratios, best_ratios, rows = [], [], []
    rng = np.random.default_rng(0)
    for name, n, cin, cout, spatial, k, s, p, op, d, g, dtype in CASES:
        if args.only and args.only not in name:
            continue
        k3 = triple(k)
        x = rng.standard_normal((n, cin) + spatial).astype(dtype)
        w = (rng.standard_normal((cin, cout // g) + k3) * 0.1).astype(dtype)
        b = rng.standard_normal(cout).astype(dtype)
        kwargs = dict(stride=s, padding=p, output_padding=op, dilation=d, groups=g)
        # Compile / load kernels, then a second call: a process's first large allocations pay
        # for fresh pages from the OS, for both libraries alike.
        for _ in range(2):
            y = conv_transpose3d(x, w, b, **kwargs)
            out_bytes, out_shape = y.nbytes, y.shape
            del y
        tracemalloc.start()
        conv_transpose3d(x, w, b, **kwargs)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        if torch is not None:
            tx, tw, tb = (torch.from_numpy(a) for a in (x, w, b))
            with torch.no_grad():
                for _ in range(2):
                    torch.nn.functional.conv_transpose3d(tx, tw, tb, **kwargs)
        eng_times, torch_times, floor_times, floor_ratios, out_times = [], [], [], [], []

        def run_torch():
            if torch is not None:
                with torch.no_grad():
                    time.sleep(IDLE_PAUSE)
                    t = time.perf_counter()
                    torch.nn.functional.conv_transpose3d(tx, tw, tb, **kwargs)
                    torch_times.append(time.perf_counter() - t)

        def run_engine():
            time.sleep(IDLE_PAUSE)
            t = time.perf_counter()
            y = conv_transpose3d(x, w, b, **kwargs)
            eng_times.append(time.perf_counter() - t)
            del y

        def run_engine_out():
            time.sleep(IDLE_PAUSE)
            t = time.perf_counter()
            conv_transpose3d(x, w, b, out=kept, **kwargs)
            out_times.append(time.perf_counter() - t)

        def run_floor():
            floor_times.append(floor(out_bytes // np.dtype(dtype).itemsize, dtype))

        for i in range(args.repeat):
            # The engine and the floor back to back after one PyTorch call, so both meet the
            # same cache and allocator state. That state drifts: the 64 MB floor read 4 to
            # 16 ms in different runs (likely whether fresh pages come as huge pages; with
            # NumPy's huge-page advice off it takes 20 ms). A pair meets the same state; the
            # order alternates.
            run_torch()
            for step in ((run_engine, run_floor) if i % 2 == 0 else (run_floor, run_engine)):
                step()
            floor_ratios.append(eng_times[-1] / floor_times[-1])
        # The out= calls after the others: a kept output held through the loop above changed
        # its fresh-page timings on the VMs (another GiB of memory in play for the largest case).
        kept = np.empty(out_shape, dtype=dtype)
        conv_transpose3d(x, w, b, out=kept, **kwargs)
        for _ in range(args.repeat):
            run_engine_out()
        del kept

        eng = float(np.median(eng_times))
        flops = 2.0 * n * cin * (cout // g) * np.prod(k3) * np.prod(spatial)
        gflops = flops / min(eng_times) / 1e9
        line = f"{name:40s} {eng * 1e3:10.1f} "
        if torch_times:
            tt = float(np.median(torch_times))
            ratios.append(tt / eng)
            best_ratios.append(min(torch_times) / min(eng_times))
            line += f"{tt * 1e3:10.1f} {tt / eng:7.2f}x {best_ratios[-1]:6.2f}x "
        else:
            line += f"{'-':>10s} {'-':>8s} {'-':>7s} "
        floor_t = float(np.median(floor_times))
        print(line + f"{gflops:8.1f}", flush=True)
        if g == 1 and cin >= 8:
            blas = shape_gflops(cout, int(np.prod(k3)), cin, n * int(np.prod(spatial)), dtype)
            blas_cols = f" {blas:9.1f} {gflops / blas:5.2f}x"
        else:
            blas_cols = f" {'-':>9s} {'-':>6s}"
        out_gflops = flops / min(out_times) / 1e9
        rows.append((line, gflops, out_times, out_gflops, f"{blas_cols} {floor_t * 1e3:9.1f} {float(np.median(floor_ratios)):6.2f}x "
                                   f"{peak / out_bytes:7.2f}x  {path_of(PreparedLayer(x.shape, w, b, dtype=dtype, **kwargs))}"))
    gemm_end = sgemm_gflops(args.threads)
    gemm_rate = max(gemm_start, gemm_end)
    print(f"\n# numpy sgemm {gemm_end:.1f} GFLOP/s at the end; %sgemm below is of {gemm_rate:.1f}\n")
    print(header)
    print("-" * len(header))
    for line, gflops, out_times, out_gflops, rest in rows:
        print(f"{line}{gflops:8.1f} {100 * gflops / gemm_rate:6.1f}% {float(np.median(out_times)) * 1e3:8.1f} "
              f"{100 * out_gflops / gemm_rate:5.1f}%{rest}")
    if ratios:
        geo = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        best_geo = math.exp(sum(math.log(r) for r in best_ratios) / len(best_ratios))
        print(f"\ngeometric-mean speed-up over PyTorch: {geo:.2f}x; slowest case: {min(ratios):.2f}x")
        print(f"the same of the best runs: {best_geo:.2f}x; slowest case: {min(best_ratios):.2f}x")


if __name__ == "__main__":
    main()
