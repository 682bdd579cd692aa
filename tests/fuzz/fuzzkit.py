"""The fuzz harness: run ``convt3d`` in a sandboxed subprocess and check its promise.

Every fuzz case is a :class:`Case`: a command line, the folder it runs in (which
holds its input files and nothing else) and, where the documentation fixes it,
the exit codes it may end with. :func:`assert_promise` runs a list of cases
(two at a time on a 2-core machine) and checks each with :func:`check_promise`,
the one checker every fuzz test uses. The promise (``docs/behaviour.md``, the
issue "Hostile and odd inputs"):

* the process ends by itself within its time limit (no hang; and within
  :data:`SLOW` seconds: a case takes a few seconds) and is not killed by a
  signal (no crash); it leaves no process behind;
* it stays inside an address-space limit (``RLIMIT_AS``): it never runs out of
  memory on a tiny hostile input (an ``out of memory`` / ``MemoryError`` /
  ``Unable to allocate`` message counts as hitting the limit);
* exit code 0 with a sane output: the output file exists, ``convt3d info`` (the
  library's :func:`convt3d_cli.io.describe`) and NumPy/nibabel/h5py read it, and
  its shape is the one the JSON report gives;
* or exit code 1/2 with exactly one ``Error:`` line on stderr (click's
  ``Usage:``/``Try`` hint may come before it) -- for ``batch``, per-file
  failures are reported as ``FAILED`` lines and ``status: failed`` JSON lines
  instead;
* no ``Traceback`` anywhere, and with ``-q`` (and for ``info``/``shape``, which
  report on stdout) nothing else on stderr: only the ``Error:`` line (or
  ``FAILED`` lines of a batch) and lines starting ``Warning:``;
* no output and no ``.convt3d-`` temporary file left after a failure, nothing
  written anywhere else in the folder (``TMPDIR`` points into it), and every
  file that was there before is byte-identical afterwards.

Environment variables:

``CONVT3D_FUZZ_AS_GIB``
    Address-space limit of each run in GiB (default 3: Numba/LLVM reserve a lot
    of address space, so much less breaks ordinary runs).
``CONVT3D_FUZZ_JOBS``
    Cases run at once (default: the number of cores, at most 2).
``CONVT3D_FUZZ_SLOW``
    Seconds after which a finished case counts as too slow (default 30: shared CI machines stall).
``CONVT3D_FUZZ_KEEP``
    A folder: case folders are created there and kept, so a failing case can be
    rerun by hand (the failure message prints the folder and the command).
``CONVT3D_FUZZ_REPORT``
    A file: every failing case is appended to it as one JSON line.
``CONVT3D_FUZZ_TIMES``
    A file: every case's duration and exit code are appended to it (JSON lines).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import itertools
import json
import os
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

GIB = 1 << 30
AS_LIMIT = int(float(os.environ.get("CONVT3D_FUZZ_AS_GIB", "3")) * GIB)
# Outputs of the fuzz cases are tiny; a file write beyond this is a runaway (EFBIG, not a kill:
# Python ignores SIGXFSZ).
FSIZE_LIMIT = 1 * GIB
JOBS = int(os.environ.get("CONVT3D_FUZZ_JOBS", "0")) or max(1, min(2, os.cpu_count() or 1))
#: Wall-clock limit of a case once the Numba cache is warm.
TIMEOUT = 30.0
#: The first (compiling) run of a session, and the one retry of a compute case that timed out.
COMPILE_TIMEOUT = 240.0
RETRY_TIMEOUT = 90.0
#: Cases that must give up at once (a FIFO nobody writes to).
SHORT_TIMEOUT = 8.0
#: A case slower than this (once the cache is warm) breaks "each case under a few seconds".
SLOW = float(os.environ.get("CONVT3D_FUZZ_SLOW", "30"))
#: Seconds a process of the group may outlive the main process (multiprocessing's helpers).
LINGER = 1.0

TEMP_MARK = ".convt3d-"
MEMORY_PATTERNS = re.compile(
    r"MemoryError|out of memory|Unable to allocate|Cannot allocate memory|bad_alloc|LLVM ERROR|"
    r"std::length_error|mmap failed|failed to map segment|Resource temporarily unavailable",
    re.IGNORECASE)
TRACEBACK = "Traceback (most recent call last)"
COMMANDS = ("run", "shape", "info", "batch")


# --------------------------------------------------------------------------- cases and outcomes

@dataclass
class Case:
    """One invocation of ``convt3d`` in ``folder`` (its working directory).

    Attributes
    ----------
    label : str
        What the case is (shown in failure reports).
    args : list of str
        Arguments after ``convt3d``.
    folder : Path
        Working directory, holding the case's inputs only.
    output : str, optional
        ``run``: the output spec as given (relative to ``folder``); ``batch``: ``--out-dir``.
    expect : set of int, optional
        Exit codes the documentation allows here (default: 0, 1 or 2).
    timeout : float
    retry : bool
        Rerun once with a long limit when it timed out (a Numba kernel compiling
        for the first time); never for cases that must not block at all.
    how : str
        How the inputs were made (seed, mutation), for the reproduction.
    fsize : int, optional
        ``RLIMIT_FSIZE`` in bytes instead of :data:`FSIZE_LIMIT`: writes beyond it
        fail with EFBIG, as on a full disk.
    """

    label: str
    args: list
    folder: Path
    output: str | None = None
    expect: frozenset | None = None
    timeout: float = TIMEOUT
    retry: bool = True
    how: str = ""
    fsize: int | None = None

    def __post_init__(self):
        self.args = [str(a) for a in self.args]
        self.folder = Path(self.folder)
        if self.expect is not None:
            self.expect = frozenset(self.expect)

    @property
    def command(self):
        for arg in self.args:
            if arg in COMMANDS:
                return arg
        return None

    @property
    def quiet(self):
        """Whether stderr must hold nothing but ``Error:``/``Warning:`` (and batch ``FAILED``) lines."""
        return self.command in ("info", "shape") or "-q" in self.args or "--quiet" in self.args

    @property
    def wants_json(self):
        return "--json" in self.args

    def shell(self):
        """The command line, as typed in the case folder (bash ``$'...'`` quoting for odd bytes)."""
        return "convt3d " + " ".join(_quote(a) for a in self.args)


def _quote(arg):
    raw = os.fsencode(arg)
    if all(32 <= b < 127 for b in raw):
        return shlex.quote(arg)
    return "$'" + "".join(chr(b) if 32 <= b < 127 and chr(b) not in "'\\" else f"\\x{b:02x}" for b in raw) + "'"


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False
    lingering: bool = False
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)


@dataclass
class Problem:
    kind: str       # hang, signal, memory, traceback, noise, leftover, input-changed, exit-code,
                    # error-lines, bad-output, batch-unexpected, lingering
    detail: str


# --------------------------------------------------------------------------- folders

_counter = itertools.count()


def case_folder(tmp_path, name):
    """A fresh, empty folder for one case (under ``CONVT3D_FUZZ_KEEP`` when set)."""
    keep = os.environ.get("CONVT3D_FUZZ_KEEP")
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:80]
    if keep:
        base = Path(keep) / os.environ.get("PYTEST_CURRENT_TEST", "x").split(" ")[0].split("::")[-1][:60]
        base = Path(re.sub(r"[^A-Za-z0-9_./-]+", "_", str(base)))
        folder = base / f"{next(_counter):04d}-{safe}"
        if folder.exists():
            shutil.rmtree(folder)
    else:
        folder = Path(tmp_path) / f"{next(_counter):04d}-{safe}"
    folder.mkdir(parents=True)
    return folder


def snapshot(folder):
    """Relative path -> what it is (content hash of files, target of links), never following links."""
    folder = Path(folder)
    found = {}

    def walk(path, rel):
        with os.scandir(path) as entries:
            for entry in entries:
                name = f"{rel}{entry.name}"
                st = entry.stat(follow_symlinks=False)
                if stat.S_ISLNK(st.st_mode):
                    found[name] = ("link", os.readlink(entry.path))
                elif stat.S_ISDIR(st.st_mode):
                    found[name] = ("dir",)
                    walk(entry.path, name + "/")
                elif stat.S_ISREG(st.st_mode):
                    digest = hashlib.sha256()
                    with open(entry.path, "rb") as handle:
                        for block in iter(lambda: handle.read(1 << 20), b""):
                            digest.update(block)
                    found[name] = ("file", digest.hexdigest(), st.st_size)
                else:
                    found[name] = ("special", stat.S_IFMT(st.st_mode))

    walk(folder, "")
    return found


# --------------------------------------------------------------------------- running

def _limits(fsize=FSIZE_LIMIT):
    """preexec_fn: the address-space and file-size limits of a fuzz run, no core dumps."""
    resource.setrlimit(resource.RLIMIT_AS, (AS_LIMIT, AS_LIMIT))
    resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _env(folder, extra=None):
    env = dict(os.environ)
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop("PYTEST_XDIST_WORKER", None)
    env["TMPDIR"] = str(Path(folder) / "tmp")
    env["PYTHONFAULTHANDLER"] = "1"   # a crash shows where it happened
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("COLUMNS", None)
    env.update(extra or {})
    return env


class _Running:
    def __init__(self, case, timeout, logs):
        self.case = case
        (Path(case.folder) / "tmp").mkdir(exist_ok=True)
        self.before = snapshot(case.folder)
        self.out_path = logs / f"{id(self)}.out"
        self.err_path = logs / f"{id(self)}.err"
        self.out = open(self.out_path, "w+b")
        self.err = open(self.err_path, "w+b")
        self.start = time.monotonic()
        self.deadline = self.start + timeout
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "convt3d_cli", *case.args], cwd=case.folder, stdin=subprocess.DEVNULL,
            stdout=self.out, stderr=self.err, env=_env(case.folder),
            preexec_fn=functools.partial(_limits, case.fsize or FSIZE_LIMIT),
            start_new_session=True, close_fds=True)

    def done(self):
        return self.proc.poll() is not None or time.monotonic() > self.deadline

    def finish(self):
        timed_out = False
        if self.proc.poll() is None:
            timed_out = True
            _kill_group(self.proc.pid)
            self.proc.wait()
        seconds = time.monotonic() - self.start
        lingering = False if timed_out else _group_lingers(self.proc.pid)
        self.out.close()
        self.err.close()
        stdout = self.out_path.read_bytes().decode("utf-8", "replace")
        stderr = self.err_path.read_bytes().decode("utf-8", "replace")
        self.out_path.unlink()
        self.err_path.unlink()
        return Outcome(self.proc.returncode, stdout, stderr, seconds, timed_out, lingering, self.before,
                       snapshot(self.case.folder))


def _kill_group(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_lingers(pgid):
    """Whether a process of the case's session is still alive after LINGER seconds (then kill it)."""
    end = time.monotonic() + LINGER
    while True:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        if time.monotonic() > end:
            _kill_group(pgid)
            return True
        time.sleep(0.05)


