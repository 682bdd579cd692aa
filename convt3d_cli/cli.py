"""The ``convt3d`` command line: ``run``, ``shape``, ``info`` and ``batch``.

The commands are thin: they parse options, call the library and map its
errors. Every :class:`~convt3d_cli.errors.Convt3dError` becomes one
``Error: ...`` line with the error's exit code (2 for bad parameters, 1 for
data and file problems); ``--debug`` shows the traceback instead.

Start-up matters (``convt3d --help`` should feel instant), so NumPy-heavy or
slow modules (the engine and Numba, nibabel, h5py, the file layer) are
imported inside the command functions, never at module level.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

import click

from . import __version__
from . import options as opt
from .errors import Convt3dError

# Show a progress bar only for runs that last longer than this (seconds).
PROGRESS_DELAY = 0.5


class _CliError(click.ClickException):
    """A one-line ``Error: ...`` with a chosen exit code."""

    def __init__(self, message, exit_code=1):
        # One line, whatever the library wrote: scripts grep for ``Error:``.
        super().__init__(" ".join(str(message).split()))
        self.exit_code = exit_code


def _os_message(err):
    """``x.nii: Permission denied`` rather than ``[Errno 13] Permission denied: 'x.nii'``."""
    reason = err.strerror or str(err) or type(err).__name__
    if err.filename:
        return f"{err.filename}: {reason}"
    return reason


class _Group(click.Group):
    """Click group that turns library errors into one-line messages."""

    def invoke(self, ctx):
        debug = ctx.params.get("debug", False)
        try:
            return super().invoke(ctx)
        except Convt3dError as err:
            if debug:
                raise
            raise _CliError(err, err.exit_code) from None
        except MemoryError:
            if debug:
                raise
            raise _CliError("out of memory; use a smaller input (--max-memory checks the size "
                            "before computing)") from None
        except BrokenPipeError:
            # The reader went away (`convt3d info x.nii | head`): stop quietly, like other
            # Unix tools; point stdout at /dev/null so Python's exit-time flush stays silent.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except OSError as err:
            if debug:
                raise
            raise _CliError(_os_message(err)) from None


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="convt3d")
@click.option("--debug", is_flag=True, default=False, help="Show tracebacks for errors.")
def cli(debug):
    """Upsample 3-D volumes (NIfTI, HDF5, npz, npy) with a transposed convolution.

    Files are addressed as PATH or PATH:KEY (an HDF5 dataset or npz array),
    e.g. vol.h5:/scan/data or model.npz:decoder.weight.
    """


def _echo_err(quiet):
    """A function printing report lines on stderr, or nothing with ``-q``."""
    if quiet:
        return lambda line="": None
    return lambda line="": click.echo(line, err=True)


def _layer_cli(stride, padding, output_padding, dilation, groups):
    return {"stride": stride, "padding": padding, "output_padding": output_padding,
            "dilation": dilation, "groups": groups}


def _check_layer_source(weights, kernel_name, layer_cli, bias=None, no_bias=False, numbers=None,
                        weight_layout=None, like=None, voxel_size=None):
    """Usage rules shared by ``run`` and ``shape``: exactly one layer source, matching options.

    ``numbers`` is ``None`` where ``--out-channels/--kernel-size`` do not exist
    (``run``), else whether they were given.
    """
    sources = [name for name, given in (("--weights", weights), ("--kernel", kernel_name),
                                        ("--out-channels/--kernel-size", numbers)) if given]
    if len(sources) > 1:
        raise click.UsageError(f"{sources[0]} and {sources[1]} cannot be used together")
    if not sources:
        wanted = "--weights or --kernel" if numbers is None else \
            "--weights, --kernel or --out-channels with --kernel-size"
        raise click.UsageError(f"give the layer with {wanted}")
    if bias is not None and no_bias:
        raise click.UsageError("--bias and --no-bias cannot be used together")
    if (bias is not None or no_bias) and not weights:
        raise click.UsageError("--bias and --no-bias need --weights")
    if weight_layout is not None and not weights:
        raise click.UsageError("--weight-layout needs --weights")
    if like is not None and voxel_size is not None:
        raise click.UsageError("--like and --voxel-size cannot be used together")
    if voxel_size is not None and not kernel_name:
        raise click.UsageError("--voxel-size needs --kernel (a trained layer has its own stride)")
    grid = like is not None or voxel_size is not None
    if grid:
        given = [f"--{name.replace('_', '-')}" for name in ("padding", "output_padding")
                 if layer_cli[name] is not None]
        if kernel_name and layer_cli["stride"] is not None:
            given.insert(0, "--stride")
        if given:
            raise click.UsageError(f"{', '.join(given)} cannot be used with {'--like' if like else '--voxel-size'}, "
                                   f"which chooses {'them' if len(given) > 1 else 'it'}")
    if kernel_name:
        if layer_cli["stride"] is None and not grid:
            raise click.UsageError("--kernel needs --stride (the integer upsampling factor), --like or "
                                   "--voxel-size")
        extra = [f"--{name.replace('_', '-')}" for name, value in layer_cli.items()
                 if name != "stride" and value is not None]
        if extra:
            raise click.UsageError(f"{', '.join(extra)} cannot be used with --kernel "
                                   f"(a built-in kernel derives its layer from --stride)")


class _Progress:
    """Engine ``progress(done, total)`` callback drawing a bar on a terminal.

    The bar appears only when stderr is a terminal and the computation has
    been running for :data:`PROGRESS_DELAY` seconds, so quick runs and logs
    stay clean.
    """

    def __init__(self, enabled):
        self.enabled = enabled and sys.stderr.isatty()
        self.start = time.monotonic()
        self.bar = None
        self.shown = 0
        self.lock = threading.Lock()

    @property
    def callback(self):
        """The callable to hand to the engine, or ``None`` (no overhead) when disabled."""
        return self if self.enabled else None

    def __call__(self, done, total):
        with self.lock:
            if self.bar is None:
                if time.monotonic() - self.start < PROGRESS_DELAY:
                    return
                self.bar = click.progressbar(length=total, label="computing", file=sys.stderr)
                self.bar.__enter__()
            self.bar.update(done - self.shown)
            self.shown = done

    def close(self):
        """Finish the bar line, if one was drawn."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _resumable(output):
    """A hint to ``--resume`` when an interrupted output (a Zarr store) kept its finished blocks."""
    from . import io

    return "; --resume continues from its finished blocks" if io.partial_output(output) else ""


