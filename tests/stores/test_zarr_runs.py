"""Zarr stores in and out: values bitwise equal to the in-memory engine whatever the blocks,
NGFF coordinates by the NIfTI affine rule, atomic output, --resume, damaged chunks."""

import json
import os

import nibabel as nib
import numpy as np
import pytest
from helpers import invoke_in
from zarrkit import read_array, same_bits, tree_digest, write_image

from convt3d_cli import blocks, errors, geometry, pipeline
from convt3d_cli.builtin import apply_builtin
from convt3d_cli.engine import conv_transpose3d

LAYERS = {
    # name: (weights shape or built-in, options)
    "linear s2": ("linear", {"stride": 2}),
    "nearest s3": ("nearest", {"stride": 3}),
    "trained 3->4 k3 s2 p1 op1": ((3, 4, 3, 3, 3), {"stride": 2, "padding": 1, "output_padding": 1}),
    "trained 2->2 k3 s3": ((2, 2, 3, 3, 3), {"stride": 3}),
    "groups 4->6 g2 k2 s2": ((4, 3, 2, 2, 2), {"stride": 2, "groups": 2}),
    "shuffle 24->4 k2 s2": ((24, 4, 2, 2, 2), {"stride": 2}),
}


def _expected(x, layer, rng_weights):
    kind, options = layer
    if isinstance(kind, str):
        return apply_builtin(x[None] if x.ndim == 4 else x, kind, options["stride"], dtype="float32")
    weight, bias = rng_weights
    return conv_transpose3d(x[None] if x.ndim == 4 else x, weight, bias, dtype="float32", **options)


@pytest.mark.parametrize("name", list(LAYERS))
@pytest.mark.parametrize("fmt", [3, 2])
def test_blocks_give_the_bits_of_the_in_memory_engine(tmp_path, rng, name, fmt):
    kind, options = LAYERS[name]
    channels = 1 if isinstance(kind, str) else kind[0]
    x = rng.standard_normal((channels, 9, 11, 13)).astype(np.float32)
    axes = "zyx" if channels == 1 else "czyx"
    data = x[0] if channels == 1 else x
    store = write_image(tmp_path / "in.ome.zarr", data, fmt=fmt, axes=axes, chunks=data.shape[:-3] + (4, 5, 6))
    weights = None
    args = {}
    if isinstance(kind, str):
        args["kernel"] = kind
    else:
        weight = rng.standard_normal(kind).astype(np.float32)
        bias = rng.standard_normal(kind[1] * options.get("groups", 1)).astype(np.float32)
        np.savez(tmp_path / "layer.npz", weight=weight, bias=bias)
        args["weights"] = str(tmp_path / "layer.npz")
        weights = (weight, bias)
    expected = _expected(x[None], LAYERS[name], weights)[0]
    # Chunks smaller than blocks, blocks of a few chunks, chunks not on the stride grid.
    for index, (chunks, memory) in enumerate((((3, 4, 5), 9 << 20), ((5, 5, 5), None), ((7, 2, 3), 9 << 20))):
        out = tmp_path / f"out{index}.ome.zarr"
        report = pipeline.run_file(store, str(out), layer_options=options, max_memory=memory,
                                   store_options={"chunks": chunks}, **args)
        got = read_array(out)
        got = got if channels > 1 or got.ndim == 4 else got[None]
        assert same_bits(got, expected), (name, chunks, report["blocks"])
        assert report["chunks"] == list(chunks)
        assert not os.path.exists(tmp_path / f".out{index}.ome.zarr.convt3d-partial")


