"""Types and helpers shared by every format module.

Nothing here imports h5py or nibabel: ``import convt3d_cli.io`` must stay cheap
because the command line imports it on start-up.
"""

from __future__ import annotations

import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from ..errors import (Convt3dError, FileFormatError, KeyNotFoundError, MemoryLimitError,
                      OutputError, ShapeError)
from ..geometry import LAYER_OPTIONS

# Suffix -> module of the format (imported on first use).  Longest suffixes
# first so that ``.nii.gz`` wins over a hypothetical ``.gz``.
FORMAT_MODULES = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".hdf5": "hdf5",
    ".h5": "hdf5",
    ".npz": "npz",
    ".npy": "npy",
}
SUFFIXES = tuple(FORMAT_MODULES)

# HDF5 attributes that hold a voxel size in (D, H, W) order; scaled by 1/stride on output.
VOXEL_SIZE_ATTRS = ("element_size_um", "spacing", "voxel_size")

_SPEC = re.compile(r"^(?P<path>.+?\.(?:nii\.gz|nii|hdf5|h5|npz|npy)):(?P<key>.*)$",
                   re.IGNORECASE | re.DOTALL)


# --------------------------------------------------------------------------- types

@dataclass(frozen=True)
class Entry:
    """One array inside a file, known from its header only.

    ``name`` is the npz member (without ``.npy``), the absolute HDF5 dataset
    path, or ``None`` for a ``.npy`` file. ``needs_copy`` says whether turning
    the stored array into a C-contiguous native-endian one costs a second copy.
    """

    name: str | None
    shape: tuple
    dtype: np.dtype
    needs_copy: bool = False
    attrs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    @property
    def numeric(self):
        return is_numeric(self.dtype)

    def label(self):
        """``name (shape) dtype`` for listings in error messages."""
        shape = "(" + ", ".join(str(n) for n in self.shape) + ("," if self.ndim == 1 else "") + ")"
        prefix = f"{self.name} " if self.name is not None else ""
        return f"{prefix}{shape} {dtype_name(self.dtype)}"


@dataclass
class VolumeInfo:
    """What a volume file holds, read from its header only (no voxel data).

    Attributes
    ----------
    path, key, format : str
        File, array actually chosen (``None`` for npy/NIfTI) and format name.
    stored_shape : tuple of int
        Shape as stored (NIfTI: ``(X, Y, Z[, 1][, C])``).
    engine_shape : tuple of int
        ``(N, C, D, H, W)`` as :func:`read_volume` returns it.
    dtype : str
        Stored element type (``"int16"``; byte order in :attr:`byte_order`).
    source_ndim : int
        Rank as stored; drives the rank of array outputs.
    affine : numpy.ndarray
        4x4 voxel-to-world affine; identity for array files.
    zooms : tuple of float or None
        NIfTI voxel sizes (all axes), else ``None``.
    header : nibabel header or None
    attrs : dict
        HDF5 attributes of the dataset, else ``{}``.
    read_dtype : str
        Element type of ``Volume.data`` (float when NIfTI scaling applies).
    nbytes : int
        Size of ``Volume.data``.
    memory_needed : int
        Peak bytes :func:`read_volume` allocates (data plus any temporary copy).
    file_size : int
    byte_order : str
        ``"little"``, ``"big"`` or ``"not applicable"`` (1-byte types).
    scaling : tuple of float or None
        ``(scl_slope, scl_inter)`` when NIfTI scaling is applied on read.
    stored_dtype : numpy.dtype or None
        Stored element type with its byte order.
    data_offset : int or None
        Byte offset of the voxel data (npy, NIfTI; uncompressed stream for .nii.gz).
    """

    path: str
    key: str | None
    format: str
    stored_shape: tuple
    engine_shape: tuple
    dtype: str
    source_ndim: int
    affine: np.ndarray
    zooms: tuple | None
    header: object | None
    attrs: dict
    read_dtype: str
    nbytes: int
    memory_needed: int
    file_size: int
    byte_order: str
    scaling: tuple | None = None
    stored_dtype: np.dtype | None = None
    data_offset: int | None = None
    entry: Entry | None = field(default=None, repr=False)


@dataclass
class Volume:
    """A volume in engine layout plus the metadata needed to write the result.

    Attributes
    ----------
    data : numpy.ndarray
        ``(N, C, D, H, W)``, C-contiguous, native byte order; dtype as stored
        except for scaled NIfTI images, which come back as float.
    affine : numpy.ndarray
        ``(4, 4)`` float64 voxel-to-world; identity for npy/npz/h5.
    source_ndim : int
        Rank as stored (3, 4 or 5).
    format : str
        ``"nifti"``, ``"hdf5"``, ``"npz"`` or ``"npy"``.
    path : str
    key : str or None
        Dataset path / npz member actually read.
    header : nibabel header or None
        Header of a NIfTI input (codes, units, 4th zoom), else ``None``.
    attrs : dict
        HDF5 attributes of the dataset read, else ``{}``.
    """

    data: np.ndarray
    affine: np.ndarray
    source_ndim: int
    format: str
    path: str
    key: str | None = None
    header: object | None = None
    attrs: dict = field(default_factory=dict)


