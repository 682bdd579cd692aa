"""NIfTI reading (versions, byte orders, ranks, scaling, damage) and writing."""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import FileFormatError, MemoryLimitError, OutputError, ShapeError
from convt3d_cli.geometry import LayerParams, formula_lines


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("endian", ["<", ">"])
def test_read_3d(tmp_path, make_nifti, affine, rng, version, suffix, endian):
    raw = rng.standard_normal((5, 4, 3)).astype(np.float32)
    path = make_nifti(tmp_path / f"v{suffix}", raw, affine, version=version, endian=endian)
    volume = io.read_volume(path)
    assert volume.data.shape == (1, 1, 5, 4, 3)  # D=X, H=Y, W=Z
    assert volume.data.flags.c_contiguous and volume.data.dtype == np.float32
    np.testing.assert_array_equal(volume.data[0, 0], raw)
    np.testing.assert_allclose(volume.affine, affine, atol=1e-5)
    assert volume.format == "nifti" and volume.source_ndim == 3 and volume.key is None
    assert isinstance(volume.header, nib.Nifti2Header if version == 2 else nib.Nifti1Header)
    assert type(volume.header) is (nib.Nifti2Header if version == 2 else nib.Nifti1Header)


def test_big_endian_int16_is_really_big_endian_on_disk(tmp_path, make_nifti, affine):
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3) - 30
    path = make_nifti(tmp_path / "be.nii", raw, affine, endian=">")
    with open(path, "rb") as handle:
        assert handle.read(4) == (348).to_bytes(4, "big")
    volume = io.read_volume(path)
    assert volume.data.dtype == np.dtype("int16") and volume.data.dtype.isnative
    np.testing.assert_array_equal(volume.data[0, 0], raw)
    assert io.probe_volume(path).byte_order == "big"


@pytest.mark.parametrize("rank", [4, 5])
def test_channels_on_the_last_axis(tmp_path, make_nifti, affine, rng, rank):
    raw = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    stored = raw if rank == 4 else raw[:, :, :, None, :]
    path = make_nifti(tmp_path / "c.nii.gz", stored, affine)
    volume = io.read_volume(path)
    assert volume.data.shape == (1, 2, 5, 4, 3)
    assert volume.data.flags.c_contiguous
    for c in range(2):
        np.testing.assert_array_equal(volume.data[0, c], raw[..., c])
    assert volume.source_ndim == rank


def test_5d_time_series_of_channels_reads_as_volumes(tmp_path, make_nifti, affine):
    raw = np.arange(3 * 4 * 5 * 2 * 3, dtype=np.float32).reshape(3, 4, 5, 2, 3)
    path = make_nifti(tmp_path / "t.nii", raw, affine)
    volume = io.read_volume(path)
    assert volume.data.shape == (2, 3, 3, 4, 5)
    np.testing.assert_array_equal(volume.data[1, 2], raw[:, :, :, 1, 2])


def test_more_than_5d_is_refused(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "t.nii", np.zeros((3, 3, 3, 2, 2, 2), np.float32), affine)
    with pytest.raises(ShapeError, match=r"\(X,Y,Z,T,C\)"):
        io.read_volume(path)


def test_fourth_axis_as_volumes_or_channels(tmp_path, make_nifti, affine):
    raw = np.arange(3 * 4 * 5 * 6, dtype=np.int16).reshape(3, 4, 5, 6)
    path = make_nifti(tmp_path / "t.nii.gz", raw, affine)
    assert io.read_volume(path).data.shape == (1, 6, 3, 4, 5)
    volumes = io.read_volume(path, fourth_axis="volumes").data
    assert volumes.shape == (6, 1, 3, 4, 5)
    np.testing.assert_array_equal(volumes[4, 0], raw[..., 4])
    info = io.probe_volume(path)
    assert io.with_fourth_axis(info, "auto", 1).engine_shape == (6, 1, 3, 4, 5)
    assert io.with_fourth_axis(info, "auto", 6).engine_shape == (1, 6, 3, 4, 5)
    assert io.with_fourth_axis(info, "auto", None).engine_shape == (1, 6, 3, 4, 5)
    with pytest.raises(ShapeError, match="--fourth-axis"):
        io.with_fourth_axis(info, "auto", 3)


def test_2d_nifti_is_refused(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "flat.nii", np.zeros((3, 3), np.float32), affine)
    with pytest.raises(ShapeError, match=r"\(X,Y,Z\)"):
        io.read_volume(path)


