"""Outputs computed block by block (3-D windows with their own crops) have the bits of a whole run.

Every kernel path is forced on random layers (strides 1-3, kernels 1-4, dilation, groups,
begin/end crops, output padding, batches) and random block shapes along the axes the path
allows to cut (``PreparedLayer.block_axes``); the assembled blocks must equal the whole
run bit for bit, and the whole run must match the NumPy reference.
"""

import itertools

import numpy as np
import pytest

from convt3d_cli import blocks, geometry
from convt3d_cli.engine import PreparedLayer
from reference import conv_transpose3d_ref


def _random_layer(rng):
    s = tuple(int(v) for v in rng.integers(1, 4, 3))
    k = tuple(int(v) for v in rng.integers(1, 5, 3))
    d = tuple(int(v) for v in rng.integers(1, 3, 3))
    if rng.random() < 0.3:
        k, d = s, (1, 1, 1)
    g = int(rng.choice([1, 1, 2]))
    cin = g * int(rng.integers(1, 5) if rng.random() < 0.7 else rng.integers(8, 20))
    cout_g = int(rng.integers(1, 5))
    pad = tuple(int(rng.integers(0, kk)) for kk in k) + tuple(int(rng.integers(0, kk)) for kk in k)
    if rng.random() < 0.3:
        pad = (0,) * 6
    op = tuple(int(rng.integers(0, max(ss, dd))) for ss, dd in zip(s, d))
    shape = (int(rng.integers(1, 3)), cin) + tuple(int(v) for v in rng.integers(3, 12, 3))
    w = rng.standard_normal((cin, cout_g) + k).astype(np.float32)
    b = rng.standard_normal(g * cout_g).astype(np.float32)
    x = rng.standard_normal(shape).astype(np.float32)
    return x, w, b, dict(stride=s, padding=pad, output_padding=op, dilation=d, groups=g)


def _in_blocks(layer, x, shape):
    out = np.empty(layer.output_shape, layer.dtype)
    n = layer.out_spatial

    def read(lo, hi):
        return x[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]

    for lo in itertools.product(*[range(0, n[a], shape[a]) for a in range(3)]):
        hi = tuple(min(n[a], lo[a] + shape[a]) for a in range(3))
        out[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = blocks.compute_block(layer, read, (lo, hi))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_every_path_in_blocks_has_the_bits_of_the_whole_run(seed):
    rng = np.random.default_rng(1000 + seed)
    checked = set()
    for _ in range(12):
        x, w, b, opts = _random_layer(rng)
        try:
            base = PreparedLayer(x.shape, w, b, opts["stride"], opts["padding"], opts["output_padding"],
                                 opts["dilation"], opts["groups"], np.float32)
        except Exception:  # noqa: BLE001 - an empty output: not a layer
            continue
        expected = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                              **opts)
        for path in base.candidate_paths():
            layer = PreparedLayer(x.shape, w, b, opts["stride"], opts["padding"], opts["output_padding"],
                                  opts["dilation"], opts["groups"], np.float32, path=path)
            whole = np.empty(layer.output_shape, np.float32)
            layer.run_slab(x, 0, 0, layer.output_shape[2], whole)
            np.testing.assert_allclose(whole, expected, rtol=2e-4, atol=2e-4 * (1 + np.abs(expected).max()))
            shape = tuple(int(v) if a in layer.block_axes else 10 ** 6
                          for a, v in enumerate(rng.integers(1, 9, 3)))
            got = _in_blocks(layer, x, shape)
            assert np.array_equal(whole.view(np.int32), got.view(np.int32)), (layer.path, opts, shape)
            checked.add(layer.path)
    assert {"fir", "blocked", "subpixel", "columns"} <= checked


def test_a_shuffle_layer_in_blocks_not_on_the_stride_grid():
    # k == s layers cut at odd offsets: the blocks widen to whole phases.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 24, 6, 7, 9)).astype(np.float32)
    w = rng.standard_normal((24, 5, 2, 2, 2)).astype(np.float32)
    for path in ("shuffle", "gemm", "col2im", "blocked", "columns"):
        layer = PreparedLayer(x.shape, w, None, 2, 0, 1, 1, 1, np.float32, path=path)
        whole = np.empty(layer.output_shape, np.float32)
        layer.run_slab(x, 0, 0, layer.output_shape[2], whole)
        for shape in ((3, 5, 7), (1, 1, 1), (5, 3, 2)):
            shape = tuple(v if a in layer.block_axes else 10 ** 6 for a, v in enumerate(shape))
            assert np.array_equal(whole, _in_blocks(layer, x, shape)), (path, shape)


def test_shuffle_is_not_run_on_a_layer_whose_end_crop_cuts_an_input():
    # The shuffle kernel stores every input's s**3 outputs; with an end crop along H or W
    # some fall outside the output, so the layer runs another kernel (it used to write past
    # the output array).
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 20, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((20, 3, 2, 2, 2)).astype(np.float32)
    layer = PreparedLayer(x.shape, w, None, 2, (0, 0, 0, 1, 1, 1), 0, 1, 1, np.float32, path="shuffle")
    assert layer.path != "shuffle" and "shuffle" not in layer.candidate_paths()
    out = np.empty(layer.output_shape, np.float32)
    layer.run_slab(x, 0, 0, layer.output_shape[2], out)
    expected = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), None, stride=2,
                                          padding=(0, 0, 0, 1, 1, 1))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


def test_block_window_reads_only_the_inputs_the_block_needs():
    params = geometry.LayerParams.create(4, 2, 1)
    n_in, n_out = 20, geometry.output_size(20, 4, 2, 1, 0, 1)
    for o0, o1 in ((0, 8), (8, 16), (13, 27), (30, n_out)):
        w = geometry.block_window(o0, o1, n_in, n_out, 0, params)
        lo, hi = geometry.input_window(w.computed_start, w.computed_stop, n_in, 0, params)
        assert (w.in_start, w.in_stop) == (lo, hi)
        assert w.computed_start <= o0 and w.computed_stop >= o1
        assert (w.computed_start + 1) % 2 == 0 or w.computed_start == 0  # (o + crop) on the stride grid
