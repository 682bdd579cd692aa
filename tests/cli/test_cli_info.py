"""``convt3d info`` for every format, as text and as JSON."""

import json

import pytest


@pytest.mark.parametrize("spec", ["vol.nii.gz", "two.nii", "vol.npy", "vols.npz", "vols.npz:volume",
                                  "scan.h5", "scan.h5:/scan/data", "w12.npz"])
def test_info_text_and_json(convt3d, spec):
    text = convt3d.ok("info", spec)
    assert text.stdout.strip() and text.stderr == ""
    report = json.loads(convt3d.ok("info", spec, "--json").stdout)
    assert isinstance(report, dict) and report


def test_info_nifti_shows_affine_zooms_and_codes(convt3d):
    out = convt3d.ok("info", "vol.nii.gz").stdout
    assert "(8, 7, 6)" in out and "int16" in out
    for word in ("affine", "zooms", "qform", "sform"):
        assert word in out.lower()
    assert "1.5" in out and "-30" in out


def test_info_hdf5_lists_the_datasets(convt3d):
    out = convt3d.ok("info", "scan.h5").stdout
    assert "scan/data" in out and "scan/mask" in out


def test_info_npz_lists_the_arrays(convt3d):
    out = convt3d.ok("info", "vols.npz").stdout
    assert "volume" in out and "mask" in out


def test_info_missing_file(convt3d):
    convt3d.fails("info", "missing.nii.gz", code=1)
