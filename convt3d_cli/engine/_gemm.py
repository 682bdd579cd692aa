"""The ``gemm`` path: NumPy's BLAS on layers whose kernel equals the stride.

With kernel == stride and no start crop every input voxel feeds its own
``sD x sH x sW`` box of outputs, so a layer is one matrix product per group,
``(Cout_g * sD * sH * sW, Cin_g) @ (Cin_g, positions)``, whose rows are pixel-shuffled to
the output. The product is cut into *jobs*: a chunk of ``kp`` whole input planes (its
columns) times a block of ``n_co`` output channels (its rows). Each job runs BLAS on one
thread and scatters its product, still in cache, with the bias added
(``_kernels.gemm_scatter``); the jobs run on the run's threads side by side.

One thread per product, rather than BLAS's own pool followed by a parallel scatter:
Numba's OpenMP workers keep spinning for a while after each parallel kernel, and a BLAS
call made meanwhile runs at a fraction of its rate on a machine with few cores. A run that
takes every CPU the process may use keeps each of its threads on its own CPU until it
ends (:func:`convt3d_cli.threads.placement`).

Bits. OpenBLAS's sums depend on the shape of the product and on its thread count (on
the Zen 3 VM a row of a 2048 x 320 @ 320 x 512 product differs from the same row of its
first 1024 rows, and 1 thread differs from 2). So every job's product has the same shape,
set by the layer alone, each input column keeps its place in its chunk, and BLAS always
runs on one thread: a slab (or a block's window) that holds part of a chunk multiplies
the whole chunk, with zeros for the planes it lacks. A column's result then depends
neither on how the volume is cut nor on the run's thread count, so streamed and blocked
runs equal whole runs bit for bit.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import NamedTuple

import numpy as np

from ..threads import kept_on, placement

#: One job's product (``n_co * sD * sH * sW`` rows by ``kp * H * W`` columns) stays near
#: this size, so it is scattered from cache. Single-threaded sgemm runs within a few per
#: cent of its best rate on such products (benchmarks/README.md, "BLAS for kernel == stride").
PRODUCT_BYTES = 1 << 20
#: Columns of one product, at least (whole planes; fewer when the volume has fewer).
MIN_COLUMNS = 512

#: Multiply-adds per thread from which a run's threads are kept one to a CPU
#: (:func:`run_jobs`). A kept thread cannot leave a CPU that Numba's OpenMP worker still
#: spins on after a parallel kernel: a run of 0.6 M multiply-adds right after one took
#: 2.0-2.6 ms placed against 1.1 left to the scheduler. From about a millisecond of BLAS
#: per thread on, avoiding a shared CPU for the whole run is worth more
#: (benchmarks/README.md, "Threads that call BLAS share a CPU").
PLACE_MIN_MACS_PER_THREAD = 5e7

_controller = None
_pools = {}
_pool_lock = threading.Lock()
#: Runs of :func:`run_jobs` whose threads are kept on CPUs now (at most one at a time).
_placed_runs = 0


def _forget_pools():
    """A forked child has none of its parent's threads: its pools start afresh."""
    global _pool_lock, _placed_runs
    _pools.clear()
    _pool_lock = threading.Lock()
    _placed_runs = 0


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools)


class GemmPlan(NamedTuple):
    """How the ``gemm`` path cuts a layer's products into jobs.

    Attributes
    ----------
    planes : int
        Input planes per chunk (``kp``).
    origin : int
        Chunk ``c`` holds input planes ``[c * kp - origin, (c + 1) * kp - origin)``: 0 for a
        whole layer, the window's first plane in its layer for a block's window.
    channels : int
        Output channels per job (the last block of a group may hold fewer).
    """

    planes: int
    origin: int
    channels: int


