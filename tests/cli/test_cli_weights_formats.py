"""``convt3d run/info/shape --weights`` with the files models live in: PyTorch, safetensors, ONNX, Keras.

The fixtures in ``tests/fixtures/weights`` were written by the frameworks themselves
(see the ``make_*_fixtures.py`` scripts there); their expected values come from the
framework too, so these tests need none of them installed.
"""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from convt3d_cli import conv_transpose3d

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "weights")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "io"))


def fixture(name):
    return os.path.join(FIXTURES, name)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    np.save(tmp_path / "x2.npy", rng.standard_normal((2, 4, 5, 3)).astype(np.float32))
    return tmp_path


@pytest.mark.parametrize("name, layer, key", [
    ("torch_state_dict.pt", "2", "2"),
    ("torch_dataparallel.pth", "2", "module.2"),           # DataParallel prefix left out of LAYER
    ("torch_lightning.ckpt", "model.2", "model.2"),        # Lightning: the state dict, not the optimizer
])
def test_pytorch_checkpoints(convt3d, folder, name, layer, key):
    shutil.copy(fixture(name), folder / name)
    expected = np.load(fixture(name.rsplit(".", 1)[0] + "_expected.npz"))
    weight, bias = expected[f"{key}.weight"], expected[f"{key}.bias"]
    report = json.loads(convt3d.ok("run", "x2.npy", "out.npy", "--weights", f"{name}:{layer}", "--stride", "2",
                                   "--json", "-q").stdout)
    assert report["weight_layout_from"] == "PyTorch checkpoint" and report["bias"].endswith(f"{key}.bias")
    x = np.load(folder / "x2.npy")
    np.testing.assert_allclose(np.load(folder / "out.npy"), conv_transpose3d(x, weight, bias, stride=2),
                               rtol=1e-6, atol=1e-6)


def test_without_layer_several_candidates_are_listed(convt3d, folder):
    shutil.copy(fixture("torch_state_dict.pt"), folder / "m.pt")
    _, error = convt3d.fails("run", "x2.npy", "out.npy", "--weights", "m.pt", code=1, match="m.pt:LAYER")
    assert "0 (2, 1, 1, 1, 1)" in error and "2 (2, 3, 2, 2, 2)" in error
    convt3d.fails("run", "x2.npy", "out.npy", "--weights", "m.pt:decoder.up9", code=1, match="no layer")


def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(convt3d, folder):
    from test_io_pytorch import PAYLOADS, good_checkpoint

    marker = folder / "pwned"
    good_checkpoint(folder / "evil.pt", [(__import__("test_io_pytorch").op_str("x"),
                                          PAYLOADS["posix.system"](marker))])
    convt3d.fails("run", "x2.npy", "out.npy", "--weights", "evil.pt", code=1, match="refusing to load posix.system")
    assert not marker.exists()


def test_legacy_and_torchscript_files_say_how_to_convert(convt3d, folder):
    for name in ("torch_legacy.pt", "torch_script.pt"):
        shutil.copy(fixture(name), folder / name)
        _, error = convt3d.fails("run", "x2.npy", "out.npy", "--weights", name, code=1)
        assert "torch.save" in error, error


def test_safetensors(convt3d, folder):
    shutil.copy(fixture("st_weights.safetensors"), folder / "w.safetensors")
    expected = np.load(fixture("st_weights_expected.npz"))
    convt3d.ok("run", "x2.npy", "out.npy", "--weights", "w.safetensors:up", "--stride", "2", "-q")
    x = np.load(folder / "x2.npy")
    np.testing.assert_allclose(np.load(folder / "out.npy"),
                               conv_transpose3d(x, expected["up.weight"], expected["up.bias"], stride=2),
                               rtol=1e-6, atol=1e-6)
    # A full tensor name works too, and safetensors may hold another framework's layout.
    convt3d.ok("run", "x2.npy", "out2.npy", "--weights", "w.safetensors:up.weight", "--stride", "2", "-q")
    assert np.array_equal(np.load(folder / "out.npy"), np.load(folder / "out2.npy"))


def test_truncated_files_are_one_error_line(convt3d, folder):
    for name in ("torch_state_dict.pt", "st_weights.safetensors", "onnx_pads_bias.onnx"):
        data = open(fixture(name), "rb").read()
        (folder / name).write_bytes(data[: len(data) // 2])
        convt3d.fails("run", "x2.npy", "out.npy", "--weights", name, code=1)


@pytest.mark.parametrize("layer", ["same_s2", "valid_mixed", "same_op", "valid_s3", "dilated", "inner_up"])
def test_keras_model_settings_and_layout(convt3d, folder, layer):
    """A Keras model's own output (saved by Keras beside the fixture) is what convt3d computes."""
    from test_io_keras import fixture as keras_fixture

    expected = np.load(keras_fixture("keras_layers.npz"))
    np.save(folder / "k.npy", np.ascontiguousarray(np.moveaxis(expected["x"], -1, 1)))   # NDHWC -> NCDHW
    for model in ("keras_layers.keras", "keras_layers.h5"):
        shutil.copy(keras_fixture(model), folder / model)
        report = json.loads(convt3d.ok("run", "k.npy", "out.npy", "--weights", f"{model}:{layer}", "--json",
                                       "-q", "--overwrite").stdout)
        assert report["weight_layout"] == "keras" and report["settings_from"]["stride"].startswith(model)
        got = np.moveaxis(np.load(folder / "out.npy"), 1, -1)
        np.testing.assert_allclose(got, expected[f"y_{layer}"], rtol=0, atol=2e-5)


def test_keras_file_without_the_layer(convt3d, folder):
    from test_io_keras import fixture as keras_fixture

    shutil.copy(keras_fixture("keras_layers.keras"), folder / "m.keras")
    convt3d.fails("run", "x2.npy", "out.npy", "--weights", "m.keras:nope", code=1, match="nope")


def test_onnx_node_attributes(convt3d, folder):
    pytest.importorskip("onnx")
    data = np.load(fixture("onnx_pads_bias.npz"))
    shutil.copy(fixture("onnx_pads_bias.onnx"), folder / "m.onnx")
    np.save(folder / "xo.npy", data[data.files[0]])
    convt3d.ok("run", "xo.npy", "out.npy", "--weights", "m.onnx", "-q")
    np.testing.assert_allclose(np.load(folder / "out.npy"), data[data.files[1]], rtol=0, atol=2e-5)


@pytest.mark.parametrize("name", ["torch_lightning.ckpt", "st_weights.safetensors", "onnx_same_groups.onnx"])
def test_info_lists_candidate_layers_with_their_settings(convt3d, folder, name):
    if name.endswith(".onnx"):
        pytest.importorskip("onnx")
    shutil.copy(fixture(name), folder / name)
    report = json.loads(convt3d.ok("info", name, "--json").stdout)
    assert report["kind"] == "weights" and report["layers"]
    for layer in report["layers"]:
        assert {"name", "stored_shape", "weight_shape", "layout", "bias", "settings"} <= set(layer)
    assert "layers:" in convt3d.ok("info", name).stdout


def test_weights_files_are_not_volumes_or_outputs(convt3d, folder):
    shutil.copy(fixture("torch_state_dict.pt"), folder / "m.pt")
    convt3d.fails("run", "m.pt", "out.npy", "--kernel", "nearest", "--stride", "2", code=1, match="not a volume")
    convt3d.fails("run", "x2.npy", "out.pt", "--kernel", "nearest", "--stride", "2", code=1,
                  match="unsupported output type")
