"""The engine against the slow NumPy reference, the Conv3d adjoint identity and PyTorch.

Sizes stay tiny and the dtype/layout mix is fixed so that the Numba kernels
compile once per dtype for the whole suite.
"""

import mmap

import numpy as np
import pytest
from helpers import run_in_slabs
from reference import conv3d_ref, conv_transpose3d_ref

from convt3d_cli import ConvTranspose3d, conv_transpose3d, output_shape
from convt3d_cli.engine import _layer
from convt3d_cli.errors import Convt3dError, ParameterError, ShapeError


def random_config(rng):
    """One random, valid configuration across the whole parameter space (small sizes)."""
    while True:
        groups = int(rng.choice([1, 1, 1, 2, 3]))
        cin = groups * int(rng.integers(1, 4))
        cout = groups * int(rng.integers(1, 4))
        per_axis = rng.random() < 0.5
        def draw(lo, hi):
            if per_axis:
                return tuple(int(v) for v in rng.integers(lo, hi + 1, size=3))
            return int(rng.integers(lo, hi + 1))
        k = draw(1, 4)
        s = draw(1, 3)
        d = draw(1, 2)
        p = draw(0, 2)
        s3, d3 = (v if isinstance(v, tuple) else (v,) * 3 for v in (s, d))
        op = tuple(int(rng.integers(0, max(si, di))) for si, di in zip(s3, d3))
        if not per_axis and len(set(op)) == 1:
            op = op[0]
        spatial = tuple(int(v) for v in rng.integers(1, 6, size=3))
        n = int(rng.integers(1, 3))
        try:
            output_shape((n, cin) + spatial, cout, k, s, p, op, d, groups)
        except ParameterError:
            continue  # empty output: draw again
        return dict(n=n, cin=cin, cout=cout, spatial=spatial, kernel=k, stride=s, padding=p,
                    output_padding=op, dilation=d, groups=groups, bias=bool(rng.random() < 0.7))


