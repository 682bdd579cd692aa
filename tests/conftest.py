"""Shared test setup: make ``tests/reference.py`` importable from every test folder."""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# The engine's measured path choice (engine/_tuner.py) would time several kernels on
# large layers and remember the winner on disk; tests run the rules (or force paths)
# so that they do not depend on timings. tests/engine/test_tuner.py turns it back on.
os.environ.setdefault("CONVT3D_TUNE", "0")

