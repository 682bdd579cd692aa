"""Zarr benchmark: an OME-Zarr volume upsampled x2 into an OME-Zarr store, here and on a local Dask cluster.

Usage::

    python benchmarks/bench_zarr.py [--size 512] [--chunk 128] [--max-memory 1G] [--workers 2]
                                    [--compressor blosc-zstd] [--no-cluster] [--keep DIR]

Writes a ``--size``^3 float32 OME-Zarr (NGFF 0.5, Zarr v3) input with ``--chunk``^3
chunks (blosc-zstd; smooth sines plus noise, generated chunk by chunk), then times
whole processes of ``convt3d run IN OUT --kernel linear --stride 2 --max-memory M``
(by default 512^3 -> 1024^3, a 4 GiB output under a 1 GiB budget, so it is written
in several blocks of whole chunks):

- *local*: one ``convt3d run`` process;
- *cluster*: the same command with ``--scheduler`` on a ``distributed.LocalCluster``
  of ``--workers`` processes (one Dask thread each) started by this script (convt3d
  cuts a cluster run into more blocks; both plans are printed);
- *floor*: writing the same output with zarr-python alone, in the local run's blocks and with
  the same codec (read from the local output's metadata); only the ``dst[block] = data``
  calls are timed, the reads are timed apart (*floor incl. reads*).

Before timing, ``convt3d compile --dtype float32`` and a small run here and on the
cluster load the kernels, so no timed row compiles. Peak memory is the process' own
peak RSS: the ``--json`` report's ``peak_memory_bytes`` for ``convt3d run``, and
``getrusage`` in each Dask worker and in the floor's helper process. The cluster
output is compared with the local one bit for bit, block by block, and a few chunks
of the local output with trilinear interpolation computed here in float64 (NumPy,
independent of convt3d). Nothing here is a pass/fail test: timings on shared machines
are noisy. Goal: the local run within 2x of the floor's writes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from bench_batch import convt3d_command  # noqa: E402 - the console script, else python -m convt3d_cli
from bench_engine import cpu_description  # noqa: E402 - the one CPU line of the benchmarks

#: The layer under test: the built-in trilinear kernel at factor 2 (k4 s2, edge-clamped).
STRIDE = 2
LAYER = ["--kernel", "linear", "--stride", str(STRIDE)]
#: Seed of the input's noise (one generator per chunk, so the content does not depend on order).
SEED = 2026
#: The warm-up input: small, but cut into enough blocks that every worker runs some.
WARM_SIZE, WARM_CHUNK, WARM_MEMORY = 64, 16, "12M"


# --------------------------------------------------------------------------- processes
#
# On Linux a process' ru_maxrss starts at its parent's peak RSS (kept across fork and
# exec), and this process grows once it hosts the Dask scheduler. So every command runs
# from a small launcher started first, and the volumes are made, copied and checked in
# helper processes: the peaks reported are the processes' own.

LAUNCHER = r"""
import json, subprocess, sys, time
for line in sys.stdin:
    job = json.loads(line)
    started = time.perf_counter()
    proc = subprocess.run(job["argv"], env=job["env"], capture_output=True, text=True)
    print(json.dumps([time.perf_counter() - started, proc.returncode, proc.stdout, proc.stderr]), flush=True)
"""


class Launcher:
    """A small child process that runs commands for this one (see above); a context manager."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCHER], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *exc):
        self.proc.stdin.close()
        self.proc.wait()

    def run(self, argv):
        """Run ``argv`` with this process' environment; returns ``(wall seconds, stdout)``, exits on failure."""
        self.proc.stdin.write(json.dumps({"argv": argv, "env": dict(os.environ)}) + "\n")
        self.proc.stdin.flush()
        wall, code, stdout, stderr = json.loads(self.proc.stdout.readline())
        if code != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{stderr}")
        return wall, stdout


def helper(launcher, name, *args):
    """Run ``bench_zarr.NAME(*args)`` in a child process; returns what it returns (via JSON)."""
    code = (f"import json, sys; sys.path.insert(0, {HERE!r}); import bench_zarr as b; "
            f"print(json.dumps(b.{name}(*sys.argv[1:])))")
    return json.loads(launcher.run([sys.executable, "-c", code, *[str(a) for a in args]])[1].strip().splitlines()[-1])


