"""``describe`` (for ``convt3d info``) and ``probe_volume``: headers only, JSON-ready."""

import json
import os
import time

import h5py
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import KeyNotFoundError


def roundtrip_json(report):
    """The report must survive strict JSON (no NaN, no NumPy types)."""
    return json.loads(json.dumps(report, allow_nan=False))


def test_nifti(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "v.nii.gz", np.zeros((5, 4, 3, 2), ">i2"), affine, version=2,
                      endian=">", slope=2.0, inter=1.0, sform_code=4, qform_code=1,
                      units=("mm", "sec"), time_zoom=3.0)
    report = roundtrip_json(io.describe(path))
    assert report["format"] == "nifti" and report["nifti_version"] == 2 and report["key"] is None
    assert report["stored_shape"] == [5, 4, 3, 2]
    assert report["engine_shape"] == [1, 2, 5, 4, 3]
    assert report["channels"] == 2 and report["layout"] == "(X,Y,Z,C or T)"
    assert report["spatial_axes"] == "D=X,H=Y,W=Z"
    assert report["dtype"] == "int16" and report["byte_order"] == "big"
    assert report["read_dtype"] == "float32"
    assert report["scl_slope"] == 2.0 and report["scl_inter"] == 1.0
    assert report["sform_code"] == 4 and report["qform_code"] == 1
    assert report["units"] == {"space": "mm", "time": "sec"}
    np.testing.assert_allclose(report["affine"], affine, atol=1e-5)
    np.testing.assert_allclose(report["zooms"], [0.8, 1.25, 2.5, 3.0], rtol=1e-6)
    assert report["data_bytes"] == 5 * 4 * 3 * 2 * 2
    assert report["file_size"] == os.path.getsize(path)


def test_unscaled_nifti_reports_null_scaling(tmp_path, make_nifti, affine):
    report = roundtrip_json(io.describe(make_nifti(tmp_path / "v.nii", np.zeros((2, 2, 2), "f4"),
                                                   affine)))
    assert report["scl_slope"] is None and report["scl_inter"] is None
    assert report["nifti_version"] == 1 and report["layout"] == "(X,Y,Z)"


def test_nifti_that_cannot_be_a_volume_is_still_described(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "ts.nii", np.zeros((3, 3, 3, 4, 2, 2), "f4"), affine)
    report = roundtrip_json(io.describe(path))
    assert report["stored_shape"] == [3, 3, 3, 4, 2, 2] and report["engine_shape"] is None
    assert "(X,Y,Z,T,C)" in report["note"]


def test_nifti_cut_inside_the_data_is_described(tmp_path, make_nifti, affine, rng):
    path = make_nifti(tmp_path / "cut.nii.gz", rng.standard_normal((30, 30, 30)).astype("f4"), affine)
    os.truncate(path, os.path.getsize(path) // 2)
    assert io.describe(path)["stored_shape"] == [30, 30, 30]


def test_hdf5_tree(tmp_path):
    path = tmp_path / "t.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["creator"] = "scanner"
        handle["scan/volume"] = np.zeros((2, 3, 4, 5), np.float32)
        handle["scan/volume"].attrs["element_size_um"] = [1.0, 0.5, 0.5]
        handle["scan/labels"] = np.zeros((3, 4, 5), np.uint8)
        handle["meta/name"] = "subject 1"
    report = roundtrip_json(io.describe(str(path)))
    assert report["key"] == "/scan/volume" and report["default"] == "/scan/volume"
    assert report["engine_shape"] == [1, 2, 3, 4, 5] and report["channels"] == 2
    assert report["layout"] == "(C,D,H,W)" and report["spatial_axes"] == "D,H,W"
    tree = {entry["path"]: entry for entry in report["tree"]}
    assert set(tree) == {"/scan/volume", "/scan/labels", "/meta/name"}
    assert tree["/scan/labels"]["shape"] == [3, 4, 5] and tree["/scan/labels"]["dtype"] == "uint8"
    assert tree["/scan/volume"]["attrs"] == {"element_size_um": [1.0, 0.5, 0.5]}
    assert report["root_attrs"] == {"creator": "scanner"}

    chosen = roundtrip_json(io.describe(f"{path}:scan/labels"))
    assert chosen["key"] == "/scan/labels" and chosen["default"] == "/scan/volume"
    with pytest.raises(KeyNotFoundError, match="/scan/labels"):
        io.describe(f"{path}:/nothing")


def test_hdf5_huge_dataset_is_described_without_reading(tmp_path):
    path = tmp_path / "huge.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("v", shape=(8192, 8192, 8192), dtype="f8", chunks=(1, 64, 8192))
    start = time.perf_counter()
    report = io.describe(str(path))
    assert time.perf_counter() - start < 5
    assert report["data_bytes"] == 8 * 8192 ** 3


def test_npz_arrays(tmp_path):
    path = tmp_path / "a.npz"
    np.savez(path, **{"up1.weight": np.zeros((3, 2, 3, 3, 3), "f4"), "up1.bias": np.zeros(2, "f4"),
                      "up2.weight": np.zeros((2, 2, 3, 3, 3), "f4")})
    report = roundtrip_json(io.describe(str(path)))
    assert report["key"] is None and "several arrays" in report["note"]
    assert "stored_shape" not in report
    assert report["arrays"] == [
        {"name": "up1.weight", "shape": [3, 2, 3, 3, 3], "dtype": "float32"},
        {"name": "up1.bias", "shape": [2], "dtype": "float32"},
        {"name": "up2.weight", "shape": [2, 2, 3, 3, 3], "dtype": "float32"},
    ]
    chosen = roundtrip_json(io.describe(f"{path}:up1.bias"))
    assert chosen["stored_shape"] == [2] and chosen["engine_shape"] is None
    assert "(D,H,W)" in chosen["note"]


def test_npy(tmp_path):
    np.save(tmp_path / "a.npy", np.asfortranarray(np.zeros((3, 4, 5, 6), ">f8")))
    report = roundtrip_json(io.describe(str(tmp_path / "a.npy")))
    assert report["format"] == "npy" and report["key"] is None
    assert report["engine_shape"] == [1, 3, 4, 5, 6] and report["layout"] == "(C,D,H,W)"
    assert report["byte_order"] == "big" and report["fortran_order"] is True
    assert report["data_bytes"] == 8 * 3 * 4 * 5 * 6


def test_probe_volume_fields(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "v.nii", np.zeros((5, 4, 3), "<i2"), affine, slope=0.5)
    info = io.probe_volume(path)
    assert isinstance(info, io.VolumeInfo)
    assert info.path == path and info.key is None and info.format == "nifti"
    assert info.stored_shape == (5, 4, 3) and info.engine_shape == (1, 1, 5, 4, 3)
    assert info.dtype == "int16" and info.read_dtype == "float32" and info.source_ndim == 3
    assert info.nbytes == 5 * 4 * 3 * 4
    np.testing.assert_allclose(info.affine, affine, atol=1e-5)
    assert len(info.zooms) == 3 and info.header is not None and info.attrs == {}
