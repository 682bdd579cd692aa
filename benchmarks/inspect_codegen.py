"""What LLVM makes of the blocked kernel's register blocks on CPUs this machine is not.

Usage::

    python benchmarks/inspect_codegen.py [--cpu sapphirerapids --cpu znver4 ...] [--block 8x16 ...]

For each LLVM CPU name and each register block (``_kernels.REGISTER_BLOCKS``) it compiles
``blocked_phases`` for float32 in a child process with ``NUMBA_CPU_NAME`` and
``NUMBA_CPU_FEATURES`` set (and a scratch cache), without running it: the code may use
instructions this CPU lacks. From the assembly it reads the hottest loop (the basic
block with the most FMAs) and prints its FMAs, their vector width, how many take their
broadcast weight straight from memory, and its stack loads and stores (spilled
accumulators). This is how the blocks for CPUs without a machine here were designed; the
tuner still measures them where they run.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

_AVX2 = "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2,-avx512f"
_AVX512 = "+avx,+avx2,+fma,+f16c,+bmi,+bmi2,+popcnt,+sse4.2,+avx512f,+avx512vl,+avx512bw,+avx512dq,+avx512cd"
#: LLVM CPU names and the features to compile with (``NUMBA_CPU_FEATURES`` replaces the host's).
CPUS = {"znver3": _AVX2, "haswell": _AVX2, "znver4": _AVX512, "sapphirerapids": _AVX512,
        "skylake-avx512": _AVX512, "icelake-server": _AVX512}

_CHILD = r"""
import sys
import numpy as np
from numba import typeof
sys.path.insert(0, __ROOT__)
from convt3d_cli.engine import _layer, _numba_env
kern = _numba_env.kernels()
kern.pack_weights = lambda *args: None   # compiled for another CPU: nothing may run here
block = __BLOCK__
x = np.zeros((1, 16, 6, 6, 6), np.float32)
w = np.zeros((16, 16, 3, 3, 3), np.float32)
layer = _layer.PreparedLayer(x.shape, w, None, 2, 1, 0, 1, 1, np.float32, path="blocked-" + block)
prepared = layer._blocked_plan(layer.path)
plan, blocking, s = prepared.plan, prepared.plan.blocking, layer.params.stride
out = np.zeros(layer.output_shape, np.float32)
args = (x, prepared.w_packed, plan.terms, prepared.bias_blocks, out, *plan.tables, s[0], s[1], s[2],
        blocking.d_chunk, blocking.h_tile, blocking.rows_per_block, *blocking.padded, 0, layer.input_shape[2],
        0, layer.out_spatial[0], 0, 2)
signature = tuple(typeof(a) for a in args)
kernel = kern.BLOCKED_KERNELS[block]
kernel.compile(signature)
sys.stdout.write(kernel.inspect_asm(signature))
"""


def hottest_loop(asm):
    """The lines of the basic block with the most FMA instructions."""
    blocks, current = [], []
    for line in asm.splitlines():
        if re.match(r"^\.?LBB\w*:", line.strip()) or re.match(r"^\S+:", line):
            blocks.append(current)
            current = []
        current.append(line)
    blocks.append(current)
    return max(blocks, key=lambda lines: sum("vfmadd" in line for line in lines))


def describe(lines):
    fmas = [line for line in lines if "vfmadd" in line]
    width = "zmm" if any("zmm" in f for f in fmas) else "ymm" if any("ymm" in f for f in fmas) else "xmm"
    embedded = sum("{1to" in f for f in fmas)
    stack = sum(1 for line in lines if "(%rsp)" in line and re.search(r"[xyz]mm", line))
    return len(fmas), width, embedded, stack


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="append", choices=sorted(CPUS), help="LLVM CPU name (repeatable)")
    ap.add_argument("--block", action="append", help="register block, e.g. 8x16 (repeatable; default all)")
    args = ap.parse_args()
    cpus = args.cpu or ["znver3", "znver4", "sapphirerapids"]
    sys.path.insert(0, ROOT)
    from convt3d_cli.engine import _layer
    blocks = args.block or [_layer.register_block(name) for name in _layer.BLOCKED_VARIANTS]
    print("# hottest loop of blocked_phases (float32) per LLVM CPU and register block (channels x positions)")
    print(f"{'cpu':16s} {'block':6s} {'FMAs':>5s} {'width':>6s} {'bcast-in-FMA':>13s} {'stack ops':>10s}")
    for cpu in cpus:
        for block in blocks:
            with tempfile.TemporaryDirectory() as cache:
                env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=CPUS[cpu], NUMBA_CACHE_DIR=cache)
                code = _CHILD.replace("__ROOT__", repr(ROOT)).replace("__BLOCK__", repr(block))
                proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{cpu:16s} {block:6s} failed: {proc.stderr.strip().splitlines()[-1:]}")
                continue
            n, width, embedded, stack = describe(hottest_loop(proc.stdout))
            print(f"{cpu:16s} {block:6s} {n:5d} {width:>6s} {embedded:13d} {stack:10d}", flush=True)


if __name__ == "__main__":
    main()
