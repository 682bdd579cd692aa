"""FreeSurfer MGH/MGZ: reading (nibabel's own test file, every type, frames), the output
header and affine, tags, one write path (streamed == whole == library), hostile files."""

import gzip
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from helpers import invoke_in
from nibabel.affines import voxel_sizes
from nibabel.freesurfer.mghformat import MGHHeader, MGHImage, header_dtype

from convt3d_cli import geometry, io, slabs
from convt3d_cli.builtin import apply_builtin, builtin_params
from convt3d_cli.engine import PreparedLayer
from convt3d_cli.errors import FileFormatError, OutputError
from convt3d_cli.io import mgh

NIBABEL_MGZ = os.path.join(os.path.dirname(nib.__file__), "tests", "data", "test.mgz")
LINEAR2 = ("--kernel", "linear", "--stride", "2")
FIELDS = header_dtype.itemsize  # 90 bytes of header fields, then padding up to 284


@pytest.fixture
def tiny_budget(monkeypatch):
    """No fixed allowances: --max-memory 3K then cuts these small volumes into many slabs."""
    monkeypatch.setattr(slabs, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)


def _tag(tag, data):
    return tag.to_bytes(4, "big") + len(data).to_bytes(8, "big") + data


def mgh_bytes(data, affine, *, tail=None, edit=None):
    """The bytes of an MGH file holding ``data`` (X, Y, Z[, F]), assembled here.

    ``tail`` replaces nibabel's 20-byte footer and what follows; ``edit(fields)``
    may change the header fields (a writable record of ``header_dtype``) first.
    """
    header = MGHImage(data, affine).header
    block = bytearray(header.binaryblock)
    if edit is not None:
        edit(np.frombuffer(block, dtype=header_dtype, count=1)[0])
    body = np.asarray(data, dtype=header.get_data_dtype()).tobytes(order="F")
    tail = bytes(block[FIELDS:FIELDS + 20]) if tail is None else tail
    return bytes(block[:FIELDS]).ljust(284, b"\0") + body + tail


def write_mgh(path, data, affine, **kwargs):
    raw = mgh_bytes(data, affine, **kwargs)
    path.write_bytes(gzip.compress(raw) if str(path).endswith(".mgz") else raw)
    return path


def _run(folder, *args):
    result = invoke_in(folder, "run", *args, "-q", "--json")
    assert result.exit_code == 0, (result.stdout, result.stderr, result.exception)
    return json.loads(result.stdout)


def _one_error(result, match):
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- reading

@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
def test_nibabel_test_file_reads_as_nibabel_reads_it(tmp_path, suffix):
    path = tmp_path / f"test{suffix}"
    if suffix == ".mgz":
        shutil.copy(NIBABEL_MGZ, path)
    else:
        with open(NIBABEL_MGZ, "rb") as handle:
            path.write_bytes(gzip.decompress(handle.read()))
    image = nib.load(path)
    expected = image.get_fdata()
    assert expected.shape == (3, 4, 5, 2)
    volume = io.read_volume(str(path))
    assert volume.data.shape == (1, 2, 3, 4, 5) and volume.data.dtype == np.float32
    assert volume.data.flags.c_contiguous and volume.data.dtype.isnative
    for frame in range(2):
        np.testing.assert_array_equal(volume.data[0, frame], expected[..., frame])
    np.testing.assert_array_equal(volume.affine, image.affine)
    assert volume.format == "mgh" and volume.source_ndim == 4 and isinstance(volume.header, MGHHeader)
    info = io.probe_volume(str(path))
    assert info.stored_shape == (3, 4, 5, 2) and info.engine_shape == (1, 2, 3, 4, 5)
    assert info.dtype == "float32" and info.byte_order == "big" and info.data_offset == 284
    assert info.zooms == tuple(float(z) for z in image.header.get_zooms())
    assert info.fourth_axis == "channels"
    # Frames as volumes: the same data on the batch axis.
    volumes = io.read_volume(str(path), fourth_axis="volumes")
    assert volumes.data.shape == (2, 1, 3, 4, 5)
    np.testing.assert_array_equal(volumes.data[:, 0], volume.data[0])


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("suffix", [".mgz", ".mgh"])
@pytest.mark.parametrize("frames", [1, 3])
def test_every_type_and_rank(tmp_path, affine, rng, dtype, suffix, frames):
    shape = (5, 4, 3) + ((frames,) if frames > 1 else ())
    data = rng.integers(0, 200, size=shape).astype(dtype)
    path = tmp_path / f"v{suffix}"
    nib.save(MGHImage(data, affine), path)
    volume = io.read_volume(str(path))
    assert volume.data.dtype == np.dtype(dtype) and volume.data.dtype.isnative
    assert volume.data.shape == (1, frames, 5, 4, 3)
    stored = data if frames > 1 else data[..., None]
    for f in range(frames):
        np.testing.assert_array_equal(volume.data[0, f], stored[..., f])
    np.testing.assert_allclose(volume.affine, nib.load(path).affine, atol=0)