@cli.command()
@click.argument("input", metavar="INPUT")
@click.argument("output", metavar="OUTPUT")
@opt.job_options
@opt.store_options
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Zarr outputs: compute the blocks on a Dask cluster (tcp://host:8786); workers open the "
                   "stores themselves (shared file system). Needs convt3d[distributed].")
@click.option("--resume", is_flag=True, default=False,
              help="Zarr outputs: continue an interrupted run from the blocks it completed.")
@opt.json_opt
@opt.quiet_opt
def run(input, output, weights, bias, no_bias, weight_layout, kernel_name, stride, padding, output_padding,
        dilation, groups, dtype, output_dtype, fourth_axis, like, voxel_size, no_sidecar, threads, max_memory,
        compress_level, overwrite, chunks, shards, compressor, scheduler, resume, as_json, quiet):
    """Upsample INPUT into OUTPUT with a transposed convolution.

    The layer comes from a weights file (--weights: a PyTorch checkpoint,
    safetensors, ONNX or Keras model, or an npz/npy/HDF5 array, with its stored
    stride, padding, ... unless given here) or a built-in kernel (--kernel
    nearest|linear with --stride). The output size formula is printed per axis before
    computing. OUTPUT's suffix picks the format (.nii, .nii.gz, .mgz, .mgh, .h5,
    .npz, .npy, .zarr/.ome.zarr). A Zarr output is computed block by block, here or
    on a Dask cluster (--scheduler); --resume continues an interrupted one.
    """
    from . import pipeline

    layer_cli = _layer_cli(stride, padding, output_padding, dilation, groups)
    _check_layer_source(weights, kernel_name, layer_cli, bias, no_bias, weight_layout=weight_layout, like=like,
                        voxel_size=voxel_size)
    progress = _Progress(not quiet)
    try:
        result = pipeline.run_file(input, output, weights=weights, bias=bias, no_bias=no_bias,
                                   kernel=kernel_name, layer_options=layer_cli, dtype=dtype,
                                   max_memory=max_memory, overwrite=overwrite, echo=_echo_err(quiet),
                                   progress=progress.callback, compress_level=compress_level,
                                   weight_layout=weight_layout, output_dtype=output_dtype,
                                   fourth_axis=fourth_axis, sidecar=not no_sidecar, threads=threads,
                                   like=like, voxel_size=voxel_size,
                                   store_options=opt.store_dict(chunks, shards, compressor),
                                   scheduler=scheduler, resume=resume)
    except KeyboardInterrupt:
        # The temporary output is already gone (atomic_write); say so on one line, exit 130.
        # A Zarr output keeps its completed blocks for --resume.
        progress.close()
        raise _CliError(f"interrupted; {output} was not written{_resumable(output)}", 130) from None
    except SystemExit as stop:
        from .io._atomic import Terminated

        if not isinstance(stop, Terminated):
            raise
        progress.close()
        raise _CliError(f"terminated (SIGTERM); {output} was not written{_resumable(output)}", 143) from None
    finally:
        progress.close()
    if as_json:
        click.echo(json.dumps(result, default=_json_default))


