"""Reusable click options and callbacks for the ``convt3d`` commands.

Modelled on rasterio's ``rio/options.py``: every option is defined once here
and shared by the commands, so ``run`` and ``shape`` cannot drift apart.

The layer options (``--stride`` ...) default to ``None`` on purpose: a weights
file may carry its own ``stride``/``padding``/... and those apply unless the
command line gives a value (see :func:`merge_layer_options`). This module only
imports click, so it keeps ``convt3d --help`` instant.
"""

from __future__ import annotations

import re
from fractions import Fraction

import click

# The values a layer takes when neither the command line nor a weights file sets them.
LAYER_DEFAULTS = {"stride": 1, "padding": 0, "output_padding": 0, "dilation": 1, "groups": 1}

_SIZE_UNITS = {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_ints(value, count=None):
    """Parse ``"2"`` or ``"2,2,1"`` into a tuple of ints.

    Parameters
    ----------
    value : str
        Comma-separated integers (spaces around the commas are allowed).
    count : int or sequence of int, optional
        Allowed numbers of values.

    Returns
    -------
    tuple of int

    Raises
    ------
    ValueError
        With a message fit for :class:`click.BadParameter`.
    """
    parts = str(value).split(",")
    try:
        numbers = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"{value!r} is not a comma-separated list of integers") from None
    if count is not None:
        allowed = (count,) if isinstance(count, int) else tuple(count)
        if len(numbers) not in allowed:
            wanted = " or ".join(str(n) for n in allowed)
            raise ValueError(f"expected {wanted} integers, got {len(numbers)} in {value!r}")
    return numbers


def triple_handler(ctx, param, value):
    """Click callback: ``2`` -> ``(2, 2, 2)``, ``2,2,1`` -> ``(2, 2, 1)``; ``None`` stays ``None``.

    Range rules (stride >= 1, ...) are left to :meth:`geometry.LayerParams.create`
    so that the library and the command line give the same messages.

    Raises
    ------
    click.BadParameter
        If the text is not one or three integers.
    """
    if value is None or isinstance(value, tuple):
        return value
    try:
        numbers = parse_ints(value, count=(1, 3))
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return numbers * 3 if len(numbers) == 1 else numbers


def padding_handler(ctx, param, value):
    """Click callback for ``--padding``: 1 or 3 integers as :func:`triple_handler`, or 6
    (begin D,H,W then end D,H,W, ONNX's ``pads`` order) when the two ends differ."""
    if value is None or isinstance(value, tuple):
        return value
    try:
        numbers = parse_ints(value, count=(1, 3, 6))
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None
    return numbers * 3 if len(numbers) == 1 else numbers


def shape_handler(ctx, param, value):
    """Click callback for ``--input-shape``: 4 (C,D,H,W) or 5 (N,C,D,H,W) integers."""
    if value is None:
        return None
    try:
        return parse_ints(value, count=(4, 5))
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def parse_size(text):
    """Parse a memory size such as ``256M``, ``2G``, ``1.5GiB`` or ``1000000`` into bytes.

    Units are binary (``K`` = 1024 bytes); a trailing ``B`` or ``iB`` is accepted.

    Raises
    ------
    ValueError
        If the text is not a positive size.
    """
    match = _SIZE_RE.match(str(text))
    if not match:
        raise ValueError(f"{text!r} is not a size like 512M, 2G or 1000000")
    # Exact arithmetic: a size of 400 digits is refused by the memory checks, not by a float.
    size = int(Fraction(match.group(1)) * _SIZE_UNITS[match.group(2).upper()])
    if size <= 0:
        raise ValueError(f"{text!r} must be larger than 0")
    return size


