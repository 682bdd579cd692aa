"""Fixtures for ``convt3d batch``: a folder of tiny scans, one of them corrupt, and a runner.

Volumes are at most 8 voxels per axis and every run uses ``--kernel linear
--stride 2`` in float32, so one set of Numba kernels serves every test; it is
compiled (or loaded from the on-disk cache) once in this process before any
test starts worker processes, which then only load the cache.
"""

import hashlib
import json
import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from convt3d_cli.cli import cli

AFFINE = np.array([[2.0, 0.0, 0.0, -8.0],
                   [0.0, 2.0, 0.0, 4.0],
                   [0.0, 0.0, 3.0, -6.0],
                   [0.0, 0.0, 0.0, 1.0]])

# The layer every test uses: cheap, deterministic and needs no weights file.
LAYER = ("--kernel", "linear", "--stride", "2")

SUMMARY = re.compile(r"^(\d+) done, (\d+) skipped, (\d+) failed in \d+\.\d s$")

# The good scans in the ``scans`` folder, and the corrupt one.
GOOD = ("sub01.nii.gz", "sub02.nii.gz", "sub03.nii.gz", "sub04.nii")
CORRUPT = "sub05.nii.gz"


def digests(folder):
    """Name -> SHA-256 of every file directly in ``folder`` (hidden files included)."""
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def json_lines(stdout):
    """The JSON objects of a ``--json`` batch, keyed by input."""
    records = [json.loads(line) for line in stdout.splitlines() if line.strip()]
    by_input = {record["input"]: record for record in records}
    assert len(by_input) == len(records), "one line per input"
    return by_input


def stable(record):
    """A JSON record without what legitimately changes between runs (timing, memory)."""
    return {k: v for k, v in record.items() if k not in ("seconds", "peak_memory_bytes")}


def summary(stderr):
    """``(done, skipped, failed)`` from the last stderr line, which must be the summary."""
    lines = stderr.strip().splitlines()
    match = SUMMARY.match(lines[-1]) if lines else None
    assert match, stderr
    return tuple(int(n) for n in match.groups())


@pytest.fixture(scope="session")
def kit():
    """The constants and helpers above, for the test modules.

    A fixture rather than ``from conftest import ...``: several test folders have a
    ``conftest`` module, and which one that name finds depends on the collection order.
    """
    return SimpleNamespace(GOOD=GOOD, CORRUPT=CORRUPT, LAYER=LAYER, digests=digests, json_lines=json_lines,
                           stable=stable, summary=summary)


@pytest.fixture(scope="session")
def warm_kernels(tmp_path_factory):
    """Compile (or load) the kernels of :data:`LAYER` once, in this process.

    Numba caches them on disk (``cache=True``); spawned workers and Dask workers
    then load them instead of compiling each on its own.
    """
    import nibabel as nib

    from convt3d_cli import pipeline

    folder = tmp_path_factory.mktemp("warm")
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4), dtype=np.int16), AFFINE), str(folder / "w.nii.gz"))
    pipeline.run_file(str(folder / "w.nii.gz"), str(folder / "o.nii.gz"), kernel="linear",
                      layer_options={"stride": 2})


@pytest.fixture
def scans(tmp_path, warm_kernels):
    """``tmp_path/scans`` with four small int16 scans (three .nii.gz, one .nii) and a corrupt .nii.gz."""
    import nibabel as nib

    folder = tmp_path / "scans"
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i, name in enumerate(GOOD):
        shape = (8, 7, 6) if i % 2 else (6, 6, 5)
        image = nib.Nifti1Image(rng.integers(0, 500, size=shape).astype(np.int16), AFFINE)
        image.set_sform(AFFINE, code=1)
        nib.save(image, str(folder / name))
    (folder / CORRUPT).write_bytes(b"\x1f\x8b this is not a gzip stream")
    return folder


class Batch:
    """Run ``convt3d batch`` in-process from ``cwd`` and keep stdout and stderr apart."""

    def __init__(self, cwd):
        self.cwd = Path(cwd)
        self.runner = CliRunner()

    def __call__(self, *args, input=None, layer=True):
        argv = ["batch", *[str(a) for a in args]] + (list(LAYER) if layer else [])
        previous = os.getcwd()
        os.chdir(self.cwd)
        try:
            return self.runner.invoke(cli, argv, input=input)
        finally:
            os.chdir(previous)

    def usage_error(self, *args, match, layer=True):
        """Require exit 2, one ``Error:`` line containing ``match``, and no file written."""
        before = sorted(p for p in self.cwd.rglob("*"))
        result = self(*args, layer=layer)
        assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr, result.exception)
        assert match in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert result.stdout == ""
        assert sorted(p for p in self.cwd.rglob("*")) == before
        return result


@pytest.fixture
def batch(tmp_path):
    """:class:`Batch` running from ``tmp_path`` (inputs as ``scans/...``)."""
    return Batch(tmp_path)


@pytest.fixture
def good_inputs():
    """The good scans as relative specs, from ``tmp_path``."""
    return [f"scans/{name}" for name in GOOD]
