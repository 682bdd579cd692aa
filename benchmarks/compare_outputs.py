"""Compare ``convt3d run`` outputs of two versions of this repository, byte for byte.

A refactoring must not change behaviour. This script runs a fixed list of
``convt3d run`` invocations with two versions of the code on the same inputs
and checks that both produce the same bytes, exit codes, ``--json`` reports and
stderr reports::

    python benchmarks/compare_outputs.py --ref REV [--new PATH_OR_REV] [--keep DIR]
                                         [--numba-cache DIR]

Parameters
----------
--ref REV
    The reference: a git revision of this repository (``bcefc87``, ``HEAD~5``,
    a branch). It is checked out as a detached temporary ``git worktree`` and
    removed at the end.
--new PATH_OR_REV
    The version under test. An existing folder is used as it is (a working
    tree holding ``convt3d_cli/``); anything else is taken as a revision and
    checked out like ``--ref``. Default: the working tree of the repository
    this script lives in, uncommitted changes included.
--keep DIR
    Keep the inputs, both sides' outputs and every run's stdout and stderr in
    DIR (new or empty) instead of a temporary folder.
--numba-cache DIR
    Keep the compiled Numba kernels in DIR (outside the repository) between
    invocations. By default each side gets a fresh ``NUMBA_CACHE_DIR`` in the
    temporary folder, so every invocation compiles the kernels it uses once per
    side (the whole script took 2-4 minutes on the 2-core development VM).
    With this option the worktrees are made at fixed paths under DIR with their
    files' modification times set to the commit time, which is what Numba's
    cache keys on, so later invocations with the same revisions (and an
    unchanged ``--new`` folder) start warm (45 s to 1.5 minutes there).

How it works
------------
Each side runs as ``python -m convt3d_cli run INPUT OUTPUT ... --json`` in a
subprocess with ``PYTHONPATH`` set to that side's tree (the installed package
does not matter; the script checks that ``convt3d_cli`` is found there), its
own ``NUMBA_CACHE_DIR``, ``PYTHONDONTWRITEBYTECODE=1`` (nothing is written into
the trees), in its own folder per run, with the output named relative to that
folder. Both sides read the very same input files, so paths in the reports and
in HDF5 ``source`` attributes are equal when behaviour is. The two sides run
at the same time, each side's runs one after the other (its first run fills
its Numba cache for the others).

The inputs are made here with a fixed seed: a one-channel int16 NIfTI as
``.nii`` and as ``.nii.gz`` (rotated affine, qform code 1, sform code 4, time
units; the ``.nii.gz`` with ``scl_slope``/``scl_inter``), a four-channel
float32 ``.nii.gz`` ``(X, Y, Z, C)`` with a time zoom, ``.npy``/``.npz``/HDF5
volumes of rank 3, 4 and 5 (the rank-5 one with N = 2, read as
``r5.h5:/scan/data``), an HDF5 volume with a
``spacing`` attribute, and three weights files in npz: a 1 -> 2 layer with a
bias and stored ``stride``/``padding``/``output_padding`` arrays, a grouped
MegEngine-layout 4 -> 6 layer with a stored stride, and a 4 -> 3
``decoder.weight``/``decoder.bias`` pair addressed as ``PATH:KEY``.

:data:`CASES` covers every output format (``.nii``, ``.nii.gz``, ``.h5`` and
``.hdf5``, ``.npz``, ``.npy``) from every input format with ``--kernel nearest``,
``--kernel linear``, user weights, ``--dtype float64`` and multi-channel
outputs; each case runs whole (the default budget: one slab, checked) and
streamed (a small ``--max-memory``: several slabs, checked in the ``--json``
report). :data:`FAILING` adds runs that must fail, to compare exit codes and
error messages.

What is compared, per run:

- the exit code, and the set of files left in the run's folder;
- the output file's bytes. ``.npz``: when the files differ (zip headers may
  carry timestamps), the member names in order, their compression and each
  member's bytes. HDF5: when the files differ (HDF5 may record times or place
  objects differently), the
  whole tree: groups, datasets with shape, dtype, chunks, filters, fill value
  and raw data bytes, and every attribute (name, dtype, shape, value). The
  line says which level matched;
- the ``--json`` report without ``seconds`` and ``peak_memory_bytes``. Paths
  stay in: both sides name the same input files and the output relative to
  their run folder, so they are equal unless the way paths are reported
  changed (a run folder's absolute path is replaced by a placeholder);
- the stderr report, except progress lines and the time in
  ``wrote ... in X s``.

Output: one line per run (``same (how)`` or ``DIFFERENT: reasons``; ``BAD RUN``
when the reference itself did not do what the run is there to test, e.g. a
streamed run that used one slab), then a summary. Exit status: 0 when every run
is the same, 1 otherwise, 2 for a bad revision or folder (nothing is run).
Needs only NumPy, nibabel, h5py and the standard library (and whatever the two
trees themselves import).

Examples
--------
Check the working tree against the commit before a refactoring::

    python benchmarks/compare_outputs.py --ref bcefc87

Check the harness on one revision against itself (must print only ``same``)::

    python benchmarks/compare_outputs.py --ref bcefc87 --new bcefc87
"""