def size_handler(ctx, param, value):
    """Click callback wrapping :func:`parse_size`; ``None`` stays ``None``."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as err:
        raise click.BadParameter(str(err), ctx=ctx, param=param) from None


def merge_layer_options(cli_values, file_values=None):
    """Combine layer options: command line over weights file over defaults.

    Parameters
    ----------
    cli_values : dict
        ``stride``, ``padding``, ... as parsed by click (``None`` = not given).
    file_values : dict, optional
        Options stored in the weights file (``Weights.options``).

    Returns
    -------
    dict
        Every key of :data:`LAYER_DEFAULTS` with a value.
    """
    merged = dict(LAYER_DEFAULTS)
    merged.update({k: v for k, v in (file_values or {}).items() if k in LAYER_DEFAULTS and v is not None})
    merged.update({k: v for k, v in cli_values.items() if k in LAYER_DEFAULTS and v is not None})
    return merged


_TRIPLE_HELP = "Integer or three integers D,H,W."

stride_opt = click.option(
    "--stride", "-s", callback=triple_handler, default=None, metavar="S",
    help=f"Stride (upsampling factor). {_TRIPLE_HELP} [default: weights file, else 1]")
padding_opt = click.option(
    "--padding", "-p", callback=padding_handler, default=None, metavar="P",
    help=f"Implicit padding removed from each side of the output. {_TRIPLE_HELP} Six integers "
         "bD,bH,bW,eD,eH,eW crop the start and the end differently. [default: weights file, else 0]")
output_padding_opt = click.option(
    "--output-padding", callback=triple_handler, default=None, metavar="OP",
    help=f"Extra size added to one side of the output. {_TRIPLE_HELP} [default: weights file, else 0]")
dilation_opt = click.option(
    "--dilation", callback=triple_handler, default=None, metavar="D",
    help=f"Spacing between kernel taps. {_TRIPLE_HELP} [default: weights file, else 1]")
groups_opt = click.option(
    "--groups", type=click.IntRange(min=1), default=None, metavar="G",
    help="Number of channel groups. [default: weights file, else 1]")
dtype_opt = click.option(
    "--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True,
    help="Compute precision (and the output's type unless --output-dtype says otherwise).")
output_dtype_opt = click.option(
    "--output-dtype", type=click.Choice(["same", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32",
                                         "uint32", "int64", "uint64"]), default=None,
    help="Type the output stores: same as the input, float32/float64, or an integer type (rounded half to "
         "even, clipped; the report counts clipped voxels). Computation stays in --dtype. "
         "[default: same for --kernel nearest, else --dtype]")
fourth_axis_opt = click.option(
    "--fourth-axis", type=click.Choice(["auto", "volumes", "channels"]), default="auto", show_default=True,
    help="4-D NIfTI or MGH input: upsample each volume of the 4th axis (time, echoes) on its own, or feed it to the "
         "layer as channels. auto: channels when the layer takes that many input channels (or is a built-in "
         "kernel), volumes when it takes one.")
no_sidecar_opt = click.option(
    "--no-sidecar", "no_sidecar", is_flag=True, default=False,
    help="Do not write OUT.json when a BIDS sidecar IN.json sits beside a NIfTI input.")
threads_opt = click.option(
    "--threads", type=click.IntRange(min=1), default=None, metavar="N",
    help="Numba and BLAS threads. [default: all allowed cores; with batch --jobs, cores/jobs each]")
def voxel_size_handler(ctx, param, value):
    """Click callback for ``--voxel-size``: 1 or 3 positive numbers (mm)."""
    if value is None:
        return None
    try:
        numbers = tuple(float(v) for v in str(value).split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not 1 or 3 numbers", ctx=ctx, param=param) from None
    if len(numbers) not in (1, 3) or not all(v > 0 and v != float("inf") for v in numbers):
        raise click.BadParameter(f"expected 1 or 3 positive numbers, got {value!r}", ctx=ctx, param=param)
    return numbers * 3 if len(numbers) == 1 else numbers


like_opt = click.option(
    "--like", default=None, metavar="REF",
    help="Put the output exactly on REF's grid (shape and affine): the padding (and, with --kernel, the "
         "stride) is chosen for it, or the run stops saying why it cannot be reached.")
voxel_size_opt = click.option(
    "--voxel-size", callback=voxel_size_handler, default=None, metavar="V",
    help="With --kernel: the output voxel size in mm (V or Vx,Vy,Vz); the stride is the input's voxel size "
         "over V, which must be an integer.")
json_opt = click.option(
    "--json", "as_json", is_flag=True, default=False,
    help="Print one JSON object with the report on stdout.")
quiet_opt = click.option(
    "--quiet", "-q", is_flag=True, default=False,
    help="Print nothing on stderr except errors (no report, no progress bar).")
max_memory_opt = click.option(
    "--max-memory", callback=size_handler, default=None, metavar="SIZE",
    help="Bound the working set to SIZE, e.g. 256M, 2G: larger runs are computed and written in "
         "slabs (same result). [default: half of the memory available]")
compress_level_opt = click.option(
    "--compress-level", type=click.IntRange(0, 3), default=None, metavar="0-3",
    help=".nii.gz and .mgz outputs: gzip effort, 0 fastest to 3 smallest (ISA-L igzip). [default: 1]")
overwrite_opt = click.option(
    "--overwrite", is_flag=True, default=False, help="Replace an existing output file.")
weights_opt = click.option(
    "--weights", "-w", default=None, metavar="PATH[:LAYER]",
    help="Trained layer: a PyTorch .pt/.pth/.ckpt, .safetensors, ONNX or Keras file (LAYER: module path, "
         "tensor, node or layer name), or a weight array in .npz/.npy/.h5 (Cin, Cout/groups, kD, kH, kW).")
bias_opt = click.option(
    "--bias", "-b", default=None, metavar="PATH[:KEY]",
    help="Bias (Cout,) [default: a 'bias' array next to the weights, if any].")

no_bias_opt = click.option("--no-bias", is_flag=True, default=False,
                           help="Ignore any bias stored with the weights.")
weight_layout_opt = click.option(
    "--weight-layout", type=click.Choice(["torch", "megengine", "keras", "flax"]), default=None,
    help="Axis order of a plain weight array: torch (Cin, Cout/groups, kD, kH, kW), megengine, "
         "keras (kD, kH, kW, Cout, Cin) or flax (kD, kH, kW, Cin, Cout). Files that say their layout "
         "(Keras, ONNX, PyTorch) need none. [default: the file's, else torch]")



class OutputFormat(click.Choice):
    """``--format``: the output formats of the suffix registry (:mod:`convt3d_cli.io.registry`).

    The list is read when click first needs it (help or parsing), not when the
    option is declared, so that importing the command line loads no file layer.
    """

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from .io.registry import output_choices

        return tuple(output_choices())

    @choices.setter
    def choices(self, value):
        """Ignored: the registry is the only list of formats."""


kernel_opt = click.option(
    "--kernel", "-k", "kernel_name", type=click.Choice(["nearest", "linear"]), default=None,
    help="Built-in depthwise upsampling kernel instead of --weights (needs --stride, --like or --voxel-size).")


def _positive_triple(ctx, param, value):
    value = triple_handler(ctx, param, value)
    if value is not None and min(value) < 1:
        raise click.BadParameter("must be positive integers", ctx=ctx, param=param)
    return value


class _Compressors(click.Choice):
    """``--compressor`` choices from the registry, read when click needs them."""

    def __init__(self):
        super().__init__(())

    @property
    def choices(self):
        from .io.registry import ZARR_COMPRESSORS

        return ZARR_COMPRESSORS

    @choices.setter
    def choices(self, value):
        """Ignored: the registry holds the list."""


chunks_opt = click.option(
    "--chunks", callback=_positive_triple, default=None, metavar="C",
    help="Zarr outputs: chunk shape along z,y,x (C or Cz,Cy,Cx). [default: the input's chunks, else 128]")
shards_opt = click.option(
    "--shards", callback=_positive_triple, default=None, metavar="S",
    help="Zarr v3 outputs: store chunks in shards of this shape (multiples of --chunks). [default: none]")
compressor_opt = click.option(
    "--compressor", type=_Compressors(), default=None,
    help="Zarr outputs: the chunks' codec. [default: blosc-zstd, level 1]")


def store_options(func):
    """Decorator adding the Zarr output options ``--chunks --shards --compressor``."""
    for option in reversed((chunks_opt, shards_opt, compressor_opt)):
        func = option(func)
    return func


def store_dict(chunks, shards, compressor):
    """The ``store_options`` of :func:`convt3d_cli.pipeline.run_file` (only what was given)."""
    return {name: value for name, value in (("chunks", chunks), ("shards", shards), ("compressor", compressor))
            if value is not None}


def layer_options(func):
    """Decorator adding ``--stride --padding --output-padding --dilation --groups``."""
    for option in reversed((stride_opt, padding_opt, output_padding_opt, dilation_opt, groups_opt)):
        func = option(func)
    return func


def job_options(func):
    """Decorator adding everything that shapes one file's job, shared by ``run`` and ``batch``:
    the layer source (``--weights --bias --no-bias --kernel``), the layer options, ``--dtype``,
    ``--max-memory``, ``--compress-level`` and ``--overwrite``."""
    for option in reversed((weights_opt, bias_opt, no_bias_opt, weight_layout_opt, kernel_opt, layer_options, dtype_opt,
                            output_dtype_opt, fourth_axis_opt, like_opt, voxel_size_opt, no_sidecar_opt,
                            threads_opt,
                            max_memory_opt, compress_level_opt, overwrite_opt)):
        func = option(func)
    return func
