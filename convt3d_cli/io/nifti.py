"""NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``) through nibabel, imported on first use.

Axes: ``(X, Y, Z)`` is one channel with D=X, H=Y, W=Z; ``(X, Y, Z, C)`` and
``(X, Y, Z, 1, C)`` carry channels on the last axis. Scaling (``scl_slope``,
``scl_inter``) is applied on read. Outputs get the affine of the upsampled grid
(``docs/behaviour.md``, *Spatial metadata*) and inherit the header of a NIfTI
input (codes, units, intent, extensions, ...).

Streaming: the file is Fortran-ordered, engine D = X its fastest axis, so slabs
run along engine W = NIfTI Z (``transposed``): a Z-slab of one channel is one
contiguous run of bytes, written (and gzip-compressed) in file order.
"""

from __future__ import annotations

import io as _io
import math
import os
import tempfile

import numpy as np

from ..errors import FileFormatError, OutputError, ShapeError
from ..geometry import keeps_grid, output_affine, output_zooms
from . import _gzip
from .base import Format, jsonable
from .dtypes import byte_order, check_numeric, dtype_name, native
from .records import VolumeInfo
from .safety import check_nonempty, check_payload, reading, reason, require_file
from .streaming import (ArraySource, Source, Spool, StreamWriter, apply_scaling, chunks,
                        pwrite_all)

LABEL = "NIfTI"
# NIfTI-1 stores dimensions as int16; anything larger needs NIfTI-2.
MAX_NIFTI1_DIM = 32767
# Both forms are written with code 2 ("aligned") when the input has no usable
# orientation (npy/npz/h5 input, or a NIfTI whose sform and qform codes are both
# 0): the grid then lives in an arbitrary, consistent frame, which is what
# "aligned" means, and putting the same matrix in both forms makes every reader
# agree -- FSL and FreeSurfer read the sform, ITK/ANTs prefer the qform, and
# readers that ignore a form with code 0 would fall back to bare pixdim.
DEFAULT_XFORM_CODE = 2
DESCRIP_BYTES = 80
# NIFTI_ECODE_COMMENT: where convt3d records the layer it applied (descrip is the user's).
COMMENT_ECODE = 6


def _layout(shape):
    if len(shape) == 3:
        return "(X,Y,Z)"
    if len(shape) == 4:
        return "(X,Y,Z,C or T)"
    return "(X,Y,Z,1,C)" if shape[3] == 1 else "(X,Y,Z,T,C)"


def _nib():
    import nibabel

    return nibabel


def engine_shape(shape, path):
    """Stored NIfTI shape -> engine ``(N, C, X, Y, Z)`` and what the 4th axis was taken as.

    ``(X,Y,Z,T)`` reads as ``T`` channels by default (``"channels"``; the pipeline may
    read it as ``T`` volumes instead, see :func:`convt3d_cli.io.api.with_fourth_axis`);
    ``(X,Y,Z,1,C)`` is ``C`` channels (NIfTI's vector intent) and ``(X,Y,Z,T,C)`` is
    ``T`` volumes of ``C`` channels.

    Returns
    -------
    (tuple, str or None)
        The engine shape and ``"channels"``, ``"volumes"`` or ``None`` (3-D).
    """
    shape = tuple(int(n) for n in shape)
    check_nonempty(shape, path)
    if len(shape) == 3:
        return (1, 1) + shape, None
    if len(shape) == 4:
        return (1, shape[3]) + shape[:3], "channels"
    if len(shape) == 5:
        return (shape[3], shape[4]) + shape[:3], None
    raise ShapeError(f"{path} has shape {shape}; a NIfTI input must be (X,Y,Z), (X,Y,Z,T or C), "
                     f"(X,Y,Z,1,C) or (X,Y,Z,T,C)")


def engine_view(raw, shape):
    """View of the stored array in engine order ``shape`` = ``(N, C, X, Y, Z)`` (no copy)."""
    if raw.ndim == 3:
        view = raw[None, None]
    elif raw.ndim == 4:
        view = np.moveaxis(raw, 3, 0)[None]
    else:
        view = raw.transpose(3, 4, 0, 1, 2)
    # (1, T, ...) and (T, 1, ...) differ by a length-1 axis: a reshape is still a view.
    return view.reshape(shape)


