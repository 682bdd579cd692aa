"""BIDS sidecars: ``IN.json`` beside a NIfTI input becomes ``OUT.json`` beside the output.

The output's sidecar holds the input's fields, ``Sources`` (the input, relative to
the output's folder) and what convt3d did (``Description`` and ``ConvTranspose3d``).
``SliceTiming`` is dropped when the slice axis is resampled, by the same rule as the
NIfTI header's slice fields. It is written atomically, after the volume, under the
same ``--overwrite`` rules, and checked before anything is computed.
"""

from __future__ import annotations

import json
import os

from .errors import FileFormatError
from .io.registry import split_name, split_spec

# A sidecar is a few KB of JSON; anything far larger is not one.
MAX_SIDECAR_BYTES = 16 << 20
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def input_sidecar(spec):
    """``IN.json`` beside a ``.nii``/``.nii.gz`` input, or ``None`` when there is none."""
    path = split_spec(spec)[0]
    stem, suffix = split_name(path)
    if suffix.lower() not in _NIFTI_SUFFIXES:
        return None
    candidate = stem + ".json"
    return candidate if os.path.isfile(candidate) else None


def output_sidecar(spec):
    """``OUT.json`` beside the output (its stem, whatever the volume format)."""
    return split_name(split_spec(spec)[0])[0] + ".json"


def read_sidecar(path):
    """The JSON object of a sidecar.

    Raises
    ------
    FileFormatError
        Not a regular file, too large, not UTF-8 JSON, or not an object.
    """
    from .io.safety import require_file

    require_file(path)
    if os.path.getsize(path) > MAX_SIDECAR_BYTES:
        raise FileFormatError(f"{path} is larger than {MAX_SIDECAR_BYTES >> 20} MiB; it is not a BIDS sidecar "
                              f"(use --no-sidecar to ignore it)")
    try:
        with open(path, encoding="utf-8") as handle:
            fields = json.load(handle)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise FileFormatError(f"cannot read the sidecar {path}: {' '.join(str(exc).split())} "
                              f"(use --no-sidecar to ignore it)") from exc
    if not isinstance(fields, dict):
        raise FileFormatError(f"the sidecar {path} is not a JSON object (use --no-sidecar to ignore it)")
    try:
        # What the output's sidecar will hold must be writable as UTF-8 JSON: a "\ud800"
        # escape parses to a lone surrogate, which UTF-8 cannot encode. Found now, before any work.
        json.dumps(fields, indent=2, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # UnicodeEncodeError is a ValueError
        raise FileFormatError(f"the sidecar {path} cannot be carried over: {' '.join(str(exc).split())} "
                              f"(use --no-sidecar to ignore it)") from exc
    return fields


def build_sidecar(fields, *, input_spec, output_spec, params, layer, slice_axis_resampled):
    """The output's sidecar fields.

    Parameters
    ----------
    fields : dict
        The input's sidecar.
    input_spec, output_spec : str
    params : geometry.LayerParams
    layer : str
        The layer's source: ``built-in linear`` or the weights file.
    slice_axis_resampled : bool
        Whether ``SliceTiming`` no longer describes the output's slices.
    """
    from . import __version__

    out = dict(fields)
    if slice_axis_resampled:
        out.pop("SliceTiming", None)
    folder = os.path.dirname(os.path.abspath(split_spec(output_spec)[0]))
    source = os.path.relpath(os.path.abspath(split_spec(input_spec)[0]), folder)
    out["Sources"] = [source]
    out["Description"] = (f"Upsampled by convt3d {__version__} with a transposed convolution "
                          f"({params.short().removeprefix('convt3d ')}; {layer})")
    out["ConvTranspose3d"] = dict(params.as_dict(), layer=layer)
    return out


def slice_axis_resampled(header, params):
    """Whether the input's slice axis (from a NIfTI ``dim_info``; any axis when unknown) changes grid."""
    from .geometry import keeps_grid

    get_dim_info = getattr(header, "get_dim_info", None)
    slice_dim = get_dim_info()[2] if get_dim_info is not None else None
    axes = [slice_dim] if slice_dim is not None else [0, 1, 2]
    return not all(keeps_grid(params, axis) for axis in axes)


def write_sidecar(path, fields, overwrite):
    """Write ``fields`` to ``path`` atomically (temporary file, rename)."""
    from .io._atomic import atomic_write

    with atomic_write(path, overwrite=overwrite) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        json.dump(fields, handle, indent=2, ensure_ascii=False)
        handle.write("\n")
