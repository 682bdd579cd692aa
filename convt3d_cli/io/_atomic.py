"""The one way convt3d writes files: temporary file beside the target, then rename.

A reader never sees a half-written output, an existing file is replaced only
with ``overwrite=True``, and an interrupted write (exception, Ctrl-C, SIGTERM)
leaves neither output nor temporary file behind.

A process killed outright (SIGKILL, out-of-memory killer) cannot clean up: its
temporary file stays. To tell such a leftover from a file being written, the
writer holds an exclusive lock on its temporary file for as long as the write
lasts (Linux open file description lock, ``F_OFD_SETLK``); the kernel drops it
when the process ends, however it ends. :func:`remove_stale_temporaries`
removes the temporaries of a target whose lock it can take, i.e. whose writer
is gone.

Why this lock: ``flock`` would conflict with HDF5, which locks the files it
creates with ``flock`` (h5py fails with "unable to lock file"); classic ``fcntl``/``lockf``
locks belong to the process and vanish as soon as *any* descriptor of the file
is closed (h5py's, the final fsync's), and never conflict within one process.
Open file description locks have none of these problems and live in the
``fcntl`` lock space, which HDF5's ``flock`` does not touch on local file
systems. Where ``flock`` is emulated with byte-range locks (Linux NFS clients,
SMB, some cluster file systems) the two collide; the writer detects it (an
``flock`` probe fails against its own lock), drops its lock so that HDF5 can
write, and cleaners, seeing the same collision, remove nothing there. Where the
lock is unavailable (not Linux, kernels before 3.15, file systems without
locks) files are also written unlocked and nothing is ever removed: only a
lock taken proves a writer dead. Locks on network file systems are only seen
by other machines through the server's lock manager: on mounts without one
(NFS ``nolock``, ``local_lock=all``) a cleaner on another machine could take a
live remote writer's file for a leftover. Files left by versions that did not
lock are removed like those of dead writers, unless HDF5 has them open.
"""

from __future__ import annotations

import errno
import os
import secrets
import signal
import stat
import struct
import sys
import threading
from contextlib import contextmanager

try:
    import fcntl
except ImportError:  # pragma: no cover - not a POSIX system
    fcntl = None

from ..errors import OutputError
from .registry import real_suffix