def test_ngff_coordinates_follow_the_nifti_affine_rule(tmp_path, rng):
    x = rng.standard_normal((10, 12, 14)).astype(np.float32)
    scale, shift = (2.0, 0.5, 0.75), (10.0, -4.0, 3.5)
    store = write_image(tmp_path / "in.ome.zarr", x, scale=scale, translation=shift)
    affine = np.diag(list(scale) + [1.0])
    affine[:3, 3] = shift
    nib.save(nib.Nifti1Image(x, affine), str(tmp_path / "in.nii"))
    for kernel, options in (("linear", {"stride": 2}), ("nearest", {"stride": (3, 2, 1)})):
        pipeline.run_file(str(tmp_path / "in.nii"), str(tmp_path / "out.nii"), kernel=kernel, layer_options=options,
                          overwrite=True)
        pipeline.run_file(store, str(tmp_path / "out.ome.zarr"), kernel=kernel, layer_options=options,
                          overwrite=True)
        nifti = nib.load(str(tmp_path / "out.nii"))
        meta = json.loads((tmp_path / "out.ome.zarr" / "zarr.json").read_text())["attributes"]["ome"]
        assert meta["version"] == "0.5"
        image = meta["multiscales"][0]
        assert [a["name"] for a in image["axes"]] == ["z", "y", "x"]
        assert all(a["unit"] == "micrometer" for a in image["axes"])
        transforms = {t["type"]: t[t["type"]] for t in image["datasets"][0]["coordinateTransformations"]}
        np.testing.assert_allclose(transforms["scale"], np.diag(nifti.affine)[:3], rtol=1e-6)
        np.testing.assert_allclose(transforms["translation"], nifti.affine[:3, 3], rtol=1e-6, atol=1e-6)
        # Same values as the NIfTI run (NIfTI axes X,Y,Z are the store's z,y,x here; a NIfTI
        # output is computed as the transposed problem, so equal to rounding only).
        np.testing.assert_allclose(read_array(tmp_path / "out.ome.zarr"), np.asarray(nifti.dataobj), rtol=1e-5,
                                   atol=1e-6)
        info = pipeline.io.describe(str(tmp_path / "out.ome.zarr"))
        np.testing.assert_allclose(info["affine"], nifti.affine, atol=1e-6)


def test_version_0_4_input_gives_a_zarr_v2_output_with_ngff_0_4(tmp_path, rng):
    x = rng.standard_normal((2, 6, 7, 8)).astype(np.float32)
    store = write_image(tmp_path / "in.ome.zarr", x, fmt=2, axes="czyx", scale=(1.0, 2.0, 3.0))
    report = pipeline.run_file(store, str(tmp_path / "out.ome.zarr"), kernel="linear", layer_options={"stride": 2})
    attrs = json.loads((tmp_path / "out.ome.zarr" / ".zattrs").read_text())
    image = attrs["multiscales"][0]
    assert image["version"] == "0.4"
    assert [a["name"] for a in image["axes"]] == ["c", "z", "y", "x"]
    assert image["datasets"][0]["coordinateTransformations"][0]["scale"] == [1.0, 0.5, 1.0, 1.5]
    assert report["output_file_shape"] == [2, 12, 14, 16]
    assert same_bits(read_array(tmp_path / "out.ome.zarr"), apply_builtin(x[None], "linear", 2)[0])


def test_plain_arrays_and_keys(tmp_path, rng):
    x = rng.standard_normal((6, 7, 8)).astype(np.float32)
    low = x[::2, ::2, ::2].copy()
    store = write_image(tmp_path / "ms.ome.zarr", x, levels={"1": (low, (2.0, 2.0, 2.0))})
    # Without a key: the first level; with :1, the second with its own scale.
    assert pipeline.io.probe_volume(store).engine_shape == (1, 1, 6, 7, 8)
    info = pipeline.io.probe_volume(store + ":1")
    assert info.engine_shape == (1, 1, 3, 4, 4) and info.affine[0, 0] == 2.0
    pipeline.run_file(store + ":1", str(tmp_path / "o.npy"), kernel="nearest", layer_options={"stride": 2})
    assert same_bits(np.load(tmp_path / "o.npy"), apply_builtin(low[None, None], "nearest", 2)[0, 0])
    # A plain (C, D, H, W) array without NGFF metadata follows the array-file rules.
    plain = write_image(tmp_path / "plain.zarr", np.stack([x, -x]), axes="czyx", ngff=False)
    assert pipeline.io.probe_volume(plain).engine_shape == (1, 2, 6, 7, 8)
    with pytest.raises(errors.KeyNotFoundError):
        pipeline.io.probe_volume(store + ":7")


