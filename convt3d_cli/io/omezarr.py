"""OME-Zarr (NGFF 0.4 and 0.5) images and plain Zarr v2/v3 arrays, read and written by block.

A Zarr store is a folder (``vol.zarr``, ``vol.ome.zarr``); ``PATH:KEY`` names an
array inside it (``vol.ome.zarr:0``, the full-resolution level of a multiscale
image). Without a key: the array the store is, else the first level of its NGFF
multiscale image, else its only array.

Axes. NGFF ``axes`` name the array's dimensions: ``t``, ``c``, ``z``, ``y``, ``x``
(in that order, any of ``t``/``c`` absent) map to N, C, D, H, W. A plain array
follows the array-file rules ``(D,H,W)``, ``(C,D,H,W)``, ``(N,C,D,H,W)``.

Coordinates. The voxel-to-world map is NGFF's ``scale`` and ``translation``
(the dataset's, then the multiscale's), an affine without rotation over
``(z, y, x)``. Outputs follow the same rule as NIfTI affines
(:func:`convt3d_cli.geometry.output_affine`: scale over the stride, translation
moved to the centre of each output voxel's kernel footprint) and are written as
NGFF 0.5 (Zarr v3) or 0.4 (Zarr v2, when the input is v2) with one level, ``0``.

Writing. The output store is built under ``.NAME.convt3d-partial`` beside the
target and renamed onto it when complete. Blocks of whole chunks
(:mod:`convt3d_cli.blocks`) are written by whichever process computes them; a
block is complete when its marker file exists in ``.convt3d-blocks/``, written
after all its chunks, so ``--resume`` recomputes exactly the blocks without one.

Safety. Metadata JSON is read by this module, size-limited, and checked before
zarr-python opens anything: numeric dtypes only, and only the codecs in
:data:`SAFE_CODECS` (no pickle or other object codecs), so reading a store never
runs code from it.

zarr-python 3 is an optional dependency (``pip install "convt3d[zarr]"``, Python
>= 3.11), imported only when a Zarr store is read or written (about 0.5 s).
"""

from __future__ import annotations

import bz2
import itertools
import json
import logging
import lzma
import math
import os
import shutil
import stat
import warnings
import zlib

import numpy as np

from .. import geometry
from ..errors import (
    FileFormatError,
    KeyNotFoundError,
    MissingDependency,
    OutputError,
    ShapeError,
)
from .base import Format, array_engine_shape, jsonable
from .dtypes import byte_order, cast_block, check_numeric, dtype_name, native
from .records import VolumeInfo
from .registry import ZARR_COMPRESSORS
from .safety import check_nonempty, path_mode
from .streaming import Source

INSTALL_HINT = 'pip install "convt3d[zarr]"'
#: Metadata documents longer than this are not read.
MAX_METADATA_BYTES = 16 << 20
#: Arrays (and chunks) with more elements than this are refused: 2**48 float32 values are 1 PiB.
MAX_VOXELS = 1 << 48
#: The largest chunk (or shard) written: Blosc and most codecs take buffers below 2 GiB.
MAX_CHUNK_BYTES = (1 << 31) - 1
#: Codecs a store may use (Zarr v3 names; v2 ``id``s map to them in :func:`_codec_names`).
SAFE_CODECS = frozenset({
    "bytes", "transpose", "blosc", "zstd", "gzip", "crc32c", "sharding_indexed", "zlib", "lz4", "bz2", "lzma",
    "shuffle", "delta", "bitround", "fletcher32", "adler32", "crc32", "packbits", "quantize", "fixedscaleoffset"})
#: Compressors ``--compressor`` offers; the first is the default.
COMPRESSORS = ZARR_COMPRESSORS
#: Chunk edge of an output without a chunked input (voxels per spatial axis).
DEFAULT_CHUNK = 128
PARTIAL_SUFFIX = ".convt3d-partial"
MARKERS = ".convt3d-blocks"
RUN_FILE = ".convt3d-run.json"
_SPACE = ("z", "y", "x")


def require_zarr():
    """The ``zarr`` package (version 3), or :class:`MissingDependency` with the install hint."""
    try:
        import zarr
    except ImportError as err:
        raise MissingDependency(f"Zarr stores need zarr-python 3 ({err}); install it with: {INSTALL_HINT}") from None
    if int(zarr.__version__.split(".")[0]) < 3:
        raise MissingDependency(f"Zarr stores need zarr-python 3, found {zarr.__version__}; "
                                f"upgrade with: {INSTALL_HINT}")
    # zarr reads with asyncio tasks; after a failed read the pending ones are logged, or
    # reported as "Event loop is closed" when the interpreter exits, after the Error: line.
    logging.getLogger("asyncio").setLevel(logging.CRITICAL)
    _quiet_closed_loops()
    return zarr


def _quiet_closed_loops():
    """Drop the unraisable ``RuntimeError: Event loop is closed`` of zarr's leftover coroutines."""
    import sys

    if getattr(sys.unraisablehook, "_convt3d", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    hook._convt3d = True
    sys.unraisablehook = hook
    # Their "coroutine ... was never awaited" comes when zarr's loop closes at exit; a filter set
    # now would be undone by the run's warning capture, so it is set at exit (before zarr's own
    # exit handler, registered earlier, runs).
    import atexit

    atexit.register(warnings.filterwarnings, "ignore", message=r"coroutine '.*' was never awaited",
                    category=RuntimeWarning)


# --------------------------------------------------------------------------- metadata (our own reading)

def _read_json(path, what):
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):  # a FIFO would block, a device never end
        raise FileFormatError(f"{path}: {what} is not a regular file")
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_METADATA_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_METADATA_BYTES:
        raise FileFormatError(f"{path}: {what} is longer than {MAX_METADATA_BYTES >> 20} MiB; not read")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FileFormatError(f"{path}: {what} is not valid JSON ({str(exc)[:80]})") from None
    if not isinstance(value, dict):
        raise FileFormatError(f"{path}: {what} is not a JSON object")
    return value


def _node(store, key):
    """``(kind, zarr_format, metadata, attributes)`` of the node at ``key`` ("" = root), or ``None``."""
    folder = os.path.join(store, *[p for p in (key or "").split("/") if p])
    meta = _read_json(os.path.join(folder, "zarr.json"), "zarr.json")
    if meta is not None:
        kind = meta.get("node_type")
        if kind not in ("array", "group") or meta.get("zarr_format") != 3:
            raise FileFormatError(f"{folder}/zarr.json is not Zarr v3 metadata")
        attrs = meta.get("attributes") or {}
        return kind, 3, meta, attrs if isinstance(attrs, dict) else {}
    attrs = _read_json(os.path.join(folder, ".zattrs"), ".zattrs") or {}
    array = _read_json(os.path.join(folder, ".zarray"), ".zarray")
    if array is not None:
        return "array", 2, array, attrs
    group = _read_json(os.path.join(folder, ".zgroup"), ".zgroup")
    if group is not None:
        return "group", 2, group, attrs
    return None