def scaling(image):
    """``(slope, inter)`` when they change the values, else ``None``.

    nibabel moves scl_slope/scl_inter from the header of a loaded image into
    its array proxy (the header then says NaN), so ask the proxy.
    """
    slope, inter = float(image.dataobj.slope), float(image.dataobj.inter)
    if slope == 1 and inter == 0:
        return None
    return slope, inter


def read_dtype(stored, scale):
    """Element type of the data handed to the engine.

    Unscaled data keeps its stored type. Scaled data becomes float32, or
    float64 when float32 would lose information (32/64-bit integers, doubles).
    """
    if scale is None:
        return native(stored)
    wide = (stored.kind in "iu" and stored.itemsize >= 4) or (stored.kind == "f" and stored.itemsize >= 8)
    return np.dtype(np.float64 if wide else np.float32)


def read_raw(path, shape, dtype, offset):
    """The stored array (X fastest, stored byte order), without scaling.

    A ``.nii`` is memory-mapped (its size was checked against the header). A
    ``.nii.gz`` is decompressed here rather than by nibabel, in slices straight
    into the array, and then read to its end: only there does gzip verify its
    CRC, and a corrupt stream must not pass as data.
    """
    dtype = np.dtype(dtype)
    if not _is_gzip(path):
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F")
    raw = np.empty(math.prod(shape), dtype=dtype)
    with _gzip.open_read(path) as stream:
        _gzip.skip(stream, offset)
        done = _gzip.fill(stream, raw.view(np.uint8))
        if done < raw.nbytes:
            raise FileFormatError(
                f"{path} is truncated: its header declares {tuple(shape)} {dtype_name(dtype)} "
                f"({raw.nbytes} bytes) but the stream ends after {done} bytes of data")
        _gzip.drain(stream)
    return raw.reshape(shape, order="F")


def _coded(getter, field, header, unknown):
    """A header code's meaning, or ``"unknown (code N)"`` where nibabel knows no such code."""
    try:
        return getter()
    except KeyError:
        value = f"unknown (code {int(np.asarray(header[field]).reshape(-1)[0])})"
        return tuple(value if part is None else part for part in unknown) if len(unknown) > 1 else (value,)


def _check_placement(path, facts):
    """Refuse a header that cannot place the voxels in space, naming the fields at fault.

    Non-finite voxel sizes, a non-finite quaternion or offset in a coded qform,
    a non-finite or singular coded sform and a non-finite scaling would give
    the output a meaningless grid or meaningless values; no repair is
    unambiguous, so the file is refused (``docs/behaviour.md``, *Files, axes and keys*).
    """
    header = facts["header"]
    problems = []
    if not np.all(np.isfinite(header["pixdim"][1:4])):
        problems.append(f"non-finite voxel sizes (pixdim[1:4] = {header['pixdim'][1:4].tolist()})")
    if header["qform_code"] > 0:
        quaternion = [float(header[name]) for name in ("quatern_b", "quatern_c", "quatern_d",
                                                       "qoffset_x", "qoffset_y", "qoffset_z")]
        if not np.all(np.isfinite(quaternion)):
            problems.append("a non-finite qform (quatern_b/c/d, qoffset_x/y/z) with qform_code "
                            f"{int(header['qform_code'])}")
        else:
            try:  # e.g. quatern_b/c/d longer than 1: no rotation w = sqrt(1 - b^2 - c^2 - d^2)
                header.get_qform()
            except Exception as exc:  # noqa: BLE001 - nibabel's reason is the message
                problems.append(f"a qform nibabel cannot decode ({reason(exc)}) with qform_code "
                                f"{int(header['qform_code'])}")
    if header["sform_code"] > 0:
        rows = np.array([header[name] for name in ("srow_x", "srow_y", "srow_z")], dtype=np.float64)
        if not np.all(np.isfinite(rows)):
            problems.append(f"a non-finite sform (srow_x/y/z) with sform_code {int(header['sform_code'])}")
        elif not _well_conditioned(rows[:, :3]):
            problems.append(f"a singular or nearly singular sform (srow_x/y/z, e.g. all zero) with "
                            f"sform_code {int(header['sform_code'])}")
    if not problems and not np.all(np.isfinite(facts["affine"])):
        problems.append("a non-finite affine")
    if facts["scale"] is not None and not np.all(np.isfinite(facts["scale"])):
        problems.append(f"a non-finite scaling (scl_slope, scl_inter = {facts['scale']})")
    if problems:
        raise FileFormatError(f"{path} has {' and '.join(problems)}; fix the header first (convt3d "
                              f"cannot place or scale the output without guessing)")


