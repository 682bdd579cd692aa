"""Output names (suffix, format, double extensions, PATH:KEY) and collisions refused before any work."""

import os

import numpy as np
import pytest

from convt3d_cli.batch import CollisionError, output_name, plan_outputs


@pytest.mark.parametrize("spec, suffix, fmt, expected", [
    ("sub01.nii.gz", "", None, "sub01.nii.gz"),
    ("sub01.nii.gz", "_x2", None, "sub01_x2.nii.gz"),          # before the whole double extension
    ("data/sub01.NII.GZ", "_x2", None, "sub01_x2.NII.GZ"),     # the user's spelling is kept
    ("sub01.nii.gz", "_x2", "h5", "sub01_x2.h5"),
    ("sub01.nii", "", "nii.gz", "sub01.nii.gz"),
    ("a.b.nii.gz", "-up", None, "a.b-up.nii.gz"),
    ("scan.h5:/scan/data", "", None, "scan.h5"),               # PATH:KEY -> the path's name
    ("vols.npz:volume", "_x2", "npy", "vols_x2.npy"),
    ("vol.hdf5", "", None, "vol.hdf5"),
    ("odd.mgz", "_x2", None, "odd_x2.mgz"),                    # unsupported: named anyway, fails when read
])
def test_output_name(spec, suffix, fmt, expected):
    assert output_name(spec, suffix=suffix, format=fmt) == expected


def test_plan_outputs_refuses_collisions_and_overwriting_an_input(tmp_path):
    assert plan_outputs(["a/x.nii.gz", "b/y.nii.gz"], "out") == [os.path.join("out", "x.nii.gz"),
                                                                  os.path.join("out", "y.nii.gz")]
    with pytest.raises(CollisionError, match="a/x.nii.gz and b/x.nii.gz would both be written to"):
        plan_outputs(["a/x.nii.gz", "b/x.nii.gz"], "out")
    with pytest.raises(CollisionError, match="both"):
        plan_outputs(["x.h5:/a", "x.h5:/b"], "out")
    with pytest.raises(CollisionError, match="would replace the input"):
        plan_outputs(["x.nii.gz", "x_x2.nii.gz"], ".", suffix="_x2")
    with pytest.raises(CollisionError, match="would replace the input w.npy"):
        plan_outputs(["w.nii.gz"], ".", format="npy", protected=["w.npy"])


def test_suffix_and_format_name_the_outputs(kit, batch, scans):
    result = batch("scans/sub01.nii.gz", "scans/sub04.nii", "--out-dir", "out", "--suffix", "_x2")
    assert result.exit_code == 0, result.stderr
    assert sorted(kit.digests(batch.cwd / "out")) == ["sub01_x2.nii.gz", "sub04_x2.nii"]
    assert "ok scans/sub01.nii.gz -> out/sub01_x2.nii.gz (" in result.stderr

    result = batch("scans/sub01.nii.gz", "scans/sub02.nii.gz", "--out-dir", "arrays", "--format", "npy")
    assert result.exit_code == 0, result.stderr
    assert sorted(kit.digests(batch.cwd / "arrays")) == ["sub01.npy", "sub02.npy"]
    assert np.load(batch.cwd / "arrays" / "sub01.npy").shape == (12, 12, 10)


def test_missing_out_dir_is_created_with_its_parents(batch, scans):
    result = batch("scans/sub01.nii.gz", "--out-dir", "new/deeper")
    assert result.exit_code == 0, result.stderr
    assert (batch.cwd / "new" / "deeper" / "sub01.nii.gz").is_file()


def test_out_dir_that_is_a_file_fails_cleanly(batch, scans):
    (batch.cwd / "taken").write_text("")
    result = batch("scans/sub01.nii.gz", "--out-dir", "taken")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot create the output folder taken")


@pytest.mark.parametrize("args, match", [
    (("scans/sub01.nii.gz", "scans/sub01.nii.gz"), "would both be written to out/sub01.nii.gz"),
    (("scans/sub01.nii.gz", "other/sub01.nii.gz"), "would both be written to out/sub01.nii.gz"),
    (("scans/sub01.nii.gz", "scans/sub01.nii", "--format", "nii"), "would both be written to out/sub01.nii"),
])
def test_collisions_are_refused_before_any_work(batch, scans, args, match):
    (batch.cwd / "other").mkdir()
    (batch.cwd / "other" / "sub01.nii.gz").write_bytes((scans / "sub01.nii.gz").read_bytes())
    (scans / "sub01.nii").write_bytes((scans / "sub04.nii").read_bytes())
    # A good file listed first: it must not be processed either.
    result = batch("scans/sub02.nii.gz", *args, "--out-dir", "out")
    assert result.exit_code == 1, (result.stdout, result.stderr)
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and match in errors[0], result.stderr
    assert result.stderr.count("\n") == 1 and result.stdout == ""
    assert not (batch.cwd / "out").exists()                    # nothing ran, no folder created


def test_writing_over_the_inputs_is_refused(kit, batch, scans):
    before = kit.digests(scans)
    result = batch("scans/sub01.nii.gz", "scans/sub02.nii.gz", "--out-dir", "scans", "--overwrite")
    assert result.exit_code == 1
    assert "would replace the input scans/sub01.nii.gz" in result.stderr
    assert kit.digests(scans) == before
