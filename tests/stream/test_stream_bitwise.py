"""Streamed runs (many slabs) write byte for byte the file of an in-memory run, in every format."""

import json

import h5py
import nibabel as nib
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.builtin import apply_builtin
from convt3d_cli.engine import conv_transpose3d

OUTPUTS = ["out.nii", "out.nii.gz", "out.h5", "out.npy", "out.npz"]
LAYERS = {
    "linear": ("--kernel", "linear", "--stride", "2"),
    "nearest": ("--kernel", "nearest", "--stride", "3"),
    "w1": ("--weights", "w1.npz", "--stride", "2,3,1", "--padding", "1,0,1", "--output-padding", "1,0,0"),
    "w8": ("--weights", "w8.npy", "--stride", "2", "--padding", "1,1,0", "--dilation", "1,2,1"),
}


def _load(path):
    """Output data in engine layout (N, C, D, H, W), float."""
    path = str(path)
    if path.endswith((".nii", ".nii.gz")):
        data = np.asanyarray(nib.load(path).dataobj)
        return data[None, None] if data.ndim == 3 else np.moveaxis(data, -1, 0)[None]
    if path.endswith(".h5"):
        with h5py.File(path) as handle:
            data = handle["/volume"][()]
    elif path.endswith(".npz"):
        with np.load(path) as archive:
            data = archive["volume"]
    else:
        data = np.load(path)
    return data.reshape((1,) * (5 - data.ndim) + data.shape)


def _expected(folder, source, layer):
    volume = io.read_volume(str(folder / source)).data
    if layer in ("linear", "nearest"):
        return apply_builtin(volume, layer, int(LAYERS[layer][3]))
    if layer == "w1":
        with np.load(folder / "w1.npz") as f:
            w, b = f["weight"], f["bias"]
        return conv_transpose3d(volume, w, b, (2, 3, 1), (1, 0, 1), (1, 0, 0))
    return conv_transpose3d(volume, np.load(folder / "w8.npy"), None, 2, (1, 1, 0), 0, (1, 2, 1))


def _compare(run, source, layer, output, budget="12K"):
    folder = run.folder
    whole, streamed = "whole_" + output, "streamed_" + output
    args = ("run", source, None, *LAYERS[layer], "--json", "-q", "--overwrite")
    first = json.loads(run(*[whole if a is None else a for a in args]).stdout)
    second = json.loads(run(*[streamed if a is None else a for a in args], "--max-memory", budget).stdout)
    assert first["slabs"] == 1
    assert second["slabs"] > 2, second["slabs"]
    assert second["peak_memory_bytes"] > 0
    assert (folder / whole).read_bytes() == (folder / streamed).read_bytes()
    got = _load(folder / streamed)
    want = _expected(folder, source, layer)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert not [p for p in folder.iterdir() if ".convt3d" in p.name]
    return got


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("layer", ["linear", "nearest", "w1"])
def test_streamed_equals_in_memory_nifti_input(run, tiny_budget, layer, output):
    _compare(run, "vol.nii", layer, output)


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("source", ["vol.nii.gz", "vol.h5:/scan/data", "vol.npy", "vol.npz"])
def test_streamed_equals_in_memory_every_input(run, tiny_budget, source, output):
    # An npz member is loaded whole (8 KiB here), on top of the slabs.
    _compare(run, source, "linear", output, budget="24K" if source.endswith(".npz") else "12K")


@pytest.mark.parametrize("output", OUTPUTS)
def test_streamed_blocked_path(run, tiny_budget, output):
    _compare(run, "vol.npy", "w8", output, budget="300K")


@pytest.mark.parametrize("output", OUTPUTS)
@pytest.mark.parametrize("source,layer", [("two.nii.gz", "linear"), ("two.npy", "nearest"),
                                          ("vol.nii.gz", "w1")])
def test_streamed_multichannel(run, tiny_budget, source, layer, output):
    _compare(run, source, layer, output, budget="24K")


def test_streamed_nii_is_what_nibabel_writes(run, tiny_budget, volumes):
    run("run", "vol.nii.gz", "nb_streamed.nii", *LAYERS["w1"], "--max-memory", "12K", "-q")
    info = io.probe_volume(str(volumes / "vol.nii.gz"))
    data = _load(volumes / "nb_streamed.nii")
    from convt3d_cli.layerplan import plan_layer

    plan = plan_layer(info.engine_shape, {"stride": (2, 3, 1), "padding": (1, 0, 1),
                                          "output_padding": (1, 0, 0)},
                      weight_shape=(1, 2, 3, 2, 3), bias_shape=(2,))
    plan.validate()
    io.write_volume(str(volumes / "nb_whole.nii"), data, like=info, params=plan.params,
                    formula=plan.formula, overwrite=True, dtype="float32")
    assert (volumes / "nb_streamed.nii").read_bytes() == (volumes / "nb_whole.nii").read_bytes()
