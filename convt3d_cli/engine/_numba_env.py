"""Load the Numba kernels once, with a writable on-disk cache.

Numba writes its cache beside the source file; in a read-only install
(system site-packages, containers) that fails, so unless the user chose
``NUMBA_CACHE_DIR`` we point it at a per-user cache folder. This must happen
before numba is first imported, which is why the kernels are imported here
and nowhere at module level.
"""

import os
import sys
from contextlib import contextmanager

_kernels = None


def cache_dir():
    """The per-user folder for compiled kernels (``$XDG_CACHE_HOME/convt3d/numba``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "convt3d", "numba")


def _package_dir_writable():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.access(here, os.W_OK)


def kernels():
    """Return the ``_kernels`` module, importing numba on first use."""
    global _kernels
    if _kernels is None:
        if "NUMBA_CACHE_DIR" not in os.environ and "numba" not in sys.modules and not _package_dir_writable():
            folder = cache_dir()
            try:
                os.makedirs(folder, exist_ok=True)
                os.environ["NUMBA_CACHE_DIR"] = folder
            except OSError:
                pass  # numba then falls back to its own user-wide locator
        from . import _kernels as module
        _kernels = module
    return _kernels


def set_threads(threads):
    """Set Numba's thread count for the following kernel calls; return the previous one."""
    import numba
    previous = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS)))
    return previous


@contextmanager
def limited_threads(threads):
    """Run the block with ``threads`` Numba threads and at most that many BLAS/OpenMP threads.

    ``None`` changes nothing. BLAS pools are limited through threadpoolctl when it is
    installed (NumPy's OpenBLAS or MKL; convt3d's GEMM-shaped paths may call them).
    """
    if threads is None:
        yield
        return
    previous = set_threads(threads)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # pragma: no cover - a declared dependency
            yield
        else:
            with threadpool_limits(limits=int(threads)):
                yield
    finally:
        set_threads(previous)
