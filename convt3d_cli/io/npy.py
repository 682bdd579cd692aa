"""``.npy``: a single array in engine layout, read without ever unpickling."""

from __future__ import annotations

import numpy as np

from ._base import ArrayFormat
from ._common import Entry, check_payload, is_numeric, reading

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


class NpyFormat(ArrayFormat):
    """``.npy`` files: one array, no key, no attributes."""

    name = "npy"
    label = "npy"
    default_key = None

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

    def save_array(self, tmp_path, name, array, attrs):
        with open(tmp_path, "wb") as handle:
            np.save(handle, array, allow_pickle=False)

    def describe_extra(self, path, entries, entry):
        _, fortran, _, version, offset = self._header(path)
        return {"npy_version": f"{version[0]}.{version[1]}", "fortran_order": fortran,
                "data_offset": offset}


FORMAT = NpyFormat()
