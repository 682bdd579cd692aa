"""Begin/end crops from the command line, weights files and the report; layouts of plain arrays."""

import json

import h5py
import numpy as np
import pytest

from convt3d_cli import conv_transpose3d, geometry
from test_cli_run import load_nifti


def test_six_value_padding_in_every_output_format_and_streamed(convt3d, data, affine, monkeypatch):
    from convt3d_cli import slabs as slab_module
    from convt3d_cli.engine import PreparedLayer

    # A tiny budget streams these tiny volumes in many slabs.
    monkeypatch.setattr(slab_module, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)
    w = np.load(data / "w11.npy")
    x = np.load(data / "vol.npy")
    expected = conv_transpose3d(x[None, None], w, stride=2, padding=(0, 1, 0, 1, 0, 1))[0, 0]
    assert expected.shape == (15, 13, 11)
    result = convt3d.ok("run", "vol.npy", "out.npy", "--weights", "w11.npy", "--stride", "2",
                        "--padding", "0,1,0,1,0,1")
    assert "D_out = (8 - 1) * 2 - 0 - 1 + 1 * (2 - 1) + 0 + 1 = 15" in result.stderr.splitlines()
    assert "layer:   kernel_size=2 stride=2 padding=0,1,0,1,0,1 output_padding=0 dilation=1 groups=1" \
        in result.stderr.splitlines()
    np.testing.assert_array_equal(np.load(data / "out.npy"), expected)
    # NIfTI outputs stream along the other axis (the transposed problem): same values.
    convt3d.ok("run", "vol.nii.gz", "whole.nii", "--weights", "w11.npy", "--stride", "2", "--padding",
               "0,1,0,1,0,1", "-q")
    streamed = convt3d.ok("run", "vol.nii.gz", "slabs.nii", "--weights", "w11.npy", "--stride", "2",
                          "--padding", "0,1,0,1,0,1", "--max-memory", "3K", "--json", "-q")
    assert json.loads(streamed.stdout)["slabs"] > 1
    whole, image = load_nifti(data / "whole.nii")
    slabs, _ = load_nifti(data / "slabs.nii")
    source, _ = load_nifti(data / "vol.nii.gz")
    np.testing.assert_array_equal(whole, slabs)
    # NIfTI (X, Y, Z) is engine (W, H, D) reversed: the crops follow their axis.
    on_nifti = conv_transpose3d(source.astype(np.float32)[None, None], w, stride=2, padding=(0, 1, 0, 1, 0, 1))
    np.testing.assert_array_equal(whole, on_nifti[0, 0])
    # The grid moves with the begin crop only.
    params = geometry.LayerParams.create(2, 2, (0, 1, 0, 1, 0, 1))
    np.testing.assert_allclose(image.affine, geometry.output_affine(affine, params), atol=1e-5)


def test_json_reports_both_crops_and_where_settings_came_from(convt3d, data):
    result = convt3d.ok("run", "vol.npy", "out.npy", "--weights", "w12.npz", "--padding", "1,1,1,2,2,2",
                        "--json", "-q")
    report = json.loads(result.stdout)
    assert report["padding"] == [1, 1, 1, 2, 2, 2]
    assert report["crop_begin"] == [1, 1, 1] and report["crop_end"] == [1, 1, 1]   # 2 - output_padding 1
    assert report["settings_from"]["padding"] == "command line"
    assert report["settings_from"]["stride"] == "w12.npz:weight"
    assert report["settings_from"]["dilation"] == "default"
    assert report["weight_layout"] == "torch" and report["weight_layout_from"] == "assumed"
    text = convt3d.ok("run", "vol.npy", "out2.npy", "--weights", "w12.npz")
    assert "from:    stride, output_padding: w12.npz:weight; padding: command line" not in text.stderr
    assert "from:    stride, padding, output_padding: w12.npz:weight" in text.stderr.splitlines()
    assert "w12.npz:weight (1, 2, 3, 3, 3) torch layout (assumed)" in text.stderr