TEMP_MARK = ".convt3d-"
#: Hex digits of the random token in a temporary name (``secrets.token_hex(8)``).
_TOKEN_DIGITS = 16
#: Whether open file description locks can be used at all (Linux 3.15+).
_OFD = fcntl is not None and sys.platform.startswith("linux") and hasattr(fcntl, "F_OFD_SETLK")


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
    token = secrets.token_hex(_TOKEN_DIGITS // 2)
    # Keep well under NAME_MAX (255) whatever the target's name.
    return os.path.join(folder, f".{_temp_stem(name)}{TEMP_MARK}{token}.tmp{real_suffix(name)}")


def _temp_stem(name):
    """The part of a target's name its temporary names keep (``.STEM.convt3d-TOKEN.tmpSUFFIX``)."""
    return name[:100]


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
        already exists (empty); writers may open it by name and truncate it, but
        must not replace it with another file: the lock that marks it as being
        written is on this file.

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

    From its creation until it is renamed or removed, the temporary file is
    locked (see the module's notes), so that :func:`remove_stale_temporaries`
    leaves it alone.
    """
    path = os.fspath(path)
    folder = check_target(path, overwrite)
    with _sigterm_raises() as fired:
        tmp, lock = None, None
        try:
            tmp, lock = _create_temp(path)
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
            if lock is not None:
                _discard(tmp)  # still locked: no cleaner can be removing it meanwhile
            raise
        finally:
            if lock is not None:
                os.close(lock)  # releases the lock, once the temporary name is gone
    _fsync(folder)


def _create_temp(path):
    """Create and lock a fresh temporary file for ``path``: ``(name, locked descriptor)``."""
    folder = os.path.dirname(os.path.abspath(path))
    for _ in range(100):
        tmp = temp_path(path)
        try:
            # O_EXCL: never reuse someone else's file; mode 0o666 lets the umask decide.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise OutputError(f"cannot write in {folder}: {exc.strerror or exc}") from exc
        try:
            claimed = _claim(fd, tmp)
        except BaseException:  # a signal in this instant: the file is not handed out, so it goes
            os.close(fd)
            _discard(tmp)
            raise
        if claimed:
            return tmp, fd
        # A cleaner took the file in the instant between its creation and our lock: it
        # removes it (it unlinks only while holding the lock). Start again with a new name.
        os.close(fd)
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


def _claim(fd, tmp):
    """Lock the just-created ``tmp`` (open as ``fd``) as being written; whether it is still ours.

    A cleaner may have locked and removed the file between its creation and this lock:
    the lock is only kept if it is taken and ``tmp`` still names the file of ``fd``
    afterwards. From then on no cleaner can take the lock, and so none removes the file.
    """
    if not _OFD:
        return True
    try:
        if not _ofd_lock(fd, fcntl.F_WRLCK):
            return False
    except OSError:
        return True  # no locks here: written unprotected, and no cleaner can remove it either
    try:
        ours = os.path.samestat(os.fstat(fd), os.lstat(tmp))
    except OSError:
        return False
    if ours and _flock_blocked(tmp):
        # flock is emulated with byte-range locks here (NFS, SMB, ...): HDF5, which flocks
        # the files it writes, would fail against our lock. Write unlocked, as without lock
        # support; cleaners see the same conflict and leave every file on such a system.
        try:
            _ofd_lock(fd, fcntl.F_UNLCK)
        except OSError:
            pass
    return ours


def _flock_blocked(path):
    """Whether a shared ``flock`` on a new descriptor of ``path`` is refused right now."""
    try:
        probe = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return False
    try:
        fcntl.flock(probe, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False  # no flock here: nothing to collide with
    finally:
        os.close(probe)
    return False


def _ofd_lock(fd, kind):
    """Lock the whole file of ``fd`` (``F_RDLCK``, ``F_WRLCK``; ``F_UNLCK`` unlocks) without waiting.

    Returns
    -------
    bool
        True if taken, False if another open file description holds a conflicting lock
        (in this process or another).

    Raises
    ------
    OSError
        The file system or kernel does not support the lock.
    """
    # struct flock: l_type, l_whence, l_start, l_len, l_pid (0 for OFD locks), with native
    # alignment; the extra zero bytes cover the trailing padding.
    request = struct.pack("hhqqi", kind, os.SEEK_SET, 0, 0, 0) + bytes(8)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def remove_stale_temporaries(*targets):
    """Remove the temporary files that killed writers left beside ``targets``.

    Parameters
    ----------
    *targets : str or os.PathLike
        Output files (not ``PATH:KEY`` specs).

    Returns
    -------
    list of str
        The temporary files removed.

    Notes
    -----
    Only names of the exact form :func:`temp_path` gives a target are considered
    (``.NAME.convt3d-TOKEN.tmpSUFFIX``, NAME cut at 100 characters, TOKEN 16
    lower-case hex digits), and only regular files. One is removed if its lock can be
    taken: no live process is writing it (files from versions without the lock are
    never locked), and if an exclusive ``flock`` can be taken too: HDF5 does not have it
    open. It is unlinked while the locks are held, after checking that the name still
    designates the locked file, so that neither a writer nor a second cleaner can lose
    a file to this one. Without lock support, or where ``flock`` is emulated with
    byte-range locks (see the module's notes), nothing is removed. Never raises for a
    file or folder that cannot be read or changed: such files are left.
    """
    removed = []
    if not _OFD:
        return removed
    wanted = {}  # folder -> {suffix: {stem}}
    for target in targets:
        try:
            folder, name = os.path.split(os.path.abspath(os.fspath(target)))
        except (TypeError, ValueError):
            continue
        wanted.setdefault(folder, {}).setdefault(real_suffix(name), set()).add(_temp_stem(name))
    for folder, by_suffix in wanted.items():
        try:
            names = os.listdir(folder)
        except (OSError, ValueError):
            continue
        for entry in names:
            if _is_temp_of(entry, by_suffix) and _remove_if_dead(os.path.join(folder, entry)):
                removed.append(os.path.join(folder, entry))
    return removed


def _is_temp_of(entry, by_suffix):
    """Whether ``entry`` is ``.STEM.convt3d-TOKEN.tmpSUFFIX`` for one of the wanted stems and suffixes."""
    if not entry.startswith("."):
        return False
    for suffix, stems in by_suffix.items():
        end = ".tmp" + suffix
        if not entry.endswith(end):
            continue
        head = entry[:len(entry) - len(end)]  # .STEM.convt3d-TOKEN
        token = head[len(head) - _TOKEN_DIGITS:]
        mark = head[len(head) - _TOKEN_DIGITS - len(TEMP_MARK):len(head) - _TOKEN_DIGITS]
        if (len(head) >= 1 + len(TEMP_MARK) + _TOKEN_DIGITS and mark == TEMP_MARK
                and all(c in "0123456789abcdef" for c in token)
                and head[1:len(head) - _TOKEN_DIGITS - len(TEMP_MARK)] in stems):
            return True
    return False


def _remove_if_dead(path):
    """Remove the temporary file ``path`` if no live writer holds its lock; whether it was removed."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    opened = []
    try:
        opened.append(os.open(path, flags))  # never through a symbolic link; never waits on a FIFO
        found = os.fstat(opened[0])
        if not stat.S_ISREG(found.st_mode) or not _ofd_lock(opened[0], fcntl.F_RDLCK):
            return False
        # Also an exclusive flock on a second descriptor. It is refused while HDF5 has the
        # file open (it flocks it, whichever convt3d version writes), and always where flock
        # is emulated with byte-range locks (it collides with our own lock above): there
        # writers cannot keep their lock, so nothing proves them dead.
        opened.append(os.open(path, flags))
        if not os.path.samestat(found, os.fstat(opened[1])):
            return False
        try:
            fcntl.flock(opened[1], fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass  # no flock here: HDF5 cannot hold one either
        # The name may have moved on meanwhile (the writer renamed it onto its target).
        if not os.path.samestat(found, os.lstat(path)):
            return False
        os.unlink(path)  # while holding the locks
        return True
    except OSError:
        return False
    finally:
        for fd in opened:
            os.close(fd)


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