def make_data(cfg, rng, dtype=np.float64):
    k = cfg["kernel"] if isinstance(cfg["kernel"], tuple) else (cfg["kernel"],) * 3
    x = rng.standard_normal((cfg["n"], cfg["cin"]) + cfg["spatial"]).astype(dtype)
    w = rng.standard_normal((cfg["cin"], cfg["cout"] // cfg["groups"]) + k).astype(dtype)
    b = rng.standard_normal(cfg["cout"]).astype(dtype) if cfg["bias"] else None
    return x, w, b


def layer_kwargs(cfg):
    return {key: cfg[key] for key in ("stride", "padding", "output_padding", "dilation", "groups")}


def paired_config(cfg, rng):
    """``cfg`` turned into a layer of the paired-rows kernel: W stride 2, dilation 1 and a
    kernel of at most 4 along W (at most two taps per W phase)."""
    def axes(v):
        return list(v) if isinstance(v, tuple) else [v] * 3
    cfg = dict(cfg)
    k, s, p, op, d = (axes(cfg[key]) for key in ("kernel", "stride", "padding", "output_padding", "dilation"))
    k[2], s[2], d[2] = int(rng.integers(1, 5)), 2, 1
    p[2], op[2] = min(p[2], k[2] - 1), int(rng.integers(0, 2))
    cfg.update(kernel=tuple(k), stride=tuple(s), padding=tuple(p), output_padding=tuple(op), dilation=tuple(d))
    try:
        output_shape((cfg["n"], cfg["cin"]) + cfg["spatial"], cfg["cout"], cfg["kernel"], **layer_kwargs(cfg))
    except ParameterError:
        cfg["padding"] = (p[0], p[1], 0)  # the W axis came out empty: no padding makes it >= 2
    return cfg


def shuffle_config(cfg, rng):
    """``cfg`` turned into a layer of the shuffle-GEMM kernel: along every axis the kernel
    equals the stride, without padding (a 1-wide kernel may have any dilation)."""
    cfg = dict(cfg)
    s = tuple(int(v) for v in rng.integers(1, 4, size=3))
    d = tuple(int(rng.integers(1, 3)) if si == 1 else 1 for si in s)
    op = tuple(int(rng.integers(0, max(si, di))) for si, di in zip(s, d))
    cfg.update(kernel=s, stride=s, padding=0, output_padding=op, dilation=d)
    return cfg


# "blocked" runs this CPU's default register block; 8x16 is the default on AVX-512 CPUs, 3x32
# the other block measured on AVX2 ones, 12x16 and 16x16 compiled for 512-bit vectors.
@pytest.fixture(params=["fir", "blocked", "subpixel", "paired", "shuffle", "gemm", "col2im", "columns",
                        "blocked-8x16", "blocked-3x32", "blocked-12x16", "blocked-16x16"])
def path(request, monkeypatch):
    """Run a test once through each compute path, whatever the channel counts (``paired``
    serves W stride 2 only: other layers then take the FIR kernel; ``shuffle`` serves
    kernel == stride without padding only: other layers take the blocked kernel)."""
    monkeypatch.setattr(_layer, "choose_path", lambda *args: request.param)
    return request.param


@pytest.mark.parametrize("seed", range(150))
def test_random_configs_match_reference(seed, path):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    x, w, b = make_data(cfg, rng)
    expected = conv_transpose3d_ref(x, w, b, **layer_kwargs(cfg))
    got = conv_transpose3d(x, w, b, **layer_kwargs(cfg), dtype="float64")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("seed", range(1000, 1040))
def test_float32_accuracy(seed, path):
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    x, w, b = make_data(cfg, rng)
    expected = conv_transpose3d_ref(x, w, b, **layer_kwargs(cfg))
    got = conv_transpose3d(x.astype(np.float32), w.astype(np.float32), None if b is None else b.astype(np.float32),
                           **layer_kwargs(cfg))
    assert got.dtype == np.float32
    scale = max(1e-30, np.abs(expected).max())
    assert np.abs(got - expected).max() <= 2e-5 * scale


@pytest.mark.parametrize("seed", range(2000, 2030))
def test_adjoint_of_conv3d(seed, path):
    """<conv_transpose3d(x, w), y> == <x, conv3d(y, w)>: an identity independent of the reference."""
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    cfg["bias"] = False
    x, w, _ = make_data(cfg, rng)
    y_shape = output_shape(x.shape, cfg["cout"], w.shape[2:], **layer_kwargs(cfg))
    y = rng.standard_normal(y_shape)
    lhs = np.vdot(conv_transpose3d(x, w, **layer_kwargs(cfg), dtype="float64"), y)
    back = conv3d_ref(y, w, cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], in_spatial=x.shape[2:])
    rhs = np.vdot(x, back)
    assert lhs == pytest.approx(rhs, rel=1e-10, abs=1e-10)


def assert_planes_bitwise_equal(layer, x, got):
    """Each output plane of ``got`` computed alone (a tightly budgeted stream: one plane and
    its input window) is bitwise equal to the whole-volume result."""
    from convt3d_cli import geometry
    for o in range(got.shape[2]):
        i0, i1 = geometry.input_window(o, o + 1, x.shape[2], 0, layer.params)
        out = np.empty(got.shape[:2] + (1,) + got.shape[3:])
        layer.run_slab(np.ascontiguousarray(x[:, :, i0:max(i1, i0 + 1)]), i0, o, o + 1, out)
        assert np.array_equal(out[:, :, 0], got[:, :, o])


@pytest.mark.parametrize("kind, seed", [("paired", seed) for seed in range(3000, 3060)]
                         + [("shuffle", seed) for seed in range(3100, 3160)]
                         + [("gemm", seed) for seed in range(3200, 3240)])
def test_kernels_on_their_own_layers(kind, seed, monkeypatch):
    """The paired-rows kernel on random W-stride-2 layers and the shuffle-GEMM kernel on
    random kernel == stride layers (the fixture's random layers seldom fit them): against
    the reference, and one output plane at a time (a tightly budgeted stream) bitwise
    equal to the whole volume."""
    from convt3d_cli.engine import PreparedLayer
    monkeypatch.setattr(_layer, "choose_path", lambda *args: kind)
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    cfg = paired_config(cfg, rng) if kind == "paired" else shuffle_config(cfg, rng)
    if seed % 4 == 0:  # rows of a position block and more: one output row per sweep
        cfg["spatial"] = cfg["spatial"][:2] + (int(rng.integers(32, 70)),)
    x, w, b = make_data(cfg, rng)
    kwargs = layer_kwargs(cfg)
    layer = PreparedLayer(x.shape, w, b, dtype=np.float64, **kwargs)
    assert layer.path == kind
    expected = conv_transpose3d_ref(x, w, b, **kwargs)
    got = conv_transpose3d(x, w, b, **kwargs, dtype="float64")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))
    assert_planes_bitwise_equal(layer, x, got)


@pytest.mark.parametrize("padding, output_padding, width, groups", [
    (1, 0, 7, 1), (1, 1, 7, 1), (3, 1, 9, 1), ((2, 1, 1), (1, 0, 1), 33, 2), ((1, 0, 3), 0, 40, 3)])
