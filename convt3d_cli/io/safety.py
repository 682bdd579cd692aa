"""Reading untrusted files safely: one error family, sizes checked before allocating.

Every format module reads through :func:`reading`, checks declared sizes
against the file (:func:`check_payload`) and the memory (:func:`check_memory`)
before it allocates, so a corrupt, truncated or hostile file ends in one
:class:`~convt3d_cli.errors.Convt3dError`, never a traceback.
"""

from __future__ import annotations

import math
import os
import stat
from contextlib import contextmanager

from ..errors import Convt3dError, FileFormatError, MemoryLimitError, ShapeError
from .dtypes import dtype_name

_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def path_mode(path, missing="no such file"):
    """``os.stat(path).st_mode`` (links followed), or a :class:`FileFormatError` saying ``missing: path``."""
    try:
        return os.stat(path).st_mode
    except FileNotFoundError:
        raise FileFormatError(f"{missing}: {path}") from None
    except OSError as exc:
        raise FileFormatError(f"cannot read {path}: {exc.strerror or exc}") from None


def require_file(path):
    """Raise :class:`FileFormatError` unless ``path`` is an existing regular file.

    Checked with ``stat`` before anything opens the file: opening a FIFO
    without a writer blocks forever, and a device such as ``/dev/zero`` (also
    behind a symbolic link named like a volume) never ends.
    """
    mode = path_mode(path)
    if stat.S_ISDIR(mode):
        raise FileFormatError(f"{path} is a folder, not a file")
    for test, kind in _KINDS:
        if test(mode):
            raise FileFormatError(f"{path} is {kind}, not a regular file; convt3d reads volumes and "
                                  f"weights from regular files only")
    if not stat.S_ISREG(mode):
        raise FileFormatError(f"{path} is not a regular file")


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


#: Limits at or above this are "no limit" (cgroup v1 reports one as about 2**63).
_NO_LIMIT = 1 << 60


def _read_text(path, limit=1 << 16):
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return handle.read(limit)
    except OSError:
        return None


def _meminfo_available(meminfo):
    text = _read_text(meminfo)
    for line in (text or "").splitlines():
        if line.startswith("MemAvailable:"):
            fields = line.split()
            try:
                return int(fields[1]) * 1024
            except (ValueError, IndexError):
                return None
    return None


def _stat_field(text, name):
    for line in (text or "").splitlines():
        fields = line.split()
        if len(fields) == 2 and fields[0] == name and fields[1].isdigit():
            return int(fields[1])
    return 0


def cgroup_available(root="/sys/fs/cgroup", self_cgroup="/proc/self/cgroup"):
    """Bytes this process's memory cgroup can still take before the kernel's OOM killer
    acts, or ``None`` without a limit (or a readable cgroup).

    Containers and batch schedulers (Slurm, Kubernetes) limit a job's memory with a cgroup
    while ``MemAvailable`` describes the whole machine. Used memory is counted as the
    kernel's usage less the inactive page cache, which it reclaims before killing
    (Kubernetes' "working set"). cgroup v2 (``memory.max``) and v1
    (``memory.limit_in_bytes``) are read at the process's own cgroup and each one above
    it (inside a cgroup namespace the process's is the root).
    """
    text = _read_text(self_cgroup)
    if text is None:
        return None
    folders = []
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":
            base, version = root, 2
        elif "memory" in parts[1].split(","):
            base, version = os.path.join(root, "memory"), 1
        else:
            continue
        # The process's own cgroup and every one above it: a parent's limit binds too.
        relative = [part for part in parts[2].strip().split("/") if part and part not in (".", "..")]
        folders += [(os.path.join(base, *relative[:depth]), version) for depth in range(len(relative), -1, -1)]
    names = {2: ("memory.max", "memory.current", "inactive_file"),
             1: ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")}
    found = []
    for folder, version in folders:
        limit_name, usage_name, inactive_name = names[version]
        limit = (_read_text(os.path.join(folder, limit_name)) or "").strip()
        if not limit.isdigit() or int(limit) >= _NO_LIMIT:
            continue
        usage = (_read_text(os.path.join(folder, usage_name)) or "").strip()
        usage = int(usage) if usage.isdigit() else 0
        inactive = _stat_field(_read_text(os.path.join(folder, "memory.stat")), inactive_name)
        found.append(max(0, int(limit) - max(0, usage - inactive)))
    return min(found) if found else None


def address_space_available(status="/proc/self/status"):
    """Bytes of address space left under ``ulimit -v`` (``RLIMIT_AS``), or ``None``
    without such a limit: an allocation beyond it fails however much memory is free."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not a POSIX system
        return None
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    size = _stat_field((_read_text(status) or "").replace("kB", "").replace(":", " "), "VmSize")
    return max(0, soft - size * 1024)


def available_memory(meminfo="/proc/meminfo", cgroup_root="/sys/fs/cgroup", self_cgroup="/proc/self/cgroup"):
    """Bytes of memory a new allocation can take: the least of ``MemAvailable``, what the
    process's memory cgroup allows (:func:`cgroup_available`) and the address space left
    under ``ulimit -v``; ``None`` where none of them is known."""
    known = [value for value in (_meminfo_available(meminfo), cgroup_available(cgroup_root, self_cgroup),
                                 address_space_available()) if value is not None]
    return min(known) if known else None


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
    """``1536`` -> ``"1.5 KiB"``; beyond 1024 EiB in powers of ten (``"6.6e+35 EiB"``).

    Exact for integers of any size (option values are unbounded Python ints).
    """
    if nbytes >= 1024 ** 7:
        exponent = math.log10(nbytes) - 6 * math.log10(1024)
        return f"{10 ** (exponent - math.floor(exponent)):.1f}e+{math.floor(exponent)} EiB"
    value = float(nbytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if value < 1024 or unit == "EiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def writable_bytes(folder):
    """Bytes this process may still write in ``folder``: free space, and the file-size limit.

    Returns
    -------
    int or None
        ``None`` where neither is known.
    """
    limits = []
    try:
        stats = os.statvfs(folder)
        limits.append(stats.f_bavail * stats.f_frsize)
    except (OSError, AttributeError):
        pass
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    except (ImportError, OSError, ValueError):
        pass
    return min(limits) if limits else None
