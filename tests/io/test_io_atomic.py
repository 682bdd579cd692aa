"""The atomic writer: no partial outputs, no leftovers, no clobbering."""

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import OutputError
from convt3d_cli.io._atomic import Terminated, atomic_write, same_file
from convt3d_cli.io.nifti import NiftiWriter
from convt3d_cli.io.npy import NpyWriter


def test_writes_and_renames(tmp_path, listing):
    target = tmp_path / "out.nii.gz"
    with atomic_write(str(target)) as tmp:
        folder, name = os.path.split(tmp)
        assert folder == str(tmp_path)
        assert name.startswith(".out.nii.gz.convt3d-") and name.endswith(".tmp.nii.gz")
        assert os.path.exists(tmp) and not target.exists()
        with open(tmp, "wb") as handle:
            handle.write(b"payload")
    assert target.read_bytes() == b"payload"
    assert listing(tmp_path) == ["out.nii.gz"]


def test_existing_target_is_refused(tmp_path, listing):
    target = tmp_path / "out.npy"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="exists; use --overwrite"):
        with atomic_write(str(target)) as tmp:
            pytest.fail(f"entered the block with {tmp}")
    assert target.read_bytes() == b"precious"
    assert listing(tmp_path) == ["out.npy"]


def test_overwrite_replaces(tmp_path, listing):
    target = tmp_path / "out.npy"
    target.write_bytes(b"old")
    with atomic_write(str(target), overwrite=True) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(b"new")
        assert target.read_bytes() == b"old"  # untouched until the end
    assert target.read_bytes() == b"new"
    assert listing(tmp_path) == ["out.npy"]


def test_target_appearing_meanwhile_is_not_clobbered(tmp_path, listing):
    target = tmp_path / "out.npy"
    with pytest.raises(OutputError, match="exists"):
        with atomic_write(str(target)) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"mine")
            target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert listing(tmp_path) == ["out.npy"]


def test_missing_folder(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        with atomic_write(str(tmp_path / "nope" / "out.npy")):
            pass


def test_target_is_a_folder(tmp_path):
    (tmp_path / "out.h5").mkdir()
    with pytest.raises(OutputError, match="folder"):
        with atomic_write(str(tmp_path / "out.h5"), overwrite=True):
            pass


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_exception_removes_the_temporary(tmp_path, listing, exc):
    with pytest.raises(type(exc)):
        with atomic_write(str(tmp_path / "out.npy")) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"half")
            raise exc
    assert listing(tmp_path) == []


def test_failing_array_writer_leaves_nothing(tmp_path, listing, monkeypatch, identity_params):
    np.save(tmp_path / "in.npy", np.ones((2, 2, 2), np.float32))
    volume = io.read_volume(str(tmp_path / "in.npy"))

    def broken(self, start, stop, block):
        with open(self.tmp, "wb") as handle:
            handle.write(b"\x93NUMPY partial")
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(NpyWriter, "_write", broken)
    with pytest.raises(RuntimeError, match="disk on fire"):
        io.write_volume(str(tmp_path / "out.npy"), volume.data, like=volume,
                        params=identity_params, formula=[])
    assert listing(tmp_path) == ["in.npy"]