def test_paired_shared_column_rows(padding, output_padding, width, groups, monkeypatch):
    """k4 s2 with odd W padding (A reads columns c + 1 and c, B c + 2 and c + 1) at one
    input channel per group, where ``paired_rows`` loads each column once: odd output
    widths (A's extra last column), several groups and samples, against the reference and
    one plane at a time."""
    from convt3d_cli.engine import PreparedLayer
    monkeypatch.setattr(_layer, "COLUMNS_MAX_MACS", 0)
    rng = np.random.default_rng(width)
    x = rng.standard_normal((2, groups, 4, 5, width))
    w = rng.standard_normal((groups, 1, 4, 4, 4))
    b = rng.standard_normal(groups)
    kwargs = dict(stride=2, padding=padding, output_padding=output_padding, groups=groups)
    layer = PreparedLayer(x.shape, w, b, dtype=np.float64, **kwargs)
    w_off = layer._paired_plan().w_off
    assert layer.path == "paired" and w_off[0, 0] == w_off[0, 1] + 1 == w_off[1, 1] == w_off[1, 0] - 1
    expected = conv_transpose3d_ref(x, w, b, **kwargs)
    got = conv_transpose3d(x, w, b, **kwargs, dtype="float64")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())
    assert_planes_bitwise_equal(layer, x, got)


def test_unbatched_input_and_megengine_grouped_weight(path):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 3, 4, 5))         # (C, D, H, W)
    w = rng.standard_normal((6, 2, 2, 3, 2))      # PyTorch layout (Cin, Cout/g, k...), groups=3
    b = rng.standard_normal(6)
    expected = conv_transpose3d_ref(x[None], w, b, stride=2, padding=1, groups=3)[0]
    got = conv_transpose3d(x, w, b, stride=2, padding=1, groups=3, dtype="float64")
    assert got.shape == expected.shape == (6, 4, 7, 8)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    grouped = w.reshape(3, 2, 2, 2, 3, 2)         # MegEngine (groups, Cin/g, Cout/g, k...)
    np.testing.assert_array_equal(
        conv_transpose3d(x, grouped, b.reshape(1, 6, 1, 1, 1), stride=2, padding=1, groups=3, dtype="float64"), got)


def test_integer_input_is_converted_and_dtype_follows_request():
    x = np.arange(8, dtype=np.int16).reshape(1, 1, 2, 2, 2)
    w = np.ones((1, 1, 2, 2, 2), dtype=np.int32)
    y32 = conv_transpose3d(x, w, stride=2)
    y64 = conv_transpose3d(x, w, stride=2, dtype="float64")
    assert y32.dtype == np.float32 and y64.dtype == np.float64
    np.testing.assert_array_equal(y32, np.repeat(np.repeat(np.repeat(x, 2, 2), 2, 3), 2, 4))
    assert conv_transpose3d(x.astype(np.float64), w, stride=2).dtype == np.float64


def test_slabs_are_bitwise_identical_to_whole_volume(path):
    """The streaming contract: any split of the output along D gives the same bits."""
    from convt3d_cli.engine import PreparedLayer
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 4, 9, 5, 6)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 2, 4)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    kwargs = dict(stride=(2, 1, 3), padding=(1, 0, 1), output_padding=(1, 0, 2), dilation=(1, 2, 1))
    whole = conv_transpose3d(x, w, b, **kwargs)
    layer = PreparedLayer(x.shape, w, b, dtype=np.float32, **kwargs)
    n_out = whole.shape[2]
    for cuts in ([0, 5, n_out], [0, 1, 2, 7, 11, n_out], [0, n_out - 1, n_out]):
        np.testing.assert_array_equal(run_in_slabs(layer, x, cuts, np.float32), whole)