def _well_conditioned(matrix):
    """Whether a voxel-to-world 3x3 matrix keeps a usable grid after dividing by any stride.

    Its singular values must not be zero, nor so far apart (or so small) that a
    float32 header would lose an axis: an affine with a voxel size of 1e-45 passes
    a determinant test but turns singular once stored for the output.
    """
    values = np.linalg.svd(matrix, compute_uv=False)
    return values[-1] > 1e-12 and values[-1] >= 1e-8 * values[0]


def _is_gzip(path):
    return path.lower().endswith(".gz")


class NiftiFormat(Format):
    """NIfTI-1/2 images: one image per file, no key."""

    name = "nifti"
    label = LABEL
    transposed = True

    # ---- reading --------------------------------------------------------------------

    def _image(self, path, key=None):
        require_file(path)
        if key is not None:
            raise FileFormatError(f"{path}: a NIfTI file holds one image; remove ':{key}'")
        nib = _nib()
        with reading(path, LABEL):
            image = nib.load(path)
        if not isinstance(image, nib.Nifti1Image):  # Nifti2Image derives from Nifti1Image
            raise FileFormatError(f"{path} is not a NIfTI-1 or NIfTI-2 image "
                                  f"(nibabel reads it as {type(image).__name__})")
        return image

    def _inspect(self, path, key):
        """Header facts, before any rule about ranks or types is applied."""
        image = self._image(path, key)
        header = image.header
        with reading(path, LABEL):
            # The array proxy knows where the data is: nibabel zeroes vox_offset
            # in the header of a loaded image.
            proxy = image.dataobj
            facts = {
                "header": header,
                "shape": tuple(int(n) for n in proxy.shape),
                "stored": np.dtype(proxy.dtype),
                "offset": int(proxy.offset),
                "scale": scaling(image),
                "affine": np.array(image.affine, dtype=np.float64),
                "zooms": tuple(float(z) for z in header.get_zooms()),
            }
        return facts

    def probe(self, path, key):
        facts = self._inspect(path, key)
        shape, stored = facts["shape"], facts["stored"]
        check_numeric(stored, path)
        engine, fourth = engine_shape(shape, path)
        _check_placement(path, facts)
        dtype = read_dtype(stored, facts["scale"])
        raw_bytes = math.prod(shape) * stored.itemsize
        if not _is_gzip(path):
            check_payload(path, facts["offset"], raw_bytes, shape, stored)
        nbytes = math.prod(engine) * dtype.itemsize
        # .nii is memory-mapped; a .nii.gz is decompressed into memory first.
        needed = nbytes + (raw_bytes if _is_gzip(path) else 0)
        return VolumeInfo(
            path=path, key=None, format=self.name, stored_shape=shape, engine_shape=engine,
            dtype=dtype_name(stored), source_ndim=len(shape), affine=facts["affine"],
            zooms=facts["zooms"], header=facts["header"], attrs={}, read_dtype=dtype_name(dtype),
            nbytes=nbytes, memory_needed=needed, file_size=os.path.getsize(path),
            byte_order=byte_order(stored), scaling=facts["scale"], stored_dtype=stored,
            data_offset=facts["offset"], fourth_axis=fourth)

    def load(self, info):
        out = np.empty(info.engine_shape, dtype=info.read_dtype)
        with reading(info.path, LABEL):
            raw = read_raw(info.path, info.stored_shape, info.stored_dtype, info.data_offset)
            # One pass converts type and byte order and makes the result C-ordered.
            np.copyto(out, engine_view(raw, info.engine_shape), casting="unsafe")
            del raw
        apply_scaling(out, info.scaling)
        return out

    # ---- slab-wise reading ------------------------------------------------------------

    def open_source(self, info, transposed, dtype, pad, scratch_dir):
        stored = np.dtype(info.stored_dtype)
        shape = tuple(info.stored_shape)
        if not _is_gzip(info.path):
            with reading(info.path, LABEL):
                raw = np.memmap(info.path, dtype=stored, mode="r", offset=info.data_offset, shape=shape,
                                order="F")
            return ArraySource(info, transposed, dtype, pad, engine_view(raw, info.engine_shape))
        if transposed and info.engine_shape[0] * info.engine_shape[1] == 1:
            return GzipPlaneSource(info, dtype, pad)
        # Random access into a .nii.gz: decompress once into an anonymous file, map it.
        spool = tempfile.TemporaryFile(dir=scratch_dir, prefix=".convt3d-input-")
        with reading(info.path, LABEL), _gzip.open_read(info.path) as stream:
            _gzip.skip(stream, info.data_offset)
            need = math.prod(shape) * stored.itemsize
            done = _gzip.copy(stream, spool, need)
            if done < need:
                raise EOFError(f"{info.path} is truncated: the stream ends after {done} of "
                               f"{need} bytes of data")
            _gzip.drain(stream)
        spool.flush()
        raw = np.memmap(spool, dtype=stored, mode="r", shape=shape, order="F")
        return ArraySource(info, transposed, dtype, pad, engine_view(raw, info.engine_shape), keep=spool)

    # ---- writing --------------------------------------------------------------------

    def stored_dtype(self, dtype, data_dtype=None):
        """float64 or an integer type when asked for, else float32."""
        if dtype is not None and (np.dtype(dtype) == np.float64 or np.dtype(dtype).kind in "iu"):
            return native(dtype)
        return np.dtype(np.float32)

    def disk_bytes(self, path, out_shape, dtype):
        # .nii.gz: one channel goes straight through gzip (its size is unknowable);
        # several are spooled uncompressed first.
        if _is_gzip(path) and out_shape[1] == 1:
            return None
        return super().disk_bytes(path, out_shape, dtype)

    def output_key(self, key, out_shape):
        """Always ``None`` (one image per file); refuses a key."""
        if key is not None:
            raise OutputError(f"a NIfTI file holds one image; remove ':{key}' from the output")

    def open_writer(self, path, key, out_shape, dtype, *, overwrite, like, params, formula, source,
                    compress_level=None):
        self.output_key(key, out_shape)
        return NiftiWriter(path, out_shape, dtype, overwrite, like, params, compress_level)

    # ---- info -----------------------------------------------------------------------

    def describe(self, path, key):
        facts = self._inspect(path, key)
        header, shape, stored, scale = facts["header"], facts["shape"], facts["stored"], facts["scale"]
        space, time = _coded(header.get_xyzt_units, "xyzt_units", header, (None, None))
        report = {
            "path": path, "key": None, "format": self.name, "file_size": os.path.getsize(path),
            "nifti_version": 2 if isinstance(header, _nib().Nifti2Header) else 1,
            "stored_shape": list(shape), "dtype": dtype_name(stored),
            "byte_order": byte_order(stored), "data_bytes": math.prod(shape) * stored.itemsize,
            "data_offset": facts["offset"], "affine": facts["affine"].tolist(),
            "zooms": list(facts["zooms"]), "sform_code": int(header["sform_code"]),
            "qform_code": int(header["qform_code"]), "units": {"space": space, "time": time},
            "scl_slope": scale[0] if scale else None, "scl_inter": scale[1] if scale else None,
            "descrip": header["descrip"],
            "intent": _coded(header.get_intent, "intent_code", header, (None,))[0],
        }
        try:
            check_numeric(stored, path)
            engine, fourth = engine_shape(shape, path)
            _check_placement(path, facts)
        except (FileFormatError, ShapeError) as exc:
            report["engine_shape"] = None
            report["note"] = f"cannot be read as a volume: {exc}"
        else:
            report.update(engine_shape=list(engine), batch=engine[0], channels=engine[1],
                          layout=_layout(shape), spatial_axes="D=X,H=Y,W=Z",
                          read_dtype=dtype_name(read_dtype(stored, scale)))
            if fourth is not None:
                report["fourth_axis"] = ("channels by default; --fourth-axis volumes reads it as "
                                         f"{shape[3]} volumes")
        return jsonable(report)


