"""``.npz``: a zip of ``.npy`` members, read with ``allow_pickle=False`` always.

Member headers are read straight from the archive so that ``probe`` and
``describe`` never decompress voxel data. Outputs hold one stored
(uncompressed) member, ``volume`` unless the output spec names another.
"""

from __future__ import annotations

import os
import zipfile

import numpy as np

from ..errors import FileFormatError, OutputError
from .base import ArrayFormat, ArrayWriter
from .dtypes import dtype_name
from .entries import bare
from .npy import needs_copy, npy_header, read_npy_header
from .records import Entry
from .safety import check_memory, reading
from .streaming import ArraySource, Spool, chunks

LABEL = "an npz archive"


class NpzWriter(ArrayWriter):
    """One stored (uncompressed) ``.npy`` member written in pieces, like ``np.savez``."""

    def __init__(self, path, out_shape, dtype, overwrite, like, key, attrs=None):
        super().__init__(path, out_shape, dtype, overwrite, like)
        self.archive = self.member = self.spool = None
        with self._failing_removes():
            self.archive = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self.member = self.archive.open(bare(key) + ".npy", "w", force_zip64=True)
            self.member.write(npy_header(self.file_shape, self.dtype))
            if self.out_shape[0] * self.out_shape[1] > 1:
                self.spool = Spool(os.path.dirname(os.path.abspath(path)), self.total_bytes)

    def _write(self, start, stop, block):
        if self.spool is None:
            if start != self.written:
                raise OutputError(f"{self.path}: npz slabs must arrive in order")
            for piece in chunks(block):
                self.member.write(piece)
            return
        for where, piece in self._pieces(start, block):
            self.spool.pwrite(piece, where)

    def _finish(self):
        if self.spool is not None:
            for piece in self.spool.pieces():
                self.member.write(piece)
        self.member.close()
        self.member = None
        self.archive.close()
        self.archive = None

    def _release(self):
        for thing in (self.member, self.archive, self.spool):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - a half-written zip on the way out
                    pass
        self.member = self.archive = self.spool = None



class NpzFormat(ArrayFormat):
    """``.npz`` archives: named arrays; outputs hold one member (``volume`` by default)."""

    name = "npz"
    label = "npz"
    default_key = "volume"
    writer = NpzWriter

    def entries(self, path):
        with reading(path, LABEL), zipfile.ZipFile(path) as archive:
            return [self._entry(path, archive, info) for info in archive.infolist()
                    if info.filename.endswith(".npy")]

    @staticmethod
    def _entry(path, archive, info):
        with archive.open(info) as member:
            try:
                shape, fortran, dtype, _ = read_npy_header(member)
            except ValueError as exc:
                raise ValueError(f"member {info.filename}: {exc}") from exc
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

    def describe_extra(self, path, entries, entry):
        return {"arrays": [{"name": e.name, "shape": list(e.shape), "dtype": dtype_name(e.dtype)}
                           for e in entries]}

    def resident_bytes(self, info):
        return info.nbytes

    def disk_bytes(self, path, out_shape, dtype):
        # Several (n, c) volumes are spooled, then copied into the member: both exist at once.
        data = super().disk_bytes(path, out_shape, dtype)
        return data * (2 if out_shape[0] * out_shape[1] > 1 else 1)

    def open_source(self, info, transposed, dtype, pad, scratch_dir):
        # Members may be compressed: no random access, so the volume is loaded whole
        # (resident_bytes tells the slab planner).
        check_memory(info.memory_needed, info.path)
        return ArraySource(info, transposed, dtype, pad, self.load(info))


FORMAT = NpzFormat()
