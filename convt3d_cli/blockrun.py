"""One volume into a chunked store, block by block, here or on a Dask cluster.

:func:`run_blockwise` is the Zarr branch of :func:`convt3d_cli.pipeline.run_file`:
it plans blocks of whole output chunks (:mod:`convt3d_cli.blocks`), opens the
output store under its partial name, computes the blocks in this process or as
tasks on a ``dask.distributed`` cluster (:mod:`convt3d_cli._distributed`) and
renames the store onto the target when every block is in.

A worker needs only a :class:`BlockJob`: where the input is, how to build the
layer (weights and settings, the engine path chosen here), and where and how
the output array stores blocks. Workers open the stores themselves; no voxel
passes through the client or the scheduler.

Failures: a refusal (a damaged chunk, a full disk) removes the partial store; an
interruption (Ctrl-C, SIGTERM) keeps it, and ``--resume`` continues from the
blocks whose markers exist (:class:`~convt3d_cli.io.omezarr.StoreLayout`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import numpy as np

from . import blocks, io
from . import threads as compute_threads
from .io.safety import human_bytes


@dataclass
class BlockJob:
    """Everything a process needs to compute and store blocks of one run (picklable)."""

    input: str
    fourth_axis: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    kernel: str | None
    params: object
    dtype: str
    path: str
    pad: int
    layout: object
    token: str
    threads: int | None = None
    window_cache: int = 0


#: Blocks a cluster run is cut into at least (when its chunks allow).
CLUSTER_MIN_BLOCKS = 64

_CACHE = {}
_CACHE_LOCK = threading.Lock()


def _prepared(job):
    """The layer and input source of ``job`` in this process (built once per run and process)."""
    from . import slabs

    with _CACHE_LOCK:
        if job.token in _CACHE:
            return _CACHE[job.token]
        for old in list(_CACHE):
            _CACHE.pop(old)[1].close()
        info = io.with_fourth_axis(io.probe_volume(job.input), job.fourth_axis,
                                   None if job.weight is None else _in_channels(job.weight.shape))
        compute = np.dtype(job.dtype)
        layer, pad = slabs.oriented_layer(info.engine_shape, job.weight, job.bias, job.params, compute, False,
                                          kernel=job.kernel, path=job.path)
        import os

        source = io.open_source(info, False, compute, pad, os.path.dirname(job.layout.store))
        source.window_cache = job.window_cache
        _CACHE[job.token] = (layer, source)
        return layer, source


def _in_channels(shape):
    return shape[0] * shape[1] if len(shape) == 6 else shape[0]


def compute_and_store(job, items):
    """Compute blocks ``[(index, region), ...]`` of ``job`` in turn and store them (each marked
    complete when written); returns the values clipped."""
    clipped = []

    def store(index, region, block):
        clipped.append(job.layout.write(index, region, block))

    with compute_threads.limited(job.threads):
        layer, source = _prepared(job)
        blocks.compute_regions(layer, source, store, items)
    return sum(clipped)


def run_blockwise(layer, pad, info, input, output, plan, stored, compute, *, overwrite, max_memory, store_options,
                  scheduler, resume, fingerprint, echo, progress, fourth_axis, folder, kernel=None, threads=None):
    """Write ``output`` (a Zarr store) block by block; see the module docstring.

    Returns
    -------
    dict
        ``file_shape``, ``clipped``, ``dtype``, ``blocks``, ``block_shape``, ``chunks``,
        ``resumed_blocks``, ``scheduler``.
    """
    import os
    import uuid

    from .io._atomic import Terminated

    from .io.registry import format_for

    chunks = io.output_chunks(output, info, plan.output_shape, store_options.get("chunks"),
                              store_options.get("shards"))
    # A chunked input keeps the chunks around the last window for the next (neighbouring) one:
    # blocks take half of the budget then, and the input's box the rest.
    caches = format_for(info.path).caches_windows
    # On a cluster, enough blocks to keep the workers busy (and to lose little with one).
    bplan = blocks.plan_blocks(layer, chunks, max_memory, pad, stored.itemsize,
                               min_blocks=CLUSTER_MIN_BLOCKS if scheduler else 1, reserve=0.5 if caches else 0)
    window_cache = max(0, bplan.budget - bplan.needed) if caches else 0
    writer = io.open_block_writer(output, plan.output_shape, like=info, params=plan.params, formula=plan.formula,
                                  overwrite=overwrite, source=input, dtype=compute, output_dtype=stored,
                                  chunks=store_options.get("chunks") or (None if store_options.get("shards")
                                                                         else chunks),
                                  shards=store_options.get("shards"), compressor=store_options.get("compressor"),
                                  resume=resume, fingerprint=fingerprint, blocks=list(bplan.shape))
    if tuple(writer.block_shape) != tuple(bplan.shape):   # continuing a run planned with other blocks
        try:
            bplan = blocks.fixed_plan(layer, writer.block_shape, pad, stored.itemsize, max_memory)
        except BaseException:
            writer.abort(keep=True)
            raise
    skip = writer.done() if resume else set()
    echo(f"blocks:  {bplan.count} blocks of {'x'.join(map(str, bplan.shape))} voxels (chunks "
         f"{'x'.join(map(str, writer.chunks))}), about {human_bytes(bplan.needed)} each "
         f"(budget {human_bytes(bplan.budget)})" + (f"; {len(skip)} already done" if skip else ""))
    try:
        if scheduler:
            from . import _distributed

            job = BlockJob(input=os.path.abspath(io.split_spec(input)[0]) + (
                f":{io.split_spec(input)[1]}" if io.split_spec(input)[1] else ""),
                fourth_axis=info.fourth_axis or fourth_axis, weight=_user_weight(layer, kernel),
                bias=None if kernel else layer.bias, kernel=kernel, params=plan.params, dtype=compute.name,
                path=layer.path, pad=pad, layout=writer.layout, token=uuid.uuid4().hex, threads=threads,
                window_cache=window_cache)
            todo = [(index, region) for index, region in enumerate(bplan.blocks) if index not in skip]
            echo(f"cluster: {scheduler}, {len(todo)} block tasks")
            writer.clipped += _distributed.run_blocks_on_scheduler(scheduler, job, todo, bplan.count, progress)
        else:
            source = io.open_source(info, False, compute, pad, folder)
            source.window_cache = window_cache
            try:
                blocks.run_blocks(layer, source, writer, bplan, progress, skip)
            finally:
                source.close()
        writer.commit()
    except (KeyboardInterrupt, Terminated):
        writer.abort(keep=True)
        raise
    except BaseException:
        writer.abort()
        raise
    return {"file_shape": writer.file_shape, "clipped": writer.clipped, "dtype": writer.dtype,
            "blocks": bplan.count, "block_shape": list(bplan.shape), "chunks": list(writer.chunks),
            "resumed_blocks": len(skip), "scheduler": scheduler}


def _user_weight(layer, kernel):
    """The weight a worker rebuilds the layer from: none for a built-in kernel (it is made again)."""
    if kernel:
        return None
    return layer.weight
