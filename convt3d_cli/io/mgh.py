"""FreeSurfer MGH (``.mgh``) and MGZ (``.mgz``, the same gzip-compressed) through nibabel.

On disk (``nibabel.freesurfer.mghformat``), big-endian throughout: a 284-byte
header (version, dims = width, height, depth, frames, type, dof, goodRASFlag,
delta = voxel sizes, Mdc, Pxyz_c; the last 194 bytes are padding), the data
right after it in Fortran order (X fastest, then Y, Z, frames), then an
optional tail: TR, flip angle, TE, TI and FoV (float32 each) followed by
FreeSurfer *tags* (an int32 id, an int64 length, the bytes).

Axes: the NIfTI rule. ``(X, Y, Z)`` is one channel with D=X, H=Y, W=Z; a 4-D
``(X, Y, Z, F)`` image is F channels by default, or F volumes
(:func:`convt3d_cli.io.api.with_fourth_axis`); :func:`engine_shape` is the one
place that decides. The affine is nibabel's vox2ras (``image.affine``).
Element types are nibabel's: uint8, int16, uint16, int32, float32.

Reading checks the header before anything is allocated: version, dimensions
and type code, then the declared data size against the file (``.mgh``) or
against what the compressed file can hold at most (``.mgz``). A probe reads an
``.mgz`` to its end (the tail is after the data), so a truncated or corrupt
stream is refused before any voxel is read.

Outputs get the affine of the upsampled grid (``docs/behaviour.md``, *Spatial
metadata*), set through nibabel's :class:`~nibabel.freesurfer.mghformat.MGHImage`.
An MGH input's header is kept (dof, TR, flip angle, TE, TI, FoV) and so are the
tags that do not describe its voxel grid or frames (:data:`KEPT_TAGS`); a
``CMDLINE`` tag records the layer, as FreeSurfer's own tools record theirs.

Streaming: as NIfTI, slabs run along Z (``transposed``). A ``.mgh`` is
memory-mapped on input and written with ``pwrite``; a one-frame ``.mgz`` is
read and compressed straight through in file order; several frames go through
a spool file (frame-major on disk).
"""

from __future__ import annotations

import math
import os
import tempfile

import numpy as np

from ..errors import FileFormatError, OutputError
from ..geometry import output_affine
from . import _gzip
from .base import Format, jsonable
from .dtypes import byte_order, dtype_name, native
from .nifti import GzipPlaneSource, NiftiWriter, _well_conditioned
from .records import VolumeInfo
from .safety import check_payload, human_bytes, reading, reason, require_file
from .streaming import IO_CHUNK, ArraySource, Spool, StreamWriter, pwrite_all

LABEL = "MGH"
#: Bytes before the data: the fields (90 bytes, ``mghformat.header_dtype``) and padding.
HEADER_BYTES = 284
#: TR, flip angle, TE, TI, FoV: the fixed start of the tail (``mghformat.footer_dtype``).
FOOTER_BYTES = 20
#: Dimensions are int32 on disk.
MAX_DIM = 2 ** 31 - 1
#: Deflate emits at least 2 bits per 258 bytes: no gzip stream of S bytes holds more than ~1032 S.
MAX_DEFLATE_RATIO = 1032
#: Tag bytes an input may hand on to its output; more than this are not carried.
MAX_KEPT_TAG_BYTES = 16 << 20
#: Tags walked at most (FreeSurfer files hold a handful; a hostile tail could hold millions).
MAX_TAGS = 4096
#: ``VolumeInfo.attrs`` / ``Volume.attrs`` key of the tags an output inherits: ``((id, bytes), ...)``.
TAGS_ATTR = "mgh_tags"

