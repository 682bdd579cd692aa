"""The ``col2im`` path (``engine/_col2im.py``): BLAS products per input plane, taps summed.

Its products hold a block of output channels fixed by the layer; each job keeps the
products of the planes its outputs read in a ring. These tests make the blocks small so
that a layer has several, and check results against the NumPy reference and the bits of
slabs, blocks, thread counts and ranges of planes against the whole run.
"""

import numpy as np
import pytest

from convt3d_cli import geometry
from convt3d_cli.engine import PreparedLayer, _col2im, _layer, conv_transpose3d
from reference import conv_transpose3d_ref

from test_blocks import _in_blocks, _random_layer


@pytest.fixture
def small_products(monkeypatch):
    """A few output channels per product."""
    monkeypatch.setattr(_col2im, "PRODUCT_BYTES", 4000)


def _whole(layer, x):
    out = np.empty(layer.output_shape, layer.dtype)
    layer.run_slab(x, 0, 0, layer.output_shape[2], out)
    return out


def _prepared(x, w, b, opts, dtype=np.float32):
    layer = PreparedLayer(x.shape, w, b, opts["stride"], opts["padding"], opts["output_padding"], opts["dilation"],
                          opts["groups"], np.dtype(dtype), path="col2im")
    assert layer.path == "col2im"
    return layer


@pytest.mark.parametrize("seed", range(40))
def test_random_layers_match_the_reference_in_any_slab_block_and_thread_count(seed, small_products):
    rng = np.random.default_rng(4000 + seed)
    x, w, b, opts = _random_layer(rng)
    try:
        layer = _prepared(x, w, b, opts)
    except Exception:  # noqa: BLE001 - an empty output: not a layer
        pytest.skip("no output")
    expected = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), **opts)
    whole = _whole(layer, x)
    np.testing.assert_allclose(whole, expected, rtol=2e-4, atol=2e-4 * (1 + np.abs(expected).max()))
    # one output plane at a time, as a tightly budgeted stream does
    for o in range(whole.shape[2]):
        i0, i1 = geometry.input_window(o, o + 1, x.shape[2], 0, layer.params)
        out = np.empty(whole.shape[:2] + (1,) + whole.shape[3:], np.float32)
        layer.run_slab(np.ascontiguousarray(x[:, :, i0:max(i1, i0 + 1)]), i0, o, o + 1, out)
        assert np.array_equal(out[:, :, 0], whole[:, :, o]), o
    # blocks along D (the axis the path cuts), with their own crops
    assert layer.block_axes == (0,)
    shape = (int(rng.integers(1, 5)), 10 ** 6, 10 ** 6)
    assert np.array_equal(_in_blocks(layer, x, shape), whole)
    # threads: other ranges of planes per job, the same products
    one = conv_transpose3d(x, w, b, **opts, threads=1, path="col2im")
    two = conv_transpose3d(x, w, b, **opts, threads=2, path="col2im")
    assert np.array_equal(one, whole) and np.array_equal(two, whole)


def test_float64_and_many_channels_match_the_reference():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2, 40, 5, 6, 7))
    w = rng.standard_normal((40, 6, 4, 4, 4))
    b = rng.standard_normal(6)
    got = conv_transpose3d(x, w, b, stride=2, padding=1, path="col2im")
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, conv_transpose3d_ref(x, w, b, stride=2, padding=1), rtol=1e-12, atol=1e-11)


def test_non_finite_inputs_reach_only_the_outputs_they_feed():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 3, 4, 5, 6)).astype(np.float32)
    x[0, 1, 2, 0, 0] = np.inf
    x[0, 2, 0, 4, 5] = np.nan
    w = rng.standard_normal((3, 2, 3, 3, 3)).astype(np.float32)
    got = conv_transpose3d(x, w, None, stride=2, padding=1, path="col2im")
    expected = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), None, stride=2, padding=1)
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.array_equal(np.isinf(got), np.isinf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-4, atol=1e-4)


def test_non_finite_weights_take_another_path():
    # The path reads a product of zeros where a tap falls off a row: 0 * inf would spread.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 3, 4, 5)).astype(np.float32)
    w = rng.standard_normal((2, 2, 3, 3, 3)).astype(np.float32)
    w[1, 0, 2, 2, 2] = np.inf
    layer = PreparedLayer(x.shape, w, None, 2, 1, path="col2im")
    assert layer.path == "blocked"
    got = _whole(layer, x)
    expected = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), None, stride=2, padding=1)
    assert np.array_equal(np.isinf(got), np.isinf(expected)) and np.array_equal(np.isnan(got), np.isnan(expected))


def test_the_products_shape_does_not_depend_on_the_threads(monkeypatch):
    w = np.zeros((64, 30, 3, 3, 3), np.float32)
    plans = set()
    for threads in (1, 2, 4):
        monkeypatch.setattr(_layer, "_threads", lambda threads=threads: threads)
        layer = PreparedLayer((1, 64, 20, 32, 32), w, None, 2, 1, path="col2im")
        plans.add(layer.col2im_plan()[:4])
    assert len(plans) == 1
    channels = plans.pop()[0]
    blocks = -(-30 // channels)
    assert 1 < blocks and blocks * channels - 30 < blocks   # blocks of even size, no small last one


def test_progress_adds_up_to_every_output_plane(small_products):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 4, 6, 5, 4)).astype(np.float32)
    w = rng.standard_normal((4, 7, 4, 4, 4)).astype(np.float32)
    layer = PreparedLayer(x.shape, w, None, 2, 1, path="col2im")
    steps = []
    out = np.empty(layer.output_shape, np.float32)
    layer.run_slab(x, 0, 0, layer.output_shape[2], out, progress=steps.append)
    assert len(steps) > 1 and sum(steps) == pytest.approx(2 * layer.output_shape[2])
    assert np.array_equal(out, _whole(layer, x))


def test_the_tuner_measures_it_on_many_channel_layers_only():
    rng = np.random.default_rng(6)
    many = PreparedLayer((1, 32, 4, 4, 4), rng.standard_normal((32, 8, 3, 3, 3)), None, 2, 1, path="blocked")
    assert "col2im" in many.candidate_paths()
    few = PreparedLayer((1, 16, 4, 4, 4), rng.standard_normal((16, 8, 3, 3, 3)), None, 2, 1, path="blocked")
    assert "col2im" not in few.candidate_paths()
    # kernel == stride: the gemm path is the same products with one tap per output
    k2 = PreparedLayer((1, 32, 4, 4, 4), rng.standard_normal((32, 8, 2, 2, 2)), None, 2, path="blocked")
    assert "gemm" in k2.candidate_paths() and "col2im" not in k2.candidate_paths()
    bad = rng.standard_normal((32, 8, 3, 3, 3))
    bad[0, 0, 0, 0, 0] = np.nan
    assert "col2im" not in PreparedLayer((1, 32, 4, 4, 4), bad, None, 2, 1, path="blocked").candidate_paths()
