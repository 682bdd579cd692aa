"""Spatial metadata of written files, checked from first principles (docs/behaviour.md, *Spatial metadata* and *Built-in kernels*).

Upsampled data come from a plain NumPy reference written here (not from the
engine): ``nearest`` repeats every voxel s times per axis; ``linear`` is
separable 1-D linear interpolation with align_corners=False and replicated
edges. Interpolation places output voxel ``o`` at the continuous input index
``(o + 0.5) / s - 0.5``. After writing through ``write_volume`` with the
matching layer parameters, the world coordinate of every output voxel, taken
from the *written* affine, must equal the world coordinate of that continuous
input index under the input affine. The input is rotated, anisotropic and
shifted, so a wrong sign, scale, axis order or half-voxel shift shows up.
"""

import h5py
import nibabel as nib
import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.geometry import LayerParams, formula_lines

SHAPE = (5, 4, 3)
# The input intensities are a linear function of world position, so linear
# interpolation reproduces them exactly inside the grid.
SLOPE = np.array([0.3, -0.7, 1.1])
OFFSET = 5.0


def intensity(world):
    return world @ SLOPE + OFFSET


def world_of(affine, index):
    """World coordinates of (continuous) voxel indices, shape (M, 3)."""
    return index @ affine[:3, :3].T + affine[:3, 3]


def all_indices(shape):
    return np.indices(shape).reshape(len(shape), -1).T.astype(float)


def upsample_nearest(x, strides):
    for axis, s in enumerate(strides):
        x = np.repeat(x, s, axis=axis)
    return x


def upsample_linear(x, strides):
    """align_corners=False, edges replicated: torch's trilinear for integer factors."""
    for axis, s in enumerate(strides):
        n = x.shape[axis]
        pos = np.clip((np.arange(n * s) + 0.5) / s - 0.5, 0, n - 1)
        lo = np.floor(pos).astype(int)
        hi = np.minimum(lo + 1, n - 1)
        shape = [1] * x.ndim
        shape[axis] = -1
        weight = (pos - lo).reshape(shape)
        x = np.take(x, lo, axis=axis) * (1 - weight) + np.take(x, hi, axis=axis) * weight
    return x


