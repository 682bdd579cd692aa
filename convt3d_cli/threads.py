"""How many threads a run computes with, without importing Numba for it.

Runs whose layer is small never load Numba (the ``columns`` path is NumPy alone), so
the thread setting cannot live in Numba alone: until Numba is loaded it is kept here,
per calling thread as Numba keeps its own, and handed to Numba when the kernels load
(:func:`apply_to_numba`). Once Numba is loaded, Numba's setting is the setting.
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