from __future__ import annotations

import argparse
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
import zlib
from dataclasses import dataclass, field

import h5py
import nibabel as nib
import numpy as np

SEED = 20261125
#: Seconds one run may take (a cold Numba cache compiles kernels for minutes).
RUN_TIMEOUT = 1800
#: JSON report fields that change from run to run.
VOLATILE = ("seconds", "peak_memory_bytes")
#: --max-memory of the streamed variants. About 8 MiB of it is a fixed allowance, so the
#: inputs stay small and every case (some with their own budget) needs 3-21 slabs.
STREAM = "8.4M"

# --------------------------------------------------------------------------- the runs


@dataclass(frozen=True)
class Case:
    """One ``convt3d run`` configuration, run whole and streamed."""

    name: str
    input: str            # file in the inputs folder, optionally ``:KEY``
    suffix: str           # output suffix, picks the format
    options: tuple        # layer and dtype options
    stream: str = STREAM  # --max-memory of the streamed variant


W_BIAS = ("--weights", "@w_bias.npz")                       # 1 -> 2, k3, stored s=2,2,1 p=1,1,0 op=1,0,0
W_GROUP = ("--weights", "@w_group.npz")                     # (2, 2, 3, 2, 2, 2): 4 -> 6, groups 2, stored s=2
W_MULTI = ("--weights", "@w_multi.npz:decoder.weight",      # 4 -> 3 with decoder.bias, k3
           "--stride", "2", "--padding", "1", "--output-padding", "1")
NEAREST = ("--kernel", "nearest", "--stride", "2")
LINEAR = ("--kernel", "linear", "--stride", "2")
F64 = ("--dtype", "float64")

CASES = (
    Case("t1-nii.nearest.nii", "t1.nii", ".nii", NEAREST),
    Case("t1-nii.linear.nii.gz", "t1.nii", ".nii.gz", LINEAR),
    Case("t1s-niigz.linear.nii.gz", "t1s.nii.gz", ".nii.gz", LINEAR + ("--compress-level", "2")),
    Case("t1s-niigz.nearest.h5", "t1s.nii.gz", ".h5", NEAREST),
    Case("t1-nii.weights-1to2.npz", "t1.nii", ".npz", W_BIAS),
    Case("r3-npy.linear.npy", "r3.npy", ".npy", LINEAR),
    Case("r3-npy.weights-1to2.f64.nii", "r3.npy", ".nii", W_BIAS + F64),
    Case("r4-npz.weights-4to3.npz", "r4.npz", ".npz", W_MULTI),
    Case("r4-npz.grouped-4to6.nii.gz", "r4.npz", ".nii.gz", W_GROUP),
    Case("r4-npz.nearest.f64.h5", "r4.npz", ".h5", NEAREST + F64),
    Case("r5n2-h5.linear.h5", "r5.h5:/scan/data", ".h5", LINEAR, stream="8.2M"),
    Case("r5n2-h5.weights-1to2.f64.npy", "r5.h5:/scan/data", ".npy", W_BIAS + F64),
    Case("spaced-h5.linear-s3.f64.hdf5", "spaced.h5", ".hdf5", ("--kernel", "linear", "--stride", "3") + F64,
         stream="8.5M"),
    Case("spaced-h5.weights-nobias.nii.gz", "spaced.h5", ".nii.gz", W_BIAS + ("--no-bias",), stream="8.2M"),
    Case("m4-niigz.weights-4to3.nii", "m4.nii.gz", ".nii", W_MULTI),
    Case("m4-niigz.linear.f64.npz", "m4.nii.gz", ".npz", LINEAR + F64, stream="8.5M"),
)


@dataclass(frozen=True)
class Run:
    """One subprocess per side."""

    name: str
    input: str
    output: str
    options: tuple
    exit_code: int = 0          # what the reference must return
    slabs: str | None = None    # "one" or "several" (checked on the reference)


def all_runs():
    """The fixed list: every case whole and streamed, then the runs that must fail."""
    runs = []
    for case in CASES:
        stem = case.name[: -len(case.suffix)]
        runs.append(Run(f"{stem}.whole{case.suffix}", case.input, f"{stem}.whole{case.suffix}",
                        case.options, slabs="one"))
        runs.append(Run(f"{stem}.streamed{case.suffix}", case.input, f"{stem}.streamed{case.suffix}",
                        case.options + ("--max-memory", case.stream), slabs="several"))
    runs += FAILING
    return runs


