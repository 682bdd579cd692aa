"""safetensors files (``.safetensors``), read by our own reader of the documented format.

The format (https://huggingface.co/docs/safetensors): 8 bytes, a little-endian
unsigned header length ``N``; ``N`` bytes of UTF-8 JSON, an object mapping each
tensor name to ``{"dtype": "F32", "shape": [...], "data_offsets": [begin, end]}``
plus an optional ``"__metadata__"`` object of strings (``{"format": "pt"}``); then
the data: each tensor's C-ordered little-endian bytes at ``[begin, end)``
relative to the end of the header.

Why not the ``safetensors`` package
-----------------------------------
The guide prefers a well-kept library made for a format, and the official one
was weighed (safetensors 0.8, checked with hostile files): it imports in about
1 ms, its wheel is 0.5 MB (a compiled Rust extension, abi3), and it validates the
header thoroughly before reading (header at most 100 MB, JSON and UTF-8, offsets
contiguous from 0 covering the data exactly, sizes equal to shape x dtype without
overflow). But its NumPy interface cannot return bfloat16, the type most current
checkpoints are stored in: ``safe_open(path, framework="numpy").get_tensor(name)``
fails with "data type 'bfloat16' not understood", and it exposes no byte offsets,
so a bfloat16 file would still need a reader of our own. The format being an
8-byte length, a JSON header and a flat buffer, one reader of ~150 lines that
applies the library's rules (and its 100 MB header limit) serves every type,
adds no compiled runtime dependency, and words its errors like the rest of
convt3d. ``tests/io/test_io_safetensors.py`` checks, when the package is
installed, that the two agree on valid and on hostile files.

Rules (all checked from the header, before anything is allocated): the header
length fits the file and is at most 100 MB; the header is a JSON object with no
repeated names; every dtype is known; shapes and offsets are non-negative
integers; ``end - begin`` equals the element count times the element size;
sorted by offset, the tensors tile the data from 0 to the end of the file with no
gap and no overlap (as the specification requires, so no bytes hide in a file).
Read: F16, F32, F64, BF16 (returned as float32: the bits shifted left by 16,
exact), I8, I16, I32, I64, U8, U16, U32, U64 and BOOL. Other known types (F8_*,
F4, F6_*, C64) are listed by ``convt3d info`` as unsupported and never loaded.
"""

from __future__ import annotations

import collections
import json
import math
import os
import sys

import numpy as np

from ..errors import FileFormatError
from .base import WeightsFormat
from .records import Entry
from .safety import check_memory, human_bytes, reading, require_file

LABEL = "a safetensors file"

#: The safetensors library's limit on the JSON header (``MAX_HEADER_SIZE``).
MAX_HEADER_BYTES = 100_000_000

# dtype -> (bits per element, NumPy code to read it with, or None when convt3d does not read it).
# BF16 is read as raw uint16 and widened to float32; BOOL as bytes compared to 0.
_DTYPES = {
    "F16": (16, "<f2"), "F32": (32, "<f4"), "F64": (64, "<f8"), "BF16": (16, "<u2"),
    "I8": (8, "|i1"), "I16": (16, "<i2"), "I32": (32, "<i4"), "I64": (64, "<i8"),
    "U8": (8, "|u1"), "U16": (16, "<u2"), "U32": (32, "<u4"), "U64": (64, "<u8"),
    "BOOL": (8, "|u1"),
    "C64": (64, None), "F8_E4M3": (8, None), "F8_E5M2": (8, None), "F8_E8M0": (8, None),
    "F8_E4M3FNUZ": (8, None), "F8_E5M2FNUZ": (8, None), "F4": (4, None), "F6_E2M3": (6, None),
    "F6_E3M2": (6, None),
}
#: Dimensions and element counts at least this large are refused (they do not fit 64 bits).
_MAX_COUNT = 2 ** 63
_READ = ", ".join(name for name, (_, code) in _DTYPES.items() if code)


class _Header:
    """What the header says: the tensors in file order, unsupported ones, metadata, data start."""

    def __init__(self, entries, unsupported, metadata, data_start):
        self.entries = entries
        self.unsupported = unsupported
        self.metadata = metadata
        self.data_start = data_start


def _no_repeats(pairs):
    names = [name for name, _ in pairs]
    if len(set(names)) != len(names):
        # Counted once (not names.count per name: quadratic, minutes for a 100 MB header of one name).
        repeated = sorted(n for n, count in collections.Counter(names).items() if count > 1)
        raise FileFormatError(f"the header names {', '.join(map(repr, repeated[:5]))} more than once")
    return dict(pairs)


def _count(value):
    return type(value) is int and value >= 0


