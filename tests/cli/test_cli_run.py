"""``convt3d run``: successful runs in every format, the report, JSON, options from weights files."""

import json

import numpy as np
import pytest

from convt3d_cli import conv_transpose3d, geometry
from convt3d_cli.builtin import apply_builtin


def load_nifti(path):
    import nibabel as nib

    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image


def test_linear_on_nifti_writes_upsampled_volume_with_affine(convt3d, data, affine):
    result = convt3d.ok("run", "vol.nii.gz", "out.nii.gz", "--kernel", "linear", "--stride", "2")
    lines = result.stderr.splitlines()
    assert "D_out = (8 - 1) * 2 - 2 * 1 + 1 * (4 - 1) + 0 + 1 = 16" in lines
    assert "H_out = (7 - 1) * 2 - 2 * 1 + 1 * (4 - 1) + 0 + 1 = 14" in lines
    assert "W_out = (6 - 1) * 2 - 2 * 1 + 1 * (4 - 1) + 0 + 1 = 12" in lines
    assert any(line.startswith("output:") and "(1, 1, 16, 14, 12)" in line for line in lines)
    assert result.stdout == ""

    out, image = load_nifti(data / "out.nii.gz")
    source, _ = load_nifti(data / "vol.nii.gz")
    assert out.shape == (16, 14, 12)
    expected = apply_builtin(source[None, None].astype(np.float32), "linear", 2)[0, 0]
    np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-4)
    params = geometry.LayerParams.create(4, 2, 1)
    np.testing.assert_allclose(image.affine, geometry.output_affine(affine, params), atol=1e-5)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (0.75, 0.75, 1.0))
    assert int(image.header["qform_code"]) == 1 and int(image.header["sform_code"]) == 2


def test_formula_is_on_stderr_before_output_line(convt3d):
    result = convt3d.ok("run", "vol.npy", "out.npy", "--kernel", "nearest", "--stride", "2,2,1")
    lines = result.stderr.splitlines()
    formula = [i for i, line in enumerate(lines) if line[1:7] == "_out ="]
    output = [i for i, line in enumerate(lines) if line.startswith("output:")]
    assert len(formula) == 3 and max(formula) < output[0]
    assert lines[formula[2]] == "W_out = (6 - 1) * 1 - 2 * 0 + 1 * (1 - 1) + 0 + 1 = 6"


def test_json_report_is_one_object_with_the_keys(convt3d, data, report_keys):
    result = convt3d.ok("run", "vol.npy", "out.npy", "--kernel", "nearest", "--stride", "2", "--json", "-q")
    assert result.stderr == ""
    report = json.loads(result.stdout)
    assert report_keys <= set(report)
    assert report["input_shape"] == [1, 1, 8, 7, 6]
    assert report["output_shape"] == [1, 1, 16, 14, 12]
    assert report["weight_shape"] == [1, 1, 2, 2, 2]
    assert report["kernel_size"] == [2, 2, 2] and report["stride"] == [2, 2, 2]
    assert report["groups"] == 1 and report["dtype"] == "float32"
    assert report["formula"] == ["D_out = (8 - 1) * 2 - 2 * 0 + 1 * (2 - 1) + 0 + 1 = 16",
                                 "H_out = (7 - 1) * 2 - 2 * 0 + 1 * (2 - 1) + 0 + 1 = 14",
                                 "W_out = (6 - 1) * 2 - 2 * 0 + 1 * (2 - 1) + 0 + 1 = 12"]
    assert report["input"] == "vol.npy"
    assert report["output"].endswith("out.npy")
    assert report["seconds"] >= 0
    out = np.load(data / "out.npy")
    assert out.shape == (16, 14, 12)     # a 3-D one-channel input stays 3-D
    np.testing.assert_array_equal(out, np.repeat(np.repeat(np.repeat(np.load(data / "vol.npy"), 2, 0), 2, 1), 2, 2))


def test_quiet_prints_nothing(convt3d):
    result = convt3d.ok("run", "vol.npy", "out.npy", "--kernel", "nearest", "--stride", "2", "-q")
    assert result.stderr == "" and result.stdout == ""


def test_weights_file_options_apply_and_bias_is_used(convt3d, data):
    result = convt3d.ok("run", "vol.nii.gz", "out.nii.gz", "--weights", "w12.npz", "--json")
    report = json.loads(result.stdout)
    assert report["stride"] == [2, 2, 2] and report["padding"] == [1, 1, 1]
    assert report["output_padding"] == [1, 1, 1]
    assert report["output_shape"] == [1, 2, 16, 14, 12]
    out, _ = load_nifti(data / "out.nii.gz")
    assert out.shape == (16, 14, 12, 2)          # NIfTI: channels last
    weights = np.load(data / "w12.npz")
    source, _ = load_nifti(data / "vol.nii.gz")
    expected = conv_transpose3d(source[None].astype(np.float32), weights["weight"], weights["bias"],
                                stride=2, padding=1, output_padding=1)
    np.testing.assert_allclose(out, np.moveaxis(expected, 0, -1), rtol=1e-5, atol=1e-3)


def test_command_line_overrides_weights_file_options(convt3d):
    result = convt3d.ok("run", "vol.npy", "out.npy", "--weights", "w12.npz", "--padding", "0",
                        "--output-padding", "0,1,0", "--json", "-q")
    report = json.loads(result.stdout)
    assert report["padding"] == [0, 0, 0] and report["output_padding"] == [0, 1, 0]
    assert report["stride"] == [2, 2, 2]                     # still from the file
    assert report["output_shape"] == [1, 2, 17, 16, 13]


