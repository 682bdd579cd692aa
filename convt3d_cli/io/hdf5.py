"""HDF5 (``.h5``, ``.hdf5``) through h5py, imported on first use.

Datasets are addressed by their path (``vol.h5:/scan/data``; the leading slash
is optional). Outputs carry the layer parameters, the formula, the source and
the output affine as attributes of the dataset.
"""

from __future__ import annotations

import numpy as np

from ..errors import FileFormatError
from ..geometry import output_affine
from .base import ArrayFormat, ArrayWriter, jsonable
from .dtypes import dtype_name
from .entries import VOLUME, choose_entry
from .records import Entry
from .safety import reading
from .streaming import Source, oriented_view

LABEL = "HDF5"
# Attributes that hold a voxel size in (D, H, W) order; scaled by 1/stride on output.
VOXEL_SIZE_ATTRS = ("element_size_um", "spacing", "voxel_size")
# Chunks of about this many bytes, made of whole W rows (then H planes, ...):
# slab-wise readers touch few chunks, and no chunk is tiny.
CHUNK_BYTES = 1 << 20


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
    """A chunked dataset (chunks of whole W rows, D extent 1: D-slabs fill whole chunks)."""

    def __init__(self, path, out_shape, dtype, overwrite, like, key, attrs):
        super().__init__(path, out_shape, dtype, overwrite, like)
        h5py = _h5py()
        self.handle = None
        try:
            self.handle = h5py.File(self.tmp, "w")
            self.dataset = self.handle.create_dataset(
                key, shape=self.file_shape, dtype=self.dtype,
                chunks=chunk_shape(self.file_shape, self.dtype.itemsize))
            for attr, value in attrs.items():
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    value = np.array(value, dtype=h5py.string_dtype())
                self.dataset.attrs[attr] = value
        except BaseException:
            self.abort()
            raise

    def _write(self, start, stop, block):
        lead = len(self.file_shape) - 3
        index = (slice(None),) * lead + (slice(start, stop),)
        self.dataset[index] = block.reshape(block.shape[5 - len(self.file_shape):])
        self.handle.flush()

    def _release(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None



class Hdf5Source(Source):
    """An HDF5 dataset, sliced per slab (h5py reads only the chunks touched)."""

    def __init__(self, info, transposed, dtype, pad):
        super().__init__(info, transposed, dtype, pad)
        with reading(info.path, LABEL):
            self.handle = _h5py().File(info.path, "r")
            self.dataset = self.handle[info.key]
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

    def load_entry(self, path, entry):
        h5py = _h5py()
        with reading(path, LABEL), h5py.File(path, "r") as handle:
            dataset = handle[entry.name]
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
