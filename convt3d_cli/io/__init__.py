"""Reading and writing volumes and weights: NIfTI, HDF5, npz and npy.

One module per format (``nifti``, ``hdf5``, ``npz``, ``npy``) owns everything
about it: probing and ``info``, whole reads, slab sources, the writer. The
suffix registry (:mod:`.registry`) is the only place that lists them; the
public functions (:mod:`.api`) find a file's format there and ask it. The output
format follows the output suffix whatever the input was.

========================  ===========================================================
module                    what it holds
========================  ===========================================================
``api``                   the public functions below
``registry``              suffix -> format module, ``PATH[:KEY]`` parsing
``base``                  the format interface; npy/npz/HDF5's shared logic
``streaming``             slab writer and slab source bases
``records``               ``Entry``, ``VolumeInfo``, ``Volume``, ``Weights``, ...
``entries``               choosing an array by key or by default, stored options
``safety``                one error for any bad file; size and memory checks
``dtypes``                which element types are read, and their names
``_atomic``, ``_gzip``    temporary-file-and-rename writes; ISA-L gzip
========================  ===========================================================

Files are addressed as ``PATH`` or ``PATH:KEY`` (``docs/behaviour.md``, *Files,
axes and keys*). Every problem with a file is raised as a
:class:`~convt3d_cli.errors.Convt3dError` subclass.

Importing this package loads neither NumPy nor any format: the public names
are fetched from :mod:`.api` and :mod:`.records` on first use, so the command
line can read the registry (``batch --format``) and still start instantly.
"""

from __future__ import annotations

import importlib

from .registry import SUFFIXES, split_spec

_LAZY = {
    "api": ("format_of", "output_format", "transposed_slabs", "probe_volume", "with_fourth_axis", "read_volume",
            "open_source", "resident_bytes", "describe", "inspect_weights", "probe_weights",
            "read_weights", "check_output", "open_writer", "write_volume", "blockwise", "open_block_writer",
            "output_chunks", "input_stamps", "partial_output"),
    "records": ("Volume", "VolumeInfo", "Weights", "WeightsInfo"),
    "_atomic": ("atomic_write", "same_file"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["SUFFIXES", "split_spec", *_WHERE]


def __getattr__(name):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