def test_failing_nifti_writer_leaves_nothing(tmp_path, listing, monkeypatch, identity_params):
    def broken(self, data):
        self.file.write(b"\x1f\x8b partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(NiftiWriter, "_deflate", broken)
    with pytest.raises(OutputError, match="No space left on device") as err:
        io.write_volume(str(tmp_path / "out.nii.gz"), np.zeros((1, 1, 2, 2, 2)), like=None,
                        params=identity_params, formula=[])
    assert "out.nii.gz" in str(err.value)
    assert listing(tmp_path) == []


def test_failing_existing_output_is_kept(tmp_path, monkeypatch, identity_params):
    """--overwrite with a failing writer must leave the old output intact."""
    target = tmp_path / "out.npy"
    np.save(target, np.arange(3))
    before = target.read_bytes()

    def broken(self, start, stop, block):
        raise RuntimeError("boom")

    monkeypatch.setattr(NpyWriter, "_write", broken)
    with pytest.raises(RuntimeError):
        io.write_volume(str(target), np.zeros((1, 1, 2, 2, 2)), like=None, params=identity_params,
                        formula=[], overwrite=True)
    assert target.read_bytes() == before


def test_sigterm_while_writing_leaves_nothing(tmp_path, listing):
    script = textwrap.dedent("""
        import sys, time
        from convt3d_cli.io._atomic import atomic_write
        with atomic_write(sys.argv[1]) as tmp:
            with open(tmp, "wb") as handle:
                handle.write(b"x" * 100000)
            print(tmp, flush=True)
            time.sleep(60)
    """)
    target = tmp_path / "out.nii.gz"
    proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        tmp = proc.stdout.readline().strip()
        assert tmp and os.path.exists(tmp), proc.stderr.read()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in proc.stderr.read()
    assert listing(tmp_path) == []


def test_sigterm_handler_is_restored(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with atomic_write(str(tmp_path / "a.npy")):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(RuntimeError):
        with atomic_write(str(tmp_path / "b.npy")):
            raise RuntimeError
    assert signal.getsignal(signal.SIGTERM) is before


def test_sigterm_raises_terminated_in_process(tmp_path, listing):
    with pytest.raises(Terminated) as err:
        with atomic_write(str(tmp_path / "a.npy")):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler interrupts this
    assert err.value.code == 128 + signal.SIGTERM
    assert listing(tmp_path) == []


@pytest.mark.parametrize("sig,expected", [(signal.SIGTERM, Terminated), (signal.SIGINT, KeyboardInterrupt)])
def test_signal_raised_in_a_c_callback_stops_the_write_quietly(tmp_path, listing, capfd, sig, expected):
    """A signal landing while Python runs a ctypes callback: its exception cannot leave the
    callback, so Python reports it as unraisable (a traceback on stderr) and goes on."""
    import ctypes

    def callback():
        os.kill(os.getpid(), sig)
        time.sleep(5)  # the handler interrupts this

    with pytest.raises(expected):
        with atomic_write(str(tmp_path / "a.npy")) as tmp:
            ctypes.CFUNCTYPE(None)(callback)()
            with open(tmp, "wb") as handle:
                handle.write(b"finished anyway")
    assert listing(tmp_path) == []
    assert "Traceback" not in capfd.readouterr().err


def test_works_outside_the_main_thread(tmp_path):
    errors = []

    def work():
        try:
            with atomic_write(str(tmp_path / "t.npy")) as tmp:
                with open(tmp, "wb") as handle:
                    handle.write(b"ok")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert errors == []
    assert (tmp_path / "t.npy").read_bytes() == b"ok"


def test_output_mode_follows_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_write(str(tmp_path / "m.npy")) as tmp:
            open(tmp, "wb").close()
    finally:
        os.umask(old)
    assert (os.stat(tmp_path / "m.npy").st_mode & 0o777) == 0o644


def test_unwritable_folder(tmp_path, monkeypatch, listing):
    from convt3d_cli.io import _atomic

    real_open = os.open

    def refuse_create(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(_atomic.os, "open", refuse_create)
    with pytest.raises(OutputError, match="cannot write in .*Permission denied"):
        with atomic_write(str(tmp_path / "x.npy")):
            pytest.fail("entered the block")
    monkeypatch.undo()
    assert listing(tmp_path) == []


def test_same_file(tmp_path):
    a = tmp_path / "a.npy"
    a.write_bytes(b"x")
    (tmp_path / "link.npy").symlink_to(a)
    os.link(a, tmp_path / "hard.npy")
    assert same_file(str(a), str(tmp_path / "." / "a.npy"))
    assert same_file(str(a), str(tmp_path / "link.npy"))
    assert same_file(str(a), str(tmp_path / "hard.npy"))
    assert not same_file(str(a), str(tmp_path / "b.npy"))
    assert same_file(str(tmp_path / "new.npy"), str(tmp_path / "sub" / ".." / "new.npy"))
    assert not same_file(str(tmp_path / "new.npy"), str(tmp_path / "other.npy"))
