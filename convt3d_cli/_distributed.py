"""Run a batch on a ``dask.distributed`` cluster (``convt3d batch --scheduler ADDRESS``).

Dask does the distribution (scheduling, worker failures, data locality, the
dashboard); convt3d only submits one task per file, each calling
:func:`convt3d_cli.tasks.run_task` on a worker, and gathers the results as
they complete. Workers need convt3d installed and see the files at the same
absolute paths (a shared file system).

Dask is an optional dependency (``pip install "convt3d[distributed]"``) and
is imported only from the functions here, never when the command line starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

from .errors import DistributedUnavailable, SchedulerError
from .tasks import lost_result, run_task

#: What to run to get the cluster support.
INSTALL_HINT = 'pip install "convt3d[distributed]"'

# One file at a time per worker process. Numba already spreads a file over the
# process' cores; two files computing at once in one process would oversubscribe
# them (and Numba's workqueue threading layer aborts on concurrent launches).
# Workers started with ``--nthreads 1`` never wait on this lock.
_COMPUTE = threading.Lock()


def require():
    """Import ``distributed`` or raise a one-line error saying how to install it.

    Returns
    -------
    module
        ``distributed``.

    Raises
    ------
    DistributedUnavailable
    """
    try:
        import distributed
    except ImportError as err:
        raise DistributedUnavailable(
            f"--scheduler needs Dask ({err}); install it with: {INSTALL_HINT}") from None
    return distributed


def run_on_worker(task):
    """The Dask task: process one file on a worker (never raises for a bad file)."""
    with _COMPUTE:
        return run_task(task)


def _lost(task, error):
    """The failed result for a task Dask could not complete."""
    name = type(error).__name__
    if isinstance(error, ImportError) and "convt3d" in str(error):
        reason = f"the Dask worker cannot import convt3d ({error}); install convt3d on every worker"
    elif name == "KilledWorker":
        reason = ("the Dask workers running this file died (out of memory?); rerun with "
                  "--skip-existing to resume")
    else:
        reason = f"the Dask task failed: {name}: {error}"
    return lost_result(task, " ".join(reason.split()))


def run_on_scheduler(address, tasks, on_result):
    """Submit one task per file to the scheduler at ``address`` and report results as they come.

    Parameters
    ----------
    address : str
        Scheduler address, e.g. ``tcp://10.0.0.5:8786``.
    tasks : list of tasks.Task
    on_result : callable(tasks.FileResult)
        Called in this process, in completion order.

    Raises
    ------
    SchedulerError
        The scheduler cannot be reached.
    """
    distributed = require()
    try:
        client = distributed.Client(address, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise SchedulerError(f"cannot reach the Dask scheduler at {address}: {err}") from None
    with client:
        token = uuid.uuid4().hex[:8]
        futures = {}
        for task in tasks:
            # pure=False: a rerun must compute again (files may have changed); the key names the
            # file's position for the dashboard; a higher priority for earlier files keeps the
            # input order roughly, as locally.
            future = client.submit(run_on_worker, task, key=f"convt3d-{token}-{task.index}", pure=False,
                                   priority=-task.index)
            futures[future] = task
        try:
            for future in distributed.as_completed(futures, loop=client.loop):
                task = futures[future]
                try:
                    result = future.result()
                except (Exception, asyncio.CancelledError) as err:   # run_task never raises: Dask lost it
                    result = _lost(task, err)
                on_result(result)
        except BaseException:
            # Ctrl-C or a failing callback: do not leave the remaining files queued on the cluster.
            client.cancel(list(futures))
            raise


# --------------------------------------------------------------------------- one volume, block by block

_MALLOC_TUNED = []


def _heap_for_blocks():
    """Give this worker process glibc's usual heap behaviour back (once).

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` so that freed
    memory returns to the system at once. Setting it also pins glibc's mmap threshold
    at 128 KiB, so every buffer above that (the store's 8 MiB chunk buffers, the
    block's arrays) is a fresh mapping whose pages fault in again: a block-wise run
    measured 1.6x slower in such a worker. Heap buffers up to 64 MiB are reused, and
    at most 256 MiB of free heap is kept.
    """
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED.append(True)
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc: nothing to undo
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    mallopt(m_mmap_threshold, 64 << 20)
    mallopt(m_trim_threshold, 256 << 20)


def _block_task(job, items, stop=None):
    """The Dask task of a block-wise run: compute and store a run of neighbouring blocks on a worker.

    A refusal (a damaged input chunk, a full disk) is returned as ``("error", message)``
    rather than raised, so that Dask does not retry what would fail again. ``stop`` names
    a Dask ``Event``: once the client sets it (another block failed), the task starts no
    further block.
    """
    from .blockrun import compute_and_store
    from .errors import Convt3dError

    _heap_for_blocks()
    with _COMPUTE:
        try:
            return ("ok", compute_and_store(job, _until_stopped(items, stop)))
        except Convt3dError as exc:
            return ("error", type(exc).__name__, str(exc))


def _until_stopped(items, stop):
    """``items`` until the Dask ``Event`` named ``stop`` is set."""
    if stop is None:
        yield from items
        return
    import distributed

    event = distributed.Event(stop)
    for item in items:
        if event.is_set():
            return
        yield item


#: Seconds a failed run waits for the blocks still being computed on the cluster to end
#: (each task stops after its current block) before it removes the partial store.
STOP_WAIT = 600
#: Times Dask runs a task again after its worker died or the task raised.
BLOCK_RETRIES = 3
#: Tasks per Dask thread of the cluster, about: a task computes a run of neighbouring blocks
#: (they share input chunks, and storing one overlaps computing the next).
TASKS_PER_THREAD = 4


def run_blocks_on_scheduler(address, job, todo, total, progress=None):
    """Run block tasks on the cluster at ``address``; returns the values clipped in all blocks.

    Parameters
    ----------
    address : str
        Scheduler address (``tcp://host:8786``).
    job : blockrun.BlockJob
    todo : list of (index, region)
        The blocks to compute (a resumed run leaves out the complete ones), in order: runs of
        consecutive ones become one task each.
    total : int
        Blocks of the whole run (for the progress count).
    progress : callable(done, total), optional

    Raises
    ------
    SchedulerError
        The scheduler cannot be reached, or a block failed on every retry.
    Convt3dError
        A block was refused (the error of the first one, as raised locally).
    """
    from . import errors

    distributed = require()
    try:
        client = distributed.Client(address, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as err:
        raise SchedulerError(f"cannot reach the Dask scheduler at {address}: {err}") from None
    clipped = 0
    done = total - len(todo)
    with client:
        # The job (weights, settings, the output's layout) goes to the cluster once.
        [remote_job] = client.scatter([job], broadcast=True, hash=False)
        threads = max(1, sum(client.nthreads().values()))
        size = max(1, -(-len(todo) // (TASKS_PER_THREAD * threads)))
        groups = [todo[start:start + size] for start in range(0, len(todo), size)]
        stop = f"convt3d-stop-{job.token}-{uuid.uuid4().hex}"
        futures = {client.submit(_block_task, remote_job, group, stop, key=f"convt3d-block-{job.token}-{group[0][0]}",
                                 pure=False, retries=BLOCK_RETRIES, priority=-number): group
                   for number, group in enumerate(groups)}
        try:
            for future in distributed.as_completed(futures, loop=client.loop):
                try:
                    result = future.result()
                except (Exception, asyncio.CancelledError) as err:  # noqa: BLE001 - Dask lost it
                    name = type(err).__name__
                    why = ("its workers died (out of memory?)" if name == "KilledWorker" else f"{name}: {err}")
                    first = futures[future][0][0]
                    raise SchedulerError(" ".join(f"blocks from {first} failed on the cluster: {why}; "
                                                  f"rerun with --resume to continue".split())) from None
                if result[0] == "error":
                    kind = getattr(errors, result[1], errors.Convt3dError)
                    raise (kind(result[2]) if kind is not errors.ParameterError else errors.Convt3dError(result[2]))
                clipped += result[1]
                done += len(futures[future])
                if progress:
                    progress(done, total)
        except BaseException as failure:
            # Cancelling does not stop a task already running: it would go on writing into
            # the partial store that the caller removes. Tell every task to start no other
            # block, and after an error (not Ctrl-C, which keeps the store) wait for them.
            with contextlib.suppress(Exception):  # the cluster went away too: nothing to wait for
                distributed.Event(stop, client=client).set()
                if isinstance(failure, Exception):
                    distributed.wait(list(futures), timeout=STOP_WAIT)
            client.cancel(list(futures))
            raise
    return clipped
