"""Shape arithmetic, parameter validation, the formula report and the output affine.

This is the only module that knows the ConvTranspose3d size rule::

    out = (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1

or, with different crops at the two ends of an axis (ONNX ``pads``, "same"
padding), ``- padding_begin - padding_end`` in place of ``- 2 * padding``:
the output is the full result cropped by ``padding_begin`` at the start and by
``padding_end - output_padding`` at the end.

Everything else (engine, file layer, command line) asks it. It imports nothing
heavier than NumPy so that ``convt3d shape`` stays instant.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .errors import ParameterError, ShapeError

AXES = ("D", "H", "W")
LAYER_OPTIONS = ("stride", "padding", "output_padding", "dilation", "groups")


def as_triple(value, name):
    """Turn an int or a sequence of one or three ints into a 3-tuple.

    Parameters
    ----------
    value : int or sequence of int
        ``2``, ``(2,)``, ``(2, 2, 1)`` or a NumPy array of those.
    name : str
        Parameter name used in the error message.

    Returns
    -------
    tuple of int
        Three Python ints.

    Raises
    ------
    ParameterError
        If ``value`` is not an integer or a sequence of 1 or 3 integers.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if _is_int(value):
        return (int(value),) * 3
    try:
        items = list(value)
    except TypeError:
        items = None
    if items is not None and len(items) in (1, 3) and all(_is_int(v) for v in items):
        if len(items) == 1:
            items = items * 3
        return tuple(int(v) for v in items)
    raise ParameterError(name, f"{name} must be an integer or 3 integers, got {value!r}")


