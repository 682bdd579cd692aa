"""``.npy``: a single array in engine layout, read without ever unpickling."""

from __future__ import annotations

import ast
import io as _io
import os
import struct

import numpy as np

from .base import ArrayFormat, ArrayWriter
from .dtypes import is_numeric
from .records import Entry
from .safety import check_payload, reading
from .streaming import ArraySource, pwrite_all

LABEL = "a .npy file"
#: The longest header read, in bytes: NumPy's own limit (``max_header_size``), which
#: ``np.load`` applies to the files it then reads for convt3d.
MAX_HEADER_BYTES = 10000
#: Bytes of the header length field, and the header's text encoding, per format version.
_HEADER_FIELDS = {(1, 0): ("<H", "latin1"), (2, 0): ("<I", "latin1"), (3, 0): ("<I", "utf8")}
_HEADER_KEYS = {"descr", "fortran_order", "shape"}
# A size beyond this is no array anyone can hold (NumPy's sizes are int64).
_MAX_BYTES = np.iinfo(np.int64).max


def _read_exactly(stream, size, what):
    data = stream.read(size)
    if len(data) != size:
        raise ValueError(f"the file ends inside the {what} ({len(data)} of {size} bytes)")
    return data


def read_npy_header(stream):
    """Read the magic and header of an ``.npy`` stream (file or zip member).

    Only public NumPy functions are used: ``read_magic``, the 1.0 and 2.0 header
    readers and ``descr_to_dtype``. Version 3.0 (2.0 with a UTF-8 header) has no
    public reader and is parsed here, as NumPy does: ``ast.literal_eval`` (never
    ``eval``) of a dict with exactly the keys ``descr``, ``fortran_order`` and
    ``shape``. The header length is checked against :data:`MAX_HEADER_BYTES`
    before the header is read, and the shape (non-negative integers, a size that
    fits in int64) before anything is allocated for the data.

    Returns
    -------
    shape : tuple of int
    fortran_order : bool
    dtype : numpy.dtype
    version : tuple of int

    Raises
    ------
    ValueError
        Not an ``.npy`` stream, an unknown version, a header that is too long,
        truncated, not a dict literal, or describes no array; callers turn it into
        :class:`~convt3d_cli.errors.FileFormatError` (:func:`~.safety.reading`).
    """
    fmt = np.lib.format
    version = tuple(fmt.read_magic(stream))
    if version not in _HEADER_FIELDS:
        raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]} "
                         f"(1.0, 2.0 and 3.0 are read)")
    length_format, encoding = _HEADER_FIELDS[version]
    length_field = _read_exactly(stream, struct.calcsize(length_format), "header length")
    length = struct.unpack(length_format, length_field)[0]
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"the header is {length} bytes long; more than {MAX_HEADER_BYTES} "
                         f"is not read")
    header = _read_exactly(stream, length, "header")
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(_io.BytesIO(length_field + header))
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(_io.BytesIO(length_field + header))
    else:
        shape, fortran, dtype = _parse_header(header, encoding)
    return _checked_shape(shape, np.dtype(dtype)), bool(fortran), np.dtype(dtype), version


def _parse_header(raw, encoding):
    """``(shape, fortran_order, dtype)`` from a header's bytes (the dict literal NumPy writes)."""
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        raise ValueError(f"the header is not {encoding} text") from None
    try:
        header = ast.literal_eval(text)
    except (SyntaxError, ValueError, TypeError, MemoryError, RecursionError):
        raise ValueError(f"the header is not a Python literal: {_shown(text.strip())}") from None
    if not isinstance(header, dict):
        raise ValueError(f"the header is not a dict: {_shown(text.strip())}")
    if set(header) != _HEADER_KEYS:
        raise ValueError(f"the header must have exactly the keys {sorted(_HEADER_KEYS)}, "
                         f"not {_shown(sorted(map(repr, header)))}")
    if not isinstance(header["fortran_order"], bool):
        raise ValueError(f"fortran_order is not a bool: {_shown(header['fortran_order'])}")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except Exception:  # noqa: BLE001 - TypeError, ValueError, KeyError... all mean "unknown"
        raise ValueError(f"descr is not a known element type: {_shown(header['descr'])}") from None
    return header["shape"], header["fortran_order"], dtype


