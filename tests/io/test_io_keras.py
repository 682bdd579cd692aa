"""Keras Conv3DTranspose layers from ``.keras`` archives and Keras ``.h5`` files.

The core tests use the committed fixtures ``tests/fixtures/weights/keras_*``
(written by real Keras 3 and tf.keras 2 with ``make_keras_fixtures.py`` next to
them), which carry the outputs Keras computed: convt3d's engine, run with what
the reader returns, must agree within 2e-5. The framework tests build models
live with Keras (torch backend unless ``KERAS_BACKEND`` says otherwise) and,
when installed, check the ``flax`` layout rule against flax itself; they skip
without those packages.
"""

import io as _bytes_io
import itertools
import json
import os
import shutil
import zipfile

import h5py
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.engine import conv_transpose3d
from convt3d_cli.errors import FileFormatError, KeyNotFoundError
from convt3d_cli.io import keras as keras_io
from convt3d_cli.io import layouts
from convt3d_cli.io.entries import choose_layer
from convt3d_cli.io.keras import FORMAT, is_keras_h5, keras_crops

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "weights")
TOLERANCE = 2e-5
LAYERS = ("same_s2", "valid_mixed", "same_op", "valid_s3", "dilated", "cf", "inner_up")
K2_LAYERS = ("k2_same", "k2_valid_op", "k2_up")


_UNPACKED = []


def fixture(name):
    """A committed fixture; the Keras model files live deflated in ``keras_models.zip`` (HDF5 groups
    cost about 1 KB each, so the raw files are 17-50 KB) and are unpacked once per session."""
    if name.endswith(".npz"):
        return os.path.join(FIXTURES, name)
    if not _UNPACKED:
        import atexit
        import tempfile
        import zipfile

        folder = tempfile.mkdtemp(prefix="convt3d-keras-fixtures-")
        atexit.register(shutil.rmtree, folder, True)
        with zipfile.ZipFile(os.path.join(FIXTURES, "keras_models.zip")) as archive:
            archive.extractall(folder)
        _UNPACKED.append(folder)
    return os.path.join(_UNPACKED[0], name)


def engine_input(x, channels_first=False):
    """Keras input (N, D, H, W, C) -> the engine's (N, C, D, H, W)."""
    return np.ascontiguousarray(x if channels_first else np.moveaxis(x, -1, 1))


def run_layer(spec, x):
    """Read ``spec`` with convt3d's public reader and run the engine on ``x`` (N, C, D, H, W)."""
    weights = io.read_weights(spec)
    options = weights.options
    return conv_transpose3d(x, weights.weight, weights.bias, options.get("stride", 1),
                            options.get("padding", 0), options.get("output_padding", 0),
                            options.get("dilation", 1))


def assert_close(actual, expected):
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOLERANCE * max(1.0, np.abs(expected).max()))


def rezip(src, dst, *, replace=None, drop=(), compression=zipfile.ZIP_STORED):
    """Copy a ``.keras`` archive, replacing or dropping members."""
    replace = replace or {}
    with zipfile.ZipFile(src) as old, zipfile.ZipFile(dst, "w", compression) as new:
        for info in old.infolist():
            if info.filename in drop:
                continue
            data = replace.get(info.filename, old.read(info.filename))
            new.writestr(info.filename, data)
    return str(dst)


def edit_config(src, dst, edit):
    """A copy of a ``.keras`` file whose config.json went through ``edit(config)``."""
    with zipfile.ZipFile(src) as old:
        config = json.loads(old.read("config.json"))
    edit(config)
    return rezip(src, dst, replace={"config.json": json.dumps(config)})


def layer_config(config, name):
    for layer in config["config"]["layers"]:
        if layer["config"].get("name") == name:
            return layer["config"]
    raise AssertionError(name)


def one_line_error(call):
    with pytest.raises(FileFormatError) as err:
        call()
    assert "\n" not in str(err.value)
    return str(err.value)


# --------------------------------------------------------------------------- crop formulas

def keras_output_length(n, k, s, d, padding, op):
    """Keras's ``deconv_output_length`` (keras.src.utils.conv_utils / backend_utils)."""
    k = (k - 1) * d + 1
    if op is None:
        return n * s + max(k - s, 0) if padding == "valid" else n * s
    pad = 0 if padding == "valid" else k // 2
    return (n - 1) * s + k - 2 * pad + op