@dataclass
class Weights:
    """A weight array, its optional bias and the layer options stored with it.

    Attributes
    ----------
    weight : numpy.ndarray
        As stored: ``(Cin, Cout/g, kD, kH, kW)`` or ``(g, Cin/g, Cout/g, kD, kH, kW)``.
    bias : numpy.ndarray or None
    options : dict
        Any of ``stride``, ``padding``, ``output_padding``, ``dilation``
        (int or list of 3 ints) and ``groups`` (int) found in the file.
    source : str
        ``"path:key"`` actually read (just the path for ``.npy``).
    bias_source : str or None
        Where the bias came from.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    options: dict
    source: str
    bias_source: str | None = None


@dataclass
class WeightsInfo:
    """Header-only view of a weights file (see :func:`convt3d_cli.io.inspect_weights`)."""

    shape: tuple
    dtype: str
    options: dict
    source: str


# --------------------------------------------------------------------------- specs

def split_spec(spec):
    """Split ``PATH[:KEY]`` into the path and the key.

    Parameters
    ----------
    spec : str or os.PathLike
        ``vol.h5:/scan/data``, ``x.npz:volume``, ``brain.nii.gz``, ...

    Returns
    -------
    path : str
    key : str or None
        ``None`` when no key is given, when the key is empty, or when the whole
        string names an existing file (so a file called ``a.npy:b`` still works).

    Notes
    -----
    The key starts after the first ``:`` that directly follows a supported
    suffix, so folders whose names contain ``:`` are fine.
    """
    spec = os.fspath(spec)
    if ":" not in spec or os.path.exists(spec):
        return spec, None
    match = _SPEC.match(spec)
    if match is None:
        return spec, None
    return match.group("path"), (match.group("key") or None)


def format_module(path):
    """Name of the module handling ``path`` (``"nifti"``, ``"hdf5"``, ...).

    Raises
    ------
    FileFormatError
        For an unsupported suffix, listing the supported ones.
    """
    lower = os.path.basename(os.fspath(path)).lower()
    for suffix, module in FORMAT_MODULES.items():
        if lower.endswith(suffix):
            return module
    raise FileFormatError(f"{path}: unsupported file type; supported suffixes are {', '.join(SUFFIXES)}")


def real_suffix(path):
    """The supported suffix ``path`` ends with (``.nii.gz`` counts as one), else its extension."""
    lower = os.path.basename(os.fspath(path)).lower()
    for suffix in FORMAT_MODULES:
        if lower.endswith(suffix):
            return os.fspath(path)[-len(suffix):]
    return os.path.splitext(os.fspath(path))[1]


def require_file(path):
    """Raise :class:`FileFormatError` unless ``path`` is an existing regular file."""
    if not os.path.exists(path):
        raise FileFormatError(f"no such file: {path}")
    if os.path.isdir(path):
        raise FileFormatError(f"{path} is a folder, not a file")


# --------------------------------------------------------------------------- safety

@contextmanager
def reading(path, label):
    """Turn whatever a library raises on a bad file into :class:`FileFormatError`.

    h5py, nibabel, zipfile, gzip and NumPy raise a zoo of types on corrupt or
    truncated input (OSError, EOFError, zlib.error, BadZipFile, HeaderDataError,
    ImageFileError, ValueError, KeyError, ...). None of them deserves a
    traceback, so everything except our own errors is wrapped; the original
    stays chained for ``--debug``.
    """
    try:
        yield
    except Convt3dError:
        raise
    except MemoryError as exc:
        raise MemoryLimitError(f"ran out of memory while reading {path}") from exc
    except Exception as exc:  # noqa: BLE001 - see docstring
        raise FileFormatError(f"cannot read {path} as {label}: {reason(exc)}") from exc


def reason(exc):
    """One-line description of an exception."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def is_numeric(dtype):
    """Integer, boolean or floating-point, without objects or fields."""
    dtype = np.dtype(dtype)
    return dtype.kind in "biuf" and not dtype.hasobject and dtype.fields is None


