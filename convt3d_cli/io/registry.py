"""The suffix registry: the one place that knows which formats exist.

Each suffix maps to the module under :mod:`convt3d_cli.io` that handles it;
that module's ``FORMAT`` object owns everything about the format (probing,
reading, slab sources, writers, ``info``). Modules are imported on first use,
and this module imports only the standard library, so the command line can
list the formats (``batch --format``) without loading NumPy.

Files are addressed as ``PATH`` or ``PATH:KEY`` (see ``docs/behaviour.md``,
*Files, axes and keys*).
"""

from __future__ import annotations

import importlib
import os
import re

from ..errors import FileFormatError, OutputError

# Suffix -> module of the format. Longest suffixes first, so that ``.nii.gz``
# wins over ``.nii``-like prefixes of other names.
_MODULES = {
    ".nii.gz": "nifti",
    ".nii": "nifti",
    ".hdf5": "hdf5",
    ".h5": "hdf5",
    ".npz": "npz",
    ".npy": "npy",
    ".mgz": "mgh",
    ".mgh": "mgh",
    ".ome.zarr": "omezarr",
    ".zarr": "omezarr",
    ".safetensors": "safetensors",
    ".keras": "keras",
    ".onnx": "onnx",
    ".ckpt": "pytorch",
    ".pth": "pytorch",
    ".pt": "pytorch",
}
SUFFIXES = tuple(_MODULES)
#: ``--compressor`` of Zarr outputs (the first is the default); here so the command line
#: can list them without loading the Zarr module.
ZARR_COMPRESSORS = ("blosc-zstd", "blosc-lz4", "zstd", "gzip", "none")
# Formats that hold trained layers only: read by --weights, never written.
_WEIGHTS_ONLY = frozenset({"pytorch", "safetensors", "onnx", "keras"})
VOLUME_SUFFIXES = tuple(s for s, m in _MODULES.items() if m not in _WEIGHTS_ONLY)

_SPEC = re.compile(
    r"^(?P<path>.+?(?:" + "|".join(re.escape(s) for s in SUFFIXES) + r")):(?P<key>.*)$",
    re.IGNORECASE | re.DOTALL)


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
        string names an existing file (so a file called ``weird.npy:odd.npy`` still works).

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


def split_name(name):
    """``("sub01", ".nii.gz")``: a supported suffix counts as one, else the last extension.

    A name that is only a suffix (``.npy``) has no supported suffix: it is a hidden
    file without extension, as :func:`os.path.splitext` sees it.
    """
    name = os.fspath(name)
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], name[-len(suffix):]
    return os.path.splitext(name)


def real_suffix(path):
    """The supported suffix ``path`` ends with (``.nii.gz`` counts as one), else its extension."""
    return split_name(os.path.basename(os.fspath(path)))[1]


def format_module(path):
    """Name of the module handling ``path`` (``"nifti"``, ``"hdf5"``, ...).

    Raises
    ------
    FileFormatError
        For an unsupported suffix, listing the supported ones.
    """
    lower = os.path.basename(os.fspath(path)).lower()
    for suffix, module in _MODULES.items():
        if lower.endswith(suffix):
            return module
    raise FileFormatError(f"{path}: unsupported file type; supported suffixes are {', '.join(SUFFIXES)}")


def format_for(path):
    """The format object (a module's ``FORMAT``) for ``path``, importing its module on first use.

    Raises
    ------
    FileFormatError
        For an unsupported suffix.
    """
    return importlib.import_module(f"{__package__}.{format_module(path)}").FORMAT


def output_format_for(path):
    """:func:`format_for` for an output path: an unsupported suffix is an :class:`OutputError`."""
    try:
        module = format_module(path)
    except FileFormatError:
        module = None
    if module is None or module in _WEIGHTS_ONLY:
        raise OutputError(f"cannot write {path}: unsupported output type; supported suffixes "
                          f"are {', '.join(VOLUME_SUFFIXES)}")
    return format_for(path)


def output_choices():
    """Output formats by name, the suffix without its dot: ``nii``, ``nii.gz``, ``h5``, ...

    Returns
    -------
    dict
        Name -> suffix, in the registry's order (``--format`` of ``convt3d batch``).
    """
    return {suffix[1:]: suffix for suffix in sorted(VOLUME_SUFFIXES, key=lambda s: (_order(s), s))}


def _order(suffix):
    """Registry position of a suffix's format, so that choices group by format."""
    return list(dict.fromkeys(_MODULES.values())).index(_MODULES[suffix])