def _output_image(array, like, params, value_range=None):
    """Build the output image: header inherited from a NIfTI input, affine of the upsampled grid.

    The header rules (``docs/behaviour.md``, *Spatial metadata*): every field of the
    input is kept except those the new grid or the new values invalidate -- the
    forms and voxel sizes (transformed), the data type and scaling (the output's
    own), ``cal_min``/``cal_max`` (recomputed from ``value_range`` when the input set
    them), and the slice-timing fields (cleared together when the slice axis is
    resampled). ``descrip`` and the extensions are the user's and stay; convt3d's
    own record goes into one more extension (a comment).
    """
    nib = _nib()
    inherited = like.header if like is not None and isinstance(like.header, nib.Nifti1Header) else None
    in_affine = np.asarray(like.affine if like is not None else np.eye(4), dtype=np.float64)
    version2 = max(array.shape) > MAX_NIFTI1_DIM or isinstance(inherited, nib.Nifti2Header)
    klass = nib.Nifti2Image if version2 else nib.Nifti1Image
    best = output_affine(in_affine, params)
    scode = int(inherited["sform_code"]) if inherited is not None else 0
    qcode = int(inherited["qform_code"]) if inherited is not None else 0
    if scode == 0 and qcode == 0:
        sform = qform = best
        scode = qcode = DEFAULT_XFORM_CODE
    else:
        # Transform each form on its own: they may describe different spaces
        # (e.g. scanner in the qform, MNI in the sform). A form whose code is 0
        # carries the best affine so the file stays self-consistent.
        sform = output_affine(inherited.get_sform(), params) if scode else best
        qform = output_affine(inherited.get_qform(), params) if qcode else best

    image = klass(array, best, header=_inherit_header(inherited, klass.header_class))
    header = image.header
    header.set_data_dtype(array.dtype)
    # The image holds the values themselves; old scaling would distort them on read.
    header.set_slope_inter(np.nan, np.nan)
    _display_window(header, value_range)
    _slice_timing(header, params)
    record = params.short().encode("ascii", "replace")
    if inherited is None:
        header["descrip"] = record[:DESCRIP_BYTES]
    header.extensions.append(_nib().nifti1.Nifti1Extension(COMMENT_ECODE, record))
    # nibabel resets the codes when given a new affine: set both forms explicitly.
    image.set_sform(sform, code=scode)
    image.set_qform(qform, code=qcode)
    # set_qform has put the spatial zooms (input zooms / stride, from the
    # affine) into pixdim; the qform needs exactly those. A 4-D output keeps
    # the input's 4th (time) zoom.
    zooms = list(header.get_zooms()[:3])
    if array.ndim > 3:
        in_zooms = inherited.get_zooms() if inherited is not None else (1.0,) * 3
        later = list(output_zooms(in_zooms, params)[3:])
        zooms.extend((later + [1.0] * 2)[:array.ndim - 3])
    header.set_zooms(zooms)
    return image