@cli.command()
@click.argument("input", metavar="[INPUT]", required=False)
@click.option("--input-shape", callback=opt.shape_handler, default=None, metavar="N,C,D,H,W",
              help="Input shape (N,C,D,H,W or C,D,H,W) instead of an INPUT file.")
@click.option("--out-channels", type=click.IntRange(min=1), default=None, metavar="C",
              help="Output channels (with --kernel-size, instead of --weights).")
@click.option("--kernel-size", callback=opt.triple_handler, default=None, metavar="K",
              help="Kernel size K or kD,kH,kW (with --out-channels).")
@opt.weights_opt
@opt.weight_layout_opt
@opt.kernel_opt
@opt.layer_options
@opt.fourth_axis_opt
@click.option("--target", callback=opt.triple_handler, default=None, metavar="D,H,W",
              help="Plan: list the padding/output-padding pairs giving this output size.")
@opt.json_opt
def shape(input, input_shape, out_channels, kernel_size, weights, weight_layout, kernel_name, stride, padding,
          output_padding, dilation, groups, fourth_axis, target, as_json):
    """Print the output shape and the size formula without computing anything.

    The input is a file (only its header is read) or --input-shape; the layer
    is --weights, --kernel, or --out-channels with --kernel-size. With --target,
    list the padding and output padding that give that size on each axis.
    """
    from . import layerplan, report

    if (input is None) == (input_shape is None):
        raise click.UsageError("give either INPUT or --input-shape")
    if (out_channels is None) != (kernel_size is None):
        raise click.UsageError("--out-channels and --kernel-size go together")
    layer_cli = _layer_cli(stride, padding, output_padding, dilation, groups)
    _check_layer_source(weights, kernel_name, layer_cli, numbers=out_channels is not None,
                        weight_layout=weight_layout)
    if target is not None and kernel_name:
        raise click.UsageError("--target plans padding for --weights or --kernel-size, not --kernel")

    info = loaded = None
    if input is not None or weights:
        from . import io, notices

        with notices.collected(_echo_err(False)):
            if weights:
                # Shape and stored options only: nothing but headers is read.
                loaded = io.inspect_weights(weights, layout=weight_layout)
            if input is not None:
                from .pipeline import in_channels

                info = io.probe_volume(input)
                wanted = in_channels(loaded.shape) if loaded else (
                    None if kernel_name else (1 if out_channels is not None else None))
                info = io.with_fourth_axis(info, fourth_axis, wanted)
                input_shape = tuple(info.engine_shape)
    if weights:
        weight_shape = loaded.shape
    elif out_channels is not None:
        weight_shape = layerplan.weight_shape_for(input_shape[-4], out_channels, kernel_size, layer_cli)
    else:
        weight_shape = None
    plan = layerplan.plan_layer(input_shape, layer_cli, kernel=kernel_name, weight_shape=weight_shape,
                                file_options=None if loaded is None else loaded.options,
                                file_source=loaded.source if loaded else "weights file")
    echo = (lambda line="": None) if as_json else click.echo
    report.emit_plan(echo, plan, report.input_label(input, info) if input else report.shape_str(input_shape),
                     report.layer_label(plan, loaded and loaded.source, layout=loaded))
    plan.validate()
    echo(f"output:  {report.shape_str(plan.output_shape)}")
    out = plan.as_dict()
    out["input"] = input
    out["weights"] = loaded and loaded.source
    out["weight_layout"] = loaded and loaded.layout
    out["weight_layout_from"] = loaded and loaded.layout_source
    missing = []
    if target is not None:
        axes = layerplan.target_plan(input_shape[-3:], target, plan.params)
        for line in report.target_lines(axes, plan.params):
            echo(line)
        out["target"] = axes
        missing = [entry["axis"] for entry in axes if not entry["choices"]]
    if as_json:
        click.echo(json.dumps(out, default=_json_default))
    if missing:
        raise _CliError(f"no padding/output_padding reaches the target along {', '.join(missing)} "
                        f"with this kernel size, stride and dilation")


