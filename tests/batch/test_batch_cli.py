"""``convt3d batch`` in one process: inputs, failures, resuming, JSON Lines, usage errors."""

import builtins
import functools
import os
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from convt3d_cli.cli import cli

REPO = Path(__file__).resolve().parents[2]

REPORT_KEYS = {"input_shape", "weight_shape", "output_shape", "stride", "padding", "output_padding",
               "dilation", "groups", "kernel_size", "formula", "output", "seconds", "input", "dtype"}


def test_batch_equals_run_file_by_file(kit, batch, scans, good_inputs):
    result = batch(*good_inputs, "--out-dir", "out")
    assert result.exit_code == 0, result.stderr
    assert kit.summary(result.stderr) == (4, 0, 0)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == \
        [f"ok scans/{name} -> out/{name}" for name in kit.GOOD]     # one line per file, in order with -j 1
    # Each output is what `convt3d run` writes for that file.
    single = batch.runner.invoke(cli,
                                 ["run", str(scans / kit.GOOD[0]), str(batch.cwd / "single.nii.gz"),
                                  "--kernel", "linear", "--stride", "2", "-q"])
    assert single.exit_code == 0, single.stderr
    assert (batch.cwd / "single.nii.gz").read_bytes() == (batch.cwd / "out" / kit.GOOD[0]).read_bytes()
    image = nib.load(str(batch.cwd / "out" / kit.GOOD[1]))
    assert image.shape == (16, 14, 12)
    np.testing.assert_allclose(image.header.get_zooms(), (1.0, 1.0, 1.5))


def test_a_corrupt_file_fails_alone(kit, batch, scans, good_inputs):
    inputs = good_inputs[:2] + [f"scans/{kit.CORRUPT}", "scans/missing.nii.gz"] + good_inputs[2:]
    result = batch(*inputs, "--out-dir", "out")
    assert result.exit_code == 1
    assert kit.summary(result.stderr) == (4, 0, 2)
    failed = [line for line in result.stderr.splitlines() if line.startswith("FAILED")]
    assert len(failed) == 2
    assert failed[0].startswith(f"FAILED scans/{kit.CORRUPT}: ") and "NIfTI" in failed[0]
    assert failed[1] == "FAILED scans/missing.nii.gz: no such file: scans/missing.nii.gz"
    assert "Traceback" not in result.stderr
    assert sorted(kit.digests(batch.cwd / "out")) == sorted(kit.GOOD)   # nothing, not even a temp file, for failures


def test_json_lines(kit, batch, scans, good_inputs):
    result = batch(good_inputs[0], f"scans/{kit.CORRUPT}", "--out-dir", "out", "--suffix", "_x2", "--json")
    assert result.exit_code == 1
    records = kit.json_lines(result.stdout)
    ok = records["scans/sub01.nii.gz"]
    assert REPORT_KEYS <= set(ok)
    assert ok["status"] == "ok" and ok["error"] is None
    assert ok["output"] == "out/sub01_x2.nii.gz"
    assert ok["output_shape"] == [1, 1, 12, 12, 10]
    assert ok["formula"][0] == "D_out = (6 - 1) * 2 - 2 * 1 + 1 * (4 - 1) + 0 + 1 = 12"
    bad = records[f"scans/{kit.CORRUPT}"]
    assert bad["status"] == "failed" and bad["output"] == "out/sub05_x2.nii.gz"
    assert kit.CORRUPT in bad["error"]
    # The human lines still go to stderr, never to stdout.
    assert "ok scans/sub01.nii.gz" in result.stderr


def test_quiet_prints_only_failures(kit, batch, scans, good_inputs):
    result = batch(good_inputs[0], f"scans/{kit.CORRUPT}", "--out-dir", "out", "-q")
    assert result.exit_code == 1
    assert result.stderr.startswith(f"FAILED scans/{kit.CORRUPT}: ")
    assert len(result.stderr.splitlines()) == 1
    result = batch(good_inputs[1], "--out-dir", "out", "-q")
    assert result.exit_code == 0 and result.stderr == "" and result.stdout == ""


def test_from_list_file_and_stdin(kit, batch, scans, good_inputs):
    (batch.cwd / "list.txt").write_text(
        "# scans of the study\n\n" + "\n".join(good_inputs[:2]) + "\n   \n  # " + good_inputs[3] + "\n")
    result = batch("--from-list", "list.txt", good_inputs[2], "--out-dir", "a")
    assert result.exit_code == 0, result.stderr
    assert sorted(kit.digests(batch.cwd / "a")) == sorted(kit.GOOD[:3])

    result = batch("--from-list", "-", "--out-dir", "b", input="\n".join(good_inputs) + "\n")
    assert result.exit_code == 0, result.stderr
    assert sorted(kit.digests(batch.cwd / "b")) == sorted(kit.GOOD)


