"""The file layer's public functions; each finds the format by suffix and asks it.

Nothing here knows a format: :mod:`convt3d_cli.io.registry` maps a suffix to
its module, whose ``FORMAT`` object does the work (:mod:`convt3d_cli.io.base`
describes the interface). Reading and writing go through one path each:
:func:`write_volume` is the streaming writer fed a single slab, so the library
and ``convt3d run`` write the same bytes.
"""

from __future__ import annotations

import os

import dataclasses

import numpy as np

from ..errors import FileFormatError, OutputError, ParameterError, ShapeError
from . import _gzip
from ._atomic import same_file
from .base import WeightsFormat
from .dtypes import check_numeric, dtype_name
from .entries import (
    BIAS,
    WEIGHT,
    basename,
    choose_entry,
    choose_layer,
    entry_source,
    find_bias,
    parse_options,
)
from .layouts import check_layout, engine_shape, to_engine
from .records import StoredLayer, Volume, Weights, WeightsInfo
from .registry import format_for, format_module, output_format_for, split_spec
from .safety import check_memory, human_bytes, require_file, writable_bytes
from .streaming import oriented_view


def format_of(path):
    """Format name (``"nifti"``, ``"hdf5"``, ``"npz"``, ``"npy"``) for a path's suffix.

    Raises
    ------
    FileFormatError
        For an unsupported suffix.
    """
    return format_module(split_spec(path)[0])


def output_format(spec):
    """Format name an output ``PATH[:KEY]`` will be written in; checks the suffix only.

    Raises
    ------
    OutputError
        For an unsupported suffix, listing the supported ones.
    """
    return output_format_for(split_spec(spec)[0]).name


def transposed_slabs(spec):
    """Whether an output ``PATH[:KEY]`` takes its slabs along engine W, transposed.

    See :mod:`convt3d_cli.io.streaming`; the pipeline computes such outputs as the
    transposed problem (:func:`convt3d_cli.slabs.oriented_layer`).
    """
    return output_format_for(split_spec(spec)[0]).transposed


def blockwise(spec):
    """Whether an output ``PATH[:KEY]`` is a chunked store written block by block (Zarr)."""
    return output_format_for(split_spec(spec)[0]).blockwise


def open_block_writer(spec, out_shape, *, like, params, formula, overwrite=False, source=None, dtype=np.float32,
                      output_dtype=None, chunks=None, shards=None, compressor=None, resume=False, fingerprint=None,
                      blocks=None):
    """Open the writer of a block-wise output (a Zarr store); see :class:`convt3d_cli.io.omezarr.ZarrWriter`.

    Returns
    -------
    ZarrWriter
        ``write_block(index, region, block)``, ``done()``, ``commit()``, ``abort(keep)``;
        ``layout`` is what a worker process needs to write blocks itself.
    """
    path, key = split_spec(spec)
    fmt = output_format_for(path)
    stored = fmt.stored_dtype(output_dtype if output_dtype is not None else dtype, dtype)
    return fmt.open_block_writer(path, key, tuple(int(v) for v in out_shape), stored, overwrite=overwrite,
                                 like=like, params=params, formula=list(formula), source=source, chunks=chunks,
                                 shards=shards, compressor=compressor, resume=resume, fingerprint=fingerprint,
                                 blocks=blocks)


def input_stamps(spec, key=None):
    """What says an input changed, for ``--resume``: names, sizes and times of its file, or of a
    store's metadata documents (never of its chunks)."""
    path = split_spec(spec)[0]
    return format_for(path).stamps(path, key)


def partial_output(spec):
    """The partial output an interrupted run left at ``spec`` for ``--resume``, else ``None``."""
    path = split_spec(spec)[0]
    try:
        return output_format_for(path).partial_output(path)
    except OutputError:
        return None


def output_chunks(spec, like, out_shape, chunks=None, shards=None):
    """The chunk shape blocks of a block-wise output align to: ``shards``, else ``chunks``, else the
    format's default for this input (the input's chunks, or 128 per axis)."""
    if shards:
        return tuple(int(v) for v in shards)
    if chunks:
        return tuple(int(v) for v in chunks)
    return output_format_for(split_spec(spec)[0]).default_chunks(like, out_shape)


