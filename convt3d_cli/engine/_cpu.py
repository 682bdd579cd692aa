"""What the CPU is, read once from ``/proc/cpuinfo`` (without importing Numba).

The kernels' register blocks and the tuner's key depend on the CPU model and on
the vector features that decide how many accumulators fit in registers.
"""

from __future__ import annotations

import functools

#: The vector features that change which kernel is fastest.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


@functools.lru_cache(maxsize=1)
def model_and_features():
    """``(model, features)``: the first CPU's model name (``"unknown CPU"`` when not
    known) and the sorted subset of :data:`FEATURES` it has (empty off x86 Linux)."""
    model, flags = "unknown CPU", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                name, _, value = line.partition(":")
                name = name.strip()
                if name == "model name" and model == "unknown CPU":
                    model = value.strip()
                elif name == "flags" and not flags:
                    flags = [f for f in value.split() if f in FEATURES]
    except OSError:
        pass
    return model, tuple(sorted(set(flags)))
