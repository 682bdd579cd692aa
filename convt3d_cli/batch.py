"""Many files, one layer: the work behind ``convt3d batch``.

Every file goes through :func:`convt3d_cli.pipeline.run_file`, exactly as
``convt3d run`` would process it; this module only decides the output names,
refuses a batch whose outputs would collide, skips finished files on request,
and spreads the files over local processes (:mod:`concurrent.futures`) or over
a Dask cluster (:mod:`convt3d_cli._distributed`). One failing file never stops
the others: its error becomes a ``"failed"`` :class:`FileResult`.

The module imports only the standard library at load time: it is unpickled
first thing in every spawned worker, whose thread limits must be set before
NumPy and Numba are imported (see :func:`_init_worker`).
"""

from __future__ import annotations

import os
import sys
import traceback
from dataclasses import dataclass, field

from .errors import Convt3dError, FileFormatError, OutputError, ParameterError

#: ``--format`` choices and the suffix each one writes.
FORMATS = {"nii": ".nii", "nii.gz": ".nii.gz", "h5": ".h5", "npz": ".npz", "npy": ".npy"}

#: What to run to get the cluster support.
INSTALL_HINT = 'pip install "convt3d[distributed]"'

#: ``run_file`` keyword arguments the batch sets itself (the others pass through).
_BATCH_CONTROLLED = ("input", "output", "overwrite", "echo", "progress")


class CollisionError(OutputError):
    """Two inputs would be written to one output, or an output would replace an input."""


class DistributedUnavailable(Convt3dError):
    """``scheduler=`` was given but Dask's ``distributed`` cannot be imported.

    Exit code 2: like a bad option, it is refused before any work and fixed by
    changing the installation or the command, not the data.
    """

    exit_code = 2


class SchedulerError(Convt3dError):
    """The Dask scheduler cannot be reached."""


# --------------------------------------------------------------------------- results

@dataclass
class FileResult:
    """What happened to one input file.

    Attributes
    ----------
    index : int
        Position of the input in the batch (results are returned in this order).
    input, output : str
        The input spec as given and the output path (inside ``out_dir`` as given).
    status : {"ok", "skipped", "failed"}
    error : str or None
        One-line reason of a failure.
    report : dict or None
        What :func:`~convt3d_cli.pipeline.run_file` returned (``"ok"`` only).
    exit_code : int
        0, or the exit code ``convt3d run`` would have ended with for this file.
    traceback : str or None
        Only for unexpected exceptions (a bug rather than a bad file).
    """

    index: int
    input: str
    output: str
    status: str
    error: str | None = None
    report: dict | None = None
    exit_code: int = 0
    traceback: str | None = field(default=None, repr=False)

    @property
    def seconds(self):
        """Time ``run_file`` took for this file (0 when it did not finish)."""
        return float(self.report.get("seconds", 0.0)) if self.report else 0.0

    def as_json(self):
        """One ``--json`` line: the ``run`` report plus ``status`` and ``error``.

        Skipped and failed files have no report; they carry ``input`` and ``output``.
        """
        line = {"status": self.status, "error": self.error, "input": self.input, "output": self.output}
        if self.report:
            line.update(self.report)
            # The report names the paths the task ran on; show them as the user gave them.
            line["input"], line["output"] = self.input, self.output
        return line


def result_line(result):
    """The one-line stderr summary of a file: ``ok a.nii -> out/a.nii (1.2 s)`` or ``FAILED a.nii: ...``."""
    if result.status == "ok":
        return f"ok {result.input} -> {result.output} ({result.seconds:.1f} s)"
    if result.status == "skipped":
        return f"skipped {result.input}: {result.output} exists"
    return f"FAILED {result.input}: {result.error}"


def summary_line(results, seconds):
    """``N done, M skipped, K failed in S s`` for the end of a batch."""
    counts = {status: 0 for status in ("ok", "skipped", "failed")}
    for result in results:
        counts[result.status] += 1
    return f"{counts['ok']} done, {counts['skipped']} skipped, {counts['failed']} failed in {seconds:.1f} s"


def run_option_names():
    """Keyword arguments of :func:`~convt3d_cli.pipeline.run_file` a batch passes to every file.

    Taken from its signature, so an option added to ``run_file`` works in a batch at once.
    """
    import inspect

    from .pipeline import run_file

    return tuple(name for name in inspect.signature(run_file).parameters if name not in _BATCH_CONTROLLED)