def test_describe(tmp_path):
    report = io.describe(NIBABEL_MGZ)
    assert report["format"] == "mgh" and report["compressed"] is True and report["key"] is None
    assert report["stored_shape"] == [3, 4, 5, 2] and report["engine_shape"] == [1, 2, 3, 4, 5]
    assert report["layout"] == "(X,Y,Z,F)" and report["spatial_axes"] == "D=X,H=Y,W=Z"
    assert report["dtype"] == "float32" and report["byte_order"] == "big"
    assert report["tr_ms"] == 2.0 and report["flip_angle_rad"] == 0.0 and report["fov"] == 3.0
    assert report["zooms"] == [1.0, 1.0, 1.0, 2.0]
    np.testing.assert_array_equal(report["affine"], nib.load(NIBABEL_MGZ).affine)
    assert [(t["name"], t["kept"]) for t in report["tags"]] == [("PEDIR", True), ("MRI_FRAME", False)]
    json.dumps(report)
    result = invoke_in(tmp_path, "info", NIBABEL_MGZ)
    assert result.exit_code == 0 and "tr_ms: 2" in result.stdout


def test_key_is_refused():
    with pytest.raises(FileFormatError, match="one image"):
        io.read_volume(NIBABEL_MGZ + ":frame")


# --------------------------------------------------------------------------- writing

def test_linear_stride_2_on_nibabels_file(tmp_path):
    """Values against the built-in kernel on the engine-layout data, affine against the rule."""
    shutil.copy(NIBABEL_MGZ, tmp_path / "test.mgz")
    report = _run(tmp_path, "test.mgz", "out.mgz", *LINEAR2)
    source, out = nib.load(tmp_path / "test.mgz"), nib.load(tmp_path / "out.mgz")
    data = io.read_volume(str(tmp_path / "test.mgz")).data          # (1, 2, X, Y, Z)
    expected = apply_builtin(data, "linear", 2)                     # depthwise: frames apart
    assert out.shape == (6, 8, 10, 2) and out.get_data_dtype() == np.dtype(">f4")
    values = np.asarray(out.dataobj)
    for frame in range(2):
        np.testing.assert_allclose(values[..., frame], expected[0, frame], rtol=1e-5, atol=1e-6)
    best = geometry.output_affine(source.affine, builtin_params("linear", 2))
    np.testing.assert_allclose(out.affine, best, atol=1e-4)
    np.testing.assert_allclose(report["output_affine"], best, atol=1e-12)
    # The header of the input is kept: TR (the 4th zoom), flip angle, TE, TI, FoV.
    for field in ("tr", "flip_angle", "te", "ti", "fov", "dof"):
        assert out.header[field] == source.header[field]
    # Voxel sizes: the input's (column norms of its vox2ras; this file's Mdc is not unit) / stride.
    np.testing.assert_allclose(out.header.get_zooms()[:3], voxel_sizes(source.affine) / 2, rtol=1e-6)


