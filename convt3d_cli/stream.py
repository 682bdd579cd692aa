"""Out-of-core runs: compute the output in slabs and write each slab as it is produced.

A run is a loop over slabs of output planes along one engine axis::

    for [o0, o1) in slabs:
        [i0, i1) = geometry.input_window(o0, o1, ...)      # the slab's input plus its halo
        x = source.read(i0, i1)                            # only those planes are read
        layer.run_slab(x, i0, o0, o1, out)                 # bitwise equal to a whole-volume run
        writer.write_slab(o0, o1, out)                     # straight into the (temporary) output

The whole-volume ("in memory") run is the one-slab case of the same loop, so a
streamed output is byte for byte the in-memory one.

Slab axis. The engine slabs along D (axis 2). Array files (npy, npz, HDF5)
store D as their slowest spatial axis, so D-slabs are contiguous there.
NIfTI stores X (= engine D) fastest and Z (= engine W) slowest, so NIfTI
outputs are computed as the *transposed* problem: input ``(N, C, W, H, D)``,
weight kernel axes reversed, per-axis parameters reversed. A ConvTranspose3d
commutes with a permutation of its spatial axes, so this is the same
operation; its D-slabs are NIfTI Z-slabs and its C-ordered output is NIfTI's
Fortran byte order, so slabs go to the file (and through gzip) sequentially.
The orientation depends only on the output format, never on the slab count.

Memory. :func:`plan_slabs` picks the largest slab whose working set (input
slab with halo and conversion copies, output slab, weights, engine scratch)
fits the budget: ``--max-memory``, else :data:`SOFT_BUDGET` (128 MiB: slabs cost
nothing and keep the process small), or up to half of the available memory
when a single slab needs more than that. The
Python interpreter and its libraries (about 150-250 MiB resident) come on top.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import numpy as np

from . import geometry
from .errors import MemoryLimitError
from .io._common import available_memory, human_bytes, reading
from .io.nifti import apply_scaling

#: Share of the available memory a run may use when --max-memory is not given.
DEFAULT_SHARE = 0.5
#: Working set aimed at without --max-memory (larger only when one slab needs more).
SOFT_BUDGET = 128 << 20
#: Fixed allowance for buffers outside the slabs (gzip, HDF5 chunk cache, zip, small tables).
FIXED_BYTES = 8 << 20


def _reverse(triple):
    return tuple(reversed(tuple(triple)))


def _orient(shape, transposed):
    shape = tuple(shape)
    return shape[:2] + _reverse(shape[2:]) if transposed else shape


# --------------------------------------------------------------------------- layer

def oriented_layer(input_shape, weight, bias, params, dtype, transposed, kernel=None):
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

    Returns
    -------
    (PreparedLayer, int)
        The layer and the edge padding the source must add per side (1 for ``linear``).
    """
    from .builtin import builtin_weight
    from .engine import PreparedLayer

    input_shape = tuple(int(v) for v in input_shape)
    pad = 0
    stride, padding, output_padding, dilation = (params.stride, params.padding, params.output_padding,
                                                 params.dilation)
    if kernel is not None:
        channels = input_shape[1]
        weight = builtin_weight(kernel, stride, channels, dtype)
        bias = None
        if kernel == "linear":
            # Replicate one edge voxel per side (see builtin.apply_builtin).
            pad = 1
            padding = tuple(p + s for p, s in zip(padding, stride))
    weight = np.asarray(weight)
    canonical = geometry.canonical_weight_shape(weight.shape, input_shape[1], params.groups)
    weight = weight.reshape(canonical)
    shape = input_shape[:2] + tuple(n + 2 * pad for n in input_shape[2:])
    if transposed:
        weight = weight.transpose(0, 1, 2, 5, 4, 3)
        shape = _orient(shape, True)
        stride, padding, output_padding, dilation = (_reverse(v) for v in
                                                     (stride, padding, output_padding, dilation))
    layer = PreparedLayer(shape, weight, bias, stride, padding, output_padding, dilation, params.groups, dtype)
    return layer, pad


# --------------------------------------------------------------------------- sources

