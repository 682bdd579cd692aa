"""Temporary files of killed runs: removed by the next run or batch, a live writer's never.

A writer holds a lock on its temporary file while it writes; the kernel drops the lock
when the process dies, SIGKILL included. A cleaner removes only a temporary whose lock
it can take, and only names of the atomic writer's exact form.
"""

import errno
import os
import signal
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import invoke_in

from convt3d_cli.io import _atomic
from convt3d_cli.io._atomic import atomic_write, remove_stale_temporaries, temp_path

pytestmark = pytest.mark.skipif(not _atomic._OFD, reason="needs open file description locks (Linux)")

LAYER = ("--kernel", "nearest", "--stride", "2")

# Starts an atomic write of argv[1], prints the temporary name, then waits for a line on
# stdin before finishing the write with b"payload" (or is killed before).
WRITER = textwrap.dedent("""
    import sys
    from convt3d_cli.io._atomic import atomic_write
    with atomic_write(sys.argv[1]) as tmp:
        print(tmp, flush=True)
        sys.stdin.readline()
        with open(tmp, "wb") as handle:
            handle.write(b"payload")
""")


def _start_writer(target):
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tmp = proc.stdout.readline().strip()
    if not tmp:
        proc.kill()
        pytest.fail(proc.communicate()[1])
    return proc, tmp


def _stop(proc):
    if proc.poll() is None:
        proc.kill()
    proc.communicate()


def _killed_writer_leftover(target):
    """The temporary file a SIGKILLed writer of ``target`` left."""
    proc, tmp = _start_writer(target)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == -signal.SIGKILL
    assert os.path.exists(tmp)
    return tmp


def _volume(path):
    np.save(path, np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4))


def _run(folder, *args):
    return invoke_in(folder, *args)


def test_run_removes_the_leftover_of_a_killed_writer(tmp_path, listing):
    _volume(tmp_path / "in.npy")
    tmp = _killed_writer_leftover(tmp_path / "out.npy")
    result = _run(tmp_path, "run", "in.npy", "out.npy", *LAYER, "-q")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert not os.path.exists(tmp)
    assert listing(tmp_path) == ["in.npy", "out.npy"]
    assert np.load(tmp_path / "out.npy").shape == (4, 6, 8)


def test_a_live_writer_keeps_its_file(tmp_path):
    target = tmp_path / "out.nii.gz"
    proc, tmp = _start_writer(target)
    try:
        assert remove_stale_temporaries(target) == []
        assert os.path.exists(tmp)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.wait(timeout=30) == 0, proc.stderr.read()
    finally:
        _stop(proc)
    assert target.read_bytes() == b"payload"
    assert sorted(os.listdir(tmp_path)) == ["out.nii.gz"]


def test_a_writer_in_the_same_process_keeps_its_file(tmp_path, listing):
    target = tmp_path / "out.npy"
    with atomic_write(target) as tmp:
        assert remove_stale_temporaries(target) == []
        with open(tmp, "wb") as handle:  # reopening and closing the file keeps the lock
            handle.write(b"payload")
        assert remove_stale_temporaries(target) == []
        assert os.path.exists(tmp)
    assert target.read_bytes() == b"payload"
    assert listing(tmp_path) == ["out.npy"]


def test_hdf5_can_write_a_locked_temporary(tmp_path, listing):
    """HDF5 flocks the files it creates: the writer's lock must not be an flock."""
    h5py = pytest.importorskip("h5py")
    target = tmp_path / "out.h5"
    with atomic_write(target) as tmp:
        with h5py.File(tmp, "w") as handle:
            handle["volume"] = np.arange(4)
            assert remove_stale_temporaries(target) == []
        assert remove_stale_temporaries(target) == []  # h5py closing its descriptor keeps the lock
    with h5py.File(target, "r") as handle:
        assert handle["volume"][()].tolist() == [0, 1, 2, 3]
    assert listing(tmp_path) == ["out.h5"]


def test_an_unlocked_temporary_hdf5_has_open_is_left(tmp_path, listing):
    """A writer without the lock (an older version) is still seen while HDF5 has the file open."""
    h5py = pytest.importorskip("h5py")
    target = tmp_path / "out.h5"
    tmp = temp_path(target)
    with h5py.File(tmp, "w"):
        assert remove_stale_temporaries(target) == []
    assert remove_stale_temporaries(target) == [tmp]
    assert listing(tmp_path) == []


