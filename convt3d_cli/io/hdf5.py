"""HDF5 (``.h5``, ``.hdf5``) through h5py, imported on first use.

Datasets are addressed by their path (``vol.h5:/scan/data``; the leading slash
is optional). Outputs carry the layer parameters, the formula, the source and
the output affine as attributes of the dataset.
"""

from __future__ import annotations

import math
import os
import re

import numpy as np

from ..errors import FileFormatError, OutputError
from ..geometry import output_affine
from .base import ArrayFormat, ArrayWriter, jsonable
from .dtypes import dtype_name
from .entries import VOLUME, choose_entry
from .records import Entry
from .safety import human_bytes, reading, reason, writable_bytes
from .streaming import Source, oriented_view, pwrite_all

try:
    import resource
except ImportError:  # pragma: no cover - not a POSIX system
    resource = None

LABEL = "HDF5"
# Attributes that hold a voxel size in (D, H, W) order; scaled by 1/stride on output.
VOXEL_SIZE_ATTRS = ("element_size_um", "spacing", "voxel_size")
# Chunks of about this many bytes, made of whole W rows (then H planes, ...):
# slab-wise readers touch few chunks, and no chunk is tiny.
CHUNK_BYTES = 1 << 20
# What HDF5 writes besides the chunks, at most (measured: about 14 KiB, 60-90 bytes per
# chunk for the chunk index, the attributes about once; the index's pages are spread
# through the file).
LAYOUT_BYTES = 64 << 10
CHUNK_INDEX_BYTES = 256


def _h5py():
    import h5py

    return h5py


def _read_attrs(attrs):
    """Attributes as a dict, skipping the rare types h5py cannot convert."""
    out = {}
    for name in attrs:
        try:
            out[name] = attrs[name]
        except (OSError, TypeError, ValueError):
            continue
    return out


def refuse_external(dataset, where):
    """Refuse a dataset whose values live outside the HDF5 file: in external raw files
    (HDF5's ``H5Pset_external``) or, for a virtual dataset, in other HDF5 files.

    HDF5 opens those files itself when the values are read, by names relative to the
    working directory or the file's folder: a FIFO there would block forever, a link
    could lead anywhere, and convt3d could not check them as it checks its inputs
    (external links are not followed for the same reason). Nothing that writes volumes
    or weights (h5py defaults, Keras) stores values that way. A virtual dataset whose
    sources are all in the same file (``"."``) is read, after the same check of them.
    """
    seen = set()
    pending = [(dataset, where)]
    while pending:
        current, name = pending.pop()
        external = current.external
        if external:
            names = ", ".join(repr(str(item)) for item, _offset, _size in external[:3])
            raise FileFormatError(f"{name} keeps its values in external raw files ({names}); convt3d reads only "
                                  f"values stored inside the HDF5 file")
        if not current.is_virtual:
            continue
        sources = current.virtual_sources()
        outside = sorted({str(source.file_name) for source in sources if source.file_name != "."})
        if outside:
            names = ", ".join(repr(item) for item in outside[:3])
            raise FileFormatError(f"{name} is a virtual dataset made of other files ({names}); convt3d reads only "
                                  f"values stored inside the HDF5 file")
        for source in sources:
            key = source.dset_name
            if key in seen:
                continue
            seen.add(key)
            target = current.file.get(key, getlink=True)
            # A missing source reads as the fill value; a link to another file is not followed.
            if not isinstance(target, _h5py().HardLink):
                continue
            pending.append((current.file[key], f"{name} (source {key})"))