@pytest.mark.parametrize("block_bytes", [1, 6000, 10 ** 9])
@pytest.mark.parametrize("cfg", [
    # wide rows: several position blocks, a ragged last one, the stride-2 interleaved stores
    dict(n=1, cin=3, cout=10, spatial=(5, 4, 37), kernel=3, stride=2, padding=1, output_padding=1),
    # stride 1 with a W halo; stride 3 (strided stores); k == s without halo (rows packed per block)
    dict(n=2, cin=5, cout=8, spatial=(4, 6, 35), kernel=3, stride=1, padding=1, output_padding=0),
    dict(n=1, cin=4, cout=9, spatial=(3, 5, 20), kernel=(2, 3, 4), stride=3, padding=(0, 1, 2),
         output_padding=(1, 0, 2)),
    dict(n=1, cin=6, cout=16, spatial=(3, 7, 5), kernel=2, stride=2, padding=0, output_padding=0),
    # Enough D positions for whole-plane jobs (the sub-pixel kernel's preference).
    dict(n=1, cin=2, cout=2, spatial=(13, 6, 5), kernel=4, stride=2, padding=1, output_padding=0),
])
@pytest.mark.parametrize("kind", ["blocked", "subpixel", "paired"])
def test_blocked_chunks_and_tiles_match_reference(cfg, block_bytes, kind, monkeypatch):
    """Any D chunk / H tile split of the blocked kernels' jobs gives the reference result."""
    monkeypatch.setattr(_layer, "BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(_layer, "BLOCKED_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(_layer, "choose_path", lambda *args: kind)
    rng = np.random.default_rng(block_bytes % 97)
    k = cfg["kernel"] if isinstance(cfg["kernel"], tuple) else (cfg["kernel"],) * 3
    x = rng.standard_normal((cfg["n"], cfg["cin"]) + cfg["spatial"])
    w = rng.standard_normal((cfg["cin"], cfg["cout"]) + k)
    b = rng.standard_normal(cfg["cout"])
    kwargs = {key: cfg[key] for key in ("stride", "padding", "output_padding")}
    expected = conv_transpose3d_ref(x, w, b, **kwargs)
    got = conv_transpose3d(x, w, b, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("q_lo, q_hi, d_chunk", [(0, 9, 8), (27, 36, 8), (3, 4, 5), (0, 64, 8), (5, 22, 3)])
def test_blocked_jobs_split_a_slabs_positions_evenly(q_lo, q_hi, d_chunk):
    # A slab of 9 positions with chunks of 8 used to get a chunk of 1: the threads that
    # drew only its jobs idled while the others did all the work.
    from convt3d_cli.engine import _numba_env
    kern = _numba_env.kernels()
    x = np.zeros((1, 1, 40, 2, 2), np.float32)
    n_chunks = -(-(q_hi - q_lo) // d_chunk)
    spans = []
    for job in range(n_chunks):
        _, _, q0, q1, _, _, _ = kern._job_block(job, x, x.dtype, 1, n_chunks, 1, q_lo, q_hi, d_chunk, 2, 2, 0,
                                                d_chunk + 1, 0, 3, 0, 3, 0, 0, 40)
        spans.append((q0, q1))
    sizes = [q1 - q0 for q0, q1 in spans]
    assert spans[0][0] == q_lo and spans[-1][1] == q_hi
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert max(sizes) <= d_chunk and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("chunk_bytes, copy_share", [(1, 0.0), (1, 1.0), (4000, 0.0), (4000, 1.0), (10 ** 9, 1.0)])
@pytest.mark.parametrize("cfg", [
    # short rows (a block spans rows), W-phase pairs, output padding on every axis
    dict(n=2, cin=3, cout=5, spatial=(3, 4, 5), kernel=2, stride=2, output_padding=1, groups=1),
    # rows longer than a block (one row per sweep, a ragged last block), stride 3 and 1 along W
    dict(n=1, cin=4, cout=6, spatial=(2, 3, 45), kernel=(2, 1, 3), stride=(2, 1, 3),
         output_padding=(0, 0, 2), groups=2),
    dict(n=1, cin=6, cout=3, spatial=(4, 2, 33), kernel=(3, 2, 1), stride=(3, 2, 1),
         output_padding=(2, 1, 0), groups=3),
])
def test_shuffle_chunks_ranges_and_copies_match_reference(cfg, chunk_bytes, copy_share, monkeypatch):
    """Any job split of the shuffle-GEMM kernel (one segment or all positions per chunk,
    channel-block ranges, inputs copied or read in place) gives the reference result."""
    monkeypatch.setattr(_layer, "SHUFFLE_CHUNK_BYTES", chunk_bytes)
    monkeypatch.setattr(_layer, "BLOCK_SHARE_OF_OUTPUT", copy_share)
    monkeypatch.setattr(_layer, "choose_path", lambda *args: "shuffle")  # W stride 3 too
    rng = np.random.default_rng(chunk_bytes % 89)
    k = cfg["kernel"] if isinstance(cfg["kernel"], tuple) else (cfg["kernel"],) * 3
    x = rng.standard_normal((cfg["n"], cfg["cin"]) + cfg["spatial"])
    w = rng.standard_normal((cfg["cin"], cfg["cout"] // cfg["groups"]) + k)
    b = rng.standard_normal(cfg["cout"])
    kwargs = {key: cfg[key] for key in ("stride", "output_padding", "groups")}
    from convt3d_cli.engine import PreparedLayer
    assert PreparedLayer(x.shape, w, b, **kwargs).path == "shuffle"
    expected = conv_transpose3d_ref(x, w, b, **kwargs)
    got = conv_transpose3d(x, w, b, **kwargs)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * np.abs(expected).max())


@pytest.mark.parametrize("seed", range(4000, 4030))
def test_nan_and_inf_reach_only_the_outputs_that_read_them(seed, path):
    """A NaN or inf voxel (masked imaging data) must not spread to outputs without a tap on
    it: the FIR kernel's zero coefficients would give 0 * nan there, so such input takes
    the blocked kernel."""
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    x, w, b = make_data(cfg, rng)
    flat = x.reshape(-1)
    picks = rng.choice(flat.size, size=min(flat.size, 3), replace=False)
    flat[picks] = [np.nan, np.inf, -np.inf][:len(picks)]
    with np.errstate(invalid="ignore"):  # inf - inf in the reference's sums: nan, as intended
        expected = conv_transpose3d_ref(x, w, b, **layer_kwargs(cfg))
    for dtype in ("float64", "float32"):
        got = conv_transpose3d(x, w, b, **layer_kwargs(cfg), dtype=dtype)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(expected))
        np.testing.assert_array_equal(np.isposinf(got), np.isposinf(expected))
        np.testing.assert_array_equal(np.isneginf(got), np.isneginf(expected))
        finite = np.isfinite(expected)
        scale = max(1.0, float(np.abs(expected[finite]).max(initial=0.0)))
        np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-5 * scale)


def test_path_choice(monkeypatch):
    from convt3d_cli.engine import _plan

    # The rules of an AVX-512 CPU (the shuffle kernel's 8x32 block fits its registers).
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "avx512f", "fma")))

    def phases(k, s, p, op=0, n=64):
        n_out = (n - 1) * s - 2 * p + k + op
        return [_plan.axis_phases(n_out, k, s, p, 1)] * 3

    assert _layer.choose_path(1, 1) == "fir"            # depthwise, phases unknown
    assert _layer.choose_path(1, 16) == "fir"
    assert _layer.choose_path(3, 64) == "blocked"       # the seed example
    assert _layer.choose_path(64, 1) == "blocked"
    assert _layer.choose_path(8, 1) == "fir"
    # W stride 2 with at most two taps per W phase: paired rows for one input channel, and
    # for two below the blocked threshold.
    for k, p, op in ((4, 1, 0), (3, 1, 1), (2, 0, 0), (1, 0, 0)):
        assert _layer.choose_path(1, 1, phases(k, 2, p, op)) == "paired"
    assert _layer.choose_path(1, 128, phases(3, 2, 1, 1)) == "paired"
    assert _layer.choose_path(2, 16, phases(3, 2, 1, 1)) == "paired"
    assert _layer.choose_path(2, 32, phases(3, 2, 1, 1)) == "blocked"
    assert _layer.choose_path(1, 1, phases(5, 2, 2)) == "fir"           # three taps in a W phase
    assert _layer.choose_path(1, 1, phases(3, 1, 1)) == "fir"           # stride 1: no phases
    assert _layer.choose_path(1, 1, phases(3, 3, 0)) == "fir"           # W stride 3
    # More inputs: sub-pixel up to 32 virtual channels (Cout/G x 8 phases).
    assert _layer.choose_path(8, 1, phases(3, 2, 1, 1)) == "subpixel"
    assert _layer.choose_path(4, 4, phases(3, 2, 1, 1)) == "subpixel"
    assert _layer.choose_path(32, 2, phases(3, 2, 1, 1)) == "subpixel"
    assert _layer.choose_path(3, 8, phases(3, 2, 1, 1)) == "blocked"
    assert _layer.choose_path(3, 64, phases(3, 2, 1)) == "blocked"
    # Kernel == stride without padding: the shuffle GEMM where paired rows do not win.
    for cin, cout in ((2, 32), (4, 4), (8, 8), (320, 256), (3, 64)):
        assert _layer.choose_path(cin, cout, phases(2, 2, 0)) == "shuffle"
    assert _layer.choose_path(64, 64, phases(1, 1, 0)) == "shuffle"        # pointwise
    assert _layer.choose_path(1, 64, phases(2, 2, 0)) == "paired"
    assert _layer.choose_path(2, 16, phases(2, 2, 0)) == "paired"
    assert _layer.choose_path(8, 8, phases(3, 3, 0)) == "blocked"          # W stride 3: scattered stores
    assert _layer.choose_path(64, 32, phases(2, 2, 1)) == "blocked"         # padded: taps move
    # With AVX2 alone the shuffle kernel's accumulators spill: the blocked kernel instead.
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "fma")))
    for cin, cout in ((2, 32), (8, 8), (320, 256), (3, 64), (4, 4)):
        assert _layer.choose_path(cin, cout, phases(2, 2, 0)) == "blocked"
    assert _layer.choose_path(2, 16, phases(2, 2, 0)) == "paired"
    # So do the sub-pixel kernel's, FIR's layers among them (5 taps: no paired rows).
    for cin, cout, k, p, op in ((8, 1, 3, 1, 1), (4, 4, 3, 1, 1), (32, 2, 3, 1, 1), (2, 3, 5, 2, 1)):
        assert _layer.choose_path(cin, cout, phases(k, 2, p, op)) == "blocked"
    assert _layer.choose_path(1, 1, phases(4, 2, 1)) == "paired"