def read_header(path):
    """Parse and check the header of a safetensors file (see the module docstring).

    Parameters
    ----------
    path : str

    Returns
    -------
    _Header

    Raises
    ------
    FileFormatError
        The first rule the file breaks, in one line.
    """
    require_file(path)
    size = os.path.getsize(path)
    with reading(path, LABEL), open(path, "rb") as handle:
        if size < 8:
            raise FileFormatError(f"{path} is too short to be a safetensors file ({size} bytes)")
        length = int.from_bytes(handle.read(8), "little")
        if length > MAX_HEADER_BYTES:
            raise FileFormatError(f"{path}: the header length {length} is larger than the "
                                  f"{MAX_HEADER_BYTES}-byte limit of safetensors; the file is damaged")
        if 8 + length > size:
            raise FileFormatError(f"{path} is truncated: its header should be {length} bytes but the "
                                  f"file has only {size - 8} after the length")
        raw = handle.read(length)
    data_size = size - 8 - length
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_repeats)
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    except RecursionError:
        raise FileFormatError(f"{path}: the header is JSON nested too deeply to be a safetensors "
                              f"header") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise FileFormatError(f"{path}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise FileFormatError(f"{path}: the header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(f"{path}: __metadata__ must map names to strings")

    spans, entries, unsupported = [], [], {}
    for name, info in header.items():
        where = f"{path}:{name}"
        if not isinstance(info, dict):
            raise FileFormatError(f"{where}: the header entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in _DTYPES:
            raise FileFormatError(f"{where} has unknown element type {dtype!r:.40}; safetensors defines "
                                  f"{', '.join(_DTYPES)}")
        if not (isinstance(shape, list) and all(_count(n) for n in shape)):
            raise FileFormatError(f"{where}: shape must be a list of non-negative integers, "
                                  f"got {shape!r:.80}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_count, offsets))
                and offsets[0] <= offsets[1]):
            raise FileFormatError(f"{where}: data_offsets must be [begin, end] with "
                                  f"0 <= begin <= end, got {offsets!r:.80}")
        bits, code = _DTYPES[dtype]
        total_bits = math.prod(shape) * bits
        begin, end = offsets
        if total_bits % 8:
            # The count itself may have more digits than Python prints (10**4000 x 10**4000).
            count = math.prod(shape)
            shown = str(count) if count < 10 ** 30 else f"about 10**{int(math.log10(count))}"
            raise FileFormatError(f"{where}: {shown} {dtype} values do not end on a byte "
                                  f"boundary")
        if end - begin != total_bits // 8:
            raise FileFormatError(
                f"{where}: shape {tuple(shape)} of {dtype} needs {human_bytes(total_bits // 8)} but "
                f"data_offsets [{begin}, {end}] hold {end - begin} bytes")
        if any(n >= _MAX_COUNT for n in shape) or math.prod(n for n in shape if n) >= _MAX_COUNT:
            # Only an empty tensor gets here so: (0, 10**4000) holds no bytes, but the library's
            # sizes are 64-bit (usize) and NumPy cannot make such an array either.
            raise FileFormatError(f"{where}: shape has a dimension or an element count of 2**63 or more")
        spans.append((begin, end, name))
        if code is None:
            unsupported[name] = dtype
            continue
        out = {"BF16": np.dtype(np.float32), "BOOL": np.dtype(bool)}.get(dtype, np.dtype(code))
        attrs = {"offset": 8 + length + begin, "nbytes": end - begin, "stored_dtype": dtype,
                 "read_as": code}
        if dtype == "BF16":
            attrs["converted"] = "BF16 -> float32 (exact)"
        # BF16 and BOOL are converted; other types are used in place unless the host is big-endian.
        copies = dtype in ("BF16", "BOOL") or (bits > 8 and sys.byteorder != "little")
        entries.append(Entry(name=name, shape=tuple(shape), dtype=out, needs_copy=copies, attrs=attrs))

    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else \
                f"starts at byte {begin} but the tensor before it ends at {position}"
            raise FileFormatError(f"{path}:{name}: data_offsets [{begin}, {end}] {what}; tensors must "
                                  f"tile the data with no gap or overlap")
        position = end
    if position > data_size:
        raise FileFormatError(f"{path} is truncated: its header declares {position} bytes of data "
                              f"but the file holds {data_size}")
    if position < data_size:
        raise FileFormatError(f"{path} has {data_size - position} bytes after its last tensor that "
                              f"no tensor covers; the file is damaged")
    return _Header(entries, unsupported, metadata, 8 + length)


def _load(path, entry):
    attrs = entry.attrs
    stored = np.dtype(attrs["read_as"])
    where = f"{path}:{entry.name}"
    check_memory(attrs["nbytes"] + (entry.nbytes if entry.needs_copy else 0), where)
    raw = np.empty(attrs["nbytes"], dtype=np.uint8)
    with reading(path, LABEL), open(path, "rb") as handle:
        handle.seek(attrs["offset"])
        count = handle.readinto(memoryview(raw))
    if count != attrs["nbytes"]:
        raise FileFormatError(f"{where}: the file ends early; it is truncated")
    values = raw.view(stored).reshape(entry.shape)
    if attrs["stored_dtype"] == "BF16":
        return (values.astype(np.uint32) << 16).view(np.float32)
    if attrs["stored_dtype"] == "BOOL":
        return values != 0
    return values


class SafetensorsFormat(WeightsFormat):
    """``.safetensors`` files: named tensors, no code, no layer settings."""

    name = "safetensors"
    label = "safetensors"
    volume_hint = "pass it to --weights (FILE.safetensors:LAYER names a layer such as decoder.up1)"

    def tensors(self, path):
        """Every readable tensor, in header order, from the header only.

        Returns
        -------
        list of Entry
            ``dtype`` is what :meth:`load_tensor` returns (float32 for BF16);
            ``attrs`` hold the absolute byte offset and size.

        Raises
        ------
        FileFormatError
            A header that breaks a rule of the format (see the module docstring).
        """
        return list(read_header(path).entries)

    def load_tensor(self, path, entry):
        """The values of ``entry``, C-ordered, native byte order (BF16 widened to float32)."""
        return _load(path, entry)

    def describe(self, path, key):
        report = super().describe(path, key)
        header = read_header(path)
        if header.metadata:
            report["metadata"] = dict(header.metadata)
        if header.unsupported:
            report["unsupported_tensors"] = dict(header.unsupported)
        return report


FORMAT = SafetensorsFormat()
