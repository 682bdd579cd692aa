"""HDF5 (``.h5``, ``.hdf5``) through h5py, imported on first use.

Datasets are addressed by their path (``vol.h5:/scan/data``; the leading slash
is optional). Outputs carry the layer parameters, the formula, the source and
the output affine as attributes of the dataset.
"""

from __future__ import annotations

import numpy as np

from ..errors import FileFormatError
from ..geometry import output_affine
from ._base import ArrayFormat
from ._common import VOXEL_SIZE_ATTRS, VOLUME, Entry, choose_entry, dtype_name, jsonable, reading

LABEL = "HDF5"
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


class Hdf5Format(ArrayFormat):
    """HDF5 files: any number of datasets; outputs default to ``/volume``."""

    name = "hdf5"
    label = "HDF5"
    default_key = "/volume"

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

    def save_array(self, tmp_path, name, array, attrs):
        h5py = _h5py()
        with h5py.File(tmp_path, "w") as handle:
            dataset = handle.create_dataset(name, data=array,
                                            chunks=chunk_shape(array.shape, array.dtype.itemsize))
            for attr, value in attrs.items():
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    value = np.array(value, dtype=h5py.string_dtype())
                dataset.attrs[attr] = value

    def describe_extra(self, path, entries, entry):
        try:
            default = choose_entry(entries, None, VOLUME, path).name
        except FileFormatError:
            default = None
        tree = [{"path": e.name, "shape": list(e.shape), "dtype": dtype_name(e.dtype),
                 "attrs": jsonable(e.attrs)} for e in entries]
        return {"tree": tree, "default": default, "root_attrs": jsonable(self._root_attrs(path))}


FORMAT = Hdf5Format()