def run_cases(cases, jobs=JOBS, timeout=None):
    """Run ``cases``, ``jobs`` at a time, from this thread only (``preexec_fn`` is not thread-safe).

    A compute case (``run``/``batch``) that times out is rerun once, in its
    folder's original state, with :data:`RETRY_TIMEOUT`: a Numba kernel compiling
    for the first time is slow, not hung. Both attempts are recorded in ``notes``.
    """
    logs = Path(tempfile.mkdtemp(prefix="convt3d-fuzz-logs-"))
    try:
        outcomes = [None] * len(cases)
        pending = list(range(len(cases)))
        running = {}
        retried = set()
        while pending or running:
            while pending and len(running) < jobs:
                index = pending.pop(0)
                case = cases[index]
                limit = timeout or case.timeout
                if index in retried:
                    limit = max(limit, RETRY_TIMEOUT)
                running[index] = _Running(case, limit, logs)
            time.sleep(0.01)
            for index, handle in list(running.items()):
                if not handle.done():
                    continue
                del running[index]
                outcome = handle.finish()
                case = cases[index]
                if (outcome.timed_out and case.retry and index not in retried
                        and case.command in ("run", "batch")):
                    # Put the folder back as it was (a killed run may leave a temporary file).
                    problems = _changes(outcome.before, outcome.after, allowed=set())
                    _restore_folder(case.folder, outcome.before)
                    retried.add(index)
                    pending.insert(0, index)
                    outcomes[index] = ("first", outcome, problems)
                    continue
                if isinstance(outcomes[index], tuple):
                    _, first, problems = outcomes[index]
                    outcome.notes.append(f"first attempt timed out after {first.seconds:.0f} s "
                                         f"(retried: a kernel compiling?)")
                    outcome.notes.extend(f"first attempt: {p.kind}: {p.detail}" for p in problems
                                         if p.kind == "input-changed")
                outcomes[index] = outcome
        return outcomes
    finally:
        shutil.rmtree(logs, ignore_errors=True)


