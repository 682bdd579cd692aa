"""``convt3d compile`` fills the kernel cache; the first-run notice shows only when kernels compile.

Each test runs the CLI in a subprocess with its own ``NUMBA_CACHE_DIR``: an empty one is
a fresh install (these tests compile, so they take a while on a cold machine).
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from convt3d_cli.engine._numba_env import COMPILE_NOTICE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PHANTOM = os.path.join(ROOT, "sample_data", "phantom.nii.gz")


def convt3d(cache, *argv, **extra_env):
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_CACHE_DIR", "NUMBA_DEBUG_CACHE")}
    env.update(NUMBA_CACHE_DIR=str(cache), **extra_env)
    proc = subprocess.run([sys.executable, "-m", "convt3d_cli", *argv], env=env, capture_output=True, text=True,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr
    return proc


def quick_start(cache, out, *extra, **extra_env):
    return convt3d(cache, "run", PHANTOM, str(out), "--kernel", "linear", "--stride", "2", "--overwrite", *extra,
                   **extra_env)


def kernel_quick_start(cache, out, *extra, **extra_env):
    """The quick start pinned to the compiled kernel its layer would take if it were large."""
    return quick_start(cache, out, *extra, CONVT3D_PATH="paired", **extra_env)


def test_the_quick_start_needs_no_compiled_kernel(tmp_path):
    """On a fresh install the quick start's small layer runs on NumPy alone: Numba is never
    imported, nothing is compiled or cached, no notice."""
    cache = tmp_path / "numba"
    argv = ["convt3d", "run", PHANTOM, str(tmp_path / "out.nii.gz"), "--kernel", "linear", "--stride", "2"]
    code = ("import runpy, sys\n"
            f"sys.argv = {argv!r}\n"
            "try:\n    runpy.run_module('convt3d_cli', run_name='__main__')\n"
            "except SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('numba' in sys.modules)\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"
    assert COMPILE_NOTICE not in proc.stderr and "output:" in proc.stderr
    assert not cache.exists() or not any(cache.rglob("*.nbi"))


@pytest.fixture(scope="module")
def filled_cache(tmp_path_factory):
    """A cache filled by ``convt3d compile --dtype float32``, and that command's report."""
    cache = tmp_path_factory.mktemp("numba-filled")
    first = json.loads(convt3d(cache, "compile", "--dtype", "float32", "--json").stdout)
    return cache, first


def test_compile_fills_an_empty_cache(filled_cache):
    cache, first = filled_cache
    compiled = {name for step in first["steps"] for name in step["compiled"]}
    assert {"direct_fir", "blocked_phases", "subpixel_blocked", "paired_rows", "shuffle_gemm", "gemm_scatter", "col2im_sum",
            "pack_weights", "count_nonfinite", "map_pages"} <= compiled
    assert all(step["dtype"] == "float32" for step in first["steps"])
    second = json.loads(convt3d(cache, "compile", "--dtype", "float32", "--json").stdout)
    assert [step["compiled"] for step in second["steps"]] == [[] for _ in second["steps"]]


def test_compile_prints_what_it_compiled(filled_cache):
    cache, _ = filled_cache
    proc = convt3d(cache, "compile", "--dtype", "float32")
    assert "already cached" in proc.stdout and "compiled 0 kernel(s) for float32" in proc.stdout
    assert COMPILE_NOTICE not in proc.stderr


def test_after_compile_a_run_compiles_nothing(filled_cache, tmp_path):
    cache, _ = filled_cache
    proc = kernel_quick_start(cache, tmp_path / "out.nii.gz", NUMBA_DEBUG_CACHE="1")
    assert "data saved" not in proc.stdout  # Numba's cache debug lines: nothing was compiled
    assert COMPILE_NOTICE not in proc.stderr


def test_notice_on_a_cold_cache_only_and_never_with_quiet(tmp_path):
    cache = tmp_path / "numba"
    quiet = kernel_quick_start(cache, tmp_path / "a.nii.gz", "-q")        # cold, but -q: nothing on stderr
    assert quiet.stderr == ""
    cold = kernel_quick_start(cache, tmp_path / "b.nii.gz", "--dtype", "float64")   # float64 kernels: cold
    assert cold.stderr.count(COMPILE_NOTICE) == 1
    warm = kernel_quick_start(cache, tmp_path / "c.nii.gz", "--dtype", "float64")
    assert COMPILE_NOTICE not in warm.stderr


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_results(threads):
    """Kernels split their jobs among threads: any split, same bits."""
    from convt3d_cli import conv_transpose3d
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 3, 7, 6, 9)).astype(np.float32)
    w = rng.standard_normal((3, 4, 3, 3, 3)).astype(np.float32)
    expected = conv_transpose3d(x, w, stride=2, padding=1, threads=1)
    np.testing.assert_array_equal(conv_transpose3d(x, w, stride=2, padding=1, threads=threads), expected)