def _display_window(header, value_range):
    """``cal_min``/``cal_max``: the output's range when the input set a window, else cleared."""
    if float(header["cal_max"]) == 0 and float(header["cal_min"]) == 0:
        return
    low, high = value_range if value_range is not None else (0.0, 0.0)
    header["cal_min"], header["cal_max"] = low, high


def _slice_timing(header, params):
    """Keep the slice-timing fields only while the slice axis keeps its grid; else clear them all."""
    if slice_axis_kept(header, params):
        return
    freq, phase, _ = header.get_dim_info()
    header.set_dim_info(freq, phase, None)
    for field in ("slice_code", "slice_start", "slice_end"):
        header[field] = 0
    header["slice_duration"] = 0


def slice_axis_kept(header, params):
    """Whether the slice axis (any axis when ``dim_info`` does not say) keeps its grid."""
    slice_dim = header.get_dim_info()[2] if header is not None else None
    axes = [slice_dim] if slice_dim is not None else [0, 1, 2]
    return all(keeps_grid(params, axis) for axis in axes)


def needs_value_range(like):
    """Whether the output's ``cal_min``/``cal_max`` must be computed (the input set a window)."""
    header = getattr(like, "header", None)
    return header is not None and "cal_max" in header and (
        float(header["cal_max"]) != 0 or float(header["cal_min"]) != 0)


