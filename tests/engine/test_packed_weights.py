"""Packed weights kept for the next layer with the same weights (``engine/_packed.py``).

A packing is reused only for weights with the same bytes and the same layout; a weight
array changed in place is packed again; small weights are never kept; what is kept
stays within its byte bound, least recently used out first. Results are the same with
and without a kept packing.
"""

import os

import numpy as np
import pytest

from convt3d_cli.engine import PreparedLayer, _packed, conv_transpose3d
from helpers import child_finishes
from reference import conv_transpose3d_ref

X_SHAPE = (1, 48, 3, 4, 5)


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    _packed.clear()
    monkeypatch.setattr(_packed, "MIN_WEIGHT_BYTES", 1024)
    yield
    _packed.clear()


def _weights(seed=0, cin=48, cout=40, k=2):
    return np.random.default_rng(seed).standard_normal((cin, cout, k, k, k)).astype(np.float32)


def _packing(weight, path="blocked-8x16", stride=2, padding=0):
    layer = PreparedLayer(X_SHAPE, weight, None, stride, padding, path=path)
    return layer._blocked_plan(path).w_packed


def test_the_same_weights_reuse_one_packing():
    w = _weights()
    first = _packing(w)
    assert _packing(w.copy()) is first


def test_weights_changed_in_place_are_packed_again_and_give_the_new_result():
    w = _weights()
    x = np.random.default_rng(1).standard_normal(X_SHAPE).astype(np.float32)
    before = conv_transpose3d(x, w, stride=2, path="blocked-8x16")
    first = _packing(w)
    w[3, 5, 1, 0, 1] += 1.0
    assert _packing(w) is not first
    after = conv_transpose3d(x, w, stride=2, path="blocked-8x16")
    np.testing.assert_allclose(after, conv_transpose3d_ref(x, w, stride=2), rtol=1e-4, atol=1e-4)
    assert not np.array_equal(before, after)


def test_a_packing_made_before_the_change_is_not_handed_out_after_it():
    w = _weights()
    kept = _packing(w).copy()
    w *= 2.0
    fresh = _packing(w)
    np.testing.assert_array_equal(fresh, 2.0 * kept)


def test_another_layout_gets_its_own_packing():
    w = _weights()
    plain = _packing(w, "blocked-8x16")
    assert _packing(w, "blocked-16x16") is not plain
    assert _packing(w, "blocked-8x16", stride=1) is not plain
    assert _packing(w, "blocked-8x16") is plain


def test_weights_with_nans_are_compared_by_their_bytes():
    w = _weights()
    w[0, 0, 0, 0, 0] = np.nan
    first = _packing(w)
    assert _packing(w.copy()) is first


def test_small_weights_are_not_kept(monkeypatch):
    monkeypatch.setattr(_packed, "MIN_WEIGHT_BYTES", 10 ** 9)
    w = _weights()
    assert _packing(w) is not _packing(w)
    assert not _packed._entries


def test_what_is_kept_stays_within_its_bound(monkeypatch):
    one = _weights(0).nbytes + _packing(_weights(0)).nbytes
    _packed.clear()
    monkeypatch.setattr(_packed, "CACHE_BYTES", 2 * one + 10)
    packings = [_packing(_weights(seed)) for seed in range(3)]
    assert _packed._held <= _packed.CACHE_BYTES
    assert len(_packed._entries) == 2
    assert _packing(_weights(2)) is packings[2]       # the newest stayed
    assert _packing(_weights(1)) is packings[1]
    assert _packing(_weights(0)) is not packings[0]   # the oldest went


def test_layers_of_one_shape_keep_a_packing_each():
    packings = [_packing(_weights(seed)) for seed in range(3)]
    assert all(again is first for again, first in zip([_packing(_weights(s)) for s in range(3)], packings))


def test_too_large_a_packing_is_not_kept(monkeypatch):
    monkeypatch.setattr(_packed, "CACHE_BYTES", 100)
    w = _weights()
    assert _packing(w) is not _packing(w)
    assert _packed._held == 0


@pytest.mark.parametrize("path", ["blocked-8x16", "blocked-16x16", "subpixel"])
def test_results_with_a_kept_packing_match_the_reference(path):
    w = _weights(cout=24, k=3)
    x = np.random.default_rng(2).standard_normal(X_SHAPE).astype(np.float32)
    expected = conv_transpose3d_ref(x, w, stride=2, padding=1)
    for _ in range(2):
        got = conv_transpose3d(x, w, stride=2, padding=1, path=path)
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_threads_sharing_kept_packings_get_their_own_weights_results():
    from concurrent.futures import ThreadPoolExecutor

    x = np.random.default_rng(3).standard_normal(X_SHAPE).astype(np.float32)
    weights = [_weights(seed) for seed in range(3)]
    expected = [conv_transpose3d_ref(x, w, stride=2) for w in weights]

    def call(i):
        k = i % len(weights)
        return k, conv_transpose3d(x, weights[k], stride=2, path="blocked-8x16", threads=1)

    with ThreadPoolExecutor(4) as pool:
        for k, got in pool.map(call, range(24)):
            np.testing.assert_allclose(got, expected[k], rtol=1e-4, atol=1e-4)
    assert len(_packed._entries) == len(weights)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this system")
def test_a_child_forked_while_the_lock_is_held_can_still_pack():
    w = _weights()
    with _packed._lock:          # as if another thread were storing a packing at the fork
        pid = os.fork()
        if pid == 0:             # the child: must not wait for a lock no thread of its own holds
            try:
                _packed.packed(w, ("layout",), lambda: w * 2)
            finally:
                os._exit(0)
    assert child_finishes(pid), "the forked child hung on the packing lock"


@pytest.mark.parametrize("size", [1, 7, 8, 13, 4099])
def test_a_change_in_any_byte_is_seen(size):
    # Compared as 8-byte words plus a byte tail: every position counts, the tail's too.
    rng = np.random.default_rng(size)
    a = rng.standard_normal(size).astype(np.float32)
    assert _packed._same_bytes(a, a.copy())
    for i in {0, size // 2, size - 1}:
        b = a.copy()
        b.view(np.uint8)[4 * i + 3] ^= 0x01
        assert not _packed._same_bytes(a, b)
    zeros = np.zeros(size, np.float32)
    assert not _packed._same_bytes(zeros, -zeros)            # equal values, other bytes
    nan = np.full(size, np.nan, np.float32)
    assert _packed._same_bytes(nan, nan.copy())              # NaN == NaN byte for byte