def check_numeric(dtype, where):
    """Refuse object (pickled), structured, complex and text arrays."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise FileFormatError(
            f"{where} holds Python objects (pickled data); convt3d never unpickles files "
            f"(allow_pickle=False)")
    if not is_numeric(dtype):
        raise FileFormatError(f"{where} has element type {dtype}; convt3d reads integer or "
                              f"floating-point arrays only")


def check_nonempty(shape, where):
    if any(int(n) < 1 for n in shape):
        raise ShapeError(f"{where} has an empty axis: shape {tuple(shape)}")


def check_payload(path, offset, nbytes, shape, dtype):
    """Refuse a file shorter than its header says, before anything is allocated."""
    size = os.path.getsize(path)
    if offset + nbytes > size:
        raise FileFormatError(
            f"{path} is truncated: its header declares {tuple(shape)} {dtype_name(dtype)} "
            f"({human_bytes(nbytes)} from byte {offset}) but the file has only {size} bytes")


def available_memory(meminfo="/proc/meminfo"):
    """``MemAvailable`` in bytes, or ``None`` where the kernel does not tell."""
    try:
        with open(meminfo, encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    fields = line.split()
                    return int(fields[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_memory(needed, path, max_bytes=None):
    """Refuse to read ``path`` when it needs more than the limit or the free memory.

    Raises
    ------
    MemoryLimitError
        Saying how much is needed and what is allowed.
    """
    if max_bytes is not None and needed > max_bytes:
        raise MemoryLimitError(
            f"reading {path} needs {human_bytes(needed)} but the memory limit is "
            f"{human_bytes(max_bytes)}")
    free = available_memory()
    if free is not None and needed > free:
        raise MemoryLimitError(
            f"reading {path} needs {human_bytes(needed)} but only {human_bytes(free)} of memory "
            f"is available")


def human_bytes(nbytes):
    """``1536`` -> ``"1.5 KiB"``."""
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def dtype_name(dtype):
    """``int16`` for ``>i2`` too; the byte order is reported separately."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.fields is None else str(dtype)


def byte_order(dtype):
    dtype = np.dtype(dtype)
    if dtype.byteorder == "|" or dtype.itemsize == 1:
        return "not applicable"
    if dtype.byteorder == "=":
        return "little" if np.little_endian else "big"
    return "little" if dtype.byteorder == "<" else "big"


def native(dtype):
    return np.dtype(dtype).newbyteorder("=")


# --------------------------------------------------------------------------- choosing arrays

@dataclass(frozen=True)
class Role:
    """What an array is picked for, and how a default is found without a key."""

    noun: str          # "volume", "weight", "bias"
    stem: str          # conventional name
    ranks: tuple       # ranks worth considering when a file holds several arrays
    skip_options_and_bias: bool = False

    def candidate(self, entry):
        if not entry.numeric or entry.ndim not in self.ranks:
            return False
        if self.skip_options_and_bias:
            base = basename(entry.name)
            if base in LAYER_OPTIONS or matches(entry.name, "bias"):
                return False
        return True


VOLUME = Role("volume", "volume", (3, 4, 5))
WEIGHT = Role("weight", "weight", (5, 6), skip_options_and_bias=True)
BIAS = Role("bias", "bias", (1, 5))


def bare(name):
    """Entry name without a leading ``/`` (HDF5 paths) and without ``.npy`` (npz members)."""
    name = name.lstrip("/")
    return name[:-4] if name.endswith(".npy") else name


def basename(name):
    return bare(name).rsplit("/", 1)[-1]


def matches(name, stem):
    """``weight``, ``conv.weight`` and ``/layer/weight`` all match stem ``weight``."""
    base = basename(name)
    return base == stem or base.endswith("." + stem)


def listing(entries, limit=20):
    """``a (3, 4, 5) float32, b (2,) int64`` -- what a file holds, for error messages."""
    if not entries:
        return "no arrays"
    labels = [entry.label() for entry in entries[:limit]]
    if len(entries) > limit:
        labels.append(f"... and {len(entries) - limit} more")
    return ", ".join(labels)


def find_entry(entries, key, path):
    """The entry named ``key``, else :class:`KeyNotFoundError` listing what is there."""
    wanted = bare(key)
    for entry in entries:
        if entry.name is not None and bare(entry.name) == wanted:
            return entry
    raise KeyNotFoundError(f"{path} has no array '{key}'; it holds: {listing(entries)}")


def by_name(candidates, stem):
    """The candidate called ``stem``, else the single one ending in ``.stem``/``/stem``, else None."""
    exact = [e for e in candidates if bare(e.name) == stem]
    if len(exact) == 1:
        return exact[0]
    tail = [e for e in candidates if matches(e.name, stem)]
    return tail[0] if len(tail) == 1 else None