def test_tags_that_survive_the_grid_are_kept(tmp_path, affine):
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    footer = np.array([2300.0, 0.15, 2.98, 900.0, 256.0], dtype=">f4").tobytes()
    kept = [_tag(3, b"mri_convert a.nii a.mgz\0"), _tag(31, b"transforms/talairach.xfm\0"),
            _tag(41, b"ROW\0"), _tag(43, np.array([3.0], ">f4").tobytes())]
    dropped = [_tag(44, b"Matrix" + b" " * 100), _tag(33, b"AutoAlign 1 0 0")]
    write_mgh(tmp_path / "in.mgz", data, affine,
              tail=footer + kept[0] + dropped[0] + kept[1] + kept[2] + dropped[1] + kept[3])
    _run(tmp_path, "in.mgz", "out.mgh", *LINEAR2)
    raw = (tmp_path / "out.mgh").read_bytes()
    data_end = 284 + 10 * 8 * 6 * 4
    assert raw[data_end:data_end + 20] == footer
    record = _tag(3, builtin_params("linear", 2).short().encode() + b"\0")
    assert raw[data_end + 20:] == b"".join(kept) + record
    described = io.describe(str(tmp_path / "out.mgh"))
    assert [t["name"] for t in described["tags"]] == ["CMDLINE", "MGH_XFORM", "PEDIR", "FIELDSTRENGTH", "CMDLINE"]


def test_nifti_and_mgh_outputs_share_the_affine(tmp_path, make_nifti, affine, rng):
    data = rng.standard_normal((6, 5, 4)).astype(np.float32)
    make_nifti(tmp_path / "in.nii.gz", data, affine)
    nib.save(MGHImage(data, affine), tmp_path / "in.mgz")
    for source in ("in.nii.gz", "in.mgz"):
        for target in ("out.nii", "out.mgz"):
            _run(tmp_path, source, f"{source}-{target}", *LINEAR2, "--overwrite")
    best = geometry.output_affine(nib.load(tmp_path / "in.nii.gz").affine, builtin_params("linear", 2))
    images = {name: nib.load(tmp_path / name) for name in
              ("in.nii.gz-out.nii", "in.nii.gz-out.mgz", "in.mgz-out.nii", "in.mgz-out.mgz")}
    for image in images.values():
        np.testing.assert_allclose(image.affine, best, atol=1e-4)
    reference = np.asarray(images["in.nii.gz-out.nii"].dataobj)
    for image in images.values():  # the same values whichever way
        np.testing.assert_array_equal(np.asarray(image.dataobj), reference)


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
def test_frames_are_c_times_n_plus_n(tmp_path, rng, suffix, identity_params):
    """(N, C) = (2, 3) is stored as 6 frames, frame c * N + n; nibabel reads identical values."""
    data = rng.standard_normal((2, 3, 5, 4, 3)).astype(np.float32)
    target = tmp_path / f"out{suffix}"
    io.write_volume(str(target), data, like=None, params=identity_params, formula=[])
    image = nib.load(target)
    assert image.shape == (5, 4, 3, 6)
    values = np.asarray(image.dataobj)
    for n in range(2):
        for c in range(3):
            np.testing.assert_array_equal(values[..., c * 2 + n], data[n, c])
    np.testing.assert_array_equal(image.affine, np.eye(4))
    assert io.read_volume(str(target)).data.shape == (1, 6, 5, 4, 3)


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
def test_writer_writes_what_nibabel_writes(tmp_path, affine, rng, suffix):
    """Header, data and footer are nibabel's own bytes for the output image; convt3d's tag follows."""
    nib.save(MGHImage(rng.standard_normal((5, 4, 3)).astype(np.float32), affine), tmp_path / "in.mgh")
    volume = io.read_volume(str(tmp_path / "in.mgh"))
    params = geometry.LayerParams.create(3, stride=2, padding=1)
    data = rng.standard_normal((1, 1, 9, 7, 5)).astype(np.float32)
    io.write_volume(str(tmp_path / f"ours{suffix}"), data, like=volume, params=params, formula=[])
    reference = MGHImage(data[0, 0], geometry.output_affine(volume.affine, params), header=volume.header)
    nib.save(reference, tmp_path / "nibabel.mgh")
    raw = (tmp_path / f"ours{suffix}").read_bytes()
    if suffix == ".mgz":
        raw = gzip.decompress(raw)
    expected = (tmp_path / "nibabel.mgh").read_bytes()
    assert raw == expected + _tag(3, params.short().encode() + b"\0")


