"""What LLVM makes of the engine's compiled kernels on CPUs this machine is not.

Usage::

    python benchmarks/inspect_codegen.py [--cpu sapphirerapids --cpu znver4 ...] [--kernel blocked-8x16 ...]
                                         [--compile-only]

For each LLVM CPU name it compiles the engine's kernels for float32 in a child process
with ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES`` set (and a scratch cache). Where this
machine has every feature the target is compiled with, the child runs a small layer
through each path (``CONVT3D_PATH`` pinned, no tuning) and inspects every kernel it
compiled: the blocked kernel of each register block, ``subpixel``, ``shuffle``, ``paired``
and ``fir``. Elsewhere, or with ``--compile-only``, it only compiles the blocked kernel's
register blocks without running them (the code may use instructions this CPU lacks).

From the assembly it reads the hottest loop (the basic block with the most FMAs) and
prints its FMAs, their vector width, how many take their broadcast weight straight from
memory, and its stack loads and stores (spilled accumulators). When ``llvm-mca`` is on
the PATH and knows the CPU, it also prints that loop's cycles per iteration in LLVM's
scheduling model of the CPU and the share of the CPU's FMA peak this makes (the FMA lanes
of one iteration over its cycles, against :data:`FMA_LANES_PER_CYCLE`). That is a model
of the inner loop alone, in cache: loads from memory, stores and threads are not in it.
This is how kernels for CPUs without a machine here were designed; the tuner still
measures them where they run.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
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
#: float32 FMA lanes each CPU can retire per cycle: two 256-bit FMA units on Haswell and
#: Zen 3; Zen 4 runs a 512-bit FMA as two 256-bit halves; Intel's Xeons from Skylake-SP on
#: have two 512-bit FMA units (one on some Silver and Gold 5xxx models).
FMA_LANES_PER_CYCLE = {"znver3": 16, "haswell": 16, "znver4": 16, "sapphirerapids": 32,
                       "skylake-avx512": 32, "icelake-server": 32}
#: /proc/cpuinfo flags this machine needs to run code compiled with each feature set.
_RUN_FLAGS = {_AVX2: {"avx2", "fma", "f16c", "bmi2", "popcnt"},
              _AVX512: {"avx2", "fma", "f16c", "bmi2", "popcnt", "avx512f", "avx512vl", "avx512bw", "avx512dq",
                        "avx512cd"}}
_MARK = "@@@ convt3d kernel "

#: Small layers that make each path compile its kernel (float32):
#: path, input shape, weight shape, stride, padding. Rows of 40 outputs fill every
#: register block's positions.
CASES = (
    ("subpixel", (1, 2, 6, 6, 40), (2, 2, 3, 3, 3), 2, 1),
    ("shuffle", (1, 16, 6, 6, 40), (16, 16, 2, 2, 2), 2, 0),
    ("paired", (1, 1, 12, 12, 40), (1, 1, 3, 3, 3), 2, 1),
    ("fir", (1, 1, 12, 12, 40), (1, 1, 3, 3, 3), 2, 1),
)
BLOCKED_CASE = ((1, 16, 6, 6, 40), (16, 16, 3, 3, 3), 2, 1)
#: The compiled kernel behind each path.
KERNEL_OF_PATH = {"subpixel": "subpixel_blocked", "shuffle": "shuffle_gemm", "paired": "paired_rows",
                  "fir": "direct_fir"}

_CHILD_RUN = r"""
import sys
import numpy as np
sys.path.insert(0, __ROOT__)
from convt3d_cli.engine import conv_transpose3d, _numba_env
rng = np.random.default_rng(0)
for path, x_shape, w_shape, stride, padding in __CASES__:
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    conv_transpose3d(x, w, None, stride=stride, padding=padding, path=path, threads=2)
kern = _numba_env.kernels()
for path, *_ in __CASES__:
    name = path.partition("-")[2] if path.startswith("blocked-") else None
    kernel = kern.BLOCKED_KERNELS[name] if name else getattr(kern, __KERNELS__[path])
    for signature in kernel.signatures:
        if str(signature[0]).startswith("array(float32"):
            sys.stdout.write(__MARK__ + path + "\n" + kernel.inspect_asm(signature) + "\n")
            break