def choose_entry(entries, key, role, path):
    """Pick the array to read (CONTRACT §3).

    With a key: that array. Without: the only array of the file; else, among
    the arrays that could serve ``role``, the only one, or the one with the
    conventional name (``volume``; ``weight`` or a single ``*.weight``).

    Raises
    ------
    KeyNotFoundError
        ``key`` is not in the file.
    FileFormatError
        No unambiguous default; the message lists what the file holds.
    """
    if key is not None:
        return find_entry(entries, key, path)
    if len(entries) == 1:
        return entries[0]
    candidates = [e for e in entries if role.candidate(e)]
    if len(candidates) == 1:
        return candidates[0]
    picked = by_name(candidates, role.stem)
    if picked is not None:
        return picked
    ranks = " or ".join(f"{r}-D" for r in role.ranks)
    if not candidates:
        raise FileFormatError(f"{path} holds no {ranks} numeric array to use as the {role.noun}; "
                              f"it holds: {listing(entries)}")
    raise FileFormatError(f"{path} holds several arrays and none is the obvious {role.noun} "
                          f"(named '{role.stem}'); choose one with {path}:KEY. "
                          f"It holds: {listing(entries)}")


def find_bias(entries, weight_name, path):
    """The bias stored beside a weight, or ``None`` when the file has none.

    A layer's weight (``conv.weight``, ``/layer/weight``) pairs with its
    sibling (``conv.bias``, ``/layer/bias``) or a plain ``bias``, never with
    another layer's bias. Any other weight takes ``bias`` or a single
    ``*.bias``; several unrelated biases are an error rather than a guess.
    """
    if weight_name is None:
        return None
    numeric = [e for e in entries if e.numeric and e.name != weight_name]
    name = bare(weight_name)
    if name.endswith("weight"):
        sibling = name[: -len("weight")] + "bias"
        for entry in numeric:
            if bare(entry.name) == sibling:
                return entry
        if name != "weight":
            plain = [e for e in numeric if bare(e.name) == "bias" and e.ndim in BIAS.ranks]
            return plain[0] if plain else None
    candidates = [e for e in numeric if e.ndim in BIAS.ranks]
    picked = by_name(candidates, "bias")
    if picked is not None:
        return picked
    if any(matches(e.name, "bias") for e in candidates):
        raise FileFormatError(
            f"{path} holds several biases and none belongs to '{weight_name}'; name one with "
            f"--bias PATH:KEY or use --no-bias. It holds: {listing(entries)}")
    return None


# --------------------------------------------------------------------------- layouts

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


def array_output(data, like):
    """Drop the leading axes of ``(N, C, D, H, W)`` according to CONTRACT §3.

    A one-channel 3-D input with one output channel gives ``(D, H, W)``; a 3-D
    input with several output channels gives ``(C, D, H, W)``; otherwise the
    input rank is kept. Without an input (``like is None``): 5-D unless N == 1,
    then 4-D, and 3-D if also C == 1. A batch (N > 1) always stays 5-D.
    """
    n, c = data.shape[:2]
    if like is None:
        rank = 5 if n > 1 else (3 if c == 1 else 4)
    else:
        rank = int(like.source_ndim)
        if rank == 3 and c > 1:
            rank = 4
    if n > 1:
        rank = 5
    return data.reshape(data.shape[5 - rank:]) if rank < 5 else data


def output_key(key, default, label):
    """Key for an output array; ``None`` means the format default."""
    if default is None and key is not None:
        raise OutputError(f"a {label} file holds a single array; remove ':{key}' from the output")
    return default if key is None else key


# --------------------------------------------------------------------------- options

def parse_options(raw, where):
    """Layer options found in a file -> ints or lists of 3 ints.

    Parameters
    ----------
    raw : dict
        Option name -> stored value (array, scalar or list).
    where : str
        File (and key) for error messages.

    Raises
    ------
    FileFormatError
        A value is not 1 or 3 integers (``groups``: 1 integer).
    """
    options = {}
    for name in LAYER_OPTIONS:
        if name not in raw:
            continue
        value = np.asarray(raw[name])
        sizes = (1,) if name == "groups" else (1, 3)
        ok = (value.ndim <= 1 and value.size in sizes and value.dtype.kind in "iuf"
              and np.all(np.isfinite(value)) and np.all(value == np.round(value)))
        if not ok:
            expected = "an integer" if name == "groups" else "1 or 3 integers"
            raise FileFormatError(f"{where}: stored option '{name}' must be {expected}, "
                                  f"got {value.tolist()!r}")
        ints = [int(v) for v in value.reshape(-1)]
        options[name] = ints[0] if len(ints) == 1 else ints
    return options


# --------------------------------------------------------------------------- JSON

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