# FreeSurfer's tag ids (include/tags.h).
TAG_NAMES = {
    1: "OLD_COLORTABLE", 2: "OLD_USEREALRAS", 3: "CMDLINE", 4: "USEREALRAS", 5: "COLORTABLE",
    10: "GCAMORPH_GEOM", 11: "GCAMORPH_TYPE", 12: "GCAMORPH_LABELS", 13: "GCAMORPH_META",
    14: "GCAMORPH_AFFINE", 20: "OLD_SURF_GEOM", 21: "SURF_GEOM", 22: "SURF_DATASPACE",
    23: "SURF_MATRIXDATA", 24: "SURF_TRANSFORMEDSPACE", 30: "OLD_MGH_XFORM", 31: "MGH_XFORM",
    32: "GROUP_AVG_SURFACE_AREA", 33: "AUTO_ALIGN", 40: "SCALAR_DOUBLE", 41: "PEDIR",
    42: "MRI_FRAME", 43: "FIELDSTRENGTH", 44: "ORIG_RAS2VOX",
}
TAG_CMDLINE = 3
#: Tags an output keeps: provenance (command lines), the scanner-RAS flag, the colour table,
#: the talairach transform file name, phase-encode direction and field strength. The others
#: describe the input's voxel grid or frames (MRI_FRAME, ORIG_RAS2VOX, AUTO_ALIGN, the
#: morph and surface tags) or are not documented enough to carry.
KEPT_TAGS = frozenset({3, 4, 5, 31, 41, 43})
# Tags stored without an int64 length (FreeSurfer reads their structure): the walk stops there.
_UNSIZED_TAGS = frozenset({1, 2, 10, 11, 12, 20, 30})


def _mgh():
    from nibabel.freesurfer import mghformat

    return mghformat


def _is_mgz(path):
    return os.fspath(path).lower().endswith(".mgz")


# --------------------------------------------------------------------------- axes

def engine_shape(shape):
    """Stored ``(X, Y, Z)`` or ``(X, Y, Z, F)`` -> engine ``(N, C, X, Y, Z)`` and the 4th-axis reading.

    Frames are channels by default (``"channels"``);
    :func:`convt3d_cli.io.api.with_fourth_axis` may read them as volumes.
    """
    shape = tuple(int(n) for n in shape)
    if len(shape) == 3:
        return (1, 1) + shape, None
    return (1, shape[3]) + shape[:3], "channels"


def engine_view(raw, shape):
    """The stored array (Fortran-ordered ``(X, Y, Z[, F])``) as engine ``shape`` (a view)."""
    view = raw[None, None] if raw.ndim == 3 else np.moveaxis(raw, 3, 0)[None]
    return view.reshape(shape)  # (1, F, ...) and (F, 1, ...) differ by a length-1 axis


def output_array_shape(out_shape):
    """MGH shape of an engine output ``(N, C, X, Y, Z)``: ``(X, Y, Z)``, or ``(X, Y, Z, N*C)``
    with frame ``c * N + n`` (the volume index runs fastest, as in NIfTI's ``(X, Y, Z, T, C)``)."""
    frames = int(out_shape[0]) * int(out_shape[1])
    spatial = tuple(int(v) for v in out_shape[2:])
    return spatial if frames == 1 else spatial + (frames,)


# --------------------------------------------------------------------------- reading

class _Discard:
    """A file that forgets what is written to it (:func:`_gzip.copy` counting bytes)."""

    @staticmethod
    def write(data):
        return len(data)


def _fields(path, head):
    """The header fields that decide the data's size, checked: ``(raw fields, shape, stored dtype)``."""
    mgh = _mgh()
    raw = np.frombuffer(head, dtype=mgh.header_dtype, count=1)[0]
    version = int(raw["version"])
    if (version & 0xFF) != 1:
        raise FileFormatError(f"{path} is not an MGH file: its version field is {version} (MGH files "
                              f"have 1)")
    dims = [int(v) for v in raw["dims"]]
    if min(dims) < 1:
        raise FileFormatError(f"{path} declares dimensions {tuple(dims)} (width, height, depth, frames); "
                              f"each must be at least 1")
    code = int(raw["type"])
    codes = sorted(int(c) for c in mgh.data_type_codes.value_set("code"))
    if code not in codes:
        names = ", ".join(f"{c} {dtype_name(mgh.data_type_codes.numpy_dtype[c])}" for c in codes)
        raise FileFormatError(f"{path} has voxel type code {code}, which convt3d does not read; MGH "
                              f"volumes are read with type codes {names}")
    stored = np.dtype(mgh.data_type_codes.numpy_dtype[code])
    shape = tuple(dims[:3]) + ((dims[3],) if dims[3] > 1 else ())
    return raw, shape, stored


