"""The one way convt3d writes files: temporary file beside the target, then rename.

A reader never sees a half-written output, an existing file is replaced only
with ``overwrite=True``, and an interrupted write (exception, Ctrl-C, SIGTERM)
leaves neither output nor temporary file behind.
"""

from __future__ import annotations

import os
import secrets
import signal
import sys
import threading
from contextlib import contextmanager

from ..errors import OutputError
from .registry import real_suffix

TEMP_MARK = ".convt3d-"


class Terminated(SystemExit):
    """Raised by the SIGTERM handler installed while writing.

    A :class:`SystemExit` so that cleanup code runs, nothing prints a
    traceback, and the process ends with the shell's status for SIGTERM (143).
    """


def same_file(a, b):
    """Whether two paths name the same file.

    Parameters
    ----------
    a, b : str or os.PathLike

    Returns
    -------
    bool
        ``os.path.samefile`` when both exist (hard links, symlinks, ``./x``),
        else a comparison of the resolved absolute paths.
    """
    a, b = os.fspath(a), os.fspath(b)
    if os.path.exists(a) and os.path.exists(b):
        try:
            return os.path.samefile(a, b)
        except OSError:
            pass
    return os.path.realpath(a) == os.path.realpath(b)


def temp_path(target):
    """A fresh hidden name beside ``target`` keeping its suffix (``.nii.gz`` counts as one)."""
    folder, name = os.path.split(os.path.abspath(target))
    token = secrets.token_hex(8)
    # Keep well under NAME_MAX (255) whatever the target's name.
    return os.path.join(folder, f".{name[:100]}{TEMP_MARK}{token}.tmp{real_suffix(name)}")


def check_target(path, overwrite=False):
    """Refuse a target that cannot be written; return its folder.

    Raises
    ------
    OutputError
        The folder is missing or not writable, the target is a folder, or it
        exists and ``overwrite`` is false.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise OutputError(f"cannot write {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise OutputError(f"cannot write {path}: it is a folder")
    if os.path.lexists(path) and not overwrite:
        raise OutputError(f"{path} exists; use --overwrite to replace it")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write {path}: the folder {folder} is not writable")
    return folder


@contextmanager
def atomic_write(path, overwrite=False):
    """Write ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Target file.
    overwrite : bool
        Replace an existing target; refused otherwise.

    Yields
    ------
    str
        Temporary path to write to (same folder, hidden name, same suffix). It
        already exists (empty); writers may truncate or replace it.

    Raises
    ------
    OutputError
        The target exists (without ``overwrite``) or is a folder, its folder is
        missing, or the folder cannot be written.

    Notes
    -----
    On success the temporary file is fsync'ed and renamed onto the target
    (without ``overwrite`` through a hard link, so a file created meanwhile is
    not clobbered). On any exception, KeyboardInterrupt included, it is removed
    and the exception re-raised. While the block runs in the main thread,
    SIGTERM raises :class:`Terminated` so that the same cleanup happens.
    """
    path = os.fspath(path)
    folder = check_target(path, overwrite)
    with _sigterm_raises() as fired:
        tmp, created = None, False
        try:
            tmp, created = _create_temp(path)
            yield tmp
            if fired:
                # The signal's exception was swallowed (raised inside a C callback, such as
                # LLVM's while Numba loads a kernel): the signal still ends the write.
                if fired[0] == signal.SIGINT:
                    raise KeyboardInterrupt
                raise Terminated(128 + fired[0])
            _fsync(tmp)
            _install(tmp, path, overwrite)
        except BaseException:
            if created:
                _discard(tmp)
            raise
    _fsync(folder)


def _create_temp(path):
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = temp_path(path)
        try:
            # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {folder}: {exc.strerror or exc}") from exc
        os.close(fd)
        return tmp, True
    raise OutputError(f"cannot create a temporary file in {folder}")


def _install(tmp, path, overwrite):
    """Move the finished temporary file onto the target."""
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        # link() fails if the target appeared since the check; replace() would clobber it.
        os.link(tmp, path)
    except FileExistsError:
        raise OutputError(f"{path} exists; use --overwrite to replace it") from None
    except OSError:
        # File systems without hard links (some FUSE/SMB mounts): check, then rename.
        if os.path.lexists(path):
            raise OutputError(f"{path} exists; use --overwrite to replace it") from None
        os.replace(tmp, path)
        return
    os.unlink(tmp)


def _fsync(path):
    """fsync a file, or a folder so that a rename in it is durable (best effort for folders)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        if os.path.isdir(path):
            return
        raise
    try:
        os.fsync(fd)
    except OSError:
        if not os.path.isdir(path):
            raise
    finally:
        os.close(fd)


def _discard(tmp):
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass


@contextmanager
def _sigterm_raises():
    """Make SIGTERM raise :class:`Terminated` for the duration (main thread only).

    Yields the list of signals seen, for a caller to check that none was lost: an exception
    raised in a C callback (ctypes) is only reported to ``sys.unraisablehook``, which here
    records a :class:`Terminated` or KeyboardInterrupt quietly instead of printing a
    traceback.
    """
    fired = []
    if threading.current_thread() is not threading.main_thread():
        yield fired  # signal handlers can only be set from the main thread
        return
    previous = signal.getsignal(signal.SIGTERM)
    if previous is None:
        yield fired  # installed outside Python: we could not put it back
        return
    previous_hook = sys.unraisablehook

    def unraisable(info):
        if isinstance(info.exc_value, Terminated):
            return  # already in ``fired``
        if isinstance(info.exc_value, KeyboardInterrupt):
            fired.append(signal.SIGINT)
            return
        previous_hook(info)

    def handler(signum, frame):
        if fired:
            return  # a second SIGTERM must not interrupt the cleanup of the first
        fired.append(signum)
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    sys.unraisablehook = unraisable
    try:
        yield fired
    finally:
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGTERM, previous)
