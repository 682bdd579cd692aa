"""One-channel layers against the output floor, measured alone (no PyTorch in between).

Usage::

    python benchmarks/bench_floor.py [--threads 2] [--repeat 15]

For 1 channel 128³ k3 s2 p1 op1, 128³ k4 s2 p1 and 192³ k2 s2 it prints medians of:

* *fresh*: ``conv_transpose3d`` returning a new array, against the floor of
  ``np.empty``, one write per memory page in order (mapping the pages, as the engine
  does) and one parallel fill of it;
* *warm*: ``PreparedLayer.run_slab`` into an output that already exists, against a
  parallel fill of that output (no page faults: the kernels' own cost).

The ratio fresh / floor is the issue's "within 2x of the output floor" figure.
Nothing here is a pass/fail test: timings on shared machines are noisy.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

# name, spatial, kernel, stride, padding, output_padding
CASES = [
    ("1ch 128^3 k3 s2 p1 op1", 128, 3, 2, 1, 1),
    ("1ch 128^3 k4 s2 p1", 128, 4, 2, 1, 0),
    ("1ch 192^3 k2 s2", 192, 2, 2, 0, 0),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args()

    import numba
    from numba import njit, prange
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    from convt3d_cli.engine import PreparedLayer, conv_transpose3d
    from convt3d_cli.engine._layer import _fault_in

    @njit(parallel=True, cache=False)
    def fill(flat):
        for i in prange(flat.shape[0]):
            flat[i] = 1.0

    def timed(call):
        t = time.perf_counter()
        call()
        return time.perf_counter() - t

    def fresh_floor(shape):
        flat = np.empty(shape, dtype=np.float32).reshape(-1)
        _fault_in(flat)   # pages mapped in order, as the engine does
        fill(flat)

    print(f"# threads={args.threads}, medians of {args.repeat}")
    header = (f"{'case':24s} {'path':>8s} {'fresh ms':>9s} {'floor ms':>9s} {'x floor':>8s} "
              f"{'warm ms':>8s} {'fill ms':>8s} {'x fill':>7s}")
    print(header)
    print("-" * len(header))
    for name, n, k, s, p, op in CASES:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((1, 1, n, n, n)).astype(np.float32)
        w = rng.standard_normal((1, 1, k, k, k)).astype(np.float32)
        b = np.ones(1, np.float32)
        layer = PreparedLayer(x.shape, w, b, s, p, op)
        out = np.empty(layer.output_shape, np.float32)
        n_out = layer.output_shape[2]
        layer.run_slab(x, 0, 0, n_out, out)  # load the kernels
        fresh_floor((8,))
        fresh, floor, warm, warm_fill = [], [], [], []
        for _ in range(args.repeat):
            fresh.append(timed(lambda: conv_transpose3d(x, w, b, stride=s, padding=p, output_padding=op)))
            floor.append(timed(lambda: fresh_floor(layer.output_shape)))
            warm.append(timed(lambda: layer.run_slab(x, 0, 0, n_out, out)))
            warm_fill.append(timed(lambda: fill(out.reshape(-1))))
        med = [float(np.median(v)) * 1e3 for v in (fresh, floor, warm, warm_fill)]
        print(f"{name:24s} {layer.path:>8s} {med[0]:9.2f} {med[1]:9.2f} {med[0] / med[1]:7.2f}x "
              f"{med[2]:8.2f} {med[3]:8.2f} {med[2] / med[3]:6.2f}x")


if __name__ == "__main__":
    main()