def test_out_buffer_and_progress():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 1, 4, 4, 4)).astype(np.float32)
    w = rng.standard_normal((1, 1, 3, 3, 3)).astype(np.float32)
    out = np.empty((2, 1, 8, 8, 8), dtype=np.float32)
    calls = []
    result = conv_transpose3d(x, w, stride=2, padding=1, output_padding=1, out=out,
                              progress=lambda done, total: calls.append((done, total)))
    assert result.base is out or result is out
    np.testing.assert_allclose(out, conv_transpose3d_ref(x, w, stride=2, padding=1, output_padding=1), atol=1e-5)
    assert calls and calls[-1] == (16, 16)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    with pytest.raises(ShapeError, match="out must be"):
        conv_transpose3d(x, w, stride=2, out=np.empty((2, 1, 8, 8, 8), dtype=np.float64))
    # an output over the input's memory would overwrite inputs before they are read
    buffer = np.zeros(2 * 8 ** 3, dtype=np.float32)
    x_in_buffer = buffer[:x.size].reshape(x.shape)
    x_in_buffer[...] = x
    with pytest.raises(ShapeError, match="share memory"):
        conv_transpose3d(x_in_buffer, w, stride=2, padding=1, output_padding=1, out=buffer.reshape(out.shape))
    np.testing.assert_array_equal(x_in_buffer, x)
    read_only = np.empty((2, 1, 8, 8, 8), dtype=np.float32)
    read_only.flags.writeable = False
    with pytest.raises(ShapeError, match="writeable"):
        conv_transpose3d(x, w, stride=2, padding=1, output_padding=1, out=read_only)


