"""Reading untrusted files safely: one error family, sizes checked before allocating.

Every format module reads through :func:`reading`, checks declared sizes
against the file (:func:`check_payload`) and the memory (:func:`check_memory`)
before it allocates, so a corrupt, truncated or hostile file ends in one
:class:`~convt3d_cli.errors.Convt3dError`, never a traceback.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

from ..errors import Convt3dError, FileFormatError, MemoryLimitError, ShapeError
from .dtypes import dtype_name


def require_file(path):
    """Raise :class:`FileFormatError` unless ``path`` is an existing regular file."""
    if not os.path.exists(path):
        raise FileFormatError(f"no such file: {path}")
    if os.path.isdir(path):
        raise FileFormatError(f"{path} is a folder, not a file")


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


def check_nonempty(shape, where):
    """Refuse a shape with an empty axis."""
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
