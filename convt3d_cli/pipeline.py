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

from . import errors, geometry, io, layerplan, notices, report
from . import sidecar as sidecars
from . import threads as compute_threads
from .io.dtypes import output_dtype as resolve_output_dtype


def _silent(line=""):
    return None


def run_file(input, output, *, weights=None, bias=None, no_bias=False, kernel=None, layer_options=None,
             dtype="float32", max_memory=None, overwrite=False, echo=None, progress=None,
             compress_level=None, weight_layout=None, output_dtype=None, fourth_axis="auto", sidecar=True,
             threads=None, like=None, voxel_size=None, store_options=None, scheduler=None, resume=False):
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
    output_dtype : str, optional
        The type the output stores: ``"float32"``, ``"float64"``, a NumPy integer name
        (rounded half to even, clipped; the report counts clipped voxels) or ``"same"``
        as the input. Default: ``"same"`` for ``kernel="nearest"`` (labels stay labels),
        else ``dtype``.
    fourth_axis : {"auto", "volumes", "channels"}
        How the 4th axis of a 4-D NIfTI image is read (:func:`convt3d_cli.io.with_fourth_axis`).
    sidecar : bool
        Write ``OUT.json`` when a BIDS sidecar ``IN.json`` sits beside a NIfTI input
        (:mod:`convt3d_cli.sidecar`).
    threads : int, optional
        Numba and BLAS threads for this run (default: all allowed cores).
    like : str, optional
        A reference volume: the crops (and, for a built-in kernel, the stride) are chosen
        so that the output has exactly its shape and affine (within 1e-4 mm), or the run
        is refused saying why.
    voxel_size : float or 3 floats, optional
        For a built-in kernel: the stride is the input's voxel size over this.
    store_options : dict, optional
        Zarr outputs: ``chunks`` and ``shards`` (3 ints each, D/z, H/y, W/x) and
        ``compressor`` (:data:`convt3d_cli.io.omezarr.COMPRESSORS`).
    scheduler : str, optional
        Zarr outputs: compute the blocks on the ``dask.distributed`` scheduler at this
        address (:mod:`convt3d_cli._distributed`); workers read and write the stores.
    resume : bool
        Zarr outputs: continue an interrupted run from the blocks it completed.

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
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise errors.ParameterError("threads", f"threads must be a positive integer, got {threads!r}")
    from .engine._layer import one_layer_process

    # One file, one layer: the rules weigh loading Numba against this layer alone (a batch
    # worker's many_layers() keeps its own line).
    with notices.collected(echo) as warned, compute_threads.limited(threads), one_layer_process():
        out = _run(input, output, weights, bias, no_bias, kernel, dict(layer_options or {}), dtype,
                   max_memory, overwrite, echo, progress, compress_level, weight_layout, output_dtype,
                   fourth_axis, sidecar, like, voxel_size, dict(store_options or {}), scheduler, resume, threads)
    out["warnings"] = list(warned)
    return out


def _check_sidecar_target(path, inputs, overwrite):
    """Refuse, before any work, a sidecar that would replace an input or an existing file."""
    from .io._atomic import check_target, same_file

    for other in inputs:
        if other and same_file(path, io.split_spec(other)[0]):
            raise errors.OutputError(f"the output's sidecar {path} would replace the input {other}; "
                                        f"choose another output name or use --no-sidecar")
    try:
        check_target(path, overwrite)
    except errors.OutputError as exc:
        raise errors.OutputError(f"{exc} (the output's BIDS sidecar; --no-sidecar skips it)") from None


def _check_reached(plan, info, reference, like):
    """The planned output is the reference grid (shape and affine within the tolerance), or an error."""
    got = geometry.output_affine(info.affine, plan.params)
    off = float(np.abs(got - np.asarray(reference.affine, dtype=np.float64)).max())
    if tuple(plan.output_shape[2:]) != tuple(reference.engine_shape[2:]) or off > geometry.GRID_TOLERANCE:
        raise errors.ShapeError(f"the output grid {plan.output_shape[2:]} misses {like}'s "
                                f"{tuple(reference.engine_shape[2:])} (affine off by {off:.3g} mm); "
                                f"the command line's layer options conflict with --like")


def in_channels(weight_shape):
    """Input channels of a weight ``(Cin, ...)`` or grouped ``(groups, Cin/groups, ...)``."""
    return weight_shape[0] * weight_shape[1] if len(weight_shape) == 6 else weight_shape[0]


