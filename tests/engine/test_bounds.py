"""The kernels stay inside their arrays, checked by Numba itself.

The kernels are compiled without bounds checks for speed, so an index one past a
buffer reads whatever memory lies there: results are then right or wrong by luck
(a padding term once read a row of an empty buffer this way). Here a subprocess
compiles them with ``NUMBA_BOUNDSCHECK=1`` (a fresh cache folder, so nothing
unchecked is loaded) and runs random configurations through every path, wide
rows and thin slabs included; any stray index raises IndexError there.
"""

import os
import subprocess
import sys
import textwrap

HERE = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    sys.path[:0] = [{tests!r}, {engine!r}]
    from test_conv_transpose3d import random_config, make_data, layer_kwargs, paired_config, shuffle_config
    from reference import conv_transpose3d_ref
    from convt3d_cli import conv_transpose3d, geometry
    from convt3d_cli.engine import PreparedLayer, _layer

    worst = 0.0
    for path in ("fir", "blocked", "subpixel", "paired", "shuffle", "gemm", "col2im"):
        _layer.choose_path = lambda *args, path=path: path
        for seed in range(60):
            rng = np.random.default_rng(seed)
            cfg = random_config(rng)
            if path == "paired":
                cfg = paired_config(cfg, rng)
            elif path in ("shuffle", "gemm"):
                cfg = shuffle_config(cfg, rng)
            if seed % 3 == 0:   # wide rows: several position blocks and a ragged one
                cfg["spatial"] = cfg["spatial"][:2] + (int(rng.integers(17, 40)),)
            x, w, b = make_data(cfg, rng)
            kwargs = layer_kwargs(cfg)
            expected = conv_transpose3d_ref(x, w, b, **kwargs)
            got = conv_transpose3d(x, w, b, **kwargs, dtype="float64")
            worst = max(worst, float(np.abs(got - expected).max() / max(1.0, np.abs(expected).max())))
            # One output plane at a time, as a tightly budgeted stream does.
            layer = PreparedLayer(x.shape, w, b, dtype=np.float64, **kwargs)
            for o in range(got.shape[2]):
                i0, i1 = geometry.input_window(o, o + 1, x.shape[2], 0, layer.params)
                slab = np.ascontiguousarray(x[:, :, i0:max(i1, i0 + 1)])
                out = np.empty(got.shape[:2] + (1,) + got.shape[3:])
                layer.run_slab(slab, i0, o, o + 1, out)
                assert np.array_equal(out[:, :, 0], got[:, :, o]), (path, seed, o)
    assert worst < 1e-12, worst
    print("ok", worst)
""")


def test_kernels_stay_in_bounds(tmp_path):
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    script = SCRIPT.format(tests=os.path.dirname(HERE), engine=HERE)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok")