def _reader(spec):
    path, key = split_spec(spec)
    if not os.path.isdir(path):  # devices, pipes and missing files are refused before the suffix
        require_file(path)
    fmt = format_for(path)
    fmt.require(path)            # a folder must be a store the format reads (Zarr)
    return path, key, fmt


# --------------------------------------------------------------------------- volumes

def probe_volume(spec):
    """Describe the volume ``spec`` would read, from headers only.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY``.

    Returns
    -------
    VolumeInfo
        Shapes (stored and engine), dtypes, affine, header, attributes, sizes.

    Raises
    ------
    FileFormatError, KeyNotFoundError, ShapeError
        Missing, unsupported, corrupt, truncated or ambiguous files; wrong ranks.
    """
    path, key, fmt = _reader(spec)
    return fmt.probe(path, key)


def with_fourth_axis(info, mode="auto", in_channels=None):
    """Read the 4th axis of a 4-D image as channels or as separate volumes.

    Parameters
    ----------
    info : VolumeInfo
        From :func:`probe_volume`; returned unchanged when its 4th axis leaves no
        choice (``info.fourth_axis is None``: 3-D images, array files, 5-D NIfTI).
    mode : {"auto", "volumes", "channels"}
        ``volumes``: each entry of the 4th axis (time, echoes) is upsampled on its own,
        as the batch axis N. ``channels``: the 4th axis is the layer's input channels.
        ``auto``: channels when the layer takes as many input channels (more than
        one) or is a built-in kernel (``in_channels=None``; depthwise, so both readings
        give the same values), volumes when it takes one.
    in_channels : int, optional
        The layer's input channels.

    Returns
    -------
    VolumeInfo

    Raises
    ------
    ParameterError
        An unknown mode.
    ShapeError
        ``auto`` when neither reading fits the layer; the message names both.
    """
    if mode not in ("auto", "volumes", "channels"):
        raise ParameterError("fourth_axis", f"fourth_axis must be auto, volumes or channels, got {mode!r}")
    if info.fourth_axis is None:
        return info
    length = int(info.stored_shape[3])
    if mode == "auto":
        if in_channels is None:
            # A built-in kernel is depthwise: both readings give the same values, and as
            # channels a NIfTI output keeps its (X, Y, Z, T) shape.
            mode = "channels"
        elif in_channels == 1:
            mode = "volumes"
        elif in_channels == length:
            mode = "channels"
        else:
            raise ShapeError(
                f"{info.path} has {length} entries on its 4th axis: read as {length} volumes each has 1 "
                f"channel, read as channels it has {length}, but the layer takes {in_channels} input "
                f"channels; choose a reading with --fourth-axis volumes|channels or use another layer")
    spatial = tuple(info.engine_shape[2:])
    shape = ((1, length) if mode == "channels" else (length, 1)) + spatial
    return dataclasses.replace(info, engine_shape=shape, fourth_axis=mode)


def read_volume(spec, *, max_bytes=None, fourth_axis=None):
    """Read a volume in engine layout ``(N, C, D, H, W)``.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY``.
    max_bytes : int, optional
        Refuse to allocate more than this for the data.
    fourth_axis : {"volumes", "channels"}, optional
        How to read the 4th axis of a 4-D NIfTI image (see :func:`with_fourth_axis`);
        default: channels.

    Returns
    -------
    Volume

    Raises
    ------
    FileFormatError, KeyNotFoundError, ShapeError
        See :func:`probe_volume`.
    MemoryLimitError
        The header declares more data than ``max_bytes`` or the available memory.

    Notes
    -----
    Sizes are checked against the header before anything is allocated: a
    truncated ``.nii``/``.npy`` is refused without reading it.
    """
    path, key, fmt = _reader(spec)
    info = fmt.probe(path, key)
    if fourth_axis is not None:
        if fourth_axis == "auto":
            raise ParameterError("fourth_axis", "read_volume needs fourth_axis volumes or channels: "
                                                "auto depends on a layer")
        info = with_fourth_axis(info, fourth_axis)
    check_memory(info.memory_needed, path, max_bytes)
    data = fmt.load(info)
    return Volume(data=data, affine=np.array(info.affine, dtype=np.float64),
                  source_ndim=info.source_ndim, format=info.format, path=path, key=info.key,
                  header=info.header, attrs=dict(info.attrs))