def output_array_shape(out_shape):
    """NIfTI shape of an engine output ``(N, Cout, X, Y, Z)``.

    ``(X, Y, Z)``, ``(X, Y, Z, Cout)`` for one volume; ``(X, Y, Z, N)`` or
    ``(X, Y, Z, N, Cout)`` for ``N`` volumes (time, echoes) -- the input's axis meaning.
    """
    volumes, channels = int(out_shape[0]), int(out_shape[1])
    spatial = tuple(int(v) for v in out_shape[2:])
    if volumes == 1:
        return spatial if channels == 1 else spatial + (channels,)
    return spatial + (volumes,) if channels == 1 else spatial + (volumes, channels)


def header_bytes(array_shape, dtype, like, params, value_range=None):
    """Header (and extensions, padded to ``vox_offset``) of the single-file image nibabel would write.

    Built without the data: the image holds a zero-strided stand-in of the
    output. The steps mirror ``nibabel.save`` (``update_header``, the scaling
    nibabel computes for float data, ``write_to``, zero padding to the data
    offset), so a streamed ``.nii`` is byte for byte what nibabel writes.

    Returns
    -------
    (bytes, int)
        The bytes before the data and the data offset (their length).
    """
    from nibabel.arraywriters import get_slope_inter, make_array_writer

    dtype = np.dtype(dtype)
    stand_in = np.broadcast_to(np.zeros((), dtype=dtype), tuple(array_shape))
    try:
        image = _output_image(stand_in, like, params, value_range)
    except (np.linalg.LinAlgError, _nib().spatialimages.HeaderDataError) as exc:
        # e.g. voxel sizes of 1e-320 from another format: finite, positive and unusable.
        raise OutputError(f"the output's voxel-to-world affine cannot be stored in a NIfTI header "
                          f"({reason(exc).splitlines()[0]}); the input's voxel sizes or orientation are "
                          f"unusable: write .npy, .h5 or .ome.zarr instead") from None
    image.get_data_dtype(finalize=True)
    image.update_header()
    header = image.header
    slope = header["scl_slope"].item() if header.has_data_slope else np.nan
    inter = header["scl_inter"].item() if header.has_data_intercept else np.nan
    if np.all(np.isnan((slope, inter))):
        writer = make_array_writer(np.zeros(1, dtype=dtype), header.get_data_dtype(),
                                   header.has_data_slope, header.has_data_intercept)
        header.set_slope_inter(*get_slope_inter(writer))
    if dtype.kind in "iu":
        # Integer outputs hold the values themselves: say so rather than leave "no scaling" (NaN).
        header["scl_slope"], header["scl_inter"] = 1.0, 0.0
    buffer = _io.BytesIO()
    header.write_to(buffer)
    offset = int(header.get_data_offset())
    raw = buffer.getvalue()
    if len(raw) > offset:  # pragma: no cover - nibabel sets vox_offset past the extensions
        raise OutputError("cannot build the NIfTI header: the extensions overrun the data offset")
    return raw + b"\0" * (offset - len(raw)), offset


def _inherit_header(inherited, header_class):
    """A native-endian header of ``header_class`` carrying the input's fields."""
    if inherited is None:
        return header_class()
    # check=False: converting NIfTI-1 -> 2 trips nibabel's sizeof_hdr check,
    # which only logs a warning and fixes it; fix it quietly instead.
    header = header_class.from_header(inherited, check=False)
    header["sizeof_hdr"] = header_class.sizeof_hdr
    native_code = "<" if np.little_endian else ">"
    if header.endianness != native_code:
        header = header.as_byteswapped(native_code)
    return header


# --------------------------------------------------------------------------- streaming

