"""The ``gemm`` path (``engine/_gemm.py``): BLAS products over chunks of input planes.

Its products are cut into chunks of whole input planes and blocks of output channels
fixed by the layer; slabs and blocks that hold part of a chunk multiply the whole chunk
with zeros for the planes they lack. These tests make the chunks small so that every
volume has several, and check the results against the NumPy reference and the bits of
slabs, blocks and thread counts against the whole run.
"""

import os
import signal

import numpy as np
import pytest

from convt3d_cli import blocks
from convt3d_cli.engine import PreparedLayer, _gemm, conv_transpose3d
from reference import conv_transpose3d_ref


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of about 2 planes of the test volumes and a few channels per product."""
    monkeypatch.setattr(_gemm, "MIN_COLUMNS", 40)
    monkeypatch.setattr(_gemm, "PRODUCT_BYTES", 6000)


def _layer(rng, n=2, cin=6, cout=10, groups=2, spatial=(7, 5, 6), stride=(2, 2, 2), padding=0,
           output_padding=0, dtype=np.float32):
    x = rng.standard_normal((n, cin) + spatial).astype(dtype)
    w = rng.standard_normal((cin, cout // groups) + stride).astype(dtype)
    b = rng.standard_normal(cout).astype(dtype)
    layer = PreparedLayer(x.shape, w, b, stride, padding, output_padding, 1, groups, np.dtype(dtype), path="gemm")
    assert layer.path == "gemm"
    return layer, x, w, b


def _whole(layer, x):
    out = np.empty(layer.output_shape, layer.dtype)
    layer.run_slab(x, 0, 0, layer.output_shape[2], out)
    return out


@pytest.mark.parametrize("stride,padding,output_padding", [
    ((2, 2, 2), 0, 0), ((3, 1, 2), 0, 0), ((2, 3, 3), 0, (1, 2, 0)), ((2, 2, 2), (0, 0, 0, 1, 1, 1), 0),
    ((1, 1, 1), 0, 0)])
def test_several_chunks_match_the_reference(small_chunks, stride, padding, output_padding):
    rng = np.random.default_rng(5)
    layer, x, w, b = _layer(rng, stride=stride, padding=padding, output_padding=output_padding)
    plan = layer.gemm_plan()
    assert plan.planes < x.shape[2]                                     # several chunks
    assert plan.channels < layer.cout_g or np.prod(stride) == 1         # and channel blocks
    expected = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                    stride=stride, padding=padding, output_padding=output_padding, groups=2)
    np.testing.assert_allclose(_whole(layer, x), expected, rtol=1e-4, atol=1e-4)


def test_every_slab_split_has_the_bits_of_the_whole_run(small_chunks):
    rng = np.random.default_rng(6)
    layer, x, _, _ = _layer(rng, output_padding=1)
    whole = _whole(layer, x)
    n_out, s = layer.output_shape[2], layer.params.stride[0]
    for o0 in range(n_out):
        for o1 in range(o0 + 1, n_out + 1):
            i0 = min(o0 // s, x.shape[2] - 1)
            i1 = max(i0 + 1, min(x.shape[2], (o1 - 1) // s + 1))
            out = np.empty(layer.output_shape[:2] + (o1 - o0,) + layer.output_shape[3:], np.float32)
            steps = []
            layer.run_slab(np.ascontiguousarray(x[:, :, i0:i1]), i0, o0, o1, out, steps.append)
            assert np.array_equal(out, whole[:, :, o0:o1]), (o0, o1)
            assert sum(steps) == pytest.approx(x.shape[0] * (o1 - o0))


def test_blocks_keep_the_whole_layers_chunks(small_chunks):
    rng = np.random.default_rng(7)
    layer, x, _, _ = _layer(rng, spatial=(9, 4, 5))
    whole = _whole(layer, x)

    def read(lo, hi):
        return x[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]

    n = layer.out_spatial
    for depth in (1, 3, 4, 5):
        out = np.empty_like(whole)
        for d0 in range(0, n[0], depth):
            region = ((d0, 0, 0), (min(n[0], d0 + depth), n[1], n[2]))
            out[:, :, d0:region[1][0]] = blocks.compute_block(layer, read, region)
        assert np.array_equal(out, whole), depth
    sub = layer.window((2, 6, 3, 4, 5), layer.params, origin=3)
    assert sub.gemm_plan() == layer.gemm_plan()._replace(origin=3)


def test_thread_counts_give_the_same_bits(small_chunks):
    rng = np.random.default_rng(8)
    layer, x, w, b = _layer(rng)
    one = conv_transpose3d(x, w, b, 2, groups=2, threads=1, path="gemm")
    two = conv_transpose3d(x, w, b, 2, groups=2, threads=2, path="gemm")
    assert np.array_equal(one, two)
    assert np.array_equal(one, _whole(layer, x))


def test_float64_and_non_finite_inputs_stay_local(small_chunks):
    rng = np.random.default_rng(9)
    layer, x, w, b = _layer(rng, dtype=np.float64)
    x[1, 2, 3, 1, 2] = np.inf
    x[0, 4, 0, 0, 0] = np.nan
    got = _whole(layer, x)
    expected = conv_transpose3d_ref(x, w, b, stride=2, groups=2)
    same = np.isfinite(expected)
    np.testing.assert_allclose(got[same], expected[same], rtol=1e-12, atol=1e-12)
    assert np.array_equal(np.isnan(got), np.isnan(expected))


def test_a_failing_product_is_raised_not_swallowed(small_chunks):
    rng = np.random.default_rng(10)
    layer, x, _, _ = _layer(rng)

    def broken(*args):
        raise MemoryError("no room for the product")

    out = np.empty(layer.output_shape, np.float32)
    with pytest.raises(MemoryError):
        _gemm.run(layer.gemm_plan(), layer.weight, layer.bias, x, 0, x.shape[2], 0, layer.output_shape[2], out, 2,
                  broken)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork here")
def test_a_forked_child_runs_the_path_with_fresh_workers(small_chunks):
    # The parent's worker threads do not exist in a forked child; the child must not wait
    # for them.
    rng = np.random.default_rng(11)
    layer, x, w, b = _layer(rng)
    whole = conv_transpose3d(x, w, b, 2, groups=2, threads=2, path="gemm")
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 2
        try:
            signal.alarm(60)
            same = np.array_equal(conv_transpose3d(x, w, b, 2, groups=2, threads=2, path="gemm"), whole)
            code = 0 if same else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status


def test_default_chunks_keep_the_bits_on_blas_sized_products():
    # Products large enough for BLAS's sums to depend on their shape and thread count
    # (OpenBLAS's do): slabs with partial chunks, one thread and two give the same bits.
    rng = np.random.default_rng(12)
    layer, x, w, b = _layer(rng, n=1, cin=64, cout=32, groups=1, spatial=(6, 16, 16))
    plan = layer.gemm_plan()
    assert plan.planes == 2 and plan.planes < x.shape[2]
    whole = conv_transpose3d(x, w, b, 2, threads=2, path="gemm")
    assert np.array_equal(whole, conv_transpose3d(x, w, b, 2, threads=1, path="gemm"))
    for o0, o1 in ((0, 3), (3, 12), (5, 6), (1, 11)):
        i0, i1 = o0 // 2, (o1 - 1) // 2 + 1
        out = np.empty(layer.output_shape[:2] + (o1 - o0,) + layer.output_shape[3:], np.float32)
        layer.run_slab(np.ascontiguousarray(x[:, :, i0:i1]), i0, o0, o1, out)
        assert np.array_equal(out, whole[:, :, o0:o1]), (o0, o1)


def _scatter_reference(prod, bias, out, n, co_base, stride, chunk_start, dl_lo, dl_hi, n_ih, n_iw, out_start):
    """What ``gemm_scatter`` writes, element by element."""
    s_d, s_h, s_w = stride
    n_od, n_oh, n_ow = out.shape[2:]
    h_n, w_n = min(n_oh, n_ih * s_h), min(n_ow, n_iw * s_w)
    for co in range(prod.shape[0] // (s_d * s_h * s_w)):
        for dl in range(dl_lo, dl_hi):
            for kd in range(s_d):
                od = (chunk_start + dl) * s_d + kd - out_start
                if not 0 <= od < n_od:
                    continue
                out[n, co_base + co, od] = bias[co_base + co]
                for kh in range(s_h):
                    for kw in range(s_w):
                        row = ((co * s_d + kd) * s_h + kh) * s_w + kw
                        cols = prod[row, dl * n_ih * n_iw:(dl + 1) * n_ih * n_iw].reshape(n_ih, n_iw)
                        rows_h = len(range(kh, h_n, s_h))
                        rows_w = len(range(kw, w_n, s_w))
                        out[n, co_base + co, od, kh:h_n:s_h, kw:w_n:s_w] = (cols[:rows_h, :rows_w]
                                                                              + bias[co_base + co])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("stride,n_iw,crop_w,crop_h", [
    ((2, 2, 2), 8, 0, 0),      # one whole vector per output row
    ((2, 2, 2), 20, 0, 0),     # vectors and an element tail
    ((2, 2, 2), 17, 1, 1),     # an odd row (the last W input cut in half) and a cut H
    ((2, 2, 2), 3, 3, 0),      # shorter than a vector, bias past the inputs' reach
    ((1, 3, 3), 9, 2, 2),
    ((2, 1, 1), 16, 0, 0)])
def test_the_scatter_puts_every_product_element_in_its_place(dtype, stride, n_iw, crop_w, crop_h):
    from convt3d_cli.engine._numba_env import kernels

    rng = np.random.default_rng(13)
    n_co, kp, n_ih, co_base, n_batch = 3, 2, 5, 2, 2
    n_phase = int(np.prod(stride))
    prod = rng.standard_normal((n_co * n_phase, kp * n_ih * n_iw)).astype(dtype)
    bias = rng.standard_normal(8).astype(dtype)
    out_shape = (n_batch, 8, 3, n_ih * stride[1] - crop_h + (1 if crop_h == 0 else 0), n_iw * stride[2] - crop_w)
    got = np.full(out_shape, np.nan, dtype)
    expected = got.copy()
    # Output planes 1-3 of the layer: chunk 0 (input planes 0-1), plane 0 of it dropped.
    args = (1, co_base, *stride, 0, 0, kp, n_ih, n_iw, 1)
    kernels().gemm_scatter(prod, bias, got, *args)
    _scatter_reference(prod, bias, expected, 1, co_base, stride, 0, 0, kp, n_ih, n_iw, 1)
    np.testing.assert_array_equal(got, expected)
    assert np.isnan(got[0]).all() and np.isnan(got[1, :co_base]).all()   # nothing else written