class Source:
    """Input planes ``[a, b)`` along the slab axis, in compute dtype, C-contiguous.

    Subclasses provide :meth:`_raw`, planes of the unpadded input in slab
    orientation in any dtype; this class converts (NIfTI scaling in the
    reading dtype, exactly as :func:`io.read_volume` does), and adds the
    replicated edge of the ``linear`` kernel.
    """

    #: Bytes held for the whole run (an input that had to be loaded whole).
    resident_bytes = 0

    def __init__(self, info, transposed, dtype, pad):
        self.info = info
        self.transposed = transposed
        self.dtype = np.dtype(dtype)
        self.pad = pad
        self.shape = _orient(tuple(info.engine_shape), transposed)  # unpadded
        self.read_dtype = np.dtype(info.read_dtype)
        self.scaling = getattr(info, "scaling", None)

    @property
    def padded_shape(self):
        return self.shape[:2] + tuple(n + 2 * self.pad for n in self.shape[2:])

    def _raw(self, a, b):
        raise NotImplementedError

    def _converted(self, a, b):
        raw = self._raw(a, b)
        shape = self.shape[:2] + (b - a,) + self.shape[3:]
        if self.scaling is None and self.read_dtype == self.dtype:
            out = np.empty(shape, dtype=self.dtype)
            np.copyto(out, raw, casting="unsafe")
            return out
        stage = np.empty(shape, dtype=self.read_dtype)
        np.copyto(stage, raw, casting="unsafe")
        del raw
        apply_scaling(stage, self.scaling)
        return np.ascontiguousarray(stage, dtype=self.dtype)

    def read(self, a, b):
        """Planes ``[a, b)`` of the (padded) input along the slab axis."""
        if not self.pad:
            return self._converted(a, b)
        n = self.shape[2]
        lo, hi = min(max(a - 1, 0), n - 1), min(max(b - 2, 0), n - 1) + 1
        core = self._converted(lo, hi)
        index = np.clip(np.arange(a, b) - 1, 0, n - 1) - lo
        planes = np.take(core, index, axis=2)
        del core
        return np.pad(planes, [(0, 0)] * 3 + [(1, 1)] * 2, mode="edge")

    def close(self):
        pass


class ArraySource(Source):
    """Anything indexable in engine layout: a NumPy memory map, an in-memory array."""

    def __init__(self, info, transposed, dtype, pad, engine_array, keep=None):
        super().__init__(info, transposed, dtype, pad)
        self.array = _orient_view(engine_array, transposed)
        self._keep = keep

    def _raw(self, a, b):
        return self.array[:, :, a:b]

    def close(self):
        self.array = None
        if self._keep is not None:
            self._keep.close()
            self._keep = None


def _orient_view(array, transposed):
    return array.transpose(0, 1, 4, 3, 2) if transposed else array