class NiftiWriter(StreamWriter):
    """``.nii`` and ``.nii.gz``: header first, then the data in file order (Z-slabs, transposed)."""

    transposed = NiftiFormat.transposed

    def __init__(self, path, out_shape, dtype, overwrite, like, params, compress_level):
        head, self.offset = header_bytes(output_array_shape(out_shape), dtype, like, params)
        super().__init__(path, out_shape, dtype, overwrite)
        self.like, self.params = like, params
        # The input set a display window: the output's is its value range, known only at
        # the end. A .nii rewrites its header then; a .nii.gz holds its data back (spool).
        self.track_range = needs_value_range(like)
        self.file_shape = output_array_shape(self.out_shape)
        self.gz = path.lower().endswith(".gz")
        volumes, channels, x, y, z = self.out_shape
        self.channel_bytes = x * y * z * self.dtype.itemsize
        self.plane_bytes = x * y * self.dtype.itemsize
        self.file = self.spool = self.gzip = None
        images = volumes * channels
        with self._failing_removes():
            self.file = open(self.tmp, "r+b")
            if self.gz:
                # Independent gzip members, compressed on a thread pool while the next slab
                # is computed (_gzip.MemberWriter; its threads start with the first full member).
                self.gzip = _gzip.MemberWriter(self._deflate, compress_level)
                if not self.track_range:
                    self._emit(head)
                if images > 1 or self.track_range:
                    # Volume- and channel-major on disk (or a header that waits for the value
                    # range): collect, compress at the end.
                    self.spool = Spool(os.path.dirname(os.path.abspath(path)), images * self.channel_bytes)
            else:
                self.file.write(head)
                self.file.flush()
                os.ftruncate(self.file.fileno(), self.offset + images * self.channel_bytes)

    def _emit(self, data):
        # The stream is cut into gzip members at fixed offsets of the uncompressed bytes
        # (_gzip.MEMBER_BYTES), never where a slab ends, so the .nii.gz bytes do not depend
        # on --max-memory; the members written so far go to the file in order.
        self.gzip.write(data)

    def _deflate(self, member):
        """Write one compressed gzip member (in order, in the writing thread)."""
        self.file.write(member)

    def _write(self, start, stop, block):
        volumes, channels = self.out_shape[:2]
        if self.gz and self.spool is None:
            if start != self.written:
                raise OutputError(f"{self.path}: .nii.gz slabs must arrive in order")
            for piece in chunks(block[0, 0]):
                self._emit(piece)
            return
        for c in range(channels):
            for n in range(volumes):
                # (X, Y, Z, T, C) in Fortran order: the volume index runs faster than the channel.
                where = (c * volumes + n) * self.channel_bytes + start * self.plane_bytes
                if self.spool is not None:
                    self.spool.pwrite(block[n, c], where)
                else:
                    pwrite_all(self.file.fileno(), block[n, c], self.offset + where)

    def _final_header(self):
        head, offset = header_bytes(self.file_shape, self.dtype, self.like, self.params, self.value_range)
        if offset != self.offset:  # pragma: no cover - the same extensions give the same offset
            raise OutputError(f"cannot write {self.path}: the header changed size")
        return head

    def _finish(self):
        if self.track_range and not self.gz:
            pwrite_all(self.file.fileno(), self._final_header(), 0)
        if self.gz:
            if self.track_range:
                self._emit(self._final_header())
            if self.spool is not None:
                for piece in self.spool.pieces():
                    self._emit(piece)
            self.gzip.close()  # the last member, the members in flight; the threads end
        self.file.flush()

    def _release(self):
        if self.gzip is not None:
            self.gzip.abort()  # after close: nothing left; on failure: drop the members, join the threads
            self.gzip = None
        if self.spool is not None:
            self.spool.close()
            self.spool = None
        if self.file is not None and not self.file.closed:
            self.file.close()


class GzipPlaneSource(Source):
    """A one-channel ``.nii.gz`` read forward, Z plane by Z plane (transposed orientation only).

    Slabs ask for non-decreasing plane ranges, so the stream is decompressed
    once, keeping only the planes the current slab needs.
    """

    def __init__(self, info, dtype, pad):
        super().__init__(info, True, dtype, pad)
        x, y = info.stored_shape[:2]
        self.plane_shape = (y, x)
        self.stored = np.dtype(info.stored_dtype)
        self.plane_bytes = x * y * self.stored.itemsize
        self.n = self.shape[2]
        with reading(info.path, LABEL):
            self.stream = _gzip.open_read(info.path)
            _gzip.skip(self.stream, info.data_offset)
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
        todo = block[keep:].reshape(-1).view(np.uint8)
        with reading(self.info.path, LABEL):
            _gzip.skip(self.stream, max(0, a - have_stop) * self.plane_bytes)
            done = _gzip.fill(self.stream, todo)
            if done < len(todo):
                raise EOFError(f"the stream ends after {(keep * self.plane_bytes + done)} bytes of the slab")
            if b == self.n:
                _gzip.drain(self.stream)
        self.cache, self.first = block, a
        return block[None, None]

    def close(self):
        if self.stream is not None:
            self.stream.close()
            self.stream = None


FORMAT = NiftiFormat()
