#!/usr/bin/env python
"""Regenerate the convt3d sample data (deterministic: same bytes on every run).

Writes, next to this script:

``phantom.nii.gz``
    A 48 x 48 x 48 int16 head-like phantom made of ellipsoids with a little
    seeded noise, voxel size 1.5 x 1.5 x 2 mm, RAS+ orientation centred on the
    origin, qform and sform code 1 (scanner).
``decoder.npz``
    A one-channel ConvTranspose3d layer that upsamples x2: ``weight``
    (1, 1, 3, 3, 3), separable tent [0.5, 1, 0.5]; ``bias`` (1,); and the
    layer options the file carries itself: ``stride`` 2, ``padding`` 1,
    ``output_padding`` 1 (48 -> 96 voxels per axis).

Usage: ``python sample_data/make_sample_data.py``
"""

import io
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

HERE = Path(__file__).resolve().parent
SHAPE = (48, 48, 48)
ZOOMS = (1.5, 1.5, 2.0)
SEED = 20240604

# (centre x, y, z in [-1, 1], semi-axes a, b, c, rotation about z in degrees, intensity added)
ELLIPSOIDS = [
    ((0.0, 0.0, 0.0), (0.69, 0.92, 0.81), 0, 1000),     # skull
    ((0.0, -0.0184, 0.0), (0.6624, 0.874, 0.78), 0, -800),  # brain
    ((0.22, 0.0, 0.0), (0.11, 0.31, 0.22), -18, -150),   # ventricles
    ((-0.22, 0.0, 0.0), (0.16, 0.41, 0.28), 18, -150),
    ((0.0, 0.35, -0.15), (0.21, 0.25, 0.41), 0, 300),    # lesions and nuclei
    ((0.0, 0.1, 0.25), (0.046, 0.046, 0.05), 0, 300),
    ((-0.08, -0.605, 0.0), (0.046, 0.023, 0.05), 0, 300),
    ((0.06, -0.605, -0.1), (0.023, 0.046, 0.05), 0, 300),
]


def phantom():
    """The int16 phantom volume (X, Y, Z)."""
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    volume = np.zeros(SHAPE)
    for (cx, cy, cz), (a, b, c), angle, value in ELLIPSOIDS:
        theta = np.deg2rad(angle)
        x, y, z = grids[0] - cx, grids[1] - cy, grids[2] - cz
        xr = x * np.cos(theta) + y * np.sin(theta)
        yr = -x * np.sin(theta) + y * np.cos(theta)
        volume[(xr / a) ** 2 + (yr / b) ** 2 + (z / c) ** 2 <= 1] += value
    rng = np.random.default_rng(SEED)
    volume += rng.normal(0, 8, SHAPE) * (volume > 0)
    return np.round(volume).astype(np.int16)


def affine():
    """RAS+ voxel-to-world affine (mm) with the volume centred on the origin."""
    result = np.diag(ZOOMS + (1.0,))
    result[:3, 3] = -(np.array(SHAPE) - 1) / 2 * np.array(ZOOMS)
    return result


def write_phantom(path):
    image = nib.Nifti1Image(phantom(), affine())
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine(), code=1)
    image.set_sform(affine(), code=1)
    image.header["descrip"] = b"convt3d sample phantom"
    nib.save(image, str(path))


def write_npz(path, arrays):
    """Like ``np.savez`` but with fixed zip timestamps, so the bytes are reproducible."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.asarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue())


def write_decoder(path):
    tent = np.array([0.5, 1.0, 0.5])
    weight = np.einsum("i,j,k->ijk", tent, tent, tent).astype(np.float32)[None, None]
    write_npz(path, {
        "weight": weight,
        "bias": np.zeros(1, dtype=np.float32),
        "stride": np.array([2, 2, 2]),
        "padding": np.array([1, 1, 1]),
        "output_padding": np.array([1, 1, 1]),
    })


if __name__ == "__main__":
    write_phantom(HERE / "phantom.nii.gz")
    write_decoder(HERE / "decoder.npz")
    for name in ("phantom.nii.gz", "decoder.npz"):
        print(f"{HERE / name} ({(HERE / name).stat().st_size} bytes)")