def open_source(info, transposed, dtype, pad, scratch_dir):
    """Input planes of a probed volume for a slab-wise run.

    Parameters
    ----------
    info : VolumeInfo
        From :func:`probe_volume`.
    transposed : bool
        Slab orientation of the output (:func:`transposed_slabs`).
    dtype : numpy dtype
        Compute dtype of the planes handed out.
    pad : int
        Edge voxels to replicate per side (the ``linear`` built-in kernel).
    scratch_dir : str
        Folder for a temporary decompressed copy, when the format needs one.

    Returns
    -------
    Source
        ``read(a, b)`` gives planes ``[a, b)``; ``close()`` when done.
    """
    return format_for(info.path).open_source(info, transposed, dtype, pad, scratch_dir)


def resident_bytes(info):
    """Bytes :func:`open_source` holds for the whole run (an input it must load whole)."""
    return format_for(info.path).resident_bytes(info)


def describe(spec):
    """Everything ``convt3d info`` shows about a file, without loading voxel data.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY``.

    Returns
    -------
    dict
        JSON-serialisable: ``path``, ``key``, ``format``, ``file_size``,
        ``stored_shape``, ``dtype``, ``byte_order``, ``data_bytes``,
        ``engine_shape``, ``batch``, ``channels``, ``layout``, ``spatial_axes``;
        NIfTI adds ``nifti_version``, ``affine``, ``zooms``, ``sform_code``,
        ``qform_code``, ``units``, ``scl_slope``, ``scl_inter``, ...; HDF5 adds
        ``tree`` (every dataset with its attributes), ``default`` and
        ``root_attrs``; npz adds ``arrays``. When a file holds several arrays
        and none is the default, the shape fields are absent and ``note`` says why.
    """
    path, key, fmt = _reader(spec)
    return fmt.describe(path, key)


# --------------------------------------------------------------------------- weights

def _array_reader(spec, what):
    path, key, fmt = _reader(spec)
    if not fmt.holds_weights:
        raise FileFormatError(f"{path}: {what} must be stored in a weights file (.pt, .pth, .ckpt, "
                              f".safetensors, .onnx, .keras, .h5) or an array file (.npz, .npy, .hdf5)")
    fmt = fmt.weights_format(path)
    fmt.check_key(path, key)
    return path, key, fmt


def _load_checked(fmt, path, entry):
    where = entry_source(path, entry)
    check_numeric(entry.dtype, where)
    check_memory(entry.nbytes * (2 if entry.needs_copy else 1), where)
    loader = fmt.load_tensor if isinstance(fmt, WeightsFormat) else fmt.load_entry
    return np.asarray(loader(path, entry), dtype=entry.dtype.newbyteorder("="), order="C")


def _stored_layer(path, key, fmt):
    """The weight of ``PATH[:KEY]`` as a :class:`StoredLayer`, whatever the format."""
    if isinstance(fmt, WeightsFormat):
        return choose_layer(fmt.layers(path), key, path), None
    entries = fmt.entries(path)
    entry = choose_entry(entries, key, WEIGHT, path)
    check_numeric(entry.dtype, entry_source(path, entry))
    options = fmt.stored_options(path, entry, entries)       # parsed once, by _layer_options
    layout, layout_source = "torch", ""
    if entry.name is not None and basename(entry.name).endswith("kernel:0"):
        # TensorFlow names a Keras kernel variable "kernel:0"; it is stored channels-last.
        layout, layout_source = "keras", "dataset name kernel:0"
    layer = StoredLayer(name=entry.name or "", weight=entry, layout=layout, layout_source=layout_source,
                        options=options)
    return layer, entries


def _layer_source(path, layer):
    """``model.keras:up1`` for a layer the file names (Keras, ONNX), else the tensor read."""
    return f"{path}:{layer.name}" if layer.kind else entry_source(path, layer.weight)


