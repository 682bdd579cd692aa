"""How the parallel kernels hand out their jobs (``_kernels._job_claims``, ``_claim``).

Each worker takes the jobs of its own share in order, then what is left of the others'
shares; a claim is one atomic increment. These tests check that every job runs exactly
once for any number of jobs and workers, that a worker does take over the others' jobs
(with one thread, the first worker runs them all), and that no path's result depends on
the worker count it is given.
"""

import numba
import numpy as np
import pytest

from convt3d_cli.engine import _layer, _numba_env, conv_transpose3d
from reference import conv_transpose3d_ref

kern = _numba_env.kernels()
_job_claims, _claim = kern._job_claims, kern._claim


@numba.njit(parallel=True)
def _run_jobs(n_jobs, workers, runs, ran_by, order, clock):
    """Record, per job, how often it ran, the last worker that ran it and when."""
    claims = _job_claims(n_jobs, workers)
    for worker in numba.prange(claims.shape[0]):
        job, victim = _claim(claims, n_jobs, worker, worker)
        while job >= 0:
            runs[job] += 1
            ran_by[job] = worker
            order[job] = kern._fetch_add(clock, 0)
            job, victim = _claim(claims, n_jobs, worker, victim)
    return claims.shape[0]


def _jobs(n_jobs, workers):
    runs = np.zeros(n_jobs, np.int64)
    ran_by = np.full(n_jobs, -1, np.int64)
    order = np.full(n_jobs, -1, np.int64)
    n_workers = _run_jobs(n_jobs, workers, runs, ran_by, order, np.zeros(1, np.int64))
    return n_workers, runs, ran_by, order


@pytest.mark.parametrize("workers", [1, 2, 3, 8])
@pytest.mark.parametrize("n_jobs", [0, 1, 2, 5, 64, 1001])
def test_every_job_runs_exactly_once(n_jobs, workers):
    n_workers, runs, ran_by, _ = _jobs(n_jobs, workers)
    assert n_workers == min(n_jobs, workers)  # never a worker without a job of its own
    np.testing.assert_array_equal(runs, np.ones(n_jobs, np.int64))
    assert ((ran_by >= 0) & (ran_by < max(1, n_workers))).all()


@pytest.mark.parametrize("workers", [2, 3, 5])
def test_with_one_thread_the_first_worker_runs_every_share_in_order(workers):
    """The later workers' shares are left to whoever is free: here the first worker, which
    finishes its own share and then takes the others' jobs, front to back."""
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        _, runs, ran_by, order = _jobs(37, workers)
    finally:
        numba.set_num_threads(previous)
    np.testing.assert_array_equal(runs, np.ones(37, np.int64))
    np.testing.assert_array_equal(ran_by, np.zeros(37, np.int64))
    np.testing.assert_array_equal(order, np.arange(37))


# (path, Cin, Cout, kernel, stride, padding): one layer per kernel that claims jobs.
LAYERS = [
    ("fir", 1, 2, 3, 2, 1),
    ("paired", 1, 1, 4, 2, 1),
    ("subpixel", 2, 2, 3, 2, 1),
    ("shuffle", 3, 4, 2, 2, 0),
] + [("blocked-" + block, 4, 7, 3, 2, 1) for block in _layer.fitting_blocks()]


@pytest.mark.parametrize("path, cin, cout, k, s, p", LAYERS)
@pytest.mark.parametrize("workers", [1, 3, 7])
def test_no_path_depends_on_the_worker_count(monkeypatch, path, cin, cout, k, s, p, workers):
    """More workers than threads, or fewer: the same bits as the run's own count, and the
    reference's values (the plans, which size jobs by the thread count, change too)."""
    rng = np.random.default_rng(workers)
    x = rng.standard_normal((2, cin, 7, 6, 9)).astype(np.float32)
    w = rng.standard_normal((cin, cout, k, k, k)).astype(np.float32)
    b = rng.standard_normal(cout).astype(np.float32)
    expected = conv_transpose3d(x, w, b, s, p, path=path)
    monkeypatch.setattr(_layer, "_threads", lambda: workers)
    got = conv_transpose3d(x, w, b, s, p, path=path)
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(got, conv_transpose3d_ref(x, w, b, s, p), rtol=1e-4, atol=1e-4)