FAILING = (
    # 1-channel input, 4-input-channel weights.
    Run("fail.channels", "t1.nii", "fail.channels.nii", W_MULTI, exit_code=1),
    # A batch of two volumes cannot be a NIfTI file.
    Run("fail.batch-to-nifti", "r5.h5:/scan/data", "fail.batch.nii", LINEAR, exit_code=1),
    # A budget below the smallest slab.
    Run("fail.max-memory", "t1.nii", "fail.mem.npy", LINEAR + ("--max-memory", "1M"), exit_code=1),
    # Usage: --kernel without --stride.
    Run("fail.usage", "t1.nii", "fail.usage.npy", ("--kernel", "linear"), exit_code=2),
)

# --------------------------------------------------------------------------- inputs


def _smooth_volume(rng, shape):
    """Smooth blobs plus noise: values that exercise every tap, deterministic for a seed."""
    grids = np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")
    volume = np.zeros(shape)
    for _ in range(4):
        centre = rng.uniform(-0.6, 0.6, size=3)
        width = rng.uniform(0.2, 0.5)
        volume += rng.uniform(0.5, 1.5) * np.exp(-sum((g - c) ** 2 for g, c in zip(grids, centre)) / width ** 2)
    return volume + 0.05 * rng.standard_normal(shape)


def _rotation_z(degrees):
    t = np.deg2rad(degrees)
    rot = np.eye(4)
    rot[:2, :2] = [[np.cos(t), -np.sin(t)], [np.sin(t), np.cos(t)]]
    return rot


def _write_nifti(path, data, *, qform=None, qcode=0, sform=None, scode=0, zooms=None, slope=None,
                 inter=None, descrip=b"convt3d compare_outputs input"):
    """A single-file NIfTI-1 written field by field (nibabel would reset the scaling on save).

    ``.nii.gz`` is written with ``mtime=0`` and no file name, so the input bytes do
    not depend on the day either.
    """
    header = nib.Nifti1Header()
    header.set_data_shape(data.shape)
    header.set_data_dtype(data.dtype)
    if qform is not None:
        header.set_qform(qform, code=qcode)
    if sform is not None:
        header.set_sform(sform, code=scode)
    if zooms is not None:
        header.set_zooms(zooms)
    header.set_xyzt_units("mm", "sec")
    if slope is not None:
        header["scl_slope"] = slope
        header["scl_inter"] = inter
    header["descrip"] = descrip
    header.set_data_offset(352)
    raw = io.BytesIO()
    header.write_to(raw)
    raw.write(b"\0" * (352 - raw.tell()))
    raw.write(np.asarray(data).tobytes(order="F"))
    if path.endswith(".gz"):
        with open(path, "wb") as handle, gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0) as gz:
            gz.write(raw.getvalue())
    else:
        with open(path, "wb") as handle:
            handle.write(raw.getvalue())


