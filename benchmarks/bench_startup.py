"""Start-up cost of the CLI: the first run on a fresh install (Numba compiling), warm runs, --help.

Every case is a fresh subprocess (``python -m convt3d_cli``); "first run" gets an empty
``NUMBA_CACHE_DIR`` each time, so it includes compiling the kernels the layer needs, as on
a fresh install. Prints the CPU, then one table row per case: median and min wall time and
the median CPU time (user + sys of the child) over the repeats.

Small layers run on the ``columns`` path (NumPy alone) and never load Numba; the last
table (``--sweep``, on by default) shows why the line is where it is: whole warm runs of
the linear x2 kernel on growing volumes, forced onto ``columns`` and onto the compiled
kernel the rules pick (``paired``), with the layer's multiply-adds beside them.

    python benchmarks/bench_startup.py [--repeats 5] [--cold-repeats 3] [--no-sweep] [--no-bytecode]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PHANTOM = os.path.join(ROOT, "sample_data", "phantom.nii.gz")
DECODER = os.path.join(ROOT, "sample_data", "decoder.npz")
sys.path.insert(0, HERE)
from bench_engine import cpu_description  # noqa: E402 - the one CPU line of the benchmarks


def timed(argv, env):
    """Wall and CPU seconds (user + sys) of one child process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed:\n{proc.stderr}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per warm case")
    parser.add_argument("--cold-repeats", type=int, default=3, help="runs per first-run case (each compiles)")
    parser.add_argument("--no-sweep", action="store_true", help="skip the columns-versus-kernel sweep")
    parser.add_argument("--no-bytecode", action="store_true",
                        help="keep PYTHONDONTWRITEBYTECODE as it is: without cached bytecode every run compiles "
                             "the package's Python source")
    args = parser.parse_args()

    work = tempfile.mkdtemp(prefix="convt3d-startup-")
    try:
        import numpy as np
        tiny = os.path.join(work, "tiny.npy")
        np.save(tiny, np.random.default_rng(0).standard_normal((8, 8, 8)).astype(np.float32))
        volumes = {}
        for n in (48, 64, 96, 128, 160, 192):
            volumes[n] = os.path.join(work, f"v{n}.npy")
            np.save(volumes[n], np.random.default_rng(n).standard_normal((n, n, n)).astype(np.float32))
        out = os.path.join(work, "out.nii.gz")
        cli = [sys.executable, "-m", "convt3d_cli"]
        quick = cli + ["run", PHANTOM, out, "--kernel", "linear", "--stride", "2", "-q", "--overwrite"]
        decoder = cli + ["run", PHANTOM, out, "--weights", DECODER, "-q", "--overwrite"]
        tiny_run = cli + ["run", tiny, os.path.join(work, "tiny_x2.npy"), "--kernel", "linear", "--stride", "2",
                          "-q", "--overwrite"]
        warm_cache = os.path.join(work, "numba-warm")
        # An installed package has its bytecode compiled (pip writes it at install); a shell
        # that sets PYTHONDONTWRITEBYTECODE would make every run here compile the source of
        # an editable install instead, about 0.15 s of a tiny run.
        dropped = ("NUMBA_CACHE_DIR", "NUMBA_DEBUG_CACHE") + (() if args.no_bytecode else ("PYTHONDONTWRITEBYTECODE",))
        base = {k: v for k, v in os.environ.items() if k not in dropped}
        bytecode = "cached" if "PYTHONDONTWRITEBYTECODE" not in base else "not written (PYTHONDONTWRITEBYTECODE)"
        warm_env = dict(base, NUMBA_CACHE_DIR=warm_cache)

        def cold(argv, **extra):
            runs = []
            for i in range(args.cold_repeats):
                folder = os.path.join(work, f"numba-cold-{len(os.listdir(work))}")
                runs.append(timed(argv, dict(base, NUMBA_CACHE_DIR=folder, **extra)))
                shutil.rmtree(folder, ignore_errors=True)
            return runs

        def cold_pinned(argv):
            return cold(argv, CONVT3D_PATH="paired")

        def warm(argv):
            timed(argv, warm_env)  # fills the cache (or warms the page cache)
            return [timed(argv, warm_env) for _ in range(args.repeats)]

        def linear_x2(n):
            return cli + ["run", volumes[n], os.path.join(work, "out.npy"), "--kernel", "linear", "--stride", "2",
                          "-q", "--overwrite"]

        cases = [
            ("first run, quick start (`--kernel linear --stride 2`, empty cache)", cold(quick)),
            ("first run, `--weights sample_data/decoder.npz` (empty cache)", cold(decoder)),
            ("first run, quick start on the compiled kernel (`CONVT3D_PATH=paired`, empty cache)",
             cold_pinned(quick)),
            ("warm, quick start (48^3 -> 96^3 .nii.gz)", warm(quick)),
            ("warm, tiny run (8^3 .npy -> 16^3)", warm(tiny_run)),
            ("`convt3d --help`", warm(cli + ["--help"])),
            ("floor: `python -c 'import numba'`", warm([sys.executable, "-c", "import numba"])),
        ]
        print(f"CPU: {cpu_description()}")
        import numba
        print(f"Python {sys.version.split()[0]}, NumPy {np.__version__}, Numba {numba.__version__}; "
              f"medians of {args.cold_repeats} first runs / {args.repeats} warm runs; the package's bytecode: "
              f"{bytecode}")
        print()
        print("| case | median s | min s | CPU s (median) |")
        print("|---|---:|---:|---:|")
        for name, runs in cases:
            walls = [w for w, _ in runs]
            cpus = [c for _, c in runs]
            print(f"| {name} | {statistics.median(walls):.2f} | {min(walls):.2f} | {statistics.median(cpus):.2f} |")
        if not args.no_sweep:
            print()
            print("Whole warm runs, linear x2 (k4 s2 p1, one channel) from .npy to .npy, median s:")
            print()
            print("| input | multiply-adds | columns (NumPy) | paired (Numba) | rule picks |")
            print("|---|---:|---:|---:|---|")
            from convt3d_cli.engine import _layer
            for n, path in volumes.items():
                macs = n ** 3 * 64
                walls = {}
                for forced in ("columns", "paired"):
                    env = dict(warm_env, CONVT3D_PATH=forced)
                    timed(linear_x2(n), env)
                    walls[forced] = statistics.median(timed(linear_x2(n), env)[0] for _ in range(args.repeats))
                with _layer.one_layer_process():
                    rule = _layer.choose_path(1, 1, None, macs)
                rule = rule if rule == "columns" else "a kernel"
                print(f"| {n}^3 | {macs:.1e} | {walls['columns']:.2f} | {walls['paired']:.2f} | {rule} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