def test_data_is_big_endian_on_disk(tmp_path, identity_params):
    data = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 3, 2)
    io.write_volume(str(tmp_path / "o.mgh"), data, like=None, params=identity_params, formula=[])
    raw = (tmp_path / "o.mgh").read_bytes()
    assert raw[:4] == (1).to_bytes(4, "big") and raw[4:20] == np.array([4, 3, 2, 1], ">i4").tobytes()
    assert raw[284:284 + 96] == data[0, 0].astype(">f4").tobytes(order="F")


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
@pytest.mark.parametrize("source", ["test.mgz", "one.mgz", "one.mgh", "in.nii.gz"])
def test_streamed_whole_and_library_write_the_same_bytes(tmp_path, tiny_budget, affine, rng, suffix, source):
    """``convt3d run`` in one slab, in many (--max-memory 3K) and ``io.write_volume`` agree byte for byte."""
    shutil.copy(NIBABEL_MGZ, tmp_path / "test.mgz")
    one = rng.standard_normal((5, 4, 9)).astype(np.float32)
    nib.save(MGHImage(one, affine), tmp_path / "one.mgz")
    nib.save(MGHImage(one, affine), tmp_path / "one.mgh")
    nib.save(nib.Nifti1Image(one, affine), tmp_path / "in.nii.gz")
    frames = ("--fourth-axis", "channels")  # test.mgz: 2 frames, the library's default reading
    whole = _run(tmp_path, source, f"whole{suffix}", *LINEAR2, *frames)
    streamed = _run(tmp_path, source, f"streamed{suffix}", *LINEAR2, *frames, "--max-memory", "3K")
    assert whole["slabs"] == 1 and streamed["slabs"] > 1
    assert (tmp_path / f"whole{suffix}").read_bytes() == (tmp_path / f"streamed{suffix}").read_bytes()
    volume = io.read_volume(str(tmp_path / source))
    params = builtin_params("linear", 2, volume.data.shape[1])
    result = io.read_volume(str(tmp_path / f"whole{suffix}")).data
    io.write_volume(str(tmp_path / f"library{suffix}"), result, like=volume, params=params,
                    formula=geometry.formula_lines(volume.data.shape[-3:], params), dtype=np.float32)
    assert (tmp_path / f"whole{suffix}").read_bytes() == (tmp_path / f"library{suffix}").read_bytes()


def test_non_transposed_slabs_read_mgz_frames(tmp_path, tiny_budget, rng, affine):
    """An array output takes D-slabs: a .mgz input is then spooled, and streamed == whole."""
    nib.save(MGHImage(rng.standard_normal((9, 4, 5, 2)).astype(np.float32), affine), tmp_path / "in.mgz")
    nib.save(MGHImage(rng.standard_normal((9, 4, 5)).astype(np.float32), affine), tmp_path / "one.mgz")
    for source in ("in.mgz", "one.mgz"):
        whole = _run(tmp_path, source, f"{source}-w.npy", *LINEAR2)
        streamed = _run(tmp_path, source, f"{source}-s.npy", *LINEAR2, "--max-memory", "6K")
        assert streamed["slabs"] > 1 and whole["slabs"] == 1
        np.testing.assert_array_equal(np.load(tmp_path / f"{source}-w.npy"), np.load(tmp_path / f"{source}-s.npy"))