def _codec_names(meta, fmt):
    """Every codec name an array's metadata uses (nested sharding codecs included)."""
    names = []
    if fmt == 2:
        filters = meta.get("filters") or []
        if not isinstance(filters, list):
            raise FileFormatError("'filters' is not a list")
        for item in [meta.get("compressor")] + filters:
            if item is None:
                continue
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise FileFormatError("a codec entry is not an object with an 'id'")
            names.append(item["id"])
        return names

    def walk(codecs):
        if not isinstance(codecs, list):
            raise FileFormatError("'codecs' is not a list")
        for item in codecs:
            if isinstance(item, str):
                names.append(item)
                continue
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise FileFormatError("a codec entry is not an object with a 'name'")
            names.append(item["name"])
            config = item.get("configuration") or {}
            if not isinstance(config, dict):
                raise FileFormatError(f"the configuration of codec '{item['name']}' is not an object")
            if item["name"] == "sharding_indexed":
                inner = config.get("chunk_shape")
                if not isinstance(inner, list) or not all(type(v) is int and v >= 1 for v in inner):
                    raise FileFormatError("the sharding codec's chunk_shape is not a list of positive integers")
                walk(config.get("codecs", []))
                walk(config.get("index_codecs", []))

    walk(meta.get("codecs", []))
    return names


def _check_array_meta(where, meta, fmt):
    """Refuse what convt3d does not read before zarr-python sees it: codecs, dtypes, shapes."""
    try:
        names = _codec_names(meta, fmt)
    except FileFormatError as exc:
        raise FileFormatError(f"{where}: {exc}") from None
    for name in names:
        bare = name.removeprefix("numcodecs.")
        if bare not in SAFE_CODECS:
            raise FileFormatError(f"{where}: codec '{name}' is not read by convt3d (allowed: "
                                  f"{', '.join(sorted(SAFE_CODECS))}); object and pickle codecs can run code")
    shape = meta.get("shape")
    if fmt == 2:
        chunks = meta.get("chunks")
    else:
        grid = meta.get("chunk_grid")
        config = grid.get("configuration") if isinstance(grid, dict) else None
        if not isinstance(config, dict) or grid.get("name") != "regular":
            raise FileFormatError(f"{where}: 'chunk_grid' is not a regular chunk grid")
        chunks = config.get("chunk_shape")
    for name, value in (("shape", shape), ("chunks", chunks)):
        if not isinstance(value, list) or not all(type(v) is int and v >= 0 for v in value):
            raise FileFormatError(f"{where}: '{name}' is not a list of non-negative integers")
    if len(chunks) != len(shape) or min(chunks, default=1) < 1:
        raise FileFormatError(f"{where}: chunks {chunks} do not fit shape {shape}")
    if math.prod(max(v, 1) for v in shape) > MAX_VOXELS:
        raise FileFormatError(f"{where}: shape {shape} has more than 2**48 elements; not read")
    if math.prod(min(c, max(n, 1)) for c, n in zip(chunks, shape)) > MAX_VOXELS:
        raise FileFormatError(f"{where}: chunks {chunks} are larger than any chunk can be")
    dtype = meta.get("dtype") if fmt == 2 else meta.get("data_type")
    if not isinstance(dtype, str):
        raise FileFormatError(f"{where}: the element type {str(dtype)[:40]} is not a numeric type")
    try:
        parsed = np.dtype(dtype)
    except (TypeError, ValueError, SyntaxError):
        raise FileFormatError(f"{where}: element type '{dtype[:40]}' is not read (numeric types only)") from None
    if parsed.shape or parsed.fields:
        raise FileFormatError(f"{where}: element type '{dtype[:40]}' is not read (numeric types only)")
    check_numeric(parsed, where)
    return tuple(shape), tuple(chunks), parsed


def _arrays(store, key="", depth=0):
    """Paths of every array under the group at ``key`` (metadata files only)."""
    found = []
    folder = os.path.join(store, *[p for p in key.split("/") if p])
    if depth > 8:
        return found
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return found
    for name in names:
        if name.startswith("."):
            continue
        child = f"{key}/{name}" if key else name
        if not os.path.isdir(os.path.join(folder, name)) or os.path.islink(os.path.join(folder, name)):
            continue
        node = _node(store, child)
        if node is None:
            continue
        if node[0] == "array":
            found.append(child)
        else:
            found.extend(_arrays(store, child, depth + 1))
    return found


def _multiscales(attrs):
    """``(version, list)`` of NGFF multiscales in group attributes (0.5 under ``ome``), or ``(None, [])``."""
    ome = attrs.get("ome")
    if isinstance(ome, dict) and isinstance(ome.get("multiscales"), list):
        return str(ome.get("version", "0.5")), ome["multiscales"]
    if isinstance(attrs.get("multiscales"), list):
        first = attrs["multiscales"][0] if attrs["multiscales"] else {}
        return str(first.get("version", "0.4") if isinstance(first, dict) else "0.4"), attrs["multiscales"]
    return None, []


def _numbers(value, n, what, where, positive=False):
    if not isinstance(value, list) or len(value) != n or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value):
        raise FileFormatError(f"{where}: {what} must be {n} finite numbers, got {str(value)[:80]}")
    if positive and min(value) <= 0:
        raise FileFormatError(f"{where}: {what} must be positive, got {value}")
    return [float(v) for v in value]


def _transforms(items, n, where):
    """``(scale, translation)`` of a list of NGFF coordinateTransformations."""
    scale, shift = [1.0] * n, [0.0] * n
    if items is None:
        return scale, shift
    if not isinstance(items, list):
        raise FileFormatError(f"{where}: coordinateTransformations is not a list")
    for item in items:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "identity":
            continue
        if kind == "scale":
            if "path" in item:
                raise FileFormatError(f"{where}: coordinateTransformations stored in a file are not read")
            factor = _numbers(item.get("scale"), n, "scale", where, positive=True)
            scale = [a * b for a, b in zip(scale, factor)]
            shift = [a * b for a, b in zip(shift, factor)]
        elif kind == "translation":
            if "path" in item:
                raise FileFormatError(f"{where}: coordinateTransformations stored in a file are not read")
            offset = _numbers(item.get("translation"), n, "translation", where)
            shift = [a + b for a, b in zip(shift, offset)]
        else:
            raise FileFormatError(f"{where}: coordinate transformation {str(kind)[:40]!r} is not read "
                                  f"(scale and translation are)")
    return scale, shift


def _axes(raw, ndim, where):
    """NGFF axes -> ``(names, units)``; only ``[t][c]zyx`` is a 3-D volume."""
    if not isinstance(raw, list) or len(raw) != ndim:
        raise FileFormatError(f"{where}: the image's axes do not match the array's {ndim} dimensions")
    names, units = [], []
    for axis in raw:
        if isinstance(axis, str):
            axis = {"name": axis}
        if not isinstance(axis, dict) or not isinstance(axis.get("name"), str):
            raise FileFormatError(f"{where}: an axis has no name")
        names.append(axis["name"].lower())
        units.append(axis.get("unit") if isinstance(axis.get("unit"), str) else None)
    order = [n for n in ("t", "c", "z", "y", "x") if n in names]
    if names != order or names[-3:] != list(_SPACE):
        raise FileFormatError(f"{where}: axes ({','.join(names)}) are not a 3-D volume; convt3d reads t,c,z,y,x "
                              f"with t and c optional, in that order")
    return names, units