def _resolve_layout(layer, wanted, where):
    """The layout to read ``layer`` in, and why: the file's word, ``--weight-layout``, or assumed."""
    if wanted is not None:
        check_layout(wanted)
        if layer.layout_source and wanted != layer.layout:
            raise ParameterError("weight_layout",
                                 f"{where} is stored in {layer.layout} layout ({layer.layout_source}); "
                                 f"--weight-layout {wanted} contradicts the file")
        if not layer.layout_source:
            return wanted, "--weight-layout"
    if layer.layout_source:
        return layer.layout, layer.layout_source
    return layer.layout, "assumed"


def _layer_options(layer, where):
    options = parse_options(layer.options, where)
    for name in ("output_size", "pad_rule"):
        if name in layer.options:
            options[name] = layer.options[name]
    return options


def inspect_weights(spec, *, layout=None):
    """Weight shape, dtype and stored layer settings, without loading the weight.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:LAYER`` of a weights file (PyTorch, safetensors, ONNX,
        Keras) or ``PATH[:KEY]`` of an npz, npy or HDF5 array file.
    layout : str, optional
        ``--weight-layout`` for plain arrays (:data:`convt3d_cli.io.layouts.LAYOUTS`).

    Returns
    -------
    WeightsInfo
        ``shape`` in the engine's layout, ``dtype``, ``options`` (see :class:`Weights`),
        ``source``, ``layout`` and ``layout_source``.
    """
    path, key, fmt = _array_reader(spec, "weights")
    layer, _ = _stored_layer(path, key, fmt)
    where = _layer_source(path, layer)
    check_numeric(layer.weight.dtype, where)
    chosen, why = _resolve_layout(layer, layout, where)
    return WeightsInfo(shape=engine_shape(layer.weight.shape, chosen, where), dtype=dtype_name(layer.weight.dtype),
                       options=_layer_options(layer, where), source=where, layout=chosen, layout_source=why,
                       stored_shape=tuple(layer.weight.shape))


def probe_weights(spec):
    """Shape of the weight ``spec`` names (engine layout), from the header only.

    Returns
    -------
    tuple of int
    """
    return inspect_weights(spec).shape


def read_weights(spec, bias_spec=None, *, no_bias=False, layout=None):
    """Read a weight, its bias and the layer settings stored with it.

    Parameters
    ----------
    spec : str
        ``PATH[:LAYER]`` of a weights file (``.pt``/``.pth``/``.ckpt``,
        ``.safetensors``, ``.onnx``, ``.keras``, Keras ``.h5``): LAYER is a module
        path (``decoder.up1``), a tensor, ONNX node or initializer, or Keras layer
        name; without it, the only 5-D/6-D weight. Or ``PATH[:KEY]`` of an npz,
        npy or HDF5 file: without a key, the only array, else ``weight`` or a
        single ``*.weight`` (option arrays and biases are not candidates).
    bias_spec : str, optional
        Read the bias from here (the only array, ``bias`` or a single
        ``*.bias``; in a weights file, the tensor named) instead of from the weight's file.
    no_bias : bool
        Ignore any bias.
    layout : {"torch", "megengine", "keras", "flax"}, optional
        How a plain array is laid out (``--weight-layout``); a file that says
        its layout (Keras, ONNX, a ``kernel:0`` dataset) may not be contradicted.

    Returns
    -------
    Weights
        The weight in the engine's layout, the bias or ``None``, and ``options``
        (npz arrays, HDF5 attributes, ONNX attributes, Keras configs).

    Raises
    ------
    FileFormatError, KeyNotFoundError
        Unreadable files, NIfTI weights, missing or ambiguous arrays, bad options.
    ParameterError
        Both ``bias_spec`` and ``no_bias``; a layout the file contradicts.
    """
    if bias_spec is not None and no_bias:
        raise ParameterError("bias", "give either a bias file or no_bias, not both")
    path, key, fmt = _array_reader(spec, "weights")
    layer, entries = _stored_layer(path, key, fmt)
    where = _layer_source(path, layer)
    chosen, why = _resolve_layout(layer, layout, where)
    engine_shape(layer.weight.shape, chosen, where)      # refuse a wrong rank before loading
    weight = to_engine(_load_checked(fmt, path, layer.weight), chosen, where)
    options = _layer_options(layer, where)

    bias, bias_source, files = None, None, _data_files(layer.weight)
    if bias_spec is not None:
        bias, bias_source, bias_files = _read_bias(bias_spec)
        files += bias_files
    elif not no_bias:
        if entries is None:
            bias_entry = layer.bias
        else:
            bias_entry = find_bias(entries, layer.weight.name, path)
        if bias_entry is not None:
            bias = _load_checked(fmt, path, bias_entry)
            bias_source = entry_source(path, bias_entry)
            files += _data_files(bias_entry)
    return Weights(weight=weight, bias=bias, options=options, source=where, bias_source=bias_source,
                   layout=chosen, layout_source=why, stored_shape=tuple(layer.weight.shape),
                   files=tuple(dict.fromkeys(files)))