def run_cli(launcher, argv):
    """Run ``convt3d`` with ``argv`` (``--json``); returns ``(wall seconds, report)``."""
    wall, stdout = launcher.run(convt3d_command() + argv)
    return wall, json.loads(stdout)


def _maxrss():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _open(path, mode="r"):
    """The image array (key ``0``) of an OME-Zarr store."""
    import zarr
    from zarr.storage import LocalStore

    return zarr.open_array(LocalStore(path, read_only=mode == "r"), path="0", mode=mode, zarr_format=3)


def _regions(shape, block):
    """``(slice, slice, slice)`` boxes of ``block`` covering ``shape``, C order (as convt3d plans them)."""
    starts = [range(0, n, b) for n, b in zip(shape, block)]
    for lo in itertools.product(*starts):
        yield tuple(slice(a, min(n, a + b)) for a, n, b in zip(lo, shape, block))


def make_volume(path, size, chunk):
    """Write a ``size``^3 float32 NGFF 0.5 image with ``chunk``^3 blosc-zstd chunks, one chunk at a time.

    Content: a few low-frequency sines (what an upsampler is used on) plus Gaussian noise
    (so the codec has realistic work). A store that is already complete is kept
    (``--keep DIR`` reruns), anything else is written again.
    """
    import zarr
    from zarr.codecs import BloscCodec
    from zarr.storage import LocalStore

    size, chunk = int(size), int(chunk)
    stamp = {"size": size, "chunk": chunk, "seed": SEED, "complete": True}
    try:
        complete = zarr.open_group(LocalStore(path, read_only=True), mode="r").attrs.get("bench_zarr") == stamp
    except Exception:  # noqa: BLE001 - missing or damaged: written again
        complete = False
    if complete:
        return {"made": False}
    shutil.rmtree(path, ignore_errors=True)
    group = zarr.open_group(LocalStore(path), mode="w", zarr_format=3)
    array = group.create_array("0", shape=(size,) * 3, chunks=(chunk,) * 3, dtype="float32",
                               dimension_names=["z", "y", "x"], fill_value=0,
                               compressors=BloscCodec(cname="zstd", clevel=1, shuffle="shuffle", typesize=4))
    step = 2 * np.pi / size
    for region in _regions((size,) * 3, (chunk,) * 3):
        z, y, x = (np.arange(s.start, s.stop, dtype=np.float32) * np.float32(step) for s in region)
        z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
        block = (np.sin(3 * z + 1) * np.cos(2 * y - 0.5) + 0.5 * np.sin(5 * x + 2 * y)
                 + 0.25 * np.cos(7 * z - 3 * x))
        rng = np.random.default_rng([SEED] + [s.start // chunk for s in region])
        block = block + np.float32(0.05) * rng.standard_normal(block.shape, dtype=np.float32)
        array[region] = block.astype(np.float32, copy=False)
    group.attrs.update({"ome": {"version": "0.5", "multiscales": [{
        "name": "bench", "axes": [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"],
        "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": [1.0, 1.0, 1.0]}]}]}]}})
    # Last, so that an interrupted write is never taken for a complete input.
    group.attrs["bench_zarr"] = stamp
    return {"made": True}


def floor_copy(src_path, dst_path, block):
    """Copy the output with zarr-python alone, in convt3d's blocks and with its codec; time reads and writes.

    The destination array has the source's shape, chunks, codecs and fill value, so
    the writes encode and store the same chunks convt3d stored.
    """
    import zarr
    from zarr.storage import LocalStore

    block = json.loads(block)
    src = _open(src_path)
    shutil.rmtree(dst_path, ignore_errors=True)
    group = zarr.open_group(LocalStore(dst_path), mode="w", zarr_format=3)
    dst = group.create_array("0", shape=src.shape, chunks=src.chunks, dtype=src.dtype, fill_value=src.fill_value,
                             serializer=src.serializer, compressors=src.compressors or None,
                             dimension_names=src.metadata.dimension_names)
    read = write = 0.0
    for region in _regions(src.shape, block):
        started = time.perf_counter()
        data = src[region]
        read += time.perf_counter() - started
        started = time.perf_counter()
        dst[region] = data
        write += time.perf_counter() - started
        del data
    return {"read": read, "write": write, "peak": _maxrss(), "stored": tree_bytes(dst_path),
            "codec": ", ".join(_codec_text(c) for c in src.compressors) or "none"}