def as_padding(value):
    """Turn ``padding`` into ``(begin, end)`` triples.

    Parameters
    ----------
    value : int or sequence
        An int or 1 or 3 ints (the same crop at both ends), 6 ints
        ``bD, bH, bW, eD, eH, eW`` (ONNX's ``pads`` order), or two triples
        ``((bD, bH, bW), (eD, eH, eW))``.

    Returns
    -------
    tuple of two tuples of int

    Raises
    ------
    ParameterError
        For anything else.
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not _is_int(value):
        try:
            items = list(value)
        except TypeError:
            items = None
        if items is not None and len(items) == 2 and not any(_is_int(v) for v in items):
            begin, end = (as_triple(v, "padding") for v in items)
            return begin, end
        if items is not None and len(items) == 6 and all(_is_int(v) for v in items):
            items = [int(v) for v in items]
            return tuple(items[:3]), tuple(items[3:])
    try:
        triple = as_triple(value, "padding")
    except ParameterError:
        raise ParameterError("padding", f"padding must be an integer, 3 integers, or 6 integers "
                                        f"(begin D,H,W then end D,H,W), got {value!r}") from None
    return triple, triple


def _is_int(value):
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Integral):
        return True
    # Integer-valued floats come from HDF5 attributes and JSON; accept them, reject 1.5.
    return isinstance(value, (float, np.floating)) and float(value).is_integer()


@dataclass(frozen=True)
class LayerParams:
    """Validated, per-axis layer parameters of a ConvTranspose3d.

    Build with :meth:`create`, which accepts ints or triples and checks every
    rule that does not depend on the data (see ``docs/behaviour.md``, *Semantics*).
    """

    kernel_size: tuple
    stride: tuple = (1, 1, 1)
    padding: tuple = (0, 0, 0)
    output_padding: tuple = (0, 0, 0)
    dilation: tuple = (1, 1, 1)
    groups: int = 1
    #: Crop at the end of each axis before ``output_padding``; ``padding`` is the begin crop.
    padding_end: tuple | None = None

    def __post_init__(self):
        if self.padding_end is None:
            object.__setattr__(self, "padding_end", self.padding)

    @property
    def symmetric(self):
        """Whether both ends of every axis lose the same ``padding`` (PyTorch's case)."""
        return self.padding == self.padding_end

    @property
    def padding_spec(self):
        """``padding`` as :meth:`create` takes it back: 3 values, or 6 when the ends differ."""
        return self.padding if self.symmetric else self.padding + self.padding_end

    @property
    def crop_end(self):
        """Total crop at the end of each axis, ``padding_end - output_padding`` (negative: extra planes)."""
        return tuple(e - op for e, op in zip(self.padding_end, self.output_padding))

    def reversed_axes(self):
        """The same layer with the spatial axes in reverse order (W, H, D)."""
        flip = lambda t: tuple(reversed(t))  # noqa: E731
        return LayerParams(flip(self.kernel_size), flip(self.stride), flip(self.padding),
                           flip(self.output_padding), flip(self.dilation), self.groups, flip(self.padding_end))

    @classmethod
    def create(cls, kernel_size, stride=1, padding=0, output_padding=0, dilation=1, groups=1):
        """Validate and normalise layer parameters.

        Parameters
        ----------
        kernel_size, stride, output_padding, dilation : int or 3 ints
        padding : int, 3 ints, 6 ints or two triples
            See :func:`as_padding`.
        groups : int

        Returns
        -------
        LayerParams

        Raises
        ------
        ParameterError
            Naming the first parameter that breaks a rule.
        """
        k = as_triple(kernel_size, "kernel_size")
        s = as_triple(stride, "stride")
        p, p_end = as_padding(padding)
        op = as_triple(output_padding, "output_padding")
        d = as_triple(dilation, "dilation")
        if not _is_int(groups):
            raise ParameterError("groups", f"groups must be a positive integer, got {groups!r}")
        groups = int(groups)
        if min(k) < 1:
            raise ParameterError("kernel_size", f"kernel_size must be >= 1, got {format_triple(k)}")
        if min(s) < 1:
            raise ParameterError("stride", f"stride must be >= 1, got {format_triple(s)}")
        if min(d) < 1:
            raise ParameterError("dilation", f"dilation must be >= 1, got {format_triple(d)}")
        if min(p) < 0 or min(p_end) < 0:
            shown = format_triple(p) if p == p_end else ",".join(str(v) for v in p + p_end)
            raise ParameterError("padding", f"padding must be >= 0, got {shown}")
        if min(op) < 0:
            raise ParameterError("output_padding", f"output_padding must be >= 0, got {format_triple(op)}")
        for axis, (op_i, s_i, d_i) in enumerate(zip(op, s, d)):
            if op_i >= max(s_i, d_i):
                raise ParameterError(
                    "output_padding",
                    f"output_padding must be smaller than max(stride, dilation) on every axis; "
                    f"axis {AXES[axis]} has output_padding={op_i}, stride={s_i}, dilation={d_i}",
                )
        if groups < 1:
            raise ParameterError("groups", f"groups must be >= 1, got {groups}")
        return cls(k, s, p, op, d, groups, p_end)

    def as_dict(self):
        """Plain-JSON view: lists of ints and ``groups``.

        ``padding`` has 3 values, or 6 (begins then ends) when the ends differ;
        ``crop_begin``/``crop_end`` are what is removed from each end of the full
        result (``crop_end`` is negative where ``output_padding`` adds planes).
        """
        return {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding_spec),
            "output_padding": list(self.output_padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
            "crop_begin": list(self.padding),
            "crop_end": list(self.crop_end),
        }

    def padding_text(self):
        """``1`` or ``1,1,0`` or, when the ends differ, ``0,0,0,1,1,1`` (begins then ends)."""
        return format_triple(self.padding) if self.symmetric else ",".join(str(v) for v in self.padding_spec)

    def short(self):
        """Compact one-line description, short enough for NIfTI ``descrip`` (80 bytes)."""
        return (f"convt3d k={format_triple(self.kernel_size)} s={format_triple(self.stride)} p={self.padding_text()} "
                f"op={format_triple(self.output_padding)} d={format_triple(self.dilation)} g={self.groups}")


def format_triple(triple):
    """``2`` when all three values agree, else ``2,2,1``."""
    return str(triple[0]) if len(set(triple)) == 1 else ",".join(str(v) for v in triple)


def output_size(n_in, kernel, stride, padding, output_padding, dilation, padding_end=None):
    """Output length along one axis (may be < 1 for invalid settings).

    ``padding`` is cropped at the start, ``padding_end`` (default: ``padding``) at the end.
    """
    padding_end = padding if padding_end is None else padding_end
    return (n_in - 1) * stride - padding - padding_end + dilation * (kernel - 1) + output_padding + 1


def _axis_size(n_in, axis, params):
    return output_size(n_in, params.kernel_size[axis], params.stride[axis], params.padding[axis],
                       params.output_padding[axis], params.dilation[axis], params.padding_end[axis])


def output_spatial(in_spatial, params):
    """Output ``(D, H, W)`` for input ``(D, H, W)``.

    Raises
    ------
    ParameterError
        (``padding``) if any axis would be empty.
    ShapeError
        If an input axis is empty.
    """
    out = []
    for axis, n_in in enumerate(in_spatial):
        if n_in < 1:
            raise ShapeError(f"input axis {AXES[axis]} is empty (size {n_in})")
        n_out = _axis_size(n_in, axis, params)
        if n_out < 1:
            raise ParameterError(
                "padding",
                f"the output would be empty along {AXES[axis]}: "
                f"{formula_line(axis, n_in, params)}; reduce padding",
            )
        out.append(n_out)
    return tuple(out)


def formula_line(axis, n_in, params):
    """One formula line, e.g. ``D_out = (32 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 0 + 1 = 63``.

    When the two ends of the axis lose different amounts, both terms show:
    ``... * 2 - 0 - 1 + ...``.
    """
    k, s, p = params.kernel_size[axis], params.stride[axis], params.padding[axis]
    op, d, p_end = params.output_padding[axis], params.dilation[axis], params.padding_end[axis]
    value = _axis_size(n_in, axis, params)
    crops = f"2 * {p}" if params.symmetric else f"{p} - {p_end}"
    return f"{AXES[axis]}_out = ({n_in} - 1) * {s} - {crops} + {d} * ({k} - 1) + {op} + 1 = {value}"


def formula_lines(in_spatial, params):
    """The three formula lines for input ``(D, H, W)``."""
    return [formula_line(axis, n, params) for axis, n in enumerate(in_spatial)]


def check_input_shape(shape):
    """Validate an engine input shape; return it as ``(N, C, D, H, W)`` and whether it was batched."""
    shape = tuple(int(v) for v in shape)
    if len(shape) == 5:
        return shape, True
    if len(shape) == 4:
        return (1,) + shape, False
    raise ShapeError(f"input must be (N, C, D, H, W) or (C, D, H, W); got a {len(shape)}-D shape {shape}")


def canonical_weight_shape(weight_shape, in_channels, groups):
    """Check a weight shape against the input and return the grouped layout.

    Accepts PyTorch's ``(Cin, Cout/groups, kD, kH, kW)`` and MegEngine's grouped
    ``(groups, Cin/groups, Cout/groups, kD, kH, kW)``.

    Returns
    -------
    tuple
        ``(groups, Cin/groups, Cout/groups, kD, kH, kW)``.

    Raises
    ------
    ParameterError
        (``groups``) if ``in_channels % groups != 0``.
    ShapeError
        On a wrong rank or a channel mismatch.
    """
    weight_shape = tuple(int(v) for v in weight_shape)
    if in_channels % groups:
        raise ParameterError("groups", f"input channels ({in_channels}) must be divisible by groups ({groups})")
    cin_g = in_channels // groups
    if len(weight_shape) == 5:
        if weight_shape[0] != in_channels:
            raise ShapeError(
                f"channel mismatch: the input has {in_channels} channels but the weight "
                f"{weight_shape} (layout Cin, Cout/groups, kD, kH, kW) expects {weight_shape[0]}")
        canonical = (groups, cin_g) + weight_shape[1:]
    elif len(weight_shape) == 6:
        if weight_shape[0] != groups:
            raise ShapeError(
                f"the grouped weight {weight_shape} (layout groups, Cin/groups, Cout/groups, kD, kH, kW) "
                f"has {weight_shape[0]} groups but groups={groups}")
        if weight_shape[1] != cin_g:
            raise ShapeError(
                f"channel mismatch: the input has {in_channels} channels ({cin_g} per group) but the "
                f"grouped weight {weight_shape} expects {weight_shape[1]} per group")
        canonical = weight_shape
    else:
        raise ShapeError(
            f"weight must be 5-D (Cin, Cout/groups, kD, kH, kW) or 6-D "
            f"(groups, Cin/groups, Cout/groups, kD, kH, kW); got shape {weight_shape}")
    if min(canonical) < 1:
        raise ShapeError(f"weight shape {weight_shape} has an empty axis")
    return canonical


def check_bias_shape(bias_shape, out_channels):
    """Accept ``(Cout,)`` or ``(1, Cout, 1, 1, 1)``; raise :class:`ShapeError` otherwise."""
    bias_shape = tuple(int(v) for v in bias_shape)
    if bias_shape in ((out_channels,), (1, out_channels, 1, 1, 1)):
        return
    raise ShapeError(f"bias must have shape ({out_channels},) or (1, {out_channels}, 1, 1, 1); got {bias_shape}")


def output_shape(input_shape, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, groups=1):
    """Shape of ``conv_transpose3d`` output without computing anything.

    Parameters
    ----------
    input_shape : tuple of int
        ``(N, C, D, H, W)`` or ``(C, D, H, W)``.
    out_channels : int
    kernel_size, stride, output_padding, dilation : int or 3 ints
    padding : int, 3 ints, 6 ints or two triples
        See :func:`as_padding`.
    groups : int

    Returns
    -------
    tuple of int
        Same rank as ``input_shape``.

    Examples
    --------
    >>> output_shape((16, 3, 32, 32, 32), 64, 3, stride=2, padding=1)
    (16, 64, 63, 63, 63)
    """
    params = LayerParams.create(kernel_size, stride, padding, output_padding, dilation, groups)
    full, batched = check_input_shape(input_shape)
    if full[1] % params.groups:
        raise ParameterError("groups", f"input channels ({full[1]}) must be divisible by groups ({params.groups})")
    if not _is_int(out_channels) or out_channels < 1 or out_channels % params.groups:
        raise ParameterError("out_channels",
                             f"out_channels must be a positive multiple of groups ({params.groups}), "
                             f"got {out_channels!r}")
    spatial = output_spatial(full[2:], params)
    shape = (full[0], int(out_channels)) + spatial
    return shape if batched else shape[1:]


def output_affine(affine, params):
    """Affine of the output grid: ``A_out = A_in @ T`` (``docs/behaviour.md``, *Spatial metadata*).

    Output voxel ``o`` lies at input index ``(o + p - d * (k - 1) / 2) / s``,
    the centre of the kernel footprint that produced it; ``p`` is the crop at
    the start of the axis, so the end crop never moves the grid.

    Parameters
    ----------
    affine : array_like, shape (4, 4)
        Voxel-to-world affine of the input (identity when the file has none).
    params : LayerParams

    Returns
    -------
    numpy.ndarray, shape (4, 4), float64
    """
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ShapeError(f"an affine must be 4x4, got {affine.shape}")
    k = np.asarray(params.kernel_size, dtype=np.float64)
    s = np.asarray(params.stride, dtype=np.float64)
    p = np.asarray(params.padding, dtype=np.float64)
    d = np.asarray(params.dilation, dtype=np.float64)
    transform = np.eye(4)
    transform[:3, :3] = np.diag(1.0 / s)
    transform[:3, 3] = (p - d * (k - 1) / 2.0) / s
    return affine @ transform


def output_zooms(zooms, params):
    """Divide the three spatial zooms by the stride; keep any further (time) zooms."""
    zooms = [float(z) for z in zooms]
    return tuple(z / s for z, s in zip(zooms[:3], params.stride)) + tuple(zooms[3:])


def oriented(shape, transposed):
    """A 5-D engine shape in slab orientation: ``(N, C, W, H, D)`` when ``transposed``.

    Slabs of a NIfTI file run along its slowest axis, engine W (see
    :mod:`convt3d_cli.slabs`); the transposition is its own inverse.
    """
    shape = tuple(int(v) for v in shape)
    return shape[:2] + shape[:1:-1] if transposed else shape


def growth_cause(in_spatial, params):
    """What makes the output largest: ``"stride 1000 along D"``, ``"dilation 10 along W"``, ...

    Per axis the output is ``(in - 1) * s - 2 * p + d * (k - 1) + op + 1``; the
    largest axis is named with the term that dominates it, for error messages
    about sizes.
    """
    best = None
    for axis, n_in in enumerate(in_spatial):
        k, s, d = params.kernel_size[axis], params.stride[axis], params.dilation[axis]
        size = _axis_size(n_in, axis, params)
        by_stride, by_kernel = (n_in - 1) * s, d * (k - 1)
        if by_stride >= by_kernel:
            cause = f"stride {s}"
        else:
            cause = f"dilation {d}" if d > k else f"kernel size {k}"
        if best is None or size > best[0]:
            best = (size, f"{cause} along {AXES[axis]}")
    return best[1]


def input_window(out_start, out_stop, n_in, axis, params):
    """Input index range ``[start, stop)`` that output indices ``[out_start, out_stop)`` read.

    Used to cut input slabs (with their halo) for slab-wise computation. The
    range is clipped to ``[0, n_in)`` and may be empty (then the output slab
    holds only the bias).
    """
    k, s, p, d = (params.kernel_size[axis], params.stride[axis], params.padding[axis],
                  params.dilation[axis])
    lowest = out_start + p - (k - 1) * d          # smallest i * s that can contribute
    start = max(0, -((-lowest) // s))              # ceil division
    stop = min(n_in, (out_stop - 1 + p) // s + 1)
    return start, max(start, stop)


class BlockAxis(NamedTuple):
    """One axis of an output block computed as a layer of its own (:func:`block_window`).

    The block's outputs ``[out_start, out_stop)`` are outputs ``skip ..`` of the layer
    with input ``[in_start, in_stop)``, begin crop ``crop_begin`` and end crop
    ``padding_end - output_padding``, which computes outputs ``[computed_start,
    computed_stop)`` of the whole layer.
    """

    out_start: int
    out_stop: int
    in_start: int
    in_stop: int
    crop_begin: int
    padding_end: int
    output_padding: int
    computed_start: int
    computed_stop: int
    #: No input reaches the block (output padding past the last input): it is the bias.
    bias_only: bool = False

    @property
    def skip(self):
        return self.out_start - self.computed_start


def block_window(out_start, out_stop, n_in, n_out, axis, params):
    """The small layer that computes outputs ``[out_start, out_stop)`` of one axis.

    Its input is the window those outputs read (``input_window``) and its crops put
    its first output on the layer's output ``computed_start``. The computed range is
    widened to whole stride phases, ``(o + crop_begin) % stride == 0`` at both ends
    (clipped to the output), so that every output keeps the phase, the taps and the
    neighbours it has in the whole layer; outputs only the bias reaches get a
    one-plane input. The block is then ``skip`` planes into the computed range.

    Returns
    -------
    BlockAxis
    """
    k, s, b, d = (params.kernel_size[axis], params.stride[axis], params.padding[axis],
                  params.dilation[axis])
    lo = max(0, out_start - (out_start + b) % s)
    hi = min(n_out, out_stop + (-(out_stop + b)) % s)
    start = max(0, -((-(lo + b - (k - 1) * d)) // s))
    start = min(start, (lo + b) // s, n_in - 1)           # the first output is at or after it
    stop = max(min(n_in, (hi - 1 + b) // s + 1), start + 1)
    crop_begin = lo + b - start * s
    full = (stop - start - 1) * s + (k - 1) * d + 1
    padding_end, output_padding = split_end_crop(full - crop_begin - (hi - lo))
    bias_only = lo + b > (n_in - 1) * s + (k - 1) * d
    return BlockAxis(out_start, out_stop, start, stop, crop_begin, padding_end, output_padding, lo, hi, bias_only)


def block_params(params, windows):
    """The :class:`LayerParams` of a block's own layer from its three :class:`BlockAxis`."""
    return LayerParams.create(params.kernel_size, params.stride,
                              tuple(w.crop_begin for w in windows) + tuple(w.padding_end for w in windows),
                              tuple(w.output_padding for w in windows), params.dilation, params.groups)


def padding_choices(n_in, target, kernel, stride, dilation):
    """All ``(padding, output_padding)`` pairs that give ``target`` along one axis.

    Returns
    -------
    list of tuple of int
        Sorted by padding; empty when no valid choice exists.
    """
    base = (n_in - 1) * stride + dilation * (kernel - 1) + 1
    choices = []
    for op in range(max(stride, dilation)):
        twice_p = base + op - target
        if twice_p >= 0 and twice_p % 2 == 0:
            choices.append((twice_p // 2, op))
    return sorted(choices)


def split_end_crop(crop):
    """A total end crop (negative: the output runs past the full result) as ``(padding_end, output_padding)``.

    ``output = full - begin - padding_end + output_padding``; a crop of ``-2``
    is two extra (bias-only) planes, ``(0, 2)``.
    """
    crop = int(crop)
    return max(crop, 0), max(-crop, 0)


def keeps_grid(params, axis):
    """Whether the layer leaves the grid of ``axis`` as it was (stride 1, kernel 1, no crops).

    Only then do per-slice facts of the input (NIfTI slice timing, BIDS ``SliceTiming``)
    still describe the output along that axis.
    """
    return (params.stride[axis] == 1 and params.kernel_size[axis] == 1 and params.padding[axis] == 0
            and params.crop_end[axis] == 0)


# --------------------------------------------------------------------------- target grids

#: How close (mm) an output affine must come to a reference's to count as the same grid.
GRID_TOLERANCE = 1e-4


def voxel_sizes(affine):
    """Voxel size along each array axis: the lengths of the affine's first three columns."""
    affine = np.asarray(affine, dtype=np.float64)
    return tuple(float(v) for v in np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))


def stride_for_voxel_size(affine, voxel_size):
    """The integer stride that turns the input's voxel sizes into ``voxel_size``.

    Parameters
    ----------
    affine : array_like, (4, 4)
        The input's voxel-to-world affine.
    voxel_size : float or 3 floats
        The wanted voxel size (mm) per axis (D, H, W = the file's first three axes).

    Raises
    ------
    ParameterError
        (``voxel_size``) when the ratio is not an integer >= 1 on some axis.
    """
    wanted = [float(v) for v in (voxel_size if isinstance(voxel_size, (list, tuple)) else [voxel_size] * 3)]
    if len(wanted) != 3 or not all(np.isfinite(wanted)) or min(wanted) <= 0:
        raise ParameterError("voxel_size", f"voxel size must be 1 or 3 positive numbers, got {voxel_size!r}")
    stride = []
    for axis, (have, want) in enumerate(zip(voxel_sizes(affine), wanted)):
        ratio = have / want
        # A subnormal V (or a voxel size whose square overflows) gives an infinite ratio.
        if not np.isfinite(ratio) or abs(ratio - round(ratio)) > 1e-4 * max(1.0, ratio) or round(ratio) < 1:
            raise ParameterError("voxel_size", f"the input's voxel size along {AXES[axis]} is {have:g} mm; "
                                               f"{want:g} mm is not an integer division of it "
                                               f"(ratio {ratio:.6g})")
        stride.append(int(round(ratio)))
    return tuple(stride)


def stride_for_grid(in_affine, ref_affine):
    """The integer stride that takes the input's grid spacing to a reference grid's.

    Raises
    ------
    ShapeError
        The axes are rotated, flipped or sheared against each other, or the spacing
        ratio is not an integer on some axis.
    """
    scale = _grid_transform(in_affine, ref_affine)[0]
    stride = []
    for axis, value in enumerate(scale):
        ratio = 1.0 / value
        if not np.isfinite(ratio) or abs(ratio - round(ratio)) > 1e-4 * max(1.0, ratio) or round(ratio) < 1:
            raise ShapeError(f"the reference's voxels along {AXES[axis]} are {value:.6g} times the input's; "
                             f"a stride can only divide them by an integer (1/2, 1/3, ...)")
        stride.append(int(round(ratio)))
    return tuple(stride)


def _grid_transform(in_affine, ref_affine):
    """Diagonal scale and offset with ``ref = in @ [diag(scale), offset]``, in input voxels."""
    in_affine = np.asarray(in_affine, dtype=np.float64)
    ref_affine = np.asarray(ref_affine, dtype=np.float64)
    with np.errstate(all="ignore"):
        transform = np.linalg.solve(in_affine, ref_affine)
    if not np.all(np.isfinite(transform)):
        # Affines whose numbers are finite but so far apart (origins near 1e308) that the
        # arithmetic overflows: no integer crop can be computed, let alone reached.
        raise ShapeError("the reference grid cannot be expressed in the input's voxels (its affine is too "
                         "far from the input's: the arithmetic overflows)")
    matrix = transform[:3, :3]
    scale = np.diag(matrix).copy()
    off = matrix - np.diag(scale)
    # In mm: how far the reference's axes are from scaled copies of the input's.
    if np.abs(in_affine[:3, :3] @ off).max() > GRID_TOLERANCE or min(scale) <= 0:
        raise ShapeError("the reference grid is rotated, flipped or sheared against the input's (its axes "
                         "are not the input's axes scaled); a transposed convolution cannot turn a grid")
    return scale, transform[:3, 3]


def padding_for_grid(in_affine, in_spatial, ref_affine, ref_spatial, kernel_size, stride, dilation):
    """Begin/end crops and output padding that put the output exactly on a reference grid.

    The output affine is ``A_in @ T`` with ``T`` scaling by ``1/s`` and shifting by
    ``(b - d(k-1)/2) / s`` (:func:`output_affine`), so the reference fixes the begin
    crop ``b``; its shape then fixes the end.

    Returns
    -------
    (tuple of 6 ints, tuple of 3 ints)
        ``padding`` (begins, ends) and ``output_padding``.

    Raises
    ------
    ShapeError
        Saying why no crop reaches the grid: axes rotated or flipped, a spacing that is
        not ``1/stride`` of the input's, an origin between output voxels, a reference
        that starts before or ends after what the layer can produce.
    """
    scale, offset = _grid_transform(in_affine, ref_affine)
    in_affine = np.asarray(in_affine, dtype=np.float64)
    begins, ends, extras = [], [], []
    for axis in range(3):
        k, s, d = kernel_size[axis], stride[axis], dilation[axis]
        n_in, n_ref = int(in_spatial[axis]), int(ref_spatial[axis])
        column = np.linalg.norm(in_affine[:3, axis])
        if abs(scale[axis] - 1.0 / s) * column * max(n_ref, 1) > GRID_TOLERANCE:
            raise ShapeError(f"the reference's voxels along {AXES[axis]} are {scale[axis]:.6g} of the input's, "
                             f"but the layer's stride {s} gives 1/{s}")
        exact = offset[axis] * s + d * (k - 1) / 2.0
        if not np.isfinite(exact):
            raise ShapeError(f"the reference's origin along {AXES[axis]} is {offset[axis]:.6g} input voxels away, "
                             f"beyond any crop this layer can make")
        begin = int(round(exact))
        if abs(begin - exact) / s * column > GRID_TOLERANCE:
            raise ShapeError(f"the reference's origin along {AXES[axis]} lies between the output voxels this "
                             f"layer can produce (off by {abs(begin - exact) / s * column:.6g} mm); no integer "
                             f"crop reaches it")
        if begin < 0:
            raise ShapeError(f"the reference starts {-begin} output voxel(s) before the first one this layer "
                             f"produces along {AXES[axis]}")
        full = output_size(n_in, k, s, 0, 0, d)
        end_crop = full - begin - n_ref
        padding_end, extra = split_end_crop(end_crop)
        if extra >= max(s, d):
            raise ShapeError(f"the reference ends {extra} output voxel(s) past the last one this layer can "
                             f"produce along {AXES[axis]} (at most {max(s, d) - 1} with output padding)")
        if n_ref < 1:
            raise ShapeError(f"the reference has no voxels along {AXES[axis]}")
        begins.append(begin)
        ends.append(padding_end)
        extras.append(extra)
    return tuple(begins) + tuple(ends), tuple(extras)
