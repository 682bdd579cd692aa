"""Weights: default names, biases, stored layer options, formats."""

import h5py
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import FileFormatError, KeyNotFoundError, ParameterError

W = np.arange(3 * 2 * 27, dtype=np.float32).reshape(3, 2, 3, 3, 3)
B = np.array([0.5, -1.5], np.float32)


def test_npz_weight_bias_and_options(tmp_path):
    path = tmp_path / "w.npz"
    np.savez(path, weight=W, bias=B, stride=np.array([2]), padding=np.array(1),
             dilation=np.array([1, 2, 1]), groups=np.array(1), output_padding=np.array([1.0]))
    weights = io.read_weights(str(path))
    np.testing.assert_array_equal(weights.weight, W)
    np.testing.assert_array_equal(weights.bias, B)
    assert weights.options == {"stride": 2, "padding": 1, "output_padding": 1,
                               "dilation": [1, 2, 1], "groups": 1}
    assert all(type(v) is int for v in weights.options.values() if not isinstance(v, list))
    assert weights.source == f"{path}:weight"
    assert weights.bias_source == f"{path}:bias"


def test_module_style_names(tmp_path):
    path = tmp_path / "m.npz"
    np.savez(path, **{"conv.weight": W, "conv.bias": B})
    weights = io.read_weights(str(path))
    assert weights.source.endswith(":conv.weight")
    np.testing.assert_array_equal(weights.bias, B)


def test_two_layers_need_a_key_and_pick_the_sibling_bias(tmp_path):
    path = tmp_path / "net.npz"
    np.savez(path, **{"up1.weight": W, "up1.bias": B, "up2.weight": W[:2], "up2.bias": B * 10})
    with pytest.raises(FileFormatError) as err:
        io.read_weights(str(path))
    assert "up1.weight (3, 2, 3, 3, 3) float32" in str(err.value)
    assert "up2.weight (2, 2, 3, 3, 3) float32" in str(err.value)
    weights = io.read_weights(f"{path}:up2.weight")
    np.testing.assert_array_equal(weights.weight, W[:2])
    np.testing.assert_array_equal(weights.bias, B * 10)


def test_a_layer_never_takes_another_layers_bias(tmp_path):
    path = tmp_path / "net.npz"
    np.savez(path, **{"up1.weight": W, "up1.bias": B, "up2.weight": W[:2]})
    assert io.read_weights(f"{path}:up2.weight").bias is None
    np.savez(path, **{"up1.weight": W, "up1.bias": B, "up2.weight": W[:2], "bias": B * 7})
    np.testing.assert_array_equal(io.read_weights(f"{path}:up2.weight").bias, B * 7)


def test_unrelated_biases_are_not_guessed(tmp_path):
    path = tmp_path / "net.npz"
    np.savez(path, kernel=W, **{"a.bias": B, "b.bias": B})
    with pytest.raises(FileFormatError, match="--no-bias"):
        io.read_weights(str(path))
    assert io.read_weights(str(path), no_bias=True).bias is None


def test_missing_key(tmp_path):
    np.savez(tmp_path / "w.npz", weight=W)
    with pytest.raises(KeyNotFoundError, match=r"weight \(3, 2, 3, 3, 3\) float32"):
        io.read_weights(f"{tmp_path / 'w.npz'}:kernel")


def test_hdf5_options_from_attributes(tmp_path):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as handle:
        handle.attrs["stride"] = 4          # overridden by the dataset's own attribute
        handle.attrs["groups"] = 1
        handle["/layer/weight"] = W
        handle["/layer/weight"].attrs["stride"] = [2, 2, 1]
        handle["/layer/weight"].attrs["padding"] = np.int64(1)
        handle["/layer/weight"].attrs["note"] = "not an option"
        handle["/layer/bias"] = B
    weights = io.read_weights(str(path))
    assert weights.source == f"{path}:/layer/weight"
    assert weights.options == {"stride": [2, 2, 1], "padding": 1, "groups": 1}
    np.testing.assert_array_equal(weights.bias, B)
    assert weights.bias_source == f"{path}:/layer/bias"
    assert io.inspect_weights(str(path)).options == weights.options