def test_an_empty_list_is_nothing_to_do(kit, batch, scans):
    result = batch("--from-list", "-", "--out-dir", "out", input="# nothing matched\n")
    assert result.exit_code == 0
    assert kit.summary(result.stderr) == (0, 0, 0)
    assert not (batch.cwd / "out").exists()


def test_skip_existing_resumes_a_batch(kit, batch, scans, good_inputs):
    assert batch(*good_inputs, "--out-dir", "out").exit_code == 0
    out = batch.cwd / "out"
    done = kit.digests(out)
    mtime = os.stat(out / kit.GOOD[0]).st_mtime_ns
    # As if the batch had been killed: two outputs never finished, one of them left the
    # hidden temporary file of the atomic writer behind (SIGKILL gives no chance to clean up).
    (out / kit.GOOD[2]).unlink()
    (out / kit.GOOD[3]).unlink()
    leftover = out / f".{kit.GOOD[3]}.convt3d-0123456789abcdef.tmp.nii"
    leftover.write_bytes(b"half a file")

    again = batch(*good_inputs, "--out-dir", "out")
    assert again.exit_code == 1                            # without --skip-existing: outputs exist
    assert kit.summary(again.stderr) == (2, 0, 2)
    assert "exists; use --overwrite" in again.stderr
    (out / kit.GOOD[2]).unlink()
    (out / kit.GOOD[3]).unlink()

    resumed = batch(*good_inputs, "--out-dir", "out", "--skip-existing", "--json")
    assert resumed.exit_code == 0, resumed.stderr
    assert kit.summary(resumed.stderr) == (2, 2, 0)
    statuses = {k: v["status"] for k, v in kit.json_lines(resumed.stdout).items()}
    assert statuses == {good_inputs[0]: "skipped", good_inputs[1]: "skipped",
                        good_inputs[2]: "ok", good_inputs[3]: "ok"}
    assert f"skipped {good_inputs[0]}: out/{kit.GOOD[0]} exists" in resumed.stderr
    assert os.stat(out / kit.GOOD[0]).st_mtime_ns == mtime     # not recomputed
    after = kit.digests(out)
    assert {name: after[name] for name in kit.GOOD} == {name: done[name] for name in kit.GOOD}


def test_overwrite_replaces_outputs(kit, batch, scans, good_inputs):
    assert batch(good_inputs[0], "--out-dir", "out").exit_code == 0
    (batch.cwd / "out" / kit.GOOD[0]).write_bytes(b"old")
    result = batch(good_inputs[0], "--out-dir", "out", "--overwrite")
    assert result.exit_code == 0, result.stderr
    assert nib.load(str(batch.cwd / "out" / kit.GOOD[0])).shape == (12, 12, 10)


def test_an_unexpected_error_is_reported_and_the_batch_goes_on(kit, batch, scans, good_inputs, monkeypatch):
    from convt3d_cli import pipeline

    real = pipeline.run_file

    @functools.wraps(real)          # keeps the signature the batch reads its options from
    def flaky(input, output, **options):
        if "sub02" in input:
            raise RuntimeError("boom")
        return real(input, output, **options)

    monkeypatch.setattr(pipeline, "run_file", flaky)
    result = batch(*good_inputs, "--out-dir", "out")
    assert result.exit_code == 1
    assert f"FAILED {good_inputs[1]}: unexpected RuntimeError: boom" in result.stderr.splitlines()
    assert kit.summary(result.stderr) == (3, 0, 1)
    assert "Traceback" not in result.stderr
    # --debug (before the command) adds the traceback of such a bug.
    previous = os.getcwd()
    os.chdir(batch.cwd)
    try:
        debug = batch.runner.invoke(cli,
                                    ["--debug", "batch", good_inputs[1], "--out-dir", "dbg",
                                     "--kernel", "linear", "--stride", "2"])
    finally:
        os.chdir(previous)
    assert debug.exit_code == 1 and "Traceback" in debug.stderr and "RuntimeError: boom" in debug.stderr