@pytest.mark.parametrize("version", [1, 2])
def test_scaling_is_applied(tmp_path, make_nifti, affine, version):
    raw = np.arange(-30, 30, dtype=np.int16).reshape(5, 4, 3)
    path = make_nifti(tmp_path / "s.nii", raw, affine, slope=0.5, inter=-3.0, version=version)
    volume = io.read_volume(path)
    assert volume.data.dtype == np.float32
    np.testing.assert_allclose(volume.data[0, 0], raw * 0.5 - 3.0)
    info = io.probe_volume(path)
    assert info.dtype == "int16" and info.read_dtype == "float32"
    assert info.scaling == (0.5, -3.0)


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_slope_zero_nan_or_infinite_means_unscaled(tmp_path, make_nifti, affine, version, suffix):
    """nibabel's rule (the NIfTI standard's for 0): such a slope is not applied, nor the
    intercept with it, and the stored type is kept."""
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    for number, slope in enumerate((0.0, np.nan, np.inf, -np.inf)):
        path = make_nifti(tmp_path / f"s{number}{suffix}", raw, affine, slope=slope, inter=5.0, version=version)
        volume = io.read_volume(path)
        assert volume.data.dtype == np.int16
        np.testing.assert_array_equal(volume.data[0, 0], raw)
        assert io.probe_volume(path).scaling is None


def test_scaled_int32_becomes_float64(tmp_path, make_nifti, affine):
    raw = (np.arange(60, dtype=np.int32) * 1_000_003).reshape(5, 4, 3)
    path = make_nifti(tmp_path / "s.nii", raw, affine, slope=2.0, inter=1.0)
    volume = io.read_volume(path)
    assert volume.data.dtype == np.float64
    np.testing.assert_array_equal(volume.data[0, 0], raw.astype(np.float64) * 2 + 1)


def test_identity_scaling_keeps_the_stored_type(tmp_path, make_nifti, affine):
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    path = make_nifti(tmp_path / "s.nii", raw, affine, slope=1.0, inter=0.0)
    assert io.read_volume(path).data.dtype == np.int16


def test_key_is_refused(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "v.nii", np.zeros((2, 2, 2), np.float32), affine)
    with pytest.raises(FileFormatError, match="one image"):
        io.read_volume(path + ":volume")


# --------------------------------------------------------------------------- damage

def test_truncated_nii_is_refused_before_reading(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "cut.nii", np.zeros((20, 20, 20), np.float32), affine)
    # Short by less than the 352-byte header: the data offset must be counted.
    os.truncate(path, os.path.getsize(path) - 100)
    for call in (io.probe_volume, io.read_volume):
        with pytest.raises(FileFormatError, match="truncated") as err:
            call(path)
        assert "cut.nii" in str(err.value)


def test_nii_gz_cut_inside_the_header(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "cut.nii.gz", np.zeros((8, 8, 8), np.float32), affine)
    with open(path, "rb") as handle:
        head = handle.read(40)
    with open(path, "wb") as handle:
        handle.write(head)
    with pytest.raises(FileFormatError, match="cut.nii.gz"):
        io.read_volume(path)


