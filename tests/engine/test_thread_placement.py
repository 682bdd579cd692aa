"""Where the BLAS paths' threads run (``threads.placement``, ``threads.kept_on``,
``engine/_gemm.run_jobs``).

A run of enough multiply-adds that takes every CPU the process may use keeps each of its
threads on its own CPU for the run, the calling thread on the CPU it was on, and gives
every thread its own set of CPUs back after. A shorter run, a run with fewer threads, or
one where the system cannot say which CPU a thread is on, leaves placement to the
system. Results never depend on it.
"""

import os
import threading

import numpy as np
import pytest

from convt3d_cli import threads
from convt3d_cli.engine import _gemm, conv_transpose3d

linux = pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no CPU affinity on this system")


def _allowed():
    return os.sched_getaffinity(0)


@pytest.fixture
def four_cpus(monkeypatch):
    """A process allowed CPUs 1, 3, 4 and 6, its calling thread on CPU 4."""
    monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {1, 3, 4, 6}, raising=False)
    monkeypatch.setattr(threads, "current_cpu", lambda: 4)


def test_a_run_that_takes_every_cpu_gets_one_each_its_own_first(four_cpus):
    assert threads.placement(4) == [4, 1, 3, 6]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 8])
def test_a_run_with_more_or_fewer_threads_than_cpus_is_left_alone(four_cpus, n):
    assert threads.placement(n) is None


def test_no_placement_when_the_calling_threads_cpu_is_unknown_or_not_its_own(four_cpus, monkeypatch):
    monkeypatch.setattr(threads, "current_cpu", lambda: None)
    assert threads.placement(4) is None
    monkeypatch.setattr(threads, "current_cpu", lambda: 2)   # moved off its CPUs meanwhile
    assert threads.placement(4) is None


@linux
def test_the_current_cpu_is_one_of_the_threads_own():
    cpu = threads.current_cpu()
    assert cpu is None or cpu in _allowed()