def _read_tail(stream, remaining):
    """Footer and tags after the data: ``(footer bytes, tags, note)``.

    ``remaining`` is the number of bytes left in a ``.mgh`` (``None`` for a
    stream). Tags are walked while each says its length; the kept ones
    (:data:`KEPT_TAGS`) are read, up to :data:`MAX_KEPT_TAG_BYTES` in all.
    ``tags`` lists ``(id, length, data or None)``; ``note`` says why the walk
    stopped before the end, if it did. Nothing here is an error: nibabel reads
    the volume without its tags.
    """
    footer = stream.read(FOOTER_BYTES)
    if remaining is not None:
        remaining -= len(footer)
    footer = footer.ljust(FOOTER_BYTES, b"\0")
    tags, kept_bytes, note = [], 0, None
    while True:
        if len(tags) == MAX_TAGS:
            note = f"more than {MAX_TAGS} tags; the tags from there on are not read"
            break
        start = stream.read(4)
        if len(start) < 4 or start == b"\0\0\0\0":  # the end, or FreeSurfer's end marker
            break
        tag = int.from_bytes(start, "big", signed=True)
        name = TAG_NAMES.get(tag, f"tag {tag}")
        if tag in _UNSIZED_TAGS:
            note = f"{name} has no length field; the tags from there on are not read"
            break
        past_end = f"{name} runs past the end of the file; the tags from there on are not read"
        size = stream.read(8)
        length = int.from_bytes(size, "big", signed=True)
        if remaining is not None:
            remaining -= 4 + len(size)
        if len(size) < 8 or length < 0 or (remaining is not None and length > remaining):
            note = past_end
            break
        if tag in KEPT_TAGS and kept_bytes + length <= MAX_KEPT_TAG_BYTES:
            data = stream.read(length)
            got = len(data)
            kept_bytes += got
        else:
            data = None
            if remaining is not None:
                stream.seek(length, os.SEEK_CUR)
                got = length
            else:
                got = _gzip.copy(stream, _Discard, length)
        if got < length:
            note = past_end
            break
        if remaining is not None:
            remaining -= length
        tags.append((tag, length, data))
    return footer, tags, note


def _scan(path):
    """What an MGH file holds, read without keeping its data.

    Raises :class:`FileFormatError` for a header that cannot be read; a data
    size the file cannot hold is returned as ``problem`` (``info`` still shows
    the header).
    """
    require_file(path)
    size = os.path.getsize(path)
    gz = _is_mgz(path)
    problem, footer, tags, note = None, b"\0" * FOOTER_BYTES, [], None
    with reading(path, LABEL), (_gzip.open_read(path) if gz else open(path, "rb")) as stream:
        head = stream.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES:
            raise FileFormatError(f"{path} is too short for an MGH header: {len(head)} of "
                                  f"{HEADER_BYTES} bytes")
        raw, shape, stored = _fields(path, head)
        nbytes = math.prod(shape) * stored.itemsize
        declared = f"its header declares {shape} {dtype_name(stored)} ({human_bytes(nbytes)})"
        if not gz:
            try:
                check_payload(path, HEADER_BYTES, nbytes, shape, stored)
            except FileFormatError as exc:
                problem = str(exc)
            else:
                stream.seek(HEADER_BYTES + nbytes)
                footer, tags, note = _read_tail(stream, size - HEADER_BYTES - nbytes)
        elif HEADER_BYTES + nbytes > MAX_DEFLATE_RATIO * size:
            problem = (f"{path} is truncated or corrupt: {declared} but {size} bytes of gzip decompress "
                       f"to {human_bytes(MAX_DEFLATE_RATIO * size)} at most")
        else:
            done = _gzip.copy(stream, _Discard, nbytes)
            if done < nbytes:
                problem = f"{path} is truncated: {declared} but the stream ends after {done} bytes of data"
            else:
                footer, tags, note = _read_tail(stream, None)
                _gzip.drain(stream)  # gzip checks its CRC at the end only
        # nibabel's header: the 90 bytes of fields and the footer (version 1: FreeSurfer
        # keeps an "intent" in the upper bits, which nibabel refuses).
        fields = bytearray(head[:_mgh().header_dtype.itemsize])
        fields[0:4] = (1).to_bytes(4, "big")
        header = _mgh().MGHHeader(bytes(fields) + footer)
        with np.errstate(all="ignore"):  # a hostile geometry is refused by _check_placement, quietly
            affine = np.array(header.get_affine(), dtype=np.float64)
        zooms = tuple(float(z) for z in header.get_zooms())
    return {"header": header, "raw": raw, "shape": shape, "stored": stored, "nbytes": nbytes,
            "affine": affine, "zooms": zooms, "tags": tags, "tags_note": note, "problem": problem,
            "gz": gz, "size": size}


