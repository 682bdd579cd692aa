"""The text a layer plan is reported in: the lines before every run, shapes, labels.

What :mod:`convt3d_cli.layerplan` decides, this module words, one line each,
for ``convt3d run`` (stderr) and ``convt3d shape`` (stdout).
"""

from __future__ import annotations

from . import geometry


def emit_plan(echo, plan, input_label, layer_label):
    """The report lines every command prints before any data-dependent check."""
    echo(f"input:   {input_label}")
    echo(f"weights: {layer_label}")
    echo(f"layer:   {layer_line(plan.params)}")
    origin = settings_line(plan.sources)
    if origin:
        echo(f"from:    {origin}")
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


def settings_line(sources):
    """``stride, padding: model.onnx:up1; groups: command line``: the settings not left at
    their defaults, grouped by where they came from (empty when all are defaults)."""
    grouped = {}
    for name, origin in sources.items():
        if origin != "default":
            grouped.setdefault(origin, []).append(name)
    return "; ".join(f"{', '.join(names)}: {origin}" for origin, names in grouped.items())


def layer_label(plan, source=None, bias_source=None, layout=None):
    """``w.npz:weight (1, 2, 3, 3, 3) torch layout (assumed), bias w.npz:bias (2,)``, or the built-in kernel.

    ``layout`` is a :class:`~convt3d_cli.io.records.Weights` (or ``WeightsInfo``); a weight
    stored in another layout shows its stored shape too.
    """
    if plan.kernel:
        return f"built-in {plan.kernel}, depthwise, weight {shape_str(plan.weight_shape)}"
    label = shape_str(plan.weight_shape) if source is None else f"{source} {shape_str(plan.weight_shape)}"
    if layout is not None:
        label += f" {layout.layout} layout ({layout.layout_source})"
        if layout.stored_shape is not None and tuple(layout.stored_shape) != tuple(plan.weight_shape):
            label += f", stored as {shape_str(layout.stored_shape)}"
    if plan.bias_shape is not None:
        label += f", bias {bias_source} {shape_str(plan.bias_shape)}"
    return label


def layer_line(params):
    """``kernel_size=3 stride=2 ...`` on one line."""
    t = geometry.format_triple
    return (f"kernel_size={t(params.kernel_size)} stride={t(params.stride)} padding={params.padding_text()} "
            f"output_padding={t(params.output_padding)} dilation={t(params.dilation)} groups={params.groups}")


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
        lines.append(f"use: --padding {geometry.format_triple([c[0] for c in first])} "
                     f"--output-padding {geometry.format_triple([c[1] for c in first])}")
    return lines
