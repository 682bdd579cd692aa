"""Streaming writers and readers: volumes larger than memory, one slab at a time.

Writers take output slabs along one engine axis and put them straight into the
output file, which lives at a temporary name beside the target until
:meth:`StreamWriter.commit` renames it (the same :func:`atomic_write` as every
other write: a failure, Ctrl-C or SIGTERM removes the temporary file).

Slab axis per format (``StreamWriter.transposed``)
    Arrays (npy, npz, HDF5) are C-ordered ``(N, C, D, H, W)``: D is the slowest
    spatial axis, so a D-slab is one contiguous run of bytes per (n, c).
    NIfTI is Fortran-ordered ``(X, Y, Z[, C])`` with engine D = X the *fastest*
    axis; an X-slab would be scattered over the whole file. NIfTI writers
    therefore take slabs along engine W = NIfTI Z, the slowest spatial axis,
    and receive them *transposed*, ``(N, C, Z, Y, X)`` C-ordered, which is the
    file's byte order: a Z-slab of one channel is one contiguous run of bytes.

Writes go through ``os.pwrite`` rather than memory maps: dirty pages of a
mapped output count in the resident size until the kernel writes them back,
which would defeat ``--max-memory``.
"""

from __future__ import annotations

import os
import tempfile
import zipfile

import numpy as np

from ..errors import OutputError, ShapeError
from . import _gzip
from ._atomic import atomic_write, same_file
from ._common import array_output, bare, output_key, split_spec

# Bytes handed to the compressor / copied from a spool file at a time.
IO_CHUNK = 4 << 20