def _check_placement(path, facts):
    """Refuse a header that cannot place the voxels (non-finite or singular geometry)."""
    raw = facts["raw"]
    if not raw["goodRASFlag"]:
        return  # nibabel (as FreeSurfer) uses the default coronal geometry
    problems = []
    fields = {name: np.asarray(raw[name], dtype=np.float64) for name in ("delta", "Mdc", "Pxyz_c")}
    for name, values in fields.items():
        if not np.all(np.isfinite(values)):
            problems.append(f"a non-finite {name} ({values.tolist()})")
    if not problems and not np.all(np.isfinite(facts["affine"])):
        problems.append("a non-finite affine")
    elif not problems and not _well_conditioned(facts["affine"][:3, :3]):
        problems.append(f"a singular or nearly singular vox2ras (delta = {fields['delta'].tolist()}, "
                        f"Mdc = {fields['Mdc'].tolist()})")
    if problems:
        raise FileFormatError(f"{path} has {' and '.join(problems)}; fix the header first (convt3d "
                              f"cannot place the output without guessing)")


def _read_raw(info):
    """The stored array (Fortran order, big-endian): memory-mapped ``.mgh``, decompressed ``.mgz``."""
    stored, shape = np.dtype(info.stored_dtype), tuple(info.stored_shape)
    if not _is_mgz(info.path):
        return np.memmap(info.path, dtype=stored, mode="r", offset=HEADER_BYTES, shape=shape, order="F")
    raw = np.empty(math.prod(shape), dtype=stored)
    with _gzip.open_read(info.path) as stream:
        _gzip.skip(stream, HEADER_BYTES)
        done = _gzip.fill(stream, raw.view(np.uint8))
        if done < raw.nbytes:
            raise FileFormatError(f"{info.path} is truncated: the stream ends after {done} of "
                                  f"{raw.nbytes} bytes of data")
        _gzip.drain(stream)
    return raw.reshape(shape, order="F")


def _spooled(info, scratch_dir):
    """A ``.mgz``'s data decompressed into an anonymous file: ``(memory map, file)``."""
    stored, shape = np.dtype(info.stored_dtype), tuple(info.stored_shape)
    need = math.prod(shape) * stored.itemsize
    spool = tempfile.TemporaryFile(dir=scratch_dir, prefix=".convt3d-input-")  # noqa: SIM115 - the source keeps it
    try:
        with reading(info.path, LABEL), _gzip.open_read(info.path) as stream:
            _gzip.skip(stream, HEADER_BYTES)
            done = _gzip.copy(stream, spool, need)
            if done < need:
                raise EOFError(f"{info.path} is truncated: the stream ends after {done} of {need} bytes of data")
            _gzip.drain(stream)
        spool.flush()
        return np.memmap(spool, dtype=stored, mode="r", shape=shape, order="F"), spool
    except BaseException:
        spool.close()
        raise


# --------------------------------------------------------------------------- writing