def test_float64_is_refused_before_any_work(tmp_path):
    shutil.copy(NIBABEL_MGZ, tmp_path / "test.mgz")
    result = invoke_in(tmp_path, "run", "test.mgz", "out.mgz", *LINEAR2, "--dtype", "float64")
    _one_error(result, "--output-dtype float32")
    assert sorted(os.listdir(tmp_path)) == ["test.mgz"]
    _run(tmp_path, "test.mgz", "out.mgz", *LINEAR2, "--dtype", "float64", "--output-dtype", "float32")
    assert nib.load(tmp_path / "out.mgz").get_data_dtype() == np.dtype(">f4")
    with pytest.raises(OutputError, match="float64"):
        io.write_volume(str(tmp_path / "lib.mgz"), np.zeros((1, 1, 2, 2, 2)), like=None,
                        params=geometry.LayerParams.create(1), formula=[], dtype=np.float64)


def test_label_maps_keep_their_type_and_unstorable_types_are_refused(tmp_path, affine):
    labels = (np.arange(60).reshape(5, 4, 3) % 7).astype(np.uint8)
    nib.save(MGHImage(labels, affine), tmp_path / "aseg.mgz")
    _run(tmp_path, "aseg.mgz", "up.mgz", "--kernel", "nearest", "--stride", "2")
    out = nib.load(tmp_path / "up.mgz")
    assert out.get_data_dtype() == np.dtype("u1")
    np.testing.assert_array_equal(np.asarray(out.dataobj)[::2, ::2, ::2], labels)
    np.save(tmp_path / "wide.npy", labels.astype(np.int64))
    result = invoke_in(tmp_path, "run", "wide.npy", "wide.mgz", "--kernel", "nearest", "--stride", "2")
    _one_error(result, "cannot hold int64")


def test_dimensions_beyond_int32_are_refused():
    with pytest.raises(OutputError, match="32-bit"):
        mgh.FORMAT.output_key(None, (1, 1, 2 ** 31, 1, 1))
    with pytest.raises(OutputError, match="remove ':k'"):
        mgh.FORMAT.output_key("k", (1, 1, 2, 2, 2))


def test_failed_write_leaves_nothing(tmp_path, identity_params):
    target = str(tmp_path / "o.mgz")
    with pytest.raises(RuntimeError), io.open_writer(target, (1, 2, 3, 3, 3), like=None, params=identity_params,
                                                     formula=[]) as writer:
        writer.write_slab(0, 1, np.zeros((1, 2, 1, 3, 3), np.float32))
        raise RuntimeError("interrupted")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- hostile files

def _edit(**values):
    def edit(fields):
        for name, value in values.items():
            fields[name] = value
    return edit


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
@pytest.mark.parametrize("case,kwargs,match", [
    ("bad-type", {"edit": _edit(type=7)}, "type code 7"),
    ("bad-version", {"edit": _edit(version=42)}, "not an MGH file"),
    ("zero-dim", {"edit": _edit(dims=[5, 0, 3, 1])}, "at least 1"),
    ("negative-dim", {"edit": _edit(dims=[5, 4, -3, 1])}, "at least 1"),
    ("huge-dims", {"edit": _edit(dims=[2 ** 31 - 1] * 4)}, "truncated"),
    ("nan-delta", {"edit": _edit(delta=[1.0, np.nan, 1.0])}, "non-finite delta"),
    ("zero-delta", {"edit": _edit(delta=[1.0, 0.0, 1.0])}, "singular"),
    ("nan-centre", {"edit": _edit(Pxyz_c=[0.0, np.inf, 0.0])}, "non-finite Pxyz_c"),
])
def test_hostile_headers_are_one_error_line(tmp_path, affine, suffix, case, kwargs, match):
    path = write_mgh(tmp_path / f"{case}{suffix}", np.ones((5, 4, 3), np.float32), affine, **kwargs)
    with pytest.raises(FileFormatError, match=match):
        io.read_volume(str(path))
    _one_error(invoke_in(tmp_path, "run", path.name, "out.nii", *LINEAR2), match)


