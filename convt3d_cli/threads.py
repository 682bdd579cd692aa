"""How many threads a run computes with, without importing Numba for it.

Runs whose layer is small never load Numba (the ``columns`` path is NumPy alone), so
the thread setting cannot live in Numba alone: until Numba is loaded it is kept here,
per calling thread as Numba keeps its own, and handed to Numba when the kernels load
(:func:`apply_to_numba`). Once Numba is loaded, Numba's setting is the setting.

Where a run's threads run: :func:`placement` and :func:`kept_on` keep the threads of a
run that takes every usable CPU one to a CPU (the BLAS paths use them).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager

_local = threading.local()


def _numba():
    """Numba's module once it is fully imported, else None: while one thread imports it,
    ``sys.modules`` already holds the half-initialised module for every other thread."""
    numba = sys.modules.get("numba")
    if numba is None or getattr(getattr(numba, "__spec__", None), "_initializing", False):
        return None
    return numba


def available():
    """The most threads a run may use: ``NUMBA_NUM_THREADS`` when set, else the usable cores
    (what Numba sizes its pool by)."""
    numba = _numba()
    if numba is not None:
        return int(numba.config.NUMBA_NUM_THREADS)
    try:
        value = int(os.environ.get("NUMBA_NUM_THREADS", ""))
        if value > 0:
            return value
    except ValueError:
        pass
    return cores()


def cores():
    """Cores this process may run on (CPU affinity, e.g. a SLURM allocation), at least 1."""
    counter = getattr(os, "process_cpu_count", None)       # Python >= 3.13
    if counter is not None:
        return max(1, counter() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def current():
    """The current thread setting of the calling thread."""
    numba = _numba()
    if numba is not None:
        try:
            return max(1, int(numba.get_num_threads()))
        except Exception:  # noqa: BLE001 - Numba half-imported or its threading layer unusable
            return available()
    return getattr(_local, "threads", None) or available()


def use(threads):
    """Use ``threads`` (clipped to :func:`available`) from now on in the calling thread;
    return the previous setting."""
    previous = current()
    value = max(1, min(int(threads), available()))
    numba = _numba()
    if numba is not None:
        numba.set_num_threads(value)
    _local.threads = value
    return previous


def apply_to_numba():
    """Give Numba, just loaded, the setting made before it was (the calling thread's)."""
    value = getattr(_local, "threads", None)
    if value is not None:
        import numba

        numba.set_num_threads(max(1, min(value, numba.config.NUMBA_NUM_THREADS)))


@contextmanager
def limited(threads):
    """Run the block with ``threads`` compute threads and at most that many BLAS/OpenMP threads.

    ``None`` changes nothing. BLAS pools (NumPy's OpenBLAS or MKL, which the ``gemm`` and
    ``columns`` paths call) are limited through threadpoolctl.
    """
    if threads is None:
        yield
        return
    previous = use(threads)
    try:
        from threadpoolctl import threadpool_limits

        # Never more than may be used: a C int, whatever the option said (--threads 10**20).
        with threadpool_limits(limits=max(1, min(int(threads), available()))):
            yield
    finally:
        use(previous)


_sched_getcpu = None


def current_cpu():
    """The CPU the calling thread runs on, or None where the C library cannot say."""
    global _sched_getcpu
    if _sched_getcpu is None:
        try:
            import ctypes

            _sched_getcpu = ctypes.CDLL(None).sched_getcpu
            _sched_getcpu.restype = ctypes.c_int
        except (OSError, AttributeError, TypeError):  # no C library to ask (not glibc/musl)
            _sched_getcpu = False
    if not _sched_getcpu:
        return None
    cpu = _sched_getcpu()
    return cpu if cpu >= 0 else None


def placement(threads):
    """One CPU per thread of a run of ``threads`` threads, the calling thread's own CPU first,
    or None to leave the threads where the system puts them.

    Only a run that uses every CPU this thread may run on gets CPUs: then one thread per CPU
    is the only sensible layout, and keeping it spares the run a wait the system's scheduler
    makes it pay on small VMs. A thread woken to help the calling one is often put on the
    caller's own CPU, and both share it for several milliseconds before one moves to the
    idle CPU (benchmarks/README.md, "Threads that call BLAS share a CPU"). A run given fewer
    threads than CPUs is left to the system.
    """
    if threads < 2:
        return None
    try:
        allowed = os.sched_getaffinity(0)
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return None
    here = current_cpu()
    if len(allowed) != threads or here not in allowed:
        return None
    return [here] + sorted(allowed - {here})


@contextmanager
def kept_on(cpu):
    """Keep the calling thread on ``cpu`` for the block (nothing when ``cpu`` is None); its
    own set of CPUs is given back after, whatever happens in the block."""
    saved = None
    if cpu is not None:
        try:
            saved = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {cpu})
        except (AttributeError, OSError, ValueError, OverflowError):  # not Linux, or no such CPU
            saved = None
    try:
        yield
    finally:
        if saved is not None:
            try:
                os.sched_setaffinity(0, saved)
            except OSError:  # pragma: no cover - the process's CPUs changed meanwhile
                pass