def output_header(file_shape, dtype, like, params):
    """The output's :class:`MGHHeader`: the input's when it is MGH, else a fresh one.

    The affine is :func:`~convt3d_cli.geometry.output_affine` of the input's,
    set through :class:`MGHImage` (delta, Mdc and Pxyz_c as nibabel and
    FreeSurfer's ``save_mgh`` compute them), so that nibabel reads it back.
    """
    mgh = _mgh()
    inherited = getattr(like, "header", None)
    header = inherited.copy() if isinstance(inherited, mgh.MGHHeader) else mgh.MGHHeader()
    header["version"] = 1
    in_affine = np.asarray(like.affine if like is not None else np.eye(4), dtype=np.float64)
    stand_in = np.broadcast_to(np.zeros((), dtype=dtype), tuple(file_shape))
    image = mgh.MGHImage(stand_in, output_affine(in_affine, params), header=header)
    image.update_header()
    header = image.header
    header.set_data_dtype(dtype)
    return header


def _tag(tag, data):
    return int(tag).to_bytes(4, "big") + len(data).to_bytes(8, "big") + bytes(data)


def header_and_tail(file_shape, dtype, like, params):
    """The 284 bytes before the data and the tail after it (footer, kept tags, convt3d's CMDLINE)."""
    header = output_header(file_shape, dtype, like, params)
    block = header.binaryblock
    fields = _mgh().header_dtype.itemsize
    head = block[:fields].ljust(HEADER_BYTES, b"\0")
    tags = ()
    if getattr(like, "format", None) == "mgh":  # attrs of other formats are theirs (HDF5 attributes)
        tags = (like.attrs or {}).get(TAGS_ATTR, ())
    tail = block[fields:fields + FOOTER_BYTES] + b"".join(_tag(t, data) for t, data in tags)
    tail += _tag(TAG_CMDLINE, params.short().encode("ascii", "replace") + b"\0")
    return head, tail