def test_no_bias_and_explicit_bias(convt3d, data):
    convt3d.ok("run", "vol.npy", "with.npy", "--weights", "w12.npz", "-q")
    convt3d.ok("run", "vol.npy", "without.npy", "--weights", "w12.npz", "--no-bias", "-q")
    difference = np.load(data / "with.npy") - np.load(data / "without.npy")
    np.testing.assert_allclose(difference[0], 0.5, atol=1e-3)
    np.testing.assert_allclose(difference[1], -1.0, atol=1e-3)
    np.save(data / "b2.npy", np.array([2.0, 3.0], dtype=np.float32))
    convt3d.ok("run", "vol.npy", "other.npy", "--weights", "w12.npz:weight", "--bias", "b2.npy", "-q")
    np.testing.assert_allclose(np.load(data / "other.npy") - np.load(data / "without.npy"),
                               np.array([2.0, 3.0])[:, None, None, None] * np.ones((1, 16, 14, 12)), atol=1e-3)


def test_hdf5_key_in_and_out_with_weights_attributes(convt3d, data):
    import h5py

    result = convt3d.ok("run", "scan.h5:/scan/data", "out.h5:/up/data", "--weights", "w21.h5:/layer/weight",
                        "--bias", "w21.h5:/layer/bias", "--json")
    report = json.loads(result.stdout)
    assert report["stride"] == [2, 2, 2]                     # from the dataset attribute
    assert report["output_shape"] == [1, 1, 13, 13, 13]
    assert report["output"] == "out.h5:/up/data" and report["output_file_shape"] == [1, 1, 13, 13, 13]
    assert report["weights"] == "w21.h5:/layer/weight" and report["bias"] == "w21.h5:/layer/bias"
    with h5py.File(data / "out.h5", "r") as fh:
        assert fh["up/data"].shape == (1, 1, 13, 13, 13)
        with h5py.File(data / "scan.h5", "r") as src, h5py.File(data / "w21.h5", "r") as w:
            expected = conv_transpose3d(src["scan/data"][()], w["layer/weight"][()], w["layer/bias"][()], stride=2)
        np.testing.assert_allclose(fh["up/data"][()], expected, rtol=1e-5, atol=1e-4)
        assert any("_out =" in str(value) for value in fh["up/data"].attrs.values()) or \
            any("_out =" in str(value) for value in fh.attrs.values())


def test_npz_input_with_several_channels_and_builtin(convt3d, data):
    result = convt3d.ok("run", "vols.npz:volume", "out.npz", "--kernel", "linear", "--stride", "2,2,1",
                        "--json", "-q")
    report = json.loads(result.stdout)
    assert report["groups"] == 2 and report["weight_shape"] == [2, 1, 4, 4, 1]
    with np.load(data / "out.npz") as archive:
        (out,) = [archive[name] for name in archive.files]
    expected = apply_builtin(np.load(data / "vols.npz")["volume"], "linear", (2, 2, 1))
    assert out.shape == (2, 12, 12, 6)
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_float64_and_multichannel_nifti(convt3d, data):
    result = convt3d.ok("run", "two.nii", "out.nii", "--kernel", "linear", "--stride", "2",
                        "--dtype", "float64", "--json")
    report = json.loads(result.stdout)
    assert report["input_shape"] == [1, 2, 6, 6, 6] and report["dtype"] == "float64"
    assert report["output_dtype"] == "float64"
    out, _ = load_nifti(data / "out.nii")
    assert out.shape == (12, 12, 12, 2) and out.dtype == np.float64
    # nearest keeps the input's type unless told otherwise
    convt3d.ok("run", "two.nii", "same.nii", "--kernel", "nearest", "--stride", "2", "--dtype", "float64", "-q")
    assert load_nifti(data / "same.nii")[0].dtype == np.float32
    convt3d.ok("run", "two.nii", "wide.nii", "--kernel", "nearest", "--stride", "2", "--dtype", "float64",
               "--output-dtype", "float64", "-q")
    assert load_nifti(data / "wide.nii")[0].dtype == np.float64


def test_overwrite_replaces_existing_output(convt3d, data):
    (data / "out.npy").write_bytes(b"old")
    convt3d.ok("run", "vol.npy", "out.npy", "--kernel", "nearest", "--stride", "2", "--overwrite", "-q")
    assert np.load(data / "out.npy").shape == (16, 14, 12)


def test_max_memory_large_enough_is_accepted(convt3d):
    convt3d.ok("run", "vol.npy", "out.npy", "--kernel", "nearest", "--stride", "2", "--max-memory", "64M", "-q")


@pytest.mark.parametrize("args", [["--version"], ["--debug", "--version"]])
def test_version(convt3d, args):
    import convt3d_cli

    result = convt3d.ok(*args)
    assert convt3d_cli.__version__ in result.stdout
    assert result.stdout.startswith("convt3d")


def test_grouped_megengine_weight_sets_groups(convt3d, data):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((2, 1, 3, 2, 2, 2)).astype(np.float32)   # groups, Cin/g, Cout/g, k
    np.save(data / "grouped.npy", weight)
    result = convt3d.ok("run", "vols.npz:volume", "out.npy", "--weights", "grouped.npy", "--stride", "2",
                        "--json", "-q")
    report = json.loads(result.stdout)
    assert report["groups"] == 2 and report["output_shape"] == [1, 6, 12, 12, 12]
    volume = np.load(data / "vols.npz")["volume"]
    expected = conv_transpose3d(volume, weight, stride=2, groups=2)
    np.testing.assert_allclose(np.load(data / "out.npy"), expected, rtol=1e-5, atol=1e-5)