def test_nii_gz_cut_inside_the_data(tmp_path, make_nifti, affine, rng):
    """The header survives, so probing works; reading the data must fail cleanly."""
    raw = rng.standard_normal((30, 30, 30)).astype(np.float32)  # random: compresses badly
    path = make_nifti(tmp_path / "cut.nii.gz", raw, affine)
    os.truncate(path, os.path.getsize(path) // 2)
    assert io.probe_volume(path).engine_shape == (1, 1, 30, 30, 30)
    with pytest.raises(FileFormatError, match="cut.nii.gz"):
        io.read_volume(path)


def test_nii_gz_with_corrupt_stream(tmp_path, make_nifti, affine, rng):
    raw = rng.standard_normal((30, 30, 30)).astype(np.float32)
    path = make_nifti(tmp_path / "bad.nii.gz", raw, affine)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2: len(data) // 2 + 64] = bytes(64)
    open(path, "wb").write(bytes(data))
    with pytest.raises(FileFormatError, match="bad.nii.gz"):
        io.read_volume(path)


@pytest.mark.parametrize("name", ["junk.nii", "junk.nii.gz"])
def test_garbage_nifti(tmp_path, rng, name):
    path = tmp_path / name
    path.write_bytes(rng.bytes(2000))
    with pytest.raises(FileFormatError, match=name.replace(".", r"\.")):
        io.read_volume(str(path))


def test_plain_file_named_nii_gz(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "plain.nii", np.zeros((4, 4, 4), np.float32), affine)
    os.rename(path, tmp_path / "plain.nii.gz")
    with pytest.raises(FileFormatError, match="plain.nii.gz"):
        io.read_volume(str(tmp_path / "plain.nii.gz"))


def test_max_bytes_counts_scaled_floats(tmp_path, make_nifti, affine):
    raw = np.zeros((10, 10, 10), np.int16)
    path = make_nifti(tmp_path / "s.nii", raw, affine, slope=2.0)
    assert io.probe_volume(path).nbytes == 4000  # float32 after scaling, not 2000
    with pytest.raises(MemoryLimitError, match="3.9 KiB"):
        io.read_volume(path, max_bytes=3999)
    io.read_volume(path, max_bytes=4000)


def test_nii_gz_memory_counts_the_decompressed_copy(tmp_path, make_nifti, affine):
    path = make_nifti(tmp_path / "v.nii.gz", np.zeros((10, 10, 10), np.float32), affine)
    assert io.probe_volume(path).memory_needed == 8000
    with pytest.raises(MemoryLimitError):
        io.read_volume(path, max_bytes=6000)


# --------------------------------------------------------------------------- writing

def _write(path, volume, data, params=None, **kwargs):
    params = params or LayerParams.create(1)
    return io.write_volume(str(path), data, like=volume, params=params,
                           formula=formula_lines(data.shape[2:], params), **kwargs)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("version", [1, 2])
def test_nifti_round_trip(tmp_path, make_nifti, affine, rng, suffix, version):
    raw = rng.standard_normal((5, 4, 3)).astype(np.float32)
    volume = io.read_volume(make_nifti(tmp_path / f"in{suffix}", raw, affine, version=version,
                                       sform_code=3, qform_code=1, units=("micron", "msec")))
    out = _write(tmp_path / f"out{suffix}", volume, volume.data)
    image = nib.load(out)
    assert type(image) is (nib.Nifti2Image if version == 2 else nib.Nifti1Image)
    if suffix == ".nii.gz":
        with open(out, "rb") as handle:
            assert handle.read(2) == b"\x1f\x8b"
    np.testing.assert_array_equal(np.asanyarray(image.dataobj), raw)
    assert image.get_data_dtype() == np.float32
    np.testing.assert_allclose(image.affine, affine, atol=1e-5)
    assert int(image.header["sform_code"]) == 3 and int(image.header["qform_code"]) == 1
    assert image.header.get_xyzt_units() == ("micron", "msec")
    # The user's descrip stays; convt3d's record is an extension (a comment).
    assert image.header["descrip"].item() == b""
    assert image.header.extensions[-1].get_content().decode().startswith("convt3d k=1 s=1")


def test_nifti_float64_output(tmp_path, make_nifti, affine):
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", np.ones((2, 3, 4), np.float64), affine))
    out = _write(tmp_path / "out.nii", volume, volume.data, dtype="float64")
    assert nib.load(out).get_data_dtype() == np.float64
    out = _write(tmp_path / "out32.nii", volume, volume.data)
    assert nib.load(out).get_data_dtype() == np.float32


def test_scaling_is_reset_on_output(tmp_path, make_nifti, affine):
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", raw, affine, slope=0.25, inter=10.0))
    out = _write(tmp_path / "out.nii", volume, volume.data)
    header = nib.load(out).header
    assert header.get_slope_inter() in ((None, None), (1.0, 0.0))
    np.testing.assert_allclose(np.asanyarray(nib.load(out).dataobj), raw * 0.25 + 10)


def test_big_endian_input_gives_a_readable_output(tmp_path, make_nifti, affine):
    raw = np.arange(60, dtype=np.int16).reshape(5, 4, 3)
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", raw, affine, endian=">"))
    out = _write(tmp_path / "out.nii", volume, volume.data.astype(np.float32))
    np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), raw)


def test_multi_channel_output_is_xyzc(tmp_path, make_nifti, affine, rng):
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", np.zeros((5, 4, 3), np.float32), affine))
    data = rng.standard_normal((1, 3, 5, 4, 3)).astype(np.float32)
    image = nib.load(_write(tmp_path / "out.nii.gz", volume, data))
    assert image.shape == (5, 4, 3, 3)
    stored = np.asanyarray(image.dataobj)
    for c in range(3):
        np.testing.assert_array_equal(stored[..., c], data[0, c])
    back = io.read_volume(str(tmp_path / "out.nii.gz"))
    np.testing.assert_array_equal(back.data, data)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_volumes_go_to_the_fourth_axis(tmp_path, identity_params, suffix):
    data = np.arange(2 * 3 * 2 * 3 * 4, dtype=np.float32).reshape(2, 3, 2, 3, 4)     # N=2, C=3
    io.write_volume(str(tmp_path / f"o{suffix}"), data, like=None, params=identity_params, formula=[])
    stored = np.asarray(nib.load(tmp_path / f"o{suffix}").dataobj)
    assert stored.shape == (2, 3, 4, 2, 3)                                           # (X, Y, Z, T, C)
    np.testing.assert_array_equal(stored, data.transpose(2, 3, 4, 0, 1))
    io.write_volume(str(tmp_path / f"t{suffix}"), data[:, :1], like=None, params=identity_params, formula=[])
    assert nib.load(tmp_path / f"t{suffix}").shape == (2, 3, 4, 2)


