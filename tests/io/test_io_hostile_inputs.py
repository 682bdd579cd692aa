"""Odd and hostile inputs end in one clear line: no hang, no traceback, no huge allocation.

Files that are not regular files, NIfTI headers that cannot place the voxels,
codes nobody knows, header repairs and overflowing scalings, and layer settings
whose output could never fit.
"""

import gzip
import json
import os
import struct
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
from helpers import invoke_in

from convt3d_cli import conv_transpose3d, io
from convt3d_cli.errors import FileFormatError, ParameterError

NEAREST = ("--kernel", "nearest", "--stride", "2")

# NIfTI-1 header offsets (bytes) of the fields mutated below.
PIXDIM_X, INTENT_CODE, XYZT_UNITS, SCL_SLOPE = 80, 68, 123, 112
QFORM_CODE, SFORM_CODE, QUATERN_B, QOFFSET_X, SROW_X = 252, 254, 256, 268, 280


def _nifti(path, *fields):
    """A small int16 NIfTI with both forms coded, then ``(offset, struct format, value)`` patched in."""
    image = nib.Nifti1Image(np.arange(60, dtype=np.int16).reshape(3, 4, 5), np.diag([2.0, 2.0, 2.0, 1.0]))
    image.header.set_sform(image.affine, code=1)
    image.header.set_qform(image.affine, code=1)
    nib.save(image, path)
    raw = bytearray(path.read_bytes())
    for offset, fmt, value in fields:
        struct.pack_into(fmt, raw, offset, value)
    path.write_bytes(bytes(raw))
    return path


def _run(folder, *args):
    return invoke_in(folder, *args)


def _one_error(result, code, match):
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- path kinds

