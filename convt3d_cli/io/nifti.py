"""NIfTI-1 and NIfTI-2 (``.nii``, ``.nii.gz``) through nibabel, imported on first use.

Axes: ``(X, Y, Z)`` is one channel with D=X, H=Y, W=Z; ``(X, Y, Z, C)`` and
``(X, Y, Z, 1, C)`` carry channels on the last axis. Scaling (``scl_slope``,
``scl_inter``) is applied on read. Outputs get the affine of CONTRACT §4 and
inherit the header of a NIfTI input (codes, units, intent, extensions, ...).
"""

from __future__ import annotations

import io as _io
import math
import os

import numpy as np

from ..errors import FileFormatError, OutputError, ShapeError
from ..geometry import output_affine, output_zooms
from . import _gzip
from ._common import (VolumeInfo, byte_order, check_nonempty, check_numeric, check_payload,
                      dtype_name, jsonable, native, reading, require_file)

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
# Decompress .nii.gz data in slices of this size (no second full-size buffer).
GZIP_SLICE = 16 << 20
_LAYOUTS = {3: "(X,Y,Z)", 4: "(X,Y,Z,C)", 5: "(X,Y,Z,1,C)"}


def _nib():
    import nibabel

    return nibabel


def engine_shape(shape, path):
    """Stored NIfTI shape -> ``(1, C, X, Y, Z)``."""
    shape = tuple(int(n) for n in shape)
    check_nonempty(shape, path)
    if len(shape) == 3:
        return (1, 1) + shape
    if len(shape) == 4:
        return (1, shape[3]) + shape[:3]
    if len(shape) == 5 and shape[3] == 1:
        return (1, shape[4]) + shape[:3]
    if len(shape) == 5:
        raise ShapeError(f"{path} has shape {shape}: a 5-D NIfTI must be (X,Y,Z,1,C); a time "
                         f"series of {shape[3]} multi-channel volumes is not supported, split it first")
    raise ShapeError(f"{path} has shape {shape}; a NIfTI input must be (X,Y,Z), (X,Y,Z,C) or "
                     f"(X,Y,Z,1,C)")


def engine_view(raw):
    """View of the stored array in ``(1, C, X, Y, Z)`` order (no copy)."""
    if raw.ndim == 3:
        return raw[None, None]
    if raw.ndim == 5:
        raw = raw[:, :, :, 0, :]
    return np.moveaxis(raw, 3, 0)[None]


def apply_scaling(array, scale):
    """Apply ``(slope, inter)`` in place (no-op for ``None``), in the array's own dtype."""
    if scale is not None:
        slope, inter = scale
        array *= array.dtype.type(slope)
        if inter:
            array += array.dtype.type(inter)


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
    buffer = memoryview(raw.view(np.uint8))
    with _gzip.open_read(path) as stream:
        _skip(stream, offset)
        done = 0
        while done < len(buffer):
            got = stream.readinto(buffer[done:done + GZIP_SLICE])
            if not got:
                raise FileFormatError(
                    f"{path} is truncated: its header declares {tuple(shape)} {dtype_name(dtype)} "
                    f"({len(buffer)} bytes) but the stream ends after {done} bytes of data")
            done += got
        while stream.read(GZIP_SLICE):
            pass
    return raw.reshape(shape, order="F")


def _skip(stream, count):
    while count > 0:
        got = len(stream.read(min(count, GZIP_SLICE)))
        if not got:
            raise EOFError("the stream ends inside the header")
        count -= got


def _is_gzip(path):
    return path.lower().endswith(".gz")


