"""Reading and writing volumes and weights: NIfTI, HDF5, npz and npy.

One module per format behind a registry keyed by suffix (``.nii``,
``.nii.gz``, ``.h5``, ``.hdf5``, ``.npz``, ``.npy``); the output format
follows the output suffix whatever the input was. Format modules, h5py and
nibabel are imported on first use so that importing this package is cheap.

Files are addressed as ``PATH`` or ``PATH:KEY`` (CONTRACT §3). Every problem
with a file is raised as a :class:`~convt3d_cli.errors.Convt3dError` subclass.
"""

from __future__ import annotations

import importlib

import numpy as np

from ..errors import FileFormatError, OutputError, ParameterError, ShapeError
from ._atomic import atomic_write, check_target, same_file
from ._base import ArrayFormat
from ._common import (BIAS, SUFFIXES, WEIGHT, Volume, VolumeInfo, Weights, WeightsInfo,
                      check_memory, check_numeric, choose_entry, dtype_name, find_bias,
                      format_module, parse_options, require_file, split_spec)

__all__ = [
    "Volume", "VolumeInfo", "Weights", "WeightsInfo", "SUFFIXES", "split_spec", "format_of", "output_format",
    "read_volume", "probe_volume", "read_weights", "probe_weights", "inspect_weights",
    "write_volume", "check_output", "describe", "atomic_write", "same_file", "open_writer",
]


def open_writer(spec, out_shape, **kwargs):
    """Streaming writer for ``spec`` (see :func:`convt3d_cli.io._stream.open_writer`)."""
    from ._stream import open_writer as _open_writer

    return _open_writer(spec, out_shape, **kwargs)


def _format(path):
    """The format object for ``path`` (by suffix), importing its module on first use."""
    return importlib.import_module(f"{__name__}.{format_module(path)}").FORMAT


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
    path = split_spec(spec)[0]
    try:
        return format_module(path)
    except FileFormatError as exc:
        raise OutputError(f"cannot write {path}: unsupported output type; supported suffixes "
                          f"are {', '.join(SUFFIXES)}") from exc


def _reader(spec):
    path, key = split_spec(spec)
    require_file(path)
    return path, key, _format(path)


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