def _restore_folder(folder, before):
    folder = Path(folder)
    for rel, what in snapshot(folder).items():
        if rel not in before:
            path = folder / rel
            if what[0] == "dir":
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink()


# --------------------------------------------------------------------------- checking

def _stderr_lines(text):
    return [line for line in text.splitlines()]


def _changes(before, after, allowed):
    """Problems: inputs changed or removed; new paths not in ``allowed``."""
    problems = []
    for rel, what in before.items():
        if rel in allowed:      # an output replaced with --overwrite
            continue
        if rel not in after:
            problems.append(Problem("input-changed", f"{rel} was removed"))
        elif after[rel] != what:
            problems.append(Problem("input-changed", f"{rel} changed: {what[:2]} -> {after[rel][:2]}"))
    for rel, what in after.items():
        if rel in before or rel in allowed:
            continue
        kind = "temporary file" if TEMP_MARK in rel else what[0]
        problems.append(Problem("leftover", f"{kind} left: {rel}"))
    return problems


def _output_path(folder, spec):
    """Path part of an output ``PATH[:KEY]`` (as convt3d splits it) and the key."""
    from convt3d_cli.io.registry import split_spec

    path, key = split_spec(str(Path(folder) / str(spec)))
    return Path(path), key


def _read_output(path, key):
    """Read an output file with the reference libraries; return its stored shape."""
    lower = str(path).lower()
    if lower.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        image = nib.load(str(path))
        data = np.asanyarray(image.dataobj)
        np.asarray(image.affine, dtype=np.float64)
        return tuple(data.shape)
    if lower.endswith((".h5", ".hdf5")):
        import h5py

        with h5py.File(path, "r") as handle:
            return tuple(handle[key or "/volume"][()].shape)
    if lower.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            return tuple(archive[key or "volume"].shape)
    return tuple(np.load(path, allow_pickle=False).shape)