class _Image:
    """What :meth:`ZarrFormat.probe` learnt about one array: its NGFF context and shapes."""

    def __init__(self, store, key, fmt, meta, shape, chunks, dtype, axes, units, scale, shift, version):
        self.store, self.key, self.fmt, self.meta = store, key, fmt, meta
        self.shape, self.chunks, self.dtype = shape, chunks, dtype
        self.axes, self.units, self.scale, self.shift = axes, units, scale, shift
        self.version = version

    @property
    def shards(self):
        if self.fmt != 3:
            return None
        for codec in self.meta.get("codecs") or []:
            if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
                inner = tuple(codec["configuration"]["chunk_shape"])   # checked by _codec_names
                return tuple(self.chunks), inner
        return None

    @property
    def read_chunks(self):
        """Chunk shape as zarr-python reads it (the inner chunks of a shard)."""
        shards = self.shards
        return shards[1] if shards and len(shards[1]) == len(self.shape) else self.chunks

    def spatial_chunks(self, missing=1):
        """The read chunk shape along z, y, x (``missing`` for an axis the array lacks)."""
        chunks = self.read_chunks
        sizes = dict(zip(self.axes or ["t", "c", "z", "y", "x"][-len(chunks):], chunks))
        return tuple(sizes.get(a, missing) for a in _SPACE)

    def engine_shape(self, where):
        if self.axes is None:
            return array_engine_shape(self.shape, where)
        sizes = dict(zip(self.axes, self.shape))
        shape = (sizes.get("t", 1), sizes.get("c", 1)) + tuple(sizes[a] for a in _SPACE)
        check_nonempty(shape, where)
        return shape

    def engine_index(self, engine_slices):
        """The array's index for engine slices ``(N, C, D, H, W)``."""
        if self.axes is None:
            return engine_slices[5 - len(self.shape):]
        picks = {"t": engine_slices[0], "c": engine_slices[1], "z": engine_slices[2], "y": engine_slices[3],
                 "x": engine_slices[4]}
        return tuple(picks[a] for a in self.axes)

    def affine(self):
        affine = np.eye(4)
        affine[[0, 1, 2], [0, 1, 2]] = self.scale
        affine[:3, 3] = self.shift
        return affine


def _describe_where(store, key):
    return f"{store}:{key}" if key else store


def require_store(path):
    """Refuse a path that is not a Zarr store folder (without following it into devices)."""
    mode = path_mode(path, "no such Zarr store")
    if not stat.S_ISDIR(mode):
        raise FileFormatError(f"{path} is not a Zarr store (a folder with zarr.json, .zgroup or .zarray)")
    if _node(path, "") is None:
        raise FileFormatError(f"{path} is a folder without Zarr metadata (zarr.json, .zgroup or .zarray)")


def _first_dataset(where, multiscales):
    """The path of the first dataset of the first NGFF image, checked to stay below its group."""
    first = multiscales[0] if isinstance(multiscales[0], dict) else {}
    datasets = first.get("datasets")
    if not isinstance(datasets, list) or not datasets or not isinstance(datasets[0], dict) \
            or not isinstance(datasets[0].get("path"), str):
        raise FileFormatError(f"{where}: the NGFF multiscales have no dataset path")
    path = datasets[0]["path"].strip("/")
    if any(part in ("", ".", "..") for part in path.split("/")):
        raise FileFormatError(f"{where}: the NGFF dataset path {path[:60]!r} does not name an array below the image")
    return path


def _image(store, key):
    """Find and check the array ``key`` names (see the module docstring) and its NGFF context."""
    require_store(store)
    root = _node(store, "")
    where = _describe_where(store, key)
    version, multiscales, scale_ctx = None, [], None
    if key is None:
        if root[0] == "array":
            key = ""
        else:
            version, multiscales = _multiscales(root[3])
            if multiscales:
                key = _first_dataset(store, multiscales)
            else:
                arrays = _arrays(store)
                if len(arrays) != 1:
                    listed = ", ".join(arrays[:10]) or "none"
                    raise FileFormatError(f"{store} holds {len(arrays)} arrays ({listed}); name one as {store}:KEY")
                key = arrays[0]
        where = _describe_where(store, key)
    key = key.strip("/")
    if any(part in ("", ".", "..") for part in key.split("/")) and key:
        raise KeyNotFoundError(f"{where}: not an array path inside the store")
    node = _node(store, key)
    if node is not None and node[0] == "group":
        version, multiscales = _multiscales(node[3])
        if multiscales:   # a key naming an NGFF image: its first level (dataset paths go down only)
            key = f"{key}/{_first_dataset(where, multiscales)}" if key else _first_dataset(where, multiscales)
            where = _describe_where(store, key)
            node = _node(store, key)
    if node is None or node[0] != "array":
        arrays = _arrays(store)
        raise KeyNotFoundError(f"{where}: no such array in the store (arrays: {', '.join(arrays[:10]) or 'none'})")
    _, fmt, meta, attrs = node
    shape, chunks, dtype = _check_array_meta(where, meta, fmt)
    # The NGFF image this array is a level of: the group above it that lists it as a dataset.
    parts = key.split("/") if key else []
    axes = units = None
    scale, shift = [1.0] * 3, [0.0] * 3
    for cut in range(len(parts) - 1, -1, -1):
        parent = "/".join(parts[:cut])
        group = _node(store, parent)
        if group is None or group[0] != "group":
            continue
        version, multiscales = _multiscales(group[3])
        rel = "/".join(parts[cut:])
        for image in multiscales:
            if not isinstance(image, dict):
                continue
            datasets = image.get("datasets")
            if not isinstance(datasets, list):
                raise FileFormatError(f"{_describe_where(store, parent)}: the NGFF multiscales' datasets is not a list")
            for dataset in datasets:
                if isinstance(dataset, dict) and dataset.get("path") == rel:
                    axes, units = _axes(image.get("axes") if "axes" in image else ["t", "c", "z", "y", "x"][-len(shape):],
                                        len(shape), where)
                    s1, t1 = _transforms(dataset.get("coordinateTransformations"), len(shape), where)
                    s2, t2 = _transforms(image.get("coordinateTransformations"), len(shape), where)
                    scale_all = [a * b for a, b in zip(s1, s2)]
                    shift_all = [a * b + c for a, b, c in zip(t1, s2, t2)]
                    scale, shift = scale_all[-3:], shift_all[-3:]
                    if not all(math.isfinite(v) and v > 0 for v in scale) or \
                            not all(math.isfinite(v) for v in shift):
                        raise FileFormatError(f"{where}: the NGFF scale {scale} and translation {shift} (dataset "
                                              f"and image combined) are not finite and positive")
                    scale_ctx = image
                    break
            if scale_ctx is not None:
                break
        if scale_ctx is not None:
            break
    if scale_ctx is None:
        version = None
        dims = meta.get("dimension_names") if fmt == 3 else attrs.get("_ARRAY_DIMENSIONS")
        if isinstance(dims, list) and len(dims) == len(shape) and all(isinstance(d, str) for d in dims) \
                and [d.lower() for d in dims][-3:] == list(_SPACE):
            axes, units = _axes(dims, len(shape), where)
    return _Image(store, key, fmt, meta, shape, chunks, dtype, axes, units, scale, shift, version)


