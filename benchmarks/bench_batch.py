"""Batch benchmark: what ``convt3d batch`` costs beyond the computation itself.

Usage::

    python benchmarks/bench_batch.py [--files 100] [--size 24] [--jobs 1,2] [--kernel linear] [--stride 2]

Writes ``--files`` small int16 ``.nii.gz`` volumes (``--size``³) in a temporary
folder, then times whole processes (wall clock, start-up included):

- ``convt3d batch`` over every file, once per ``--jobs`` value;
- ``convt3d run`` on one file (what a shell loop would pay per file).

The compute time per file is the ``seconds`` of the ``--json`` reports (read,
compute, write inside ``pipeline.run_file``). The table shows, per file, the
batch's wall time, the mean compute time and the overhead between the two
(process start, worker start-up, Numba cache loading, scheduling), next to one
``convt3d run`` process. Nothing here is a pass/fail test: timings on shared
machines are noisy. The Numba cache is warmed first so that no row pays
for compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np


def convt3d_command():
    """The ``convt3d`` console script next to this Python, else ``python -m convt3d_cli``."""
    script = os.path.join(os.path.dirname(sys.executable), "convt3d")
    return [script] if os.path.exists(script) else [sys.executable, "-m", "convt3d_cli"]


def make_volumes(folder, count, size):
    """``count`` random int16 volumes ``size``³ as ``scan000.nii.gz`` ...; return their paths."""
    import nibabel as nib

    rng = np.random.default_rng(0)
    affine = np.diag([1.0, 1.0, 1.2, 1.0])
    paths = []
    for i in range(count):
        path = os.path.join(folder, f"scan{i:03d}.nii.gz")
        data = rng.integers(0, 1000, size=(size,) * 3).astype(np.int16)
        nib.save(nib.Nifti1Image(data, affine), path)
        paths.append(path)
    return paths


def timed(argv, cwd):
    """Run a command; return ``(wall seconds, stdout)``; fail loudly on a non-zero exit."""
    started = time.perf_counter()
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:3])} ... failed ({proc.returncode}):\n{proc.stderr}")
    return wall, proc.stdout


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=100)
    parser.add_argument("--size", type=int, default=24)
    parser.add_argument("--jobs", default="1,2", help="comma-separated --jobs values")
    parser.add_argument("--kernel", default="linear", choices=("nearest", "linear"))
    parser.add_argument("--stride", type=int, default=2)
    args = parser.parse_args(argv)
    layer = ["--kernel", args.kernel, "--stride", str(args.stride)]
    cmd = convt3d_command()

    work = tempfile.mkdtemp(prefix="convt3d-bench-batch-")
    try:
        paths = make_volumes(work, args.files, args.size)
        # Warm the Numba cache (and the OS file cache) so no row pays for compilation.
        timed(cmd + ["run", paths[0], os.path.join(work, "warm.nii.gz"), *layer, "-q"], work)

        rows = []
        for jobs in (int(j) for j in args.jobs.split(",")):
            out = os.path.join(work, f"out-j{jobs}")
            wall, stdout = timed(cmd + ["batch", *paths, "--out-dir", out, "--jobs", str(jobs), "--json",
                                        "-q", *layer], work)
            reports = [json.loads(line) for line in stdout.splitlines()]
            assert len(reports) == args.files and all(r["status"] == "ok" for r in reports)
            seconds = sorted(r["seconds"] for r in reports)
            rows.append((f"batch --jobs {jobs}", jobs, wall, args.files, sum(seconds),
                         seconds[len(seconds) // 2]))

        single_out = os.path.join(work, "single.nii.gz")
        wall, stdout = timed(cmd + ["run", paths[1], single_out, *layer, "--json", "-q"], work)
        compute = json.loads(stdout)["seconds"]
        rows.append(("run (one file)", 1, wall, 1, compute, compute))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    run_wall = rows[-1][2]
    print(f"{args.files} files, {args.size}^3 int16 .nii.gz -> {args.size * args.stride}^3 float32, "
          f"--kernel {args.kernel} --stride {args.stride}, {os.cpu_count()} CPUs")
    print(f"{'command':<16} {'wall s':>7} {'wall/file s':>12} {'compute/file s':>15} {'median s':>9} "
          f"{'overhead/file s':>16} {'wall/file vs run':>17}")
    for name, jobs, wall, files, compute, median in rows:
        # Overhead: wall time beyond the reports' compute time spread perfectly over the jobs
        # (start-up, worker spawn and Numba cache loading, scheduling, result passing).
        overhead = (wall - compute / jobs) / files
        print(f"{name:<16} {wall:7.2f} {wall / files:12.4f} {compute / files:15.4f} {median:9.4f} "
              f"{overhead:16.4f} {wall / files / run_wall:17.1%}")
    print("compute = the report's 'seconds' (read + compute + write inside run_file); the first file of "
          "each process also loads Numba and its cached kernels, which the median leaves out.")


if __name__ == "__main__":
    main()