def jax_begin_crop(k, s, d, padding, op):
    """Begin crop of Keras's JAX backend (``_convert_conv_transpose_padding_args_from_keras_to_jax``)."""
    k = (k - 1) * d + 1
    if padding == "valid":
        left = k - 1
    else:
        pad_len = s + k - 2 if op is None else k + k % 2 - 2 + op
        left = min(pad_len // 2 + pad_len % 2, k - 1)
    return k - 1 - left


@pytest.mark.parametrize("padding", ["valid", "same"])
def test_crops_give_keras_output_length_and_tensorflow_begin(padding):
    for k, s, d, n in itertools.product(range(1, 7), range(1, 5), range(1, 4), range(1, 5)):
        for op in [None] + list(range(s)):
            begin, end = keras_crops(k, s, d, padding, op)
            full = (n - 1) * s + d * (k - 1) + 1
            out = keras_output_length(n, k, s, d, padding, op)
            assert full - begin - end == out, (k, s, d, n, op)
            # TensorFlow: the forward SAME conv of the output pads (full - out) // 2 in front.
            assert begin == (max(full - out, 0) // 2 if padding == "same" else 0)
            assert begin == jax_begin_crop(k, s, d, padding, op)


def test_crops_by_hand():
    assert keras_crops(3, 2, 1, "same", None) == (0, 1)     # odd kernel, stride 2: one at the end
    assert keras_crops(4, 2, 1, "same", None) == (1, 1)
    assert keras_crops(5, 1, 1, "same", None) == (2, 2)
    assert keras_crops(2, 3, 1, "valid", None) == (0, -1)   # stride past the kernel: a bias plane
    assert keras_crops(3, 2, 1, "valid", 1) == (0, -1)
    assert keras_crops(4, 2, 1, "same", 1) == (1, 2)        # (n-1)*2 + 0 + 1 planes
    assert keras_crops(3, 1, 2, "same", None) == (2, 2)     # dilation: reach 5


# --------------------------------------------------------------------------- committed fixtures

def test_layers_of_a_keras_archive():
    path = fixture("keras_layers.keras")
    layers = {layer.name: layer for layer in FORMAT.layers(path)}
    assert set(layers) == set(LAYERS)              # the Conv3D "mix" is not one
    for layer in layers.values():
        assert (layer.layout, layer.layout_source, layer.kind) == ("keras", "Keras layer config",
                                                                   "Conv3DTranspose")
    assert layers["same_s2"].weight.name == "layers/conv3d_transpose/vars/0"
    assert layers["same_s2"].weight.shape == (3, 3, 3, 2, 2)
    assert layers["valid_mixed"].bias is None
    assert layers["valid_mixed"].weight.shape == (2, 3, 4, 2, 2)
    assert layers["inner_up"].weight.name == "layers/sequential/layers/conv3d_transpose/vars/0"
    assert "inner/inner_up" in layers["inner_up"].aliases
    expected = {
        "same_s2": ([2, 2, 2], [0, 0, 0, 1, 1, 1], [0, 0, 0], [1, 1, 1]),
        "valid_mixed": ([2, 3, 1], [0, 0, 0], [0, 0, 0], [1, 1, 1]),
        "same_op": ([2, 2, 3], [1, 2, 1, 2, 2, 1], [0, 0, 0], [1, 1, 1]),
        "valid_s3": ([3, 3, 3], [0, 0, 0], [1, 1, 1], [1, 1, 1]),
        "dilated": ([1, 1, 1], [2, 1, 3], [0, 0, 0], [2, 1, 3]),
        "cf": ([1, 2, 2], [1, 0, 0, 1, 1, 1], [0, 0, 0], [1, 1, 1]),
        "inner_up": ([2, 2, 2], [0, 0, 0], [0, 0, 0], [1, 1, 1]),
    }
    for name, (stride, padding, output_padding, dilation) in expected.items():
        assert layers[name].options == {"stride": stride, "padding": padding,
                                         "output_padding": output_padding, "dilation": dilation}, name


@pytest.mark.parametrize("name", ["keras_layers.keras", "keras_layers.h5"])
def test_engine_reproduces_keras_3(name):
    expected = np.load(fixture("keras_layers.npz"))
    for layer in LAYERS:
        x = engine_input(expected["x"])
        y = run_layer(f"{fixture(name)}:{layer}", x)
        reference = expected[f"y_{layer}"]
        assert_close(y, reference if layer == "cf" else engine_input(reference))


@pytest.mark.parametrize("name", ["keras_k2.h5", "keras_k2.keras"])
def test_engine_reproduces_tf_keras_2(name):
    expected = np.load(fixture("keras_k2.npz"))
    for layer in K2_LAYERS:
        y = run_layer(f"{fixture(name)}:{layer}", engine_input(expected["x"]))
        assert_close(y, engine_input(expected[f"y_{layer}"]))


def test_legacy_h5_layers_follow_weight_names():
    keras3 = {layer.name: layer for layer in FORMAT.layers(fixture("keras_layers.h5"))}
    assert keras3["same_s2"].weight.name == "model_weights/same_s2/same_s2/kernel"
    assert keras3["inner_up"].weight.name == "model_weights/inner/inner/inner_up/kernel"
    keras2 = {layer.name: layer for layer in FORMAT.layers(fixture("keras_k2.h5"))}
    assert keras2["k2_same"].weight.name == "model_weights/k2_same/k2_same/kernel:0"
    assert keras2["k2_same"].bias.name == "model_weights/k2_same/k2_same/bias:0"
    assert keras2["k2_up"].weight.name == "model_weights/k2_inner/k2_up/kernel:0"
    assert keras2["k2_valid_op"].options["output_padding"] == [2, 1, 0]


def test_same_weights_in_every_file():
    archive = fixture("keras_layers.keras")
    for other in ("keras_layers.h5", "keras_layers.weights.h5"):
        for layer in LAYERS:
            a, b = io.read_weights(f"{archive}:{layer}"), io.read_weights(f"{fixture(other)}:{layer}")
            np.testing.assert_array_equal(a.weight, b.weight)
            assert (a.bias is None) == (b.bias is None)
            if a.bias is not None:
                np.testing.assert_array_equal(a.bias, b.bias)


def test_keras_3_weights_file_has_layers_without_settings():
    path = fixture("keras_layers.weights.h5")
    layers = {layer.name: layer for layer in FORMAT.layers(path)}
    assert set(layers) == set(LAYERS)               # names from the vars groups' "name" attribute
    same = layers["same_s2"]
    assert same.options == {} and same.layout == "keras"
    assert same.layout_source == "Keras weights path layers/conv3d_transpose"
    assert "layers/conv3d_transpose" in same.aliases
    assert layers["valid_mixed"].bias is None
    # With the settings given by hand, the weights reproduce Keras.
    expected = np.load(fixture("keras_layers.npz"))
    weights = io.read_weights(f"{path}:same_s2")
    y = conv_transpose3d(engine_input(expected["x"]), weights.weight, weights.bias, 2, (0, 0, 0, 1, 1, 1))
    assert_close(y, engine_input(expected["y_same_s2"]))


def test_keras_2_weights_file_takes_kernel_datasets():
    path = fixture("keras_k2_weights.h5")
    layers = {layer.name: layer for layer in FORMAT.layers(path)}
    assert set(layers) == set(K2_LAYERS)
    for layer in layers.values():
        assert (layer.layout, layer.layout_source, layer.options) == ("keras", "dataset name kernel:0", {})
    assert layers["k2_valid_op"].bias is None
    model = {layer.name: layer for layer in FORMAT.layers(fixture("keras_k2.h5"))}
    for name in K2_LAYERS:
        np.testing.assert_array_equal(FORMAT.load_tensor(path, layers[name].weight),
                                      FORMAT.load_tensor(fixture("keras_k2.h5"), model[name].weight))


def test_keras_2_2_sequential_config_is_a_list(tmp_path):
    """Keras up to 2.2 wrote a Sequential's config as the bare list of its layers."""
    path = tmp_path / "old.h5"
    shutil.copy(fixture("keras_k2.h5"), path)
    with h5py.File(path, "a") as handle:
        config = json.loads(handle.attrs["model_config"])
        same = next(layer for layer in config["config"]["layers"] if layer["name"] == "k2_same")
        handle.attrs["model_config"] = json.dumps({"class_name": "Sequential",
                                                   "config": [{"class_name": same["class_name"],
                                                               "config": same["config"]}]})
    (layer,) = FORMAT.layers(str(path))
    assert layer.name == "k2_same" and layer.options["padding"] == [0, 0, 0, 1, 1, 1]
    expected = np.load(fixture("keras_k2.npz"))
    assert_close(run_layer(f"{path}:k2_same", engine_input(expected["x"])), engine_input(expected["y_k2_same"]))


def test_tensors_list_every_variable():
    path = fixture("keras_layers.keras")
    tensors = {entry.name: entry for entry in FORMAT.tensors(path)}
    assert tensors["layers/conv3d/vars/0"].shape == (1, 1, 1, 2, 2)      # the Conv3D too
    assert len(tensors) == 2 * len(LAYERS) - 1 + 2
    kernel = FORMAT.load_tensor(path, tensors["layers/conv3d_transpose_2/vars/0"])
    assert kernel.shape == (4, 4, 4, 2, 2) and kernel.dtype == np.float32 and kernel.flags.c_contiguous


def test_is_keras_h5(tmp_path):
    for name in ("keras_layers.h5", "keras_layers.weights.h5", "keras_k2.h5", "keras_k2_weights.h5"):
        assert is_keras_h5(fixture(name)), name
    with h5py.File(tmp_path / "volume.h5", "w") as handle:
        handle["volume"] = np.zeros((2, 2, 2), np.float32)
        handle["layers/a"] = np.zeros(2)
    (tmp_path / "text.h5").write_text("not hdf5")
    assert not is_keras_h5(str(tmp_path / "volume.h5"))
    assert not is_keras_h5(str(tmp_path / "text.h5"))
    assert not is_keras_h5(str(tmp_path / "missing.h5"))
    assert not is_keras_h5(fixture("keras_layers.keras"))


def test_info_lists_the_layers():
    report = io.describe(f"{fixture('keras_layers.keras')}:same_op")
    assert report["format"] == "keras"
    (layer,) = report["layers"]
    assert layer["kind"] == "Conv3DTranspose"
    assert layer["weight_shape"] == [2, 2, 4, 4, 4]
    assert layer["settings"]["padding"] == [1, 2, 1, 2, 2, 1]


def test_deflated_archive_reads_the_same(tmp_path):
    path = rezip(fixture("keras_layers.keras"), tmp_path / "deflated.keras", compression=zipfile.ZIP_DEFLATED)
    expected = np.load(fixture("keras_layers.npz"))
    y = run_layer(f"{path}:same_op", engine_input(expected["x"]))
    assert_close(y, engine_input(expected["y_same_op"]))


def test_layer_checkpoint_dependencies_paths(tmp_path):
    """tf.keras 2.13 wrote ``_layer_checkpoint_dependencies`` where later versions write ``layers``."""
    src = fixture("keras_k2.keras")
    with zipfile.ZipFile(src) as old:
        weights = old.read("model.weights.h5")
    with h5py.File(_bytes_io.BytesIO(weights), "r") as old, \
            h5py.File(tmp_path / "w.h5", "w") as new:
        def rename(name, obj):  # every "layers" level, as Keras 3's fallback reads them
            if isinstance(obj, h5py.Dataset):
                parts = ["_layer_checkpoint_dependencies" if p == "layers" else p for p in name.split("/")]
                new["/".join(parts)] = obj[()]
        old.visititems(rename)
    path = rezip(src, tmp_path / "old.keras",
                 replace={"model.weights.h5": (tmp_path / "w.h5").read_bytes()})
    layers = {layer.name: layer for layer in FORMAT.layers(path)}
    assert layers["k2_up"].weight.name == ("_layer_checkpoint_dependencies/sequential/"
                                          "_layer_checkpoint_dependencies/conv3d_transpose/vars/0")
    expected = np.load(fixture("keras_k2.npz"))
    assert_close(run_layer(f"{path}:k2_up", engine_input(expected["x"])), engine_input(expected["y_k2_up"]))


def test_name_tag_wins_over_numbering(tmp_path):
    """Recent Keras 3 tags each vars group with its layer's name; a group found by numbering must agree."""
    src = fixture("keras_layers.keras")

    def swap(config):  # put same_s2 after valid_mixed: the numbering now points at the other group
        layers = config["config"]["layers"]
        i = next(i for i, layer in enumerate(layers) if layer["config"].get("name") == "same_s2")
        layers[i], layers[i + 1] = layers[i + 1], layers[i]

    path = edit_config(src, tmp_path / "swapped.keras", swap)
    layers = {layer.name: layer for layer in FORMAT.layers(path)}
    assert layers["same_s2"].weight.name == "layers/conv3d_transpose/vars/0"
    assert layers["valid_mixed"].weight.name == "layers/conv3d_transpose_1/vars/0"


# --------------------------------------------------------------------------- hostile files

def test_truncated_archive(tmp_path):
    with open(fixture("keras_layers.keras"), "rb") as handle:
        data = handle.read()
    path = tmp_path / "cut.keras"
    path.write_bytes(data[: len(data) // 2])
    assert "cannot read" in one_line_error(lambda: FORMAT.layers(str(path)))
    one_line_error(lambda: FORMAT.tensors(str(path)))
    one_line_error(lambda: io.read_weights(f"{path}:same_s2"))


def test_member_past_the_end_of_the_file(tmp_path):
    """A central directory that says the weights run past the end of the file."""
    path = rezip(fixture("keras_layers.keras"), tmp_path / "lying.keras")
    with open(path, "rb") as handle:
        data = bytearray(handle.read())
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("model.weights.h5")
    # Both copies of the sizes (local header, central directory) are made larger.
    central = data.find(b"model.weights.h5", info.header_offset + 30 + info.file_size) - 46
    assert data[central:central + 4] == b"PK\x01\x02"
    big = (info.file_size + 1000).to_bytes(4, "little")
    data[central + 20:central + 28] = big + big
    data[info.header_offset + 18:info.header_offset + 26] = big + big
    (tmp_path / "lying.keras").write_bytes(bytes(data))
    assert "truncated" in one_line_error(lambda: FORMAT.layers(str(tmp_path / "lying.keras")))


def test_config_not_json(tmp_path):
    path = rezip(fixture("keras_layers.keras"), tmp_path / "bad.keras", replace={"config.json": b"{not json"})
    assert "config.json is not valid JSON" in one_line_error(lambda: FORMAT.layers(path))
    deep = rezip(fixture("keras_layers.keras"), tmp_path / "deep.keras",
                 replace={"config.json": b"[" * 200000})
    one_line_error(lambda: FORMAT.layers(deep))


def test_config_too_large(tmp_path, monkeypatch):
    monkeypatch.setattr(keras_io, "_MAX_JSON_BYTES", 100)
    assert "config.json declares" in one_line_error(lambda: FORMAT.layers(fixture("keras_layers.keras")))


def test_missing_weights_member(tmp_path):
    path = rezip(fixture("keras_layers.keras"), tmp_path / "noweights.keras", drop=("model.weights.h5",))
    message = one_line_error(lambda: FORMAT.layers(path))
    assert "no model.weights.h5" in message and "config.json" in message


def test_weights_member_not_hdf5(tmp_path):
    path = rezip(fixture("keras_layers.keras"), tmp_path / "junk.keras",
                 replace={"model.weights.h5": b"\0" * 5000})
    assert "as Keras" in one_line_error(lambda: FORMAT.layers(path))


def test_not_a_zip(tmp_path):
    path = tmp_path / "plain.keras"
    path.write_bytes(b"hello")
    one_line_error(lambda: FORMAT.layers(str(path)))


def test_model_without_conv3d_transpose(tmp_path):
    def keep_conv3d(config):
        config["config"]["layers"] = [layer for layer in config["config"]["layers"]
                                      if layer["class_name"] in ("InputLayer", "Conv3D", "Permute")]

    path = edit_config(fixture("keras_layers.keras"), tmp_path / "conv.keras", keep_conv3d)
    message = one_line_error(lambda: FORMAT.layers(path))
    assert "no Conv3DTranspose layer" in message
    assert "mix (Conv3D)" in message and "x (InputLayer)" in message


def test_subclassed_model_config(tmp_path):
    path = rezip(fixture("keras_layers.keras"), tmp_path / "sub.keras",
                 replace={"config.json": json.dumps({"class_name": "MyModel", "config": {}})})
    assert "lists no layers" in one_line_error(lambda: FORMAT.layers(path))


def test_unknown_layer_name():
    path = fixture("keras_layers.keras")
    with pytest.raises(KeyNotFoundError) as err:
        choose_layer(FORMAT.layers(path), "nope", path)
    assert "same_s2 (3, 3, 3, 2, 2) float32" in str(err.value)
    with pytest.raises(KeyNotFoundError):
        io.read_weights(f"{path}:nope")


@pytest.mark.parametrize("key, value, words", [
    ("filters", 5, ["same_s2", "(3, 3, 3, 2, 2)", "filters 5"]),
    ("kernel_size", [3, 3, 2], ["same_s2", "kernel_size [3, 3, 2]"]),
])
def test_kernel_shape_disagrees_with_config(tmp_path, key, value, words):
    path = edit_config(fixture("keras_layers.keras"), tmp_path / "bad.keras",
                       lambda config: layer_config(config, "same_s2").__setitem__(key, value))
    message = one_line_error(lambda: FORMAT.layers(path))
    assert all(word in message for word in words), message


@pytest.mark.parametrize("settings, words", [
    ({"padding": "causal"}, ["padding='causal'"]),
    ({"padding": "valid", "output_padding": [2, 2, 2]}, ["cannot be computed", "output_padding"]),
    ({"strides": [2, 0, 2]}, ["strides=[2, 0, 2]"]),
    ({"kernel_size": "3"}, ["kernel_size='3'"]),
    ({"use_bias": "yes"}, ["use_bias='yes'"]),
    ({"data_format": "channels_middle"}, ["data_format"]),
    ({"groups": 2}, ["groups=2"]),
])
def test_settings_convt3d_refuses(tmp_path, settings, words):
    path = edit_config(fixture("keras_layers.keras"), tmp_path / "bad.keras",
                       lambda config: layer_config(config, "same_s2").update(settings))
    message = one_line_error(lambda: FORMAT.layers(path))
    assert "same_s2" in message and all(word in message for word in words), message


def test_bias_missing_although_use_bias(tmp_path):
    path = edit_config(fixture("keras_layers.keras"), tmp_path / "bias.keras",
                       lambda config: layer_config(config, "valid_mixed").update(use_bias=True))
    assert "valid_mixed" in one_line_error(lambda: FORMAT.layers(path))


def test_legacy_model_config_not_json(tmp_path):
    path = tmp_path / "m.h5"
    shutil.copy(fixture("keras_k2.h5"), path)
    with h5py.File(path, "a") as handle:
        handle.attrs["model_config"] = "{broken"
    assert "model_config is not valid JSON" in one_line_error(lambda: FORMAT.layers(str(path)))


def test_legacy_weights_missing(tmp_path):
    path = tmp_path / "m.h5"
    shutil.copy(fixture("keras_k2.h5"), path)
    with h5py.File(path, "a") as handle:
        del handle["model_weights/k2_same"]
    assert "k2_same" in one_line_error(lambda: FORMAT.layers(str(path)))


def test_bfloat16_variables_read_as_float32(tmp_path):
    """Keras stores bfloat16 as 2-byte opaque data tagged ``dtype="bfloat16"``."""
    src = fixture("keras_layers.keras")
    with zipfile.ZipFile(src) as old:
        weights = old.read("model.weights.h5")
    buffer = _bytes_io.BytesIO(weights)
    with h5py.File(buffer, "a") as handle:
        kernel = handle["layers/conv3d_transpose/vars/0"][()]
        bits = (kernel.view("<u4") >> 16).astype("<u2")
        del handle["layers/conv3d_transpose/vars/0"]
        handle.create_dataset("layers/conv3d_transpose/vars/0", data=bits.view("V2"))
        handle["layers/conv3d_transpose/vars/0"].attrs["dtype"] = "bfloat16"
    path = rezip(src, tmp_path / "bf16.keras", replace={"model.weights.h5": buffer.getvalue()})
    layer = {layer.name: layer for layer in FORMAT.layers(path)}["same_s2"]
    assert layer.weight.dtype == np.float32
    loaded = FORMAT.load_tensor(path, layer.weight)
    np.testing.assert_array_equal(loaded, (bits.astype("<u4") << 16).view("<f4"))


# --------------------------------------------------------------------------- real Keras

# Keras's torch backend converts tensors with np.array(x) (NumPy 2 warns about copy=).
live = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    module = pytest.importorskip("keras")
    if module.backend.backend() == "tensorflow":
        # TensorFlow on CPU refuses dilated and channels_first Conv3DTranspose, and 'same' with an
        # output_padding whose output a forward conv would not map back to the input size.
        pytest.skip("these models need KERAS_BACKEND=torch or jax")
    return module


def _cases():
    rng = np.random.default_rng(5)
    cases = []
    for padding in ("valid", "same"):
        for with_op in (False, True):
            for _ in range(3):
                kernel = [int(v) for v in rng.integers(1, 6, 3)]
                strides = [int(v) for v in rng.integers(1, 4, 3)]
                op = [int(rng.integers(0, s)) for s in strides] if with_op else None
                cases.append({"padding": padding, "kernel_size": kernel, "strides": strides,
                              "output_padding": op})
        cases.append({"padding": padding, "kernel_size": [3, 2, 4], "strides": 1, "dilation_rate": [2, 3, 1]})
    return cases


@live
@pytest.mark.parametrize("data_format", ["channels_last", "channels_first"])
def test_live_keras_models(keras, tmp_path, data_format):
    rng = np.random.default_rng(11)
    spatial = (3, 2, 4)
    shape = spatial + (2,) if data_format == "channels_last" else (2,) + spatial
    inp = keras.Input(shape)
    cases = _cases()
    outs = [keras.layers.Conv3DTranspose(3, name=f"up{i}", data_format=data_format, use_bias=i % 3 != 0,
                                         **case)(inp) for i, case in enumerate(cases)]
    model = keras.Model(inp, outs)
    for weight in model.weights:
        weight.assign(rng.normal(size=tuple(weight.shape)).astype("float32"))
    x = rng.normal(size=(2,) + shape).astype("float32")
    ys = model.predict(x, verbose=0)
    for suffix in (".keras", ".h5"):
        path = str(tmp_path / f"m{suffix}")
        model.save(path)
        for i, y in enumerate(ys):
            y = np.asarray(y)
            x_engine = engine_input(x, data_format == "channels_first")
            reference = y if data_format == "channels_first" else engine_input(y)
            if reference.size == 0:   # Keras's 'same' with output_padding can give nothing
                continue
            assert_close(run_layer(f"{path}:up{i}", x_engine), reference)


@live
def test_live_nested_models(keras, tmp_path):
    rng = np.random.default_rng(3)
    inner = keras.Sequential([keras.Input((4, 4, 4, 3)),
                              keras.layers.Conv3DTranspose(2, 3, strides=2, padding="same", name="a"),
                              keras.layers.Conv3DTranspose(2, 2, padding="valid", use_bias=False, name="b")],
                             name="inner")
    inp = keras.Input((2, 2, 2, 2))
    h = keras.layers.Conv3DTranspose(3, 2, strides=2, padding="same", name="top")(inp)
    model = keras.Model(inp, inner(h))
    for weight in model.weights:
        weight.assign(rng.normal(size=tuple(weight.shape)).astype("float32"))
    x = rng.normal(size=(1, 2, 2, 2, 2)).astype("float32")
    y = np.asarray(model.predict(x, verbose=0))
    for suffix in (".keras", ".h5"):
        path = str(tmp_path / f"nested{suffix}")
        model.save(path)
        out = engine_input(x)
        for name in ("top", "inner/a", "b"):
            out = run_layer(f"{path}:{name}", out)
        assert_close(out, engine_input(y))


def test_flax_layout_rule():
    """``flax.linen.ConvTranspose`` kernels: transpose_kernel=False is layout "flax" (moved and
    flipped), transpose_kernel=True stores (kD, kH, kW, Cout, Cin) like Keras (no flip)."""
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1, 3, 4, 2, 2)).astype("float32")
    # VALID with strides no longer than the kernel: flax then gives the full result, as the engine does.
    settings = [((2, 3, 4), (1, 1, 1), (1, 1, 1)), ((3, 2, 3), (2, 2, 1), (1, 1, 1)),
                ((2, 3, 2), (1, 1, 1), (2, 3, 1))]
    for kernel_size, strides, dilation in settings:
        for transpose_kernel, layout in ((False, "flax"), (True, "keras")):
            module = linen.ConvTranspose(features=3, kernel_size=kernel_size, strides=strides,
                                         padding="VALID", kernel_dilation=dilation,
                                         transpose_kernel=transpose_kernel)
            params = module.init(jax.random.PRNGKey(0), x)
            kernel = np.asarray(params["params"]["kernel"])
            bias = rng.normal(size=3).astype("float32")
            y = np.asarray(module.apply({"params": {"kernel": kernel, "bias": bias}}, x))
            weight = layouts.to_engine(kernel, layout)
            out = conv_transpose3d(engine_input(x), weight, bias, strides, 0, 0, dilation)
            assert_close(out, engine_input(y))
