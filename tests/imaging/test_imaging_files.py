"""Imaging files as users have them: 4-D series, output types, header rules, sidecars, target grids.

Inputs are nibabel's own example images (``functional.nii``: SPM, 4-D, scaled int16;
``example4d.nii.gz``: FSL, extensions, slice axis, display window; ``anatomical.nii``;
``example_nifti2.nii.gz``; ``standard.nii.gz``: uint8), so the rules are checked on files
nobody here wrote.
"""

import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from convt3d_cli import conv_transpose3d, geometry, io
from convt3d_cli.builtin import apply_builtin


def load(path):
    image = nib.load(str(path))
    return np.asanyarray(image.dataobj), image


def raw_header(path):
    """The header as stored (nibabel moves scl_slope/inter of a loaded image into its proxy)."""
    import gzip

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        klass = nib.Nifti2Header if nib.load(str(path)).header.sizeof_hdr == 540 else nib.Nifti1Header
        return klass.from_fileobj(handle)


# --------------------------------------------------------------------------- 4-D series

def test_each_volume_of_a_time_series_is_upsampled_on_its_own(run, tmp_path, nib_data):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((1, 1, 3, 3, 3)).astype(np.float32)
    np.save(tmp_path / "w.npy", weight)
    result = run("run", nib_data / "functional.nii", "out.nii.gz", "--weights", "w.npy", "--stride", "2",
                 "--padding", "1", "--json", "-q")
    report = json.loads(result.stdout)
    assert report["input_shape"] == [20, 1, 17, 21, 3]        # 20 volumes of one channel
    out, image = load(tmp_path / "out.nii.gz")
    assert out.shape == (33, 41, 5, 20)
    source = np.asarray(nib.load(str(nib_data / "functional.nii")).get_fdata(dtype=np.float32))
    for t in (0, 7, 19):
        expected = conv_transpose3d(source[..., t][None, None], weight, stride=2, padding=1)[0, 0]
        np.testing.assert_allclose(out[..., t], expected, rtol=1e-5, atol=1e-3)
    # TR, toffset and units are kept; the spatial zooms follow the stride.
    zooms = image.header.get_zooms()
    assert zooms == pytest.approx((2.0, 2.0, 4.0, 2.0))
    assert image.header.get_xyzt_units() == ("mm", "sec")


def test_fourth_axis_as_channels_when_the_layer_takes_them(run, tmp_path, nib_data):
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((20, 2, 2, 2, 2)).astype(np.float32)
    np.save(tmp_path / "w.npy", weight)
    report = json.loads(run("run", nib_data / "functional.nii", "out.npy", "--weights", "w.npy", "--stride", "2",
                            "--json", "-q").stdout)
    assert report["input_shape"] == [1, 20, 17, 21, 3]
    source = nib.load(str(nib_data / "functional.nii")).get_fdata(dtype=np.float32)
    expected = conv_transpose3d(np.moveaxis(source, 3, 0), weight, stride=2)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, rtol=1e-5, atol=2e-2)


def test_an_ambiguous_fourth_axis_names_both_readings(run, tmp_path, nib_data):
    np.save(tmp_path / "w.npy", np.ones((3, 1, 2, 2, 2), np.float32))
    result = run("run", nib_data / "functional.nii", "out.nii", "--weights", "w.npy", code=1)
    assert "20 volumes" in result.stderr and "--fourth-axis" in result.stderr
    assert not (tmp_path / "out.nii").exists()
    # Forcing a reading that does not fit is a channel mismatch, also exit 1.
    run("run", nib_data / "functional.nii", "out.nii", "--weights", "w.npy", "--fourth-axis", "channels", code=1)
    run("run", nib_data / "functional.nii", "out.nii", "--weights", "w.npy", "--fourth-axis", "sideways", code=2)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz", ".h5", ".npy"])
