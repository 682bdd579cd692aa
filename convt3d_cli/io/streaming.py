"""Slab writers and slab sources: the bases every format's streaming builds on.

A run computes its output in slabs of planes along one engine axis (see
:mod:`convt3d_cli.slabs`). Each format module subclasses :class:`StreamWriter`
to put slabs straight into its file, and :class:`Source` (usually through
:class:`ArraySource`) to hand out the input planes a slab reads.

Slab orientation (``transposed``, a class attribute of a format)
    Arrays (npy, npz, HDF5) are C-ordered ``(N, C, D, H, W)``: D is the slowest
    spatial axis, so a D-slab is one contiguous run of bytes per (n, c). NIfTI
    is Fortran-ordered ``(X, Y, Z[, C])`` with engine D = X the *fastest* axis;
    its slabs run along engine W = NIfTI Z instead, and arrive *transposed*,
    ``(N, C, W, H, D)`` C-ordered, which is the file's byte order.

The writer's file lives at a temporary name beside the target until
:meth:`StreamWriter.commit` renames it (:func:`~convt3d_cli.io._atomic.atomic_write`:
a failure, Ctrl-C or SIGTERM removes the temporary file). Writes go through
``os.pwrite`` rather than memory maps: dirty pages of a mapped output count in
the resident size until the kernel writes them back, which would defeat
``--max-memory``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from contextlib import contextmanager

import numpy as np

from .. import geometry
from ..errors import OutputError, ShapeError
from ..notices import Convt3dWarning
from ._atomic import atomic_write
from .dtypes import cast_block

# Bytes handed to the compressor / copied from a spool file at a time.
IO_CHUNK = 4 << 20


def pwrite_all(fd, data, offset):
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def chunks(array):
    view = memoryview(np.ascontiguousarray(array)).cast("B")
    for start in range(0, len(view), IO_CHUNK):
        yield view[start:start + IO_CHUNK]


class StreamWriter:
    """Base: atomic temporary file, slab bookkeeping, commit/abort.

    Parameters
    ----------
    path : str
        Target file.
    out_shape : tuple
        Engine output ``(N, C, D, H, W)`` (never transposed).
    dtype : numpy dtype
        The dtype the file stores. Slabs arrive in it or in a float compute dtype;
        those are converted (:func:`~convt3d_cli.io.dtypes.cast_block`: integers
        rounded half to even and clipped, counted in :attr:`clipped`).
    """

    #: Whether slabs arrive along engine W, transposed to ``(N, C, W, H, D)``.
    transposed = False
    #: The shape the file stores (set by each format's writer).
    file_shape = None
    #: Whether to keep the smallest and largest value written (:attr:`value_range`).
    track_range = False

    def __init__(self, path, out_shape, dtype, overwrite):
        self.path = path
        self.out_shape = tuple(int(v) for v in out_shape)
        self.dtype = np.dtype(dtype)
        self._context = atomic_write(path, overwrite=overwrite)
        self.tmp = self._context.__enter__()
        self._open = True
        self.written = 0  # slab planes received
        self.clipped = 0  # values outside an integer output's range
        self.value_range = None  # (min, max) of the finite values stored, when track_range

    @property
    def slab_shape(self):
        """The engine output shape in the orientation slabs arrive in."""
        return geometry.oriented(self.out_shape, self.transposed)

    @property
    def axis_length(self):
        return self.slab_shape[2]

    def write_slab(self, start, stop, block):
        """Store output planes ``[start, stop)`` (slab orientation, C-contiguous, ``self.dtype``)."""
        expected = self.slab_shape[:2] + (stop - start,) + self.slab_shape[3:]
        if tuple(block.shape) != expected or (block.dtype != self.dtype and block.dtype.kind != "f"):
            raise ShapeError(f"slab must be {self.dtype} {expected}, got {block.dtype} {block.shape}")
        if block.dtype != self.dtype:
            block, clipped = cast_block(block, self.dtype)
            self.clipped += clipped
        if self.track_range and block.size:
            self._track(block)
        try:
            self._write(start, stop, np.ascontiguousarray(block))
        except OSError as exc:
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
        self.written += stop - start

    def commit(self):
        """Finish the file and move it onto the target."""
        if self.written != self.axis_length:
            raise OutputError(f"cannot write {self.path}: only {self.written} of "
                              f"{self.axis_length} planes were computed")
        with self._failing_removes():
            self._finish()
            self._release()
            self._open = False
            self._context.__exit__(None, None, None)

    @contextmanager
    def _failing_removes(self, errors=(OSError,), reason=None):
        """Whatever fails inside removes the temporary file; ``errors`` become an
        :class:`OutputError` naming the output (``reason(exc)`` words them)."""
        try:
            yield
        except errors as exc:
            self.abort()
            text = reason(exc) if reason is not None else (getattr(exc, "strerror", None) or exc)
            raise OutputError(f"cannot write {self.path}: {text}") from exc
        except BaseException:
            self.abort()
            raise

    def abort(self, exc_info=(None, None, None)):
        """Remove the temporary file (idempotent)."""
        if not self._open:
            return
        self._open = False
        try:
            self._release()
        except Exception:  # noqa: BLE001 - already failing; the file goes anyway
            pass
        error = exc_info[1] if exc_info[1] is not None else OutputError("aborted")
        try:
            self._context.__exit__(type(error), error, exc_info[2])
        except BaseException as raised:  # atomic_write re-raises what it was given
            if raised is not error:
                raise

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort((exc_type, exc, tb))
        return False

    def _track(self, block):
        finite = block if block.dtype.kind in "iu" else block[np.isfinite(block)]
        if not finite.size:
            return
        low, high = finite.min().item(), finite.max().item()
        if self.value_range is not None:
            low, high = min(low, self.value_range[0]), max(high, self.value_range[1])
        self.value_range = (low, high)

    # ---- per format
    def _write(self, start, stop, block):
        raise NotImplementedError

    def _finish(self):
        pass

    def _release(self):
        pass


class Spool:
    """An anonymous file beside the target holding raw data written out of order."""

    def __init__(self, folder, size):
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".convt3d-spool-")
        os.ftruncate(self.file.fileno(), size)
        self.size = size

    def pwrite(self, data, offset):
        pwrite_all(self.file.fileno(), data, offset)

    def pieces(self):
        fd = self.file.fileno()
        offset = 0
        while offset < self.size:
            piece = os.pread(fd, min(IO_CHUNK, self.size - offset), offset)
            if not piece:
                raise OSError("the spool file is shorter than expected")
            offset += len(piece)
            yield piece

    def close(self):
        self.file.close()


# --------------------------------------------------------------------------- sources

class Source:
    """Input planes ``[a, b)`` along the slab axis, in compute dtype, C-contiguous.

    Subclasses provide :meth:`_raw`, planes of the unpadded input in slab
    orientation in any dtype; this class converts them (applying the volume's
    scaling, e.g. NIfTI ``scl_slope``, in the reading dtype exactly as a whole
    read does) and adds the replicated edge of the ``linear`` kernel.
    """

    def __init__(self, info, transposed, dtype, pad):
        self.info = info
        self.transposed = transposed
        self.dtype = np.dtype(dtype)
        self.pad = pad
        self.shape = geometry.oriented(info.engine_shape, transposed)  # unpadded
        self.read_dtype = np.dtype(info.read_dtype)
        self.scaling = getattr(info, "scaling", None)

    def _raw(self, a, b):
        raise NotImplementedError

    def _raw_window(self, lo, hi):
        """Input ``[lo, hi)`` per spatial axis of the unpadded input (engine orientation): by
        default the planes of the slab axis, cut; sources that can read less override it."""
        return self._raw(lo[0], hi[0])[:, :, :, lo[1]:hi[1], lo[2]:hi[2]]

    def _converted(self, a, b):
        return self._converted_raw(self._raw(a, b), self.shape[:2] + (b - a,) + self.shape[3:])

    def _converted_raw(self, raw, shape):
        if self.scaling is None and self.read_dtype == self.dtype:
            out = np.empty(shape, dtype=self.dtype)
            np.copyto(out, raw, casting="unsafe")
            return out
        stage = np.empty(shape, dtype=self.read_dtype)
        np.copyto(stage, raw, casting="unsafe")
        del raw
        apply_scaling(stage, self.scaling)
        return np.ascontiguousarray(stage, dtype=self.dtype)

    def read_window(self, lo, hi):
        """Input ``[lo, hi)`` per spatial axis of the (padded) input, in compute dtype (block-wise
        runs, never transposed): the edge replication of :meth:`read` along all three axes."""
        if not self.pad:
            return self._converted_raw(self._raw_window(lo, hi),
                                       self.shape[:2] + tuple(b - a for a, b in zip(lo, hi)))
        n = self.shape[2:]
        real_lo = [min(max(a - 1, 0), m - 1) for a, m in zip(lo, n)]
        real_hi = [min(max(b - 2, 0), m - 1) + 1 for b, m in zip(hi, n)]
        core = self._converted_raw(self._raw_window(real_lo, real_hi),
                                   self.shape[:2] + tuple(b - a for a, b in zip(real_lo, real_hi)))
        for axis in range(3):
            index = np.clip(np.arange(lo[axis], hi[axis]) - 1, 0, n[axis] - 1) - real_lo[axis]
            if len(index) != core.shape[2 + axis] or (len(index) and (index[0] != 0 or index[-1] != len(index) - 1)):
                core = np.take(core, index, axis=2 + axis)   # an edge is replicated along this axis
        return np.ascontiguousarray(core)

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
        self.array = oriented_view(engine_array, transposed)
        self._keep = keep

    def _raw(self, a, b):
        return self.array[:, :, a:b]

    def _raw_window(self, lo, hi):
        return self.array[:, :, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]

    def close(self):
        self.array = None
        if self._keep is not None:
            self._keep.close()
            self._keep = None


def oriented_view(array, transposed):
    """A 5-D engine-layout array in slab orientation (a view: spatial axes reversed when transposed)."""
    return array.transpose(0, 1, 4, 3, 2) if transposed else array


def apply_scaling(array, scale):
    """Apply ``(slope, inter)`` in place (no-op for ``None``), in the array's own dtype.

    Values that overflow the dtype become infinite, as the file says they are;
    that is reported once as a :class:`~convt3d_cli.notices.Convt3dWarning`.
    """
    if scale is None:
        return
    slope, inter = scale
    overflowed = []
    with np.errstate(over="call", call=lambda kind, flag: overflowed.append(kind)):
        array *= array.dtype.type(slope)
        if inter:
            array += array.dtype.type(inter)
    if overflowed:
        warnings.warn(f"the scaling (scl_slope {slope:g}, scl_inter {inter:g}) overflows {array.dtype}: "
                      f"some values are infinite", Convt3dWarning, stacklevel=2)