def _check_output_file(folder, spec, report=None):
    """Problems with a written output: missing, unreadable, wrong shape, or ``info`` fails on it."""
    path, key = _output_path(folder, spec)
    if not path.is_file():
        return [Problem("bad-output", f"exit 0 but no output file {spec}")]
    problems = []
    try:
        shape = _read_output(path, key)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return [Problem("bad-output", f"{spec} cannot be read back: {type(exc).__name__}: {exc}")]
    try:
        from convt3d_cli import io as cio

        cio.describe(str(path) if key is None else f"{path}:{key}")
    except Exception as exc:  # noqa: BLE001
        problems.append(Problem("bad-output", f"convt3d info fails on the output {spec}: "
                                              f"{type(exc).__name__}: {exc}"))
    if report is not None:
        wanted = report.get("output_file_shape")
        if wanted is not None and tuple(wanted) != shape:
            problems.append(Problem("bad-output", f"{spec} holds shape {shape} but the report says {wanted}"))
        if not all(isinstance(v, int) and v >= 1 for v in report.get("output_shape") or [0]):
            problems.append(Problem("bad-output", f"bad output_shape in the report: {report.get('output_shape')}"))
    if min(shape, default=1) < 1:
        problems.append(Problem("bad-output", f"{spec} has an empty axis: {shape}"))
    return problems