def test_other_formats_in_and_out(tmp_path, rng):
    x = rng.integers(-300, 300, (7, 8, 9)).astype(np.int16)
    np.save(tmp_path / "in.npy", x)
    store = write_image(tmp_path / "in.ome.zarr", x)
    # npy -> zarr and zarr -> npy / NIfTI (slab-wise, transposed) give the same values.
    pipeline.run_file(str(tmp_path / "in.npy"), str(tmp_path / "a.ome.zarr"), kernel="linear", layer_options={"stride": 2})
    pipeline.run_file(store, str(tmp_path / "b.npy"), kernel="linear", layer_options={"stride": 2})
    pipeline.run_file(store, str(tmp_path / "c.nii.gz"), kernel="linear", layer_options={"stride": 2})
    ref = apply_builtin(x[None, None].astype(np.float32), "linear", 2)[0, 0]
    assert same_bits(read_array(tmp_path / "a.ome.zarr"), ref)
    assert same_bits(np.load(tmp_path / "b.npy"), ref)
    np.testing.assert_allclose(np.asarray(nib.load(str(tmp_path / "c.nii.gz")).dataobj), ref, rtol=1e-5, atol=1e-4)
    # Integer outputs: rounded, clipped and counted as for files.
    report = pipeline.run_file(store, str(tmp_path / "d.ome.zarr"), kernel="linear", layer_options={"stride": 2},
                               output_dtype="uint8")
    got = read_array(tmp_path / "d.ome.zarr")
    assert got.dtype == np.uint8
    assert np.array_equal(got, np.clip(np.rint(ref), 0, 255).astype(np.uint8))
    assert report["clipped_voxels"] == int(((np.rint(ref) < 0) | (np.rint(ref) > 255)).sum())


def test_shards_and_compressors(tmp_path, rng):
    x = rng.standard_normal((8, 8, 8)).astype(np.float32)
    store = write_image(tmp_path / "in.ome.zarr", x)
    ref = apply_builtin(x[None, None], "linear", 2)[0, 0]
    for compressor in ("blosc-lz4", "zstd", "gzip", "none"):
        out = tmp_path / f"{compressor}.ome.zarr"
        pipeline.run_file(store, str(out), kernel="linear", layer_options={"stride": 2},
                          store_options={"chunks": (4, 4, 4), "shards": (8, 8, 16), "compressor": compressor})
        meta = json.loads((out / "0" / "zarr.json").read_text())
        assert meta["codecs"][0]["name"] == "sharding_indexed"
        assert same_bits(read_array(out), ref)


def test_existing_outputs_and_inputs_are_never_replaced_by_mistake(tmp_path, rng):
    x = rng.standard_normal((5, 6, 7)).astype(np.float32)
    store = write_image(tmp_path / "in.ome.zarr", x)
    before = tree_digest(store)
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "in.ome.zarr", "--kernel", "linear", "--stride", "2",
                       "--overwrite")
    assert result.exit_code == 1 and "is the input" in result.output
    assert invoke_in(tmp_path, "run", "in.ome.zarr", "out.ome.zarr", "-k", "linear", "--stride", "2").exit_code == 0
    first = tree_digest(tmp_path / "out.ome.zarr")
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "out.ome.zarr", "-k", "nearest", "--stride", "2")
    assert result.exit_code == 1 and "exists; use --overwrite" in result.output
    assert tree_digest(tmp_path / "out.ome.zarr") == first
    assert invoke_in(tmp_path, "run", "in.ome.zarr", "out.ome.zarr", "-k", "nearest", "--stride", "2",
                     "--overwrite").exit_code == 0
    assert same_bits(read_array(tmp_path / "out.ome.zarr"), apply_builtin(x[None, None], "nearest", 2)[0, 0])
    (tmp_path / "folder.zarr").mkdir()
    (tmp_path / "folder.zarr" / "keep.txt").write_text("mine")
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "folder.zarr", "-k", "linear", "--stride", "2", "--overwrite")
    assert result.exit_code == 1 and "not a Zarr store" in result.output
    assert (tmp_path / "folder.zarr" / "keep.txt").read_text() == "mine"
    assert tree_digest(store) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["folder.zarr", "in.ome.zarr", "out.ome.zarr"]


def _interrupt_after(monkeypatch, count, error):
    real = blocks.compute_block
    calls = []

    def failing(*args, **kwargs):
        if len(calls) == count:
            raise error
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(blocks, "compute_block", failing)