def make_inputs(folder):
    """Write every input and weights file into ``folder`` (fixed seed, about 1 MB in all)."""
    rng = np.random.default_rng(SEED)

    # One-channel int16 NIfTI, .nii without scaling, .nii.gz with scl_slope/scl_inter.
    t1 = np.round(_smooth_volume(rng, (40, 36, 32)) * 900 - 300).astype(np.int16)
    zooms = np.diag([1.2, 0.9, 2.5, 1.0])
    qform = _rotation_z(12.0) @ zooms
    qform[:3, 3] = [-31.5, 22.25, -18.0]
    sform = qform.copy()
    sform[:3, 3] += [1.5, -2.0, 0.75]
    common = dict(qform=qform, qcode=1, sform=sform, scode=4)
    _write_nifti(os.path.join(folder, "t1.nii"), t1, **common)
    _write_nifti(os.path.join(folder, "t1s.nii.gz"), t1, slope=0.5, inter=10.0, **common)

    # Four-channel float32 NIfTI (X, Y, Z, C), sform only, with a 4th (time) zoom.
    m4 = np.stack([_smooth_volume(rng, (24, 22, 20)) for _ in range(4)], axis=-1).astype(np.float32)
    affine = np.diag([0.8, 0.8, 1.5, 1.0])
    affine[:3, 3] = [-9.6, -8.8, -15.0]
    _write_nifti(os.path.join(folder, "m4.nii.gz"), m4, sform=affine, scode=1, zooms=(0.8, 0.8, 1.5, 2.0))

    # Arrays of rank 3 (npy, float64), 4 (npz with an extra member), 5 (HDF5, N = 2).
    np.save(os.path.join(folder, "r3.npy"), _smooth_volume(rng, (32, 28, 24)))
    r4 = np.stack([_smooth_volume(rng, (20, 18, 16)) for _ in range(4)]).astype(np.float32)
    mask = (r4[0] > r4[0].mean()).astype(np.uint8)
    np.savez(os.path.join(folder, "r4.npz"), volume=r4, mask=mask)
    r5 = np.stack([_smooth_volume(rng, (24, 20, 16)) for _ in range(2)])[:, None].astype(np.float32)
    with h5py.File(os.path.join(folder, "r5.h5"), "w") as handle:
        handle.create_dataset("/scan/data", data=r5, chunks=(1, 1, 4, 20, 16))
        handle["/scan/labels"] = np.arange(3, dtype=np.int32)
        handle.attrs["subject"] = "s01"

    # HDF5 volume with a voxel size (D, H, W) that outputs must divide by the stride.
    spaced = np.round(_smooth_volume(rng, (28, 24, 20)) * 1000).astype(np.int16)
    with h5py.File(os.path.join(folder, "spaced.h5"), "w") as handle:
        dataset = handle.create_dataset("scan/volume", data=spaced)
        dataset.attrs["spacing"] = np.array([2.0, 0.9, 0.9])
        dataset.attrs["units"] = "mm"

    # Weights: 1 -> 2 with bias and stored options; grouped (MegEngine layout); 4 -> 3 pair.
    np.savez(os.path.join(folder, "w_bias.npz"),
             weight=rng.standard_normal((1, 2, 3, 3, 3)).astype(np.float32),
             bias=np.array([0.25, -1.5], dtype=np.float32),
             stride=np.array([2, 2, 1]), padding=np.array([1, 1, 0]), output_padding=np.array([1, 0, 0]))
    np.savez(os.path.join(folder, "w_group.npz"),
             weight=rng.standard_normal((2, 2, 3, 2, 2, 2)).astype(np.float32),
             stride=np.array([2, 2, 2]))
    np.savez(os.path.join(folder, "w_multi.npz"),
             **{"decoder.weight": (0.2 * rng.standard_normal((4, 3, 3, 3, 3))).astype(np.float32),
                "decoder.bias": np.array([0.5, 0.0, -0.5], dtype=np.float32)})

# --------------------------------------------------------------------------- sides


class SetupError(Exception):
    """A bad revision or folder: exit 2 before anything runs."""