def _disk_pieces(array, disk):
    """A C-contiguous array in the file's (big-endian) type, at most :data:`IO_CHUNK` bytes at a time."""
    flat = array.reshape(-1)
    step = max(1, IO_CHUNK // max(1, flat.itemsize))
    for start in range(0, flat.size, step):
        yield flat[start:start + step].astype(disk, copy=False)


class MghWriter(NiftiWriter):
    """``.mgh`` and ``.mgz``: header, data in file order (Z-slabs, transposed), tail.

    Shares NIfTI's gzip writing (``_emit``: members cut at fixed offsets whatever
    the slabs, so the bytes do not depend on ``--max-memory``, compressed in
    parallel; ``_deflate`` writes them), the end of ``_finish`` and ``_release``;
    the header, the frame layout, the big-endian conversion and the tail are MGH's.
    """

    transposed = True

    def __init__(self, path, out_shape, dtype, overwrite, like, params, compress_level):
        file_shape = output_array_shape(out_shape)
        head, self.tail = header_and_tail(file_shape, dtype, like, params)
        StreamWriter.__init__(self, path, out_shape, dtype, overwrite)
        self.file_shape = file_shape
        self.disk = self.dtype.newbyteorder(">")
        self.gz = _is_mgz(path)
        self.offset = HEADER_BYTES
        volumes, channels, x, y, z = self.out_shape
        self.frame_bytes = x * y * z * self.dtype.itemsize
        self.plane_bytes = x * y * self.dtype.itemsize
        self.data_bytes = volumes * channels * self.frame_bytes
        self.file = self.spool = self.gzip = None
        with self._failing_removes():
            self.file = open(self.tmp, "r+b")  # noqa: SIM115 - closed by _release
            if self.gz:
                self.gzip = _gzip.MemberWriter(self._deflate, compress_level)
                self._emit(head)
                if volumes * channels > 1:  # frame-major on disk: collect, compress at the end
                    self.spool = Spool(os.path.dirname(os.path.abspath(path)), self.data_bytes)
            else:
                self.file.write(head)
                self.file.flush()
                os.ftruncate(self.file.fileno(), HEADER_BYTES + self.data_bytes + len(self.tail))

    def _write(self, start, stop, block):
        volumes, channels = self.out_shape[:2]
        if self.gz and self.spool is None:
            if start != self.written:
                raise OutputError(f"{self.path}: .mgz slabs must arrive in order")
            for piece in _disk_pieces(block[0, 0], self.disk):
                self._emit(piece)
            return
        for c in range(channels):
            for n in range(volumes):
                where = (c * volumes + n) * self.frame_bytes + start * self.plane_bytes
                for piece in _disk_pieces(block[n, c], self.disk):
                    if self.spool is not None:
                        self.spool.pwrite(piece, where)
                    else:
                        pwrite_all(self.file.fileno(), piece, HEADER_BYTES + where)
                    where += piece.nbytes

    def _finish(self):
        if self.gz:
            if self.spool is not None:
                for piece in self.spool.pieces():
                    self._emit(piece)
                self.spool.close()
                self.spool = None
            self._emit(self.tail)
        else:
            pwrite_all(self.file.fileno(), self.tail, HEADER_BYTES + self.data_bytes)
        super()._finish()  # the rest of the gzip stream, flush


# --------------------------------------------------------------------------- the format

class MghFormat(Format):
    """FreeSurfer MGH/MGZ volumes: one image per file, no key."""

    name = "mgh"
    label = LABEL
    transposed = True
    #: Element types an MGH file stores (nibabel's type codes 0, 4, 10, 1, 3).
    STORED = tuple(np.dtype(t) for t in (np.uint8, np.int16, np.uint16, np.int32, np.float32))

    @staticmethod
    def _check_key(path, key):
        if key is not None:
            raise FileFormatError(f"{path}: an MGH file holds one image; remove ':{key}'")

    # ---- reading --------------------------------------------------------------------

    def probe(self, path, key):
        self._check_key(path, key)
        facts = _scan(path)
        if facts["problem"] is not None:
            raise FileFormatError(facts["problem"])
        _check_placement(path, facts)
        shape, stored = facts["shape"], facts["stored"]
        engine, fourth = engine_shape(shape)
        dtype = native(stored)
        nbytes = math.prod(engine) * dtype.itemsize
        # .mgh is memory-mapped; a .mgz is decompressed into memory first.
        needed = nbytes + (facts["nbytes"] if facts["gz"] else 0)
        kept = tuple((tag, data) for tag, _, data in facts["tags"] if data is not None)
        return VolumeInfo(
            path=path, key=None, format=self.name, stored_shape=shape, engine_shape=engine,
            dtype=dtype_name(stored), source_ndim=len(shape), affine=facts["affine"], zooms=facts["zooms"],
            header=facts["header"], attrs={TAGS_ATTR: kept} if kept else {}, read_dtype=dtype_name(dtype),
            nbytes=nbytes, memory_needed=needed, file_size=facts["size"], byte_order=byte_order(stored),
            stored_dtype=stored, data_offset=HEADER_BYTES, fourth_axis=fourth)

    def load(self, info):
        out = np.empty(info.engine_shape, dtype=info.read_dtype)
        with reading(info.path, LABEL):
            raw = _read_raw(info)
            # One pass converts the byte order and makes the result C-ordered.
            np.copyto(out, engine_view(raw, info.engine_shape), casting="unsafe")
            del raw
        return out

    def open_source(self, info, transposed, dtype, pad, scratch_dir):
        if not _is_mgz(info.path):
            with reading(info.path, LABEL):
                raw = _read_raw(info)
            return ArraySource(info, transposed, dtype, pad, engine_view(raw, info.engine_shape))
        if transposed and info.engine_shape[0] * info.engine_shape[1] == 1:
            return GzipPlaneSource(info, dtype, pad)  # one frame, read forward plane by plane
        raw, spool = _spooled(info, scratch_dir)       # random access: decompress once
        return ArraySource(info, transposed, dtype, pad, engine_view(raw, info.engine_shape), keep=spool)

    # ---- writing --------------------------------------------------------------------

    def stored_dtype(self, dtype, data_dtype=None):
        """float32 unless an MGH type is asked for; float64 and other integers are refused."""
        if dtype is None:
            return np.dtype(np.float32)
        dtype = native(dtype)
        if dtype in self.STORED:
            return dtype
        if dtype.kind == "f" and dtype.itemsize > 4:
            raise OutputError(
                f"an MGH file cannot hold {dtype.name} (--dtype {dtype.name} or --output-dtype {dtype.name}); "
                f"it stores uint8, int16, uint16, int32 or float32: add --output-dtype float32 "
                f"(output_dtype=numpy.float32 in Python), or write .nii, .nii.gz, .h5, .npz or .npy to keep "
                f"{dtype.name}")
        if dtype.kind in "iu":
            raise OutputError(
                f"an MGH file cannot hold {dtype.name}; it stores uint8, int16, uint16, int32 or float32: "
                f"choose one with --output-dtype, or write .nii, .nii.gz, .h5, .npz or .npy")
        return np.dtype(np.float32)

    def disk_bytes(self, path, out_shape, dtype):
        # .mgz: one frame goes straight through gzip (its size is unknowable);
        # several are spooled uncompressed first.
        if _is_mgz(path) and out_shape[0] * out_shape[1] == 1:
            return None
        return HEADER_BYTES + super().disk_bytes(path, out_shape, dtype) + FOOTER_BYTES

    def output_key(self, key, out_shape):
        """Always ``None`` (one image per file); refuses a key and dimensions beyond int32."""
        if key is not None:
            raise OutputError(f"an MGH file holds one image; remove ':{key}' from the output")
        n, c, x, y, z = (int(v) for v in out_shape)
        for name, size in (("X", x), ("Y", y), ("Z", z), ("frames", n * c)):
            if size > MAX_DIM:
                raise OutputError(f"an MGH file stores its dimensions as 32-bit integers, but the output "
                                  f"would have {size} {name}; write .nii, .nii.gz, .h5, .npz or .npy")

    def open_writer(self, path, key, out_shape, dtype, *, overwrite, like, params, formula, source,
                    compress_level=None):
        self.output_key(key, out_shape)
        return MghWriter(path, out_shape, self.stored_dtype(dtype), overwrite, like, params, compress_level)

    # ---- info -----------------------------------------------------------------------

    def describe(self, path, key):
        self._check_key(path, key)
        facts = _scan(path)
        header, raw, shape, stored = facts["header"], facts["raw"], facts["shape"], facts["stored"]
        report = {
            "path": path, "key": None, "format": self.name, "compressed": facts["gz"],
            "file_size": facts["size"], "mgh_version": int(raw["version"]),
            "stored_shape": list(shape), "dtype": dtype_name(stored), "byte_order": byte_order(stored),
            "data_bytes": facts["nbytes"], "data_offset": HEADER_BYTES,
            "affine": facts["affine"].tolist(), "zooms": list(facts["zooms"]),
            "good_ras_flag": int(raw["goodRASFlag"]), "dof": int(header["dof"]),
            "tr_ms": float(header["tr"]), "flip_angle_rad": float(header["flip_angle"]),
            "te_ms": float(header["te"]), "ti_ms": float(header["ti"]), "fov": float(header["fov"]),
            "tags": [{"tag": tag, "name": TAG_NAMES.get(tag, "unknown"), "bytes": length,
                      "kept": data is not None} for tag, length, data in facts["tags"]],
        }
        if facts["tags_note"]:
            report["tags_note"] = facts["tags_note"]
        try:
            if facts["problem"] is not None:
                raise FileFormatError(facts["problem"])
            _check_placement(path, facts)
        except FileFormatError as exc:
            report["engine_shape"] = None
            report["note"] = f"cannot be read as a volume: {reason(exc)}"
        else:
            engine, fourth = engine_shape(shape)
            report.update(engine_shape=list(engine), batch=engine[0], channels=engine[1],
                          layout="(X,Y,Z)" if len(shape) == 3 else "(X,Y,Z,F)", spatial_axes="D=X,H=Y,W=Z",
                          read_dtype=dtype_name(native(stored)))
            if fourth is not None:
                report["fourth_axis"] = (f"{shape[3]} frames: channels by default; --fourth-axis volumes "
                                         f"reads them as {shape[3]} volumes")
        return jsonable(report)


FORMAT = MghFormat()