# --------------------------------------------------------------------------- inputs and names

def read_list(stream):
    """Input specs from a list file: one per line, blank lines and ``#`` comments ignored.

    Parameters
    ----------
    stream : iterable of str
        An open text file (or ``sys.stdin``).

    Returns
    -------
    list of str
        Lines stripped of surrounding white space. A ``#`` starts a comment only at
        the beginning of a line, since file names may contain ``#``.
    """
    specs = []
    for line in stream:
        line = line.strip()
        if line and not line.startswith("#"):
            specs.append(line)
    return specs


def _split_name(name):
    """``("sub01", ".nii.gz")``: the supported suffix counts as one (``.nii.gz``), else the extension."""
    from .io import SUFFIXES

    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix) and len(name) > len(suffix):
            return name[:-len(suffix)], name[-len(suffix):]
    return os.path.splitext(name)


def output_name(spec, *, suffix="", format=None):
    """File name the output of ``spec`` gets inside the output folder.

    Parameters
    ----------
    spec : str
        Input ``PATH`` or ``PATH:KEY``; the key is dropped (the output holds one
        array, under the format's default key).
    suffix : str
        Inserted before the extension: ``sub01.nii.gz`` + ``_x2`` -> ``sub01_x2.nii.gz``.
    format : {"nii", "nii.gz", "h5", "npz", "npy"}, optional
        Output format; default: the input's.

    Returns
    -------
    str
    """
    from .io import split_spec

    stem, extension = _split_name(os.path.basename(split_spec(spec)[0]))
    if format is not None:
        extension = FORMATS[format]
    return f"{stem}{suffix}{extension}"


def _key(path):
    """Comparable identity of a path that may not exist yet."""
    return os.path.normcase(os.path.realpath(path))


def plan_outputs(inputs, out_dir, *, suffix="", format=None, protected=()):
    """Output path of every input, refusing collisions before anything runs.

    Parameters
    ----------
    inputs : list of str
        Input specs.
    out_dir : str
        Output folder (as given; it need not exist yet).
    suffix, format
        See :func:`output_name`.
    protected : iterable of str
        Other files the batch reads (weights, bias): no output may replace them.

    Returns
    -------
    list of str
        ``os.path.join(out_dir, output_name(...))`` per input.

    Raises
    ------
    CollisionError
        Two inputs map to one output (also the same file given twice), or an
        output would be written over one of the batch's inputs.
    """
    from .io import split_spec

    outputs = [os.path.join(out_dir, output_name(spec, suffix=suffix, format=format)) for spec in inputs]
    seen = {}
    for index, (spec, output) in enumerate(zip(inputs, outputs)):
        first = seen.setdefault(_key(output), index)
        if first != index:
            raise CollisionError(f"{inputs[first]} and {spec} would both be written to {output}; "
                                 f"use --suffix, --format or separate batches")
    # Checked for the whole batch, not per file: with --jobs, a file could be overwritten
    # while another worker is still reading it.
    sources = {}
    for spec in list(inputs) + [p for p in protected if p]:
        sources.setdefault(_key(split_spec(spec)[0]), spec)
    for spec, output in zip(inputs, outputs):
        victim = sources.get(_key(output))
        if victim is not None:
            raise CollisionError(f"the output of {spec}, {output}, would replace the input {victim}; "
                                 f"choose another --out-dir or a --suffix")
    return outputs


def check_layer(*, weights=None, bias=None, kernel=None, layer_options=None, **_):
    """Refuse, once for the whole batch, a layer that would fail on every file.

    Reads the weights header only. Parameter rules that depend on an input
    (channels, output size >= 1) are left to each file.

    Raises
    ------
    ParameterError
        Invalid stride, padding, ... (exit code 2).
    FileFormatError
        Missing or unreadable weights or bias file.
    """
    from . import io, report

    layer_options = dict(layer_options or {})
    for name in ("stride", "padding", "output_padding", "dilation", "groups"):
        layer_options.setdefault(name, None)
    if kernel:
        from .builtin import builtin_params

        builtin_params(kernel, layer_options["stride"])
    elif weights:
        found = io.inspect_weights(weights)
        report.plan_layer((1, 1, 1, 1, 1), layer_options, weight_shape=found.shape,
                          file_options=found.options)
    if bias and not os.path.isfile(io.split_spec(bias)[0]):
        raise FileFormatError(f"no such file: {io.split_spec(bias)[0]}")


