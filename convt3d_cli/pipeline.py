"""One file in, one file out: the work behind ``convt3d run`` (and every file of a batch).

The order matters for users and is kept here in one place: the formula is
reported first, then every check that can fail (layer, channels, output path,
memory) runs before any voxel is read or any file is created; only then the
input is read, computed and written atomically.
"""

from __future__ import annotations

import os
import time

import numpy as np

from . import geometry, io, layerplan, notices, report


def _silent(line=""):
    return None


def run_file(input, output, *, weights=None, bias=None, no_bias=False, kernel=None, layer_options=None,
             dtype="float32", max_memory=None, overwrite=False, echo=None, progress=None,
             compress_level=None, weight_layout=None):
    """Upsample one volume file into another.

    Parameters
    ----------
    input, output : str
        ``PATH[:KEY]`` specs; the output format follows its suffix.
    weights, bias : str, optional
        Weight and bias specs (``weights`` or ``kernel`` is required).
    no_bias : bool
        Ignore a bias stored beside the weights.
    kernel : {"nearest", "linear"}, optional
        Built-in kernel instead of weights.
    layer_options : dict, optional
        ``stride``, ``padding``, ``output_padding``, ``dilation``, ``groups``; ``None``
        values fall back to the weights file's stored options, then to the defaults.
    dtype : {"float32", "float64"}
    max_memory : int, optional
        Bytes the working set may take (default: half of the available memory). When the
        whole volume does not fit, the output is computed and written in slabs
        (:mod:`convt3d_cli.slabs`); the result is byte for byte the same.
    overwrite : bool
        Replace an existing output (never an input).
    echo : callable(str), optional
        Receives the human-readable report lines (formula, shapes, timing).
    progress : callable(done, total), optional
        Progress over output planes; advances within and after every slab.
    compress_level : int, optional
        ``.nii.gz`` outputs: 0 (fastest) to 3 (smallest); default 1.
    weight_layout : {"torch", "megengine", "keras", "flax"}, optional
        Layout of a plain weight array (:data:`convt3d_cli.io.layouts.LAYOUTS`).

    Returns
    -------
    dict
        The JSON report (``docs/behaviour.md``, *Command line, reports and exit codes*):
        shapes, layer options, formula, output, seconds, ``warnings`` (what was
        repaired or odd, also echoed as ``Warning:`` lines), ...

    Raises
    ------
    Convt3dError
        Any refusal; nothing has been written then.
    """
    echo = echo or _silent
    with notices.collected(echo) as warned:
        out = _run(input, output, weights, bias, no_bias, kernel, dict(layer_options or {}), dtype,
                   max_memory, overwrite, echo, progress, compress_level, weight_layout)
    out["warnings"] = list(warned)
    return out


def _run(input, output, weights, bias, no_bias, kernel, layer_options, dtype, max_memory, overwrite, echo,
         progress, compress_level, weight_layout):
    started = time.perf_counter()

    info = io.probe_volume(input)
    loaded = io.read_weights(weights, bias, no_bias=no_bias, layout=weight_layout) if weights else None
    plan = layerplan.plan_layer(
        info.engine_shape, layer_options, kernel=kernel,
        weight_shape=None if loaded is None else loaded.weight.shape,
        bias_shape=None if loaded is None or loaded.bias is None else loaded.bias.shape,
        file_options=None if loaded is None else loaded.options,
        file_source="weights file" if loaded is None else loaded.source)
    # The formula comes first so that it is visible even if a later check fails.
    layer_label = report.layer_label(plan) if loaded is None else \
        report.layer_label(plan, loaded.source, loaded.bias_source, loaded)
    report.emit_plan(echo, plan, report.input_label(input, info), layer_label)
    plan.validate()
    compute = np.dtype(np.float64 if dtype == "float64" else np.float32)
    io.check_output(output, plan.output_shape, inputs=[input, weights, bias], overwrite=overwrite,
                    dtype=compute, why=geometry.growth_cause(plan.input_shape[-3:], plan.params))
    from . import slabs
    from .io.safety import human_bytes

    transposed = io.transposed_slabs(output)
    slabs.check_feasible(plan, compute, transposed, max_memory)
    p = plan.params
    layer, pad = slabs.oriented_layer(
        info.engine_shape, None if loaded is None else loaded.weight,
        None if loaded is None else loaded.bias, p, compute, transposed, kernel=kernel)
    slab_plan = slabs.plan_slabs(layer, pad, max_memory, resident=io.resident_bytes(info),
                                 transposed=transposed)
    echo(f"output:  {report.shape_str(plan.output_shape)} {dtype} -> {output}")
    if slab_plan.count > 1:
        echo(f"stream:  {slab_plan.count} slabs along {slab_plan.axis}, about {human_bytes(slab_plan.needed)} "
             f"each (budget {human_bytes(slab_plan.budget)})")

    folder = os.path.dirname(os.path.abspath(io.split_spec(output)[0]))
    from .io._atomic import remove_stale_temporaries

    remove_stale_temporaries(io.split_spec(output)[0])  # those of killed runs; never a live writer's
    source = io.open_source(info, transposed, compute, pad, folder)
    try:
        with io.open_writer(output, plan.output_shape, like=info, params=p, formula=plan.formula,
                            overwrite=overwrite, source=input, dtype=compute,
                            compress_level=compress_level) as writer:
            slabs.run_slabs(layer, source, writer, slab_plan, progress)
            file_shape = writer.file_shape
    finally:
        source.close()
    written = io.split_spec(output)[0]
    seconds = time.perf_counter() - started
    echo(f"wrote {written} in {seconds:.2f} s")

    out = plan.as_dict()
    out.update({
        "input": input, "output": output, "dtype": dtype,
        "weights": None if loaded is None else loaded.source,
        "bias": None if loaded is None else loaded.bias_source,
        "weight_layout": None if loaded is None else loaded.layout,
        "weight_layout_from": None if loaded is None else loaded.layout_source,
        "input_file_shape": list(info.stored_shape),
        "output_file_shape": list(file_shape),
        "output_affine": geometry.output_affine(info.affine, plan.params).tolist(),
        "seconds": round(seconds, 6),
        "slabs": slab_plan.count,
        "peak_memory_bytes": slabs.peak_memory_bytes(),
    })
    return out