"""

_CHILD_COMPILE = r"""
import sys
import numpy as np
from numba import typeof
sys.path.insert(0, __ROOT__)
from convt3d_cli.engine import _layer, _numba_env
kern = _numba_env.kernels()
kern.pack_weights = lambda *args: None   # compiled for another CPU: nothing may run here
x_shape, w_shape, stride, padding = __BLOCKED_CASE__
for path in __PATHS__:
    block = path.partition("-")[2]
    x = np.zeros(x_shape, np.float32)
    w = np.zeros(w_shape, np.float32)
    layer = _layer.PreparedLayer(x.shape, w, None, stride, padding, 0, 1, 1, np.float32, path=path)
    prepared = layer._blocked_plan(layer.path)
    plan, blocking, s = prepared.plan, prepared.plan.blocking, layer.params.stride
    out = np.zeros(layer.output_shape, np.float32)
    args = (x, prepared.w_packed, plan.terms, prepared.bias_blocks, out, *plan.tables, s[0], s[1], s[2],
            blocking.d_chunk, blocking.h_tile, blocking.rows_per_block, *blocking.padded, 0,
            layer.input_shape[2], 0, layer.out_spatial[0], 0, 2)
    signature = tuple(typeof(a) for a in args)
    kernel = kern.BLOCKED_KERNELS[block]
    kernel.compile(signature)
    sys.stdout.write(__MARK__ + path + "\n" + kernel.inspect_asm(signature) + "\n")
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
    """FMAs, their widest register, FMAs with a memory broadcast, vector stack operations."""
    fmas = [line for line in lines if "vfmadd" in line]
    width = "zmm" if any("zmm" in f for f in fmas) else "ymm" if any("ymm" in f for f in fmas) else "xmm"
    embedded = sum("{1to" in f for f in fmas)
    stack = sum(1 for line in lines if "(%rsp)" in line and re.search(r"[xyz]mm", line))
    return len(fmas), width, embedded, stack


def fma_lanes(lines):
    """float32 multiply-adds one pass of the loop does (16 per zmm FMA, 8 per ymm, 4 per xmm)."""
    lanes = 0
    for line in lines:
        if "vfmadd" in line:
            lanes += 16 if "zmm" in line else 8 if "ymm" in line else 4 if "xmm" in line else 1
    return lanes