def _data_files(entry):
    """The files besides its own that an entry's values are read from (ONNX external data)."""
    found = entry.attrs.get("file") if entry is not None else None
    return (found,) if isinstance(found, str) else ()


def _read_bias(spec):
    path, key, fmt = _array_reader(spec, "a bias")
    if isinstance(fmt, WeightsFormat):
        tensors = fmt.tensors(path)
        entry = choose_entry(tensors, key, BIAS, path)
    else:
        entry = choose_entry(fmt.entries(path), key, BIAS, path)
    return _load_checked(fmt, path, entry), entry_source(path, entry), _data_files(entry)


# --------------------------------------------------------------------------- writing

def _nested(a, b):
    """Whether one of two paths lies inside the other (a store folder and a path in it)."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b:
        return False
    try:
        common = os.path.commonpath([a, b])
    except ValueError:
        return False
    return common in (a, b) and (os.path.isdir(a) or os.path.isdir(b))


def check_output(spec, out_shape, *, inputs=(), overwrite=False, dtype=None, why=None, output_dtype=None):
    """Refuse, before any computation, an output that :func:`open_writer` would refuse.

    Parameters
    ----------
    spec : str
        Output ``PATH[:KEY]``.
    out_shape : tuple of int
        The result's ``(N, Cout, D, H, W)``.
    inputs : iterable of str
        Specs of every file the run reads; the output may be none of them, with
        or without ``overwrite``, however the path is spelled.
    overwrite : bool
    dtype : numpy dtype, optional
        The compute dtype: with it, the output must also fit the free space of
        its folder and the process's file-size limit (when the format can tell
        its size in advance).
    why : str, optional
        What makes the output large, for that message (``"stride 1000 along D"``).
    output_dtype : numpy dtype, optional
        The type the file is to store (``--output-dtype``); the format may refuse it.

    Raises
    ------
    OutputError
        Unsupported suffix, output is an input, existing output without
        ``overwrite``, missing or read-only folder, a result the format cannot
        hold (a key for NIfTI/npy, a batch into NIfTI), or no room for it.
    """
    path, key = split_spec(spec)
    for other in inputs:
        if other and same_file(path, split_spec(other)[0]):
            raise OutputError(f"the output {path} is the input file {other}; choose another output name "
                              f"(--overwrite never replaces an input)")
        if other and _nested(path, split_spec(other)[0]):
            raise OutputError(f"the output {path} and the input {other} are one inside the other (a Zarr store "
                              f"is a folder); choose an output outside the input and not containing it")
    fmt = output_format_for(path)
    folder = fmt.check_target(path, overwrite)
    out_shape = tuple(int(v) for v in out_shape)
    fmt.output_key(key, out_shape)
    stored = fmt.stored_dtype(output_dtype if output_dtype is not None else dtype, dtype)
    if dtype is not None:
        need = fmt.disk_bytes(path, out_shape, stored)
        room = writable_bytes(folder)
        if need is not None and room is not None and need > room:
            because = f" ({why} makes it this large)" if why else ""
            raise OutputError(f"the output {out_shape} would take {human_bytes(need)} but only "
                              f"{human_bytes(room)} can be written in {folder}{because}")


def open_writer(spec, out_shape, *, like, params, formula, overwrite=False, source=None, dtype=np.float32,
                compress_level=None, output_dtype=None):
    """Open the streaming writer for ``spec``; the format follows the suffix.

    Parameters
    ----------
    spec : str
        Output ``PATH[:KEY]`` (HDF5 dataset, default ``/volume``; npz member,
        default ``volume``; no key for NIfTI and npy).
    out_shape : tuple
        Engine output ``(N, Cout, D, H, W)``.
    like : Volume or VolumeInfo or None
        The input: its rank, affine, NIfTI header and HDF5 voxel-size
        attributes shape the output (``docs/behaviour.md``, *Files, axes and
        keys* and *Spatial metadata*).
    params : LayerParams
        Layer parameters used (output affine, HDF5 attributes, NIfTI descrip).
    formula : list of str
        The three formula lines (HDF5 attribute ``formula``).
    overwrite : bool
        Replace an existing output (never the input).
    source : str, optional
        Input spec, stored as HDF5 attribute ``source``.
    dtype : numpy dtype
        The dtype of the slabs; array files store it, NIfTI stores float64 when
        it is float64, else float32 (``writer.dtype`` says which).
    compress_level : int, optional
        ``.nii.gz`` only: 0 (fastest) to 3 (smallest), default 1.
    output_dtype : numpy dtype, optional
        The type to store instead (``--output-dtype``): float slabs are converted,
        integers rounded half to even and clipped (``writer.clipped`` counts them).

    Returns
    -------
    StreamWriter
        ``write_slab(start, stop, block)`` then ``commit()`` (or use it as a context
        manager); ``transposed`` tells the slab orientation.

    Raises
    ------
    OutputError
        Unsupported suffix, the output is the input, an existing output without
        ``overwrite``, a missing folder, a result the format cannot hold.
    """
    path, key = split_spec(spec)
    fmt = output_format_for(path)
    if like is not None and getattr(like, "path", None) and same_file(path, like.path):
        raise OutputError(f"{path} is the input file; choose another output")
    if compress_level is not None and compress_level not in _gzip.LEVELS:
        raise ParameterError("compress_level", f"compress_level must be 0 to 3, got {compress_level!r}")
    stored = fmt.stored_dtype(output_dtype if output_dtype is not None else dtype, dtype)
    return fmt.open_writer(path, key, tuple(int(v) for v in out_shape), stored,
                           overwrite=overwrite, like=like, params=params, formula=list(formula),
                           source=source, compress_level=compress_level)


def write_volume(spec, data, *, like, params, formula, overwrite=False, source=None, dtype=None,
                 compress_level=None):
    """Write an engine result atomically: the streaming writer fed a single slab.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY``; see :func:`open_writer`.
    data : numpy.ndarray
        ``(N, Cout, D, H, W)``.
    like, params, formula, overwrite, source, compress_level
        As for :func:`open_writer`.
    dtype : numpy dtype, optional
        Array outputs: cast to it (default: keep the data's). NIfTI: float64 if it
        is float64, else float32.

    Returns
    -------
    str
        The path written.

    Raises
    ------
    OutputError
        Existing output without ``overwrite``, output is the input, missing
        folder, batch into NIfTI, a key for npy/NIfTI, write failure.
    ShapeError
        ``data`` is not 5-D.
    """
    path = split_spec(spec)[0]
    fmt = output_format_for(path)
    data = np.asarray(data)
    if data.ndim != 5:
        raise ShapeError(f"data to write must be (N, C, D, H, W), got shape {data.shape}")
    stored = fmt.stored_dtype(dtype, data.dtype)
    if fmt.blockwise:  # a chunked store: the block writer fed one block, the whole output
        writer = open_block_writer(spec, data.shape, like=like, params=params, formula=formula,
                                   overwrite=overwrite, source=source, dtype=stored)
        try:
            writer.write_block(0, ((0, 0, 0), tuple(data.shape[2:])), data)
            writer.commit()
        except BaseException:
            writer.abort()
            raise
        return path
    with open_writer(spec, data.shape, like=like, params=params, formula=formula, overwrite=overwrite,
                     source=source, dtype=stored, compress_level=compress_level) as writer:
        block = oriented_view(data, writer.transposed)
        writer.write_slab(0, writer.axis_length, np.ascontiguousarray(block, dtype=writer.dtype))
    return path
