"""Slab planning and the slab loop: every run computes its output slab by slab.

A run is a loop over slabs of output planes along one engine axis::

    for [o0, o1) in slabs:
        [i0, i1) = geometry.input_window(o0, o1, ...)      # the slab's input plus its halo
        x = source.read(i0, i1)                            # only those planes are read
        layer.run_slab(x, i0, o0, o1, out)                 # bitwise equal to a whole-volume run
        writer.write_slab(o0, o1, out)                     # straight into the (temporary) output

The whole-volume ("in memory") run is the one-slab case of the same loop, so a
streamed output is byte for byte the in-memory one. Sources and writers belong
to the format modules (:func:`convt3d_cli.io.open_source`,
:func:`convt3d_cli.io.open_writer`); this module only plans and loops.

Slab axis. The engine slabs along D (axis 2). Array files (npy, npz, HDF5)
store D as their slowest spatial axis, so D-slabs are contiguous there.
NIfTI stores X (= engine D) fastest and Z (= engine W) slowest, so NIfTI
outputs are computed as the *transposed* problem: input ``(N, C, W, H, D)``,
weight kernel axes reversed, per-axis parameters reversed. A ConvTranspose3d
commutes with a permutation of its spatial axes, so this is the same
operation; its D-slabs are NIfTI Z-slabs and its C-ordered output is NIfTI's
Fortran byte order, so slabs go to the file (and through gzip) sequentially.
The orientation is the output format's ``transposed`` attribute
(:func:`convt3d_cli.io.transposed_slabs`), never the slab count.

Memory. :func:`plan_slabs` picks the largest slab whose working set (input
slab with halo and conversion copies, output slab, weights, engine scratch)
fits the budget: ``--max-memory``, else :data:`SOFT_BUDGET` (128 MiB: slabs cost
nothing and keep the process small), or up to half of the available memory
when a single slab needs more than that. The Python interpreter and its
libraries (about 150-250 MiB resident) come on top.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import geometry
from .errors import MemoryLimitError
from .io.safety import available_memory, human_bytes

#: Share of the available memory a run may use when --max-memory is not given.
DEFAULT_SHARE = 0.5
#: Working set aimed at without --max-memory (larger only when one slab needs more).
SOFT_BUDGET = 128 << 20
#: Fixed allowance for buffers outside the slabs (gzip, HDF5 chunk cache, zip, small tables).
FIXED_BYTES = 8 << 20


# --------------------------------------------------------------------------- feasibility

def check_feasible(plan, dtype, transposed, max_memory=None, available=None):
    """Refuse, before anything is built or allocated, a run whose smallest step cannot fit.

    Sizes are Python integers (no overflow whatever the options). The layer's
    weights (a built-in kernel's grow with the cube of the stride) and one
    output plane, the least a slab can hold, must each fit the memory that may
    be used; :func:`plan_slabs` then refines this with the engine's own buffers.

    Parameters
    ----------
    plan : layerplan.LayerPlan
        Validated (``output_shape`` known).
    dtype : numpy dtype
        Compute dtype.
    transposed : bool
        Slab orientation (a plane is ``N x C x D x H`` then, else ``N x C x H x W``).
    max_memory : int, optional
    available : int, optional
        Available memory; measured when not given.

    Raises
    ------
    MemoryLimitError
        Naming the size, the limit and the layer setting that makes it so large.
    """
    if available is None:
        available = available_memory()
    limits = [v for v in (max_memory, available) if v is not None]
    if not limits:
        return
    budget = min(limits)
    limit = (f"--max-memory is {human_bytes(max_memory)}" if max_memory is not None and max_memory == budget
             else f"only {human_bytes(budget)} of memory is available")
    out_shape = tuple(int(v) for v in plan.output_shape)
    n, c, d, h, w = (1,) * (5 - len(out_shape)) + out_shape
    weight_bytes = math.prod(plan.weight_shape) * 8  # a built-in kernel is made in float64
    plane = n * c * (d * h if transposed else h * w) * np.dtype(dtype).itemsize
    if weight_bytes > budget:
        raise MemoryLimitError(
            f"the layer's weights {tuple(plan.weight_shape)} alone need {human_bytes(weight_bytes)} but {limit} "
            f"(kernel_size {geometry.format_triple(plan.params.kernel_size)} is too large)")
    if plane > budget:
        cause = geometry.growth_cause(plan.input_shape[-3:], plan.params)
        raise MemoryLimitError(
            f"one plane of the output {out_shape} needs {human_bytes(plane)} but {limit} ({cause} makes "
            f"the output this large); use a smaller setting or input")


# --------------------------------------------------------------------------- layer

def oriented_layer(input_shape, weight, bias, params, dtype, transposed, kernel=None, path=None, tune=True):
    """The engine layer for the (possibly transposed, possibly edge-padded) problem.

    Parameters
    ----------
    input_shape : tuple
        Engine input ``(N, C, D, H, W)`` as read (not padded, not transposed).
    weight, bias : ndarray or None
        User weights (ignored with ``kernel``).
    params : geometry.LayerParams
        The layer (for a built-in kernel: the reported, unpadded one).
    kernel : {"nearest", "linear"}, optional
    path : str, optional
        Pin the engine path (a worker of a block-wise run uses the client's choice).
    tune : bool
        False: the layer measures its path only when its ``tune()`` is called.

    Returns
    -------
    (PreparedLayer, int)
        The layer and the edge padding the source must add per side (1 for ``linear``).
    """
    from .builtin import builtin_weight
    from .engine import PreparedLayer

    input_shape = tuple(int(v) for v in input_shape)
    pad = 0
    if kernel is not None:
        weight = builtin_weight(kernel, params.stride, input_shape[1], dtype)
    oriented_params = params.reversed_axes() if transposed else params
    stride, padding, output_padding, dilation = (oriented_params.stride, oriented_params.padding_spec,
                                                 oriented_params.output_padding, oriented_params.dilation)
    if kernel is not None:
        bias = None
        if kernel == "linear":
            # Replicate one edge voxel per side (see builtin.apply_builtin).
            pad = 1
            padding = tuple(p + s for p, s in zip(padding, stride + stride if len(padding) == 6 else stride))
    weight = np.asarray(weight)
    canonical = geometry.canonical_weight_shape(weight.shape, input_shape[1], params.groups)
    weight = weight.reshape(canonical)
    shape = input_shape[:2] + tuple(n + 2 * pad for n in input_shape[2:])
    if transposed:
        weight = weight.transpose(0, 1, 2, 5, 4, 3)
        shape = geometry.oriented(shape, True)
    layer = PreparedLayer(shape, weight, bias, stride, padding, output_padding, dilation, params.groups, dtype,
                          path=path, tune=tune)
    return layer, pad


# --------------------------------------------------------------------------- planning

@dataclass
class SlabPlan:
    """How a run is cut: ``slabs`` is a list of ``(out_start, out_stop)``."""

    slabs: list
    budget: int
    needed: int
    axis: str

    @property
    def count(self):
        return len(self.slabs)


def slab_bytes(planes, layer, in_plane_bytes, out_plane_bytes, fixed, pad):
    """Working set of a slab of ``planes`` output planes."""
    k, s, d = layer.params.kernel_size[0], layer.params.stride[0], layer.params.dilation[0]
    in_planes = min(layer.input_shape[2], (planes - 1 + (k - 1) * d) // s + 2)
    # The converted input slab, its staging copy (type conversion, scaling or the edge copy).
    copies = 3 if pad else 2
    return fixed + in_planes * in_plane_bytes * copies + planes * out_plane_bytes


def default_budget():
    """Half of the available memory (``None`` when unknown)."""
    free = available_memory()
    return None if free is None else int(free * DEFAULT_SHARE)


def plan_slabs(layer, pad, max_memory=None, resident=0, transposed=False, available=None, scratch=None):
    """Choose the slabs for a layer under a memory budget.

    Parameters
    ----------
    layer : PreparedLayer
        In slab orientation.
    max_memory : int, optional
        ``--max-memory``; default: about SOFT_BUDGET, at most half of the available memory.
    resident : int
        Bytes held for the whole run outside the slabs (an input loaded whole).
    scratch : int, optional
        The engine's own buffers (default: the layer's path's); 0 checks what the shapes
        alone need, before the path is measured.

    Raises
    ------
    MemoryLimitError
        Even one output plane per slab does not fit; the message names ``--max-memory``.
    """
    n, _, n_out = layer.output_shape[:3]
    itemsize = layer.dtype.itemsize
    out_plane = n * layer.out_channels * layer.output_shape[3] * layer.output_shape[4] * itemsize
    in_plane = n * layer.input_shape[1] * layer.input_shape[3] * layer.input_shape[4] * itemsize
    fixed = FIXED_BYTES + (layer.scratch_bytes() if scratch is None else scratch) + resident
    axis = "Z (NIfTI, engine W)" if transposed else "D"
    if available is None:
        available = available_memory()

    def cost(planes):
        return slab_bytes(planes, layer, in_plane, out_plane, fixed, pad)

    def largest(budget):  # the largest slab within budget, or 0
        if cost(1) > budget:
            return 0
        lo, hi = 1, n_out
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cost(mid) <= budget:
                lo = mid
            else:
                hi = mid - 1
        return lo

    if max_memory is not None:
        budget = max_memory if available is None else min(max_memory, available)
        size = largest(budget)
    else:
        # Without --max-memory: slabs of about SOFT_BUDGET (streaming costs nothing and keeps
        # the resident size low); a layer whose smallest slab is larger may use up to half
        # of the available memory.
        hard = default_budget() if available is not None else None
        budget = SOFT_BUDGET if hard is None else min(SOFT_BUDGET, hard)
        size = largest(budget)
        if not size and hard is not None and hard > budget:
            budget = hard
            size = largest(budget)
        elif not size and hard is None:
            budget, size = cost(1), 1
    if not size:
        smallest = cost(1)
        if resident > budget:
            raise MemoryLimitError(
                f"reading the input takes {human_bytes(resident)} at once (an input that is read whole, or "
                f"the decoded size of its Zarr chunks) but only {human_bytes(budget)} of memory can be used"
                f"{' (--max-memory)' if max_memory is not None and max_memory <= budget else ''}")
        if max_memory is not None and (available is None or max_memory <= available):
            raise MemoryLimitError(
                f"--max-memory {human_bytes(max_memory)} is below the smallest slab this run can "
                f"stream ({human_bytes(smallest)}: one output plane, its input planes, weights and "
                f"buffers); raise --max-memory")
        raise MemoryLimitError(
            f"even streamed one plane at a time the run needs {human_bytes(smallest)} but only "
            f"{human_bytes(budget)} of memory can be used (half of what is available); free memory "
            f"or pass a larger --max-memory")
    count = -(-n_out // size)
    size = -(-n_out // count)  # balanced slabs, none larger than the largest that fits
    slabs = [(start, min(n_out, start + size)) for start in range(0, n_out, size)]
    return SlabPlan(slabs, budget, cost(size), axis)


# --------------------------------------------------------------------------- the loop

def run_slabs(layer, source, writer, plan, progress=None):
    """Compute every slab of ``plan`` and hand it to ``writer`` (which is then committed by the caller)."""
    params = layer.params
    n_in = layer.input_shape[2]
    n = layer.output_shape[0]
    from .engine import ProgressAdapter

    tracker = ProgressAdapter(progress, n * layer.output_shape[2]) if progress else None
    for out_start, out_stop in plan.slabs:
        in_start, in_stop = geometry.input_window(out_start, out_stop, n_in, 0, params)
        if in_stop <= in_start:  # only the bias reaches these planes; the engine still wants a plane
            in_start = min(in_start, n_in - 1)
            in_stop = in_start + 1
        x = source.read(in_start, in_stop)
        out = np.empty(layer.output_shape[:2] + (out_stop - out_start,) + layer.output_shape[3:],
                       dtype=layer.dtype)
        layer.run_slab(x, in_start, out_start, out_stop, out, tracker)
        del x
        writer.write_slab(out_start, out_stop, out)
        del out
        if tracker:
            tracker.slab_done(n * out_stop)


def peak_memory_bytes():
    """Peak resident size of this process so far (bytes).

    ``VmHWM`` of ``/proc/self/status`` where there is one: ``ru_maxrss`` starts at the
    parent's peak on Linux (it survives fork and exec), so a run started by a large
    process would report that process's peak.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return None