@pytest.mark.parametrize("args, match", [
    (("--out-dir", "out"), "give INPUT files or --from-list"),
    (("scans/sub01.nii.gz",), "Missing option '--out-dir'"),
    (("scans/sub01.nii.gz", "--out-dir", "out", "--skip-existing", "--overwrite"),
     "--skip-existing and --overwrite cannot be used together"),
    (("scans/sub01.nii.gz", "--out-dir", "out", "--jobs", "2", "--scheduler", "tcp://127.0.0.1:1"),
     "--jobs is for local processes"),
    (("scans/sub01.nii.gz", "--out-dir", "out", "--jobs", "0"), "--jobs"),
    (("scans/sub01.nii.gz", "--out-dir", "out", "--suffix", "a/b"), "path separator"),
    (("scans/sub01.nii.gz", "--out-dir", "out", "--format", "tiff"), "--format"),
])
def test_usage_errors_exit_2_before_anything_runs(batch, scans, args, match):
    batch.usage_error(*args, match=match)
    batch.usage_error("scans/sub01.nii.gz", "--out-dir", "out", "--kernel", "linear", "--stride", "0",
                      match="stride must be >= 1", layer=False)


def test_layer_usage_errors(batch, scans, tmp_path):
    np.savez(tmp_path / "w.npz", weight=np.ones((1, 1, 2, 2, 2), dtype=np.float32))
    batch.usage_error("scans/sub01.nii.gz", "--out-dir", "out", match="give the layer with", layer=False)
    batch.usage_error("scans/sub01.nii.gz", "--out-dir", "out", "--weights", "w.npz",
                      match="--weights and --kernel cannot be used together")
    batch.usage_error("scans/sub01.nii.gz", "--out-dir", "out", "--weights", "w.npz", "--stride", "2",
                      "--output-padding", "3", match="output_padding must be smaller", layer=False)


def test_a_missing_weights_file_fails_once_before_any_work(batch, scans, good_inputs):
    result = batch(*good_inputs, "--out-dir", "out", "--weights", "nowhere.npz", layer=False)
    assert result.exit_code == 1
    assert result.stderr == "Error: no such file: nowhere.npz\n"
    assert not (batch.cwd / "out").exists()


def test_weights_file_batch(kit, batch, scans, good_inputs, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "w.npz", weight=rng.standard_normal((1, 2, 3, 3, 3)).astype(np.float32),
             bias=np.array([0.5, -1.0], dtype=np.float32), stride=np.array([2, 2, 2]))
    result = batch(*good_inputs[:2], "--out-dir", "out", "--weights", "w.npz", "--format", "h5", "--json",
                   layer=False)
    assert result.exit_code == 0, result.stderr
    record = kit.json_lines(result.stdout)[good_inputs[0]]
    assert record["weights"] == "w.npz:weight" and record["bias"] == "w.npz:bias"
    assert record["output_shape"] == [1, 2, 13, 13, 11]


def test_scheduler_without_dask_gives_the_install_hint(batch, scans, monkeypatch):
    real_import = builtins.__import__

    def no_dask(name, *args, **kwargs):
        if name == "distributed" or name.startswith(("distributed.", "dask")):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_dask)
    result = batch.usage_error("scans/sub01.nii.gz", "--out-dir", "out", "--scheduler", "tcp://127.0.0.1:8786",
                               match='pip install "convt3d[distributed]"')
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("Error: --scheduler needs Dask")


def test_help_imports_neither_dask_nor_numpy_nor_numba():
    code = ("import sys\nfrom convt3d_cli.cli import cli\n"
            "try:\n    cli.main(['batch', '--help'], prog_name='convt3d')\nexcept SystemExit:\n    pass\n"
            "heavy = ('dask', 'distributed', 'numpy', 'numba', 'convt3d_cli.batch')\n"
            "print([m for m in heavy if m in sys.modules], file=sys.stderr)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "[]"
    assert "--skip-existing" in proc.stdout and "--scheduler" in proc.stdout


def test_ctrl_c_stops_with_a_resume_hint(kit, batch, scans, good_inputs, monkeypatch):
    from convt3d_cli import pipeline

    real = pipeline.run_file

    @functools.wraps(real)
    def interrupted(input, output, **options):
        if "sub03" in input:
            raise KeyboardInterrupt
        return real(input, output, **options)

    monkeypatch.setattr(pipeline, "run_file", interrupted)
    result = batch(*good_inputs, "--out-dir", "out")
    assert result.exit_code == 130
    assert re.fullmatch(r"Error: interrupted after 2 done, 0 skipped, 0 failed in \d+\.\d s; "
                        r"rerun with --skip-existing to resume", result.stderr.splitlines()[-1]), result.stderr
    assert sorted(kit.digests(batch.cwd / "out")) == sorted(kit.GOOD[:2])
