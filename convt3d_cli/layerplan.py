"""Plan a layer for an input: resolve its parameters, validate it, report its shape.

``convt3d run``, ``convt3d shape`` and ``convt3d batch`` share everything here:
resolving the layer parameters (command line over weights file over
defaults), the output shape and the JSON report of the layer, and the
padding choices that reach a target size. All arithmetic is delegated to
:mod:`convt3d_cli.geometry`; the text lines are :mod:`convt3d_cli.report`'s.

The plan is built in two steps on purpose: :func:`plan_layer` only needs the
parameters, so the formula can be shown before anything else can fail, and
:meth:`LayerPlan.validate` then checks the data-dependent rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import geometry
from .builtin import builtin_params
from .errors import ParameterError
from .options import LAYER_DEFAULTS, merge_layer_options


@dataclass
class LayerPlan:
    """One ConvTranspose3d applied to an input of known shape.

    Attributes
    ----------
    input_shape : tuple of int
        ``(N, C, D, H, W)`` or ``(C, D, H, W)``; the output keeps the rank.
    weight_shape : tuple of int
        As stored, or the equivalent depthwise weight of a built-in kernel.
    params : geometry.LayerParams
    kernel : str or None
        Name of a built-in kernel, ``None`` for user weights.
    bias_shape : tuple of int or None
    """

    input_shape: tuple
    weight_shape: tuple
    params: geometry.LayerParams
    kernel: str | None = None
    bias_shape: tuple | None = None
    #: Where each setting came from: ``"command line"``, the weights file, ``"default"``, ...
    sources: dict = field(default_factory=dict)
    output_shape: tuple | None = field(default=None, init=False)

    @property
    def formula(self):
        """The three formula lines (valid even before :meth:`validate`)."""
        return geometry.formula_lines(self.input_shape[-3:], self.params)

    def validate(self):
        """Check channels, groups, bias and output size; return the output shape.

        Raises
        ------
        ShapeError, ParameterError
        """
        channels = self.input_shape[-4]
        canonical = geometry.canonical_weight_shape(self.weight_shape, channels, self.params.groups)
        out_channels = canonical[0] * canonical[2]
        if self.bias_shape is not None:
            geometry.check_bias_shape(self.bias_shape, out_channels)
        spatial = geometry.output_spatial(self.input_shape[-3:], self.params)
        self.output_shape = self.input_shape[:-4] + (out_channels,) + spatial
        return self.output_shape

    def as_dict(self):
        """JSON-ready report of the layer (shapes, parameters, formula)."""
        report = {
            "input_shape": list(self.input_shape),
            "weight_shape": list(self.weight_shape),
            "output_shape": list(self.output_shape) if self.output_shape is not None else None,
            "kernel": self.kernel,
        }
        report.update(self.params.as_dict())
        report["formula"] = self.formula
        report["settings_from"] = dict(self.sources)
        return report


def plan_layer(input_shape, cli_options, *, weight_shape=None, kernel=None, bias_shape=None,
               file_options=None, file_source="weights file", cli_sources=None):
    """Resolve the layer parameters for an input shape.

    Parameters
    ----------
    input_shape : tuple of int
        ``(N, C, D, H, W)`` or ``(C, D, H, W)``.
    cli_options : dict
        ``stride``, ``padding``, ... from the command line (``None`` = not given).
    weight_shape : tuple of int, optional
        Shape of the user weight; its last three axes are the kernel size.
    kernel : str, optional
        Built-in kernel name instead of ``weight_shape`` (uses only ``stride``).
    bias_shape : tuple of int, optional
    file_options : dict, optional
        Layer options stored in the weights file; the command line overrides them.
        ``output_size`` with ``pad_rule`` (ONNX ``output_shape``) become the padding
        that gives that size for this input.
    file_source : str
        How the report names the weights file (``model.onnx:up1``).
    cli_sources : dict, optional
        Where options in ``cli_options`` came from when not typed (``--like REF``).

    Returns
    -------
    LayerPlan
        Not validated yet; call :meth:`LayerPlan.validate`.
    """
    input_shape = tuple(int(v) for v in input_shape)
    cli_sources = dict(cli_sources or {})
    geometry.check_input_shape(input_shape)
    channels = input_shape[-4]
    if kernel is not None:
        params = builtin_params(kernel, cli_options["stride"], channels)
        sources = {name: f"built-in {kernel}" for name in LAYER_DEFAULTS}
        if cli_options.get("padding") is not None:
            # Crops chosen for a target grid (--like) replace the kernel's own centring.
            params = geometry.LayerParams.create(params.kernel_size, params.stride, cli_options["padding"],
                                                 cli_options.get("output_padding") or 0, 1, params.groups)
        weight_shape = (channels, 1) + params.kernel_size
        sources.update({name: cli_sources.get(name, "command line") for name, value in cli_options.items()
                        if name in LAYER_DEFAULTS and value is not None})
        return LayerPlan(input_shape, weight_shape, params, kernel=kernel, sources=sources)
    weight_shape = tuple(int(v) for v in weight_shape)
    if len(weight_shape) not in (5, 6):
        # Let geometry word the rank error, as the library does.
        geometry.canonical_weight_shape(weight_shape, channels, 1)
    file_options = dict(file_options or {})
    output_size, pad_rule = file_options.pop("output_size", None), file_options.pop("pad_rule", "lower")
    sources = {name: file_source for name, value in file_options.items() if value is not None}
    if len(weight_shape) == 6 and "groups" not in file_options:
        # A grouped (MegEngine) weight states its number of groups.
        file_options["groups"] = weight_shape[0]
        sources["groups"] = "weight shape"
    options = merge_layer_options(cli_options, file_options)
    if output_size is not None and cli_options.get("padding") is None:
        options["padding"], output_padding = _padding_for_size(input_shape[-3:], output_size, pad_rule,
                                                               weight_shape[-3:], options, file_source)
        sources["padding"] = f"{file_source} (output shape {geometry.format_triple(tuple(output_size))})"
        if cli_options.get("output_padding") is None and output_padding != geometry.as_triple(
                options["output_padding"], "output_padding"):
            options["output_padding"] = output_padding
            sources["output_padding"] = sources["padding"]
    sources.update({name: cli_sources.get(name, "command line") for name, value in cli_options.items()
                    if name in LAYER_DEFAULTS and value is not None})
    for name in LAYER_DEFAULTS:
        sources.setdefault(name, "default")
    params = geometry.LayerParams.create(weight_shape[-3:], **options)
    return LayerPlan(input_shape, weight_shape, params, bias_shape=bias_shape,
                     sources={name: sources[name] for name in LAYER_DEFAULTS})


def _padding_for_size(in_spatial, output_size, pad_rule, kernel_size, options, where):
    """Begin/end crops (and output padding) that give ``output_size`` (ONNX ``output_shape``).

    The total crop is ``full + output_padding - size``; ``pad_rule`` "upper" puts an odd
    voxel at the end, "lower" at the start (ONNX ``auto_pad`` SAME_UPPER; anything else
    is "lower", as ONNX Runtime does). A size up to ``stride - 1`` beyond the full
    result crops nothing and adds bias-only planes at the end, as ONNX Runtime does.

    Returns
    -------
    (tuple of 6 ints, tuple of 3 ints)
        ``padding`` and ``output_padding``.
    """
    stride, output_padding, dilation = (geometry.as_triple(options[name], name)
                                        for name in ("stride", "output_padding", "dilation"))
    begins, ends, extras = [], [], []
    for axis, n_in in enumerate(in_spatial):
        full = geometry.output_size(n_in, kernel_size[axis], stride[axis], 0, 0, dilation[axis])
        size = int(output_size[axis])
        total = full + output_padding[axis] - size
        extra = output_padding[axis]
        if total < 0:
            extra = size - full
            if extra >= max(stride[axis], dilation[axis]):
                raise ParameterError("padding", f"{where} asks for an output of {size} along "
                                                f"{geometry.AXES[axis]}, but this layer gives at most "
                                                f"{full + max(stride[axis], dilation[axis]) - 1} for an "
                                                f"input of {n_in}")
            total = 0
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if pad_rule == "upper" else (large, small)
        begins.append(begin)
        ends.append(end)
        extras.append(extra)
    return tuple(begins) + tuple(ends), tuple(extras)


def grid_options(cli_options, *, in_affine, in_spatial, kernel=None, weight_shape=None, file_options=None,
                 like=None, voxel_size=None):
    """Layer options that put the output on a target grid: ``--like REF`` or ``--voxel-size V``.

    Parameters
    ----------
    cli_options : dict
        The command line's layer options (``None`` = not given).
    in_affine : array_like, (4, 4)
        The input's voxel-to-world affine (engine axes D, H, W).
    in_spatial : tuple of 3 ints
    kernel : str, optional
        A built-in kernel: its stride comes from the grid too.
    weight_shape : tuple, optional
        A trained weight's shape (its kernel size); its stride stays the layer's.
    file_options : dict, optional
        Settings stored with the weights (their stride and dilation count).
    like : (affine, spatial shape), optional
        The reference grid.
    voxel_size : float or 3 floats, optional
        Wanted voxel size (``--kernel`` only): the stride is the input's voxel size over it.

    Returns
    -------
    (dict, dict)
        The options to plan with, and where the ones set here came from.
    """
    from .builtin import kernel_size as builtin_kernel_size

    options = dict(cli_options)
    sources = {}
    if voxel_size is not None:
        options["stride"] = geometry.stride_for_voxel_size(in_affine, voxel_size)
        sources["stride"] = "--voxel-size"
        return options, sources
    ref_affine, ref_spatial = like
    if kernel is not None:
        stride = geometry.stride_for_grid(in_affine, ref_affine)
        k, dilation = builtin_kernel_size(kernel, stride), (1, 1, 1)
        options["stride"] = stride
        sources["stride"] = "--like"
    else:
        merged = merge_layer_options(cli_options, file_options)
        stride = geometry.as_triple(merged["stride"], "stride")
        dilation = geometry.as_triple(merged["dilation"], "dilation")
        k = tuple(weight_shape[-3:])
    padding, output_padding = geometry.padding_for_grid(in_affine, in_spatial, ref_affine, ref_spatial, k,
                                                        stride, dilation)
    options["padding"], options["output_padding"] = padding, output_padding
    sources["padding"] = sources["output_padding"] = "--like"
    return options, sources


def weight_shape_for(in_channels, out_channels, kernel_size, cli_options):
    """Weight shape ``(Cin, Cout/groups, kD, kH, kW)`` for ``convt3d shape --out-channels``.

    Raises
    ------
    ParameterError
        If ``out_channels`` is not a positive multiple of ``groups``.
    """
    groups = merge_layer_options(cli_options)["groups"]
    if out_channels < 1 or out_channels % groups:
        raise ParameterError("out_channels", f"out_channels must be a positive multiple of groups "
                                             f"({groups}), got {out_channels}")
    return (in_channels, out_channels // groups) + tuple(kernel_size)


def target_plan(input_spatial, target, params):
    """``(padding, output_padding)`` choices per axis that give ``target``.

    Parameters
    ----------
    input_spatial, target : tuple of 3 ints
    params : geometry.LayerParams
        Supplies kernel size, stride and dilation.

    Returns
    -------
    list of dict
        One per axis: ``axis``, ``input``, ``target``, ``choices`` (list of
        ``[padding, output_padding]``, empty when none exists).
    """
    axes = []
    for axis, (n_in, n_out) in enumerate(zip(input_spatial, target)):
        choices = geometry.padding_choices(n_in, n_out, params.kernel_size[axis], params.stride[axis],
                                           params.dilation[axis])
        axes.append({"axis": geometry.AXES[axis], "input": n_in, "target": n_out,
                     "choices": [list(c) for c in choices]})
    return axes
