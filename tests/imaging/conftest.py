"""Fixtures for imaging-file tests: nibabel's own example images, checked invocations."""

import os
from pathlib import Path

import nibabel
import pytest
from helpers import invoke_in

NIBABEL_DATA = Path(os.path.dirname(nibabel.__file__)) / "tests" / "data"


@pytest.fixture
def nib_data():
    """nibabel's test images (they ship with nibabel: written by SPM, FSL and FreeSurfer, not by us)."""
    return NIBABEL_DATA


@pytest.fixture
def run(tmp_path):
    """``run(*args, code=0)``: invoke convt3d inside ``tmp_path`` and check the exit code."""
    def call(*args, code=0):
        result = invoke_in(tmp_path, *args)
        assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr, result.exception)
        if code:
            errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
            assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
        return result
    return call
