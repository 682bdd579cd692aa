"""One write path: ``io.write_volume`` and ``convt3d run`` write the same bytes, in every output format.

The command streams slabs into the format's writer; the library hands the same
writer one slab. For each output suffix of the registry, the result of a
``convt3d run`` is read back and written again through ``io.write_volume`` with
the same input, layer and source: the two files must be identical byte for
byte (a zip member opened for writing is stamped 1980-01-01, so npz outputs
are reproducible too).
"""

import gzip
import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner

from convt3d_cli import geometry, io, slabs
from convt3d_cli.cli import cli
from convt3d_cli.engine import PreparedLayer
from convt3d_cli.io import nifti
from convt3d_cli.io.registry import output_choices

AFFINE = np.array([[0.0, -1.25, 0.0, 30.0],
                   [1.5, 0.0, 0.0, -12.0],
                   [0.0, 0.0, 2.0, 5.0],
                   [0.0, 0.0, 0.0, 1.0]])

# (input, layer options, weight shape, bias): one channel from a scaled NIfTI, and
# two channels from an npy into three.
CASES = {
    "nifti-1ch": ("in.nii.gz", {"stride": (2, 3, 1), "padding": (1, 0, 1), "output_padding": (1, 0, 0)},
                  (1, 1, 3, 2, 3), True),
    "npy-2to3": ("in.npy", {"stride": (2, 2, 2), "padding": (1, 1, 0)}, (2, 3, 3, 3, 2), False),
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("write-paths")
    rng = np.random.default_rng(3)
    image = nib.Nifti1Image(rng.integers(-300, 300, size=(7, 6, 5)).astype(np.int16), AFFINE)
    image.header.set_slope_inter(0.5, 3.0)
    image.header["descrip"] = b"write paths"
    nib.save(image, folder / "in.nii.gz")
    np.save(folder / "in.npy", rng.normal(size=(2, 5, 6, 4)).astype(np.float32))
    for name, (_, options, shape, bias) in CASES.items():
        arrays = {"weight": rng.normal(size=shape).astype(np.float32)}
        if bias:
            arrays["bias"] = rng.normal(size=shape[1]).astype(np.float32)
        arrays.update({key: np.asarray(value) for key, value in options.items()})
        np.savez(folder / f"{name}.npz", **arrays)
    return folder


def _cli_run(folder, *args):
    """``convt3d run ARGS`` in ``folder``; returns its ``--json`` report."""
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        result = CliRunner().invoke(cli, ["run", *[str(a) for a in args], "-q", "--overwrite", "--json"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout)


def _library_write(folder, case, cli_output, target, chunks=None):
    """What a library user writes for the data ``convt3d run`` produced."""
    spec, options, shape, _ = CASES[case]
    volume = io.read_volume(str(folder / spec))
    params = geometry.LayerParams.create(shape[-3:], **options)
    formula = geometry.formula_lines(volume.data.shape[-3:], params)
    data = io.read_volume(str(cli_output)).data
    if chunks is not None:   # a Zarr store: the run's chunks (the default follows the input)
        writer = io.open_block_writer(str(target), data.shape, like=volume, params=params, formula=formula,
                                      overwrite=True, source=spec, dtype=np.float32, chunks=tuple(chunks))
        writer.write_block(0, ((0, 0, 0), data.shape[2:]), data)
        writer.commit()
        return
    io.write_volume(str(target), data, like=volume, params=params, formula=formula, overwrite=True,
                    source=spec, dtype=np.float32)


@pytest.fixture
def tiny_budget(monkeypatch):
    """No fixed allowances: a few KiB of --max-memory then cut these small volumes into many slabs."""
    monkeypatch.setattr(slabs, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)


@pytest.mark.parametrize("suffix", list(output_choices().values()))
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_library_and_command_write_the_same_bytes(folder, tiny_budget, case, suffix, streamed):
    spec = CASES[case][0]
    name = f"{case}-{'s' if streamed else 'w'}"
    extra = ["--max-memory", "3K"] if streamed else []
    store = suffix.endswith(".zarr")
    if store and streamed:   # blocks of whole chunks: small chunks to have several
        extra = ["--max-memory", "12K", "--chunks", "2,2,2"]
    report = _cli_run(folder, spec, f"{name}-cli{suffix}", "--weights", f"{case}.npz", *extra)
    assert (report["slabs"] > 1) == streamed
    cli_out, lib_out = folder / f"{name}-cli{suffix}", folder / f"{name}-lib{suffix}"
    if store:   # the library writes the run's chunks in one block
        _library_write(folder, case, cli_out, lib_out, chunks=report["chunks"])
        assert _store_files(cli_out) == _store_files(lib_out)
        return
    _library_write(folder, case, cli_out, lib_out)
    assert cli_out.read_bytes() == lib_out.read_bytes()


def _store_files(path):
    """A Zarr store's files and their bytes (the image's ``name``, the store's own, left out)."""
    files = {}
    for where, _, names in os.walk(path):
        for name in names:
            data = (Path(where) / name).read_bytes()
            if name == "zarr.json" and Path(where) == Path(path):
                meta = json.loads(data)
                for image in meta["attributes"]["ome"]["multiscales"]:
                    image.pop("name")
                data = json.dumps(meta, sort_keys=True).encode()
            files[os.path.relpath(os.path.join(where, name), path)] = data
    return files


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_writer_writes_what_nibabel_writes(tmp_path, suffix):
    """Header and data bytes are nibabel's own ``.nii``; ``.nii.gz`` decompresses to the same."""
    rng = np.random.default_rng(5)
    source = nib.Nifti1Image(rng.normal(size=(6, 5, 4)).astype(np.float32), AFFINE)
    source.header["descrip"] = b"nibabel reference"
    nib.save(source, tmp_path / "in.nii")
    volume = io.read_volume(str(tmp_path / "in.nii"))
    params = geometry.LayerParams.create(3, stride=2, padding=1)
    data = rng.normal(size=(1, 2, 11, 9, 7)).astype(np.float32)
    io.write_volume(str(tmp_path / f"ours{suffix}"), data, like=volume, params=params, formula=[])
    reference = nifti._output_image(np.moveaxis(data[0], 0, -1), volume, params)
    nib.save(reference, tmp_path / "nibabel.nii")
    ours = tmp_path / f"ours{suffix}"
    raw = ours.read_bytes()
    if suffix.endswith(".gz"):
        raw = gzip.decompress(raw)
    assert raw == (tmp_path / "nibabel.nii").read_bytes()
