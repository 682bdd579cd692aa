"""The installed entry points: the ``convt3d`` console script and ``python -m convt3d_cli``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import console_script


def _console_script():
    return console_script()


def test_console_script_runs_on_the_sample_data(tmp_path, sample_data):
    import nibabel as nib

    output = tmp_path / "phantom_x2.nii.gz"
    proc = subprocess.run([str(_console_script()), "run", str(sample_data / "phantom.nii.gz"), str(output),
                           "--weights", str(sample_data / "decoder.npz"), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["output_shape"] == [1, 1, 96, 96, 96]
    assert "D_out = (48 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 1 + 1 = 96" in proc.stderr.splitlines()
    image = nib.load(str(output))
    assert image.shape == (96, 96, 96)
    np.testing.assert_allclose(image.header.get_zooms()[:3], (0.75, 0.75, 1.0))


def test_python_dash_m(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-m", "convt3d_cli", "shape", "--input-shape", "1,1,4,4,4",
                           "--out-channels", "1", "--kernel-size", "2", "--stride", "2"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "D_out = (4 - 1) * 2 - 2 * 0 + 1 * (2 - 1) + 0 + 1 = 8" in proc.stdout


def test_importing_the_cli_stays_light():
    # `convt3d --help` must start instantly: no Numba, nibabel, h5py or engine at import.
    code = ("import sys, convt3d_cli.cli; heavy = ('numba', 'nibabel', 'h5py', 'convt3d_cli.engine', "
            "'convt3d_cli.io'); print([m for m in heavy if m in sys.modules])")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_progress_bar_only_on_a_terminal_after_a_moment(monkeypatch):
    import io

    from convt3d_cli import cli

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    assert cli._Progress(enabled=True).callback is None          # pytest's stderr is no terminal
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert cli._Progress(enabled=False).callback is None         # -q
    quick = cli._Progress(enabled=True)
    quick(1, 4)
    quick.close()
    assert sys.stderr.getvalue() == ""                           # too early to bother
    monkeypatch.setattr(cli, "PROGRESS_DELAY", 0.0)
    slow = cli._Progress(enabled=True)
    for done in range(1, 5):
        slow.callback(done, 4)
    slow.close()
    assert "100%" in sys.stderr.getvalue()


def test_closed_pipe_is_quiet(sample_data):
    """`convt3d info x | head -1`: no `Error:` line and no traceback when the reader leaves."""
    proc = subprocess.Popen([str(_console_script()), "info", str(sample_data / "phantom.nii.gz")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.readline()
    proc.stdout.close()
    stderr = proc.stderr.read().decode()
    proc.wait(timeout=120)
    assert "Error" not in stderr and "Traceback" not in stderr
    assert proc.returncode in (0, 141)
