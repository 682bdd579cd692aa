"""PATH[:KEY] addressing, suffix dispatch and missing files."""

import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import FileFormatError, OutputError


@pytest.mark.parametrize("spec, expected", [
    ("vol.h5", ("vol.h5", None)),
    ("vol.h5:/scan/data", ("vol.h5", "/scan/data")),
    ("vol.hdf5:scan/data", ("vol.hdf5", "scan/data")),
    ("x.npz:volume", ("x.npz", "volume")),
    ("brain.nii.gz", ("brain.nii.gz", None)),
    ("brain.nii.gz:x", ("brain.nii.gz", "x")),
    ("run:1/vol.h5:/k", ("run:1/vol.h5", "/k")),       # a ':' in a folder name
    ("VOL.H5:/k", ("VOL.H5", "/k")),                   # suffixes are case-insensitive
    ("vol.h5:", ("vol.h5", None)),                     # an empty key means no key
    ("a.h5:/b.h5:c", ("a.h5", "/b.h5:c")),             # the first suffix+colon splits
])
def test_split_spec(spec, expected):
    assert io.split_spec(spec) == expected


def test_split_spec_existing_file_with_colon_has_no_key(tmp_path):
    odd = tmp_path / "weird.npy:odd.npy"  # would split at the first ".npy:" if it did not exist
    with open(odd, "wb") as handle:
        np.save(handle, np.zeros((2, 2, 2)))
    assert io.split_spec(str(odd)) == (str(odd), None)
    assert io.read_volume(str(odd)).data.shape == (1, 1, 2, 2, 2)


def test_unknown_suffix_lists_supported(tmp_path):
    path = tmp_path / "vol.tif"
    path.write_bytes(b"II*\0")
    with pytest.raises(FileFormatError) as err:
        io.read_volume(str(path))
    for suffix in (".nii", ".nii.gz", ".h5", ".hdf5", ".npz", ".npy"):
        assert suffix in str(err.value)
    assert "vol.tif" in str(err.value)


@pytest.mark.parametrize("name", ["gone.nii.gz", "gone.h5", "gone.npz:volume", "gone.npy"])
def test_missing_file(tmp_path, name):
    with pytest.raises(FileFormatError, match="no such file") as err:
        io.read_volume(str(tmp_path / name))
    assert "gone." in str(err.value)


def test_folder_is_not_a_file(tmp_path):
    folder = tmp_path / "dir.npy"
    folder.mkdir()
    with pytest.raises(FileFormatError, match="folder"):
        io.probe_volume(str(folder))


def test_format_of_and_output_format():
    assert io.format_of("a.nii.gz:x") == "nifti"
    assert io.format_of("a.HDF5") == "hdf5"
    assert io.output_format("out.npz:vol") == "npz"
    with pytest.raises(OutputError, match=r"\.nii\.gz"):
        io.output_format("out.mat")


def test_import_is_cheap():
    """The CLI imports convt3d_cli.io at start-up: no h5py, nibabel or format modules."""
    import subprocess
    import sys

    code = ("import sys, convt3d_cli.io; "
            "print(sorted(m for m in ('h5py', 'nibabel', 'convt3d_cli.io.nifti', "
            "'convt3d_cli.io.hdf5', 'convt3d_cli.io.npz') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