def loop_cycles(lines, cpu, mca):
    """Cycles per iteration of the loop in ``llvm-mca``'s model of ``cpu``, or None when
    ``mca`` is None or does not know the CPU or an instruction."""
    if mca is None:
        return None
    # The loop body: instructions only, without its label, directives and a jump past it.
    body = [line for line in lines[1:] if line.strip() and not line.strip().startswith((".", "#"))
            and not re.match(r"\s*jmp\b", line)]
    iterations = 400
    try:
        proc = subprocess.run([mca, f"-mcpu={cpu}", f"-iterations={iterations}"], input="\n".join(body) + "\n",
                              capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    found = re.search(r"Total Cycles:\s+(\d+)", proc.stdout)
    if proc.returncode != 0 or not found:
        return None
    return int(found.group(1)) / iterations


def host_flags():
    """This machine's /proc/cpuinfo flags (empty where there is none)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.partition(":")[2].split())
    except OSError:
        pass
    return set()


def kernels_for(cpu, paths, compile_only):
    """``{path: assembly}`` of the kernels behind ``paths`` compiled for ``cpu``, and an
    error text (empty when the child succeeded)."""
    blocked = [path for path in paths if path.startswith("blocked-")]
    others = [path for path in paths if not path.startswith("blocked-")]
    if compile_only:
        child = _CHILD_COMPILE.replace("__PATHS__", repr(blocked)).replace("__BLOCKED_CASE__", repr(BLOCKED_CASE))
    else:
        cases = [case for case in CASES if case[0] in others] + [(path,) + BLOCKED_CASE for path in blocked]
        child = (_CHILD_RUN.replace("__CASES__", repr(cases)).replace("__KERNELS__", repr(KERNEL_OF_PATH)))
    child = child.replace("__ROOT__", repr(ROOT)).replace("__MARK__", repr(_MARK))
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CPU_NAME=cpu, NUMBA_CPU_FEATURES=CPUS[cpu], NUMBA_CACHE_DIR=cache,
                   CONVT3D_TUNE="0")
        env.pop("CONVT3D_PATH", None)
        proc = subprocess.run([sys.executable, "-c", child], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {}, (proc.stderr.strip().splitlines() or ["no output"])[-1]
    found = {}
    for part in proc.stdout.split(_MARK)[1:]:
        path, _, asm = part.partition("\n")
        found[path] = asm
    return found, ""


def main():
    import numba

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="append", choices=sorted(CPUS), help="LLVM CPU name (repeatable)")
    ap.add_argument("--kernel", action="append",
                    help="path whose kernel to inspect, e.g. blocked-8x16 or subpixel (repeatable; default all)")
    ap.add_argument("--block", action="append", help="register block, e.g. 8x16: the same as --kernel blocked-8x16")
    ap.add_argument("--compile-only", action="store_true",
                    help="compile the blocked kernel's blocks without running anything")
    args = ap.parse_args()
    cpus = args.cpu or ["znver3", "znver4", "sapphirerapids"]
    sys.path.insert(0, ROOT)
    from convt3d_cli.engine import _layer

    paths = list(args.kernel or []) + ["blocked-" + block for block in args.block or []]
    if not paths:
        paths = list(_layer.BLOCKED_VARIANTS) + [case[0] for case in CASES]
    unknown = [path for path in paths if path not in _layer.BLOCKED_VARIANTS and path not in KERNEL_OF_PATH]
    if unknown:
        ap.error(f"no compiled kernel to inspect for {', '.join(unknown)}")
    mca = shutil.which("llvm-mca")
    flags = host_flags()
    print(f"# hottest loop of each kernel (float32) per LLVM CPU; numba {numba.__version__}; "
          f"llvm-mca: {mca or 'not found (no cycle estimates)'}")
    print(f"{'cpu':16s} {'kernel':15s} {'FMAs':>5s} {'width':>6s} {'bcast-in-FMA':>13s} {'stack ops':>10s} "
          f"{'cycles/iter':>12s} {'% FMA peak':>11s}")
    for cpu in cpus:
        compile_only = args.compile_only or not _RUN_FLAGS[CPUS[cpu]] <= flags
        wanted = [path for path in paths if not compile_only or path.startswith("blocked-")]
        if len(wanted) < len(paths):
            print(f"# {cpu}: this machine cannot run code compiled for it; blocked kernels compiled only")
        found, error = kernels_for(cpu, wanted, compile_only)
        if error:
            print(f"{cpu:16s} failed: {error}")
            continue
        for path in wanted:
            if path not in found:
                print(f"{cpu:16s} {path:15s} not compiled")
                continue
            lines = hottest_loop(found[path])
            n, width, embedded, stack = describe(lines)
            cycles = loop_cycles(lines, cpu, mca)
            if cycles:
                share = 100 * fma_lanes(lines) / cycles / FMA_LANES_PER_CYCLE[cpu]
                model = f"{cycles:12.2f} {share:10.0f}%"
            else:
                model = f"{'-':>12s} {'-':>11s}"
            print(f"{cpu:16s} {path:15s} {n:5d} {width:>6s} {embedded:13d} {stack:10d} {model}", flush=True)


if __name__ == "__main__":
    main()