class NiftiFormat:
    """NIfTI-1/2 images: one image per file, no key."""

    name = "nifti"
    label = LABEL

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
        engine = engine_shape(shape, path)
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
            data_offset=facts["offset"])

    def load(self, info):
        out = np.empty(info.engine_shape, dtype=info.read_dtype)
        with reading(info.path, LABEL):
            raw = read_raw(info.path, info.stored_shape, info.stored_dtype, info.data_offset)
            # One pass converts type and byte order and makes the result C-ordered.
            np.copyto(out, engine_view(raw), casting="unsafe")
            del raw
        apply_scaling(out, info.scaling)
        return out

    # ---- writing --------------------------------------------------------------------

    def prepare(self, key, data, like, params, formula, source, dtype):
        if key is not None:
            raise OutputError(f"a NIfTI file holds one image; remove ':{key}' from the output")
        n, channels = data.shape[:2]
        if n > 1:
            raise OutputError(f"a NIfTI file cannot hold a batch of {n} volumes; write the result "
                              f"to .h5, .npz or .npy instead")
        out_dtype = np.dtype(np.float64 if dtype is not None and np.dtype(dtype) == np.float64
                             else np.float32)
        array = data[0, 0] if channels == 1 else np.moveaxis(data[0], 0, -1)
        array = array.astype(out_dtype, copy=False)
        return _output_image(array, like, params)

    def save(self, tmp_path, image):
        # nibabel picks gzip from the ".nii.gz" ending the temporary name keeps.
        _nib().save(image, tmp_path)

    # ---- info -----------------------------------------------------------------------

    def describe(self, path, key):
        facts = self._inspect(path, key)
        header, shape, stored, scale = facts["header"], facts["shape"], facts["stored"], facts["scale"]
        space, time = header.get_xyzt_units()
        report = {
            "path": path, "key": None, "format": self.name, "file_size": os.path.getsize(path),
            "nifti_version": 2 if isinstance(header, _nib().Nifti2Header) else 1,
            "stored_shape": list(shape), "dtype": dtype_name(stored),
            "byte_order": byte_order(stored), "data_bytes": math.prod(shape) * stored.itemsize,
            "data_offset": facts["offset"], "affine": facts["affine"].tolist(),
            "zooms": list(facts["zooms"]), "sform_code": int(header["sform_code"]),
            "qform_code": int(header["qform_code"]), "units": {"space": space, "time": time},
            "scl_slope": scale[0] if scale else None, "scl_inter": scale[1] if scale else None,
            "descrip": header["descrip"], "intent": header.get_intent()[0],
        }
        try:
            check_numeric(stored, path)
            engine = engine_shape(shape, path)
        except (FileFormatError, ShapeError) as exc:
            report["engine_shape"] = None
            report["note"] = f"cannot be read as a volume: {exc}"
        else:
            report.update(engine_shape=list(engine), batch=engine[0], channels=engine[1],
                          layout=_LAYOUTS[len(shape)], spatial_axes="D=X,H=Y,W=Z",
                          read_dtype=dtype_name(read_dtype(stored, scale)))
        return jsonable(report)


def _output_image(array, like, params):
    """Build the output image: header inherited from a NIfTI input, affine per CONTRACT §4."""
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
    # The image holds real values now; old scaling would distort them on read.
    header.set_slope_inter(np.nan, np.nan)
    # A display window and slice-timing ranges of the input no longer apply.
    header["cal_min"] = header["cal_max"] = 0
    header["slice_start"] = header["slice_end"] = 0
    header["descrip"] = params.short().encode("ascii", "replace")[:DESCRIP_BYTES]
    # nibabel resets the codes when given a new affine: set both forms explicitly.
    image.set_sform(sform, code=scode)
    image.set_qform(qform, code=qcode)
    # set_qform has put the spatial zooms (input zooms / stride, from the
    # affine) into pixdim; the qform needs exactly those. A 4-D output keeps
    # the input's 4th (time) zoom.
    zooms = list(header.get_zooms()[:3])
    if array.ndim == 4:
        in_zooms = inherited.get_zooms() if inherited is not None else (1.0,) * 3
        later = output_zooms(in_zooms, params)[3:]
        zooms.append(later[0] if later else 1.0)
    header.set_zooms(zooms)
    return image


def output_array_shape(out_shape):
    """NIfTI shape of an engine output ``(1, Cout, X, Y, Z)``: ``(X, Y, Z)`` or ``(X, Y, Z, Cout)``."""
    channels = int(out_shape[1])
    spatial = tuple(int(v) for v in out_shape[2:])
    return spatial if channels == 1 else spatial + (channels,)


def header_bytes(array_shape, dtype, like, params):
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
    image = _output_image(stand_in, like, params)
    image.get_data_dtype(finalize=True)
    image.update_header()
    header = image.header
    slope = header["scl_slope"].item() if header.has_data_slope else np.nan
    inter = header["scl_inter"].item() if header.has_data_intercept else np.nan
    if np.all(np.isnan((slope, inter))):
        writer = make_array_writer(np.zeros(1, dtype=dtype), header.get_data_dtype(),
                                   header.has_data_slope, header.has_data_intercept)
        header.set_slope_inter(*get_slope_inter(writer))
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


FORMAT = NiftiFormat()