@cli.command()
@click.argument("spec", metavar="PATH[:KEY]")
@opt.json_opt
def info(spec, as_json):
    """Describe a volume or weights file: shape, dtype and how convt3d reads it.

    NIfTI: the affine, zooms and codes; MGH: the affine, zooms, TR/flip/TE/TI and
    tags; HDF5: the tree of datasets; npz: the arrays; PyTorch, safetensors, ONNX
    and Keras files: every layer that can be a ConvTranspose3d, with its settings.
    """
    from . import io, notices

    with notices.collected(_echo_err(False)):
        description = io.describe(spec)
    if as_json:
        click.echo(json.dumps(description, default=_json_default))
        return
    for line in _pretty(description):
        click.echo(line)


@cli.command()
@click.argument("inputs", nargs=-1, metavar="[INPUT]...")
@click.option("--out-dir", "-o", required=True, metavar="DIR",
              help="Folder for the outputs; created if missing.")
@click.option("--from-list", "from_list", type=click.Path(dir_okay=False, allow_dash=True), default=None,
              metavar="FILE",
              help="Read more inputs from FILE ('-' for stdin): one per line, blank lines and "
                   "lines starting with # ignored.")
@click.option("--suffix", default="", metavar="TEXT",
              help="Insert TEXT before the extension of every output name (_x2: a.nii.gz -> a_x2.nii.gz).")
@click.option("--format", "out_format", type=opt.OutputFormat(), default=None,
              help="Output format [default: each input's own].")
@opt.job_options
@opt.store_options
@click.option("--skip-existing", is_flag=True, default=False,
              help="Leave files whose output exists (resume an interrupted batch).")
@click.option("--jobs", "-j", type=click.IntRange(min=1), default=None, metavar="N",
              help="Files processed at once in separate processes, each with cores/N threads. [default: 1]")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Run on a Dask cluster (tcp://host:8786) instead of locally; needs "
                   "convt3d[distributed] and a shared file system.")
