"""Fixtures for the command-line tests: tiny files in every format and checked invocations.

Volumes stay at most 8-16 voxels per axis and every run computes in float32,
so the engine compiles few Numba specialisations and the suite stays fast.
"""

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from convt3d_cli.cli import cli

REPO = Path(__file__).resolve().parents[2]
SAMPLE_DATA = REPO / "sample_data"

AFFINE = np.array([[1.5, 0.0, 0.0, -10.0],
                   [0.0, 1.5, 0.0, 20.0],
                   [0.0, 0.0, 2.0, -30.0],
                   [0.0, 0.0, 0.0, 1.0]])


def snapshot(folder):
    """Name -> content hash of every file under ``folder`` (to prove nothing changed)."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.is_symlink()}


class Invoker:
    """Run ``convt3d`` in-process and check the outcome."""

    def __init__(self, folder):
        self.runner = CliRunner()
        self.folder = Path(folder)

    def __call__(self, *args):
        """Invoke with ``args`` (converted to str) from inside the data folder."""
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            return self.runner.invoke(cli, [str(a) for a in args])
        finally:
            os.chdir(cwd)

    def ok(self, *args):
        """Invoke and require success; return the result."""
        result = self(*args)
        assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
        return result

    def fails(self, *args, code, match=None):
        """Invoke and require a clean failure that changed no file.

        Checks the exit code, exactly one ``Error:`` line on stderr (matching
        ``match`` when given), no traceback, a ``SystemExit`` rather than a
        crash, and that no file in the folder was created, removed or changed.
        """
        before = snapshot(self.folder)
        result = self(*args)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
        assert len(errors) == 1, result.stderr
        assert "Traceback" not in result.stderr + result.stdout
        if match is not None:
            assert match in errors[0], errors[0]
        assert snapshot(self.folder) == before
        return result, errors[0]


REPORT_KEYS = {"input_shape", "weight_shape", "output_shape", "stride", "padding", "output_padding",
               "dilation", "groups", "kernel_size", "formula", "output", "seconds", "input", "dtype"}


@pytest.fixture
def report_keys():
    """Keys every ``--json`` report of ``run`` has (docs/behaviour.md, *Command line, reports and exit codes*)."""
    return REPORT_KEYS


@pytest.fixture
def affine():
    """The affine of the NIfTI files in ``data``."""
    return AFFINE.copy()


@pytest.fixture
def sample_data():
    """The repository's ``sample_data`` folder."""
    return SAMPLE_DATA


@pytest.fixture
def data(tmp_path):
    """A folder with one small file per format (volumes and weights)."""
    import h5py
    import nibabel as nib

    rng = np.random.default_rng(3)
    vol3 = rng.integers(0, 100, size=(8, 7, 6)).astype(np.int16)
    image = nib.Nifti1Image(vol3, AFFINE)
    image.set_qform(AFFINE, code=1)
    image.set_sform(AFFINE, code=2)
    image.header.set_xyzt_units("mm", "sec")
    nib.save(image, str(tmp_path / "vol.nii.gz"))

    four = rng.standard_normal((6, 6, 6, 2)).astype(np.float32)    # X, Y, Z, C
    nib.save(nib.Nifti1Image(four, AFFINE), str(tmp_path / "two.nii"))

    np.save(tmp_path / "vol.npy", vol3.astype(np.float32))
    np.savez(tmp_path / "vols.npz", volume=rng.standard_normal((2, 6, 6, 6)).astype(np.float32),
             mask=np.ones((6, 6, 6), dtype=np.uint8))
    with h5py.File(tmp_path / "scan.h5", "w") as fh:
        fh.create_dataset("scan/data", data=rng.standard_normal((1, 2, 6, 6, 6)).astype(np.float32))
        fh.create_dataset("scan/mask", data=np.ones((6, 6, 6), dtype=np.uint8))

    # 1 -> 2 channels, k=3, carrying stride 2, padding 1, output_padding 1.
    np.savez(tmp_path / "w12.npz", weight=rng.standard_normal((1, 2, 3, 3, 3)).astype(np.float32),
             bias=np.array([0.5, -1.0], dtype=np.float32), stride=np.array([2, 2, 2]),
             padding=np.array([1, 1, 1]), output_padding=np.array([1, 1, 1]))
    # 1 -> 1 channel, k=2, no options stored.
    np.save(tmp_path / "w11.npy", rng.standard_normal((1, 1, 2, 2, 2)).astype(np.float32))
    # 2 -> 1 channel in HDF5 with its options as attributes.
    with h5py.File(tmp_path / "w21.h5", "w") as fh:
        dset = fh.create_dataset("layer/weight", data=rng.standard_normal((2, 1, 3, 3, 3)).astype(np.float32))
        fh.create_dataset("layer/bias", data=np.array([0.25], dtype=np.float32))
        dset.attrs["stride"] = 2
    np.save(tmp_path / "bias3.npy", np.zeros(3, dtype=np.float32))
    return tmp_path


@pytest.fixture
def convt3d(data):
    """:class:`Invoker` working inside the ``data`` folder."""
    return Invoker(data)
