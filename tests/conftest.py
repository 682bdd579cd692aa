"""Shared test setup: make ``tests/reference.py`` importable from every test folder."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The engine's measured path choice (engine/_tuner.py) would time several kernels on
# large layers and remember the winner on disk; tests run the rules (or force paths)
# so that they do not depend on timings. tests/engine/test_tuner.py turns it back on.
os.environ.setdefault("CONVT3D_TUNE", "0")


@pytest.fixture(autouse=True)
def _layers_decided_afresh():
    """Tests change the rules, the CPU features seen and the tuning file: each test's
    layers are decided anew, not taken from an earlier test's (``_layer.forget_decisions``)."""
    from convt3d_cli.engine import _layer

    _layer.forget_decisions()
    yield



def pytest_assertrepr_compare(op, left, right):
    """Say where two large byte strings differ instead of letting pytest diff them: its
    line diff of a multi-megabyte file takes many minutes."""
    if (op == "==" and isinstance(left, (bytes, bytearray)) and isinstance(right, (bytes, bytearray))
            and max(len(left), len(right)) > 4096):
        first = next((i for i, (a, b) in enumerate(zip(left, right)) if a != b), min(len(left), len(right)))
        return [f"{len(left)} bytes == {len(right)} bytes",
                f"first difference at byte {first}: {bytes(left[first:first + 16]).hex()} "
                f"!= {bytes(right[first:first + 16]).hex()}"]
    return None
