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
