"""Element types: which ones convt3d reads, and how they are named in reports."""

from __future__ import annotations

import numpy as np

from ..errors import FileFormatError


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


def dtype_name(dtype):
    """``int16`` for ``>i2`` too; the byte order is reported separately."""
    dtype = np.dtype(dtype)
    return dtype.name if dtype.fields is None else str(dtype)


def byte_order(dtype):
    """``"little"``, ``"big"`` or ``"not applicable"`` (one-byte types)."""
    dtype = np.dtype(dtype)
    if dtype.byteorder == "|" or dtype.itemsize == 1:
        return "not applicable"
    if dtype.byteorder == "=":
        return "little" if np.little_endian else "big"
    return "little" if dtype.byteorder == "<" else "big"


def native(dtype):
    """The same type in this machine's byte order."""
    return np.dtype(dtype).newbyteorder("=")


#: ``--output-dtype`` choices besides ``same``: the float types and NumPy's integer names.
OUTPUT_DTYPES = ("float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64")


def output_dtype(name, read_dtype, compute_dtype):
    """The element type an output is stored in.

    Parameters
    ----------
    name : str or None
        ``--output-dtype``: a name of :data:`OUTPUT_DTYPES`, ``"same"`` (the
        input's type as read: a scaled NIfTI integer image reads as float) or
        ``None`` (the compute dtype).
    read_dtype, compute_dtype : numpy dtype

    Returns
    -------
    numpy.dtype
        Native byte order; booleans become ``uint8``, float16 becomes float32.
    """
    if name is None:
        return np.dtype(compute_dtype)
    if name == "same":
        dtype = native(read_dtype)
        if dtype.kind == "b":
            return np.dtype(np.uint8)
        if dtype.kind == "f" and dtype.itemsize < 4:
            return np.dtype(np.float32)
        return dtype
    if name not in OUTPUT_DTYPES:
        from ..errors import ParameterError

        raise ParameterError("output_dtype", f"output dtype must be same or one of {', '.join(OUTPUT_DTYPES)}, "
                                             f"got {name!r}")
    return np.dtype(name)


def cast_block(block, dtype):
    """``block`` (floating point) stored as ``dtype``, and how many values had to be clipped.

    Integers are rounded half to even and clipped to the type's range; NaN
    becomes 0 and counts as clipped. Float targets are a plain conversion.
    Elementwise, so any split into slabs gives the same bytes.
    """
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu":
        return block.astype(dtype, copy=False), 0
    info = np.iinfo(dtype)
    rounded = np.rint(block)
    # Both limits are powers of two, exact in any float type: compare against them
    # rather than against info.max, which float32/float64 may round up past the range.
    upper, lower = rounded.dtype.type(float(info.max) + 1.0), rounded.dtype.type(float(info.min))
    too_high, too_low, nan = rounded >= upper, rounded < lower, np.isnan(rounded)
    clipped = int(np.count_nonzero(too_high) + np.count_nonzero(too_low) + np.count_nonzero(nan))
    if not clipped:
        return rounded.astype(dtype), 0
    rounded[too_high | too_low | nan] = 0
    out = rounded.astype(dtype)
    out[too_high] = info.max
    out[too_low] = info.min
    return out, clipped
