"""The stride-2 W store (``_kernels._interleave``): two W phases written as one run,
whole vectors interleaved in registers (``_store_pairs``) and the rest one by one."""

import numpy as np
import pytest

from convt3d_cli.engine import _kernels as kern


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [0, 1, 3, 7, 8, 9, 15, 16, 17, 31, 33, 64])
@pytest.mark.parametrize("offset", [0, 1, 5])
def test_every_pair_lands_and_nothing_else_is_written(dtype, count, offset):
    rng = np.random.default_rng(count * 7 + offset)
    a = rng.standard_normal(count + offset).astype(dtype)
    b = rng.standard_normal(count + offset).astype(dtype)
    dst = np.full(2 * count + 2 * offset + 3, -7.0, dtype)
    target = dst[offset:offset + 2 * count]
    kern._interleave(target, a[offset:], b[offset:], count)
    expected = np.full_like(dst, -7.0)
    expected[offset:offset + 2 * count:2] = a[offset:]
    expected[offset + 1:offset + 2 * count:2] = b[offset:]
    np.testing.assert_array_equal(dst, expected)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("count", [1, 8, 13, 40])
def test_the_plus_form_adds_the_value_to_both_phases(dtype, count):
    rng = np.random.default_rng(count)
    a, b = rng.standard_normal((2, count)).astype(dtype)
    dst = np.zeros(2 * count, dtype)
    kern._interleave_plus(dst, a, b, count, dtype(0.25))
    np.testing.assert_array_equal(dst[0::2], a + dtype(0.25))
    np.testing.assert_array_equal(dst[1::2], b + dtype(0.25))


def test_strided_views_take_the_element_loop():
    rng = np.random.default_rng(3)
    a = rng.standard_normal(60).astype(np.float32)
    b = rng.standard_normal(30).astype(np.float32)
    dst = np.zeros(130, np.float32)
    kern._interleave(dst[::2], a[::2], b, 30)          # none of them is contiguous in the same way
    np.testing.assert_array_equal(dst[0:120:4], a[::2])
    np.testing.assert_array_equal(dst[2:120:4], b)
    assert not dst[1::2].any()


def test_the_same_source_twice_repeats_each_value():
    src = np.arange(1, 20, dtype=np.float32)
    dst = np.zeros(38, np.float32)
    kern._interleave(dst, src, src, 19)
    np.testing.assert_array_equal(dst, np.repeat(src, 2))
