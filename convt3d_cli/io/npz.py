"""``.npz``: a zip of ``.npy`` members, read with ``allow_pickle=False`` always.

Member headers are read straight from the archive so that ``probe`` and
``describe`` never decompress voxel data.
"""

from __future__ import annotations

import zipfile

import numpy as np

from ..errors import FileFormatError
from ._base import ArrayFormat
from ._common import Entry, bare, dtype_name, reading
from .npy import needs_copy, read_npy_header

LABEL = "an npz archive"


class NpzFormat(ArrayFormat):
    """``.npz`` archives: named arrays; outputs hold one member (``volume`` by default)."""

    name = "npz"
    label = "npz"
    default_key = "volume"

    def entries(self, path):
        with reading(path, LABEL), zipfile.ZipFile(path) as archive:
            return [self._entry(path, archive, info) for info in archive.infolist()
                    if info.filename.endswith(".npy")]

    @staticmethod
    def _entry(path, archive, info):
        with archive.open(info) as member:
            shape, fortran, dtype, _ = read_npy_header(member)
            offset = member.tell()
        entry = Entry(info.filename[: -len(".npy")], shape, dtype,
                      needs_copy=needs_copy(dtype, fortran))
        if entry.numeric and info.file_size < offset + entry.nbytes:
            raise FileFormatError(
                f"{path} is truncated: member {info.filename} declares {shape} "
                f"{dtype_name(dtype)} ({entry.nbytes} bytes) but holds only "
                f"{max(info.file_size - offset, 0)} bytes of data")
        return entry

    def load_entry(self, path, entry):
        with reading(path, LABEL), zipfile.ZipFile(path) as archive, \
                archive.open(entry.name + ".npy") as member:
            array = np.lib.format.read_array(member, allow_pickle=False)
            # zipfile checks a member's CRC only once it is read to its end.
            member.read()
            return array

    def save_array(self, tmp_path, name, array, attrs):
        # What np.savez does, minus its pitfalls: it appends ".npz" to a file name
        # that lacks it and cannot take a member called "file".
        with zipfile.ZipFile(tmp_path, "w", compression=zipfile.ZIP_STORED,
                             allowZip64=True) as archive, \
                archive.open(bare(name) + ".npy", "w", force_zip64=True) as member:
            np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)

    def describe_extra(self, path, entries, entry):
        return {"arrays": [{"name": e.name, "shape": list(e.shape), "dtype": dtype_name(e.dtype)}
                           for e in entries]}


FORMAT = NpzFormat()