def _json_lines(stdout):
    objects, bad = [], []
    for line in stdout.splitlines():
        if not line.strip():
            continue
        try:
            objects.append(json.loads(line))
        except ValueError:
            bad.append(line)
    return objects, bad


def check_promise(case, outcome):
    """Every way ``outcome`` breaks the promise (see the module docstring); empty when it keeps it."""
    problems = []
    text = outcome.stdout + outcome.stderr
    lines = _stderr_lines(outcome.stderr)
    code = outcome.returncode
    is_batch = case.command == "batch"

    # -- the process itself
    if outcome.timed_out:
        problems.append(Problem("hang", f"no exit within {case.timeout:.0f} s (killed)"))
    elif code is None or code < 0:
        name = signal.Signals(-code).name if code and -code in signal.Signals._value2member_map_ else code
        problems.append(Problem("signal", f"killed by signal {name}"))
    elif code not in (0, 1, 2):
        problems.append(Problem("exit-code", f"exit code {code} (only 0, 1 and 2 are promised)"))
    if not outcome.timed_out and outcome.seconds > SLOW and not outcome.notes:
        problems.append(Problem("slow", f"took {outcome.seconds:.1f} s (a case should take a few seconds)"))
    if outcome.lingering:
        problems.append(Problem("lingering", "a child process outlived the command"))
    if TRACEBACK in text:
        problems.append(Problem("traceback", _traceback_summary(text)))
    memory = MEMORY_PATTERNS.search(text)
    if memory:
        line = next((l for l in text.splitlines() if memory.group(0) in l), memory.group(0))
        problems.append(Problem("memory", f"hit the address-space limit: {line.strip()[:300]}"))

    if case.expect is not None and code is not None and code >= 0 and not outcome.timed_out \
            and code not in case.expect:
        problems.append(Problem("exit-code", f"exit code {code}, expected {sorted(case.expect)}"))

    # -- stderr and stdout
    errors = [l for l in lines if l.startswith("Error:")]
    failed_lines = [l for l in lines if l.startswith("FAILED ")] if is_batch else []
    if code in (1, 2) and not outcome.timed_out and TRACEBACK not in text:
        if is_batch and not errors:
            if not failed_lines:
                problems.append(Problem("error-lines", "batch failed without an Error: or FAILED line"))
        elif len(errors) != 1:
            problems.append(Problem("error-lines", f"{len(errors)} Error: lines, expected exactly one: "
                                                   f"{outcome.stderr.strip()[:400]!r}"))
    if code == 0 and errors:
        problems.append(Problem("error-lines", f"exit 0 with an Error: line: {errors[0][:300]}"))
    if case.quiet:
        allowed = ("Warning:", "Error:")
        if is_batch:
            allowed += ("FAILED ",)
        if code == 2:
            allowed += ("Usage:", "Try ")
        noise = [l for l in lines if l.strip() and not l.startswith(allowed)]
        if code == 0:
            noise += [l for l in lines if l.startswith(("Error:", "FAILED "))]
        if noise and TRACEBACK not in outcome.stderr:
            problems.append(Problem("noise", "stderr: " + " | ".join(n.strip()[:200] for n in noise[:6])))

    # -- files
    allowed_new = set()
    report = None
    if code == 0 and not outcome.timed_out:
        if case.command == "run" and case.output:
            out_path = _output_path(case.folder, case.output)[0]
            allowed_new.add(str(out_path.relative_to(case.folder)))
            if case.wants_json:
                objects, bad = _json_lines(outcome.stdout)
                if len(objects) != 1 or bad:
                    problems.append(Problem("bad-output", f"--json printed {outcome.stdout[:300]!r}"))
                else:
                    report = objects[0]
            problems += _check_output_file(case.folder, case.output, report)
        elif case.command in ("info", "shape") and case.wants_json:
            objects, bad = _json_lines(outcome.stdout)
            if len(objects) != 1 or bad or not isinstance(objects[0], dict):
                problems.append(Problem("bad-output", f"--json printed {outcome.stdout[:300]!r}"))
            elif case.command == "shape":
                shape = objects[0].get("output_shape")
                if not shape or not all(isinstance(v, int) and v >= 1 for v in shape):
                    problems.append(Problem("bad-output", f"output_shape {shape!r}"))
        elif case.command in ("info", "shape") and not outcome.stdout.strip():
            problems.append(Problem("bad-output", "exit 0 but nothing on stdout"))
    if is_batch and case.output and code in (0, 1) and not outcome.timed_out:
        problems += _check_batch(case, outcome, allowed_new, failed_lines)
    problems += _changes(outcome.before, outcome.after, allowed_new)
    for note in outcome.notes:
        if note.startswith("first attempt:"):
            problems.append(Problem("input-changed", note))
    return problems


