"""Zarr store tests: skipped without zarr-python 3 (the ``convt3d[zarr]`` extra)."""

import numpy as np
import pytest

pytest.importorskip("zarr", minversion="3")


@pytest.fixture
def rng():
    return np.random.default_rng(19)
