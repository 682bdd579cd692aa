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