def test_key_for_nifti_output_is_refused(tmp_path, identity_params):
    with pytest.raises(OutputError, match="one image"):
        io.write_volume(str(tmp_path / "o.nii.gz:x"), np.zeros((1, 1, 2, 2, 2)), like=None,
                        params=identity_params, formula=[])


def test_array_input_to_nifti(tmp_path):
    """npy -> NIfTI: identity input affine, both forms 'aligned' (2), 3-D output."""
    np.save(tmp_path / "in.npy", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    volume = io.read_volume(str(tmp_path / "in.npy"))
    params = LayerParams.create(2, stride=2)
    data = np.zeros((1, 1, 4, 6, 8), np.float32)
    image = nib.load(_write(tmp_path / "out.nii", volume, data, params))
    assert image.shape == (4, 6, 8)
    assert int(image.header["sform_code"]) == 2 and int(image.header["qform_code"]) == 2
    expected = np.diag([0.5, 0.5, 0.5, 1.0])
    expected[:3, 3] = -0.25
    np.testing.assert_allclose(image.header.get_sform(), expected)
    np.testing.assert_allclose(image.header.get_qform(), expected)
    np.testing.assert_allclose(image.header.get_zooms(), (0.5, 0.5, 0.5))


def test_nifti_input_to_hdf5_and_back(tmp_path, make_nifti, affine, rng):
    import h5py

    raw = rng.standard_normal((5, 4, 3)).astype(np.float32)
    volume = io.read_volume(make_nifti(tmp_path / "in.nii.gz", raw, affine))
    _write(tmp_path / "out.h5", volume, volume.data)
    with h5py.File(tmp_path / "out.h5", "r") as handle:
        np.testing.assert_array_equal(handle["/volume"][()], raw)  # 3-D like the input
        np.testing.assert_allclose(handle["/volume"].attrs["affine"], affine, atol=1e-5)


def test_large_dimension_switches_to_nifti2(tmp_path, identity_params):
    data = np.zeros((1, 1, 40000, 1, 2), np.float32)
    out = io.write_volume(str(tmp_path / "long.nii"), data, like=None, params=identity_params,
                          formula=[])
    image = nib.load(out)
    assert type(image) is nib.Nifti2Image and image.shape == (40000, 1, 2)


def test_nifti1_input_needing_nifti2_keeps_its_header(tmp_path, make_nifti, affine):
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", np.zeros((2, 1, 1), np.float32), affine,
                                       sform_code=4, units=("mm", "sec")))
    data = np.zeros((1, 1, 40000, 1, 1), np.float32)
    image = nib.load(_write(tmp_path / "out.nii", volume, data))
    assert type(image) is nib.Nifti2Image
    assert int(image.header["sform_code"]) == 4 and image.header.get_xyzt_units() == ("mm", "sec")


def test_both_codes_zero_input_gets_aligned_codes(tmp_path, make_nifti):
    affine = np.diag([2.0, 3.0, 4.0, 1.0])
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", np.zeros((4, 4, 4), np.float32), affine,
                                       sform_code=0, qform_code=0))
    params = LayerParams.create(2, stride=2)
    image = nib.load(_write(tmp_path / "out.nii", volume, np.zeros((1, 1, 8, 8, 8), np.float32),
                            params))
    assert int(image.header["sform_code"]) == 2 and int(image.header["qform_code"]) == 2
    # nibabel's affine for a code-less input (from pixdim), transformed per docs/behaviour.md, *Spatial metadata*
    np.testing.assert_allclose(image.affine, volume.affine @ _transform(params), atol=1e-6)


def _transform(params):
    k, s, p, d = (np.array(v, float) for v in (params.kernel_size, params.stride, params.padding,
                                                params.dilation))
    t = np.eye(4)
    t[:3, :3] = np.diag(1 / s)
    t[:3, 3] = (p - d * (k - 1) / 2) / s
    return t


def test_gzip_of_output_is_complete(tmp_path, make_nifti, affine, rng):
    """The .nii.gz written is a complete gzip stream (fsync'ed, renamed after closing)."""
    raw = rng.standard_normal((6, 5, 4)).astype(np.float32)
    volume = io.read_volume(make_nifti(tmp_path / "in.nii", raw, affine))
    out = _write(tmp_path / "out.nii.gz", volume, volume.data)
    with gzip.open(out, "rb") as handle:
        assert len(handle.read()) == nib.load(out).dataobj.offset + raw.nbytes
