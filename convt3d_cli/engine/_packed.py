"""Packed weights kept for the next layer with the same weights.

The blocked and sub-pixel kernels read their weights reordered per output phase
(``pack_weights``). ``conv_transpose3d`` builds a new layer on every call, and a script
that runs one decoder layer over many volumes would repack the same weights each time:
for a layer with many channels on a small volume (U-Net 320->256 on 8^3, 2.5 MiB of
weights) packing took 0.7-1.0 ms of a 5-7 ms call. ONNX Runtime and oneDNN keep
prepacked weights for the same reason.

A packing is reused only when the weights it was made from hold the same bytes as the
new ones (a copy is kept and compared: in-place changes to a weight array are seen), and
only for the same layout (the phase tables and register block); several layers of one
shape keep a packing each. Small weights are packed again each time: comparing them
would cost about what packing does. The kept copies and packings are bounded by
:data:`CACHE_BYTES`, least recently used first out.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict

import numpy as np

#: Weights smaller than this are packed on every call.
MIN_WEIGHT_BYTES = 256 * 1024
#: Bytes of kept weight copies and packings, at most.
CACHE_BYTES = 64 * 2 ** 20

_lock = threading.Lock()
_entries: OrderedDict = OrderedDict()
_held = 0
_serial = 0


def _after_fork():
    """A forked child may inherit the lock held by a thread it does not have."""
    global _lock
    _lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _same_bytes(a, b):
    """Whether two contiguous arrays of one shape and dtype hold the same bytes (NaNs too).

    Compared as 8-byte words where they can be: a byte-wise comparison makes a temporary
    as large as the weights, and on 2.5 MiB it took twice as long (0.22 ms against 0.09).
    """
    a8, b8 = a.reshape(-1).view(np.uint8), b.reshape(-1).view(np.uint8)
    words = a8.size - a8.size % 8
    return (np.array_equal(a8[:words].view(np.uint64), b8[:words].view(np.uint64))
            and np.array_equal(a8[words:], b8[words:]))


def _match(entries, key, weight):
    """The name and packing of the entry among ``entries`` made from ``weight`` for ``key``."""
    for name, (source, done) in entries:
        if name[0] == key and _same_bytes(source, weight):
            return name, done
    return None, None


def packed(weight, layout, pack):
    """The packing of ``weight`` for ``layout``: kept from an earlier call, or ``pack()``.

    Parameters
    ----------
    weight : numpy.ndarray
        C-contiguous weights the packing is made from.
    layout : tuple
        Hashable description of everything else the packing depends on (the phase
        tables' bytes, the register block, the packed shape).
    pack : callable
        ``pack()`` returns a new packing of ``weight``. Its result is shared with later
        callers, who must not write to it.

    Returns
    -------
    numpy.ndarray
    """
    global _held, _serial
    if weight.nbytes < MIN_WEIGHT_BYTES:
        return pack()
    key = (weight.shape, weight.dtype.str) + tuple(layout)
    with _lock:
        kept = [item for item in _entries.items() if item[0][0] == key]
        searched = _serial
    name, done = _match(kept, key, weight)   # compared outside the lock
    if name is not None:
        with _lock:
            if name in _entries:
                _entries.move_to_end(name)
        return done
    result = pack()
    size = weight.nbytes + result.nbytes
    if size <= CACHE_BYTES:
        with _lock:
            # Only what other threads stored meanwhile: the rest was compared above.
            name, done = _match([item for item in _entries.items() if item[0][1] > searched], key, weight)
            if name is not None:
                return done  # another thread packed the same weights meanwhile
            while _entries and _held + size > CACHE_BYTES:
                _, (source, done) = _entries.popitem(last=False)
                _held -= source.nbytes + done.nbytes
            _serial += 1
            _entries[key, _serial] = (weight.copy(), result)
            _held += size
    return result


def clear():
    """Forget every kept packing (tests; a process that wants the memory back)."""
    global _held
    with _lock:
        _entries.clear()
        _held = 0