@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
def test_truncated_files(tmp_path, affine, suffix):
    raw = mgh_bytes(np.ones((20, 20, 20), np.float32), affine)
    for cut, match in ((100, "too short for an MGH header"), (284 + 4000, "truncated")):
        path = tmp_path / f"cut{cut}{suffix}"
        path.write_bytes(gzip.compress(raw[:cut]) if suffix == ".mgz" else raw[:cut])
        with pytest.raises(FileFormatError, match=match):
            io.probe_volume(str(path))
        _one_error(invoke_in(tmp_path, "run", path.name, "out.npy", *LINEAR2), match)
    report = io.describe(str(tmp_path / f"cut4284{suffix}"))  # info shows the header and why
    assert report["engine_shape"] is None and "truncated" in report["note"]
    assert report["stored_shape"] == [20, 20, 20]


def test_huge_declared_shape_in_a_tiny_mgz_is_refused_from_its_size(tmp_path, affine):
    """A 1 KiB gzip stream cannot hold 8 GiB: refused without decompressing or allocating."""
    path = write_mgh(tmp_path / "bomb.mgz", np.ones((4, 4, 4), np.float32), affine,
                     edit=_edit(dims=[2048, 1024, 1024, 1]))
    with pytest.raises(FileFormatError, match=r"decompress to .* at most"):
        io.read_volume(str(path))


def test_corrupt_mgz_stream(tmp_path, affine, rng):
    raw = bytearray(gzip.compress(mgh_bytes(rng.standard_normal((8, 8, 8)).astype(np.float32), affine)))
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "bad.mgz").write_bytes(bytes(raw))
    with pytest.raises(FileFormatError, match="cannot read .* as MGH"):
        io.probe_volume(str(tmp_path / "bad.mgz"))


@pytest.mark.parametrize("name", ["junk.mgh", "junk.mgz", "plain.mgz"])
def test_garbage_bytes(tmp_path, rng, affine, name):
    path = tmp_path / name
    if name == "plain.mgz":  # an uncompressed MGH file named .mgz
        path.write_bytes(mgh_bytes(np.ones((3, 3, 3), np.float32), affine))
    else:
        path.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    with pytest.raises(FileFormatError):
        io.read_volume(str(path))
    assert invoke_in(tmp_path, "info", name).exit_code == 1


@pytest.mark.parametrize("tail,note", [
    (b"\x01\x02\x03\x04" * 16, "runs past the end"),   # garbage: an absurd length
    (_tag(40, b"") * 5000, "more than 4096 tags"),
    (_tag(41, b"ROW\0") + (1).to_bytes(4, "big") + b"colortable", "no length field"),
    (_tag(41, b"ROW\0") + _tag(3, b"cut")[:-2], "runs past the end"),
    (_tag(41, b"ROW\0") + b"\0\0\0\x03\0\0", "runs past the end"),
])
@pytest.mark.parametrize("suffix", [".mgh", ".mgz"])
def test_unreadable_tags_do_not_stop_the_volume(tmp_path, affine, tail, note, suffix):
    data = np.arange(60, dtype=np.float32).reshape(5, 4, 3)
    path = write_mgh(tmp_path / f"t{suffix}", data, affine, tail=b"\0" * 20 + tail)
    np.testing.assert_array_equal(io.read_volume(str(path)).data[0, 0], data)
    assert note in io.describe(str(path))["tags_note"]
    _run(tmp_path, path.name, "out.mgz", *LINEAR2)
    assert nib.load(tmp_path / "out.mgz").shape == (10, 8, 6)
