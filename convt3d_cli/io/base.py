"""The interface every format implements, and the shared logic of array containers.

A format module defines ``FORMAT``, an instance of a :class:`Format` subclass
that owns the format's whole life cycle:

``probe(path, key) -> VolumeInfo``
    What would be read, from headers only (sizes checked, nothing allocated).
``load(info) -> ndarray``
    The voxel data in engine layout ``(N, C, D, H, W)``.
``describe(path, key) -> dict``
    The ``convt3d info`` report.
``open_source(info, transposed, dtype, pad, scratch_dir) -> Source``
    Input planes for a slab-wise run (:mod:`convt3d_cli.io.streaming`).
``output_key(key, out_shape) -> key``
    Refuses a result the format cannot hold, before anything is computed.
``open_writer(path, key, out_shape, dtype, ...) -> StreamWriter``
    Writes slabs straight into the (temporary) output file; ``transposed`` says
    which orientation its slabs arrive in.

Formats that can hold weights (``holds_weights``) also list their arrays
(``entries``), load one (``load_entry``) and find the layer options stored
beside a weight (``stored_options``). npy, npz and HDF5 are all "containers of
named arrays in engine layout"; :class:`ArrayFormat` implements the interface
once on top of those primitives and a writer class.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import FileFormatError, KeyNotFoundError, OutputError, ShapeError
from ..geometry import LAYER_OPTIONS
from .dtypes import byte_order, check_numeric, dtype_name, native
from .entries import VOLUME, bare, choose_entry, choose_layer, entry_source, layer_report, layers_from_tensors
from .records import VolumeInfo
from .safety import check_nonempty, require_file
from .streaming import StreamWriter

# An option is 1 or 3 numbers; anything much larger named "stride" is not an option.
_MAX_OPTION_ELEMENTS = 16
_ARRAY_LAYOUTS = {3: "(D,H,W)", 4: "(C,D,H,W)", 5: "(N,C,D,H,W)"}


class Format:
    """Base of every format: the defaults a format may keep (see the module docstring)."""

    #: Format name in reports (``"nifti"``, ``"hdf5"``, ...).
    name = ""
    #: How messages name the format (``"HDF5"``, ``"npz"``).
    label = ""
    #: Whether output slabs arrive along engine W, transposed to ``(N, C, W, H, D)``.
    transposed = False
    #: Whether weights (and biases) may be read from this format.
    holds_weights = False

    #: Whether outputs are written block by block (a chunked store) rather than in slabs.
    blockwise = False
    #: Whether the slab source keeps the chunks around a window for the next (``window_cache``).
    caches_windows = False

    def require(self, path):
        """Refuse a path this format cannot read before anything opens it (a regular file here)."""
        require_file(path)

    def check_target(self, path, overwrite):
        """Refuse an output path that cannot be written; return its folder."""
        from ._atomic import check_target

        return check_target(path, overwrite)

    def stamps(self, path, key):
        """What says an input changed (``--resume``): ``[[name, size, mtime_ns], ...]`` of its file."""
        info = os.stat(path)
        return [[os.path.basename(path), info.st_size, info.st_mtime_ns]]

    def partial_output(self, path):
        """The partial output an interrupted run of ``path`` left for ``--resume``, else ``None``."""

    def stored_dtype(self, dtype, data_dtype=None):
        """The element type an output is stored in: ``dtype``, or the data's when it is ``None``."""
        return np.dtype(dtype if dtype is not None else data_dtype)

    def weights_format(self, path):
        """The format that reads weights from ``path``: this one, or a more specific one
        (an HDF5 file written by Keras is read as Keras)."""
        return self

    def resident_bytes(self, info):
        """Bytes :meth:`open_source` holds for the whole run (an input it must load whole)."""
        return 0

    def disk_bytes(self, path, out_shape, dtype):
        """Most bytes writing ``out_shape`` of ``dtype`` takes on disk at once, ``None`` if unknowable.

        The data itself by default; a format that spools or compresses says otherwise.
        """
        return math.prod(out_shape) * np.dtype(dtype).itemsize