def read_volume(spec, *, max_bytes=None):
    """Read a volume in engine layout ``(N, C, D, H, W)``.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY``.
    max_bytes : int, optional
        Refuse to allocate more than this for the data.

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
    check_memory(info.memory_needed, path, max_bytes)
    data = fmt.load(info)
    return Volume(data=data, affine=np.array(info.affine, dtype=np.float64),
                  source_ndim=info.source_ndim, format=info.format, path=path, key=info.key,
                  header=info.header, attrs=dict(info.attrs))


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
    if not isinstance(fmt, ArrayFormat):
        raise FileFormatError(f"{path}: {what} must be stored in .npz, .npy or .h5/.hdf5 files")
    fmt.check_key(path, key)
    return path, key, fmt


def _source(path, entry):
    return path if entry.name is None else f"{path}:{entry.name}"


def _load_checked(fmt, path, entry):
    check_numeric(entry.dtype, _source(path, entry))
    check_memory(entry.nbytes * (2 if entry.needs_copy else 1), _source(path, entry))
    return np.asarray(fmt.load_entry(path, entry), dtype=entry.dtype.newbyteorder("="), order="C")


def inspect_weights(spec):
    """Weight shape, dtype and stored layer options, without loading the weight.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY`` of an npz, npy or HDF5 file.

    Returns
    -------
    WeightsInfo
        ``shape``, ``dtype``, ``options`` (see :class:`Weights`) and ``source``.
    """
    path, key, fmt = _array_reader(spec, "weights")
    entries = fmt.entries(path)
    entry = choose_entry(entries, key, WEIGHT, path)
    check_numeric(entry.dtype, _source(path, entry))
    options = parse_options(fmt.stored_options(path, entry, entries), _source(path, entry))
    return WeightsInfo(shape=tuple(entry.shape), dtype=dtype_name(entry.dtype), options=options,
                       source=_source(path, entry))


def probe_weights(spec):
    """Shape of the weight ``spec`` names, from the header only.

    Returns
    -------
    tuple of int
    """
    return inspect_weights(spec).shape


def read_weights(spec, bias_spec=None, *, no_bias=False):
    """Read a weight, its bias and the layer options stored with it.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY`` of an npz, npy or HDF5 file. Without a key:
        the only array, else ``weight`` or a single ``*.weight`` (option
        arrays and biases are not candidates).
    bias_spec : str, optional
        Read the bias from here (the only array, ``bias`` or a single
        ``*.bias``) instead of from the weight's file.
    no_bias : bool
        Ignore any bias.

    Returns
    -------
    Weights
        The weight as stored (either layout; the engine validates it), the bias
        or ``None``, and ``options`` from npz arrays / HDF5 attributes (the
        weight dataset's attributes win over the file's root attributes).

    Raises
    ------
    FileFormatError, KeyNotFoundError
        Unreadable files, NIfTI weights, missing or ambiguous arrays, bad options.
    ParameterError
        Both ``bias_spec`` and ``no_bias``.
    """
    if bias_spec is not None and no_bias:
        raise ParameterError("bias", "give either a bias file or no_bias, not both")
    path, key, fmt = _array_reader(spec, "weights")
    entries = fmt.entries(path)
    entry = choose_entry(entries, key, WEIGHT, path)
    weight = _load_checked(fmt, path, entry)
    options = parse_options(fmt.stored_options(path, entry, entries), _source(path, entry))

    bias, bias_source = None, None
    if bias_spec is not None:
        bias_path, bias_key, bias_fmt = _array_reader(bias_spec, "a bias")
        bias_entries = bias_fmt.entries(bias_path)
        bias_entry = choose_entry(bias_entries, bias_key, BIAS, bias_path)
        bias = _load_checked(bias_fmt, bias_path, bias_entry)
        bias_source = _source(bias_path, bias_entry)
    elif not no_bias:
        bias_entry = find_bias(entries, entry.name, path)
        if bias_entry is not None:
            bias = _load_checked(fmt, path, bias_entry)
            bias_source = _source(path, bias_entry)
    return Weights(weight=weight, bias=bias, options=options, source=_source(path, entry),
                   bias_source=bias_source)


# --------------------------------------------------------------------------- writing

def check_output(spec, out_shape, *, params, formula, inputs=(), overwrite=False):
    """Refuse, before any computation, an output that :func:`write_volume` would refuse.

    Parameters
    ----------
    spec : str
        Output ``PATH[:KEY]``.
    out_shape : tuple of int
        The result's ``(N, Cout, D, H, W)``.
    params : LayerParams
    formula : list of str
    inputs : iterable of str
        Specs of every file the run reads; the output may be none of them, with
        or without ``overwrite``, however the path is spelled.
    overwrite : bool

    Raises
    ------
    OutputError
        Unsupported suffix, output is an input, existing output without
        ``overwrite``, missing or read-only folder, or a result the format cannot
        hold (a key for NIfTI/npy, a batch into NIfTI).
    """
    path, key = split_spec(spec)
    for other in inputs:
        if other and same_file(path, split_spec(other)[0]):
            raise OutputError(f"the output {path} is the input file {other}; choose another output name "
                              f"(--overwrite never replaces an input)")
    output_format(path)
    check_target(path, overwrite)
    # The format's own rules live in ``prepare``; a dry run on a one-voxel stand-in
    # of the result applies them now rather than after the computation.
    stand_in = np.zeros(tuple(out_shape[:2]) + (1, 1, 1), dtype=np.float32)
    _format(path).prepare(key, stand_in, None, params, list(formula), None, None)


def write_volume(spec, data, *, like, params, formula, overwrite=False, source=None, dtype=None):
    """Write an engine result atomically; the format follows the output suffix.

    Parameters
    ----------
    spec : str
        ``PATH`` or ``PATH:KEY`` (HDF5 dataset, default ``/volume``; npz member,
        default ``volume``; no key for NIfTI and npy).
    data : numpy.ndarray
        ``(N, Cout, D, H, W)``.
    like : Volume or None
        The input: its rank, affine, NIfTI header and HDF5 voxel-size
        attributes shape the output (CONTRACT §3, §4).
    params : LayerParams
        Layer parameters used (output affine, HDF5 attributes, NIfTI descrip).
    formula : list of str
        The three formula lines (HDF5 attribute ``formula``).
    overwrite : bool
        Replace an existing output.
    source : str, optional
        Input spec, stored as HDF5 attribute ``source``.
    dtype : numpy dtype, optional
        Array outputs: cast to it (default: keep). NIfTI: float64 if it is
        float64, else float32.

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
    path, key = split_spec(spec)
    output_format(path)
    fmt = _format(path)
    data = np.asarray(data)
    if data.ndim != 5:
        raise ShapeError(f"data to write must be (N, C, D, H, W), got shape {data.shape}")
    if like is not None and like.path and same_file(path, like.path):
        raise OutputError(f"{path} is the input file; choose another output")
    payload = fmt.prepare(key, data, like, params, list(formula), source,
                          None if dtype is None else np.dtype(dtype))
    try:
        with atomic_write(path, overwrite=overwrite) as tmp:
            fmt.save(tmp, payload)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return path
