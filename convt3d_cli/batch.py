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

from .errors import (
    CollisionError,
    DistributedUnavailable,
    FileFormatError,
    OutputError,
    ParameterError,
    SchedulerError,
)
from . import threads as compute_threads
from .tasks import FileResult, Task, lost_result, make_task, run_task

__all__ = ["run_batch", "FileResult", "Task", "make_task", "run_task", "lost_result", "CollisionError",
           "DistributedUnavailable", "SchedulerError", "output_name", "plan_outputs", "read_list",
           "result_line", "summary_line", "batch_exit_code"]

#: ``run_file`` keyword arguments the batch sets itself (the others pass through).
# ``scheduler``/``resume`` of run_file spread one Zarr volume over a cluster; a batch
# spreads files instead (its own ``scheduler``) and resumes with --skip-existing.
_BATCH_CONTROLLED = ("input", "output", "overwrite", "echo", "progress", "scheduler", "resume")


# --------------------------------------------------------------------------- results

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


#: A list of inputs longer than this is not a list of files.
MAX_LIST_BYTES = 64 << 20
#: How long a pipe given to ``--from-list`` (``<(find ...)``) may stay silent.
LIST_TIMEOUT = 60.0


def list_lines(path, timeout=LIST_TIMEOUT):
    """The lines of a ``--from-list`` source that is not standard input.

    A regular file is read whole (at most :data:`MAX_LIST_BYTES`). A pipe, such
    as a shell's ``<(find ...)``, is read without blocking: a writer silent for
    ``timeout`` seconds is an error rather than a hang, and a pipe nobody writes
    to is an empty list. Anything else (a device, a folder) is refused.

    Raises
    ------
    FileFormatError
    """
    import select
    import stat

    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise FileFormatError(f"cannot read the list {path}: {err.strerror or err}") from None
    if stat.S_ISREG(mode):
        if os.path.getsize(path) > MAX_LIST_BYTES:
            raise FileFormatError(f"the list {path} is larger than {MAX_LIST_BYTES >> 20} MiB")
        with open(path, "rb") as handle:
            data = handle.read()
    elif stat.S_ISFIFO(mode):
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        pieces, size = [], 0
        try:
            while True:
                try:
                    piece = os.read(fd, 1 << 16)
                except BlockingIOError:  # a writer, no data yet
                    ready, _, _ = select.select([fd], [], [], timeout)
                    if not ready:
                        raise FileFormatError(f"the list {path} sent nothing for {timeout:g} s") from None
                    continue
                if not piece:  # the writer closed it, or there never was one
                    break
                size += len(piece)
                if size > MAX_LIST_BYTES:
                    raise FileFormatError(f"the list {path} is larger than {MAX_LIST_BYTES >> 20} MiB")
                pieces.append(piece)
        finally:
            os.close(fd)
        data = b"".join(pieces)
    else:
        raise FileFormatError(f"the list {path} is not a file or a pipe")
    return data.decode("utf-8", errors="surrogateescape").splitlines()


def output_name(spec, *, suffix="", format=None):
    """File name the output of ``spec`` gets inside the output folder.

    Parameters
    ----------
    spec : str
        Input ``PATH`` or ``PATH:KEY``; the key is dropped (the output holds one
        array, under the format's default key).
    suffix : str
        Inserted before the extension: ``sub01.nii.gz`` + ``_x2`` -> ``sub01_x2.nii.gz``.
    format : str, optional
        Output format by suffix without its dot (``nii.gz``, ``h5``, ...: the
        keys of :func:`convt3d_cli.io.registry.output_choices`); default: the input's.

    Returns
    -------
    str
    """
    from .io.registry import output_choices, split_name, split_spec

    stem, extension = split_name(os.path.basename(split_spec(spec)[0]))
    if format is not None:
        extension = output_choices()[format]
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


def check_layer(*, weights=None, bias=None, kernel=None, layer_options=None, weight_layout=None, **_):
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
    from . import io, layerplan

    layer_options = dict(layer_options or {})
    for name in ("stride", "padding", "output_padding", "dilation", "groups"):
        layer_options.setdefault(name, None)
    if kernel:
        from .builtin import builtin_params

        if layer_options["stride"] is not None:      # else --like/--voxel-size chooses it per file
            builtin_params(kernel, layer_options["stride"])
    elif weights:
        found = io.inspect_weights(weights, layout=weight_layout)
        options = {k: v for k, v in found.options.items() if k not in ("output_size", "pad_rule")}
        layerplan.plan_layer((1, 1, 1, 1, 1), layer_options, weight_shape=found.shape, file_options=options)
    if bias and not os.path.isfile(io.split_spec(bias)[0]):
        raise FileFormatError(f"no such file: {io.split_spec(bias)[0]}")


# --------------------------------------------------------------------------- local processes

def available_cores():
    """Cores this process may run on (CPU affinity, e.g. a SLURM allocation), at least 1."""
    return compute_threads.cores()


_THREAD_VARIABLES = ("NUMBA_NUM_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                     "VECLIB_MAXIMUM_THREADS")


def _init_worker(threads):
    """Initializer of every worker process: cap Numba (and any BLAS) at ``threads``.

    In a spawned process this runs before NumPy or Numba are imported (this
    module imports neither), so the environment variables are what they read
    at start-up. A main module that imported Numba already (re-imported by
    spawn) is handled through ``numba.set_num_threads``.
    """
    # Never more than the cores (--threads 10**20 would make every pool fail to start).
    threads = max(1, min(int(threads), available_cores()))
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
        # The dead worker's temporary files: its lock on them died with it.
        _remove_temporary_files(*(task.output_path for task in retry))
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


def _remove_temporary_files(*output_paths):
    """Remove the temporary files killed runs left for these outputs (never a live writer's)."""
    from .io._atomic import remove_stale_temporaries

    remove_stale_temporaries(*output_paths)


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
    format : str, optional
        Output format (see :func:`output_name`); default: each input's own.
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
    from .io.registry import output_choices

    if format is not None and format not in output_choices():
        raise ParameterError("format", f"format must be one of {', '.join(output_choices())}, got {format!r}")
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
        _remove_temporary_files(*outputs)

    options = dict(run_options, overwrite=overwrite)
    if threads is not None:
        options["threads"] = threads
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

