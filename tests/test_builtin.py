"""Built-in kernels: ``nearest`` equals np.repeat, ``linear`` equals trilinear interpolation
(``align_corners=False``, edges replicated) as PyTorch computes it."""

import numpy as np
import pytest

from convt3d_cli import geometry
from convt3d_cli.builtin import apply_builtin, builtin_params, builtin_weight
from convt3d_cli.errors import ParameterError

STRIDES = [1, 2, 3, (2, 2, 1)]


def _triple(stride):
    return (stride,) * 3 if isinstance(stride, int) else tuple(stride)


def linear_1d(x, factor, axis):
    """Reference 1-D linear upsampling, half-pixel centres, source index clamped to the edge."""
    n = x.shape[axis]
    src = (np.arange(n * factor) + 0.5) / factor - 0.5
    src = np.clip(src, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    frac = src - lo
    shape = [1] * x.ndim
    shape[axis] = -1
    frac = frac.reshape(shape)
    return np.take(x, lo, axis=axis) * (1 - frac) + np.take(x, hi, axis=axis) * frac


def trilinear_reference(x, stride):
    out = x.astype(np.float64)
    for axis, factor in zip(range(x.ndim - 3, x.ndim), _triple(stride)):
        out = linear_1d(out, factor, axis)
    return out


@pytest.fixture
def volume():
    rng = np.random.default_rng(7)
    return rng.standard_normal((2, 3, 5, 6, 4)).astype(np.float32)


def test_linear_taps_for_stride_two():
    taps = builtin_weight("linear", (2, 1, 1))[0, 0, :, 0, 0]
    np.testing.assert_allclose(taps, [0.25, 0.75, 0.75, 0.25])


@pytest.mark.parametrize("stride", [1, 2, 3, 4])
def test_linear_taps_sum_to_stride(stride):
    # Each output voxel receives weights summing to 1, so the taps of one input sum to s.
    taps = builtin_weight("linear", (stride, 1, 1))[0, 0, :, 0, 0]
    assert len(taps) == 2 * stride - stride % 2
    assert taps.sum() == pytest.approx(stride)


@pytest.mark.parametrize("stride", STRIDES)
def test_linear_matches_numpy_reference(volume, stride):
    result = apply_builtin(volume, "linear", stride)
    expected = trilinear_reference(volume, stride)
    assert result.shape == expected.shape
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", STRIDES)
def test_linear_matches_torch_interpolate(volume, stride):
    torch = pytest.importorskip("torch")
    expected = torch.nn.functional.interpolate(torch.from_numpy(volume), scale_factor=_triple(stride),
                                               mode="trilinear", align_corners=False).numpy()
    np.testing.assert_allclose(apply_builtin(volume, "linear", stride), expected, rtol=1e-5, atol=1e-5)


def test_linear_keeps_edges_of_a_constant_volume():
    # Replicated edges: a constant stays constant right up to the border (no fading to zero).
    constant = np.full((1, 1, 3, 4, 5), 7.0, dtype=np.float32)
    np.testing.assert_allclose(apply_builtin(constant, "linear", 3), 7.0, rtol=1e-6)


@pytest.mark.parametrize("stride", STRIDES)
def test_nearest_matches_repeat(volume, stride):
    expected = volume
    for axis, factor in zip((2, 3, 4), _triple(stride)):
        expected = np.repeat(expected, factor, axis=axis)
    np.testing.assert_array_equal(apply_builtin(volume, "nearest", stride), expected)


@pytest.mark.parametrize("name", ["nearest", "linear"])
def test_unbatched_input_keeps_rank_and_float64(volume, name):
    result = apply_builtin(volume[0].astype(np.float64), name, 2, dtype="float64")
    assert result.shape == (3, 10, 12, 8)
    assert result.dtype == np.float64
    expected = trilinear_reference(volume[0], 2) if name == "linear" else \
        np.repeat(np.repeat(np.repeat(volume[0], 2, 1), 2, 2), 2, 3)
    np.testing.assert_allclose(result, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["nearest", "linear"])
@pytest.mark.parametrize("stride", STRIDES)
def test_reported_params_give_s_times_n_and_half_pixel_affine(name, stride):
    params = builtin_params(name, stride, channels=3)
    s = _triple(stride)
    assert params.groups == 3
    assert geometry.output_spatial((5, 6, 4), params) == (5 * s[0], 6 * s[1], 4 * s[2])
    # Output voxel 0 lies at input index (0.5 / s) - 0.5 (align_corners=False).
    origin = geometry.output_affine(np.eye(4), params)[:3, 3]
    np.testing.assert_allclose(origin, [0.5 / v - 0.5 for v in s])


def test_unknown_kernel_and_bad_stride_are_refused(volume):
    with pytest.raises(ParameterError, match="kernel"):
        builtin_params("cubic", 2)
    with pytest.raises(ParameterError, match="stride"):
        builtin_params("linear", 0)
    with pytest.raises(ParameterError, match="stride"):
        apply_builtin(volume, "nearest", (2, -1, 2))