def _check_batch(case, outcome, allowed_new, failed_lines):
    """Per-file results of a ``batch --json``: ok files have a sane output, failed ones none."""
    problems = []
    out_dir = Path(case.folder) / case.output
    if out_dir.is_dir():
        allowed_new.add(str(out_dir.relative_to(case.folder)))
    if not case.wants_json:
        return problems
    objects, bad = _json_lines(outcome.stdout)
    if bad:
        problems.append(Problem("bad-output", f"--json printed non-JSON lines: {bad[:3]!r}"))
    failed = 0
    for line in objects:
        status, output = line.get("status"), line.get("output")
        if status == "ok":
            rel = str(Path(output)) if output else None
            if rel is not None:
                allowed_new.add(rel)
            problems += [Problem(p.kind, f"[{line.get('input')}] {p.detail}")
                         for p in _check_output_file(case.folder, output, line)]
        elif status == "failed":
            failed += 1
            error = line.get("error") or ""
            if error.startswith("unexpected "):
                problems.append(Problem("batch-unexpected", f"[{line.get('input')}] {error[:300]}"))
            if "\n" in error:
                problems.append(Problem("error-lines", f"[{line.get('input')}] multi-line error"))
    if failed and outcome.returncode != 1:
        problems.append(Problem("exit-code", f"{failed} files failed but exit code {outcome.returncode}"))
    if case.quiet and len(failed_lines) != failed:
        problems.append(Problem("error-lines", f"{failed} files failed but {len(failed_lines)} FAILED lines"))
    return problems


def _traceback_summary(text):
    """``ExceptionType: message`` and the frame that raised it, from the last traceback in ``text``."""
    chunk = text[text.rfind(TRACEBACK):]
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', chunk)
    last = ""
    for line in chunk.splitlines():
        if re.match(r"^[A-Za-z_][\w.]*(Error|Exception|Warning|Exit|Interrupt)\b.*", line) or \
                re.match(r"^[A-Za-z_][\w.]*: ", line):
            last = line.strip()
    where = ""
    if frames:
        path, line_no, func = frames[-1]
        where = f" at {_short(path)}:{line_no} in {func}"
        ours = [f for f in frames if "convt3d_cli" in f[0]]
        if ours and ours[-1] != frames[-1]:
            where += f" (called from {_short(ours[-1][0])}:{ours[-1][1]} in {ours[-1][2]})"
    return f"{last[:300]}{where}"


def _short(path):
    for marker in ("convt3d_cli/", "site-packages/"):
        if marker in path:
            return path[path.index(marker):]
    return path


# --------------------------------------------------------------------------- the assertion