def test_only_the_exact_naming_pattern_is_removed(tmp_path, listing):
    target = tmp_path / "a.nii.gz"
    stale = temp_path(target)
    open(stale, "wb").close()  # never locked: as left by a dead writer (or an older version)
    lookalikes = [
        ".a.nii.gz.convt3d-0123.tmp.nii.gz",                # short token
        ".a.nii.gz.convt3d-0123456789ABCDEF.tmp.nii.gz",    # upper-case token
        ".a.nii.gz.convt3d-0123456789abcdefg.tmp.nii.gz",   # long token
        "a.nii.gz.convt3d-0123456789abcdef.tmp.nii.gz",     # not hidden
        ".a.nii.gz.convt3d-0123456789abcdef.tmp.nii",       # another suffix
        ".a.nii.gz.convt3d-0123456789abcdef.tmp.nii.gz~",   # a backup of one
        ".b.nii.gz.convt3d-0123456789abcdef.tmp.nii.gz",    # another target's
        ".xa.nii.gz.convt3d-0123456789abcdef.tmp.nii.gz",   # another target's
        "a.nii.gz",
    ]
    for name in lookalikes:
        (tmp_path / name).write_bytes(b"keep")
    (tmp_path / ".a.nii.gz.convt3d-00000000000000aa.tmp.nii.gz").mkdir()
    os.symlink(tmp_path / "a.nii.gz", tmp_path / ".a.nii.gz.convt3d-00000000000000bb.tmp.nii.gz")
    before = listing(tmp_path)

    assert remove_stale_temporaries(target) == [stale]
    assert listing(tmp_path) == [name for name in before if name != os.path.basename(stale)]
    assert all((tmp_path / name).read_bytes() == b"keep" for name in lookalikes)


def test_long_names_and_missing_folders(tmp_path, listing):
    target = tmp_path / ("x" * 150 + ".npy")
    stale = temp_path(target)
    open(stale, "wb").close()
    assert remove_stale_temporaries(target) == [stale]
    assert listing(tmp_path) == []
    assert remove_stale_temporaries(tmp_path / "missing" / "out.npy") == []


def test_a_cleaner_in_the_creation_window_makes_the_writer_start_again(tmp_path):
    """Between O_EXCL and the lock a cleaner may take the new file: the writer must notice."""
    tmp = temp_path(tmp_path / "out.npy")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    cleaner = os.open(tmp, os.O_RDONLY)
    try:
        assert _atomic._ofd_lock(cleaner, _atomic.fcntl.F_RDLCK)
        assert not _atomic._claim(fd, tmp)       # the cleaner holds the lock: not ours
        os.unlink(tmp)                           # what the cleaner does while holding it
        os.close(cleaner)
        cleaner = None
        assert not _atomic._claim(fd, tmp)       # locked now, but the name is gone
    finally:
        os.close(fd)
        if cleaner is not None:
            os.close(cleaner)


def test_writers_racing_cleaners_never_lose_a_file(tmp_path, listing):
    target = tmp_path / "out.npy"
    done, errors = threading.Event(), []

    def clean():
        while not done.is_set():
            remove_stale_temporaries(target)

    cleaners = [threading.Thread(target=clean) for _ in range(2)]
    for thread in cleaners:
        thread.start()
    try:
        for i in range(100):
            try:
                with atomic_write(target, overwrite=True) as tmp:
                    with open(tmp, "wb") as handle:
                        handle.write(b"%d" % i)
            except Exception as err:  # noqa: BLE001 - collected for the assertion
                errors.append(err)
    finally:
        done.set()
        for thread in cleaners:
            thread.join()
    assert errors == []
    assert target.read_bytes() == b"99"
    assert listing(tmp_path) == ["out.npy"]


def test_a_claimed_temporary_cannot_be_taken(tmp_path):
    tmp = temp_path(tmp_path / "out.npy")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        assert _atomic._claim(fd, tmp)
        assert not _atomic._remove_if_dead(tmp)
        assert os.path.exists(tmp)
    finally:
        os.close(fd)
    assert _atomic._remove_if_dead(tmp)
    assert not os.path.exists(tmp)


def test_where_flock_collides_with_the_lock_nothing_is_locked_or_removed(tmp_path, monkeypatch, listing):
    """NFS and SMB clients emulate flock with byte-range locks: HDF5's flock would fail
    against the writer's lock, so the writer drops it, and cleaners remove nothing."""
    def emulated(fd, operation):
        raise BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable")

    monkeypatch.setattr(_atomic.fcntl, "flock", emulated)
    target = tmp_path / "out.npy"
    stale = temp_path(target)
    open(stale, "wb").close()
    with atomic_write(target) as tmp:
        other = os.open(tmp, os.O_RDWR)
        try:
            assert _atomic._ofd_lock(other, _atomic.fcntl.F_WRLCK)  # the writer holds no lock
            _atomic._ofd_lock(other, _atomic.fcntl.F_UNLCK)
        finally:
            os.close(other)
        assert remove_stale_temporaries(target) == []
    assert listing(tmp_path) == sorted([os.path.basename(stale), "out.npy"])


def test_batch_removes_its_outputs_stale_temporaries(tmp_path, listing):
    for name in ("a.npy", "b.npy"):
        _volume(tmp_path / name)
    out = tmp_path / "out"
    out.mkdir()
    stale = [_killed_writer_leftover(out / "a.npy"), temp_path(out / "b.npy")]
    open(stale[1], "wb").close()
    other = out / ".c.npy.convt3d-0123456789abcdef.tmp.npy"  # not an output of this batch
    other.write_bytes(b"keep")
    result = _run(tmp_path, "batch", "a.npy", "b.npy", "--out-dir", "out", *LAYER)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert listing(out) == [other.name, "a.npy", "b.npy"]
