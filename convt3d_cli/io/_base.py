"""The interface every format implements, and the shared logic of array containers.

A format object answers five questions for :mod:`convt3d_cli.io`:

``probe(path, key) -> VolumeInfo``
    What would be read, from headers only (sizes checked, nothing allocated).
``load(info) -> ndarray``
    The voxel data in engine layout ``(N, C, D, H, W)``.
``prepare(key, data, like, params, formula, source, dtype) -> payload``
    Everything that can fail before the output file is opened: key and rank
    rules, header, attributes. Returns an opaque payload.
``save(tmp_path, payload)``
    Write the payload to the temporary path handed out by ``atomic_write``.
``describe(path, key) -> dict``
    The ``convt3d info`` report.

npy, npz and HDF5 are all "containers of named arrays"; :class:`ArrayFormat`
implements the five answers once on top of a handful of primitives.
"""

from __future__ import annotations

import os

import numpy as np

from ..errors import FileFormatError, KeyNotFoundError, ShapeError
from ..geometry import LAYER_OPTIONS
from ._common import (VOLUME, VolumeInfo, array_engine_shape, array_output, bare, byte_order,
                      check_numeric, choose_entry, dtype_name, jsonable, native, output_key,
                      require_file, to_engine)

# An option is 1 or 3 numbers; anything much larger named "stride" is not an option.
_MAX_OPTION_ELEMENTS = 16


class ArrayFormat:
    """Base of the npy / npz / HDF5 formats (engine layout on disk, no affine).

    Subclasses set :attr:`name`, :attr:`label`, :attr:`default_key` and
    implement :meth:`entries`, :meth:`load_entry` and :meth:`save_array`;
    they may override :meth:`entry_attrs`, :meth:`stored_options`,
    :meth:`output_attrs` and :meth:`describe_extra`.
    """

    name = ""
    label = ""
    #: Key of a written array, ``None`` for single-array formats (no key allowed).
    default_key = None

    # ---- primitives -----------------------------------------------------------------

    def entries(self, path):
        """All arrays of the file as :class:`Entry` objects, from headers only."""
        raise NotImplementedError

    def load_entry(self, path, entry):
        """The stored array (any order/byte order); the caller has checked sizes."""
        raise NotImplementedError

    def save_array(self, tmp_path, name, array, attrs):
        """Write ``array`` (under ``name``, with ``attrs`` where supported)."""
        raise NotImplementedError

    def entry_attrs(self, path, entry):
        """Metadata attached to an array (HDF5 attributes)."""
        return dict(entry.attrs)

    def stored_options(self, path, entry, entries):
        """Layer options stored with a weight: here, arrays named like an option."""
        raw = {}
        for other in entries:
            if other.name is None or bare(other.name) not in LAYER_OPTIONS:
                continue
            if other.ndim > 1 or other.size > _MAX_OPTION_ELEMENTS:
                raise FileFormatError(f"{path}: stored option '{bare(other.name)}' must be 1 or 3 "
                                      f"integers, got an array of shape {other.shape}")
            raw[bare(other.name)] = self.load_entry(path, other)
        return raw

    def output_attrs(self, like, params, formula, source):
        """Attributes written with an output array (only HDF5 has any)."""
        return {}

    def describe_extra(self, path, entries, entry):
        """Format-specific part of the ``convt3d info`` report."""
        return {}

    # ---- the format interface -------------------------------------------------------

    def check_key(self, path, key):
        if key is not None and self.default_key is None:
            raise FileFormatError(f"{path}: a {self.label} file holds a single array; "
                                  f"remove ':{key}'")

    def probe(self, path, key):
        require_file(path)
        self.check_key(path, key)
        entries = self.entries(path)
        entry = choose_entry(entries, key, VOLUME, path)
        where = _where(path, entry)
        check_numeric(entry.dtype, where)
        engine = array_engine_shape(entry.shape, where)
        return VolumeInfo(
            path=path, key=entry.name, format=self.name, stored_shape=tuple(entry.shape),
            engine_shape=engine, dtype=dtype_name(entry.dtype), source_ndim=entry.ndim,
            affine=np.eye(4), zooms=None, header=None, attrs=self.entry_attrs(path, entry),
            read_dtype=dtype_name(native(entry.dtype)), nbytes=entry.nbytes,
            memory_needed=entry.nbytes * (2 if entry.needs_copy else 1),
            file_size=os.path.getsize(path), byte_order=byte_order(entry.dtype),
            stored_dtype=entry.dtype, entry=entry)

    def load(self, info):
        return to_engine(self.load_entry(info.path, info.entry), info.engine_shape)

    def prepare(self, key, data, like, params, formula, source, dtype):
        name = output_key(key, self.default_key, self.label)
        array = array_output(data, like)
        if dtype is not None:
            array = array.astype(dtype, copy=False)
        return name, array, self.output_attrs(like, params, formula, source)

    def save(self, tmp_path, payload):
        self.save_array(tmp_path, *payload)

    def describe(self, path, key):
        require_file(path)
        self.check_key(path, key)
        entries = self.entries(path)
        report = {"path": path, "format": self.name, "file_size": os.path.getsize(path)}
        entry = None
        try:
            entry = choose_entry(entries, key, VOLUME, path)
        except KeyNotFoundError:
            raise
        except FileFormatError as exc:
            report["note"] = str(exc)
        report["key"] = entry.name if entry is not None else None
        if entry is not None:
            report.update(stored_shape=list(entry.shape), dtype=dtype_name(entry.dtype),
                          byte_order=byte_order(entry.dtype), data_bytes=entry.nbytes)
            try:
                check_numeric(entry.dtype, _where(path, entry))
                engine = array_engine_shape(entry.shape, _where(path, entry))
            except (FileFormatError, ShapeError) as exc:
                report["engine_shape"] = None
                report["note"] = f"cannot be read as a volume: {exc}"
            else:
                report.update(engine_shape=list(engine), batch=engine[0], channels=engine[1],
                              layout=_ARRAY_LAYOUTS[entry.ndim], spatial_axes="D,H,W")
        report.update(self.describe_extra(path, entries, entry))
        return jsonable(report)


_ARRAY_LAYOUTS = {3: "(D,H,W)", 4: "(C,D,H,W)", 5: "(N,C,D,H,W)"}


def _where(path, entry):
    return path if entry.name is None else f"{path}:{entry.name}"