def assert_promise(cases, jobs=JOBS):
    """Run every case and fail with one report listing each case that broke the promise."""
    outcomes = run_cases(cases, jobs=jobs)
    failures = []
    for case, outcome in zip(cases, outcomes):
        problems = check_promise(case, outcome)
        if problems:
            failures.append((case, outcome, problems))
    times_path = os.environ.get("CONVT3D_FUZZ_TIMES")
    if times_path:
        with open(times_path, "a", encoding="utf-8") as handle:
            for case, outcome in zip(cases, outcomes):
                handle.write(json.dumps({"label": case.label[:120], "command": case.command,
                                         "seconds": round(outcome.seconds, 3),
                                         "returncode": outcome.returncode}) + "\n")
    report_path = os.environ.get("CONVT3D_FUZZ_REPORT")
    if report_path and failures:
        test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
        with open(report_path, "a", encoding="utf-8") as handle:
            for case, outcome, problems in failures:
                handle.write(json.dumps({
                    "test": test, "label": case.label, "how": case.how, "folder": str(case.folder),
                    "command": case.shell(), "returncode": outcome.returncode,
                    "seconds": round(outcome.seconds, 2),
                    "problems": [[p.kind, p.detail] for p in problems],
                    "stderr": outcome.stderr[-3000:], "stdout": outcome.stdout[-1000:]}) + "\n")
    if failures:
        blocks = [f"{len(failures)} of {len(cases)} cases broke the promise:"]
        for case, outcome, problems in failures:
            blocks.append(
                f"\n* {case.label}" + (f"  [{case.how}]" if case.how else "") +
                f"\n  cd {case.folder} && {case.shell()}   # exit {outcome.returncode}, {outcome.seconds:.1f} s" +
                "".join(f"\n  - {p.kind}: {p.detail}" for p in problems))
        pytest.fail("\n".join(blocks), pytrace=False)
    return outcomes


# --------------------------------------------------------------------------- building inputs

def write(folder, name, data):
    """Write bytes to ``folder/name``; return the name."""
    path = Path(folder) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(data))
    return name


def gz(data):
    """gzip bytes reproducibly (no time stamp)."""
    return gzip.compress(bytes(data), compresslevel=6, mtime=0)


def flip_bytes(data, rng, header=600):
    """``data`` with 1-8 bytes changed (mostly in the first ``header`` bytes); and what was done."""
    data = bytearray(data)
    done = []
    for _ in range(rng.randint(1, 8)):
        if rng.random() < 0.6:
            pos = rng.randrange(min(len(data), header))
        else:
            pos = rng.randrange(len(data))
        old = data[pos]
        choice = rng.random()
        if choice < 0.5:
            data[pos] ^= 1 << rng.randrange(8)
        elif choice < 0.75:
            data[pos] = rng.choice((0x00, 0xFF, 0x7F, 0x80))
        else:
            data[pos] = rng.randrange(256)
        done.append(f"@{pos}:{old:#04x}->{data[pos]:#04x}")
    return bytes(data), " ".join(done)


def truncations(length, header, rng, count):
    """Sorted distinct cut lengths: the edges that matter plus random ones."""
    cuts = {0, 1, header - 1, header, length // 2, length - 1}
    edges = len(cuts)
    while len(cuts) < count + edges:
        cuts.add(rng.randrange(1, length))
    return sorted(c for c in cuts if 0 <= c < length)


def batch_statuses(outcome):
    """``input -> (status, error)`` from the JSON lines of a ``batch --json`` outcome."""
    found = {}
    for line in _json_lines(outcome.stdout)[0]:
        if isinstance(line, dict):
            found[line.get("input")] = (line.get("status"), line.get("error"))
    return found


def assert_statuses(case, outcome, wanted):
    """Fail unless every file of a batch ended as ``wanted`` says (``input -> "ok"|"failed"``)."""
    got = batch_statuses(outcome)
    wrong = [f"{name}: {got.get(name, ('missing', None))[0]} ({got.get(name, (None, None))[1]}), expected {status}"
             for name, status in wanted.items() if got.get(name, (None,))[0] != status]
    if wrong:
        pytest.fail(f"{case.label}: {len(wrong)} files ended wrongly\n  cd {case.folder} && {case.shell()}\n  "
                    + "\n  ".join(wrong), pytrace=False)
