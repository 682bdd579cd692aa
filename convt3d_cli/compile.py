"""``convt3d compile``: compile every Numba kernel into the on-disk cache ahead of time.

A fresh install compiles the kernels a layer needs on its first run (a few seconds
per kernel and dtype, once per CPU and Numba version). Container images and cluster
nodes can pay that once, at build time, by running this: it runs each compute path
on a tiny layer per dtype, which compiles (or loads) exactly the specialisations real
runs use, and reports which kernels it compiled and how long that took.
"""

from __future__ import annotations

import time

import numpy as np

DTYPES = ("float32", "float64")

#: One tiny layer per compute path (``(Cin, Cout, kernel, stride, padding)``) that the
#: path can run; ``blocked``'s runs once per register block the tuner measures on this CPU
#: (``_layer.fitting_blocks``). ``fir`` and ``subpixel`` also count non-finite
#: inputs (``count_nonfinite``), the blocked paths pack weights (``pack_weights``) and
#: large outputs have their pages mapped by all threads (``map_pages``, with the first path).
LAYERS = {
    "fir": (1, 1, 3, 2, 1),
    "blocked": (2, 3, 3, 2, 1),
    "subpixel": (2, 2, 3, 2, 1),
    "paired": (1, 1, 4, 2, 1),
    "shuffle": (2, 3, 2, 2, 0),
    "gemm": (2, 3, 2, 2, 0),
    "col2im": (2, 3, 3, 2, 1),
}

#: The kernels a caller runs (``engine._kernels``); the others are helpers they inline.
KERNELS = ("direct_fir", "blocked_phases", "subpixel_blocked", "paired_rows", "shuffle_gemm", "gemm_scatter",
           "col2im_sum", "pack_weights", "count_nonfinite", "map_pages")


def compile_kernels(dtypes=DTYPES, echo=None):
    """Compile (or load from the cache) every kernel for ``dtypes``.

    Parameters
    ----------
    dtypes : iterable of {"float32", "float64"}
    echo : callable(str), optional
        Receives one line per path and dtype as it finishes.

    Returns
    -------
    dict
        ``cache`` (the folder), ``seconds`` (total), ``steps``: one dict per (dtype, path)
        with ``compiled`` (the kernels compiled, not loaded) and ``seconds``.
    """
    from .engine import _layer, _numba_env

    _numba_env.kernels()
    cache = _numba_env.cache_folder()
    steps = []
    t_start = time.perf_counter()
    for dtype in dtypes:
        # Every block the tuner measures for this dtype (``_layer.fitting_blocks``).
        layers = dict(LAYERS)
        blocked = layers.pop("blocked")
        layers.update(("blocked-" + block, blocked) for block in _layer.fitting_blocks(np.dtype(dtype).itemsize))
        for path, (cin, cout, k, s, p) in layers.items():
            before = len(_numba_env.compiled_so_far())
            t0 = time.perf_counter()
            _run_path(_layer, path, np.dtype(dtype), cin, cout, k, s, p)
            seconds = time.perf_counter() - t0
            new = _numba_env.compiled_so_far()[before:]
            compiled = [name.lstrip("_") for name in new if name.lstrip("_") in KERNELS]
            step = {"dtype": dtype, "path": path, "compiled": sorted(set(compiled)), "seconds": round(seconds, 3)}
            steps.append(step)
            if echo:
                what = ", ".join(step["compiled"]) if step["compiled"] else "already cached"
                echo(f"{dtype:8} {path:12} {seconds:6.2f} s  {what}")
    return {"cache": cache, "seconds": round(time.perf_counter() - t_start, 3), "steps": steps}


def _run_path(_layer, path, dtype, cin, cout, k, s, p):
    """Run one tiny layer through ``path`` as a whole volume, with finite and non-finite
    inputs (the fallbacks), in the argument types a real run passes."""
    rng = np.random.default_rng(0)
    shape = (1, cin, 3, 4, 5)
    weight = rng.standard_normal((cin, cout, k, k, k)).astype(dtype)
    bias = rng.standard_normal(cout).astype(dtype)
    layer = _make_layer(_layer, path, shape, weight, bias, s, p, dtype)
    for poison in (False, True):
        x = rng.standard_normal(shape).astype(dtype)
        if poison:
            x[0, 0, 1, 1, 1] = np.inf
        out = np.empty(layer.output_shape, dtype=dtype)
        _layer._fault_in(out, workers=2, parallel_from=0)  # what a large output gets
        layer.run_slab(x, 0, 0, layer.output_shape[2], out)


def _make_layer(_layer, path, shape, weight, bias, s, p, dtype):
    """``PreparedLayer`` pinned to ``path`` (its ``path=`` argument, or the rules replaced)."""
    try:
        return _layer.PreparedLayer(shape, weight, bias, stride=s, padding=p, dtype=dtype, path=path)
    except TypeError:  # an engine without ``path=``
        rules = _layer.choose_path
        _layer.choose_path = lambda *args: path
        try:
            return _layer.PreparedLayer(shape, weight, bias, stride=s, padding=p, dtype=dtype)
        finally:
            _layer.choose_path = rules