# --------------------------------------------------------------------------- array containers

def array_engine_shape(shape, where):
    """``(D,H,W)``, ``(C,D,H,W)`` or ``(N,C,D,H,W)`` -> ``(N, C, D, H, W)``."""
    shape = tuple(int(n) for n in shape)
    if len(shape) not in (3, 4, 5):
        raise ShapeError(f"{where} has shape {shape}; array files must hold (D,H,W), (C,D,H,W) "
                         f"or (N,C,D,H,W)")
    check_nonempty(shape, where)
    return (1,) * (5 - len(shape)) + shape


def to_engine(array, engine_shape):
    """Reshape to 5-D, C-contiguous, native byte order; copies only when needed."""
    array = np.asarray(array).reshape(engine_shape)
    return np.asarray(array, dtype=native(array.dtype), order="C")


def array_output_shape(out_shape, like):
    """Shape an array file stores an engine result ``(N, C, D, H, W)`` in.

    A one-channel 3-D input with one output channel gives ``(D, H, W)``; a 3-D
    input with several output channels gives ``(C, D, H, W)``; otherwise the
    input rank is kept. Without an input (``like is None``): 5-D unless N == 1,
    then 4-D, and 3-D if also C == 1. A batch (N > 1) always stays 5-D.
    """
    out_shape = tuple(int(v) for v in out_shape)
    n, c = out_shape[:2]
    if like is None:
        rank = 5 if n > 1 else (3 if c == 1 else 4)
    else:
        rank = int(like.source_ndim)
        if rank == 3 and c > 1:
            rank = 4
    if n > 1:
        rank = 5
    return out_shape[5 - rank:]