def _in_new_thread(fn):
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as error:  # noqa: B036 - handed back to the test
            result["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


@linux
def test_kept_on_keeps_the_thread_there_and_gives_its_cpus_back():
    allowed = _allowed()
    cpu = max(allowed)

    def body():
        with threads.kept_on(cpu):
            inside = os.sched_getaffinity(0)
        return inside, os.sched_getaffinity(0)

    inside, after = _in_new_thread(body)
    assert inside == {cpu}
    assert after == allowed


@linux
def test_kept_on_gives_the_cpus_back_when_the_block_fails():
    allowed = _allowed()

    def body():
        with pytest.raises(KeyError):
            with threads.kept_on(min(allowed)):
                raise KeyError("job failed")
        return os.sched_getaffinity(0)

    assert _in_new_thread(body) == allowed


@linux
@pytest.mark.parametrize("cpu", [None, 1 << 20, -1, 1 << 70])
def test_kept_on_without_a_usable_cpu_changes_nothing(cpu):
    allowed = _allowed()

    def body():
        with threads.kept_on(cpu):
            return os.sched_getaffinity(0)

    assert _in_new_thread(body) == allowed
    assert _allowed() == allowed


def _masks_seen(n_threads, n_jobs=12, macs=1e12):
    """Run ``n_jobs`` jobs of ``macs`` multiply-adds in all on ``n_threads`` threads; each
    job records its thread's CPUs."""
    seen = []
    lock = threading.Lock()
    started = threading.Barrier(min(n_threads, n_jobs), timeout=10)

    def job(i):
        mask = frozenset(os.sched_getaffinity(0))
        if i < min(n_threads, n_jobs):
            try:
                started.wait()       # every thread holds a job at once: each has its own CPU
            except threading.BrokenBarrierError:
                pass
        with lock:
            seen.append((threading.get_ident(), mask))

    _gemm.run_jobs([(i,) for i in range(n_jobs)], job, n_threads, lambda i: None, macs)
    return seen


@linux
def test_blas_jobs_run_one_thread_per_cpu_and_give_the_cpus_back():
    allowed = _allowed()
    if not 2 <= len(allowed) <= 16:
        pytest.skip("needs 2 to 16 usable CPUs")
    if threads.current_cpu() is None:
        pytest.skip("the C library cannot tell a thread's CPU")
    seen = _masks_seen(len(allowed))
    by_thread = {}
    for ident, mask in seen:
        by_thread.setdefault(ident, set()).add(mask)
    assert all(len(mask) == 1 and mask <= allowed for ident, mask in seen)
    placed = [next(iter(masks)) for masks in by_thread.values()]
    assert all(len(masks) == 1 for masks in by_thread.values())   # one CPU per thread for the run
    assert len(set(placed)) == len(placed)                         # and no two threads share one
    assert _allowed() == allowed
    pool = _gemm._workers(len(allowed) - 1)
    workers_after = {pool.submit(lambda: frozenset(os.sched_getaffinity(0))).result() for _ in range(8)}
    assert workers_after == {frozenset(allowed)}


@linux
def test_a_blas_run_with_fewer_threads_than_cpus_is_not_placed():
    allowed = _allowed()
    if len(allowed) < 3:
        pytest.skip("needs 3 usable CPUs")
    assert {mask for _, mask in _masks_seen(2)} == {frozenset(allowed)}


@linux
def test_a_short_run_is_not_placed():
    """Below PLACE_MIN_MACS_PER_THREAD a kept thread could wait out Numba's spinning workers."""
    allowed = _allowed()
    if not 2 <= len(allowed) <= 16 or threads.current_cpu() is None:
        pytest.skip("needs 2 to 16 usable CPUs and sched_getcpu")
    short = _gemm.PLACE_MIN_MACS_PER_THREAD * len(allowed) - 1
    assert {mask for _, mask in _masks_seen(len(allowed), macs=short)} == {frozenset(allowed)}
    assert all(len(mask) == 1 for _, mask in _masks_seen(len(allowed), macs=short + 1))


@linux
def test_a_run_beside_a_placed_one_is_not_placed(monkeypatch):
    """Two runs at once in one process (a Dask worker's threads) would each keep their
    calling thread where it is, perhaps on the same CPU: the second is left to the system."""
    allowed = _allowed()
    if not 2 <= len(allowed) <= 16 or threads.current_cpu() is None:
        pytest.skip("needs 2 to 16 usable CPUs and sched_getcpu")
    monkeypatch.setattr(_gemm, "_placed_runs", 1)
    assert {mask for _, mask in _masks_seen(len(allowed))} == {frozenset(allowed)}
    assert _gemm._placed_runs == 1


@linux
def test_the_count_of_placed_runs_comes_back_to_zero_after_a_failed_job():
    allowed = _allowed()
    if not 2 <= len(allowed) <= 16:
        pytest.skip("needs 2 to 16 usable CPUs")

    def job(i):
        if i == 3:
            raise ValueError("bad job")

    with pytest.raises(ValueError, match="bad job"):
        _gemm.run_jobs([(i,) for i in range(8)], job, len(allowed), lambda i: None, 1e12)
    assert _gemm._placed_runs == 0
    assert _allowed() == allowed


@pytest.mark.parametrize("path", ["gemm", "col2im"])
def test_placement_never_changes_a_result(monkeypatch, path):
    monkeypatch.setattr(_gemm, "PLACE_MIN_MACS_PER_THREAD", 0)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 24, 6, 5, 7)).astype(np.float32)
    w = rng.standard_normal((24, 16, 2, 2, 2)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    placed = conv_transpose3d(x, w, b, 2, path=path)
    monkeypatch.setattr(_gemm, "placement", lambda n: None)
    np.testing.assert_array_equal(conv_transpose3d(x, w, b, 2, path=path), placed)