def git(repo, *args, check=True):
    """Run git in ``repo``; return its stripped stdout."""
    proc = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True)
    if check and proc.returncode:
        raise SetupError(f"git {' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip() if proc.returncode == 0 else None


def resolve_revision(repo, rev, option):
    """The full commit hash of ``rev``, or :class:`SetupError`."""
    sha = git(repo, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{rev}^{{commit}}", check=False)
    if not sha:
        raise SetupError(f"{option} {rev!r} is not a revision of the repository at {repo}")
    return sha


@dataclass
class Side:
    """One version of the code: where it lives and how its processes run."""

    label: str                  # "ref" or "new"
    description: str
    tree: str
    folder: str                 # outputs and logs of this side
    numba_cache: str
    worktree: bool = False      # made by this script, removed at the end
    sha: str | None = None      # the commit of a worktree
    results: dict = field(default_factory=dict)
    done: dict = field(default_factory=dict)

    def env(self):
        env = dict(os.environ)
        env["PYTHONPATH"] = self.tree
        env["NUMBA_CACHE_DIR"] = self.numba_cache
        # Nothing written into the trees. (A PYTHONPYCACHEPREFIX would make every process
        # recompile NumPy, Numba, ... from source: seconds per run.)
        env["PYTHONDONTWRITEBYTECODE"] = "1"
        env.pop("PYTHONPYCACHEPREFIX", None)
        env.pop("PYTHONHOME", None)
        env.pop("NUMBA_DISABLE_JIT", None)
        return env


def make_worktree(repo, sha, path, stable_times):
    """A detached worktree of ``sha`` at ``path`` (replacing a stale one left there)."""
    if os.path.exists(path):
        git(repo, "worktree", "remove", "--force", path, check=False)
        shutil.rmtree(path, ignore_errors=True)
        git(repo, "worktree", "prune", check=False)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    git(repo, "worktree", "add", "--detach", "--quiet", path, sha)
    if stable_times:
        # Numba's cache index is keyed on each source file's path, mtime and size.
        stamp = int(git(repo, "show", "-s", "--format=%ct", sha))
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != ".git"]
            for name in files:
                os.utime(os.path.join(root, name), (stamp, stamp))


def remove_worktree(repo, path):
    git(repo, "worktree", "remove", "--force", path, check=False)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
    git(repo, "worktree", "prune", check=False)


def check_tree(side):
    """``convt3d_cli`` must be imported from the side's own tree, not from site-packages."""
    probe = ("import importlib.util, sys; spec = importlib.util.find_spec('convt3d_cli'); "
             "print(spec.origin if spec else '')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=side.folder, env=side.env(),
                          capture_output=True, text=True)
    origin = proc.stdout.strip()
    expected = os.path.join(os.path.realpath(side.tree), "convt3d_cli", "__init__.py")
    if not origin or os.path.realpath(origin) != expected:
        raise SetupError(f"{side.label}: python finds convt3d_cli at {origin or 'nowhere'!r}, "
                         f"not in {side.tree}")

# --------------------------------------------------------------------------- running


@dataclass
class Outcome:
    """What one run did on one side."""

    exit_code: int | None
    stdout: str
    stderr: str
    folder: str
    files: list


def run_one(side, run, inputs):
    folder = os.path.join(side.folder, "runs", run.name)
    os.makedirs(folder)
    # "@NAME" in the options is a file of the inputs folder.
    options = [os.path.join(inputs, a[1:]) if a.startswith("@") else a for a in run.options]
    cmd = [sys.executable, "-m", "convt3d_cli", "run", os.path.join(inputs, run.input), run.output,
           *options, "--json"]
    try:
        proc = subprocess.run(cmd, cwd=folder, env=side.env(), capture_output=True,
                              timeout=RUN_TIMEOUT)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as exc:
        code, out, err = None, exc.stdout or b"", (exc.stderr or b"") + b"\n[timed out]"
    logs = os.path.join(side.folder, "logs")
    with open(os.path.join(logs, run.name + ".cmd"), "w") as handle:
        handle.write(" ".join(cmd) + "\n")
    with open(os.path.join(logs, run.name + ".stdout"), "wb") as handle:
        handle.write(out)
    with open(os.path.join(logs, run.name + ".stderr"), "wb") as handle:
        handle.write(err)
    files = sorted(os.listdir(folder))
    return Outcome(code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"), folder, files)


def run_side(side, runs, inputs):
    """Run every run of one side in order, publishing each outcome as it finishes."""
    for run in runs:
        try:
            side.results[run.name] = run_one(side, run, inputs)
        except Exception as exc:  # noqa: BLE001 - reported as the run's outcome
            side.results[run.name] = Outcome(None, "", f"[harness error: {exc!r}]", "", [])
        side.done[run.name].set()

# --------------------------------------------------------------------------- comparing


def _normalise_text(text, outcome, inputs):
    if outcome.folder:
        text = text.replace(outcome.folder + os.sep, "<run>/").replace(outcome.folder, "<run>")
    return text.replace(inputs + os.sep, "<inputs>/")


def _report(outcome, inputs):
    """The ``--json`` report without volatile fields, or the raw stdout when it is not JSON."""
    text = outcome.stdout.strip()
    if not text:
        return None, None
    try:
        report = json.loads(text)
    except ValueError:
        return None, _normalise_text(text, outcome, inputs)
    if isinstance(report, dict):
        for key in VOLATILE:
            report.pop(key, None)
    return report, json.dumps(report, sort_keys=True)


def _normalise_json(value, outcome, inputs):
    if isinstance(value, str):
        return _normalise_text(value, outcome, inputs)
    if isinstance(value, list):
        return [_normalise_json(v, outcome, inputs) for v in value]
    if isinstance(value, dict):
        return {k: _normalise_json(v, outcome, inputs) for k, v in value.items()}
    return value


_WROTE = re.compile(r"^(wrote .*) in [0-9.]+ s$")


def _stderr_lines(outcome, inputs):
    lines = []
    for line in outcome.stderr.splitlines():
        if "\r" in line or line.startswith("computing"):
            continue  # progress bar
        match = _WROTE.match(line)
        if match:
            line = match.group(1) + " in <seconds> s"
        lines.append(_normalise_text(line, outcome, inputs))
    return lines


def _short(value, limit=120):
    text = value if isinstance(value, str) else json.dumps(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_difference(a, b):
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # binary search on prefixes
    while hi - lo > 4096:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    for i in range(lo, hi):
        if a[i] != b[i]:
            return i
    return hi


def _nifti_field(offset):
    dtype = nib.Nifti1Header.template_dtype
    for name in dtype.names:
        start = dtype.fields[name][1]
        if start <= offset < start + dtype.fields[name][0].itemsize:
            return name
    return None


def _byte_reason(a, b, kind):
    """Where two byte strings differ, in words."""
    at = _first_difference(a, b)
    where = f"first difference at byte {at}"
    if kind == "nifti" and at < 348:
        where += f" (header field {_nifti_field(at)!r})"
    elif kind == "nifti" and at < 352:
        where += " (extension flag)"
    elif kind == "nifti":
        where += " (data)"
    elif kind == "npy" and a[:6] == b"\x93NUMPY":
        header = 10 + int.from_bytes(a[8:10], "little") if a[6] == 1 else 12 + int.from_bytes(a[8:12], "little")
        where += " (npy header)" if at < header else " (data)"
    sizes = f"{len(a)} vs {len(b)} bytes, " if len(a) != len(b) else ""
    return sizes + where


def compare_files(path_a, path_b):
    """``(True, how)`` when the outputs match, else ``(False, reason)``."""
    with open(path_a, "rb") as handle:
        a = handle.read()
    with open(path_b, "rb") as handle:
        b = handle.read()
    if a == b:
        return True, "bytes"
    lower = path_a.lower()
    if lower.endswith(".nii"):
        return False, "file bytes differ: " + _byte_reason(a, b, "nifti")
    if lower.endswith(".nii.gz"):
        try:
            ua, ub = gzip.decompress(a), gzip.decompress(b)
        except (OSError, EOFError, zlib.error) as exc:
            return False, f"file bytes differ; cannot decompress: {exc}"
        if ua == ub:
            return False, "compressed bytes differ (decompressed NIfTI identical)"
        return False, "file bytes differ; decompressed: " + _byte_reason(ua, ub, "nifti")
    if lower.endswith(".npy"):
        return False, "file bytes differ: " + _byte_reason(a, b, "npy")
    if lower.endswith(".npz"):
        return compare_npz(path_a, path_b)
    if lower.endswith((".h5", ".hdf5")):
        return compare_hdf5(path_a, path_b)
    return False, "file bytes differ: " + _byte_reason(a, b, None)


def compare_npz(path_a, path_b):
    """Member names, compression and bytes (the zip headers also hold timestamps)."""
    try:
        with zipfile.ZipFile(path_a) as za, zipfile.ZipFile(path_b) as zb:
            names_a, names_b = za.namelist(), zb.namelist()
            if names_a != names_b:
                return False, f"npz members differ: {names_a} vs {names_b}"
            kinds_a = [info.compress_type for info in za.infolist()]
            kinds_b = [info.compress_type for info in zb.infolist()]
            if kinds_a != kinds_b:
                return False, f"npz compression differs: {kinds_a} vs {kinds_b}"
            for name in names_a:
                ma, mb = za.read(name), zb.read(name)
                if ma != mb:
                    return False, f"npz member {name}: " + _byte_reason(ma, mb, "npy")
    except (zipfile.BadZipFile, OSError) as exc:
        return False, f"npz files differ and cannot be read: {exc}"
    return True, "npz members (zip headers differ)"


def _attr_items(obj):
    items = []
    for name in obj.attrs:
        try:
            value = obj.attrs[name]
        except (OSError, TypeError, ValueError) as exc:
            items.append((name, f"<unreadable: {exc}>"))
            continue
        array = np.asarray(value)
        if array.dtype.kind == "O":
            blob = repr([v.decode() if isinstance(v, bytes) else v for v in array.ravel().tolist()])
        else:
            blob = array.tobytes()
        items.append((name, (str(obj.attrs.get_id(name).dtype), array.shape, blob)))
    return items


def hdf5_tree(path):
    """Everything about an HDF5 file except where its bytes sit: a list of comparable entries."""
    entries = []
    with h5py.File(path, "r") as handle:
        entries.append(("/", "group", _attr_items(handle)))

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                data = obj[()]
                entries.append(("/" + name, "dataset", str(obj.dtype), obj.shape, obj.chunks,
                                obj.compression, obj.compression_opts, obj.shuffle, obj.fletcher32,
                                obj.scaleoffset, repr(obj.fillvalue),
                                np.asarray(data).tobytes() if obj.dtype.kind != "O" else repr(data),
                                _attr_items(obj)))
            elif isinstance(obj, h5py.Group):
                entries.append(("/" + name, "group", _attr_items(obj)))
            else:
                entries.append(("/" + name, type(obj).__name__))

        handle.visititems(visit)
    return entries


def compare_hdf5(path_a, path_b):
    """The whole tree, for files whose bytes differ."""
    try:
        ta, tb = hdf5_tree(path_a), hdf5_tree(path_b)
    except (OSError, ValueError) as exc:
        return False, f"HDF5 files differ and cannot be read: {exc}"
    if ta == tb:
        return True, "HDF5 tree (file bytes differ)"
    paths_a, paths_b = [e[0] for e in ta], [e[0] for e in tb]
    if paths_a != paths_b:
        return False, f"HDF5 objects differ: {paths_a} vs {paths_b}"
    labels = ("path", "kind", "dtype", "shape", "chunks", "compression", "compression_opts", "shuffle",
              "fletcher32", "scaleoffset", "fillvalue", "data", "attributes")
    for ea, eb in zip(ta, tb):
        if ea == eb:
            continue
        if ea[1] == "group" and eb[1] == "group":
            return False, f"HDF5 {ea[0]}: attributes differ: " + _attr_reason(ea[2], eb[2])
        for label, va, vb in zip(labels, ea, eb):
            if va != vb:
                if label == "attributes":
                    return False, f"HDF5 {ea[0]}: attributes differ: " + _attr_reason(va, vb)
                if label == "data":
                    return False, f"HDF5 {ea[0]}: data bytes differ: " + _byte_reason(va, vb, None)
                return False, f"HDF5 {ea[0]}: {label} {_short(repr(va), 60)} vs {_short(repr(vb), 60)}"
    return False, "HDF5 trees differ"


def _attr_reason(a, b):
    names_a, names_b = [n for n, _ in a], [n for n, _ in b]
    if names_a != names_b:
        return f"names {names_a} vs {names_b}"
    for (name, va), (_, vb) in zip(a, b):
        if va != vb:
            return f"{name!r}"
    return "?"


def compare_run(run, ref, new, inputs):
    """``(status, detail)`` with status ``same``, ``DIFFERENT`` or ``BAD RUN``."""
    problems = []
    if ref.exit_code != new.exit_code:
        problems.append(f"exit code {ref.exit_code} vs {new.exit_code}")
    if ref.files != new.files:
        problems.append(f"files left {ref.files} vs {new.files}")

    report_a, text_a = _report(ref, inputs)
    report_b, text_b = _report(new, inputs)
    if report_a is not None and report_b is not None:
        ja, jb = _normalise_json(report_a, ref, inputs), _normalise_json(report_b, new, inputs)
        if ja != jb:
            if isinstance(ja, dict) and isinstance(jb, dict):
                keys = sorted(set(ja) | set(jb))
                diff = [k for k in keys if ja.get(k, "<missing>") != jb.get(k, "<missing>")]
                first = diff[0]
                va, vb = ja.get(first, "<missing>"), jb.get(first, "<missing>")
                problems.append(f"json {', '.join(diff)} differ ({first}: {_short(va, 60)} vs {_short(vb, 60)})")
            else:
                problems.append("json reports differ")
    elif text_a != text_b:
        problems.append(f"stdout {_short(text_a or '<empty>', 60)!r} vs {_short(text_b or '<empty>', 60)!r}")

    la, lb = _stderr_lines(ref, inputs), _stderr_lines(new, inputs)
    if la != lb:
        for i in range(max(len(la), len(lb))):
            a = la[i] if i < len(la) else "<missing>"
            b = lb[i] if i < len(lb) else "<missing>"
            if a != b:
                problems.append(f"stderr line {i + 1}: {_short(a, 80)!r} vs {_short(b, 80)!r}")
                break

    how = "no output"
    if run.output in ref.files or run.output in new.files:
        if run.output in ref.files and run.output in new.files:
            ok, how = compare_files(os.path.join(ref.folder, run.output), os.path.join(new.folder, run.output))
            if not ok:
                problems.append(how)
        else:
            problems.append("output written by one side only")

    # Does the reference do what this run is there to test?
    bad = []
    if ref.exit_code != run.exit_code:
        error = next((line for line in ref.stderr.splitlines() if line.startswith("Error")), ref.stderr[-200:])
        bad.append(f"reference exited {ref.exit_code}, expected {run.exit_code}: {_short(error.strip(), 100)}")
    elif run.slabs is not None:
        slabs = report_a.get("slabs") if isinstance(report_a, dict) else None
        if slabs is None:
            bad.append("no 'slabs' in the reference's --json report")
        elif run.slabs == "several" and not slabs > 1:
            bad.append(f"streamed run used {slabs} slab(s); lower its --max-memory")
        elif run.slabs == "one" and slabs != 1:
            bad.append(f"whole run used {slabs} slabs")
    if problems:
        return "DIFFERENT", "; ".join(problems + bad)
    if bad:
        return "BAD RUN", "; ".join(bad)
    slabs = report_a.get("slabs") if isinstance(report_a, dict) else None
    detail = how if run.exit_code == 0 else f"exit {ref.exit_code}, same message"
    if slabs and slabs > 1:
        detail += f", {slabs} slabs"
    return "same", detail

# --------------------------------------------------------------------------- main


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Run a fixed set of `convt3d run` invocations with two versions of this "
                    "repository and compare outputs, exit codes and reports byte for byte.")
    parser.add_argument("--ref", required=True, metavar="REV",
                        help="reference git revision (checked out as a temporary worktree)")
    parser.add_argument("--new", default=None, metavar="PATH_OR_REV",
                        help="folder or revision under test [default: this repository's working tree]")
    parser.add_argument("--keep", default=None, metavar="DIR",
                        help="keep inputs, outputs and logs in DIR (new or empty)")
    parser.add_argument("--ignore-key", action="append", default=[], metavar="KEY",
                        help="leave this --json report key out of the comparison (repeatable), for "
                             "a report field added on purpose since REV")
    parser.add_argument("--numba-cache", default=None, metavar="DIR",
                        help="persistent Numba cache (and fixed worktree paths) for warm reruns; "
                             "outside the repository")
    return parser.parse_args(argv)


def _side_from_rev(label, sha, rev, trees, work, cache_root):
    if cache_root:
        tree = os.path.join(cache_root, "trees", f"{label}-{sha[:12]}")
        numba_cache = os.path.join(cache_root, label)
    else:
        tree = os.path.join(trees, label)
        numba_cache = os.path.join(work, "numba", label)
    return Side(label, f"{rev} ({sha[:12]}, worktree {tree})", tree, os.path.join(work, label),
                numba_cache, worktree=True, sha=sha)


def setup(args, work, trees, repo):
    """The two sides (worktrees not made yet)."""
    cache_root = os.path.abspath(args.numba_cache) if args.numba_cache else None
    ref_sha = resolve_revision(repo, args.ref, "--ref")
    ref = _side_from_rev("ref", ref_sha, args.ref, trees, work, cache_root)
    if args.new is None or os.path.isdir(args.new):
        tree = os.path.abspath(args.new) if args.new is not None else repo
        if not os.path.isfile(os.path.join(tree, "convt3d_cli", "__init__.py")):
            raise SetupError(f"--new {tree} holds no convt3d_cli package")
        numba_cache = os.path.join(cache_root, "new") if cache_root else os.path.join(work, "numba", "new")
        new = Side("new", f"working tree {tree}", tree, os.path.join(work, "new"), numba_cache)
    else:
        new_sha = resolve_revision(repo, args.new, "--new")
        new = _side_from_rev("new", new_sha, args.new, trees, work, cache_root)
    return ref, new


def main(argv=None):
    global VOLATILE
    args = parse_args(argv)
    VOLATILE = tuple(VOLATILE) + tuple(args.ignore_key)
    started = time.monotonic()
    here = os.path.dirname(os.path.abspath(__file__))
    repo = git(here, "rev-parse", "--show-toplevel", check=False)
    if not repo:
        print(f"Error: {here} is not inside a git repository", file=sys.stderr)
        return 2

    if args.keep:
        work = os.path.abspath(args.keep)
        if os.path.exists(work) and os.listdir(work):
            print(f"Error: --keep {work} is not empty", file=sys.stderr)
            return 2
        os.makedirs(work, exist_ok=True)
    else:
        work = tempfile.mkdtemp(prefix="convt3d-compare-")
    trees = tempfile.mkdtemp(prefix="convt3d-compare-trees-")
    sides = []
    try:
        try:
            ref, new = setup(args, work, trees, repo)
            sides = [ref, new]
            for side in sides:
                if side.worktree:
                    make_worktree(repo, side.sha, side.tree, stable_times=bool(args.numba_cache))
                os.makedirs(os.path.join(side.folder, "logs"))
                os.makedirs(side.numba_cache, exist_ok=True)
                check_tree(side)
        except SetupError as exc:
            print(f"Error: {exc}", file=sys.stderr)
            return 2

        inputs = os.path.join(work, "inputs")
        os.makedirs(inputs)
        make_inputs(inputs)
        runs = all_runs()
        print(f"ref: {ref.description}")
        print(f"new: {new.description}")
        print(f"{len(runs)} runs, inputs in {inputs}", flush=True)

        for side in sides:
            side.done = {run.name: threading.Event() for run in runs}
        threads = [threading.Thread(target=run_side, args=(side, runs, inputs), daemon=True)
                   for side in sides]
        for thread in threads:
            thread.start()

        counts = {"same": 0, "DIFFERENT": 0, "BAD RUN": 0}
        width = max(len(run.name) for run in runs)
        for number, run in enumerate(runs, 1):
            for side in sides:
                side.done[run.name].wait()
            status, detail = compare_run(run, ref.results[run.name], new.results[run.name], inputs)
            counts[status] += 1
            line = f"{status} ({detail})" if status == "same" else f"{status}: {detail}"
            print(f"[{number:2d}/{len(runs)}] {run.name:<{width}}  {line}", flush=True)
        for thread in threads:
            thread.join()

        minutes, seconds = divmod(time.monotonic() - started, 60)
        print(f"\n{len(runs)} runs: {counts['same']} same, {counts['DIFFERENT']} different, "
              f"{counts['BAD RUN']} bad runs ({int(minutes)} min {seconds:.0f} s)")
        if args.keep:
            print(f"inputs, outputs and logs kept in {work}")
        if counts["same"] == len(runs):
            print("OK: outputs, exit codes and reports are the same")
            return 0
        print("FAILED: see the lines above" + ("" if args.keep else "; rerun with --keep DIR to inspect"))
        return 1
    finally:
        for side in sides:
            if side.worktree:
                remove_worktree(repo, side.tree)
        shutil.rmtree(trees, ignore_errors=True)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