def chunk_shape(shape, itemsize, target=CHUNK_BYTES):
    """Chunks of about ``target`` bytes made of whole rows along the last axes.

    The last axis is always whole; earlier axes are added (whole, then partly)
    while the chunk stays within ``target``.
    """
    chunks = [1] * len(shape)
    budget = max(1, target // max(1, itemsize))
    for axis in range(len(shape) - 1, -1, -1):
        size = int(shape[axis])
        if axis == len(shape) - 1:
            chunks[axis] = size
        else:
            chunks[axis] = max(1, min(size, budget))
        budget //= max(1, chunks[axis])
        if chunks[axis] < size or budget < 1:
            break
    return tuple(chunks)


class Hdf5Writer(ArrayWriter):
    """A chunked dataset whose structure HDF5 writes first; the voxels then go in with ``os.pwrite``.

    Why HDF5 never writes voxels: HDF5 does not survive a failed write. Once a
    flush fails (disk full, file-size limit, I/O error), closing the file fails
    too; the failed close frees the dataset but leaves its identifier
    registered, and the next attempt to close it (h5py's garbage collection,
    HDF5's own clean-up at exit) uses freed memory: the process dies with
    SIGSEGV after printing its error (h5py issues 914 and 2160). No order of
    closing avoids it once a write has failed.

    So HDF5 only lays the file out, at the start: the dataset with every chunk
    allocated and never filled (``ALLOC_TIME_EARLY``, ``FILL_TIME_NEVER``), its
    attributes, then the file is closed. That takes a few KiB, checked against
    the free space, and the whole file (which HDF5 sizes at once) against the
    file-size limit, before HDF5 opens it. The slabs are then written to the
    chunks' offsets like an ``.npy`` file's: a failing write is an ordinary
    OSError, while no HDF5 object is alive.

    Chunks (:func:`chunk_shape`) hold whole W rows: ``(1, ..., 1, k, whole...)``,
    so each (n, c) part of a chunk that a D-slab reaches is one run of bytes.
    """

    def __init__(self, path, out_shape, dtype, overwrite, like, key, attrs):
        super().__init__(path, out_shape, dtype, overwrite, like)
        self.fd = None
        # h5py raises both OSError and RuntimeError for file errors.
        with self._failing_removes((OSError, RuntimeError), _hdf5_reason):
            chunks = chunk_shape(self.file_shape, self.dtype.itemsize)
            self.chunks = (1,) * (5 - len(chunks)) + chunks  # engine layout (N, C, D, H, W)
            self.grid = tuple(-(-n // k) for n, k in zip(self.out_shape, self.chunks))
            self._check_room(attrs)
            self.offsets = self._lay_out(key, chunks, attrs)
            self.fd = os.open(self.tmp, os.O_WRONLY)

    def _check_room(self, attrs):
        """Refuse before HDF5 opens the file what would make its own writes fail."""
        count = math.prod(self.grid)
        layout = LAYOUT_BYTES + CHUNK_INDEX_BYTES * count + 2 * _attr_bytes(attrs)
        whole = count * math.prod(self.chunks) * self.dtype.itemsize + layout
        folder = os.path.dirname(os.path.abspath(self.path))
        limit = _file_size_limit()
        if limit is not None and whole > limit:
            raise OutputError(f"cannot write {self.path}: the HDF5 file may take {human_bytes(whole)}, "
                              f"more than the file-size limit (ulimit -f) of {human_bytes(limit)}")
        room = writable_bytes(folder)
        if room is not None and layout > room:
            raise OutputError(f"cannot write {self.path}: only {human_bytes(room)} can be written "
                              f"in {folder}")

    def _lay_out(self, key, chunks, attrs):
        """Create the file and its dataset; the byte offset of every chunk, in an array shaped like the grid."""
        h5py = _h5py()
        create = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
        create.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
        create.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
        with h5py.File(self.tmp, "w") as handle:
            dataset = handle.create_dataset(key, shape=self.file_shape, dtype=self.dtype,
                                            chunks=chunks, dcpl=create)
            for attr, value in attrs.items():
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    value = np.array(value, dtype=h5py.string_dtype())
                dataset.attrs[attr] = value
            return chunk_offsets(dataset.id, self.grid, self.chunks)

    def _write(self, start, stop, block):
        kn, kc, kd, kh, _ = self.chunks
        n_count, c_count, _, height, width = self.out_shape
        run = kh * width * self.dtype.itemsize  # a chunk's bytes per D plane
        for n in range(n_count):
            for c in range(c_count):
                d = start
                while d < stop:
                    end = min(stop, (d // kd + 1) * kd)
                    planes = ((n % kn) * kc + c % kc) * kd + d % kd  # into the chunk
                    for h in range(0, height, kh):
                        # Whole rows: several planes only when the chunk has whole planes.
                        piece = block[n, c, d - start:end - start, h:h + kh]
                        where = self.offsets[n // kn, c // kc, d // kd, h // kh, 0]
                        pwrite_all(self.fd, piece, int(where) + planes * run)
                    d = end

    def _release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


def chunk_offsets(dataset_id, grid, chunks):
    """Byte offset of every allocated chunk, in an int64 array shaped like the chunk ``grid``.

    ``grid`` and ``chunks`` are in engine layout (5-D); the dataset may have
    fewer axes (the leading ones, of length 1, are left out). One pass over the
    chunk index where HDF5 offers it (``chunk_iter``, HDF5 1.14); else one
    lookup per chunk, whose cost grows with the chunk's place in the index.
    """
    offsets = np.full(grid, -1, dtype=np.int64)
    lead = (0,) * (5 - dataset_id.rank)

    def found(info):
        if info.byte_offset is None:  # not allocated
            return
        corner = lead + tuple(info.chunk_offset)
        offsets[tuple(i // k for i, k in zip(corner, chunks))] = info.byte_offset

    if hasattr(dataset_id, "chunk_iter"):
        dataset_id.chunk_iter(found)
    else:
        for index in np.ndindex(*grid):
            corner = tuple(i * k for i, k in zip(index, chunks))[len(lead):]
            found(dataset_id.get_chunk_info_by_coord(corner))
    if (offsets < 0).any():
        raise OutputError("HDF5 did not allocate every chunk of the dataset")
    return offsets


def _file_size_limit():
    """The process's file-size limit (``ulimit -f``) in bytes, ``None`` when there is none."""
    if resource is None:  # pragma: no cover - not a POSIX system
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


def _attr_bytes(attrs):
    """About how many bytes the attributes take in the file (their values and names)."""
    total = 0
    for name, value in attrs.items():
        if isinstance(value, str):
            size = len(value.encode())
        elif isinstance(value, list):
            size = sum(len(str(v).encode()) + 16 for v in value)
        else:
            size = np.asarray(value).nbytes
        total += len(str(name).encode()) + size + 64
    return total


def _hdf5_reason(exc):
    """The system's reason when HDF5's long message names an errno, else the message."""
    found = re.search(r"errno = (\d+)", str(exc))
    if found:
        return os.strerror(int(found.group(1)))
    return getattr(exc, "strerror", None) or reason(exc)


class Hdf5Source(Source):
    """An HDF5 dataset, sliced per slab (h5py reads only the chunks touched)."""

    def __init__(self, info, transposed, dtype, pad):
        super().__init__(info, transposed, dtype, pad)
        with reading(info.path, LABEL):
            self.handle = _h5py().File(info.path, "r")
            self.dataset = self.handle[info.key]
            refuse_external(self.dataset, f"{info.path}:{info.key}")
        self.rank = len(info.stored_shape)

    def _raw(self, a, b):
        lead = self.rank - 3
        if self.transposed:
            index = (slice(None),) * (lead + 2) + (slice(a, b),)
        else:
            index = (slice(None),) * lead + (slice(a, b),)
        with reading(self.info.path, LABEL):
            block = self.dataset[index]
        block = block.reshape((1,) * (5 - block.ndim) + block.shape)
        return oriented_view(block, self.transposed)

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None



class Hdf5Format(ArrayFormat):
    """HDF5 files: any number of datasets; outputs default to ``/volume``."""

    name = "hdf5"
    label = "HDF5"
    default_key = "/volume"
    writer = Hdf5Writer

    def entries(self, path):
        h5py = _h5py()
        found = []

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                shape = tuple(obj.shape) if obj.shape is not None else ()
                found.append(Entry("/" + name, shape, np.dtype(obj.dtype), attrs=_read_attrs(obj.attrs)))

        with reading(path, LABEL), h5py.File(path, "r") as handle:
            handle.visititems(visit)
        return found

    def weights_format(self, path):
        # A model or weights file written by Keras keeps its kernels channels-last
        # beside the layer configs; the Keras format reads those.
        from . import keras

        return keras.FORMAT if keras.is_keras_h5(path) else self

    def load_entry(self, path, entry):
        h5py = _h5py()
        with reading(path, LABEL), h5py.File(path, "r") as handle:
            dataset = handle[entry.name]
            refuse_external(dataset, f"{path}:{entry.name}")
            if entry.numeric and not dataset.dtype.isnative:
                # Let HDF5 convert while reading instead of byte-swapping a copy.
                return dataset.astype(dataset.dtype.newbyteorder("="))[()]
            return dataset[()]

    def _root_attrs(self, path):
        h5py = _h5py()
        with reading(path, LABEL), h5py.File(path, "r") as handle:
            return _read_attrs(handle.attrs)

    def stored_options(self, path, entry, entries):
        # Root datasets named like an option < root attributes < attributes of the weight.
        raw = super().stored_options(path, entry, entries)
        raw.update(self._root_attrs(path))
        raw.update(entry.attrs)
        return raw

    def output_attrs(self, like, params, formula, source):
        attrs = {name: np.asarray(value, dtype=np.int64) for name, value in params.as_dict().items()}
        attrs["formula"] = [str(line) for line in formula]
        if source is not None:
            attrs["source"] = str(source)
        attrs["affine"] = output_affine(like.affine if like is not None else np.eye(4), params)
        for name in VOXEL_SIZE_ATTRS:
            if like is None or name not in like.attrs:
                continue
            try:
                size = np.asarray(like.attrs[name], dtype=np.float64)
            except (TypeError, ValueError):
                continue
            if size.shape == (3,):  # (D, H, W); any other length cannot be divided per axis
                attrs[name] = size / np.asarray(params.stride, dtype=np.float64)
        return attrs

    def describe_extra(self, path, entries, entry):
        try:
            default = choose_entry(entries, None, VOLUME, path).name
        except FileFormatError:
            default = None
        tree = [{"path": e.name, "shape": list(e.shape), "dtype": dtype_name(e.dtype),
                 "attrs": jsonable(e.attrs)} for e in entries]
        return {"tree": tree, "default": default, "root_attrs": jsonable(self._root_attrs(path))}

    def open_source(self, info, transposed, dtype, pad, scratch_dir):
        return Hdf5Source(info, transposed, dtype, pad)


FORMAT = Hdf5Format()
