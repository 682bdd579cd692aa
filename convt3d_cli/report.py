"""Plan a layer for the command line and report it (text and JSON).

``convt3d run`` and ``convt3d shape`` share everything here: resolving the
layer parameters (command line over weights file over defaults), the formula
lines, the validation of channels, bias and sizes, the output shape and the
JSON report. All arithmetic is delegated to :mod:`convt3d_cli.geometry`.

The plan is built in two steps on purpose: :func:`plan_layer` only needs the
parameters, so the formula can be shown before anything else can fail, and
:meth:`LayerPlan.validate` then checks the data-dependent rules.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from . import geometry
from .builtin import builtin_params
from .errors import MemoryLimitError, ParameterError
from .options import merge_layer_options


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
        return report

    def layer_line(self):
        """``kernel_size=3 stride=2 ...`` on one line."""
        p = self.params
        return (f"kernel_size={_triple(p.kernel_size)} stride={_triple(p.stride)} "
                f"padding={_triple(p.padding)} output_padding={_triple(p.output_padding)} "
                f"dilation={_triple(p.dilation)} groups={p.groups}")


def _triple(values):
    return str(values[0]) if len(set(values)) == 1 else ",".join(str(v) for v in values)


def plan_layer(input_shape, cli_options, *, weight_shape=None, kernel=None, bias_shape=None,
               file_options=None):
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

    Returns
    -------
    LayerPlan
        Not validated yet; call :meth:`LayerPlan.validate`.
    """
    input_shape = tuple(int(v) for v in input_shape)
    geometry.check_input_shape(input_shape)
    channels = input_shape[-4]
    if kernel is not None:
        params = builtin_params(kernel, cli_options["stride"], channels)
        weight_shape = (channels, 1) + params.kernel_size
        return LayerPlan(input_shape, weight_shape, params, kernel=kernel)
    weight_shape = tuple(int(v) for v in weight_shape)
    if len(weight_shape) not in (5, 6):
        # Let geometry word the rank error, as the library does.
        geometry.canonical_weight_shape(weight_shape, channels, 1)
    file_options = dict(file_options or {})
    if len(weight_shape) == 6:
        # A grouped (MegEngine) weight states its number of groups.
        file_options.setdefault("groups", weight_shape[0])
    options = merge_layer_options(cli_options, file_options)
    params = geometry.LayerParams.create(weight_shape[-3:], **options)
    return LayerPlan(input_shape, weight_shape, params, bias_shape=bias_shape)


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


def target_lines(axes, params):
    """Human-readable lines for :func:`target_plan`, ending with ready-to-use options."""
    lines = []
    for entry in axes:
        axis = entry["axis"]
        index = geometry.AXES.index(axis)
        head = (f"{axis}: {entry['input']} -> {entry['target']} with kernel_size={params.kernel_size[index]} "
                f"stride={params.stride[index]} dilation={params.dilation[index]}: ")
        if entry["choices"]:
            lines.append(head + ", ".join(f"padding={p} output_padding={op}" for p, op in entry["choices"]))
        else:
            lines.append(head + "no padding/output_padding gives this size")
    if all(entry["choices"] for entry in axes):
        first = [entry["choices"][0] for entry in axes]
        lines.append(f"use: --padding {_triple([c[0] for c in first])} "
                     f"--output-padding {_triple([c[1] for c in first])}")
    return lines


def working_set(plan, dtype_itemsize, weight_bytes=0):
    """Bytes a whole-volume run holds at once: input and output in the compute dtype, plus weights."""
    n_in = _prod(plan.input_shape)
    n_out = _prod(plan.output_shape)
    if plan.kernel == "linear":
        # The replicate-padded copy of the input (one voxel per side).
        lead = _prod(plan.input_shape[:-3])
        n_in += lead * _prod(n + 2 for n in plan.input_shape[-3:])
    return (n_in + n_out) * dtype_itemsize + weight_bytes


def _prod(values):
    result = 1
    for v in values:
        result *= int(v)
    return result


def check_memory(needed, max_memory=None, available=None):
    """Refuse a run whose working set exceeds ``--max-memory`` or the available memory.

    Parameters
    ----------
    needed : int
        Estimated working set in bytes (:func:`working_set`).
    max_memory : int, optional
        The ``--max-memory`` limit.
    available : int, optional
        Available memory; measured when not given.

    Returns
    -------
    int or None
        The effective limit in bytes (for the reader's size check).

    Raises
    ------
    MemoryLimitError
    """
    from .io._common import available_memory, human_bytes

    if available is None:
        available = available_memory()
    if max_memory is not None and needed > max_memory:
        raise MemoryLimitError(
            f"the run needs about {human_bytes(needed)} (input + output + weights) but --max-memory is "
            f"{human_bytes(max_memory)}; raise --max-memory or use a smaller input")
    if available is not None and needed > available:
        raise MemoryLimitError(
            f"the run needs about {human_bytes(needed)} (input + output + weights) but only "
            f"{human_bytes(available)} of memory is available; free memory or use a smaller input "
            f"(--max-memory cannot raise this limit)")
    limits = [v for v in (max_memory, available) if v is not None]
    return min(limits) if limits else None


# --------------------------------------------------------------------------- report lines

def emit_plan(echo, plan, input_label, layer_label):
    """The report lines every command prints before any data-dependent check."""
    echo(f"input:   {input_label}")
    echo(f"weights: {layer_label}")
    echo(f"layer:   {plan.layer_line()}")
    for line in plan.formula:
        echo(line)


def shape_str(shape):
    """``(8, 7, 6)``, and ``(2,)`` for one value, like Python prints shapes."""
    return "(" + ", ".join(str(v) for v in shape) + ("," if len(shape) == 1 else "") + ")"


def input_label(spec, info):
    """``vol.nii.gz (48, 48, 48) as (N, C, D, H, W) (1, 1, 48, 48, 48) int16``."""
    shown = shape_str(info.stored_shape)
    if tuple(info.stored_shape) != tuple(info.engine_shape):
        shown += f" as (N, C, D, H, W) {shape_str(info.engine_shape)}"
    return f"{spec} {shown} {info.dtype}"


def layer_label(plan, source=None, bias_source=None):
    """``w.npz:weight (1, 2, 3, 3, 3), bias w.npz:bias (2,)``, or the built-in kernel."""
    if plan.kernel:
        return f"built-in {plan.kernel}, depthwise, weight {shape_str(plan.weight_shape)}"
    label = shape_str(plan.weight_shape) if source is None else f"{source} {shape_str(plan.weight_shape)}"
    if plan.bias_shape is not None:
        label += f", bias {bias_source} {shape_str(plan.bias_shape)}"
    return label
