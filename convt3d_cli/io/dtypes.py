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
