"""Where compiled kernels are cached: the user's choice, else a per-user folder for read-only installs."""

import os
import subprocess
import sys

CODE = ("import os, sys; from convt3d_cli.engine import _numba_env as env; "
        "env._package_dir_writable = lambda: {writable}; env.kernels(); "
        "print(os.environ.get('NUMBA_CACHE_DIR', '')); print('numba' in sys.modules)")


def _run(tmp_path, writable, **extra_env):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_CACHE_DIR"}
    env.update(XDG_CACHE_HOME=str(tmp_path), **extra_env)
    proc = subprocess.run([sys.executable, "-c", CODE.format(writable=writable)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")


def test_read_only_package_uses_a_user_cache_folder(tmp_path):
    cache, numba_loaded, _ = _run(tmp_path, writable=False)
    assert cache == str(tmp_path / "convt3d" / "numba")
    assert os.path.isdir(cache) and numba_loaded == "True"


def test_user_choice_is_kept(tmp_path):
    chosen = str(tmp_path / "mine")
    cache, _, _ = _run(tmp_path, writable=False, NUMBA_CACHE_DIR=chosen)
    assert cache == chosen


def test_writable_package_keeps_numba_default(tmp_path):
    cache, _, _ = _run(tmp_path, writable=True)
    assert cache == ""


RACE = """
import threading
import numpy as np
from convt3d_cli.engine import conv_transpose3d
x = np.ones((1, 1, 6, 6, 6), np.float32)
w = np.ones((1, 1, 3, 3, 3), np.float32)
start = threading.Barrier(4)
errors, results = [], []

def call(threads):
    start.wait()
    try:
        results.append(conv_transpose3d(x, w, stride=2, path="paired", threads=threads))
    except BaseException as error:
        errors.append(repr(error))

workers = [threading.Thread(target=call, args=(1 + i % 2,)) for i in range(4)]
for worker in workers:
    worker.start()
for worker in workers:
    worker.join()
assert not errors, errors
assert len(results) == 4 and all(np.array_equal(r, results[0]) for r in results)
print("ok")
"""


def test_first_calls_from_several_threads_load_numba_once(tmp_path):
    """Four threads reach the compiled kernels at once in a fresh process: Numba's first
    import must happen once, not four times side by side."""
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-c", RACE], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"