@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
@pytest.mark.parametrize("role", ["input", "weights"])
def test_fifo_is_refused_without_hanging(tmp_path, role):
    fifo = tmp_path / ("in.nii" if role == "input" else "w.npz")
    os.mkfifo(fifo)
    np.save(tmp_path / "vol.npy", np.zeros((4, 4, 4), np.float32))
    args = ["run", "in.nii", "out.npy", *NEAREST] if role == "input" else \
        ["run", "vol.npy", "out.npy", "--weights", "w.npz"]
    # The timeout turns a hang into a failure.
    proc = subprocess.run([sys.executable, "-m", "convt3d_cli", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr
    assert "named pipe (FIFO)" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out.npy").exists()


def test_devices_and_links_to_devices_are_refused(tmp_path):
    (tmp_path / "zero.npz").symlink_to("/dev/zero")
    with pytest.raises(FileFormatError, match="character device"):
        io.read_weights(str(tmp_path / "zero.npz"))
    with pytest.raises(FileFormatError, match="character device"):
        io.probe_volume("/dev/null")
    (tmp_path / "dangling.npy").symlink_to(tmp_path / "nowhere.npy")
    with pytest.raises(FileFormatError, match="no such file"):
        io.probe_volume(str(tmp_path / "dangling.npy"))


# --------------------------------------------------------------------------- NIfTI headers

@pytest.mark.parametrize("name,fields,match", [
    ("nan-pixdim", [(PIXDIM_X, "<f", float("nan")), (QFORM_CODE, "<h", 0), (SFORM_CODE, "<h", 0)],
     "non-finite voxel sizes"),
    ("inf-pixdim", [(PIXDIM_X, "<f", float("inf")), (QFORM_CODE, "<h", 0), (SFORM_CODE, "<h", 0)],
     "non-finite voxel sizes"),
    ("nan-quaternion", [(QUATERN_B, "<f", float("nan")), (SFORM_CODE, "<h", 0)], "non-finite qform"),
    ("nan-qoffset", [(QOFFSET_X, "<f", float("nan")), (SFORM_CODE, "<h", 0)], "non-finite qform"),
    ("zero-sform", [(SROW_X + 4 * i, "<f", 0.0) for i in range(12)], "singular sform"),
    ("nan-sform", [(SROW_X, "<f", float("nan"))], "non-finite sform"),
    ("long-quaternion", [(QUATERN_B, "<f", 2.0)], "qform nibabel cannot decode"),
    ("tiny-sform", [(SROW_X + 32 + 8, "<f", 1e-45)], "nearly singular sform"),
])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_headers_that_cannot_place_the_grid_are_refused(tmp_path, name, fields, match, suffix):
    path = tmp_path / f"{name}{suffix}"
    if suffix == ".nii.gz":
        path.write_bytes(gzip.compress(_nifti(tmp_path / f"{name}.nii", *fields).read_bytes()))
    else:
        _nifti(path, *fields)
    before = path.read_bytes()
    _one_error(_run(tmp_path, "run", path.name, "out.nii", *NEAREST, "-q"), 1, match)
    assert not (tmp_path / "out.nii").exists() and path.read_bytes() == before
    # info still describes the file and says why it cannot be read.
    report = json.loads(_run(tmp_path, "info", path.name, "--json").stdout)
    assert report["engine_shape"] is None and match in report["note"]


def test_info_names_unknown_codes(tmp_path):
    _nifti(tmp_path / "codes.nii", (XYZT_UNITS, "<B", 0xFF), (INTENT_CODE, "<h", 31000))
    result = _run(tmp_path, "info", "codes.nii", "--json")
    assert result.exit_code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["units"]["space"].startswith("unknown") and "31000" in report["intent"]


def test_header_repairs_are_one_warning_line_and_quiet_with_q(tmp_path):
    _nifti(tmp_path / "zero-pixdim.nii", (PIXDIM_X, "<f", 0.0), (QFORM_CODE, "<h", 0), (SFORM_CODE, "<h", 0))
    loud = _run(tmp_path, "run", "zero-pixdim.nii", "out.nii", *NEAREST, "--json")
    assert loud.exit_code == 0, loud.stderr
    warnings = [line for line in loud.stderr.splitlines() if line.startswith("Warning:")]
    assert warnings == ["Warning: pixdim[1,2,3] should be non-zero; setting 0 dims to 1"]
    assert json.loads(loud.stdout)["warnings"] == [warnings[0][len("Warning: "):]]
    quiet = _run(tmp_path, "run", "zero-pixdim.nii", "out2.nii", *NEAREST, "-q")
    assert quiet.exit_code == 0 and quiet.stderr == ""


def test_non_finite_slope_means_no_scaling(tmp_path):
    """nibabel reads a non-finite scl_slope as "not scaled" (the NIfTI rule for 0)."""
    _nifti(tmp_path / "inf-slope.nii", (SCL_SLOPE, "<f", float("inf")))
    volume = io.read_volume(str(tmp_path / "inf-slope.nii"))
    assert volume.data.dtype == np.int16 and volume.data.max() == 59


def test_overflowing_scaling_is_a_warning_not_numpy_noise(tmp_path):
    _nifti(tmp_path / "big-slope.nii", (SCL_SLOPE, "<f", 1e38))
    result = _run(tmp_path, "run", "big-slope.nii", "out.npy", *NEAREST)
    assert result.exit_code == 0, result.stderr
    assert "overflow encountered" not in result.stderr
    assert [line for line in result.stderr.splitlines() if "Warning" in line] == [
        "Warning: the scaling (scl_slope 1e+38, scl_inter 0) overflows float32: some values are infinite"]
    assert _run(tmp_path, "run", "big-slope.nii", "out2.npy", *NEAREST, "-q").stderr == ""


# --------------------------------------------------------------------------- sizes

@pytest.mark.parametrize("output,args,match", [
    ("out.npy", ("--kernel", "nearest", "--stride", "1000"), "stride 1000 along D"),
    ("out.npy", ("--kernel", "linear", "--stride", "99999999999999999999"), "stride 99999999999999999999"),
    # A compressed output's size is unknown: the built-in kernel's weights are the limit.
    ("out.nii.gz", ("--kernel", "linear", "--stride", "2000"), "kernel_size 4000 is too large"),
    ("out.npy", ("--weights", "w.npz", "--stride", "99999999999999999999"), "stride 99999999999999999999"),
    ("out.npy", ("--weights", "w.npz", "--dilation", "1000000"), "dilation 1000000"),
    ("out.npy", ("--weights", "stored.npz"), "stride 1000000000"),
])
def test_outputs_that_cannot_fit_are_refused_before_any_allocation(tmp_path, output, args, match):
    np.save(tmp_path / "vol.npy", np.zeros((8, 8, 8), np.float32))
    np.savez(tmp_path / "w.npz", weight=np.ones((1, 1, 3, 3, 3), np.float32))
    np.savez(tmp_path / "stored.npz", weight=np.ones((1, 1, 3, 3, 3), np.float32), stride=np.array(10 ** 9))
    result = _run(tmp_path, "run", "vol.npy", output, *args, "-q")
    _one_error(result, 1, match)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stored.npz", "vol.npy", "w.npz"]


def test_output_larger_than_the_file_size_limit_is_refused(tmp_path):
    """RLIMIT_FSIZE (or a full disk) is checked before computing, with the setting to blame."""
    pytest.importorskip("resource")
    np.save(tmp_path / "vol.npy", np.zeros((16, 16, 16), np.float32))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (100000, 100000)); "
            "from convt3d_cli.cli import main; sys.argv[0] = 'convt3d'; main()")
    proc = subprocess.run([sys.executable, "-c", code, "run", "vol.npy", "out.npy", "--kernel", "nearest",
                           "--stride", "4", "-q"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("Error: the output (1, 1, 64, 64, 64) would take 1.0 MiB") and \
        "stride 4 along D" in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vol.npy"]


def test_library_refuses_strides_it_cannot_plan():
    x = np.zeros((1, 1, 2, 2, 2), np.float32)
    with pytest.raises(ParameterError, match="stride") as err:
        conv_transpose3d(x, np.ones((1, 1, 1, 1, 1), np.float32), stride=10 ** 9)
    assert err.value.param == "stride"


@pytest.mark.parametrize("args,code,match", [
    (("--kernel", "nearest", "--stride", "1" + "0" * 400), 1, "stride 1" + "0" * 40),
    (("--kernel", "nearest", "--stride", "2", "--max-memory", "9" * 400), 0, None),
])
def test_option_values_of_any_size(tmp_path, args, code, match):
    np.save(tmp_path / "vol.npy", np.zeros((4, 4, 4), np.float32))
    result = _run(tmp_path, "run", "vol.npy", "out.npy", *args, "-q")
    if code:
        _one_error(result, code, match)
    else:
        assert result.exit_code == 0 and result.stderr == "", (result.stderr, result.exception)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_from_list_reads_pipes_without_hanging(tmp_path):
    np.save(tmp_path / "vol.npy", np.zeros((4, 4, 4), np.float32))
    os.mkfifo(tmp_path / "silent.txt")
    proc = subprocess.run([sys.executable, "-m", "convt3d_cli", "batch", "--from-list", "silent.txt", "--out-dir",
                           "out", *NEAREST], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr  # the timeout above turns a hang into a failure
    shell = ("mkfifo named.txt; (sleep 1; echo vol.npy) > named.txt & "
             f"{sys.executable} -m convt3d_cli batch --from-list named.txt --out-dir out2 --kernel nearest "
             "--stride 2 -q; wait")
    proc = subprocess.run(["bash", "-c", shell], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out2" / "vol.npy").exists()