def plan(cout_g, stride, input_spatial, itemsize, origin=0):
    """The :class:`GemmPlan` of a layer: ``input_spatial`` is its whole input's ``(D, H, W)``."""
    n_id, n_ih, n_iw = input_spatial
    plane = n_ih * n_iw
    n_phase = int(np.prod(stride))
    planes = max(1, min(n_id, -(-MIN_COLUMNS // plane)))
    channels = max(1, min(cout_g, PRODUCT_BYTES // (n_phase * planes * plane * itemsize)))
    return GemmPlan(planes, int(origin), channels)


def scratch_bytes(gemm_plan, cin_g, stride, input_spatial, itemsize, threads):
    """What a run allocates besides its output: per thread, one job's product and one
    zero-padded chunk of inputs (BLAS keeps its own buffers)."""
    columns = gemm_plan.planes * input_spatial[1] * input_spatial[2]
    rows = gemm_plan.channels * int(np.prod(stride))
    return threads * (rows + cin_g) * columns * itemsize


def _blas_limits():
    """threadpoolctl's view of the loaded BLAS, made once (it scans the loaded libraries)."""
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()
    return _controller


def _workers(threads):
    """A pool of ``threads`` workers, kept for later runs (starting threads costs about
    0.3 ms, a few per cent of a small layer's run)."""
    with _pool_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(threads, thread_name_prefix="convt3d-gemm")
        return _pools[threads]


@contextmanager
def _placed(threads, macs):
    """The CPU of each of a run's ``threads`` threads (None: left to the system), held
    for the block.

    One CPU per thread when the run takes them all and is long enough
    (:func:`convt3d_cli.threads.placement`, :data:`PLACE_MIN_MACS_PER_THREAD`): a helper
    woken onto the caller's CPU would run its BLAS products at half speed or less. Runs
    side by side in one process (a Dask worker's threads) are left to the system: each
    would place its own calling thread without knowing of the others.
    """
    global _placed_runs
    with _pool_lock:
        cpus = None
        if macs >= PLACE_MIN_MACS_PER_THREAD * threads and _placed_runs == 0:
            cpus = placement(threads)
        _placed_runs += cpus is not None
    try:
        yield cpus or [None] * threads
    finally:
        if cpus is not None:
            with _pool_lock:
                _placed_runs -= 1


def run_jobs(jobs, job, threads, done, macs=0):
    """Run ``job(*args)`` for every ``args`` in ``jobs`` on ``threads`` threads, with BLAS
    limited to one thread, and call ``done(i)`` (on the calling thread) once job ``i`` and
    every job before it have finished. A job's error stops the jobs not yet started and
    is raised. ``macs``: the multiply-adds of all jobs, about.

    The calling thread works too, and every thread claims the next job when it is free:
    a kept pool's worker can take a millisecond or more to wake on a busy VM, and a
    fixed share per thread would make the run wait for it. When ``threads`` is every CPU
    the process may use and the run has :data:`PLACE_MIN_MACS_PER_THREAD` multiply-adds
    per thread, each thread stays on its own CPU for the run and gets its CPUs back after.
    """
    with _blas_limits().limit(limits=1, user_api="blas"):
        if threads <= 1 or len(jobs) < 2:
            for i, args in enumerate(jobs):
                job(*args)
                done(i)
            return
        n_jobs = len(jobs)
        finished = [threading.Event() for _ in jobs]
        claim_lock = threading.Lock()
        state = {"next": 0, "error": None}

        def work(report):
            while True:
                with claim_lock:
                    i = state["next"]
                    if i >= n_jobs or state["error"] is not None:
                        return
                    state["next"] = i + 1
                try:
                    job(*jobs[i])
                except BaseException as error:  # noqa: B036 - handed to the calling thread
                    with claim_lock:
                        if state["error"] is None:
                            state["error"] = error
                    return
                finally:
                    finished[i].set()
                report()

        reported = 0

        def report_finished():
            nonlocal reported
            while reported < n_jobs and finished[reported].is_set() and state["error"] is None:
                done(reported)
                reported += 1

        def help_on(cpu):
            with kept_on(cpu):
                work(lambda: None)

        with _placed(threads, macs) as cpus:
            helpers = [_workers(threads - 1).submit(help_on, cpus[k + 1]) for k in range(min(threads, n_jobs) - 1)]
            try:
                with kept_on(cpus[0]):
                    work(report_finished)
            finally:
                for helper in helpers:
                    helper.result()
        if state["error"] is not None:
            raise state["error"]
        for i in range(reported, n_jobs):
            done(i)


def run(gemm_plan, weight, bias, x_slab, in_start, n_id, out_start, out_stop, out, threads, scatter,
        progress=None):
    """Compute output planes ``[out_start, out_stop)`` of a kernel == stride layer into ``out``.

    Parameters
    ----------
    gemm_plan : GemmPlan
    weight : ndarray, (G, Cin_g, Cout_g, sD, sH, sW)
    bias : ndarray, (G * Cout_g,)
    x_slab : ndarray, (N, G * Cin_g, d, H, W)
        Input planes ``[in_start, in_start + d)`` of the ``n_id`` of the layer.
    out : ndarray, (N, G * Cout_g, out_stop - out_start, H', W'), C-contiguous
    threads : int
    scatter : callable
        ``_kernels.gemm_scatter``.
    progress : callable(int), optional
        Called with the number of output planes (N * D) finished since the last call.
    """
    if not out.flags.c_contiguous:
        raise ValueError("the gemm path writes a C-contiguous output only")
    groups, cin_g, cout_g = weight.shape[:3]
    stride = weight.shape[3:]
    s0 = stride[0]
    n_phase = int(np.prod(stride))
    n_batch, _, _, n_ih, n_iw = x_slab.shape
    plane = n_ih * n_iw
    kp, origin, n_co = gemm_plan
    weight_t = weight.reshape(groups, cin_g, -1).transpose(0, 2, 1)  # a view: BLAS transposes it
    for o in range(max(out_start, n_id * s0), out_stop):                  # past the inputs' reach
        out[:, :, o - out_start] = bias.reshape(-1, 1, 1)
    q_lo, q_hi = out_start // s0, min(n_id, (out_stop - 1) // s0 + 1)

    def job(c_lo, p_lo, p_hi, n, g, co0):
        x_g = x_slab[n, g * cin_g:(g + 1) * cin_g, p_lo - in_start:p_hi - in_start]
        if p_hi - p_lo == kp:
            columns = x_g.reshape(cin_g, kp * plane)
        else:
            columns = np.zeros((cin_g, kp * plane), dtype=x_slab.dtype)
            columns[:, (p_lo - c_lo) * plane:(p_hi - c_lo) * plane] = x_g.reshape(cin_g, -1)
        co1 = min(cout_g, co0 + n_co)
        product = np.matmul(weight_t[g, co0 * n_phase:co1 * n_phase], columns)
        scatter(product, bias, out, n, g * cout_g + co0, *stride, c_lo, p_lo - c_lo, p_hi - c_lo, n_ih, n_iw,
                out_start)

    chunks = []
    for c in range((q_lo + origin) // kp, (q_hi - 1 + origin) // kp + 1 if q_hi > q_lo else 0):
        c_lo = c * kp - origin
        chunks.append((c_lo, max(c_lo, q_lo), min(c_lo + kp, q_hi)))
    jobs = [[(chunk + (n, g, co0)) for n in range(n_batch) for g in range(groups) for co0 in range(0, cout_g, n_co)]
            for chunk in chunks]
    done = out_start

    def report(chunk, n_jobs, last):
        """One of the chunk's ``n_jobs`` jobs is finished: that share of its output planes."""
        nonlocal done
        reached = max(done, min(out_stop, chunk[2] * s0))
        if progress and reached > done:
            progress(n_batch * (reached - done) / n_jobs)
        if last:
            done = reached

    steps = [(chunk, len(chunk_jobs), i == len(chunk_jobs) - 1, args)
             for chunk, chunk_jobs in zip(chunks, jobs) for i, args in enumerate(chunk_jobs)]
    macs = sum(min(n_co, cout_g - step[3][5]) for step in steps) * n_phase * cin_g * kp * plane
    run_jobs([step[3] for step in steps], job, threads, lambda i: report(*steps[i][:3]), macs)
    if progress and done < out_stop:
        progress(n_batch * (out_stop - done))
