"""Fixtures for the streaming tests: tiny volumes in every format, slabs forced by a tiny budget.

The planner's fixed allowances (gzip and HDF5 buffers, per-thread input blocks)
are megabytes; they are zeroed here so that volumes of a few thousand voxels
already stream in many slabs under ``--max-memory 40K``.
"""

import os
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from convt3d_cli import slabs
from convt3d_cli.engine import PreparedLayer
from convt3d_cli.cli import cli

AFFINE = np.array([[1.5, 0.0, 0.0, -10.0],
                   [0.0, 2.0, 0.0, 20.0],
                   [0.0, 0.0, 2.5, -30.0],
                   [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setattr(slabs, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)


@pytest.fixture(scope="session")
def volumes(tmp_path_factory):
    """Inputs: one channel (9, 10, 11) in every format, two channels as .nii.gz and .npy."""
    folder = tmp_path_factory.mktemp("stream-data")
    rng = np.random.default_rng(7)
    x = rng.normal(size=(9, 10, 11)).astype(np.float32)
    ints = np.round(x * 100).astype(np.int16)
    nib.save(nib.Nifti1Image(ints, AFFINE), folder / "vol.nii")
    scaled = nib.Nifti1Image(ints, AFFINE)
    scaled.header.set_slope_inter(0.5, 2.0)
    nib.save(scaled, folder / "vol.nii.gz")
    two = np.stack([x, -2 * x], axis=-1)  # (X, Y, Z, C)
    nib.save(nib.Nifti1Image(two, AFFINE), folder / "two.nii.gz")
    np.save(folder / "vol.npy", x)
    np.save(folder / "two.npy", np.moveaxis(two, -1, 0))
    np.savez(folder / "vol.npz", volume=x.astype(np.float64))
    with h5py.File(folder / "vol.h5", "w") as handle:
        handle.create_dataset("scan/data", data=x.astype(">f4"), chunks=(3, 10, 11))
    w1 = rng.normal(size=(1, 2, 3, 2, 3)).astype(np.float32)
    np.savez(folder / "w1.npz", weight=w1, bias=np.array([0.25, -1.0], np.float32))
    w2 = rng.normal(size=(2, 1, 3, 3, 3)).astype(np.float32)
    np.savez(folder / "w2.npz", weight=w2)
    # 64 output channels: the blocked path.
    w8 = rng.normal(size=(1, 64, 4, 3, 2)).astype(np.float32)
    np.save(folder / "w8.npy", w8)
    return folder


class Run:
    def __init__(self, folder):
        self.folder = Path(folder)
        self.runner = CliRunner()

    def __call__(self, *args, code=0):
        cwd = os.getcwd()
        os.chdir(self.folder)
        try:
            result = self.runner.invoke(cli, [str(a) for a in args])
        finally:
            os.chdir(cwd)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
        return result


@pytest.fixture
def run(volumes):
    return Run(volumes)
