"""Load the Numba kernels once, with a writable on-disk cache.

Numba writes its cache beside the source file; in a read-only install
(system site-packages, containers) that fails, so unless the user chose
``NUMBA_CACHE_DIR`` we point it at a per-user cache folder. This must happen
before numba is first imported, which is why the kernels are imported here
and nowhere at module level.
"""

import os
import sys
import threading

from .. import threads

_kernels = None

#: The line printed (once per process) when a kernel is compiled rather than loaded.
COMPILE_NOTICE = "compiling kernels for this CPU (first run only)"
_notice = {"cli": False, "quiet": True, "shown": False}
_compiles = []
_compiles_lock = threading.Lock()
_load_lock = threading.RLock()


def cache_dir():
    """The per-user folder for compiled kernels (``$XDG_CACHE_HOME/convt3d/numba``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "convt3d", "numba")


def _package_dir_writable():
    here = os.path.dirname(os.path.abspath(__file__))
    return os.access(here, os.W_OK)


def kernels():
    """Return the ``_kernels`` module, importing numba on first use.

    Thread-safe: the first calls of several threads load it once (Numba's own first
    import is not safe to run twice at the same time).
    """
    if _kernels is None:
        with _load_lock:
            if _kernels is None:
                _load()
                return _kernels
        threads.apply_to_numba()  # another thread loaded it meanwhile: this thread's setting
    _note_cli()
    return _kernels


def _load():
    """Point Numba at a writable cache, count compilations and import the kernels."""
    global _kernels
    if "NUMBA_CACHE_DIR" not in os.environ and "numba" not in sys.modules and not _package_dir_writable():
        folder = cache_dir()
        try:
            os.makedirs(folder, exist_ok=True)
            os.environ["NUMBA_CACHE_DIR"] = folder
        except OSError:
            pass  # numba then falls back to its own user-wide locator
    _note_cli()
    _install_listener()
    if _notice["cli"]:
        _skip_scipy_blas()
    from . import _kernels as module
    threads.apply_to_numba()
    _kernels = module


def _skip_scipy_blas():
    """Load Numba's NumPy support without its BLAS check, in a ``convt3d`` command only.

    Loading a cached kernel imports ``numba.np.arraymath``, which imports SciPy's BLAS
    (about 0.25 s, when SciPy is installed) only to know whether ``np.dot`` may be compiled.
    No convt3d kernel calls BLAS from Numba, so the command lets that import fail. A
    library caller's process is left alone: its own Numba code may need ``np.dot``.
    """
    name = "scipy.linalg.cython_blas"
    if "numba.np.arraymath" in sys.modules or name in sys.modules:
        return
    sys.modules[name] = None  # "import scipy.linalg.cython_blas" raises ImportError
    try:
        import numba.np.arraymath  # noqa: F401 - imported here, with the check failing fast
    finally:
        if sys.modules.get(name, 0) is None:
            del sys.modules[name]


def _note_cli():
    """Remember whether a ``convt3d`` command runs in this thread, and with ``-q``.

    Kernels may compile in a pool thread, where click's context is not visible: the
    notice follows what the command's own thread said.
    """
    click = sys.modules.get("click")
    ctx = click.get_current_context(silent=True) if click is not None else None
    if ctx is not None:
        _notice["cli"] = True
        _notice["quiet"] = bool(ctx.params.get("quiet", False)) or ctx.info_name == "compile"


def _install_listener():
    """Count real compilations with Numba's ``numba:compile`` event.

    Numba raises it only after its cache lookup failed, so loading cached kernels costs
    nothing here. The first compilation in a ``convt3d`` command without ``-q`` prints
    :data:`COMPILE_NOTICE` on stderr; library calls stay silent.
    """
    from numba.core import event

    class _Listener(event.Listener):
        def on_start(self, ev):
            with _compiles_lock:
                _compiles.append(ev.data["dispatcher"].py_func.__name__)
                show = _notice["cli"] and not _notice["quiet"] and not _notice["shown"]
                _notice["shown"] = _notice["shown"] or show
            if show:
                print(COMPILE_NOTICE, file=sys.stderr, flush=True)

        def on_end(self, ev):
            pass

    event.register("numba:compile", _Listener())


def compiled_so_far():
    """Names of the Numba functions compiled (not loaded from the cache) in this process,
    nested helpers included, in order."""
    with _compiles_lock:
        return list(_compiles)


def cache_folder():
    """The folder Numba caches the kernels in (its locator's choice for ``_kernels``)."""
    kern = kernels()
    try:
        return kern._paired_rows._cache._cache_path
    except AttributeError:  # another Numba's internals
        return os.environ.get("NUMBA_CACHE_DIR") or os.path.dirname(os.path.abspath(kern.__file__))