@click.option("--json", "as_json", is_flag=True, default=False,
              help="Print one JSON object per file on stdout (JSON Lines).")
@opt.quiet_opt
def batch(inputs, out_dir, from_list, suffix, out_format, weights, bias, no_bias, weight_layout, kernel_name,
          stride, padding, output_padding, dilation, groups, dtype, output_dtype, fourth_axis, like, voxel_size,
          no_sidecar, threads, max_memory, compress_level,
          overwrite, chunks, shards, compressor, skip_existing, jobs, scheduler, as_json, quiet):
    """Upsample many files with one layer into --out-dir.

    Every INPUT (and every line of --from-list) is processed as by `convt3d run`,
    with the same layer options; its output is the input's file name inside
    --out-dir (--suffix, --format change it). Outputs that would collide are
    refused before any work. A failing file is reported and the others carry
    on: one line per file and a summary on stderr, exit 1 if any file failed.
    With -q only failures are printed. --scheduler runs the files on a Dask
    cluster (not with --jobs).
    """
    from .batch import (
        batch_exit_code,
        list_lines,
        read_list,
        result_line,
        run_batch,
        summary_line,
    )

    if from_list is None and not inputs:
        raise click.UsageError("give INPUT files or --from-list")
    layer_cli = _layer_cli(stride, padding, output_padding, dilation, groups)
    _check_layer_source(weights, kernel_name, layer_cli, bias, no_bias, weight_layout=weight_layout, like=like,
                        voxel_size=voxel_size)
    if skip_existing and overwrite:
        raise click.UsageError("--skip-existing and --overwrite cannot be used together")
    if scheduler and jobs is not None:
        raise click.UsageError("--jobs is for local processes; with --scheduler the Dask workers "
                               "decide how many files run at once")
    if os.sep in suffix or "/" in suffix:
        raise click.BadParameter("must not contain a path separator", param_hint="'--suffix'")
    listed = []
    if from_list == "-":
        listed = read_list(sys.stdin)
    elif from_list is not None:
        try:
            listed = read_list(list_lines(from_list))
        except Convt3dError as err:
            raise _CliError(err, err.exit_code) from None
    specs = list(inputs) + listed

    debug = click.get_current_context().find_root().params.get("debug", False)
    bar = None
    if not quiet and specs and sys.stderr.isatty():
        bar = click.progressbar(length=len(specs), label="files", file=sys.stderr)
        bar.__enter__()

    finished = []

    def on_result(result):
        finished.append(result)
        if as_json:
            click.echo(json.dumps(result.as_json(), default=_json_default))
        if result.status == "failed" or not quiet:
            if bar is not None:
                click.echo("\r\033[K", nl=False, err=True)   # the line goes where the bar was
            click.echo(result_line(result), err=True)
        if not quiet:
            for warning in (result.report or {}).get("warnings", ()):
                click.echo(f"Warning: {result.input}: {warning}", err=True)
            if debug and result.traceback:
                click.echo(result.traceback, err=True, nl=False)
        if bar is not None:
            bar.update(1)                                      # redraws the bar below the line

    started = time.perf_counter()
    try:
        results = run_batch(specs, out_dir, suffix=suffix, format=out_format, jobs=jobs,
                            skip_existing=skip_existing, overwrite=overwrite, scheduler=scheduler,
                            on_result=on_result, weights=weights, bias=bias, no_bias=no_bias,
                            kernel=kernel_name, layer_options=layer_cli, dtype=dtype, max_memory=max_memory,
                            compress_level=compress_level, weight_layout=weight_layout,
                            output_dtype=output_dtype, fourth_axis=fourth_axis, sidecar=not no_sidecar,
                            threads=threads, like=like, voxel_size=voxel_size,
                            store_options=opt.store_dict(chunks, shards, compressor))
    except KeyboardInterrupt:
        # Finished outputs are complete and kept; the files in progress left nothing behind.
        raise _CliError(f"interrupted after {summary_line(finished, time.perf_counter() - started)}; "
                        f"rerun with --skip-existing to resume", 130) from None
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if not quiet:
        click.echo(summary_line(results, time.perf_counter() - started), err=True)
    code = batch_exit_code(results)
    if code:
        click.get_current_context().exit(code)


