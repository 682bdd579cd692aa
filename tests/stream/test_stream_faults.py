"""Failures while streaming: a full disk, a missing or read-only folder, SIGINT, SIGTERM.

Every case must end with one ``Error:`` line, a non-zero exit, no output file
and no temporary file left beside it.
"""

import errno
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from convt3d_cli.io import hdf5, nifti, npy, npz

LINEAR = ("--kernel", "linear", "--stride", "2")


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("out") or ".convt3d" in p.name)


def _full_disk_after(calls):
    state = {"n": 0}

    def fail(*args, **kwargs):
        state["n"] += 1
        if state["n"] > calls:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return original(*args, **kwargs)

    return fail


original = None


@pytest.mark.parametrize("output,module,target", [
    ("out.nii", nifti, "pwrite_all"), ("out.npy", npy, "pwrite_all"),
    ("out.nii.gz", nifti, "NiftiWriter._deflate"), ("out.h5", hdf5, "Hdf5Writer._write"),
    ("out.npz", npz, "NpzWriter._write"),
])
def test_disk_full_midway(run, tiny_budget, monkeypatch, output, module, target):
    global original
    owner = module
    name = target
    if "." in target:
        owner_name, name = target.split(".")
        owner = getattr(module, owner_name)
    original = getattr(owner, name)
    # .nii.gz compresses once per 4 MiB and at the end: fail that first call.
    monkeypatch.setattr(owner, name, _full_disk_after(0 if output.endswith(".gz") else 2))
    result = run("run", "vol.npy", output, *LINEAR, "--max-memory", "12K", code=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert _leftovers(run.folder) == []


def test_missing_folder(run):
    result = run("run", "vol.npy", "nowhere/out.nii.gz", *LINEAR, code=1)
    assert "does not exist" in result.stderr
    assert not (run.folder / "nowhere").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_folder(run, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = run("run", "vol.npy", str(locked / "out.nii"), *LINEAR, code=1)
        assert "not writable" in result.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)


def test_unwritable_folder_simulated(run, monkeypatch):
    """The same refusal as root (which writes anywhere): the folder reports no write access."""
    real_access = os.access
    folder = str(run.folder)
    monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: False if (
        os.path.abspath(path) == folder and mode & os.W_OK) else real_access(path, mode, *a, **k))
    result = run("run", "vol.npy", "out.nii.gz", *LINEAR, code=1)
    assert "not writable" in result.stderr and "Traceback" not in result.stderr
    assert _leftovers(run.folder) == []


def test_permission_denied_creating_the_temporary(run, monkeypatch):
    """A folder that refuses the file itself (ACLs, read-only mounts): one clear line, nothing left."""
    from convt3d_cli.io import _atomic

    real_open = os.open

    def refuse_temporaries(path, *args, **kwargs):
        if _atomic.TEMP_MARK in os.fspath(path):
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", refuse_temporaries)
    result = run("run", "vol.npy", "out.h5", *LINEAR, code=1)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Permission denied" in errors[0], result.stderr
    assert _leftovers(run.folder) == []


# Tiny fixed allowances (many slabs) and 30 ms per slab, so that the signal surely lands
# mid-stream however loaded the machine is.
SCRIPT = ("import sys, time; from convt3d_cli import slabs; slabs.FIXED_BYTES = 0; "
          "from convt3d_cli.engine import PreparedLayer; PreparedLayer.scratch_bytes = lambda layer, window=None: 0; "
          "from convt3d_cli.io import streaming; slow = streaming.StreamWriter.write_slab; "
          "streaming.StreamWriter.write_slab = lambda *a: (time.sleep(0.03), slow(*a)); "
          "from convt3d_cli.cli import main; sys.argv[0] = 'convt3d'; main()")


@pytest.fixture(scope="module")
def medium(tmp_path_factory):
    folder = tmp_path_factory.mktemp("medium")
    np.save(folder / "big.npy", np.random.default_rng(1).normal(size=(96, 96, 96)).astype(np.float32))
    return folder


@pytest.mark.parametrize("sig,code,output", [
    (signal.SIGINT, 130, "out.nii.gz"), (signal.SIGTERM, 143, "out.h5"), (signal.SIGTERM, 143, "out.nii"),
])
def test_signal_while_streaming(medium, sig, code, output):
    for p in medium.iterdir():
        if p.name != "big.npy":
            p.unlink()
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, "run", "big.npy", output, *LINEAR,
                             "--max-memory", "1500K"], cwd=medium,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None and not any(".convt3d-" in p.name for p in medium.iterdir()):
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    time.sleep(0.3)  # well inside the slab loop (64 slabs, 2 s at least)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "was not written" in errors[0], err
    assert "Traceback" not in err
    assert sorted(p.name for p in medium.iterdir()) == ["big.npy"]
