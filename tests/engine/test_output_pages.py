"""A fresh output's memory pages are mapped before the kernels run (``_layer._fault_in``),
by all the run's threads for large outputs (``_kernels.map_pages``)."""

import numpy as np
import pytest

from convt3d_cli.engine import _layer, _numba_env, conv_transpose3d
from reference import conv_transpose3d_ref


def _windows_without_a_write(raw, page, first):
    """The starts of the ``page``-sized windows (aligned like the addresses: at
    ``first mod page``) of ``raw`` that hold no zero."""
    n = raw.shape[0]
    start = first % page - page if first % page else 0
    return [b for b in range(start, n, page) if not (raw[max(0, b):min(n, b + page)] == 0).any()]


@pytest.mark.parametrize("workers", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [1, 2, 7, 64, 1000, 4099])
def test_every_page_gets_a_write_and_few_others(n, workers):
    kern = _numba_env.kernels()
    rng = np.random.default_rng(n * 10 + workers)
    for page in (1, 4, 16):
        for span in (page, 4 * page, 32 * page):
            for first in sorted({0, 1, span // 2, span - 1, int(rng.integers(0, span))}):
                raw = np.ones(n, dtype=np.uint8)
                kern.map_pages(raw, page, span, first, workers)
                assert _windows_without_a_write(raw, page, first) == []
                # One write per page and job (a job's first write may share a page with the
                # last of the job before it), and the last byte.
                jobs = 1 + max(0, -(-(n - first) // span))
                assert (raw == 0).sum() <= -(-n // page) + jobs + 1


@pytest.mark.parametrize("workers", [1, 2, 4, 9, 16])
def test_runs_are_cut_at_span_boundaries(workers):
    """Each job starts at the array's start or where a ``span``-aligned page starts
    (``first + k * span``), so no such page is written by two threads."""
    kern = _numba_env.kernels()
    span, first, n = 64, 24, 24 + 64 * 7 + 10   # 9 jobs: [0, 24), 7 whole spans, 10 bytes
    raw = np.ones(n, dtype=np.uint8)
    kern.map_pages(raw, span, span, first, workers)   # page == span: one write per job, at its start
    assert set(np.flatnonzero(raw == 0).tolist()) == {0, n - 1} | set(range(first, n, span))


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_outputs_mapped_by_all_threads_are_still_right(monkeypatch, threads, dtype):
    """With every output mapped by the run's threads (the size threshold at 0), each path
    still overwrites every value: the results match the NumPy reference."""
    monkeypatch.setattr(_layer, "PARALLEL_PAGES_BYTES", 0)
    rng = np.random.default_rng(threads)
    x = rng.standard_normal((2, 3, 5, 6, 7)).astype(dtype)
    w = rng.standard_normal((3, 4, 3, 3, 3)).astype(dtype)
    b = rng.standard_normal(4).astype(dtype)
    want = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64),
                                stride=2, padding=1, output_padding=1)
    tol = 1e-4 if dtype == np.float32 else 1e-10
    for path in ("fir", "blocked", "subpixel", "col2im"):
        got = conv_transpose3d(x, w, b, stride=2, padding=1, output_padding=1, threads=threads, path=path)
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=path)


def test_large_outputs_take_the_threaded_mapping_and_small_ones_do_not(monkeypatch):
    calls = []
    kern = _numba_env.kernels()
    monkeypatch.setattr(_layer, "_kernels", lambda: _Spy(kern, calls))
    monkeypatch.setattr(_layer, "_threads", lambda: 2)
    small = np.empty(_layer.PARALLEL_PAGES_BYTES // 4 - 1, dtype=np.float32)
    _layer._fault_in(small)
    assert calls == []
    large = np.empty(_layer.PARALLEL_PAGES_BYTES // 4, dtype=np.float32)
    _layer._fault_in(large)
    assert len(calls) == 1
    raw, page, span, first, workers = calls[0]
    assert raw.nbytes == large.nbytes and span == _layer.HUGE_PAGE_BYTES and workers == 2
    assert (large.ctypes.data + first) % span == 0 and 0 <= first < span
    monkeypatch.setattr(_layer, "_threads", lambda: 1)
    _layer._fault_in(large)
    assert len(calls) == 1  # one thread: mapped in order from this thread


def test_the_numpy_path_maps_pages_without_numba_kernels(monkeypatch):
    """The ``columns`` path (NumPy alone, which never loads Numba) maps a large output
    from the calling thread; a Numba path on the same layer uses ``map_pages``."""
    calls = []
    kern = _numba_env.kernels()
    monkeypatch.setattr(_layer, "PARALLEL_PAGES_BYTES", 0)
    monkeypatch.setattr(_layer, "_kernels", lambda: _Spy(kern, calls))
    x = np.random.default_rng(1).standard_normal((1, 1, 6, 7, 8)).astype(np.float32)
    w = np.random.default_rng(2).standard_normal((1, 1, 4, 4, 4)).astype(np.float32)
    want = conv_transpose3d_ref(x.astype(np.float64), w.astype(np.float64), None, stride=2, padding=1)
    got = conv_transpose3d(x, w, stride=2, padding=1, threads=2, path="columns")
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert calls == []
    conv_transpose3d(x, w, stride=2, padding=1, threads=2, path="fir")
    assert len(calls) == 1


class _Spy:
    """The kernels module, with ``map_pages`` calls recorded (and still run)."""

    def __init__(self, kern, calls):
        self._kern = kern
        self._calls = calls

    def map_pages(self, *args):
        self._calls.append(args)
        return self._kern.map_pages(*args)

    def __getattr__(self, name):
        return getattr(self._kern, name)