def _run(input, output, weights, bias, no_bias, kernel, layer_options, dtype, max_memory, overwrite, echo,
         progress, compress_level, weight_layout, output_dtype, fourth_axis, sidecar, like, voxel_size,
         store_options, scheduler, resume, threads):
    started = time.perf_counter()

    info = io.probe_volume(input)
    loaded = io.read_weights(weights, bias, no_bias=no_bias, layout=weight_layout) if weights else None
    info = io.with_fourth_axis(info, fourth_axis, None if loaded is None else in_channels(loaded.weight.shape))
    grid_sources, reference = {}, None
    if like is not None or voxel_size is not None:
        if like is not None:
            reference = io.probe_volume(like)
        layer_options, grid_sources = layerplan.grid_options(
            layer_options, in_affine=info.affine, in_spatial=info.engine_shape[2:], kernel=kernel,
            weight_shape=None if loaded is None else loaded.weight.shape,
            file_options=None if loaded is None else loaded.options,
            like=None if reference is None else (reference.affine, reference.engine_shape[2:]),
            voxel_size=voxel_size)
    plan = layerplan.plan_layer(
        info.engine_shape, layer_options, kernel=kernel,
        weight_shape=None if loaded is None else loaded.weight.shape,
        bias_shape=None if loaded is None or loaded.bias is None else loaded.bias.shape,
        file_options=None if loaded is None else loaded.options,
        file_source="weights file" if loaded is None else loaded.source, cli_sources=grid_sources)
    # The formula comes first so that it is visible even if a later check fails.
    layer_label = report.layer_label(plan) if loaded is None else \
        report.layer_label(plan, loaded.source, loaded.bias_source, loaded)
    report.emit_plan(echo, plan, report.input_label(input, info), layer_label)
    plan.validate()
    if reference is not None:
        _check_reached(plan, info, reference, like)
        echo(f"like:    {like} {report.shape_str(reference.engine_shape[2:])}: the output is on its grid")
    compute = np.dtype(np.float64 if dtype == "float64" else np.float32)
    if output_dtype is None and kernel == "nearest":
        output_dtype = "same"      # a label map stays a label map, exactly
    stored = resolve_output_dtype(output_dtype, info.read_dtype, compute)
    read = [input, weights, bias, like] + ([] if loaded is None else list(loaded.files))
    io.check_output(output, plan.output_shape, inputs=read, overwrite=overwrite,
                    dtype=compute, why=geometry.growth_cause(plan.input_shape[-3:], plan.params),
                    output_dtype=stored)
    sidecar_in = sidecars.input_sidecar(input) if sidecar else None
    if sidecar_in is not None:
        sidecar_fields = sidecars.read_sidecar(sidecar_in)
        sidecar_out = sidecars.output_sidecar(output)
        _check_sidecar_target(sidecar_out, read + [sidecar_in], overwrite)
    from . import slabs
    from .io.safety import human_bytes

    blockwise = io.blockwise(output)
    if (scheduler or resume) and not blockwise:
        raise errors.ParameterError("scheduler" if scheduler else "resume",
                                    f"--{'scheduler' if scheduler else 'resume'} is for Zarr outputs (.zarr, "
                                    f".ome.zarr); use 'convt3d batch --scheduler' to spread files over a cluster")
    if store_options and not blockwise:
        raise errors.ParameterError("chunks", "--chunks, --shards and --compressor are for Zarr outputs")
    transposed = io.transposed_slabs(output)
    slabs.check_feasible(plan, compute, transposed, max_memory)
    p = plan.params
    layer, pad = slabs.oriented_layer(
        info.engine_shape, None if loaded is None else loaded.weight,
        None if loaded is None else loaded.bias, p, compute, transposed, kernel=kernel, tune=False)
    if not blockwise:
        # What the shapes alone need, before measuring the paths compiles and runs kernels.
        slabs.plan_slabs(layer, pad, max_memory, resident=io.resident_bytes(info), transposed=transposed, scratch=0)
    layer.tune()
    if info.fourth_axis == "volumes" and plan.output_shape[0] > 1:
        echo(f"volumes: {plan.output_shape[0]} along the 4th axis, each upsampled on its own")
    shown = dtype if stored == compute else f"{stored.name} (computed in {dtype})"
    echo(f"output:  {report.shape_str(plan.output_shape)} {shown} -> {output}")
    folder = os.path.dirname(os.path.abspath(io.split_spec(output)[0]))
    if blockwise:
        from .blockrun import run_blockwise

        fingerprint = {"input": [input, os.path.abspath(io.split_spec(input)[0]), io.input_stamps(input, info.key)], "weights": None if loaded is None else loaded.source,
                       "layer": _layer_digest(layer), "kernel": kernel, "params": p.as_dict(),
                       "output_dtype": stored.name, "dtype": dtype}
        done = run_blockwise(
            layer, pad, info, input, output, plan, stored, compute, overwrite=overwrite, max_memory=max_memory,
            store_options=store_options, scheduler=scheduler, resume=resume, fingerprint=fingerprint,
            echo=echo, progress=progress, fourth_axis=fourth_axis, folder=folder, kernel=kernel,
            threads=threads)
        file_shape, clipped, stored, slab_count = done["file_shape"], done["clipped"], done["dtype"], done["blocks"]
        extra = {key: done[key] for key in ("blocks", "block_shape", "chunks", "resumed_blocks", "scheduler")}
    else:
        slab_plan = slabs.plan_slabs(layer, pad, max_memory, resident=io.resident_bytes(info),
                                     transposed=transposed)
        if slab_plan.count > 1:
            echo(f"stream:  {slab_plan.count} slabs along {slab_plan.axis}, about {human_bytes(slab_plan.needed)} "
                 f"each (budget {human_bytes(slab_plan.budget)})")

        from .io._atomic import remove_stale_temporaries

        remove_stale_temporaries(io.split_spec(output)[0])  # those of killed runs; never a live writer's
        source = io.open_source(info, transposed, compute, pad, folder)
        try:
            with io.open_writer(output, plan.output_shape, like=info, params=p, formula=plan.formula,
                                overwrite=overwrite, source=input, dtype=compute,
                                compress_level=compress_level, output_dtype=stored) as writer:
                slabs.run_slabs(layer, source, writer, slab_plan, progress)
                file_shape, clipped, stored = writer.file_shape, writer.clipped, writer.dtype
        finally:
            source.close()
        slab_count, extra = slab_plan.count, {}
    written = io.split_spec(output)[0]
    if sidecar_in is not None:
        try:
            sidecars.write_sidecar(sidecar_out, sidecars.build_sidecar(
                sidecar_fields, input_spec=input, output_spec=output, params=p,
                layer=f"built-in {kernel}" if kernel else loaded.source,
                slice_axis_resampled=sidecars.slice_axis_resampled(info.header, p)), overwrite)
        except BaseException:
            # The run fails (disk full, file-size limit): its volume is not left behind without its sidecar.
            try:
                os.remove(written)
            except OSError:
                pass
            raise
        echo(f"sidecar: {sidecar_out}")
    if clipped:
        limits = np.iinfo(stored)
        echo(f"clipped: {clipped} voxels outside the {stored.name} range [{limits.min}, {limits.max}] "
             f"(or NaN) were set to the nearest limit (NaN to 0)")
    seconds = time.perf_counter() - started
    echo(f"wrote {written} in {seconds:.2f} s")

    out = plan.as_dict()
    out.update({
        "input": input, "output": output, "dtype": dtype,
        "weights": None if loaded is None else loaded.source,
        "bias": None if loaded is None else loaded.bias_source,
        "output_dtype": stored.name,
        "sidecar": sidecar_out if sidecar_in is not None else None,
        "clipped_voxels": clipped,
        "weight_layout": None if loaded is None else loaded.layout,
        "weight_layout_from": None if loaded is None else loaded.layout_source,
        "input_file_shape": list(info.stored_shape),
        "output_file_shape": list(file_shape),
        "output_affine": geometry.output_affine(info.affine, plan.params).tolist(),
        "seconds": round(seconds, 6),
        "slabs": slab_count,
        "peak_memory_bytes": slabs.peak_memory_bytes(),
    })
    out.update(extra)
    return out


def _layer_digest(layer):
    """A digest of a layer's weights and bias (``--resume`` continues only the same layer)."""
    import hashlib

    digest = hashlib.sha256(np.ascontiguousarray(layer.weight).tobytes())
    digest.update(np.ascontiguousarray(layer.bias).tobytes())
    return digest.hexdigest()[:20]