def test_an_interrupted_run_leaves_no_output_and_resumes_from_its_blocks(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((2, 10, 10, 10)).astype(np.float32)
    weight = rng.standard_normal((2, 3, 3, 3, 3)).astype(np.float32)
    np.save(tmp_path / "w.npy", weight)
    store = write_image(tmp_path / "in.ome.zarr", x, axes="czyx")
    out = str(tmp_path / "out.ome.zarr")
    kwargs = {"weights": str(tmp_path / "w.npy"), "layer_options": {"stride": 2, "padding": 1},
              "store_options": {"chunks": (4, 4, 4)}, "max_memory": (8 << 20) + (64 << 10)}
    _interrupt_after(monkeypatch, 3, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_file(store, out, **kwargs)
    monkeypatch.undo()
    assert not os.path.exists(out)
    partial = tmp_path / ".out.ome.zarr.convt3d-partial"
    assert len(os.listdir(partial / ".convt3d-blocks")) == 3
    # Another layer cannot continue it.
    with pytest.raises(errors.OutputError, match="another run"):
        pipeline.run_file(store, out, **dict(kwargs, layer_options={"stride": 2}), resume=True)
    report = pipeline.run_file(store, out, resume=True, **kwargs)
    assert report["resumed_blocks"] == 3 and report["blocks"] > 3
    expected = conv_transpose3d(x[None], weight, None, stride=2, padding=1, dtype="float32")[0]
    assert same_bits(read_array(out), expected)
    assert not partial.exists() and sorted(os.listdir(out)) == ["0", "zarr.json"]
    # Without --resume a new run starts again (and an old partial store is replaced).
    _interrupt_after(monkeypatch, 1, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_file(store, out, overwrite=True, **kwargs)
    monkeypatch.undo()
    assert same_bits(read_array(out), expected)   # the previous output is untouched
    report = pipeline.run_file(store, out, overwrite=True, **kwargs)
    assert report["resumed_blocks"] == 0 and not partial.exists()


def test_a_failing_run_removes_its_partial_store(tmp_path, rng, monkeypatch):
    store = write_image(tmp_path / "in.ome.zarr", rng.standard_normal((24, 24, 24)).astype(np.float32))
    _interrupt_after(monkeypatch, 2, errors.OutputError("disk full"))
    with pytest.raises(errors.OutputError):
        pipeline.run_file(store, str(tmp_path / "out.ome.zarr"), kernel="linear", layer_options={"stride": 2},
                          store_options={"chunks": (4, 4, 4)}, max_memory=(8 << 20) + (64 << 10))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ome.zarr"]


@pytest.mark.parametrize("fmt", [3, 2])
def test_a_damaged_chunk_is_one_error_naming_it(tmp_path, rng, fmt):
    write_image(tmp_path / "in.ome.zarr", rng.standard_normal((8, 8, 8)).astype(np.float32), fmt=fmt,
                        chunks=(4, 4, 4))
    chunk = tmp_path / "in.ome.zarr" / "0" / ("c/1/0/1" if fmt == 3 else "1.0.1")
    chunk.write_bytes(b"\x02\x01" + os.urandom(40))
    for output in ("out.ome.zarr", "out.nii.gz"):
        result = invoke_in(tmp_path, "run", "in.ome.zarr", output, "-k", "linear", "--stride", "2", "-q")
        assert result.exit_code == 1, result.output
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: ")
        assert ("0/c/1/0/1" if fmt == 3 else "0/1.0.1") in lines[0]
        assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ome.zarr"]


def test_info_and_batch(tmp_path, rng):
    x = rng.standard_normal((6, 6, 6)).astype(np.float32)
    write_image(tmp_path / "a.ome.zarr", x, scale=(1.0, 2.0, 3.0), translation=(1.0, 2.0, 3.0))
    np.save(tmp_path / "b.npy", x)
    result = invoke_in(tmp_path, "info", "a.ome.zarr", "--json")
    assert result.exit_code == 0
    info = json.loads(result.output)
    assert info["format"] == "zarr" and info["axes"] == ["z", "y", "x"] and info["scale"] == [1.0, 2.0, 3.0]
    result = invoke_in(tmp_path, "batch", "a.ome.zarr", "b.npy", "--out-dir", "o", "--format", "ome.zarr",
                       "-k", "linear", "--stride", "2", "--chunks", "4")
    assert result.exit_code == 0, result.output
    assert same_bits(read_array(tmp_path / "o" / "a.ome.zarr"), read_array(tmp_path / "o" / "b.ome.zarr"))


def test_resume_keeps_the_interrupted_runs_blocks_and_a_second_run_waits_its_turn(tmp_path, rng, monkeypatch):
    x = rng.standard_normal((24, 24, 24)).astype(np.float32)
    store = write_image(tmp_path / "in.ome.zarr", x)
    out = str(tmp_path / "out.ome.zarr")
    kwargs = {"kernel": "linear", "layer_options": {"stride": 2}, "store_options": {"chunks": (4, 4, 4)}}
    _interrupt_after(monkeypatch, 2, KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        pipeline.run_file(store, out, max_memory=(8 << 20) + (64 << 10), **kwargs)
    monkeypatch.undo()
    # A larger --max-memory would plan larger blocks: the run continues with the old ones.
    report = pipeline.run_file(store, out, resume=True, max_memory=1 << 30, **kwargs)
    assert report["resumed_blocks"] == 2
    assert same_bits(read_array(out), apply_builtin(x[None, None], "linear", 2)[0, 0])
    # While a run holds the output's lock, another is refused (and removes nothing).
    from convt3d_cli.io import omezarr

    writer = omezarr.ZarrWriter(str(tmp_path / "busy.ome.zarr"), "0", (1, 1, 4, 4, 4), np.float32,
                                overwrite=False, like=None, params=geometry.LayerParams.create(1),
                                formula=[], source="x", blocks=[4, 4, 4])
    try:
        with pytest.raises(errors.OutputError, match="another convt3d run"):
            pipeline.run_file(store, str(tmp_path / "busy.ome.zarr"), **kwargs)
        assert (tmp_path / ".busy.ome.zarr.convt3d-partial").is_dir()
    finally:
        writer.abort()


def test_without_zarr_python_a_store_is_one_line_with_the_install_hint(tmp_path, rng, monkeypatch):
    import sys

    store = write_image(tmp_path / "in.ome.zarr", rng.standard_normal((4, 4, 4)).astype(np.float32))
    monkeypatch.setitem(sys.modules, "zarr", None)          # import zarr -> ImportError
    # Headers are read without it (info, shape) ...
    assert invoke_in(tmp_path, "shape", "in.ome.zarr", "-k", "linear", "--stride", "2").exit_code == 0
    # ... voxels need it.
    for output in ("out.npy", "out.ome.zarr"):
        result = invoke_in(tmp_path, "run", store, output, "-k", "linear", "--stride", "2", "-q")
        assert result.exit_code == 2, result.output
        assert result.output.startswith("Error: ") and 'pip install "convt3d[zarr]"' in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ome.zarr"]


def test_an_output_inside_the_input_store_or_around_it_is_refused(tmp_path, rng):
    x = rng.standard_normal((4, 4, 4)).astype(np.float32)
    write_image(tmp_path / "in.ome.zarr", x)
    before = tree_digest(tmp_path / "in.ome.zarr")
    for output in ("in.ome.zarr/out.ome.zarr", "in.ome.zarr/0/x.npy"):
        result = invoke_in(tmp_path, "run", "in.ome.zarr", output, "-k", "linear", "--stride", "2", "--overwrite")
        assert result.exit_code == 1 and "one inside the other" in result.output, result.output
    # An --overwrite of a store holding the input would delete the input.
    (tmp_path / "outer.zarr").mkdir()
    write_image(tmp_path / "outer.zarr" / "in.ome.zarr", x)
    (tmp_path / "outer.zarr" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    result = invoke_in(tmp_path, "run", "outer.zarr/in.ome.zarr", "outer.zarr", "-k", "linear", "--stride", "2",
                       "--overwrite")
    assert result.exit_code == 1 and "one inside the other" in result.output, result.output
    assert (tmp_path / "outer.zarr" / "in.ome.zarr" / "0").is_dir()
    assert tree_digest(tmp_path / "in.ome.zarr") == before


def _v2_image(folder, dtype="<f4", scale=(1.0, 1.0, 1.0), compressor=None, chunk=None):
    """A hand-written Zarr v2 OME-Zarr image of 8^3 with any dtype string and compressor; its
    one chunk file holds ``chunk`` (none: the fill value)."""
    os.makedirs(folder / "0")
    (folder / ".zgroup").write_text(json.dumps({"zarr_format": 2}))
    (folder / ".zattrs").write_text(json.dumps({"multiscales": [{"version": "0.4", "axes": ["z", "y", "x"], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": list(scale)}]}]}]}))
    (folder / "0" / ".zarray").write_text(json.dumps({
        "zarr_format": 2, "shape": [8, 8, 8], "chunks": [8, 8, 8], "dtype": dtype, "compressor": compressor,
        "fill_value": 0, "order": "C", "filters": None}))
    if chunk is not None:
        (folder / "0" / "0.0.0").write_bytes(chunk)


def _zstd_frame_without_size(blocks):
    """A zstd frame that declares no content size: ``blocks`` RLE blocks of 128 KiB of zeros."""
    frame = bytearray(b"\x28\xb5\x2f\xfd\x00\x38")         # no size field, window 2**(10+7)
    for number in range(blocks):
        frame += ((number == blocks - 1) | (1 << 1) | ((128 << 10) << 3)).to_bytes(3, "little") + b"\0"
    return bytes(frame)


@pytest.mark.parametrize("codec", ["gzip", "zlib", "bz2", "lzma", "zstd"])
def test_chunks_that_decompress_beyond_a_chunk_are_refused(tmp_path, codec):
    """Decompression bombs in codecs whose headers do not say their output size (64 MiB from a
    few KiB, where a chunk holds 2 KiB): refused before zarr-python decodes them. An honest
    chunk of the same codec is read."""
    import bz2
    import gzip
    import lzma
    import zlib

    encode = {"gzip": gzip.compress, "zlib": zlib.compress, "bz2": bz2.compress, "lzma": lzma.compress}
    values = np.random.default_rng(5).standard_normal((8, 8, 8)).astype("<f4")
    if codec == "zstd":
        numcodecs = pytest.importorskip("numcodecs")
        honest, bomb = numcodecs.Zstd(level=1).encode(values.tobytes()), _zstd_frame_without_size(512)
    else:
        honest, bomb = encode[codec](values.tobytes()), encode[codec](bytes(64 << 20))
    compressor = {"id": codec, "level": 1} if codec != "lzma" else {"id": "lzma", "format": 1, "check": -1,
                                                                      "preset": None, "filters": None}
    _v2_image(tmp_path / "bomb.ome.zarr", compressor=compressor, chunk=bytes(bomb))
    result = invoke_in(tmp_path, "run", "bomb.ome.zarr", "out.npy", "--kernel", "nearest", "--stride", "1")
    assert result.exit_code == 1 and "more than a chunk holds" in result.stderr, (result.stderr, result.exception)
    _v2_image(tmp_path / "ok.ome.zarr", compressor=compressor, chunk=bytes(honest))
    result = invoke_in(tmp_path, "run", "ok.ome.zarr", "out.npy", "--kernel", "nearest", "--stride", "1", "-q")
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert np.array_equal(np.load(tmp_path / "out.npy").reshape(8, 8, 8), values)


@pytest.mark.parametrize("case, output, match", [
    ("float128", "out.ome.zarr", "a Zarr store cannot hold float128"),
    ("tiny scale", "out.nii", "cannot be stored in a NIfTI header"),
])
def test_outputs_a_format_cannot_hold_are_refused_cleanly(tmp_path, case, output, match):
    """Extended-precision data kept as it is ('same' for nearest) in a Zarr output, and
    voxel sizes of 1e-320 (finite and positive) in a NIfTI output: one Error line, no
    traceback, nothing written."""
    if case == "float128" and np.dtype(np.longdouble).itemsize != 16:
        pytest.skip("no 16-byte long double here")
    _v2_image(tmp_path / "in.ome.zarr", "<f16" if case == "float128" else "<f4",
              (1e-320, 1.0, 1.0) if case == "tiny scale" else (1.0, 1.0, 1.0))
    result = invoke_in(tmp_path, "run", "in.ome.zarr", output, "--kernel", "nearest", "--stride", "2")
    assert result.exit_code == 1, (result.stderr, result.exception)
    assert match in result.stderr and "Traceback" not in result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.ome.zarr"]


def test_input_chunks_count_in_the_memory_budget(tmp_path):
    """zarr-python decodes whole chunks: chunks declared far larger than the array (8 x 8 x 2**20
    over 8^3, 256 MiB each) are refused under --max-memory before any is read."""
    _v2_image(tmp_path / "in.ome.zarr")
    meta = tmp_path / "in.ome.zarr" / "0" / ".zarray"
    meta.write_text(meta.read_text().replace('"chunks": [8, 8, 8]', '"chunks": [8, 8, 1048576]'))
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "out.npy", "--kernel", "nearest", "--stride", "1",
                       "--max-memory", "256M")
    assert result.exit_code == 1 and "decoded size of its Zarr chunks" in result.stderr, result.stderr
    assert sorted(os.listdir(tmp_path)) == ["in.ome.zarr"]
    assert invoke_in(tmp_path, "run", "in.ome.zarr", "out.npy", "--kernel", "nearest", "--stride", "1",
                     "--max-memory", "1G").exit_code == 0


def test_chunks_linked_from_outside_the_store_are_refused(tmp_path):
    """A chunk file, or its folder, that is a link to a file outside the store is not read
    (a link inside the store is)."""
    values = np.arange(512, dtype="<f4").reshape(8, 8, 8)
    (tmp_path / "outside.bin").write_bytes(values.tobytes())
    _v2_image(tmp_path / "in.ome.zarr")
    os.symlink(tmp_path / "outside.bin", tmp_path / "in.ome.zarr" / "0" / "0.0.0")
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "o.npy", "--kernel", "nearest", "--stride", "1")
    assert result.exit_code == 1 and "outside the store" in result.stderr, result.stderr
    assert not (tmp_path / "o.npy").exists()
    os.remove(tmp_path / "in.ome.zarr" / "0" / "0.0.0")
    os.replace(tmp_path / "outside.bin", tmp_path / "in.ome.zarr" / "kept.bin")
    os.symlink(os.path.join("..", "kept.bin"), tmp_path / "in.ome.zarr" / "0" / "0.0.0")
    assert invoke_in(tmp_path, "run", "in.ome.zarr", "o.npy", "--kernel", "nearest", "--stride", "1").exit_code == 0
    assert np.array_equal(np.load(tmp_path / "o.npy").reshape(8, 8, 8), values)


def test_inner_chunks_of_a_shard_are_checked_for_bombs(tmp_path):
    """A sharded Zarr v3 array (8^3 shards of 4^3 zstd chunks) is read; the same shard with
    one inner chunk replaced by a size-less zstd frame of 64 MiB is refused before decoding."""
    import zarr
    from zarr.codecs import ZstdCodec
    from zarr.storage import LocalStore

    values = np.random.default_rng(9).standard_normal((8, 8, 8)).astype("<f4")
    group = zarr.open_group(LocalStore(str(tmp_path / "in.ome.zarr")), mode="w", zarr_format=3)
    group.attrs["ome"] = {"version": "0.5", "multiscales": [{"axes": [
        {"name": a, "type": "space"} for a in "zyx"], "datasets": [
        {"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}
    array = group.create_array("0", shape=(8, 8, 8), chunks=(4, 4, 4), shards=(8, 8, 8), dtype="<f4",
                               compressors=ZstdCodec(level=1))
    array[...] = values
    assert invoke_in(tmp_path, "run", "in.ome.zarr", "o.npy", "--kernel", "nearest", "--stride", "1",
                     "-q").exit_code == 0
    assert np.array_equal(np.load(tmp_path / "o.npy").reshape(8, 8, 8), values)
    shard = tmp_path / "in.ome.zarr" / "0" / "c" / "0" / "0" / "0"
    bomb = _zstd_frame_without_size(512)
    index = np.full((8, 2), np.iinfo(np.uint64).max, dtype="<u8")
    index[0] = (0, len(bomb))
    shard.write_bytes(bomb + index.tobytes() + b"\0\0\0\0")     # the index's CRC32C is never reached
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "o2.npy", "--kernel", "nearest", "--stride", "1")
    assert result.exit_code == 1 and "(inner chunk 0)" in result.stderr, (result.stderr, result.exception)
