"""What the file layer hands out: arrays found in a file, volumes, weights.

Plain records with no behaviour beyond derived sizes; every format module
fills them the same way, so the rest of convt3d never asks which format a
file was.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .dtypes import dtype_name, is_numeric


@dataclass(frozen=True)
class Entry:
    """One array inside a file, known from its header only.

    ``name`` is the npz member (without ``.npy``), the absolute HDF5 dataset
    path, or ``None`` for a ``.npy`` file. ``needs_copy`` says whether turning
    the stored array into a C-contiguous native-endian one costs a second copy.
    """

    name: str | None
    shape: tuple
    dtype: np.dtype
    needs_copy: bool = False
    attrs: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def size(self):
        return math.prod(self.shape)

    @property
    def nbytes(self):
        return self.size * self.dtype.itemsize

    @property
    def numeric(self):
        return is_numeric(self.dtype)

    def label(self):
        """``name (shape) dtype`` for listings in error messages."""
        shape = "(" + ", ".join(str(n) for n in self.shape) + ("," if self.ndim == 1 else "") + ")"
        prefix = f"{self.name} " if self.name is not None else ""
        return f"{prefix}{shape} {dtype_name(self.dtype)}"


@dataclass
class VolumeInfo:
    """What a volume file holds, read from its header only (no voxel data).

    Attributes
    ----------
    path, key, format : str
        File, array actually chosen (``None`` for npy/NIfTI) and format name.
    stored_shape : tuple of int
        Shape as stored (NIfTI: ``(X, Y, Z[, 1][, C])``).
    engine_shape : tuple of int
        ``(N, C, D, H, W)`` as :func:`read_volume` returns it.
    dtype : str
        Stored element type (``"int16"``; byte order in :attr:`byte_order`).
    source_ndim : int
        Rank as stored; drives the rank of array outputs.
    affine : numpy.ndarray
        4x4 voxel-to-world affine; identity for array files.
    zooms : tuple of float or None
        NIfTI voxel sizes (all axes), else ``None``.
    header : nibabel header or None
    attrs : dict
        HDF5 attributes of the dataset, else ``{}``.
    read_dtype : str
        Element type of ``Volume.data`` (float when NIfTI scaling applies).
    nbytes : int
        Size of ``Volume.data``.
    memory_needed : int
        Peak bytes :func:`read_volume` allocates (data plus any temporary copy).
    file_size : int
    byte_order : str
        ``"little"``, ``"big"`` or ``"not applicable"`` (1-byte types).
    scaling : tuple of float or None
        ``(scl_slope, scl_inter)`` when NIfTI scaling is applied on read.
    stored_dtype : numpy.dtype or None
        Stored element type with its byte order.
    data_offset : int or None
        Byte offset of the voxel data (npy, NIfTI; uncompressed stream for .nii.gz).
    fourth_axis : str or None
        ``"channels"`` or ``"volumes"`` for an image whose 4th axis may be read either
        way (see :func:`convt3d_cli.io.api.with_fourth_axis`), else ``None``.
    """

    path: str
    key: str | None
    format: str
    stored_shape: tuple
    engine_shape: tuple
    dtype: str
    source_ndim: int
    affine: np.ndarray
    zooms: tuple | None
    header: object | None
    attrs: dict
    read_dtype: str
    nbytes: int
    memory_needed: int
    file_size: int
    byte_order: str
    scaling: tuple | None = None
    stored_dtype: np.dtype | None = None
    data_offset: int | None = None
    entry: Entry | None = field(default=None, repr=False)
    #: How a NIfTI/MGH 4th axis is read: ``"channels"``, ``"volumes"``, or ``None`` when there is no choice.
    fourth_axis: str | None = None


@dataclass
class Volume:
    """A volume in engine layout plus the metadata needed to write the result.

    Attributes
    ----------
    data : numpy.ndarray
        ``(N, C, D, H, W)``, C-contiguous, native byte order; dtype as stored
        except for scaled NIfTI images, which come back as float.
    affine : numpy.ndarray
        ``(4, 4)`` float64 voxel-to-world; identity for npy/npz/h5.
    source_ndim : int
        Rank as stored (3, 4 or 5).
    format : str
        ``"nifti"``, ``"hdf5"``, ``"npz"`` or ``"npy"``.
    path : str
    key : str or None
        Dataset path / npz member actually read.
    header : nibabel header or None
        Header of a NIfTI input (codes, units, 4th zoom), else ``None``.
    attrs : dict
        HDF5 attributes of the dataset read, else ``{}``.
    """

    data: np.ndarray
    affine: np.ndarray
    source_ndim: int
    format: str
    path: str
    key: str | None = None
    header: object | None = None
    attrs: dict = field(default_factory=dict)


@dataclass
class Weights:
    """A weight array, its optional bias and the layer options stored with it.

    Attributes
    ----------
    weight : numpy.ndarray
        In the engine's layout: ``(Cin, Cout/g, kD, kH, kW)`` or ``(g, Cin/g, Cout/g, kD, kH, kW)``.
    bias : numpy.ndarray or None
    options : dict
        Any of ``stride``, ``padding`` (1, 3 or 6 values), ``output_padding``,
        ``dilation`` (int or list of 3 ints) and ``groups`` (int) found in the
        file; ``output_size`` and ``pad_rule`` when the file asks for an output
        size (ONNX ``output_shape``), resolved against the input by the plan.
    source : str
        ``"path:key"`` actually read (just the path for ``.npy``).
    bias_source : str or None
        Where the bias came from.
    layout, layout_source : str
        The stored layout (:data:`convt3d_cli.io.layouts.LAYOUTS`) and why:
        what in the file says so, ``"--weight-layout"`` or ``"assumed"``.
    stored_shape : tuple of int
        The weight's shape as stored.
    files : tuple of str
        Other files the values were read from (ONNX external data): inputs of the run
        too, which an output must not replace.
    """

    weight: np.ndarray
    bias: np.ndarray | None
    options: dict
    source: str
    bias_source: str | None = None
    layout: str = "torch"
    layout_source: str = "assumed"
    stored_shape: tuple | None = None
    files: tuple = ()


@dataclass
class WeightsInfo:
    """Header-only view of a weights file (see :func:`convt3d_cli.io.inspect_weights`).

    ``shape`` is in the engine's layout; ``stored_shape`` as the file has it.
    """

    shape: tuple
    dtype: str
    options: dict
    source: str
    layout: str = "torch"
    layout_source: str = "assumed"
    stored_shape: tuple | None = None


@dataclass(frozen=True)
class StoredLayer:
    """A layer a weights file holds: a weight tensor, its bias and the settings stored with it.

    Formats that know layers (ONNX nodes, Keras layers) fill it from the model;
    plain tensor containers (PyTorch state dicts, safetensors) get one per 5-D or
    6-D tensor from :func:`convt3d_cli.io.entries.layers_from_tensors`.

    Attributes
    ----------
    name : str
        How ``--weights FILE:LAYER`` names it: a state-dict module path
        (``decoder.up1``), an ONNX node name, a Keras layer name, or the tensor name
        when it does not end in ``weight``.
    weight : Entry
        The weight tensor as stored (``Entry.name`` is its full tensor name).
    bias : Entry or None
    layout : str
        Layout of ``weight`` as stored, a key of :data:`convt3d_cli.io.layouts.LAYOUTS`.
    layout_source : str
        Why that layout: what in the file says so (``"Keras layer config"``), or
        ``""`` when it is assumed (a plain tensor).
    options : dict
        Layer settings the file carries, as :func:`convt3d_cli.io.entries.parse_options`
        returns them; ``padding`` may hold 6 values (begins then ends).
    aliases : tuple of str
        Other names that address the layer (weight tensor or initializer name).
    kind : str
        What the file calls the layer (``"ConvTranspose"``, ``"Conv3DTranspose"``),
        ``""`` for a plain tensor.
    """

    name: str
    weight: Entry
    bias: Entry | None = None
    layout: str = "torch"
    layout_source: str = ""
    options: dict = field(default_factory=dict, compare=False)
    aliases: tuple = ()
    kind: str = ""
