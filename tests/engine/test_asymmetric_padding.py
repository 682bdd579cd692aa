"""Different crops at the two ends of an axis (ONNX ``pads``, "same" padding).

The output is the full transposed-convolution result cropped by ``b`` at the start
and ``e - output_padding`` at the end. Every compute path is checked against the
NumPy reference, streamed slabs against a whole run, the geometry against the
formula, and the engine against PyTorch (full result cropped by hand).
"""

import numpy as np
import pytest
from helpers import run_in_slabs
from reference import conv_transpose3d_ref

from convt3d_cli import conv_transpose3d, geometry
from convt3d_cli.engine import ConvTranspose3d, PreparedLayer, _layer
from convt3d_cli.errors import ParameterError


def random_asymmetric(rng):
    """A random valid layer whose begin and end crops differ on at least one axis."""
    while True:
        groups = int(rng.choice([1, 1, 2]))
        cin, cout = groups * int(rng.integers(1, 4)), groups * int(rng.integers(1, 4))
        k = tuple(int(v) for v in rng.integers(1, 5, size=3))
        s = tuple(int(v) for v in rng.integers(1, 4, size=3))
        d = tuple(int(v) for v in rng.integers(1, 3, size=3))
        begin = tuple(int(v) for v in rng.integers(0, 3, size=3))
        end = tuple(int(v) for v in rng.integers(0, 3, size=3))
        if begin == end:
            continue
        op = tuple(int(rng.integers(0, max(si, di))) for si, di in zip(s, d))
        spatial = tuple(int(v) for v in rng.integers(1, 6, size=3))
        n = int(rng.integers(1, 3))
        padding = begin + end
        try:
            geometry.output_shape((n, cin) + spatial, cout, k, s, padding, op, d, groups)
        except ParameterError:
            continue
        x = rng.standard_normal((n, cin) + spatial)
        w = rng.standard_normal((cin, cout // groups) + k)
        b = rng.standard_normal(cout) if rng.random() < 0.7 else None
        return x, w, b, dict(stride=s, padding=padding, output_padding=op, dilation=d, groups=groups)


@pytest.fixture(params=["fir", "blocked", "subpixel", "paired", "shuffle", "gemm", "col2im", "columns"])
def path(request, monkeypatch):
    monkeypatch.setattr(_layer, "choose_path", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("seed", range(40))
def test_random_asymmetric_layers_match_reference(seed, path):
    rng = np.random.default_rng(7000 + seed)
    x, w, b, kwargs = random_asymmetric(rng)
    expected = conv_transpose3d_ref(x, w, b, **kwargs)
    got = conv_transpose3d(x, w, b, **kwargs, dtype="float64")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("kwargs", [
    # ONNX pads [0,0,0,1,1,1] with k2 s2: the shuffle kernel's shape with one plane less.
    dict(stride=2, padding=(0, 0, 0, 1, 1, 1)),
    # "same" of an even kernel: 1 at the start, 2 at the end.
    dict(stride=2, padding=(1, 1, 1, 2, 2, 2)),
    dict(stride=(2, 1, 3), padding=(1, 0, 2, 0, 1, 1), output_padding=(1, 0, 2), dilation=(1, 2, 1)),
])
def test_slabs_are_bitwise_identical_to_whole_volume(kwargs, path):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 4, 9, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 4, 3, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    whole = conv_transpose3d(x, w, b, **kwargs)
    layer = PreparedLayer(x.shape, w, b, dtype=np.float32, **kwargs)
    n_out = whole.shape[2]
    for cuts in ([0, 5, n_out], [0, 1, 2, 7, n_out], [0, n_out - 1, n_out]):
        np.testing.assert_array_equal(run_in_slabs(layer, x, cuts, np.float32), whole)


def test_the_forms_of_padding_agree():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 2, 4, 5, 3)).astype(np.float32)
    w = rng.standard_normal((2, 3, 3, 3, 3)).astype(np.float32)
    six = conv_transpose3d(x, w, stride=2, padding=(0, 1, 2, 1, 0, 2))
    pair = conv_transpose3d(x, w, stride=2, padding=((0, 1, 2), (1, 0, 2)))
    np.testing.assert_array_equal(six, pair)
    # Equal ends are the symmetric layer, bit for bit.
    np.testing.assert_array_equal(conv_transpose3d(x, w, stride=2, padding=(1, 1, 1, 1, 1, 1)),
                                  conv_transpose3d(x, w, stride=2, padding=1))


def test_geometry_of_asymmetric_crops():
    params = geometry.LayerParams.create(3, 2, (0, 0, 0, 1, 1, 1), 1)
    assert not params.symmetric
    assert params.padding == (0, 0, 0) and params.padding_end == (1, 1, 1) and params.crop_end == (0, 0, 0)
    assert geometry.output_spatial((4, 4, 4), params) == (9, 9, 9)
    assert geometry.formula_line(0, 4, params) == "D_out = (4 - 1) * 2 - 0 - 1 + 1 * (3 - 1) + 1 + 1 = 9"
    report = params.as_dict()
    assert report["padding"] == [0, 0, 0, 1, 1, 1] and report["crop_begin"] == [0, 0, 0]
    assert report["crop_end"] == [0, 0, 0]
    symmetric = geometry.LayerParams.create(3, 2, 1)
    assert symmetric.symmetric and symmetric.as_dict()["padding"] == [1, 1, 1]
    assert geometry.formula_line(0, 4, symmetric) == "D_out = (4 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 0 + 1 = 7"
    assert params.reversed_axes().padding_end == (1, 1, 1)
    mixed = geometry.LayerParams.create(3, 1, (1, 2, 3, 4, 5, 6))
    assert mixed.reversed_axes().padding == (3, 2, 1) and mixed.reversed_axes().padding_end == (6, 5, 4)


def test_affine_follows_the_begin_crop_only():
    start = geometry.output_affine(np.eye(4), geometry.LayerParams.create(3, 2, (1, 1, 1, 0, 0, 0)))
    same_begin = geometry.output_affine(np.eye(4), geometry.LayerParams.create(3, 2, 1))
    np.testing.assert_array_equal(start, same_begin)
    other = geometry.output_affine(np.eye(4), geometry.LayerParams.create(3, 2, (0, 0, 0, 1, 1, 1)))
    np.testing.assert_allclose(other[:3, 3], [-0.5, -0.5, -0.5])


@pytest.mark.parametrize("padding", [(0, 0, 0, 0, 0, -1), (1, 2), (1, 2, 3, 4), ((1, 1), (1, 1, 1)), "1"])
def test_bad_padding_is_refused(padding):
    with pytest.raises(ParameterError) as err:
        geometry.LayerParams.create(3, 2, padding)
    assert err.value.param == "padding"


def test_module_keeps_the_six_values():
    layer = ConvTranspose3d(1, 1, 2, stride=2, padding=(0, 0, 0, 1, 1, 1), seed=0)
    assert layer.padding == (0, 0, 0, 1, 1, 1)
    assert layer.output_shape((1, 1, 4, 4, 4)) == (1, 1, 7, 7, 7)
    assert "padding=(0, 0, 0, 1, 1, 1)" in repr(layer)
    assert layer(np.ones((1, 1, 4, 4, 4), np.float32)).shape == (1, 1, 7, 7, 7)


def test_split_end_crop():
    assert geometry.split_end_crop(2) == (2, 0)
    assert geometry.split_end_crop(-1) == (0, 1)
    assert geometry.split_end_crop(0) == (0, 0)


@pytest.mark.parametrize("seed", range(12))
def test_against_pytorch_full_result_cropped(seed):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9000 + seed)
    x, w, b, kwargs = random_asymmetric(rng)
    x, w = x.astype(np.float32), w.astype(np.float32)
    b = None if b is None else b.astype(np.float32)
    full = torch.nn.functional.conv_transpose3d(
        torch.from_numpy(x), torch.from_numpy(w), None if b is None else torch.from_numpy(b),
        stride=kwargs["stride"], dilation=kwargs["dilation"], groups=kwargs["groups"]).numpy()
    begin, end = kwargs["padding"][:3], kwargs["padding"][3:]
    crop_end = [e - op for e, op in zip(end, kwargs["output_padding"])]
    # Negative end crops are extra planes holding the bias only.
    pads = [(0, 0), (0, 0)] + [(0, max(-c, 0)) for c in crop_end]
    filled = np.pad(full - (0 if b is None else b.reshape(1, -1, 1, 1, 1)), pads)
    if b is not None:
        filled = filled + b.reshape(1, -1, 1, 1, 1)
    stop = [filled.shape[2 + a] - max(crop_end[a], 0) for a in range(3)]
    expected = filled[:, :, begin[0]:stop[0], begin[1]:stop[1], begin[2]:stop[2]]
    got = conv_transpose3d(x, w, b, **kwargs)
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= 2e-5 * scale