def test_progress_steps_match_one_call_without_strided_kernels(path, monkeypatch):
    """With progress the kernels run about 50 plane ranges of a multi-channel output. They
    get the whole output and the range, so the result is bitwise that of one call and no
    kernel is ever compiled for a strided (non C-contiguous) array, which runs twice as slow.
    The gemm path reports its products as they finish (here one plane each)."""
    from convt3d_cli.engine import _gemm

    monkeypatch.setattr(_gemm, "MIN_COLUMNS", 1)
    rng = np.random.default_rng(11)
    x = rng.standard_normal((2, 3, 9, 5, 6))
    w = rng.standard_normal((3, 2, 2, 2, 2))  # k2 s2: every kernel can run it
    b = rng.standard_normal(2)
    calls = []
    stepped = conv_transpose3d(x, w, b, stride=2, progress=lambda done, total: calls.append(done))
    assert len(calls) > 2
    np.testing.assert_array_equal(stepped, conv_transpose3d(x, w, b, stride=2))
    np.testing.assert_allclose(stepped, conv_transpose3d_ref(x, w, b, stride=2), atol=1e-12)
    assert_one_kernel_variant_per_dtype()


def assert_one_kernel_variant_per_dtype():
    """No kernel compiled so far in this process took a strided or a read-only array (Numba
    compiles each such variant separately)."""
    from numba import types

    from convt3d_cli.engine import _numba_env
    kern = _numba_env.kernels()
    for name in ("direct_fir", "blocked_phases", "subpixel_blocked", "paired_rows", "shuffle_gemm", "gemm_scatter",
                 "col2im_sum"):
        for signature in getattr(kern, name).signatures:
            arrays = [t for t in signature if isinstance(t, types.Array)]
            assert all(t.layout == "C" and t.mutable for t in arrays), (name, signature)


