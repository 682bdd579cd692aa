"""Small helpers shared by test folders (importable because tests/conftest.py puts tests/ on sys.path).

Kept out of conftest.py: with several conftest modules, ``from conftest import ...`` finds
whichever one was imported first.
"""

import sys
from pathlib import Path

import pytest


def console_script():
    """The installed ``convt3d`` script next to this Python, or skip the test."""
    folder = Path(sys.executable).parent
    for name in ("convt3d", "convt3d.exe"):
        if (folder / name).exists():
            return folder / name
    pytest.skip("the convt3d console script is not installed next to this Python")


def invoke_in(folder, *args):
    """``convt3d ARGS`` in-process (click's CliRunner) from inside ``folder``; returns the result."""
    import os

    from click.testing import CliRunner

    from convt3d_cli.cli import cli

    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return CliRunner().invoke(cli, [str(a) for a in args])
    finally:
        os.chdir(cwd)


def run_in_slabs(layer, x, cuts, dtype):
    """A layer's output computed slab by slab over the D cut points ``cuts``, each slab from
    only the input planes it reads (``geometry.input_window``), concatenated along D."""
    import numpy as np

    from convt3d_cli import geometry

    pieces = []
    for o0, o1 in zip(cuts[:-1], cuts[1:]):
        i0, i1 = geometry.input_window(o0, o1, x.shape[2], 0, layer.params)
        slab = np.ascontiguousarray(x[:, :, i0:max(i1, i0 + 1)])
        out = np.empty(layer.output_shape[:2] + (o1 - o0,) + layer.output_shape[3:], dtype=dtype)
        layer.run_slab(slab, i0, o0, o1, out)
        pieces.append(out)
    return np.concatenate(pieces, axis=2)


def child_finishes(pid, seconds=30):
    """Whether forked child ``pid`` exits with status 0 within ``seconds``; one that is
    still running then (hung on a lock it inherited) is killed."""
    import os
    import signal
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status) == 0
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return False
