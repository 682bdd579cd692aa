"""Block planning and the block loop: outputs cut along all three axes (chunked stores).

A Zarr output is written chunk by chunk, so its run is cut into *blocks*: boxes of
whole output chunks (whole shards when the store is sharded), so that no two blocks
write the same chunk. Each block is computed on its own::

    for each block [o0, o1) x [o0, o1) x [o0, o1):
        windows = geometry.block_window(...) per axis     # its input window and crops
        x = source.read_window(i0, i1)                    # only the input it reads, with halo
        out = layer.window(x.shape, block_params).run()   # same kernel, same bits
        writer.write_block(region, out[skip ...])

which is what lets blocks run in any order, in other processes or on other machines
(:mod:`convt3d_cli._distributed`), and still give the bits of a whole-volume run:
:meth:`~convt3d_cli.engine.PreparedLayer.block_axes` says along which axes a
layer's kernel keeps its bits when cut; the others span the whole output.

Memory. :func:`plan_blocks` grows the block (in whole chunks, D fastest, as long as
the working set fits the budget: ``--max-memory``, else :data:`~convt3d_cli.slabs.SOFT_BUDGET`
or up to half of the available memory when one chunk's block needs more).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from . import geometry, slabs
from .errors import MemoryLimitError
from .io.safety import available_memory, human_bytes
from .slabs import DEFAULT_SHARE, SOFT_BUDGET

#: Blocks grow up to this working set even when --max-memory allows more: smaller blocks
#: let storing one overlap computing the next, and the process stays small.
BLOCK_TARGET = 256 << 20


#: Blocks a run may be cut into at most (a plan is computed, not listed, so this is a sanity bound).
MAX_BLOCKS = 1 << 40


class BlockGrid(Sequence):
    """The blocks of an output, ``((d0, h0, w0), (d1, h1, w1))`` in C order, computed on demand."""

    def __init__(self, out, shape):
        self.out, self.shape = tuple(out), tuple(shape)
        self.counts = tuple(-(-n // b) for n, b in zip(self.out, self.shape))

    def __len__(self):
        return math.prod(self.counts)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        lo = []
        for count, size in zip(reversed(self.counts), reversed(self.shape)):
            index, position = divmod(index, count)
            lo.append(position * size)
        lo = tuple(reversed(lo))
        return lo, tuple(min(n, a + b) for n, a, b in zip(self.out, lo, self.shape))


@dataclass
class BlockPlan:
    """How a run is cut: ``blocks`` is a :class:`BlockGrid` of output regions."""

    blocks: Sequence
    shape: tuple
    budget: int
    needed: int

    @property
    def count(self):
        return len(self.blocks)


def block_windows(layer, region):
    """The three :class:`~convt3d_cli.geometry.BlockAxis` of an output region of ``layer``."""
    (lo, hi), params = region, layer.params
    return tuple(geometry.block_window(lo[a], hi[a], layer.input_shape[2 + a], layer.out_spatial[a], a, params)
                 for a in range(3))


def compute_block(layer, read, region):
    """Compute one output region.

    Parameters
    ----------
    layer : PreparedLayer
        The whole layer (its path is used for the block).
    read : callable(lo, hi) -> ndarray
        Input window ``[lo, hi)`` per spatial axis, ``(N, Cin, ...)`` in compute dtype.
    region : ((d0, h0, w0), (d1, h1, w1))

    Returns
    -------
    ndarray
        ``(N, Cout, d1 - d0, h1 - h0, w1 - w0)`` in compute dtype (a view of the computed block).
    """
    windows = block_windows(layer, region)
    if any(w.bias_only for w in windows):
        out = np.empty((layer.input_shape[0], layer.out_channels) + tuple(w.out_stop - w.out_start for w in windows),
                       dtype=layer.dtype)
        out[...] = layer.bias.reshape(1, -1, 1, 1, 1)
        return out
    x = np.ascontiguousarray(read(tuple(w.in_start for w in windows), tuple(w.in_stop for w in windows)))
    sub = layer.window(x.shape, geometry.block_params(layer.params, windows), origin=windows[0].in_start)
    out = np.empty(sub.output_shape, dtype=layer.dtype)
    sub.run_slab(x, 0, 0, sub.output_shape[2], out)
    del x
    # A view when the computed range was widened to whole phases: writers copy chunks anyway.
    return out[(slice(None), slice(None)) + tuple(slice(w.skip, w.skip + w.out_stop - w.out_start)
                                                  for w in windows)]


def block_bytes(layer, shape, pad=0, out_itemsize=None):
    """Working set of one block of output ``shape`` (its largest window anywhere in the volume)."""
    itemsize = layer.dtype.itemsize
    params = layer.params
    computed, inputs = [], []
    for a, n in enumerate(shape):
        k, s, d = params.kernel_size[a], params.stride[a], params.dilation[a]
        span = min(layer.out_spatial[a], n + 2 * (s - 1))                 # widened to whole phases
        computed.append(span)
        inputs.append(min(layer.input_shape[2 + a], (span - 1 + (k - 1) * d) // s + 2))
    n_batch = layer.input_shape[0]
    x = n_batch * layer.input_shape[1] * math.prod(inputs) * itemsize
    out = n_batch * layer.out_channels * math.prod(computed) * itemsize
    stored = n_batch * layer.out_channels * math.prod(shape) * (out_itemsize or itemsize)
    # Input as read and converted (and its edge copy), the computed block, its stored copy and
    # the store's chunk copies, the previous block still being stored (run_blocks overlaps
    # them), and the kernel's scratch for a layer of this window (bounded by the whole layer's).
    window = ((n_batch, layer.input_shape[1], *inputs), (n_batch, layer.out_channels, *computed))
    return slabs.FIXED_BYTES + x * (3 if pad else 2) + 2 * out + 2 * stored + layer.scratch_bytes(window)


def plan_blocks(layer, chunks, max_memory=None, pad=0, out_itemsize=None, available=None, min_blocks=1,
                reserve=0.0):
    """Cut the output into blocks of whole chunks that fit the memory budget.

    Parameters
    ----------
    layer : PreparedLayer
    chunks : tuple of 3 int
        The output's chunk (or shard) shape along D, H, W: blocks are multiples of it.
    max_memory : int, optional
        ``--max-memory``: blocks grow (W, H, D in turn, doubling) while they fit it and
        :data:`BLOCK_TARGET`.
        Default: they grow within :data:`~convt3d_cli.slabs.SOFT_BUDGET`; a layer whose
        one-chunk block needs more may use up to half of the available memory, with
        blocks of one chunk.
    min_blocks : int
        Stop growing before the output has fewer blocks than this (tasks for a cluster).
    reserve : float
        Share of the budget blocks leave free when they grow (for the input's chunk cache).

    Raises
    ------
    MemoryLimitError
        One chunk's block does not fit.
    """
    out = layer.out_spatial
    axes = layer.block_axes
    chunks = tuple(min(int(c), n) for c, n in zip(chunks, out))
    # Axes the kernel cannot cut span the whole output.
    base = tuple(chunks[a] if a in axes else out[a] for a in range(3))
    if available is None:
        available = available_memory()
    hard = None if available is None else int(available * DEFAULT_SHARE)

    def cost(shape):
        return block_bytes(layer, shape, pad, out_itemsize)

    def count(shape):
        return math.prod(-(-n // b) for n, b in zip(out, shape))

    grow = True
    if max_memory is not None:
        budget = max_memory if available is None else min(max_memory, available)
        target = min(budget, BLOCK_TARGET)
    else:
        budget = SOFT_BUDGET if hard is None else min(SOFT_BUDGET, hard)
        if cost(base) > budget and (hard is None or cost(base) <= hard):
            budget, grow = cost(base) if hard is None else hard, False
        target = budget
    if cost(base) > budget:
        limit = (f"--max-memory is {human_bytes(max_memory)}" if max_memory is not None
                 else f"only {human_bytes(budget)} can be used (half of the available memory)")
        raise MemoryLimitError(f"one block of output chunks {'x'.join(map(str, base))} needs "
                               f"{human_bytes(cost(base))} but {limit}; use smaller --chunks or raise --max-memory")
    shape = list(base)
    while grow:  # double along W, H, D in turn (a row of chunks first: longer contiguous reads)
        grow = False
        for a in (2, 1, 0):
            if a not in axes or shape[a] >= out[a]:
                continue
            trial = list(shape)
            trial[a] = min(out[a], shape[a] * 2)
            if cost(tuple(trial)) <= target * (1 - reserve) and count(trial) >= min_blocks:
                shape, grow = trial, True
    return BlockPlan(_grid(out, shape), tuple(shape), budget, cost(tuple(shape)))


def _grid(out, shape):
    grid = BlockGrid(out, shape)
    if len(grid) > MAX_BLOCKS:
        raise MemoryLimitError(f"the output {'x'.join(map(str, out))} would be cut into {len(grid)} blocks of "
                               f"{'x'.join(map(str, shape))}; that is no volume convt3d can write")
    return grid


def fixed_plan(layer, shape, pad=0, out_itemsize=None, max_memory=None):
    """The plan of blocks of a given ``shape`` (an interrupted run's, continued by ``--resume``).

    Raises
    ------
    MemoryLimitError
        Those blocks need more than ``max_memory``.
    """
    shape = tuple(int(v) for v in shape)
    out = layer.out_spatial
    need = block_bytes(layer, shape, pad, out_itemsize)
    if max_memory is not None and need > max_memory:
        raise MemoryLimitError(f"the interrupted run used blocks of {'x'.join(map(str, shape))}, which need "
                               f"{human_bytes(need)}; give --max-memory of at least that to resume it, or run "
                               f"without --resume to start again")
    return BlockPlan(_grid(out, shape), shape, max(need, max_memory or 0), need)


def run_blocks(layer, source, writer, plan, progress=None, skip=()):
    """Compute every block of ``plan`` (but those in ``skip``) and hand it to ``writer.write_block``."""
    todo = ((index, region) for index, region in enumerate(plan.blocks) if index not in skip)
    done = len([i for i in skip if 0 <= i < plan.count])

    def advance(count):
        if progress:
            progress(done + count, plan.count)

    compute_regions(layer, source, writer.write_block, todo, advance)


def compute_regions(layer, source, store, items, advance=None):
    """Compute blocks ``(index, region)`` in turn and ``store(index, region, block)`` each.

    A block is stored (compressed, written) by a second thread while the next one is
    computed; :func:`block_bytes` counts the block in flight. ``advance(n)`` is called
    with the number of blocks stored so far.

    Returns
    -------
    int
        Blocks computed.
    """
    from concurrent.futures import ThreadPoolExecutor

    count = 0
    with ThreadPoolExecutor(1, thread_name_prefix="convt3d-store") as pool:
        pending = None
        for index, region in items:
            block = compute_block(layer, source.read_window, region)
            if pending is not None:
                pending.result()
                if advance:
                    advance(count)
            pending = pool.submit(store, index, region, block)
            del block
            count += 1
        if pending is not None:
            pending.result()
    if advance and count:
        advance(count)
    return count