def _pwrite_all(fd, data, offset):
    view = memoryview(data).cast("B")
    while len(view):
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _chunks(array):
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
        The dtype slabs arrive in (and are stored in).
    """

    #: Whether slabs arrive along engine W, transposed to ``(N, C, W, H, D)``.
    transposed = False

    def __init__(self, path, out_shape, dtype, overwrite):
        self.path = path
        self.out_shape = tuple(int(v) for v in out_shape)
        self.dtype = np.dtype(dtype)
        self._context = atomic_write(path, overwrite=overwrite)
        self.tmp = self._context.__enter__()
        self._open = True
        self.written = 0  # slab planes received

    @property
    def slab_shape(self):
        """The engine output shape in the orientation slabs arrive in."""
        n, c, d, h, w = self.out_shape
        return (n, c, w, h, d) if self.transposed else (n, c, d, h, w)

    @property
    def axis_length(self):
        return self.slab_shape[2]

    def write_slab(self, start, stop, block):
        """Store output planes ``[start, stop)`` (slab orientation, C-contiguous, ``self.dtype``)."""
        expected = self.slab_shape[:2] + (stop - start,) + self.slab_shape[3:]
        if tuple(block.shape) != expected or block.dtype != self.dtype:
            raise ShapeError(f"slab must be {self.dtype} {expected}, got {block.dtype} {block.shape}")
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
        try:
            self._finish()
            self._release()
            self._open = False
            self._context.__exit__(None, None, None)
        except OSError as exc:
            self.abort()
            raise OutputError(f"cannot write {self.path}: {exc.strerror or exc}") from exc
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

    # ---- per format
    def _write(self, start, stop, block):
        raise NotImplementedError

    def _finish(self):
        pass

    def _release(self):
        pass


class _Spool:
    """An anonymous file beside the target holding raw data written out of order."""

    def __init__(self, folder, size):
        self.file = tempfile.TemporaryFile(dir=folder, prefix=".convt3d-spool-")
        os.ftruncate(self.file.fileno(), size)
        self.size = size

    def pwrite(self, data, offset):
        _pwrite_all(self.file.fileno(), data, offset)

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


# --------------------------------------------------------------------------- NIfTI

class NiftiWriter(StreamWriter):
    """``.nii`` and ``.nii.gz``: header first, then the data in file order (Z-slabs)."""

    transposed = True

    def __init__(self, path, out_shape, dtype, overwrite, like, params, compress_level):
        from . import nifti

        if out_shape[0] != 1:
            raise OutputError(f"a NIfTI file cannot hold a batch of {out_shape[0]} volumes")
        head, self.offset = nifti.header_bytes(nifti.output_array_shape(out_shape), dtype, like, params)
        super().__init__(path, out_shape, dtype, overwrite)
        self.gz = path.lower().endswith(".gz")
        _, channels, x, y, z = self.out_shape
        self.channel_bytes = x * y * z * self.dtype.itemsize
        self.plane_bytes = x * y * self.dtype.itemsize
        self.file = open(self.tmp, "r+b")
        self.spool = None
        try:
            if self.gz:
                self.deflate = _gzip.compressor(compress_level)
                self.stage = bytearray()
                self._emit(head)
                if channels > 1:  # channel-major on disk: collect, compress at the end
                    self.spool = _Spool(os.path.dirname(os.path.abspath(path)), channels * self.channel_bytes)
            else:
                self.file.write(head)
                self.file.flush()
                os.ftruncate(self.file.fileno(), self.offset + channels * self.channel_bytes)
        except BaseException:
            self.abort()
            raise

    def _emit(self, data):
        # The compressor sees fixed IO_CHUNK pieces whatever the slab sizes, so the
        # .nii.gz bytes do not depend on --max-memory.
        data = memoryview(data).cast("B")
        while len(data):
            room = IO_CHUNK - len(self.stage)
            self.stage += data[:room]
            data = data[room:]
            if len(self.stage) == IO_CHUNK:
                self._deflate(self.stage)
                self.stage = bytearray()

    def _deflate(self, data):
        out = self.deflate.compress(data)
        if out:
            self.file.write(out)

    def _write(self, start, stop, block):
        channels = self.out_shape[1]
        if self.gz and self.spool is None:
            if start != self.written:
                raise OutputError(f"{self.path}: .nii.gz slabs must arrive in order")
            for piece in _chunks(block[0, 0]):
                self._emit(piece)
            return
        for c in range(channels):
            where = c * self.channel_bytes + start * self.plane_bytes
            if self.spool is not None:
                self.spool.pwrite(block[0, c], where)
            else:
                _pwrite_all(self.file.fileno(), block[0, c], self.offset + where)

    def _finish(self):
        if self.gz:
            if self.spool is not None:
                for piece in self.spool.pieces():
                    self._emit(piece)
            self._deflate(self.stage)
            self.stage = bytearray()
            self.file.write(self.deflate.flush())
        self.file.flush()

    def _release(self):
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if not self.file.closed:
            self.file.close()


# --------------------------------------------------------------------------- arrays

def _npy_header(shape, dtype):
    """The ``.npy`` magic and header np.save writes for a C-ordered array."""
    import io as _io

    fmt = np.lib.format
    header = {"descr": fmt.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
              "shape": tuple(int(v) for v in shape)}
    buffer = _io.BytesIO()
    try:
        fmt._write_array_header(buffer, header, None)  # what np.save uses (picks the version)
    except AttributeError:  # pragma: no cover - very old/new NumPy
        try:
            fmt.write_array_header_1_0(buffer, header)
        except ValueError:
            buffer = _io.BytesIO()
            fmt.write_array_header_2_0(buffer, header)
    return buffer.getvalue()


class _ArrayWriter(StreamWriter):
    """Shared by npy/npz/HDF5: D-slabs; one contiguous byte run per (n, c)."""

    def __init__(self, path, out_shape, dtype, overwrite, like):
        super().__init__(path, out_shape, dtype, overwrite)
        stand_in = np.broadcast_to(np.zeros((), dtype=self.dtype), self.out_shape)
        self.file_shape = array_output(stand_in, like).shape
        n, c, d, h, w = self.out_shape
        self.plane_bytes = h * w * self.dtype.itemsize
        self.volume_bytes = d * self.plane_bytes
        self.total_bytes = n * c * self.volume_bytes

    def _pieces(self, start, block):
        """``(byte offset in the C-ordered data, contiguous array)`` for each (n, c)."""
        n, c = self.out_shape[:2]
        for i in range(n):
            for j in range(c):
                yield (i * c + j) * self.volume_bytes + start * self.plane_bytes, block[i, j]


class NpyWriter(_ArrayWriter):
    def __init__(self, path, out_shape, dtype, overwrite, like):
        super().__init__(path, out_shape, dtype, overwrite, like)
        head = _npy_header(self.file_shape, self.dtype)
        self.offset = len(head)
        self.fd = os.open(self.tmp, os.O_WRONLY)
        try:
            _pwrite_all(self.fd, head, 0)
            os.ftruncate(self.fd, self.offset + self.total_bytes)
        except BaseException:
            self.abort()
            raise

    def _write(self, start, stop, block):
        for where, piece in self._pieces(start, block):
            _pwrite_all(self.fd, piece, self.offset + where)

    def _release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class NpzWriter(_ArrayWriter):
    """One stored (uncompressed) ``.npy`` member written in pieces, like ``np.savez``."""

    def __init__(self, path, out_shape, dtype, overwrite, like, key):
        super().__init__(path, out_shape, dtype, overwrite, like)
        self.archive = self.member = self.spool = None
        try:
            self.archive = zipfile.ZipFile(self.tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True)
            self.member = self.archive.open(bare(key) + ".npy", "w", force_zip64=True)
            self.member.write(_npy_header(self.file_shape, self.dtype))
            if self.out_shape[0] * self.out_shape[1] > 1:
                self.spool = _Spool(os.path.dirname(os.path.abspath(path)), self.total_bytes)
        except BaseException:
            self.abort()
            raise

    def _write(self, start, stop, block):
        if self.spool is None:
            if start != self.written:
                raise OutputError(f"{self.path}: npz slabs must arrive in order")
            for piece in _chunks(block):
                self.member.write(piece)
            return
        for where, piece in self._pieces(start, block):
            self.spool.pwrite(piece, where)

    def _finish(self):
        if self.spool is not None:
            for piece in self.spool.pieces():
                self.member.write(piece)
        self.member.close()
        self.member = None
        self.archive.close()
        self.archive = None

    def _release(self):
        for thing in (self.member, self.archive, self.spool):
            if thing is not None:
                try:
                    thing.close()
                except Exception:  # noqa: BLE001 - a half-written zip on the way out
                    pass
        self.member = self.archive = self.spool = None


class Hdf5Writer(_ArrayWriter):
    """A chunked dataset (chunks of whole W rows, D extent 1: D-slabs fill whole chunks)."""

    def __init__(self, path, out_shape, dtype, overwrite, like, key, attrs):
        super().__init__(path, out_shape, dtype, overwrite, like)
        from .hdf5 import _h5py, chunk_shape

        h5py = _h5py()
        self.handle = None
        try:
            self.handle = h5py.File(self.tmp, "w")
            self.dataset = self.handle.create_dataset(
                key, shape=self.file_shape, dtype=self.dtype,
                chunks=chunk_shape(self.file_shape, self.dtype.itemsize))
            for attr, value in attrs.items():
                if isinstance(value, list) and all(isinstance(v, str) for v in value):
                    value = np.array(value, dtype=h5py.string_dtype())
                self.dataset.attrs[attr] = value
        except BaseException:
            self.abort()
            raise

    def _write(self, start, stop, block):
        lead = len(self.file_shape) - 3
        index = (slice(None),) * lead + (slice(start, stop),)
        self.dataset[index] = block.reshape(block.shape[5 - len(self.file_shape):])
        self.handle.flush()

    def _release(self):
        if self.handle is not None:
            self.handle.close()
            self.handle = None


def open_writer(spec, out_shape, *, like, params, formula, overwrite=False, source=None, dtype=np.float32,
                compress_level=None):
    """Open a streaming writer for ``spec``; the format follows the suffix.

    Parameters
    ----------
    spec : str
        Output ``PATH[:KEY]``.
    out_shape : tuple
        Engine output ``(N, Cout, D, H, W)``.
    like : Volume or VolumeInfo or None
        The input (rank, affine, NIfTI header, HDF5 attributes).
    params, formula, source
        As for :func:`convt3d_cli.io.write_volume`.
    dtype : numpy dtype
        The dtype of the slabs and of the stored data (NIfTI: float32 or float64).
    compress_level : int, optional
        ``.nii.gz`` only: 0 (fastest) to 3 (smallest), default 1.

    Returns
    -------
    StreamWriter
        ``write_slab(start, stop, block)`` then ``commit()`` (or use it as a context
        manager); ``transposed`` tells the slab orientation.

    Raises
    ------
    OutputError
        As :func:`convt3d_cli.io.write_volume`.
    """
    from . import _format, output_format

    path, key = split_spec(spec)
    name = output_format(path)
    fmt = _format(path)
    if like is not None and getattr(like, "path", None) and same_file(path, like.path):
        raise OutputError(f"{path} is the input file; choose another output")
    dtype = np.dtype(dtype)
    if compress_level is not None and compress_level not in _gzip.LEVELS:
        from ..errors import ParameterError

        raise ParameterError("compress_level", f"compress_level must be 0 to 3, got {compress_level!r}")
    if name == "nifti":
        if key is not None:
            raise OutputError(f"a NIfTI file holds one image; remove ':{key}' from the output")
        dtype = np.dtype(np.float64 if dtype == np.float64 else np.float32)
        return NiftiWriter(path, out_shape, dtype, overwrite, like, params, compress_level)
    if name == "npy":
        output_key(key, None, fmt.label)
        return NpyWriter(path, out_shape, dtype, overwrite, like)
    member = output_key(key, fmt.default_key, fmt.label)
    if name == "npz":
        return NpzWriter(path, out_shape, dtype, overwrite, like, member)
    attrs = fmt.output_attrs(like, params, list(formula), source)
    return Hdf5Writer(path, out_shape, dtype, overwrite, like, member, attrs)