@cli.command("compile")
@click.option("--dtype", type=click.Choice(["float32", "float64", "all"]), default="all", show_default=True,
              help="Compute dtype(s) to compile the kernels for.")
@opt.json_opt
def compile_(dtype, as_json):
    """Compile every kernel into the cache now (container images, cluster nodes).

    A fresh install otherwise compiles the kernels a layer needs on its first
    run, once per CPU and Numba version. Prints each compute path with the
    kernels it compiled (nothing when they were cached) and the time taken.
    """
    from .compile import DTYPES, compile_kernels

    dtypes = DTYPES if dtype == "all" else (dtype,)
    result = compile_kernels(dtypes, echo=None if as_json else click.echo)
    if as_json:
        click.echo(json.dumps(result))
        return
    n = sum(len(step["compiled"]) for step in result["steps"])
    click.echo(f"compiled {n} kernel(s) for {', '.join(dtypes)} in {result['seconds']:.2f} s; cache: {result['cache']}")


def _json_default(value):
    """Make NumPy scalars and arrays JSON-serialisable."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def _pretty(value, indent=0):
    """Indented ``key: value`` lines for nested dicts and lists from :func:`io.describe`."""
    pad = "  " * indent
    lines = []
    if isinstance(value, dict):
        for key, item in value.items():
            if _is_leaf(item) or not item:
                lines.append(f"{pad}{key}: {_leaf(item)}")
            elif _is_matrix(item):
                lines.append(f"{pad}{key}:")
                width = max(len(f"{v:.6g}") for row in item for v in row)
                lines.extend(f"{pad}  " + " ".join(f"{v:.6g}".rjust(width) for v in row) for row in item)
            else:
                lines.append(f"{pad}{key}:")
                lines.extend(_pretty(item, indent + 1))
    elif isinstance(value, (list, tuple)):
        for item in value:
            if _is_leaf(item):
                lines.append(f"{pad}- {_leaf(item)}")
            else:
                sub = _pretty(item, indent + 1)
                if sub:
                    sub[0] = f"{pad}- " + sub[0].lstrip()
                lines.extend(sub)
    else:
        lines.append(f"{pad}{_leaf(value)}")
    return lines


def _is_leaf(value):
    if isinstance(value, dict):
        return False
    if isinstance(value, (list, tuple)):
        return all(isinstance(v, (int, float, str, bool)) or v is None for v in value)
    return True


def _is_matrix(value):
    return (isinstance(value, (list, tuple)) and value
            and all(isinstance(row, (list, tuple)) and row and all(isinstance(v, (int, float)) for v in row)
                    for row in value))


def _leaf(value):
    if isinstance(value, (list, tuple)):
        from .report import shape_str

        return shape_str([_leaf(v) for v in value]) if value else "-"
    if isinstance(value, dict):
        return "-"          # empty: nothing below it
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _escape_surrogates(error):
    """Codec error handler for stdout: ``surrogateescape`` where it applies (undecodable bytes of file
    names print as they were), else ``backslashreplace`` (a lone surrogate from inside a file, such
    as a JSON ``"\\ud800"`` escape in a tensor name, prints as ``\\ud800`` instead of failing)."""
    import codecs

    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(error)


def main(argv=None):
    """Entry point of the ``convt3d`` console script and ``python -m convt3d_cli``."""
    import codecs

    codecs.register_error("convt3d-escape", _escape_surrogates)
    if getattr(sys.stdout, "errors", None) in ("strict", "surrogateescape") and hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="convt3d-escape")
    cli.main(args=argv, prog_name="convt3d")


if __name__ == "__main__":  # pragma: no cover
    main()