# --------------------------------------------------------------------------- one file

@dataclass(frozen=True)
class Task:
    """One file to process, picklable for worker processes and Dask.

    ``input``/``output`` are shown to the user; ``input_path``/``output_path``
    are absolute, so a Dask worker whose working folder differs (another
    machine, same shared file system) opens the same files. ``options`` are the
    :func:`run_file` keyword arguments, with absolute weight and bias paths.
    """

    index: int
    input: str
    output: str
    input_path: str
    output_path: str
    options: dict
    renames: tuple = ()


def _absolute_spec(spec):
    """``PATH[:KEY]`` with an absolute ``PATH``; returns ``(spec, path, absolute path)``."""
    from .io import split_spec

    path, key = split_spec(spec)
    absolute = os.path.abspath(path)
    return (absolute if key is None else f"{absolute}:{key}"), path, absolute


def make_task(index, spec, output, options):
    """Build the :class:`Task` for one input (paths made absolute, renames remembered)."""
    options = dict(options)
    renames = []
    input_path, path, absolute = _absolute_spec(spec)
    renames.append((absolute, path))
    output_path = os.path.abspath(output)
    renames.append((output_path, output))
    for name in ("weights", "bias"):
        if options.get(name):
            options[name], path, absolute = _absolute_spec(options[name])
            renames.append((absolute, path))
    # Longest first, so that /data/a.nii.gz is restored before a folder /data/a.
    renames = tuple(sorted({a: p for a, p in renames if a != p}.items(), key=lambda r: -len(r[0])))
    return Task(index, spec, output, input_path, output_path, options, renames)


def _restore(text, renames):
    """Put the user's spelling of the paths back into a message or report value."""
    if not isinstance(text, str):
        return text
    for absolute, given in renames:
        text = text.replace(absolute, given)
    return text


def run_task(task):
    """Process one file; every error becomes a ``"failed"`` result.

    This runs in the worker (a local process or a Dask worker), so it returns
    a plain picklable :class:`FileResult` and never raises except for
    interruptions (KeyboardInterrupt, SystemExit from SIGTERM): those must
    stop the worker, and the atomic writer has removed its temporary file.
    """
    from . import pipeline

    failure = None
    try:
        report = pipeline.run_file(task.input_path, task.output_path, **task.options)
    except Convt3dError as err:
        failure = (str(err), err.exit_code, None)
    except MemoryError:
        failure = ("out of memory; use --max-memory, fewer --jobs or a bigger machine", 1, None)
    except OSError as err:
        reason = err.strerror or str(err) or type(err).__name__
        failure = (f"{err.filename}: {reason}" if err.filename else reason, 1, None)
    except Exception as err:  # a bug, not a bad file: still let the other files run
        failure = (f"unexpected {type(err).__name__}: {err}", 1, traceback.format_exc())
    if failure is not None:
        message, code, trace = failure
        return FileResult(task.index, task.input, task.output, "failed",
                          error=" ".join(_restore(message, task.renames).split()),
                          exit_code=code, traceback=trace)
    for name in ("input", "output", "weights", "bias"):
        report[name] = _restore(report.get(name), task.renames)
    return FileResult(task.index, task.input, task.output, "ok", report=report)


def lost_result(task, reason):
    """A ``"failed"`` result for a file whose worker died or could not run it."""
    return FileResult(task.index, task.input, task.output, "failed", error=reason, exit_code=1)


# --------------------------------------------------------------------------- local processes

def available_cores():
    """Cores this process may run on (CPU affinity, e.g. a SLURM allocation), at least 1."""
    counter = getattr(os, "process_cpu_count", None)       # Python >= 3.13
    if counter is not None:
        return max(1, counter() or 1)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


_THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS")


def _init_worker(threads):
    """Initializer of every worker process: cap Numba (and any BLAS) at ``threads``.

    In a spawned process this runs before NumPy or Numba are imported (this
    module imports neither), so the environment variables are what they read
    at start-up. A main module that imported Numba already (re-imported by
    spawn) is handled through ``numba.set_num_threads``.
    """
    for name in _THREAD_VARIABLES:
        os.environ[name] = str(threads)
    if "numba" in sys.modules:
        import numba

        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