def test_hdf5_weight_with_options_as_datasets(tmp_path):
    path = tmp_path / "w.h5"
    with h5py.File(path, "w") as handle:
        handle["weight"] = W
        handle["stride"] = np.array([2, 2, 2])
    assert io.read_weights(str(path)).options == {"stride": [2, 2, 2]}


def test_bias_from_another_file(tmp_path):
    np.savez(tmp_path / "w.npz", weight=W, bias=B)
    np.save(tmp_path / "b.npy", B * 3)
    np.savez(tmp_path / "b.npz", bias=B * 4, other=np.zeros(5))
    weights = io.read_weights(str(tmp_path / "w.npz"), str(tmp_path / "b.npy"))
    np.testing.assert_array_equal(weights.bias, B * 3)
    assert weights.bias_source == str(tmp_path / "b.npy")
    np.testing.assert_array_equal(
        io.read_weights(str(tmp_path / "w.npz"), str(tmp_path / "b.npz")).bias, B * 4)
    np.testing.assert_array_equal(
        io.read_weights(str(tmp_path / "w.npz"), f"{tmp_path / 'b.npz'}:other").bias, np.zeros(5))


def test_no_bias(tmp_path):
    np.savez(tmp_path / "w.npz", weight=W, bias=B)
    weights = io.read_weights(str(tmp_path / "w.npz"), no_bias=True)
    assert weights.bias is None and weights.bias_source is None
    with pytest.raises(ParameterError):
        io.read_weights(str(tmp_path / "w.npz"), str(tmp_path / "w.npz"), no_bias=True)


def test_npy_weight(tmp_path):
    np.save(tmp_path / "w.npy", W)
    weights = io.read_weights(str(tmp_path / "w.npy"))
    np.testing.assert_array_equal(weights.weight, W)
    assert weights.bias is None and weights.options == {}
    assert weights.source == str(tmp_path / "w.npy")


def test_grouped_weight_is_returned_as_stored(tmp_path):
    grouped = np.ones((2, 3, 4, 1, 2, 3), np.float64)
    np.savez(tmp_path / "g.npz", weight=grouped, groups=np.array(2))
    weights = io.read_weights(str(tmp_path / "g.npz"))
    assert weights.weight.shape == (2, 3, 4, 1, 2, 3) and weights.weight.dtype == np.float64
    assert weights.options == {"groups": 2}


@pytest.mark.parametrize("name, value", [
    ("stride", np.array([1, 2])), ("stride", np.array([2.5])), ("groups", np.array([1, 1, 1])),
    ("padding", np.array(["1"])), ("dilation", np.array([[1, 1, 1]])),
])
def test_bad_stored_options(tmp_path, name, value):
    np.savez(tmp_path / "w.npz", weight=W, **{name: value})
    with pytest.raises(FileFormatError, match=name):
        io.read_weights(str(tmp_path / "w.npz"))


def test_nifti_weights_are_refused(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "w.nii", np.zeros((3, 3, 3), np.float32), affine)
    with pytest.raises(FileFormatError, match=r"weights file \(\.pt.*or an array file \(\.npz"):
        io.read_weights(path)


def test_object_weight_is_refused(tmp_path):
    np.savez(tmp_path / "w.npz", weight=np.array([None, 1], dtype=object))
    with pytest.raises(FileFormatError, match="pickle"):
        io.read_weights(str(tmp_path / "w.npz"))


def test_probe_weights_reads_headers_only(tmp_path):
    """A 2 TiB weight declared in HDF5 (never allocated) is probed instantly."""
    path = tmp_path / "big.h5"
    with h5py.File(path, "w") as handle:
        handle.create_dataset("weight", shape=(1024, 1024, 64, 64, 128), dtype="f4",
                              chunks=(1, 1, 64, 64, 128))
        handle["weight"].attrs["stride"] = 2
    assert io.probe_weights(str(path)) == (1024, 1024, 64, 64, 128)
    info = io.inspect_weights(str(path))
    assert info.options == {"stride": 2} and info.dtype == "float32"
    np.savez(tmp_path / "w.npz", weight=W, bias=B)
    assert io.probe_weights(str(tmp_path / "w.npz")) == W.shape