def _codec_text(codec):
    """``blosc(cname=zstd, clevel=1, shuffle=shuffle, typesize=4, blocksize=0)``."""
    spec = codec.to_dict()
    return f"{spec['name']}({', '.join(f'{k}={v}' for k, v in (spec.get('configuration') or {}).items())})"


def trilinear(volume, region, stride):
    """Trilinear interpolation (half-pixel centres, edges clamped) of ``volume`` over output ``region``.

    What ``--kernel linear`` is documented to equal (``torch.nn.functional.interpolate``,
    ``align_corners=False``), computed here in float64 from the input window it reads.
    """
    taps = []
    for s, n in zip(region, volume.shape):
        src = (np.arange(s.start, s.stop) + 0.5) / stride - 0.5
        left = np.floor(src).astype(np.int64)
        taps.append((np.clip(left, 0, n - 1), np.clip(left + 1, 0, n - 1), src - left))
    lo = [int(a.min()) for a, _, _ in taps]
    hi = [int(b.max()) + 1 for _, b, _ in taps]
    x = np.asarray(volume[tuple(slice(a, b) for a, b in zip(lo, hi))], dtype=np.float64)
    for axis, (a, b, frac) in enumerate(taps):
        shape = [1, 1, 1]
        shape[axis] = -1
        frac = frac.reshape(shape)
        x = np.take(x, a - lo[axis], axis=axis) * (1 - frac) + np.take(x, b - lo[axis], axis=axis) * frac
    return x