#: A file in progress when worker processes died this many times is reported as failed.
MAX_ATTEMPTS = 2

_WORKER_DIED = ("its worker process ended abruptly, twice (killed, or out of memory?); "
                "check the file's size against the memory, or try --max-memory")


def _run_local(tasks, jobs, threads, on_result):
    """Run ``tasks`` on ``jobs`` worker processes, reporting each result as it completes.

    At most ``jobs`` files are handed to the pool at a time, so when a worker
    dies (killed, out of memory) the files that may have caused it are known:
    exactly those in flight. The pool is then replaced and each of them is tried
    once more, alone; a file whose worker dies again fails. So one bad file does
    not fail the rest of the batch.
    """
    import multiprocessing
    from collections import deque
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    # spawn, not fork: forking a process whose Numba/OpenMP threads have started can
    # deadlock, and spawn behaves the same on Linux, macOS and Windows. Each worker
    # handles many files, so it loads Numba and its cached kernels once.
    context = multiprocessing.get_context("spawn")
    queue = deque(tasks)
    deaths = {}                      # task index -> worker deaths while it was in flight
    while queue:
        pool = ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=_init_worker,
                                   initargs=(threads,))
        running, retry, broken = {}, [], False
        try:
            while running or (queue and not broken):
                while _can_submit(queue, running, jobs, deaths) and not broken:
                    task = queue.popleft()
                    running[pool.submit(run_task, task)] = task
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    task = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        broken = True
                        deaths[task.index] = deaths.get(task.index, 0) + 1
                        if deaths[task.index] < MAX_ATTEMPTS:
                            retry.append(task)
                            continue
                        result = lost_result(task, _WORKER_DIED)
                    except Exception as err:   # e.g. a result that cannot be sent back
                        result = lost_result(task, f"unexpected {type(err).__name__}: {err}")
                    on_result(result)
        except BaseException:
            # Ctrl-C or an error in the callback: wait for the files in flight (Ctrl-C reached
            # the workers too, and their atomic writes clean up); nothing else was handed out.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        for task in retry:
            _remove_temporary_files(task.output_path)
        queue.extendleft(reversed(retry))


def _can_submit(queue, running, jobs, deaths):
    """Whether the next queued file may start now.

    A file that was in flight when a worker died (a suspect) runs alone, so that a
    second death is its own doing and innocent files are not failed with it.
    """
    if not queue or len(running) >= jobs:
        return False
    if any(task.index in deaths for task in running.values()):
        return False
    return not running or queue[0].index not in deaths


def _remove_temporary_files(output_path):
    """Remove the hidden temporary files a killed worker left for ``output_path``.

    Only called once the pool that wrote them is gone, for outputs this batch owns.
    """
    import glob

    from .io._atomic import TEMP_MARK

    folder, name = os.path.split(output_path)
    # The atomic writer's naming: .NAME.convt3d-TOKEN.tmpSUFFIX (NAME cut at 100 characters).
    for path in glob.glob(os.path.join(glob.escape(folder), glob.escape(f".{name[:100]}{TEMP_MARK}") + "*.tmp*")):
        try:
            os.unlink(path)
        except OSError:
            pass


# --------------------------------------------------------------------------- the batch

