"""``.npy``: a single array in engine layout, read without ever unpickling."""

from __future__ import annotations

import io as _io
import os

import numpy as np

from .base import ArrayFormat, ArrayWriter
from .dtypes import is_numeric
from .records import Entry
from .safety import check_payload, reading
from .streaming import ArraySource, pwrite_all

LABEL = "a .npy file"


def read_npy_header(stream):
    """Read the magic and header of an ``.npy`` stream (file or zip member).

    Returns
    -------
    shape : tuple of int
    fortran_order : bool
    dtype : numpy.dtype
    version : tuple of int
    """
    fmt = np.lib.format
    version = fmt.read_magic(stream)
    if version == (1, 0):
        shape, fortran, dtype = fmt.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, fortran, dtype = fmt.read_array_header_2_0(stream)
    else:
        # Version 3.0 only differs in allowing UTF-8 field names; NumPy has no public reader.
        shape, fortran, dtype = fmt._read_array_header(stream, version)
    return tuple(int(n) for n in shape), bool(fortran), np.dtype(dtype), version


def needs_copy(dtype, fortran):
    """Whether making a C-ordered native array from the stored one costs a second copy."""
    return fortran or not dtype.isnative


def npy_header(shape, dtype):
    """The ``.npy`` magic and header np.save writes for a C-ordered array."""
    fmt = np.lib.format
    header = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(v) for v in shape)}
    buffer = _io.BytesIO()
    try:
        fmt._write_array_header(buffer, header, None)  # what np.save uses (picks the version)
    except AttributeError:  # pragma: no cover - very old/new NumPy
        try:
            fmt.write_array_header_1_0(buffer, header)
        except ValueError:
            buffer = _io.BytesIO()
            fmt.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


class NpyWriter(ArrayWriter):
    """Header first, then each (n, c) volume's D-slab at its offset (any slab order)."""

    def __init__(self, path, out_shape, dtype, overwrite, like, key=None, attrs=None):
        super().__init__(path, out_shape, dtype, overwrite, like)
        head = npy_header(self.file_shape, self.dtype)
        self.offset = len(head)
        self.fd = os.open(self.tmp, os.O_WRONLY)
        try:
            pwrite_all(self.fd, head, 0)
            os.ftruncate(self.fd, self.offset + self.total_bytes)
        except BaseException:
            self.abort()
            raise

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