def test_six_value_padding_stored_in_a_weights_file(convt3d, data):
    w = np.load(data / "w11.npy")
    np.savez(data / "asym.npz", weight=w, stride=np.array(2), padding=np.array([0, 0, 0, 1, 1, 1]))
    convt3d.ok("run", "vol.npy", "out.npy", "--weights", "asym.npz", "-q")
    x = np.load(data / "vol.npy")
    expected = conv_transpose3d(x[None, None], w, stride=2, padding=(0, 0, 0, 1, 1, 1))[0, 0]
    np.testing.assert_array_equal(np.load(data / "out.npy"), expected)
    # shape reads the same settings from the header.
    shape = json.loads(convt3d.ok("shape", "vol.npy", "--weights", "asym.npz", "--json").stdout)
    assert shape["output_shape"] == [1, 1] + list(expected.shape)


@pytest.mark.parametrize("padding", ["1,2", "1,2,3,4", "0,0,0,-1,0,0", "a"])
def test_bad_padding_values(convt3d, padding):
    convt3d.fails("run", "vol.npy", "out.npy", "--weights", "w11.npy", f"--padding={padding}", code=2,
                  match="padding")


def test_keras_kernel_dataset_is_read_channels_last(convt3d, data):
    """A TensorFlow variable name (kernel:0) says the layout; a cube-shaped kernel still gets it right."""
    rng = np.random.default_rng(0)
    torch_layout = rng.standard_normal((3, 3, 3, 3, 3)).astype(np.float32)       # (Cin, Cout, k...)
    with h5py.File(data / "tf.h5", "w") as fh:
        fh["up/kernel:0"] = torch_layout.transpose(2, 3, 4, 1, 0)                 # (k..., Cout, Cin)
    x = rng.standard_normal((3, 4, 5, 6)).astype(np.float32)
    np.save(data / "x3.npy", x)
    result = convt3d.ok("run", "x3.npy", "out.npy", "--weights", "tf.h5", "--stride", "2")
    assert "keras layout (dataset name kernel:0)" in result.stderr
    np.testing.assert_allclose(np.load(data / "out.npy"), conv_transpose3d(x, torch_layout, stride=2),
                               rtol=1e-6, atol=1e-6)
    convt3d.fails("run", "x3.npy", "out2.npy", "--weights", "tf.h5", "--weight-layout", "torch", code=2,
                  match="contradicts")


@pytest.mark.parametrize("layout", ["keras", "flax", "torch", "megengine"])
def test_weight_layout_of_plain_arrays(convt3d, data, layout):
    rng = np.random.default_rng(1)
    torch_layout = rng.standard_normal((2, 3, 2, 3, 4)).astype(np.float32)
    stored = {"torch": torch_layout, "megengine": torch_layout,
              "keras": torch_layout.transpose(2, 3, 4, 1, 0),
              "flax": torch_layout[:, :, ::-1, ::-1, ::-1].transpose(2, 3, 4, 0, 1)}[layout]
    np.save(data / "w.npy", np.ascontiguousarray(stored))
    x = rng.standard_normal((2, 4, 5, 6)).astype(np.float32)
    np.save(data / "x2.npy", x)
    result = convt3d.ok("run", "x2.npy", "out.npy", "--weights", "w.npy", "--weight-layout", layout,
                        "--stride", "2", "--json", "-q")
    report = json.loads(result.stdout)
    assert report["weight_layout"] == layout and report["weight_layout_from"] == "--weight-layout"
    assert report["weight_shape"] == [2, 3, 2, 3, 4]
    np.testing.assert_allclose(np.load(data / "out.npy"), conv_transpose3d(x, torch_layout, stride=2),
                               rtol=1e-6, atol=1e-6)


def test_weight_layout_needs_weights(convt3d):
    convt3d.fails("run", "vol.npy", "out.npy", "--kernel", "nearest", "--stride", "2", "--weight-layout",
                  "keras", code=2, match="--weight-layout needs --weights")
