"""One file's job in a batch: a picklable task, the worker function, its result.

Shared by the local process pool (:mod:`convt3d_cli.batch`) and the Dask
cluster (:mod:`convt3d_cli._distributed`). Every file goes through
:func:`convt3d_cli.pipeline.run_file`, exactly as ``convt3d run`` would process
it; one failing file never stops the others: its error becomes a ``"failed"``
:class:`FileResult`.

Only the standard library is imported at load time: this module is unpickled
first thing in every spawned worker, whose thread limits must be set before
NumPy and Numba are imported.
"""

from __future__ import annotations

import os
import traceback
from dataclasses import dataclass, field

from .errors import Convt3dError


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
    for name in ("weights", "bias", "like"):
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
    from .engine._layer import many_layers

    failure = None
    try:
        with many_layers():
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
