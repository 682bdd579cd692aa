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
