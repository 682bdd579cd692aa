"""What the CPU is, read once from ``/proc/cpuinfo`` and sysfs (without importing Numba).

The kernels' register blocks and the tuner's key depend on the CPU model and on
the vector features that decide how many accumulators fit in registers; the blocked
kernel's input blocks on the size of its level-2 cache.
"""

from __future__ import annotations

import functools
import os

#: Where Linux describes the first CPU's caches (one ``indexN`` folder per cache).
CACHE_DIR = "/sys/devices/system/cpu/cpu0/cache"

#: The vector features that change which kernel is fastest.
FEATURES = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")


#: LLVM's names of :data:`FEATURES` where they differ from /proc/cpuinfo's.
_LLVM_NAMES = {"avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "amx-tile": "amx_tile"}
#: What turning off a feature in LLVM turns off with it (among :data:`FEATURES`).
_IMPLIED_OFF = {"avx2": ("avx512f", "avx512_vnni", "avx512_bf16", "amx_tile"),
                "avx512f": ("avx512_vnni", "avx512_bf16")}
#: The features of LLVM's generic x86 targets.
_BASELINES = {"generic": (), "x86-64": (), "x86-64-v2": (), "x86-64-v3": ("avx2", "fma"),
              "x86-64-v4": ("avx2", "avx512f", "fma")}


def compiled_features(flags, cpu_name=None, feature_text=None):
    """The subset of :data:`FEATURES` the kernels are compiled with, from the CPU's
    /proc/cpuinfo ``flags`` and Numba's ``NUMBA_CPU_NAME`` and ``NUMBA_CPU_FEATURES``
    (``cpu_name`` and ``feature_text``; read from the environment when None).

    Numba compiles for the host unless these name another target (a cache shared by
    several kinds of nodes is built for ``generic``, or with AVX-512 turned off): the
    register blocks must follow what the code uses, not what the CPU could run. The
    features start from the host's flags, or from :data:`_BASELINES` for a generic target,
    and ``NUMBA_CPU_FEATURES``' ``+name`` and ``-name`` apply on top (another named CPU is
    taken to have the host's).
    """
    if cpu_name is None:
        cpu_name = os.environ.get("NUMBA_CPU_NAME", "")
    if feature_text is None:
        feature_text = os.environ.get("NUMBA_CPU_FEATURES", "")
    found = set(_BASELINES.get(cpu_name.strip(), flags))
    for token in feature_text.split(","):
        token = token.strip()
        if len(token) < 2 or token[0] not in "+-":
            continue
        name = _LLVM_NAMES.get(token[1:], token[1:])
        if token[0] == "+":
            found.add(name)
        else:
            found.discard(name)
            found.difference_update(_IMPLIED_OFF.get(name, ()))
    return tuple(sorted(found & set(FEATURES)))


@functools.lru_cache(maxsize=1)
def model_and_features():
    """``(model, features)``: the first CPU's model name (``"unknown CPU"`` when not
    known) and the sorted subset of :data:`FEATURES` the kernels are compiled with
    (:func:`compiled_features`: the CPU's own unless Numba is told otherwise; empty off
    x86 Linux)."""
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
    return model, compiled_features(flags)


def _parse_size(text):
    """Bytes of a sysfs cache size such as ``512K``, ``2M`` or ``32768``; None if malformed."""
    text = text.strip().upper()
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
    digits = text[:-1] if scale > 1 else text
    if not digits.isdigit() or len(digits) > 12:
        return None
    return int(digits) * scale or None


@functools.lru_cache(maxsize=1)
def l2_bytes():
    """The first CPU's level-2 data (or unified) cache size in bytes, or None when the
    system does not say (not Linux, no sysfs, an unreadable or odd entry)."""
    try:
        entries = sorted(os.listdir(CACHE_DIR))
    except OSError:
        return None
    for entry in entries:
        if not entry.startswith("index"):
            continue
        fields = {}
        for name in ("level", "type", "size"):
            try:
                with open(os.path.join(CACHE_DIR, entry, name), encoding="ascii", errors="replace") as handle:
                    fields[name] = handle.read(64).strip()
            except OSError:
                break
        if fields.get("level") == "2" and fields.get("type") in ("Unified", "Data") and "size" in fields:
            return _parse_size(fields["size"])
    return None