def test_read_only_weights_and_builtins_share_the_kernels():
    from convt3d_cli.builtin import builtin_weight
    rng = np.random.default_rng(12)
    x = rng.standard_normal((1, 1, 4, 5, 6))
    w = rng.standard_normal((1, 1, 4, 4, 4))
    b = rng.standard_normal(1)
    w_ro, b_ro = w.copy(), b.copy()
    w_ro.flags.writeable = False
    b_ro.flags.writeable = False
    np.testing.assert_array_equal(conv_transpose3d(x, w_ro, b_ro, stride=2, padding=1),
                                  conv_transpose3d(x, w, b, stride=2, padding=1))
    linear = builtin_weight("linear", 2, 1, np.float64)
    assert linear.flags.writeable
    conv_transpose3d(x, linear, stride=2, padding=1)
    assert_one_kernel_variant_per_dtype()


@pytest.mark.parametrize("progress", [False, True])
@pytest.mark.parametrize("kernel", [3, 4])
def test_paired_rows_hand_non_finite_planes_to_the_blocked_kernel(kernel, progress, monkeypatch):
    """The paired kernel counts non-finite inputs while copying them; the planes (or
    progress steps) that read one are computed again by the blocked kernel, so a NaN or
    inf reaches only the outputs that read it, as with finite input elsewhere."""
    from convt3d_cli.engine import PreparedLayer
    monkeypatch.setattr(_layer, "COLUMNS_MAX_MACS", 0)  # a layer this small would run on NumPy alone
    rng = np.random.default_rng(21)
    x = rng.standard_normal((2, 2, 9, 5, 7))
    x[0, 1, 6, 2, 3] = np.nan
    x[1, 0, 1, 4, 0] = np.inf
    w = rng.standard_normal((2, 1, kernel, kernel, kernel))  # k3: zero-weight terms
    kwargs = dict(stride=2, padding=1, groups=2)
    assert PreparedLayer(x.shape, w, **kwargs).path == "paired"
    with np.errstate(invalid="ignore"):
        expected = conv_transpose3d_ref(x, w, **kwargs)
    got = conv_transpose3d(x, w, **kwargs, progress=(lambda done, total: None) if progress else None)
    for test in (np.isnan, np.isposinf, np.isneginf):
        np.testing.assert_array_equal(test(got), test(expected))
    finite = np.isfinite(expected)
    assert finite.sum() > 0.9 * finite.size
    np.testing.assert_allclose(got[finite], expected[finite], rtol=0, atol=1e-12 * np.abs(expected[finite]).max())
    clean = x.copy()
    clean[~np.isfinite(clean)] = 0
    np.testing.assert_allclose(conv_transpose3d(clean, w, **kwargs), conv_transpose3d_ref(clean, w, **kwargs),
                               rtol=0, atol=1e-12 * np.abs(expected[finite]).max())


def test_threads_option_gives_identical_results():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((1, 8, 6, 6, 6)).astype(np.float32)
    w = rng.standard_normal((8, 8, 3, 3, 3)).astype(np.float32)
    one = conv_transpose3d(x, w, stride=2, threads=1)
    two = conv_transpose3d(x, w, stride=2, threads=2)
    np.testing.assert_array_equal(one, two)
    with pytest.raises(ParameterError, match="threads"):
        conv_transpose3d(x, w, threads=0)


@pytest.mark.parametrize("kwargs, param", [
    (dict(stride=0), "stride"),
    (dict(stride=(1, 2)), "stride"),
    (dict(dilation=0), "dilation"),
    (dict(padding=-1), "padding"),
    (dict(stride=2, output_padding=2), "output_padding"),
    (dict(output_padding=1), "output_padding"),
    (dict(groups=0), "groups"),
    (dict(groups=3), "groups"),
    (dict(padding=5), "padding"),
    (dict(stride=1.5), "stride"),
    (dict(dtype="int8"), "dtype"),
])
def test_invalid_parameters_name_the_parameter(kwargs, param):
    x = np.zeros((1, 2, 3, 3, 3), dtype=np.float32)
    w = np.zeros((2, 1, 3, 3, 3), dtype=np.float32)
    with pytest.raises(ParameterError) as info:
        conv_transpose3d(x, w, **kwargs)
    assert info.value.param == param
    assert param in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, Convt3dError)


@pytest.mark.parametrize("x_shape, w_shape, b_shape, match", [
    ((1, 2, 3, 3, 3), (3, 1, 3, 3, 3), None, "channel mismatch"),
    ((2, 3, 3, 3), (3, 1, 2, 2), None, "weight must be 5-D"),
    ((3, 3, 3), (1, 1, 2, 2, 2), None, "input must be"),
    ((1, 1, 1, 2, 3, 3, 3), (1, 1, 2, 2, 2), None, "input must be"),
    ((1, 2, 3, 3, 3), (2, 1, 2, 2, 2), (2,), "bias must have shape"),
    ((1, 2, 3, 3, 3), (2, 1, 1, 2, 2, 2), None, "has 2 groups but groups=1"),
    ((1, 2, 0, 3, 3), (2, 1, 2, 2, 2), None, "empty"),
])
def test_shape_errors(x_shape, w_shape, b_shape, match):
    x = np.zeros(x_shape, dtype=np.float32)
    w = np.zeros(w_shape, dtype=np.float32)
    b = None if b_shape is None else np.zeros(b_shape, dtype=np.float32)
    with pytest.raises(ShapeError, match=match):
        conv_transpose3d(x, w, b)