def run_batch(inputs, out_dir, *, suffix="", format=None, jobs=1, threads=None, skip_existing=False,
              overwrite=False, scheduler=None, on_result=None, **run_options):
    """Upsample many files with one layer, locally or on a Dask cluster.

    Parameters
    ----------
    inputs : sequence of str
        Input specs (``PATH`` or ``PATH:KEY``).
    out_dir : str
        Output folder; created (with its parents) if missing.
    suffix : str
        Inserted in every output name before the extension (``_x2``).
    format : {"nii", "nii.gz", "h5", "npz", "npy"}, optional
        Output format; default: each input's own.
    jobs : int
        Files processed at once in local worker processes. 1 runs them one after
        the other in this process with all cores. Must stay 1 (or ``None``) with
        ``scheduler``: the Dask workers decide then.
    threads : int, optional
        Numba/BLAS threads per worker process when ``jobs > 1``; default
        ``max(1, cores // jobs)`` so that jobs x threads never exceeds the cores.
    skip_existing : bool
        Leave files whose output exists alone (resume an interrupted batch).
        Outputs are written atomically, so an existing output is a complete one.
    overwrite : bool
        Replace existing outputs (never an input). Not with ``skip_existing``.
    scheduler : str, optional
        Address of a ``dask.distributed`` scheduler (``tcp://host:8786``): one
        task per file runs :func:`run_task` on the workers, which need convt3d
        installed and the same file system at the same paths.
    on_result : callable(FileResult), optional
        Called in this process as each file finishes (completion order), e.g.
        to print progress; skipped files are reported first.
    **run_options
        ``weights``, ``bias``, ``no_bias``, ``kernel``, ``layer_options``,
        ``dtype``, ``max_memory``, ...: any keyword argument of
        :func:`~convt3d_cli.pipeline.run_file` but ``echo`` and ``progress``, applied
        to every file. ``max_memory`` limits each file; with ``jobs``
        files run at once, up to ``jobs`` working sets are in memory.

    Returns
    -------
    list of FileResult
        One per input, in input order.

    Raises
    ------
    ParameterError
        Conflicting or invalid options, an invalid layer (before any work).
    CollisionError
        Outputs that collide or would replace an input (before any work).
    DistributedUnavailable, SchedulerError
        ``scheduler`` given without Dask installed, or unreachable.
    Convt3dError
        A weights file that cannot be read; the output folder cannot be created.

    Notes
    -----
    With ``jobs > 1`` worker processes are *spawned*: a script calling this
    function must guard its entry point with ``if __name__ == "__main__":``.
    """
    unknown = set(run_options) - set(run_option_names())
    if unknown:
        raise TypeError(f"run_batch() got unexpected keyword arguments {sorted(unknown)}")
    if skip_existing and overwrite:
        raise ParameterError("skip_existing", "--skip-existing and --overwrite cannot be used together")
    if jobs is not None and (isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1):
        raise ParameterError("jobs", f"jobs must be a positive integer, got {jobs!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ParameterError("threads", f"threads must be a positive integer, got {threads!r}")
    if scheduler and (jobs or 1) > 1:
        raise ParameterError("jobs", "--jobs is for local processes; with --scheduler the Dask "
                                     "workers decide how many files run at once")
    if format is not None and format not in FORMATS:
        raise ParameterError("format", f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    if os.sep in suffix or (os.altsep and os.altsep in suffix):
        raise ParameterError("suffix", f"the suffix {suffix!r} must not contain a path separator")
    jobs = jobs or 1
    on_result = on_result or (lambda result: None)
    inputs = [os.fspath(spec) for spec in inputs]

    # Everything that can be refused for the whole batch is refused before any work.
    client_module = None
    if scheduler:
        from . import _distributed

        client_module = _distributed
        _distributed.require()
    outputs = plan_outputs(inputs, out_dir, suffix=suffix, format=format,
                           protected=(run_options.get("weights"), run_options.get("bias")))
    check_layer(**run_options)
    if inputs:
        _make_folder(out_dir)

    options = dict(run_options, overwrite=overwrite)
    results, tasks = [], []
    for index, (spec, output) in enumerate(zip(inputs, outputs)):
        if skip_existing and os.path.lexists(output):
            # Only the exact output name counts: a hidden temporary file left by a killed
            # run (.name.convt3d-XXXX.tmp.nii.gz) is never taken for a finished output.
            result = FileResult(index, spec, output, "skipped")
            results.append(result)
            on_result(result)
        else:
            tasks.append(make_task(index, spec, output, options))

    def collect(result):
        results.append(result)
        on_result(result)

    if not tasks:
        pass
    elif client_module is not None:
        client_module.run_on_scheduler(scheduler, tasks, collect)
    elif jobs == 1 or len(tasks) == 1:
        for task in tasks:
            collect(run_task(task))
    else:
        workers = min(jobs, len(tasks))
        _run_local(tasks, workers, threads or max(1, available_cores() // workers), collect)
    return sorted(results, key=lambda result: result.index)


def _make_folder(folder):
    """Create the output folder (and parents) if missing."""
    try:
        os.makedirs(folder, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"cannot create the output folder {folder}: a file has that name") from None
    except OSError as err:
        raise OutputError(f"cannot create the output folder {folder}: {err.strerror or err}") from None


def batch_exit_code(results):
    """0 when no file failed, else 1 (a data problem somewhere in the batch)."""
    return 1 if any(result.status == "failed" for result in results) else 0