class Hdf5Source(Source):
    """An HDF5 dataset, sliced per slab (h5py reads only the chunks touched)."""

    def __init__(self, info, transposed, dtype, pad):
        super().__init__(info, transposed, dtype, pad)
        from .io.hdf5 import _h5py

        with reading(info.path, "HDF5"):
            self.handle = _h5py().File(info.path, "r")
            self.dataset = self.handle[info.key]
        self.rank = len(info.stored_shape)

    def _raw(self, a, b):
        lead = self.rank - 3
        if self.transposed:
            index = (slice(None),) * (lead + 2) + (slice(a, b),)
        else:
            index = (slice(None),) * lead + (slice(a, b),)
        with reading(self.info.path, "HDF5"):
            block = self.dataset[index]
        block = block.reshape((1,) * (5 - block.ndim) + block.shape)
        return _orient_view(block, self.transposed)

    def close(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


class GzipPlaneSource(Source):
    """A one-channel ``.nii.gz`` read forward, Z plane by Z plane (transposed orientation only).

    Slabs ask for non-decreasing plane ranges, so the stream is decompressed
    once, keeping only the planes the current slab needs.
    """

    def __init__(self, info, dtype, pad):
        super().__init__(info, True, dtype, pad)
        from .io import _gzip
        from .io.nifti import _skip

        x, y = info.stored_shape[:2]
        self.plane_shape = (y, x)
        self.stored = np.dtype(info.stored_dtype)
        self.plane_bytes = x * y * self.stored.itemsize
        self.n = self.shape[2]
        with reading(info.path, "NIfTI"):
            self.stream = _gzip.open_read(info.path)
            _skip(self.stream, info.data_offset)
        self.cache = np.empty((0,) + self.plane_shape, dtype=self.stored)
        self.first = 0  # global index of cache[0]

    def _raw(self, a, b):
        if a < self.first:
            raise RuntimeError("a .nii.gz input is read forward only")
        have_stop = self.first + len(self.cache)
        block = np.empty((b - a,) + self.plane_shape, dtype=self.stored)
        keep = max(0, min(have_stop, b) - a)
        if keep:
            block[:keep] = self.cache[a - self.first:a - self.first + keep]
        todo = memoryview(block[keep:].reshape(-1).view(np.uint8))
        skip = (a - have_stop) * self.plane_bytes if a > have_stop else 0
        with reading(self.info.path, "NIfTI"):
            while skip:
                skip -= len(self.stream.read(min(skip, 16 << 20)))
            done = 0
            while done < len(todo):
                got = self.stream.readinto(todo[done:])
                if not got:
                    raise EOFError(f"the stream ends after {(keep * self.plane_bytes + done)} bytes of the slab")
                done += got
            if b == self.n:
                while self.stream.read(16 << 20):  # the CRC is checked at the end only
                    pass
        self.cache, self.first = block, a
        return block[None, None]

    def close(self):
        if self.stream is not None:
            self.stream.close()
            self.stream = None


def open_source(info, transposed, dtype, pad, scratch_dir):
    """The right :class:`Source` for a probed input (:class:`io.VolumeInfo`)."""
    from .io import nifti

    if info.format == "nifti":
        stored = np.dtype(info.stored_dtype)
        if not info.path.lower().endswith(".gz"):
            with reading(info.path, "NIfTI"):
                raw = np.memmap(info.path, dtype=stored, mode="r", offset=info.data_offset,
                                shape=tuple(info.stored_shape), order="F")
            return ArraySource(info, transposed, dtype, pad, nifti.engine_view(raw))
        if transposed and info.engine_shape[1] == 1:
            return GzipPlaneSource(info, dtype, pad)
        # Random access into a .nii.gz: decompress once into an anonymous file, map it.
        spool = tempfile.TemporaryFile(dir=scratch_dir, prefix=".convt3d-input-")
        from .io import _gzip
        with reading(info.path, "NIfTI"), _gzip.open_read(info.path) as stream:
            nifti._skip(stream, info.data_offset)
            need = math.prod(info.stored_shape) * stored.itemsize
            done = 0
            while done < need:
                piece = stream.read(min(16 << 20, need - done))
                if not piece:
                    raise EOFError(f"{info.path} is truncated: the stream ends after {done} of "
                                   f"{need} bytes of data")
                spool.write(piece)
                done += len(piece)
            while stream.read(16 << 20):
                pass
        spool.flush()
        raw = np.memmap(spool, dtype=stored, mode="r", shape=tuple(info.stored_shape), order="F")
        return ArraySource(info, transposed, dtype, pad, nifti.engine_view(raw), keep=spool)
    if info.format == "hdf5":
        return Hdf5Source(info, transposed, dtype, pad)
    if info.format == "npy":
        with reading(info.path, "a .npy file"):
            array = np.load(info.path, mmap_mode="r", allow_pickle=False)
        return ArraySource(info, transposed, dtype, pad, array.reshape(info.engine_shape))
    # npz members are (possibly compressed) zip entries: loaded whole, counted in the plan.
    from .io import read_volume

    volume = read_volume(info.path if info.key is None else f"{info.path}:{info.key}")
    source = ArraySource(info, transposed, dtype, pad, volume.data)
    source.resident_bytes = volume.data.nbytes
    return source


def source_resident_bytes(info):
    """Bytes an input occupies for the whole run (npz members are loaded whole)."""
    return info.nbytes if info.format == "npz" else 0


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


def engine_scratch(layer):
    """Upper bound of the engine's own buffers (packed weights, per-thread input blocks)."""
    return layer.scratch_bytes()


def default_budget():
    """Half of the available memory (``None`` when unknown)."""
    free = available_memory()
    return None if free is None else int(free * DEFAULT_SHARE)


def plan_slabs(layer, pad, max_memory=None, resident=0, transposed=False, available=None):
    """Choose the slabs for a layer under a memory budget.

    Parameters
    ----------
    layer : PreparedLayer
        In slab orientation.
    max_memory : int, optional
        ``--max-memory``; default: about SOFT_BUDGET, at most half of the available memory.
    resident : int
        Bytes held for the whole run outside the slabs (an input loaded whole).

    Raises
    ------
    MemoryLimitError
        Even one output plane per slab does not fit; the message names ``--max-memory``.
    """
    n, _, n_out = layer.output_shape[:3]
    itemsize = layer.dtype.itemsize
    out_plane = n * layer.out_channels * layer.output_shape[3] * layer.output_shape[4] * itemsize
    in_plane = n * layer.input_shape[1] * layer.input_shape[3] * layer.input_shape[4] * itemsize
    fixed = FIXED_BYTES + engine_scratch(layer) + resident
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
    """Peak resident size of this process so far (bytes)."""
    try:
        import resource

        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    except (ImportError, OSError):  # pragma: no cover - not on Linux/macOS
        return None