def _checked_shape(shape, dtype):
    """The shape as a tuple of ints, refused unless it is one an array can have."""
    if not isinstance(shape, tuple) or not all(type(n) is int for n in shape):
        raise ValueError(f"shape is not a tuple of integers: {_shown(shape)}")
    if any(n < 0 for n in shape):
        raise ValueError(f"shape has a negative axis length: {_shown(shape)}")
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= max(n, 1)  # an empty axis does not make the others possible
        if nbytes > _MAX_BYTES:
            break
    if nbytes > _MAX_BYTES:
        raise ValueError(f"shape {_shown(shape)} of {dtype} is larger than any array can be "
                         f"(more than 2**63 bytes)")
    return shape


def _shown(value, most=80):
    """``repr(value)``, cut to about ``most`` characters for a message."""
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= most else text[:most] + "..."


def needs_copy(dtype, fortran):
    """Whether making a C-ordered native array from the stored one costs a second copy."""
    return fortran or not dtype.isnative


def npy_header(shape, dtype):
    """The ``.npy`` magic and header np.save writes for a C-ordered array.

    Version 1.0 unless the header does not fit its 16-bit length (then 2.0), as
    np.save chooses; numeric dtypes never need 3.0.
    """
    fmt = np.lib.format
    header = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(v) for v in shape)}
    buffer = _io.BytesIO()
    try:
        fmt.write_array_header_1_0(buffer, header)
    except ValueError:  # longer than 65535 bytes: nothing was written
        buffer = _io.BytesIO()
        fmt.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


class NpyWriter(ArrayWriter):
    """Header first, then each (n, c) volume's D-slab at its offset (any slab order)."""

    def __init__(self, path, out_shape, dtype, overwrite, like, key=None, attrs=None):
        super().__init__(path, out_shape, dtype, overwrite, like)
        head = npy_header(self.file_shape, self.dtype)
        self.offset = len(head)
        self.fd = None
        with self._failing_removes():
            self.fd = os.open(self.tmp, os.O_WRONLY)
            pwrite_all(self.fd, head, 0)
            # Over the file-size limit (ulimit -f) this fails at once, with EFBIG.
            os.ftruncate(self.fd, self.offset + self.total_bytes)

    def _write(self, start, stop, block):
        for where, piece in self._pieces(start, block):
            pwrite_all(self.fd, piece, self.offset + where)

    def _release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NpyFormat(ArrayFormat):
    """``.npy`` files: one array, no key, no attributes; read slab-wise through a memory map."""

    name = "npy"
    label = "npy"
    default_key = None
    writer = NpyWriter

    def _header(self, path):
        with reading(path, LABEL), open(path, "rb") as handle:
            shape, fortran, dtype, version = read_npy_header(handle)
            offset = handle.tell()
        return shape, fortran, dtype, version, offset

    def entries(self, path):
        shape, fortran, dtype, _, offset = self._header(path)
        entry = Entry(None, shape, dtype, needs_copy=needs_copy(dtype, fortran))
        if is_numeric(dtype):  # object arrays are refused later; their size means nothing
            check_payload(path, offset, entry.nbytes, shape, dtype)
        return [entry]

    def load_entry(self, path, entry):
        with reading(path, LABEL):
            return np.load(path, allow_pickle=False)

    def describe_extra(self, path, entries, entry):
        _, fortran, _, version, offset = self._header(path)
        return {"npy_version": f"{version[0]}.{version[1]}", "fortran_order": fortran,
                "data_offset": offset}

    def open_source(self, info, transposed, dtype, pad, scratch_dir):
        with reading(info.path, LABEL):
            array = np.load(info.path, mmap_mode="r", allow_pickle=False)
        return ArraySource(info, transposed, dtype, pad, array.reshape(info.engine_shape))


FORMAT = NpyFormat()