# --------------------------------------------------------------------------- reading

class ZarrSource(Source):
    """Input windows read straight from the store; a chunk that cannot be decoded is named.

    Slabs (``read``) come in the output's orientation: for a NIfTI/MGH output, W-ranges
    transposed to ``(N, C, W, H, D)``. Windows (``read_window``, block-wise runs) are
    always in engine orientation.
    """

    #: Bytes the last chunk-aligned box read may keep for the next window (set by a block-wise
    #: run from its memory budget; 0: every window is read on its own). Neighbouring blocks'
    #: windows share input chunks, which would otherwise be decompressed once per window.
    window_cache = 0

    def __init__(self, info, transposed, dtype, pad, image):
        super().__init__(info, transposed, dtype, pad)
        self.image = image
        self.engine_spatial = tuple(info.engine_shape[2:])
        self.array = _open_array(image.store, image.key, image.fmt, "r")
        self._box = None          # (lo, hi, engine array) of the last box read

    def _raw(self, a, b):
        if not self.transposed:
            return self._raw_window((a, 0, 0), (b,) + self.engine_spatial[1:])
        block = self._raw_window((0, 0, a), self.engine_spatial[:2] + (b,))
        return block.transpose(0, 1, 4, 3, 2)

    def _raw_window(self, lo, hi):
        if self.window_cache:
            chunks = self.image.spatial_chunks()
            box_lo = tuple(a // ch * ch for a, ch in zip(lo, chunks))
            box_hi = tuple(min(n, -(-b // ch) * ch) for b, ch, n in zip(hi, chunks, self.engine_spatial))
            n, c = self.info.engine_shape[:2]
            size = n * c * self.image.dtype.itemsize * math.prod(b - a for a, b in zip(box_lo, box_hi))
            if size <= self.window_cache:
                cached = self._box
                if cached is None or not all(a >= ca and b <= cb for a, b, ca, cb in zip(lo, hi, cached[0], cached[1])):
                    self._box = None   # freed before the next one is read
                    cached = self._box = (box_lo, box_hi, self._read(box_lo, box_hi))
                return cached[2][(slice(None), slice(None)) + tuple(
                    slice(a - ca, b - ca) for a, b, ca in zip(lo, hi, cached[0]))]
        return self._read(lo, hi)

    def _read(self, lo, hi):
        index = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(lo, hi))
        check_chunk_files(self.image, self.image.engine_index(index))
        try:
            data = self.array[self.image.engine_index(index)]
        except Exception as exc:  # noqa: BLE001 - codecs raise anything on damaged bytes
            raise FileFormatError(self._bad_chunk(lo, hi, exc)) from None
        n, c = self.info.engine_shape[:2]
        return np.asarray(data).reshape((n, c) + tuple(b - a for a, b in zip(lo, hi)))

    def _bad_chunk(self, lo, hi, exc):
        """Find the chunk of window ``[lo, hi)`` that fails and say which (and its file)."""
        image = self.image
        steps = image.spatial_chunks()
        ranges = [range(a // s * s, b, s) for a, b, s in zip(lo, hi, steps)]
        for start in itertools.product(*ranges):
            stop = tuple(min(n, s0 + s) for s0, s, n in zip(start, steps, self.engine_spatial))
            index = (slice(None), slice(None)) + tuple(slice(a, b) for a, b in zip(start, stop))
            try:
                self.array[image.engine_index(index)]
            except Exception as inner:  # noqa: BLE001
                grid = tuple(0 if isinstance(v, slice) else v for v in
                             image.engine_index((slice(None), slice(None)) + tuple(s0 // s for s0, s in zip(start, steps))))
                return (f"{_describe_where(image.store, image.key)}: chunk {_chunk_key(image, grid)} cannot be "
                        f"decoded ({type(inner).__name__}: {str(inner)[:80]}); the store is damaged")
        return f"{_describe_where(image.store, image.key)}: cannot read voxels ({type(exc).__name__}: {str(exc)[:80]})"

    def close(self):
        self.array = None
        self._box = None


def _declared_size(head, codec):
    """Bytes a zstd frame or a Blosc buffer says it decompresses to, or ``None``."""
    if codec == "zstd" and head[:4] == b"\x28\xb5\x2f\xfd" and len(head) >= 6:
        descriptor = head[4]
        single = (descriptor >> 5) & 1
        size_bytes = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        at = 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3]
        if not size_bytes or len(head) < at + size_bytes:
            return None
        value = int.from_bytes(head[at:at + size_bytes], "little")
        return value + 256 if size_bytes == 2 else value
    if codec == "blosc" and len(head) >= 8:
        return int.from_bytes(head[4:8], "little")
    return None


def _outer_codec(image):
    """The codec whose output the chunk files hold, when it declares its decompressed size."""
    if image.shards:
        return None
    if image.fmt == 2:
        compressor = image.meta.get("compressor")
        return _bounded_name(compressor.get("id") if isinstance(compressor, dict) else None)
    return _last_codec(image.meta.get("codecs") or [])


def _last_codec(codecs):
    """The last codec of a v3 list, checksums aside, if its output size can be bounded."""
    names = [c.get("name") if isinstance(c, dict) else c for c in codecs]
    names = [n for n in names if n not in ("crc32c", "numcodecs.crc32", "numcodecs.adler32",
                                            "numcodecs.fletcher32")]
    return _bounded_name(names[-1] if names else None)


def _bounded_name(name):
    name = name[len("numcodecs."):] if isinstance(name, str) and name.startswith("numcodecs.") else name
    return name if name in ("zstd", "blosc") + tuple(_STREAMS) else None


def _sharding(image):
    """The configuration of a v3 array's sharding codec."""
    for codec in image.meta.get("codecs") or []:
        if isinstance(codec, dict) and codec.get("name") == "sharding_indexed":
            return codec.get("configuration") or {}
    return {}


#: Codecs whose output size only decompressing tells, and their decompressors (a chunk
#: file may hold several streams one after another, as gzip's and bzip2's tools write).
_STREAMS = {"gzip": lambda: zlib.decompressobj(47), "zlib": lambda: zlib.decompressobj(15),
            "bz2": lambda: bz2.BZ2Decompressor(), "lzma": lambda: lzma.LZMADecompressor()}


def _inflates_beyond(data, codec, cap):
    """Whether ``data`` (a chunk file of a gzip, zlib, bz2 or lzma codec) decompresses to more
    than ``cap`` bytes; found by decompressing at most ``cap + 1`` bytes, never the rest.
    A stream that does not decode is left for zarr-python to report."""
    total = 0
    while data:
        decoder = _STREAMS[codec]()
        streaming_input = codec in ("gzip", "zlib")   # zlib keeps unread input in unconsumed_tail
        try:
            total += len(decoder.decompress(data, cap + 1 - total))
            while total <= cap and not decoder.eof:
                if streaming_input:
                    if not decoder.unconsumed_tail:
                        break
                    more = decoder.decompress(decoder.unconsumed_tail, cap + 1 - total)
                else:
                    if decoder.needs_input:
                        break
                    more = decoder.decompress(b"", cap + 1 - total)
                total += len(more)
        except (zlib.error, OSError, EOFError, lzma.LZMAError, ValueError):
            return False
        if total > cap:
            return True
        if not decoder.eof:
            return False
        data = decoder.unused_data
    return False


def _zstd_bound(data):
    """The most bytes the zstd frames of ``data`` can decompress to, from their headers
    (a frame's declared size, else its blocks': raw and RLE blocks say theirs, a
    compressed block makes at most 128 KiB); ``None`` if the frames do not parse."""
    total, at = 0, 0
    while at < len(data):
        magic = int.from_bytes(data[at:at + 4], "little")
        if 0x184D2A50 <= magic <= 0x184D2A5F and at + 8 <= len(data):   # skippable frame
            at += 8 + int.from_bytes(data[at + 4:at + 8], "little")
            continue
        if magic != 0xFD2FB528 or at + 5 > len(data):
            return None
        descriptor = data[at + 4]
        single = (descriptor >> 5) & 1
        size_bytes = (1 if single else 0, 2, 4, 8)[descriptor >> 6]
        header = 5 + (0 if single else 1) + (0, 1, 2, 4)[descriptor & 3] + size_bytes
        declared = _declared_size(data[at:at + header], "zstd")
        at += header
        frame = 0
        while True:
            if at + 3 > len(data):
                return None
            word = int.from_bytes(data[at:at + 3], "little")
            last, kind, size = word & 1, (word >> 1) & 3, word >> 3
            at += 3
            if kind == 0:          # raw: size bytes follow
                frame, at = frame + size, at + size
            elif kind == 1:        # RLE: one byte, repeated size times
                frame, at = frame + size, at + 1
            elif kind == 2:        # compressed: size bytes make at most one block
                frame, at = frame + (128 << 10), at + size
            else:
                return None
            if last:
                break
        at += 4 if descriptor & 4 else 0   # content checksum
        total += declared if declared is not None else frame
    return total if at == len(data) else None


def check_chunk_files(image, index):
    """Refuse, before zarr-python reads them, chunk files of ``index`` (slices in the array's axes)
    that no writer makes: folders, pipes and devices (which would hang or never end), empty
    files, files reached through a link that leaves the store, files larger than a chunk's data
    can compress to, and chunks that decompress to more
    than a chunk (a decompression bomb): zstd and Blosc by the sizes their headers declare (an
    undeclared zstd frame by its blocks'), gzip, zlib, bz2 and lzma by decompressing up to one
    byte past a chunk; the inner chunks of a shard each). A missing chunk is the fill value."""
    ranges = []
    for piece, n, c in zip(index, image.shape, image.chunks):
        start, stop, _ = piece.indices(n)
        if stop <= start:
            return
        ranges.append(range(start // c, (stop - 1) // c + 1))
    raw = math.prod(image.chunks) * image.dtype.itemsize
    shards = image.shards
    inner = math.prod(-(-o // i) for o, i in zip(*shards)) if shards else 0
    limit = raw + raw // 4 + (64 << 10) + 16 * inner
    codec = _outer_codec(image)
    sharding = _sharding(image) if shards else None
    inner_codec = _last_codec(sharding.get("codecs") or []) if sharding else None
    inner_raw = math.prod(shards[1]) * image.dtype.itemsize if shards else 0
    where = _describe_where(image.store, image.key)
    root = os.path.join(os.path.realpath(image.store), "")
    for grid in itertools.product(*ranges):
        key = _chunk_key(image, grid, outer=True)
        path = os.path.join(image.store, *key.split("/"))
        try:
            info = os.stat(path)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise FileFormatError(f"{where}: chunk {key} cannot be read ({exc.strerror or exc})") from None
        if not os.path.realpath(path).startswith(root):
            # As for ONNX external data: the store names what is read, a link cannot widen that.
            raise FileFormatError(f"{where}: chunk {key} is a link to a file outside the store; convt3d reads "
                                  f"only the store's own files")
        if not stat.S_ISREG(info.st_mode):
            raise FileFormatError(f"{where}: chunk {key} is not a regular file (a folder, pipe or device); "
                                  f"the store is damaged")
        if info.st_size == 0 or info.st_size > limit:
            raise FileFormatError(f"{where}: chunk {key} is {info.st_size} bytes, which no chunk of this array "
                                  f"({raw} bytes of data) can be; the store is damaged")
        pieces = []
        if codec is not None or inner_codec is not None:
            try:
                with open(path, "rb") as handle:
                    # A header that declares the size is enough; else the whole file, which the
                    # size check above bounds.
                    data = handle.read(18)
                    if shards or codec in _STREAMS or (codec == "zstd" and _declared_size(data, codec) is None):
                        data += handle.read()
            except OSError as exc:
                raise FileFormatError(f"{where}: chunk {key} cannot be read ({exc.strerror or exc})") from None
            pieces = [(key, data, codec, raw)] if codec is not None else \
                [(f"{key} (inner chunk {number})", piece, inner_codec, inner_raw)
                 for number, piece in enumerate(_shard_pieces(data, inner, sharding))]
        for name, data, kind, cap in pieces:
            claimed = _inflated_beyond(data, kind, cap)
            if claimed is not None:
                raise FileFormatError(f"{where}: chunk {name} decompresses to {claimed} bytes, more than a "
                                      f"chunk holds ({cap}); the store is damaged")


def _inflated_beyond(data, codec, cap):
    """What a compressed chunk ``data`` of ``codec`` decompresses to when that is more
    than ``cap`` bytes (a number, or "more than cap"), else None."""
    if codec in _STREAMS:
        return f"more than {cap}" if _inflates_beyond(data, codec, cap) else None
    claimed = _declared_size(data[:18], codec)
    if claimed is None and codec == "zstd":
        claimed = _zstd_bound(data)
    return claimed if claimed is not None and claimed > cap else None


def _shard_pieces(data, count, sharding):
    """The inner chunks' bytes of a shard file (its index at the end or start: ``count``
    little-endian (offset, length) pairs, then a CRC32C when the index codecs have one;
    all-ones pairs are empty chunks). Nothing when the index does not parse: zarr-python
    reports that."""
    index_codecs = sharding.get("index_codecs") or [{"name": "bytes"}, {"name": "crc32c"}]
    checksum = 4 if any((c.get("name") if isinstance(c, dict) else c) == "crc32c" for c in index_codecs) else 0
    size = 16 * count + checksum
    if len(data) < size:
        return []
    index = data[-size:] if sharding.get("index_location", "end") != "start" else data[:size]
    pairs = np.frombuffer(index[:16 * count], dtype="<u8").reshape(count, 2)
    empty = np.iinfo(np.uint64).max
    return [data[int(o):int(o) + int(n)] for o, n in pairs
            if not (o == empty and n == empty) and int(o) + int(n) <= len(data)]


def _chunk_key(image, grid, outer=False):
    """The store key of the chunk (shard) holding read-chunk ``grid`` (a chunk-grid index when ``outer``)."""
    shards = image.shards
    if shards and not outer:
        grid = tuple(g * i // o for g, o, i in zip(grid, shards[0], shards[1]))
    if image.fmt == 3:
        encoding = image.meta.get("chunk_key_encoding") or {}
        encoding = encoding if isinstance(encoding, dict) else {}
        config = encoding.get("configuration") if isinstance(encoding.get("configuration"), dict) else {}
        sep = config.get("separator", "." if encoding.get("name") == "v2" else "/")
        name = sep.join(str(g) for g in grid)
        name = name if encoding.get("name") == "v2" else "c" + sep + name
    else:
        name = (image.meta.get("dimension_separator") or ".").join(str(g) for g in grid)
    return f"{image.key}/{name}" if image.key else name


def _open_array(store, key, fmt, mode):
    """The zarr-python array (after :func:`_image` has checked its metadata, or one we made)."""
    zarr = require_zarr()
    from zarr.storage import LocalStore

    try:
        return zarr.open_array(LocalStore(store, read_only=mode == "r"), path=key, mode=mode, zarr_format=fmt)
    except Exception as exc:  # noqa: BLE001 - zarr-python raises many types on bad metadata
        raise FileFormatError(f"{_describe_where(store, key)}: cannot open the array "
                              f"({type(exc).__name__}: {str(exc)[:120]})") from None


# --------------------------------------------------------------------------- writing

class StoreLayout:
    """How the output array stores engine blocks, and where: everything a worker needs (picklable)."""

    def __init__(self, store, key, fmt, axes, dtype, engine_shape):
        self.store, self.key, self.fmt, self.axes = store, key, fmt, tuple(axes)
        self.dtype = np.dtype(dtype)
        self.engine_shape = tuple(engine_shape)
        self._array = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = None
        return state

    def array(self):
        if self._array is None:
            self._array = _open_array(self.store, self.key, self.fmt, "r+")
        return self._array

    def index(self, region):
        (lo, hi) = region
        picks = {"t": slice(None), "c": slice(None)}
        picks.update({a: slice(l, h) for a, l, h in zip(_SPACE, lo, hi)})
        return tuple(picks[a] for a in self.axes)

    def stored_block(self, block):
        """An engine block ``(N, C, d, h, w)`` in the array's axes."""
        if "t" not in self.axes:
            block = block[0]
            if "c" not in self.axes:
                block = block[0]
        elif "c" not in self.axes:
            block = block[:, 0]
        return block

    def write(self, index, region, block):
        """Store one block (compute dtype, converted here) and mark it complete.

        Returns
        -------
        int
            Values clipped to an integer type's range.
        """
        clipped = 0
        if block.dtype != self.dtype:
            block, clipped = cast_block(np.ascontiguousarray(block), self.dtype)
        try:
            self.array()[self.index(region)] = self.stored_block(block)
            marker = os.path.join(self.store, MARKERS, str(index))
            with open(marker, "wb") as handle:
                handle.write(b"")
        except OSError as exc:
            raise OutputError(f"cannot write {self.store}: {exc.strerror or exc}") from None
        return clipped

    def done(self):
        """Indexes of the blocks already complete."""
        try:
            return {int(name) for name in os.listdir(os.path.join(self.store, MARKERS)) if name.isdigit()}
        except OSError:
            return set()


def partial_path(path):
    """Where the output store is built before it is renamed onto ``path``."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}{PARTIAL_SUFFIX}")


def _output_affine_ngff(affine):
    """``(scale, translation, rotated)`` of an output affine over (z, y, x)."""
    affine = np.asarray(affine, dtype=np.float64)
    zooms = np.array([math.hypot(*affine[:3, j]) for j in range(3)])   # no under/overflow of squares
    if not (np.isfinite(zooms).all() and (zooms > 0).all() and np.isfinite(affine[:3, 3]).all()):
        raise OutputError(f"the output's voxel sizes {zooms.tolist()} and origin {affine[:3, 3].tolist()} cannot be "
                          f"written as NGFF coordinates (not finite and positive)")
    rotated = not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])), atol=1e-9) or \
        bool((np.diag(affine[:3, :3]) < 0).any())
    return [float(v) for v in zooms], [float(v) for v in affine[:3, 3]], rotated


class ZarrWriter:
    """Builds the output store under :func:`partial_path` and renames it when every block is written.

    Parameters
    ----------
    path, key : str
        Target store and the array's path in it (``"0"``).
    out_shape : tuple
        Engine output ``(N, C, D, H, W)``.
    dtype : numpy dtype
        Stored type.
    like : VolumeInfo
        The input (NGFF axes, units, version and chunks; the affine).
    params : LayerParams
    chunks, shards : tuple of 3 int, optional
    compressor : str
        One of :data:`COMPRESSORS`.
    fingerprint : dict
        What the run is (input, layer, options); ``resume`` continues only a partial
        store made by the same run.
    """

    transposed = False

    def __init__(self, path, key, out_shape, dtype, *, overwrite, like, params, formula, source, chunks=None,
                 shards=None, compressor=None, resume=False, fingerprint=None, blocks=None):
        zarr = require_zarr()
        self.path, self.key = path, key or "0"
        self.out_shape = tuple(int(v) for v in out_shape)
        self.dtype = np.dtype(dtype)
        self.overwrite = overwrite
        self.clipped = 0
        self.tmp = partial_path(path)
        image = getattr(like, "image", None) if like is not None else None
        fmt = image.fmt if image is not None and image.fmt == 2 else 3
        spatial = self.out_shape[2:]
        self.chunks = tuple(max(1, min(int(c), n)) for c, n in zip(chunks, spatial)) if chunks \
            else default_chunks(like, self.out_shape)
        self.shards = None
        if shards:
            if fmt == 2:
                raise OutputError("--shards needs a Zarr v3 output; the input is Zarr v2 (NGFF 0.4), whose "
                                  "outputs are v2")
            # A shard past the output's end would only hold empty chunks: clip to whole chunks.
            self.shards = tuple(min(int(s), -(-n // c) * c) for s, c, n in zip(shards, self.chunks, spatial))
            if any(s % c for s, c in zip(self.shards, self.chunks)):
                raise OutputError(f"--shards {','.join(map(str, shards))} must be a multiple of the chunks "
                                  f"{','.join(map(str, self.chunks))} along every axis")
        for what, shape in (("chunk", self.chunks), ("shard", self.shards)):
            if shape and math.prod(shape) * self.dtype.itemsize > MAX_CHUNK_BYTES:
                raise OutputError(f"a {what} of {'x'.join(map(str, shape))} {self.dtype.name} values is "
                                  f"{math.prod(shape) * self.dtype.itemsize} bytes; codecs take at most 2 GiB: use "
                                  f"smaller --{what}s")
        n, c = self.out_shape[:2]
        keep_t = n > 1 or (image is not None and image.axes is not None and "t" in image.axes)
        keep_c = c > 1 or (image is not None and image.axes is not None and "c" in image.axes)
        axes = (["t"] if keep_t else []) + (["c"] if keep_c else []) + list(_SPACE)
        self.layout = StoreLayout(self.tmp, self.key, fmt, axes, self.dtype, self.out_shape)
        self.file_shape = tuple(({"t": n, "c": c} | dict(zip(_SPACE, self.out_shape[2:])))[a] for a in axes)
        fingerprint = dict(fingerprint or {})
        fingerprint.update(shape=list(self.file_shape), dtype=self.dtype.name, chunks=list(self.chunks),
                           shards=list(self.shards) if self.shards else None, compressor=compressor,
                           blocks=blocks)
        self.fingerprint = fingerprint
        self.resumed = 0
        #: The block shape of the run whose partial store is continued (``resume``), else this run's.
        self.block_shape = tuple(blocks or ())
        self._lock_fd = None
        self._lock()
        try:
            self._start(zarr, resume, like, params, formula, source, compressor, fmt, axes)
        except BaseException:
            self._unlock()
            raise

    def _start(self, zarr, resume, like, params, formula, source, compressor, fmt, axes):
        """Continue the partial store (``resume``) or make a new one."""
        path, fingerprint = self.path, self.fingerprint
        if resume and os.path.isdir(self.tmp):
            stored = _read_json(os.path.join(self.tmp, RUN_FILE), RUN_FILE) or {}
            self.block_shape = tuple(stored.get("blocks") or ())
            wanted = json.loads(json.dumps(fingerprint))
            if {k: v for k, v in stored.items() if k != "blocks"} != {k: v for k, v in wanted.items() if k != "blocks"}:
                raise OutputError(f"--resume: the partial output {self.tmp} was made by another run (input, "
                                  f"layer or output options differ); run without --resume to start again")
            self.resumed = len(self.layout.done())
            return
        self._remove_partial()
        try:
            os.mkdir(self.tmp)
            self._create(zarr, like, params, formula, source, compressor, fmt, axes)
            os.mkdir(os.path.join(self.tmp, MARKERS))
            with open(os.path.join(self.tmp, RUN_FILE), "w", encoding="utf-8") as handle:
                json.dump(fingerprint, handle)
        except OSError as exc:
            self._remove_partial()
            raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
        except BaseException:
            self._remove_partial()
            raise

    def _lock(self):
        """Hold ``PARTIAL.lock`` for the run: a second run on the same output is refused
        instead of removing a live run's partial store."""
        import fcntl

        path = self.tmp + ".lock"
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(f"another convt3d run is writing {self.path} (it holds {path})") from None
        self._lock_fd = fd

    def _unlock(self):
        if self._lock_fd is not None:
            try:
                os.remove(self.tmp + ".lock")
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None

    def _create(self, zarr, like, params, formula, source, compressor, fmt, axes):
        from zarr.storage import LocalStore

        image = getattr(like, "image", None) if like is not None else None
        group = zarr.open_group(LocalStore(self.tmp), mode="w", zarr_format=fmt)
        sizes = {"t": 1, "c": 1}
        chunks = tuple(sizes.get(a, 0) or dict(zip(_SPACE, self.chunks))[a] for a in axes)
        shards = None
        if self.shards:
            shards = tuple(sizes.get(a, 0) or dict(zip(_SPACE, self.shards))[a] for a in axes)
        kwargs = {"shape": self.file_shape, "chunks": chunks, "dtype": self.dtype, "fill_value": 0,
                  "compressors": _compressor(compressor, fmt, self.dtype)}
        if shards:
            kwargs["shards"] = shards
        if fmt == 3:
            kwargs["dimension_names"] = list(axes)
        group.create_array(self.key, **kwargs)
        affine = geometry.output_affine(like.affine if like is not None else np.eye(4), params)
        scale, shift, rotated = _output_affine_ngff(affine)
        units = {}
        if image is not None and image.units:
            units = {a: u for a, u in zip(image.axes or [], image.units) if u}
        elif like is not None and getattr(like, "format", None) in ("nifti", "mgh"):
            units = {a: "millimeter" for a in _SPACE}
        extra = {"t": 1.0, "c": 1.0}  # not resampled; NGFF wants a scale for every axis
        ngff_axes = []
        for a in axes:
            entry = {"name": a, "type": {"t": "time", "c": "channel"}.get(a, "space")}
            if units.get(a):
                entry["unit"] = units[a]
            ngff_axes.append(entry)
        full_scale = [extra[a] if a in extra else scale[_SPACE.index(a)] for a in axes]
        full_shift = [0.0 if a in extra else shift[_SPACE.index(a)] for a in axes]
        transforms = [{"type": "scale", "scale": full_scale}]
        if any(full_shift):
            transforms.append({"type": "translation", "translation": full_shift})
        name = os.path.basename(os.path.normpath(self.path))
        image_meta = {"name": name, "axes": ngff_axes,
                      "datasets": [{"path": self.key, "coordinateTransformations": transforms}]}
        convt3d = {"source": source, "layer": params.as_dict(), "formula": list(formula),
                   "affine": [list(map(float, row)) for row in affine]}
        if rotated:
            convt3d["note"] = ("the input's affine has a rotation or flip, which NGFF coordinateTransformations "
                               "cannot hold; scale is the voxel size and translation the first voxel's centre")
        if fmt == 3:
            group.attrs.update({"ome": {"version": "0.5", "multiscales": [image_meta]}, "convt3d": convt3d})
        else:
            image_meta = {"version": "0.4", **image_meta}
            group.attrs.update({"multiscales": [image_meta], "convt3d": convt3d})

    def write_block(self, index, region, block):
        self.clipped += self.layout.write(index, region, block)

    def done(self):
        return self.layout.done()

    def commit(self):
        """Remove the run's bookkeeping and rename the store onto the target (replacing it with --overwrite)."""
        try:
            self._commit()
        finally:
            self._unlock()

    def _commit(self):
        try:
            shutil.rmtree(os.path.join(self.tmp, MARKERS), ignore_errors=True)
            os.remove(os.path.join(self.tmp, RUN_FILE))
            if os.path.lexists(self.path):
                if not self.overwrite:
                    raise OutputError(f"{self.path} exists; use --overwrite to replace it")
                trash = partial_path(self.path) + ".old"
                shutil.rmtree(trash, ignore_errors=True)
                os.rename(self.path, trash)
                os.rename(self.tmp, self.path)
                _remove_tree(trash)
            else:
                os.rename(self.tmp, self.path)
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from None

    def abort(self, keep=False):
        """Remove the partial store, or keep it for ``--resume`` (an interrupted run)."""
        if not keep:
            self._remove_partial()
        self._unlock()

    def _remove_partial(self):
        _remove_tree(self.tmp)


def _remove_tree(path):
    if os.path.islink(path) or os.path.isfile(path):
        os.remove(path)
    elif os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)


def _compressor(name, fmt, dtype):
    name = name or COMPRESSORS[0]
    if name not in COMPRESSORS:
        raise OutputError(f"--compressor must be one of {', '.join(COMPRESSORS)}, got {name!r}")
    if name == "none":
        return None
    typesize = np.dtype(dtype).itemsize
    if fmt == 2:
        import numcodecs

        if name.startswith("blosc-"):
            return numcodecs.Blosc(cname=name[6:], clevel=1 if name.endswith("zstd") else 5,
                                   shuffle=numcodecs.Blosc.SHUFFLE)
        return numcodecs.Zstd(level=1) if name == "zstd" else numcodecs.GZip(level=1)
    from zarr.codecs import BloscCodec, GzipCodec, ZstdCodec

    if name.startswith("blosc-"):
        return BloscCodec(cname=name[6:], clevel=1 if name.endswith("zstd") else 5, shuffle="shuffle",
                          typesize=typesize)
    return ZstdCodec(level=1) if name == "zstd" else GzipCodec(level=1)


def default_chunks(like, out_shape):
    """The input's chunk shape per spatial axis when it is a Zarr store, else DEFAULT_CHUNK; never
    larger than the output."""
    image = getattr(like, "image", None) if like is not None else None
    if image is not None:
        chunks = image.spatial_chunks(DEFAULT_CHUNK)
    else:
        chunks = (DEFAULT_CHUNK,) * 3
    return tuple(max(1, min(c, n)) for c, n in zip(chunks, out_shape[2:]))


def check_store_target(path, overwrite):
    """Refuse a target store that cannot be written; return its folder."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.lexists(path):
        if not overwrite:
            raise OutputError(f"{path} exists; use --overwrite to replace it")
        if not os.path.isdir(path) or os.path.islink(path) or _node(path, "") is None:
            raise OutputError(f"{path} exists and is not a Zarr store; --overwrite replaces only a Zarr store")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: the folder {folder} is not writable")
    return folder


# --------------------------------------------------------------------------- the format

class ZarrFormat(Format):
    """OME-Zarr images and Zarr arrays (see the module docstring)."""

    name = "zarr"
    label = "Zarr"
    blockwise = True
    caches_windows = True

    def require(self, path):
        require_store(path)

    def resident_bytes(self, info):
        # zarr-python decodes whole chunks (a shard's inner chunks) however little of one a
        # slab needs: one decoded chunk and its copy, whatever the metadata makes them.
        image = getattr(info, "image", None)
        if image is None:
            return 0
        return 2 * math.prod(int(c) for c in image.read_chunks) * image.dtype.itemsize

    def stored_dtype(self, dtype, data_dtype=None):
        """``dtype`` (or the data's); extended precision, which Zarr has no type for, is refused."""
        stored = native(dtype if dtype is not None else data_dtype)
        if stored.kind == "f" and stored.itemsize > 8:
            raise OutputError(f"a Zarr store cannot hold {stored.name}; add --output-dtype float64 "
                              f"(output_dtype=numpy.float64 in Python), or write .npy or .h5 to keep {stored.name}")
        return stored

    def probe(self, path, key):
        image = _image(path, key)
        where = _describe_where(path, image.key)
        engine = image.engine_shape(where)
        nbytes = math.prod(image.shape) * image.dtype.itemsize
        info = VolumeInfo(
            path=path, key=image.key, format=self.name, stored_shape=tuple(image.shape), engine_shape=engine,
            dtype=dtype_name(image.dtype), source_ndim=len(image.shape), affine=image.affine(),
            zooms=tuple(image.scale), header=None, attrs={}, read_dtype=dtype_name(native(image.dtype)),
            nbytes=nbytes, memory_needed=nbytes * 2, file_size=_metadata_size(path, image.key),
            byte_order=byte_order(image.dtype), stored_dtype=image.dtype)
        info.image = image
        return info

    def load(self, info):
        source = ZarrSource(info, False, native(np.dtype(info.stored_dtype)), 0, info.image)
        try:
            return np.ascontiguousarray(source._raw(0, info.engine_shape[2]), dtype=native(info.stored_dtype))
        finally:
            source.close()

    def open_source(self, info, transposed, dtype, pad, scratch_dir):
        return ZarrSource(info, transposed, dtype, pad, info.image)

    def describe(self, path, key):
        image = _image(path, key)
        where = _describe_where(path, image.key)
        report = {"path": path, "format": self.name, "zarr_format": image.fmt, "ngff_version": image.version,
                  "key": image.key, "arrays": _arrays(path) if _node(path, "")[0] == "group" else [""],
                  "stored_shape": list(image.shape), "dtype": dtype_name(image.dtype),
                  "byte_order": byte_order(image.dtype), "data_bytes": math.prod(image.shape) * image.dtype.itemsize,
                  "chunks": list(image.read_chunks), "store_size": _tree_size(path),
                  "file_size": _metadata_size(path, image.key)}
        if image.shards:
            report["shards"] = list(image.shards[0])
        report["codecs"] = _codec_names(image.meta, image.fmt)
        report["axes"] = image.axes
        report["units"] = image.units
        report["scale"] = image.scale
        report["translation"] = image.shift
        report["affine"] = image.affine()
        try:
            engine = image.engine_shape(where)
        except (FileFormatError, ShapeError) as exc:
            report["engine_shape"] = None
            report["note"] = f"cannot be read as a volume: {exc}"
        else:
            report.update(engine_shape=list(engine), batch=engine[0], channels=engine[1],
                          spatial_axes="D,H,W = z,y,x")
        return jsonable(report)

    def output_key(self, key, out_shape):
        key = (key or "0").strip("/")
        if not key or any(part in ("", ".", "..") or part.startswith(".") for part in key.split("/")):
            raise OutputError(f"':{key}' is not an array path for a Zarr output (e.g. ':0')")
        return key

    def check_target(self, path, overwrite):
        return check_store_target(path, overwrite)

    def disk_bytes(self, path, out_shape, dtype):
        return None  # compressed: its size is not known before it is written

    def default_chunks(self, like, out_shape):
        return default_chunks(like, out_shape)

    def stamps(self, path, key):
        return [[os.path.relpath(name, os.path.dirname(os.path.abspath(path))), info.st_size, info.st_mtime_ns]
                for name, info in _metadata_stats(os.path.abspath(path), key)]

    def partial_output(self, path):
        partial = partial_path(path)
        return partial if os.path.isdir(partial) else None

    def open_block_writer(self, path, key, out_shape, dtype, **kwargs):
        return ZarrWriter(path, self.output_key(key, out_shape), out_shape, dtype, **kwargs)

    def open_writer(self, *args, **kwargs):
        raise OutputError("Zarr outputs are written block by block (convt3d run)")


def _metadata_stats(path, key):
    """``(file, stat)`` of the metadata documents of the store's root and of array ``key`` (a
    store's chunks are never listed: there may be millions)."""
    found = []
    for folder in dict.fromkeys([path, os.path.join(path, *[p for p in (key or "").split("/") if p])]):
        for name in ("zarr.json", ".zarray", ".zattrs", ".zgroup"):
            try:
                found.append((os.path.join(folder, name), os.stat(os.path.join(folder, name))))
            except OSError:
                pass
    return found


def _metadata_size(path, key):
    """Bytes of the metadata documents (:func:`_metadata_stats`)."""
    return sum(info.st_size for _, info in _metadata_stats(path, key))


def _tree_size(path):
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


FORMAT = ZarrFormat()