def verify(input_path, local_path, cluster_path, block):
    """Compare two outputs bit for bit, block by block; spot-check the first one against :func:`trilinear`.

    ``cluster_path`` may be ``""`` (no cluster run): only the spot checks are made.
    """
    block = json.loads(block)
    local = _open(local_path)
    result = {}
    if cluster_path:
        cluster = _open(cluster_path)
        same = local.metadata.to_dict() == cluster.metadata.to_dict()
        different = []
        for region in _regions(local.shape, block):
            # uint32 views: NaNs and signed zeros compare by their bits.
            if not np.array_equal(local[region].view(np.uint32), cluster[region].view(np.uint32)):
                different.append([s.start for s in region])
        result.update(same_metadata=same, blocks=len(list(_regions(local.shape, block))), different=different)
    # First chunk (edges clamped on three faces), the chunk at the centre, the last one.
    source = _open(input_path)
    chunks = local.chunks
    grid = [math.ceil(n / c) for n, c in zip(local.shape, chunks)]
    errors = []
    for index in ([0, 0, 0], [g // 2 for g in grid], [g - 1 for g in grid]):
        region = tuple(slice(i * c, min(n, (i + 1) * c)) for i, c, n in zip(index, chunks, local.shape))
        expected = trilinear(source, region, STRIDE)
        errors.append(float(np.abs(local[region].astype(np.float64) - expected).max()))
    result.update(spot_chunks=len(errors), max_abs_error=max(errors))
    return result


def tree_bytes(path):
    """Bytes of the files under ``path`` (a store's size on disk, as ``du --apparent-size``)."""
    return sum(os.path.getsize(os.path.join(folder, name)) for folder, _, names in os.walk(path) for name in names)


# --------------------------------------------------------------------------- this process

def work_folder(keep, need):
    """``(folder, owned)``: ``--keep DIR``, else a new folder on the first of the temporary folder and the
    repository's disk with ``need`` bytes free (a small /tmp, e.g. a tmpfs, would not hold the outputs)."""
    if keep:
        os.makedirs(keep, exist_ok=True)
        if shutil.disk_usage(keep).free < need:
            print(f"warning: {keep} has {shutil.disk_usage(keep).free / 2**30:.1f} GiB free; this run needs "
                  f"up to {need / 2**30:.1f} GiB")
        return keep, False
    for base, prefix in ((tempfile.gettempdir(), "convt3d-bench-zarr-"), (ROOT, ".bench-zarr-")):
        if shutil.disk_usage(base).free >= need:
            return tempfile.mkdtemp(prefix=prefix, dir=base), True
    raise SystemExit(f"neither {tempfile.gettempdir()} nor {ROOT} has {need / 2**30:.1f} GiB free; "
                     f"use --keep DIR on a larger disk")


def _stamp(path):
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def _worker_stats():
    """On a Dask worker: its peak RSS, Numba threads and whether it has run a convt3d block."""
    import resource

    numba = sys.modules.get("numba")
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "numba_threads": numba.get_num_threads() if numba else None,
            "ran_block": "convt3d_cli.blockrun" in sys.modules}


def run_cluster(launcher, workers, warm_cmd, cmd):
    """Start a LocalCluster, warm its workers, time ``cmd --scheduler ADDRESS``; returns a dict."""
    try:
        import distributed
    except ImportError as err:
        raise SystemExit(f"the cluster run needs Dask ({err}): pip install \"convt3d[distributed]\", "
                         f"or pass --no-cluster") from None

    # Workers are spawned from this process and inherit its environment (NUMBA_CACHE_DIR included).
    # No dashboard; the scheduler's HTTP routes (health checks) take a free port on this host, not 8787.
    with distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None,
                                  scheduler_kwargs={"dashboard": False, "dashboard_address": "127.0.0.1:0"}
                                  ) as cluster, distributed.Client(cluster) as client:
        address = cluster.scheduler_address
        # The workers share this machine's cores: each computes with its share (--threads),
        # as `dask worker --nworkers N` on one node should be used.
        share = ["--threads", str(max(1, len(os.sched_getaffinity(0)) // workers))]
        run_cli(launcher, warm_cmd + ["--scheduler", address] + share)
        warmed = sum(s["ran_block"] for s in client.run(_worker_stats).values())
        # The task stream is recorded by the scheduler, so it sees the tasks of the convt3d client too.
        with distributed.get_task_stream(client) as stream:
            wall, report = run_cli(launcher, cmd + ["--scheduler", address] + share)
        stats = client.run(_worker_stats)
        per_worker = {}
        for task in stream.data:
            if str(task.get("key", "")).startswith("convt3d-block-"):
                per_worker[task["worker"]] = per_worker.get(task["worker"], 0) + 1
        return {"wall": wall, "report": report, "warmed": warmed, "workers": list(stats.values()),
                "tasks_per_worker": [per_worker.get(w, 0) for w in stats], "version": distributed.__version__,
                "scheduler_peak": _maxrss()}


def measure(args, launcher, folder):
    """Make the inputs, warm up, run every case and the checks; returns the results as a dict."""
    paths = {name: os.path.join(folder, f"{name}.ome.zarr")
             for name in ("in", "warm", "warm_local", "warm_cluster", "out_local", "out_cluster", "floor")}
    made = helper(launcher, "make_volume", paths["in"], args.size, args.chunk)["made"]
    helper(launcher, "make_volume", paths["warm"], WARM_SIZE, WARM_CHUNK)

    # Compile (or load) every float32 kernel, then use the cache it names in every process,
    # the cluster's workers included.
    compiled = run_cli(launcher, ["compile", "--dtype", "float32", "--json"])[1]
    os.environ["NUMBA_CACHE_DIR"] = compiled["cache"]
    tuning = os.path.join(compiled["cache"], "tuning.json")

    def command(src, dst, memory):
        return ["run", paths[src], paths[dst], *LAYER, "--max-memory", memory, "--compressor", args.compressor,
                "--json", "-q", "--overwrite"]

    warm = run_cli(launcher, command("warm", "warm_local", WARM_MEMORY))[1]
    # A layer of this size is timed against the other compute paths on its first run on a
    # machine (engine/_tuner.py); a changed tuning.json says the timed run did that.
    before = _stamp(tuning)
    local_wall, local = run_cli(launcher, command("in", "out_local", args.max_memory))
    tuned = _stamp(tuning) != before
    block = json.dumps(local["block_shape"])
    floor = helper(launcher, "floor_copy", paths["out_local"], paths["floor"], block)
    shutil.rmtree(paths["floor"], ignore_errors=True)  # a copy of out_local: free its space now
    cluster = None
    if not args.no_cluster:
        cluster = run_cluster(launcher, args.workers, command("warm", "warm_cluster", WARM_MEMORY),
                              command("in", "out_cluster", args.max_memory))
    checks = helper(launcher, "verify", paths["in"], paths["out_local"], paths["out_cluster"] if cluster else "",
                    block)
    return {"made": made, "input_bytes": tree_bytes(paths["in"]), "cache": compiled["cache"], "warm": warm,
            "local_wall": local_wall, "local": local, "tuned": tuned, "stored": tree_bytes(paths["out_local"]),
            "floor": floor, "cluster": cluster, "checks": checks}


def _mib(nbytes):
    return f"{nbytes / 2**20:.0f}"


def print_results(args, folder, r):
    """The set-up lines, the table and the checks."""
    import numba
    import numcodecs
    import zarr

    local, floor, cluster, checks = r["local"], r["floor"], r["cluster"], r["checks"]
    shape, block = local["output_file_shape"], local["block_shape"]
    nbytes = math.prod(shape) * 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"CPU: {cpu_description()}")
    print(f"Python {sys.version.split()[0]}, NumPy {np.__version__}, Numba {numba.__version__}, zarr "
          f"{zarr.__version__}, numcodecs {numcodecs.__version__}"
          + (f", distributed {cluster['version']}" if cluster else ""))
    print(f"work folder: {folder}{'' if r['made'] else ' (input reused)'}")
    print(f"input:  {args.size}^3 float32 OME-Zarr, chunks {args.chunk}^3, blosc-zstd, "
          f"{r['input_bytes'] / 2**20:.1f} MiB on disk")
    plans = f"local run {local['blocks']} blocks of {'x'.join(map(str, block))}"
    if cluster:
        plans += (f", cluster run {cluster['report']['blocks']} blocks of "
                  f"{'x'.join(map(str, cluster['report']['block_shape']))}")
    print(f"output: {'x'.join(map(str, shape))} float32 ({nbytes / 2**30:.2f} GiB), chunks "
          f"{'x'.join(map(str, local['chunks']))}, --kernel linear --stride {STRIDE}, --max-memory {args.max_memory}: "
          f"{plans}")
    print(f"codec:  --compressor {args.compressor} = {floor['codec']}; stored {r['stored'] / 2**20:.1f} MiB, "
          f"ratio {nbytes / r['stored']:.2f}x (the floor's copy: {floor['stored'] / 2**20:.1f} MiB)")
    threads = f"threads: local run {cores} Numba threads (convt3d's default: all usable cores)"
    if cluster:
        per_worker = sorted({w["numba_threads"] for w in cluster["workers"]}, key=str)
        threads += (f"; cluster {args.workers} worker processes x 1 Dask thread, each computing with "
                    f"--threads {max(1, cores // args.workers)} (Numba's default there: {'/'.join(map(str, per_worker))}), "
                    f"plus the client process")
    print(threads)
    warm = (f"warm-up (not timed): convt3d compile --dtype float32 (cache {r['cache']}), then {WARM_SIZE}^3 -> "
            f"{WARM_SIZE * STRIDE}^3 in {r['warm']['blocks']} blocks locally")
    if cluster:
        warm += f" and on the cluster ({cluster['warmed']} of {args.workers} workers ran a block)"
    print(warm + "; the timed runs load compiled kernels, they do not compile")
    if r["tuned"]:
        print("note: the local run timed this layer's compute paths on a probe (its first run on this machine, "
              "now in tuning.json); its figure includes that, rerun for one without it")

    write = floor["write"]
    rows = [(f"convt3d run, local (--max-memory {args.max_memory})", r["local_wall"], local["seconds"],
             local["peak_memory_bytes"])]
    if cluster:
        rows.append((f"convt3d run --scheduler, {args.workers} workers", cluster["wall"],
                     cluster["report"]["seconds"], max(w["peak"] for w in cluster["workers"])))
    rows += [("floor: zarr writes only", write, None, floor["peak"]),
             ("floor incl. reads", write + floor["read"], None, floor["peak"])]
    print()
    print("| case | wall s | report s | output GB/s | peak MiB per process | x floor writes |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, report_s, peak in rows:
        print(f"| {name} | {seconds:.2f} | {'' if report_s is None else f'{report_s:.2f}'} | "
              f"{nbytes / seconds / 1e9:.2f} | {_mib(peak)} | {seconds / write:.2f}x |")
    print()
    line = (f"convt3d local / floor writes: {r['local_wall'] / write:.2f}x wall, {local['seconds'] / write:.2f}x "
            f"report (goal <= 2x)")
    if cluster:
        line += (f"; cluster / local: {cluster['wall'] / r['local_wall']:.2f}x wall, "
                 f"{cluster['report']['seconds'] / local['seconds']:.2f}x report")
    print(line)
    print("wall = the whole process (start-up included); report = its --json 'seconds' (read, compute, write); "
          "GB/s = output bytes / wall s (1 GB = 1e9 bytes); peak = the process' own peak RSS "
          "(cluster row: the largest worker's)")
    if cluster:
        print(f"cluster memory: peak RSS per worker {', '.join(_mib(w['peak']) for w in cluster['workers'])} MiB "
              f"(whole process life, warm-up included); client {_mib(cluster['report']['peak_memory_bytes'])} MiB; "
              f"scheduler + nannies (this process) {_mib(cluster['scheduler_peak'])} MiB; tasks (runs of blocks) per worker "
              f"{', '.join(map(str, cluster['tasks_per_worker']))}")
        if checks["same_metadata"] and not checks["different"]:
            verdict = "same bits"
        else:
            verdict = (f"DIFFERENT: array metadata {'same' if checks['same_metadata'] else 'differs'}, "
                       f"{len(checks['different'])} blocks differ (first at {checks['different'][:1]})")
        print(f"check: cluster output vs local output, {checks['blocks']} blocks compared: {verdict}")
    else:
        print("check: no cluster run, so no bitwise comparison of outputs")
    error = checks["max_abs_error"]
    print(f"check: local output vs trilinear interpolation in float64 (NumPy, here) on {checks['spot_chunks']} "
          f"chunks (first, centre, last): max abs error {error:.2e} ({'ok' if error <= 1e-5 else 'TOO LARGE'}; "
          f"the values are within about +-2)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="See benchmarks/README.md, bench_zarr.py.")
    parser.add_argument("--size", type=int, default=512, metavar="N", help="edge of the input cube (default 512)")
    parser.add_argument("--chunk", type=int, default=128, metavar="N",
                        help="edge of the input's chunks, and so of the output's (default 128)")
    parser.add_argument("--max-memory", default="1G", metavar="SIZE", help="convt3d's --max-memory (default 1G)")
    parser.add_argument("--workers", type=int, default=2, metavar="N", help="Dask worker processes (default 2)")
    parser.add_argument("--compressor", default="blosc-zstd",
                        choices=("blosc-zstd", "blosc-lz4", "zstd", "gzip", "none"),
                        help="convt3d's --compressor for the output (default blosc-zstd)")
    parser.add_argument("--no-cluster", action="store_true", help="skip the Dask cluster run")
    parser.add_argument("--keep", default=None, metavar="DIR", help="work in DIR and keep it (the input is reused)")
    args = parser.parse_args(argv)

    out_bytes = (args.size * STRIDE) ** 3 * 4
    # Input, then the local output beside the floor's copy or the cluster's output (uncompressed: an upper bound).
    folder, owned = work_folder(args.keep, int(1.1 * (args.size ** 3 * 4 + 2 * out_bytes)))
    try:
        with Launcher() as launcher:
            results = measure(args, launcher, folder)
        print_results(args, folder, results)
    finally:
        if owned:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