def test_streamed_volumes_are_bitwise_the_whole_run(run, tmp_path, nib_data, suffix, monkeypatch):
    from convt3d_cli import slabs
    from convt3d_cli.engine import PreparedLayer

    np.save(tmp_path / "w.npy", np.random.default_rng(2).standard_normal((1, 2, 2, 3, 2)).astype(np.float32))
    args = ("run", nib_data / "example4d.nii.gz")
    layer = ("--weights", "w.npy", "--stride", "2", "--fourth-axis", "volumes", "-q")
    run(*args, f"whole{suffix}", *layer)
    monkeypatch.setattr(slabs, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)
    report = json.loads(run(*args, f"slabs{suffix}", *layer, "--max-memory", "3M", "--json").stdout)
    assert report["slabs"] > 1 and report["input_shape"] == [2, 1, 128, 96, 24]
    assert (tmp_path / f"whole{suffix}").read_bytes() == (tmp_path / f"slabs{suffix}").read_bytes()
    if suffix.startswith(".nii"):
        assert load(tmp_path / f"whole{suffix}")[0].shape == (256, 193, 48, 2, 2)   # (X, Y, Z, T, C)


# --------------------------------------------------------------------------- output types

def test_nearest_keeps_a_label_map_a_label_map(run, tmp_path, nib_data):
    run("run", nib_data / "standard.nii.gz", "labels.nii.gz", "--kernel", "nearest", "--stride", "3", "-q")
    out, image = load(tmp_path / "labels.nii.gz")
    source = np.asarray(nib.load(str(nib_data / "standard.nii.gz")).dataobj)
    assert image.get_data_dtype() == np.uint8 and out.dtype == np.uint8
    np.testing.assert_array_equal(out, source.repeat(3, 0).repeat(3, 1).repeat(3, 2))
    header = raw_header(tmp_path / "labels.nii.gz")
    assert header["scl_slope"] == 1 and header["scl_inter"] == 0


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".h5", ".npz", ".npy"])
def test_integer_outputs_round_half_to_even_clip_and_count(run, tmp_path, suffix, monkeypatch):
    from convt3d_cli import slabs
    from convt3d_cli.engine import PreparedLayer

    values = np.array([-300.0, -128.5, -0.5, 0.5, 1.5, 2.5, 126.5, 127.49, 400.0], np.float32)
    x = np.resize(values, (9, 5, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "w.npy", np.ones((1, 1, 1, 1, 1), np.float32))
    report = json.loads(run("run", "x.npy", f"o{suffix}", "--weights", "w.npy", "--output-dtype", "int8",
                            "--json", "-q").stdout)
    expected = np.clip(np.rint(x), -128, 127).astype(np.int8)
    assert report["output_dtype"] == "int8"
    assert report["clipped_voxels"] == int(np.count_nonzero((np.rint(x) < -128) | (np.rint(x) > 127)))
    got = io.read_volume(str(tmp_path / f"o{suffix}")).data
    assert got.dtype == np.int8
    np.testing.assert_array_equal(got.reshape(-1), expected.reshape(-1))
    monkeypatch.setattr(slabs, "FIXED_BYTES", 0)
    monkeypatch.setattr(PreparedLayer, "scratch_bytes", lambda layer, window=None: 0)
    streamed = json.loads(run("run", "x.npy", f"s{suffix}", "--weights", "w.npy", "--output-dtype", "int8",
                              "--max-memory", "2K", "--json", "-q").stdout)
    assert streamed["slabs"] > 1 and streamed["clipped_voxels"] == report["clipped_voxels"]
    assert (tmp_path / f"o{suffix}").read_bytes() == (tmp_path / f"s{suffix}").read_bytes()


def test_clipping_is_reported_in_text(run, tmp_path, nib_data):
    result = run("run", nib_data / "anatomical.nii", "o.nii", "--kernel", "linear", "--stride", "2",
                 "--output-dtype", "uint8")
    assert "clipped:" in result.stderr and "uint8 range [0, 255]" in result.stderr


def test_same_output_dtype_of_a_scaled_image_is_float(run, tmp_path, nib_data):
    """functional.nii is int16 with scl_slope 0.075: its values are not integers, 'same' keeps them real."""
    report = json.loads(run("run", nib_data / "functional.nii", "o.nii", "--kernel", "nearest", "--stride", "2",
                            "--json", "-q").stdout)
    assert report["output_dtype"] == "float32"


# --------------------------------------------------------------------------- header rules

# Every field of a NIfTI-1 header and the rule the output follows for it.
KEPT = "kept"
RULES = {
    "sizeof_hdr": KEPT, "data_type": KEPT, "db_name": KEPT, "extents": KEPT, "session_error": KEPT,
    "regular": KEPT, "intent_p1": KEPT, "intent_p2": KEPT, "intent_p3": KEPT, "intent_code": KEPT,
    "intent_name": KEPT, "xyzt_units": KEPT, "toffset": KEPT, "glmax": KEPT, "glmin": KEPT,
    "descrip": KEPT, "aux_file": KEPT, "qform_code": KEPT, "sform_code": KEPT, "magic": KEPT,
    "dim": "spatial sizes are the output's, the rest kept",
    "pixdim": "spatial voxel sizes divided by the stride, qfac and the time step kept",
    "datatype": "the output's type", "bitpix": "the output's type",
    "vox_offset": "grows by convt3d's extension",
    "scl_slope": "1: the stored values are the values",
    "scl_inter": "0: the stored values are the values",
    "cal_min": "the output's value range when the input set a window",
    "cal_max": "the output's value range when the input set a window",
    "dim_info": "frequency and phase bits kept; slice bits cleared when the slice axis is resampled",
    "slice_code": "slice timing: kept while the slice axis keeps its grid, else cleared",
    "slice_start": "slice timing", "slice_end": "slice timing", "slice_duration": "slice timing",
    "quatern_b": "the qform of the output grid", "quatern_c": "qform", "quatern_d": "qform",
    "qoffset_x": "qform", "qoffset_y": "qform", "qoffset_z": "qform",
    "srow_x": "the sform of the output grid", "srow_y": "sform", "srow_z": "sform",
}


@pytest.mark.parametrize("stride", ["2,2,1", "2"])
def test_every_header_field_follows_its_rule(run, tmp_path, nib_data, stride):
    source_path = nib_data / "example4d.nii.gz"
    run("run", source_path, "out.nii.gz", "--kernel", "linear", "--stride", stride, "--fourth-axis", "volumes",
        "-q")
    before, after = raw_header(source_path), raw_header(tmp_path / "out.nii.gz")
    assert set(before.keys()) == set(RULES), "a header field without a rule"
    params = geometry.LayerParams.create(4 if stride == "2" else (4, 4, 1), tuple(int(v) for v in
                                         (stride * 3 if len(stride) == 1 else stride).split(",") if v)
                                         if "," in stride else 2, (1, 1, 1) if stride == "2" else (1, 1, 0))
    out, image = load(tmp_path / "out.nii.gz")
    for field, rule in RULES.items():
        if rule == KEPT:
            assert np.array_equal(before[field], after[field]), field
    assert list(after["dim"][1:6]) == list(out.shape) + [1] * (5 - out.ndim) and after["dim"][0] == 4
    np.testing.assert_allclose(after["pixdim"][1:4], before["pixdim"][1:4] / np.array(params.stride), rtol=1e-6)
    assert after["pixdim"][0] == before["pixdim"][0] and after["pixdim"][4] == before["pixdim"][4]
    assert after.get_data_dtype() == np.float32 and after["bitpix"] == 32
    assert after["scl_slope"] == 1 and after["scl_inter"] == 0
    assert after["cal_min"] == pytest.approx(float(out.min())) and after["cal_max"] == pytest.approx(float(out.max()))
    assert len(image.header.extensions) == len(nib.load(str(source_path)).header.extensions) + 1
    assert image.header.extensions[-1].get_content().startswith(b"convt3d k=")
    assert after["vox_offset"] > before["vox_offset"]
    np.testing.assert_allclose(image.affine, geometry.output_affine(nib.load(str(source_path)).affine, params),
                               atol=1e-4)
    freq, phase, slice_dim = before.get_dim_info()
    assert slice_dim == 2
    if stride == "2,2,1":       # Z keeps its grid: the slice timing still holds
        assert after.get_dim_info() == (freq, phase, 2)
        for field in ("slice_code", "slice_start", "slice_end", "slice_duration"):
            assert after[field] == before[field], field
    else:
        assert after.get_dim_info() == (freq, phase, None)
        for field in ("slice_code", "slice_start", "slice_end", "slice_duration"):
            assert after[field] == 0, field


def test_nifti2_input_keeps_its_version_and_intent(run, tmp_path, nib_data):
    run("run", nib_data / "example_nifti2.nii.gz", "out.nii.gz", "--kernel", "nearest", "--stride", "2",
        "--fourth-axis", "volumes", "-q")
    source, image = nib.load(str(nib_data / "example_nifti2.nii.gz")), nib.load(str(tmp_path / "out.nii.gz"))
    assert isinstance(image, nib.Nifti2Image)
    assert image.header["intent_code"] == source.header["intent_code"]
    assert image.shape == (64, 40, 24, 2) and image.get_data_dtype() == source.get_data_dtype()


# --------------------------------------------------------------------------- BIDS sidecars

def test_bids_sidecar_goes_with_the_output(run, tmp_path, nib_data):
    shutil.copy(nib_data / "example4d.nii.gz", tmp_path / "sub-01_bold.nii.gz")
    fields = {"RepetitionTime": 2.0, "SliceTiming": [0.0, 0.5], "TaskName": "rest"}
    (tmp_path / "sub-01_bold.json").write_text(json.dumps(fields))
    report = json.loads(run("run", "sub-01_bold.nii.gz", "sub-01_bold_x2.nii.gz", "--kernel", "linear",
                            "--stride", "2", "--json", "-q").stdout)
    assert report["sidecar"] == "sub-01_bold_x2.json"
    written = json.loads((tmp_path / "sub-01_bold_x2.json").read_text())
    assert written["RepetitionTime"] == 2.0 and written["TaskName"] == "rest"
    assert "SliceTiming" not in written                     # the slice axis (Z) was resampled
    assert written["Sources"] == ["sub-01_bold.nii.gz"]
    assert "convt3d" in written["Description"] and written["ConvTranspose3d"]["stride"] == [2, 2, 2]
    # In-plane only: the slices keep their timing.
    run("run", "sub-01_bold.nii.gz", "inplane.nii.gz", "--kernel", "linear", "--stride", "2,2,1", "-q")
    assert json.loads((tmp_path / "inplane.json").read_text())["SliceTiming"] == [0.0, 0.5]
    # The same --overwrite rule as the volume, checked before any work; --no-sidecar skips it.
    (tmp_path / "taken.json").write_text("{}")
    run("run", "sub-01_bold.nii.gz", "taken.nii.gz", "--kernel", "linear", "--stride", "2", code=1)
    assert not (tmp_path / "taken.nii.gz").exists() and (tmp_path / "taken.json").read_text() == "{}"
    run("run", "sub-01_bold.nii.gz", "taken.nii.gz", "--kernel", "linear", "--stride", "2", "--no-sidecar", "-q")
    assert (tmp_path / "taken.json").read_text() == "{}"


def test_a_broken_sidecar_stops_the_run_before_any_work(run, tmp_path, nib_data):
    shutil.copy(nib_data / "anatomical.nii", tmp_path / "a.nii")
    (tmp_path / "a.json").write_text("{not json")
    result = run("run", "a.nii", "b.nii", "--kernel", "linear", "--stride", "2", code=1)
    assert "--no-sidecar" in result.stderr and not (tmp_path / "b.nii").exists()


# --------------------------------------------------------------------------- target grids

def test_like_reaches_a_reference_grid(run, tmp_path, nib_data):
    run("run", nib_data / "anatomical.nii", "ref.nii.gz", "--kernel", "linear", "--stride", "2", "-q")
    np.save(tmp_path / "w.npy", np.ones((1, 1, 2, 2, 2), np.float32) / 8)
    for layer in (("--kernel", "nearest"), ("--kernel", "linear"), ("--weights", "w.npy", "--stride", "2")):
        run("run", nib_data / "anatomical.nii", "out.nii.gz", *layer, "--like", "ref.nii.gz", "--overwrite", "-q")
        ref, out = nib.load(str(tmp_path / "ref.nii.gz")), nib.load(str(tmp_path / "out.nii.gz"))
        assert out.shape == ref.shape
        np.testing.assert_allclose(out.affine, ref.affine, atol=1e-4)


def test_like_a_cropped_reference_uses_begin_and_end_crops(run, tmp_path, nib_data):
    """A reference covering part of the upsampled field of view, with an odd start."""
    anat = nib.load(str(nib_data / "anatomical.nii"))
    params = geometry.LayerParams.create(2, 2, (3, 1, 2, 4, 0, 5))
    full = geometry.output_shape((1, 1) + anat.shape, 1, 2, 2, (3, 1, 2, 4, 0, 5))[2:]
    ref_affine = geometry.output_affine(anat.affine, params)
    nib.save(nib.Nifti1Image(np.zeros(full, np.uint8), ref_affine), str(tmp_path / "ref.nii"))
    np.save(tmp_path / "w.npy", np.ones((1, 1, 2, 2, 2), np.float32))
    report = json.loads(run("run", nib_data / "anatomical.nii", "out.nii", "--weights", "w.npy", "--stride", "2",
                            "--like", "ref.nii", "--json", "-q").stdout)
    assert report["padding"] == [3, 1, 2, 4, 0, 5] and report["settings_from"]["padding"] == "--like"
    np.testing.assert_allclose(nib.load(str(tmp_path / "out.nii")).affine, ref_affine, atol=1e-4)


@pytest.mark.parametrize("make_ref, why", [
    (lambda a: a @ np.diag([0.5, 0.5, 0.5, 1.0]) @ _shift(0.3, 0, 0), "origin"),           # half-voxel offset
    (lambda a: a @ np.diag([0.4, 0.5, 0.5, 1.0]), "times the input's"),                       # 2.5x
    (lambda a: a @ _rotation_z(10) @ np.diag([0.5, 0.5, 0.5, 1.0]), "rotated"),
])
def test_unreachable_reference_grids_say_why(run, tmp_path, nib_data, make_ref, why):
    anat = nib.load(str(nib_data / "anatomical.nii"))
    nib.save(nib.Nifti1Image(np.zeros((60, 80, 50), np.uint8), make_ref(anat.affine)), str(tmp_path / "ref.nii"))
    result = run("run", nib_data / "anatomical.nii", "out.nii", "--kernel", "linear", "--like", "ref.nii", code=1)
    assert why in result.stderr and not (tmp_path / "out.nii").exists()


def _shift(x, y, z):
    out = np.eye(4)
    out[:3, 3] = (x, y, z)
    return out


def _rotation_z(degrees):
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    out = np.eye(4)
    out[:2, :2] = [[c, -s], [s, c]]
    return out


def test_voxel_size_sets_the_stride(run, tmp_path, nib_data):
    report = json.loads(run("run", nib_data / "anatomical.nii", "o.nii.gz", "--kernel", "linear",
                            "--voxel-size", "1,1,1", "--json", "-q").stdout)
    zooms = nib.load(str(nib_data / "anatomical.nii")).header.get_zooms()
    assert report["stride"] == [int(round(z)) for z in zooms]
    assert nib.load(str(tmp_path / "o.nii.gz")).header.get_zooms() == pytest.approx((1.0, 1.0, 1.0))
    run("run", nib_data / "anatomical.nii", "o2.nii", "--kernel", "linear", "--voxel-size", "0.7", code=2)
    run("run", nib_data / "anatomical.nii", "o2.nii", "--kernel", "linear", "--voxel-size", "-1", code=2)
    run("run", nib_data / "anatomical.nii", "o2.nii", "--weights", "x.npy", "--voxel-size", "1", code=2)
    run("run", nib_data / "anatomical.nii", "o2.nii", "--kernel", "linear", "--voxel-size", "1", "--stride", "2",
        code=2)


def test_threads_option(run, tmp_path, nib_data):
    one = run("run", nib_data / "anatomical.nii", "a.nii", "--kernel", "linear", "--stride", "2", "--threads", "1",
              "-q")
    assert one.exit_code == 0
    run("run", nib_data / "anatomical.nii", "b.nii", "--kernel", "linear", "--stride", "2", "-q")
    assert (tmp_path / "a.nii").read_bytes() == (tmp_path / "b.nii").read_bytes()
    run("run", nib_data / "anatomical.nii", "c.nii", "--kernel", "linear", "--stride", "2", "--threads", "0",
        code=2)


def test_builtin_linear_matches_the_library_on_a_real_image(run, tmp_path, nib_data):
    run("run", nib_data / "anatomical.nii", "a.nii", "--kernel", "linear", "--stride", "2", "-q")
    source = nib.load(str(nib_data / "anatomical.nii")).get_fdata(dtype=np.float32)
    np.testing.assert_allclose(load(tmp_path / "a.nii")[0], apply_builtin(source[None], "linear", 2)[0],
                               rtol=1e-6, atol=1e-4)