def test_module_matches_seed_example_and_functional():
    m = ConvTranspose3d(3, 64, 3, stride=2, padding=1, seed=0)
    assert m.output_shape((16, 3, 32, 32, 32)) == (16, 64, 63, 63, 63)
    assert m.weight.shape == (3, 64, 3, 3, 3) and m.bias.shape == (64,)
    assert m.weight.dtype == np.float32
    bound = 1 / np.sqrt(64 * 27)
    assert np.abs(m.weight).max() <= bound and np.abs(m.bias).max() <= bound
    assert np.abs(m.weight).max() > 0.9 * bound  # uniform over the whole range, not a narrower one
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 4, 6)).astype(np.float32)
    np.testing.assert_array_equal(m(x), m.forward(x))
    np.testing.assert_array_equal(m(x), conv_transpose3d(x, m.weight, m.bias, stride=2, padding=1))
    assert m(x).shape == (2, 64, 9, 7, 11)
    assert repr(m) == "ConvTranspose3d(3, 64, kernel_size=(3, 3, 3), stride=(2, 2, 2), padding=(1, 1, 1))"


def test_module_seed_reproducible_and_options():
    a = ConvTranspose3d(4, 6, (1, 2, 3), stride=(1, 2, 2), groups=2, bias=False, seed=42, dtype="float64")
    b = ConvTranspose3d(4, 6, (1, 2, 3), stride=(1, 2, 2), groups=2, bias=False, rng=np.random.default_rng(42),
                        dtype="float64")
    np.testing.assert_array_equal(a.weight, b.weight)
    assert a.bias is None and a.weight.shape == (4, 3, 1, 2, 3) and a.weight.dtype == np.float64
    assert "groups=2" in repr(a) and "bias=False" in repr(a)
    with pytest.raises(ParameterError, match="groups"):
        ConvTranspose3d(3, 6, 3, groups=2)
    with pytest.raises(ShapeError, match="channel mismatch"):
        a.output_shape((1, 5, 4, 4, 4))


def test_seed_example_full_size_shape_only():
    assert output_shape((16, 3, 32, 32, 32), 64, 3, stride=2, padding=1) == (16, 64, 63, 63, 63)
    assert output_shape((3, 32, 32, 32), 64, 3, stride=2, padding=1) == (64, 63, 63, 63)




@pytest.mark.parametrize("seed", range(3000, 3060))
def test_against_pytorch(seed, path):
    torch_mod = pytest.importorskip("torch")
    rng = np.random.default_rng(seed)
    cfg = random_config(rng)
    x, w, b = make_data(cfg, rng)
    kw = layer_kwargs(cfg)
    expected = torch_mod.nn.functional.conv_transpose3d(
        torch_mod.from_numpy(x), torch_mod.from_numpy(w), None if b is None else torch_mod.from_numpy(b), **kw).numpy()
    got = conv_transpose3d(x, w, b, **kw, dtype="float64")
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12 * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("path", ["blocked", "gemm", "col2im", "fir", "paired", "subpixel", "shuffle"])
def test_the_output_pages_are_written_in_order_before_the_kernels_run(path, monkeypatch):
    # Fresh pages mapped from the kernels' threads cost about ten times as much as from
    # one thread in order, so run_slab writes one value per page of its output first.
    rng = np.random.default_rng(7)
    x = rng.standard_normal((1, 32, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((32, 3, 2, 2, 2)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    layer = _layer.PreparedLayer(x.shape, w, b, stride=2, path=path)
    assert layer.path == path
    out = np.full(layer.output_shape, np.nan, np.float32)
    seen = []
    original = _layer._fault_in

    def recording(array, **options):
        seen.append(np.shares_memory(array, out) and array.size == out.size)
        original(array, **options)
        assert not np.isnan(array.reshape(-1)[::mmap.PAGESIZE // array.itemsize]).any()

    monkeypatch.setattr(_layer, "_fault_in", recording)
    layer.run_slab(x, 0, 0, out.shape[2], out)
    assert seen == [True]
    np.testing.assert_allclose(out, conv_transpose3d_ref(x, w, b, stride=2), rtol=1e-5, atol=1e-4)