def layer(mode, strides):
    """Layer parameters that reproduce the reference upsampling (docs/behaviour.md, *Built-in kernels*)."""
    strides = np.array(strides)
    if mode == "nearest":
        return LayerParams.create(tuple(strides), stride=tuple(strides), padding=0)
    kernel = 2 * strides - strides % 2
    return LayerParams.create(tuple(kernel), stride=tuple(strides), padding=tuple((kernel - strides) // 2))


def interpolation_position(o, strides):
    return (o + 0.5) / np.asarray(strides, float) - 0.5


def make_input(tmp_path, make_nifti, affine, suffix=".nii", **kwargs):
    raw = intensity(world_of(affine, all_indices(SHAPE))).reshape(SHAPE)
    path = make_nifti(tmp_path / f"in{suffix}", raw, affine, sform_code=4, qform_code=1,
                      units=("mm", "sec"), **kwargs)
    return raw, io.read_volume(path)


def upsample(mode, volume_data, strides):
    reference = upsample_nearest if mode == "nearest" else upsample_linear
    return reference(volume_data, strides)


@pytest.mark.parametrize("mode", ["nearest", "linear"])
@pytest.mark.parametrize("strides", [(2, 2, 2), (3, 3, 3), (2, 3, 4)])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_world_coordinates_of_every_output_voxel(tmp_path, make_nifti, make_affine, mode, strides,
                                                 suffix):
    in_affine = make_affine()
    raw, volume = make_input(tmp_path, make_nifti, in_affine, suffix)
    up = upsample(mode, raw, strides)
    params = layer(mode, strides)
    formula = formula_lines(SHAPE, params)
    # the layer really produces the reference's shape
    assert [int(line.rsplit("= ", 1)[1]) for line in formula] == list(up.shape)

    out = io.write_volume(str(tmp_path / f"out{suffix}"), up[None, None].astype(np.float32),
                          like=volume, params=params, formula=formula)
    image = nib.load(out)
    assert image.shape == up.shape
    written = image.affine

    o = all_indices(up.shape)
    position = interpolation_position(o, strides)
    np.testing.assert_allclose(world_of(written, o), world_of(in_affine, position), atol=2e-4)

    # Both forms carry the same geometry (the qform is a rotation + zooms here).
    np.testing.assert_allclose(image.header.get_sform(), written, atol=2e-5)
    np.testing.assert_allclose(image.header.get_qform(), written, atol=2e-4)
    assert int(image.header["sform_code"]) == 4 and int(image.header["qform_code"]) == 1
    assert image.header.get_xyzt_units() == ("mm", "sec")
    in_zooms = np.array(volume.header.get_zooms()[:3])
    np.testing.assert_allclose(image.header.get_zooms(), in_zooms / np.array(strides), rtol=1e-6)
    np.testing.assert_allclose(in_zooms, (0.8, 1.25, 2.5), rtol=1e-6)

    # Data and geometry agree: each stored value is what the input says at
    # that world position.
    values = np.asanyarray(image.dataobj).reshape(-1)
    world_out = world_of(written, o)
    if mode == "linear":
        inside = np.all((position >= 0) & (position <= np.array(SHAPE) - 1), axis=1)
        assert inside.sum() > 0
        np.testing.assert_allclose(values[inside], intensity(world_out[inside]), atol=2e-3)
    else:
        # nearest: the input voxel closest (in index space) to the output position
        nearest = np.rint(world_of(np.linalg.inv(in_affine), world_out)).astype(int)
        np.testing.assert_allclose(values, raw[tuple(nearest.T)], atol=1e-4)


def test_time_zoom_is_kept_for_4d_output(tmp_path, make_nifti, make_affine):
    in_affine = make_affine()
    raw = np.zeros(SHAPE + (2,), np.float32)
    path = make_nifti(tmp_path / "in.nii", raw, in_affine, sform_code=4, qform_code=1,
                      units=("mm", "msec"), time_zoom=2.5)
    volume = io.read_volume(path)
    assert volume.data.shape == (1, 2) + SHAPE
    params = layer("nearest", (2, 2, 2))
    data = np.zeros((1, 2) + tuple(2 * n for n in SHAPE), np.float32)
    image = nib.load(io.write_volume(str(tmp_path / "out.nii"), data, like=volume, params=params,
                                     formula=formula_lines(SHAPE, params)))
    zooms = image.header.get_zooms()
    assert len(zooms) == 4
    np.testing.assert_allclose(zooms, (0.4, 0.625, 1.25, 2.5), rtol=1e-6)
    assert image.header.get_xyzt_units() == ("mm", "msec")


def test_sform_and_qform_are_transformed_separately(tmp_path, make_nifti, make_affine):
    """An input whose qform (scanner) and sform (template) differ keeps both, each transformed."""
    sform = make_affine()
    qform = make_affine(angles=(-10.0, 5.0, 80.0), shift=(3.0, -4.0, 5.0))
    path = make_nifti(tmp_path / "in.nii", np.zeros(SHAPE, np.float32), sform, sform_code=4,
                      qform_code=1, qform_affine=qform)
    volume = io.read_volume(path)
    strides = (2, 3, 4)
    params = layer("linear", strides)
    up_shape = tuple(n * s for n, s in zip(SHAPE, strides))
    image = nib.load(io.write_volume(str(tmp_path / "out.nii"), np.zeros((1, 1) + up_shape),
                                     like=volume, params=params, formula=formula_lines(SHAPE, params)))
    o = all_indices(up_shape)
    c = interpolation_position(o, strides)
    np.testing.assert_allclose(world_of(image.header.get_sform(), o), world_of(sform, c), atol=2e-4)
    np.testing.assert_allclose(world_of(image.header.get_qform(), o), world_of(qform, c), atol=2e-4)
    assert int(image.header["sform_code"]) == 4 and int(image.header["qform_code"]) == 1


def test_hdf5_affine_attribute_follows_the_same_rule(tmp_path, make_nifti, make_affine):
    in_affine = make_affine()
    raw, volume = make_input(tmp_path, make_nifti, in_affine)
    strides = (3, 2, 2)
    params = layer("linear", strides)
    up = upsample_linear(raw, strides)
    io.write_volume(str(tmp_path / "out.h5"), up[None, None], like=volume, params=params,
                    formula=formula_lines(SHAPE, params))
    with h5py.File(tmp_path / "out.h5", "r") as handle:
        written = handle["/volume"].attrs["affine"]
    o = all_indices(up.shape)
    np.testing.assert_allclose(world_of(written, o),
                               world_of(in_affine, interpolation_position(o, strides)), atol=1e-4)


def test_general_layer_centres_the_kernel_footprint(tmp_path, make_nifti, make_affine):
    """Any layer: o sits at input index (o + p - d(k-1)/2) / s (docs/behaviour.md, *Spatial metadata*), checked per axis."""
    in_affine = make_affine()
    _, volume = make_input(tmp_path, make_nifti, in_affine)
    params = LayerParams.create((3, 5, 2), stride=(2, 3, 1), padding=(1, 2, 0), dilation=(1, 2, 3),
                                output_padding=(1, 0, 0))
    formula = formula_lines(SHAPE, params)
    out_shape = tuple(int(line.rsplit("= ", 1)[1]) for line in formula)
    image = nib.load(io.write_volume(str(tmp_path / "out.nii"), np.zeros((1, 1) + out_shape),
                                     like=volume, params=params, formula=formula))
    o = all_indices(out_shape)
    k, s, p, d = (np.array(v, float) for v in (params.kernel_size, params.stride, params.padding,
                                                params.dilation))
    c = (o + p - d * (k - 1) / 2) / s
    np.testing.assert_allclose(world_of(image.affine, o), world_of(in_affine, c), atol=2e-4)


def test_rotation_helper_is_a_rotation(rotation):
    r = rotation(20, -35, 50)
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.isclose(np.linalg.det(r), 1.0)
