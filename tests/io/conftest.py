"""Fixtures for the file-layer tests: NIfTI files written byte by byte, test affines.

NIfTI inputs are assembled here from a nibabel *header* plus raw bytes rather
than with ``nibabel.save``, so that the tests control exactly what is on disk
(byte order, scl_slope/scl_inter, codes) independently of nibabel's writer.
"""

import gzip
import io as _bytes_io
import os

import nibabel as nib
import numpy as np
import pytest


def rotation(ax, ay, az):
    """Rotation matrix from three angles in degrees (x, then y, then z)."""
    ax, ay, az = np.radians([ax, ay, az])
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def oblique_affine(zooms=(0.8, 1.25, 2.5), angles=(20.0, -35.0, 50.0), shift=(-91.5, 12.25, 40.0)):
    """A rotated, anisotropic, shifted voxel-to-world affine."""
    affine = np.eye(4)
    affine[:3, :3] = rotation(*angles) @ np.diag(zooms)
    affine[:3, 3] = shift
    return affine


def write_nifti(path, raw, affine, *, version=1, endian="<", slope=None, inter=0.0,
                sform_code=4, qform_code=1, units=("mm", "sec"), time_zoom=None, qform_affine=None):
    """Write ``raw`` (X, Y, Z[, ...]) as a single-file NIfTI, assembling the bytes ourselves.

    ``slope``/``inter`` go into scl_slope/scl_inter untouched (nibabel's writer
    would recompute them). ``qform_affine`` lets the qform differ from the sform.
    """
    path = os.fspath(path)
    header_class = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    header = header_class(endianness=endian)
    header.set_data_dtype(raw.dtype)
    header.set_data_shape(raw.shape)
    header.set_sform(affine, code=sform_code)
    header.set_qform(affine if qform_affine is None else qform_affine, code=qform_code)
    header.set_xyzt_units(*units)
    if time_zoom is not None:
        zooms = list(header.get_zooms())
        zooms[3] = time_zoom
        header.set_zooms(zooms)
    if slope is not None:
        header["scl_slope"] = slope
        header["scl_inter"] = inter
    offset = header_class.sizeof_hdr + 4  # header + 4-byte "no extensions" flag
    header.set_data_offset(offset)
    buffer = _bytes_io.BytesIO()
    header.write_to(buffer)
    head = buffer.getvalue().ljust(offset, b"\0")
    body = np.asarray(raw, dtype=raw.dtype.newbyteorder(endian)).tobytes(order="F")
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as handle:
        handle.write(head + body)
    return path


@pytest.fixture
def make_nifti():
    return write_nifti


@pytest.fixture
def affine():
    return oblique_affine()


@pytest.fixture
def make_affine():
    return oblique_affine


@pytest.fixture(name="rotation")
def rotation_fixture():
    return rotation


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def identity_params():
    from convt3d_cli.geometry import LayerParams

    return LayerParams.create(1)


def folder_listing(folder):
    """All names in a folder, hidden ones included."""
    return sorted(os.listdir(folder))


@pytest.fixture
def listing():
    return folder_listing