def jsonable(value):
    """Convert NumPy values, bytes, tuples and NaN into plain JSON types."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (bytes, np.bytes_)):
        return bytes(value).decode("utf-8", errors="replace").rstrip("\x00")
    if isinstance(value, np.generic):
        return jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, np.dtype):
        return str(value)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


class ArrayWriter(StreamWriter):
    """Base of the npy/npz/HDF5 writers: D-slabs, one contiguous byte run per (n, c).

    ``file_shape`` is the shape the file stores (:func:`array_output_shape`).
    """

    def __init__(self, path, out_shape, dtype, overwrite, like):
        super().__init__(path, out_shape, dtype, overwrite)
        self.file_shape = array_output_shape(self.out_shape, like)
        n, c, d, h, w = self.out_shape
        self.plane_bytes = h * w * self.dtype.itemsize
        self.volume_bytes = d * self.plane_bytes
        self.total_bytes = n * c * self.volume_bytes

    def _pieces(self, start, block):
        """``(byte offset in the C-ordered data, contiguous array)`` for each (n, c)."""
        n, c = self.out_shape[:2]
        for i in range(n):
            for j in range(c):
                yield (i * c + j) * self.volume_bytes + start * self.plane_bytes, block[i, j]


class ArrayFormat(Format):
    """Base of the npy / npz / HDF5 formats (engine layout on disk, no affine).

    Subclasses set :attr:`name`, :attr:`label`, :attr:`default_key` and
    :attr:`writer`, and
    implement :meth:`entries`, :meth:`load_entry` and :meth:`open_source`; they
    may override :meth:`entry_attrs`, :meth:`stored_options`,
    :meth:`output_attrs` and :meth:`describe_extra`.
    """

    holds_weights = True
    #: Key of a written array, ``None`` for single-array formats (no key allowed).
    default_key = None
    #: The :class:`ArrayWriter` subclass; built with ``(path, out_shape, dtype,
    #: overwrite, like, key, attrs)``.
    writer = None

    # ---- primitives -----------------------------------------------------------------

    def entries(self, path):
        """All arrays of the file as :class:`Entry` objects, from headers only."""
        raise NotImplementedError

    def load_entry(self, path, entry):
        """The stored array (any order/byte order); the caller has checked sizes."""
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

    # ---- reading --------------------------------------------------------------------

    def check_key(self, path, key):
        """Refuse a key for a single-array file."""
        if key is not None and self.default_key is None:
            raise FileFormatError(f"{path}: a {self.label} file holds a single array; "
                                  f"remove ':{key}'")

    def probe(self, path, key):
        require_file(path)
        self.check_key(path, key)
        entries = self.entries(path)
        entry = choose_entry(entries, key, VOLUME, path)
        where = entry_source(path, entry)
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

    def describe(self, path, key):
        require_file(path)
        weights = self.weights_format(path)
        if weights is not self:        # e.g. a Keras model saved as .h5: describe its layers
            return weights.describe(path, key)
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
            where = entry_source(path, entry)
            try:
                check_numeric(entry.dtype, where)
                engine = array_engine_shape(entry.shape, where)
            except (FileFormatError, ShapeError) as exc:
                report["engine_shape"] = None
                report["note"] = f"cannot be read as a volume: {exc}"
            else:
                report.update(engine_shape=list(engine), batch=engine[0], channels=engine[1],
                              layout=_ARRAY_LAYOUTS[entry.ndim], spatial_axes="D,H,W")
        report.update(self.describe_extra(path, entries, entry))
        return jsonable(report)

    # ---- writing --------------------------------------------------------------------

    def output_key(self, key, out_shape):
        """The array name to write (``None`` for single-array files); refuses a key they cannot take."""
        if self.default_key is None and key is not None:
            raise OutputError(f"a {self.label} file holds a single array; remove ':{key}' from the output")
        return self.default_key if key is None else key

    def open_writer(self, path, key, out_shape, dtype, *, overwrite, like, params, formula, source,
                    compress_level=None):
        key = self.output_key(key, out_shape)
        attrs = self.output_attrs(like, params, list(formula), source)
        return self.writer(path, out_shape, dtype, overwrite, like, key, attrs)


# --------------------------------------------------------------------------- weights-only files

class WeightsFormat(Format):
    """Base of the formats that hold trained layers and no volume (PyTorch, safetensors, ONNX, Keras).

    Subclasses set :attr:`name` and :attr:`label` and implement :meth:`tensors`
    and :meth:`load_tensor`; a format that knows its layers (with their settings
    and layout) overrides :meth:`layers`. Every check on sizes and offsets happens
    in :meth:`tensors` (headers only), before :meth:`load_tensor` allocates.
    """

    holds_weights = True
    #: Shown after "convert it with" when a volume is expected; subclasses may say more.
    volume_hint = "pass it to --weights"
    #: What says a plain tensor of this format is in PyTorch layout (``""``: nothing, it is assumed).
    tensor_layout_source = ""

    def tensors(self, path):
        """Every numeric tensor of the file as an :class:`Entry` (``name`` = full tensor name)."""
        raise NotImplementedError

    def load_tensor(self, path, entry):
        """The tensor's values, C-ordered, native byte order, ``entry.shape`` and ``entry.dtype``."""
        raise NotImplementedError

    def layers(self, path):
        """The layers a ``--weights FILE[:LAYER]`` may take: one per 5-D or 6-D tensor by default."""
        return layers_from_tensors(self.tensors(path), self.tensor_layout_source)

    def check_key(self, path, key):
        """Any key may name a layer or a tensor; :func:`choose_layer` says when none matches."""

    def probe(self, path, key):
        raise FileFormatError(f"{path} holds trained weights ({self.label}), not a volume; {self.volume_hint}")

    def describe(self, path, key):
        require_file(path)
        layers = self.layers(path)
        if key is not None:
            layers = [choose_layer(layers, key, path)]
        return jsonable({
            "path": path, "format": self.name, "file_size": os.path.getsize(path),
            "kind": "weights", "key": key,
            "tensors": len(self.tensors(path)),
            "layers": [layer_report(path, layer) for layer in layers],
        })

    def output_key(self, key, out_shape):
        raise OutputError(f"convt3d does not write {self.label} files; choose a volume format")

    def open_writer(self, *args, **kwargs):
        raise OutputError(f"convt3d does not write {self.label} files; choose a volume format")
