"""A measured choice of compute path, remembered on disk per CPU (FFTW's "wisdom").

``choose_path`` picks a kernel by rules measured on one CPU family. Where a layer is
large enough for the choice to matter, :func:`tuned_path` times every path that can
run it on a probe slab of the real layer, once per machine, and stores the winner
in ``tuning.json`` beside the compiled kernels. The key holds the CPU model and its
vector features, the Numba and NumPy versions, a digest of the engine's kernel code and
the thread count, so another CPU, library or kernel version measures again. A missing,
corrupt or stale file is ignored and rewritten.

The choice is one per layer (never per slab), so streamed runs stay bitwise equal to
whole runs; ``CONVT3D_PATH`` or ``PreparedLayer(path=...)`` pins a path and
``CONVT3D_TUNE=0`` keeps the rules.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import tempfile
import time
from stat import S_ISREG

import numpy as np

from .. import geometry
from ..threads import current as current_threads
from . import _cpu

#: Layers with fewer multiply-adds than this keep the rules: a wrong choice costs less
#: than timing the candidates (and compiling their kernels) would.
TUNE_MIN_MACS = 2e8
#: Output planes of the probe slab, at least (a stride's worth more when needed).
PROBE_PLANES = 4
#: Rounds of timed runs after one untimed run per candidate (compiling, warming caches).
#: A round times every candidate :data:`PROBE_RUNS` times in a row, in an order that
#: rotates from round to round, and a candidate's median run counts. On a shared machine
#: the host's load comes in bursts that can slow a run down by half; rounds spread a
#: burst over all candidates instead of charging it to the one being timed then. The
#: median, not the best run: a path whose runs vary on their own (the ``gemm`` path's
#: concurrent BLAS products on a 2-vCPU VM, benchmarks/README.md) would win on a lucky
#: run and be slower in use. Runs in a row: the first may share the cores with the
#: previous candidate's workers, which keep spinning for a while (OpenMP's and BLAS's
#: wait policies).
PROBE_ROUNDS = 3
PROBE_RUNS = 2
#: Seconds the machine is left idle before each candidate's runs in a round. After a
#: parallel Numba kernel its OpenMP workers keep spinning for several milliseconds, and
#: the BLAS paths' threads (``gemm``, ``col2im``) run beside them at a fraction of their
#: rate, longer than a whole probe run; a layer's real run starts with them idle.
PROBE_SETTLE = 0.015
#: More rounds, up to :data:`PROBE_MAX_ROUNDS`, while the two fastest estimates are within
#: this share of each other.
PROBE_CLOSE = 0.1
PROBE_MAX_ROUNDS = 6
#: A candidate this many times slower than the fastest after a round is not timed again:
#: the bursts seen on shared VMs slowed runs down by up to about 2x.
PROBE_DROP = 3.0
#: Timed preparations per candidate, after the one its first run makes; the median counts,
#: as for the runs. The first one after that run finds cold caches and a fresh temporary
#: and costs several times what a later call with the same weights pays, enough to lose a
#: short layer its fastest path (benchmarks/README.md, "What a call costs besides its kernel").
PREPARE_RUNS = 3
FILE_NAME = "tuning.json"
#: 4 since the idle pause (:data:`PROBE_SETTLE`): earlier choices, which could charge a BLAS
#: path for the previous candidate's spinning workers, are measured again. 5 since the
#: blocked kernel's input blocks follow the L2 cache's size (``_layer.blocked_block_bytes``).
#: 6 since a candidate's median run counts, not its best. 7 since packed weights are kept
#: between calls with the same weights (``_packed``): a blocked path's preparation is
#: charged as a later call pays it. 8 since that charge is the median of several
#: preparations, not the first one after a run (:data:`PREPARE_RUNS`).
FORMAT_VERSION = 8
#: A larger file is ignored (and replaced on the next measurement): thousands of layers
#: take a few MB.
MAX_FILE_BYTES = 64 << 20
_loaded = [None, None]  # (path, mtime, size, inode) of the file last parsed, and its content


def enabled():
    """Whether measuring is allowed (``CONVT3D_TUNE=0`` turns it off)."""
    return os.environ.get("CONVT3D_TUNE", "1").strip() not in ("0", "", "off", "no", "false")


#: The modules whose code decides how fast each path runs: a change to any of them (a
#: new kernel version) makes earlier measurements stale.
CODE_MODULES = ("_kernels.py", "_plan.py", "_layer.py", "_gemm.py", "_col2im.py", "_columns.py")


@functools.lru_cache(maxsize=1)
def code_digest():
    """A short digest of :data:`CODE_MODULES`' source ("unknown" where it cannot be read)."""
    digest = hashlib.sha256()
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        for name in CODE_MODULES:
            with open(os.path.join(here, name), "rb") as handle:
                digest.update(handle.read())
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]


def machine_key(threads):
    """CPU model, vector features, library versions, the engine's code and threads: what a
    stored choice is valid for."""
    import numba

    model, flags = _cpu.model_and_features()
    return (f"{model} [{' '.join(sorted(flags))}] numba {numba.__version__} numpy {np.__version__} "
            f"kernels {code_digest()} threads {threads}")


def layer_key(layer):
    """The layer's shapes and settings in the orientation it runs (not the slab)."""
    p = layer.params
    return json.dumps([layer.dtype.name, list(layer.input_shape), layer.groups, layer.cin_g, layer.cout_g,
                       list(p.kernel_size), list(p.stride), list(p.padding), list(p.crop_end), list(p.dilation)])


def _path():
    from ._numba_env import cache_dir

    folder = os.environ.get("NUMBA_CACHE_DIR") or cache_dir()
    return os.path.join(folder, FILE_NAME)


def stamp(path=None):
    """What tells one version of the tuning file from another (None when there is none)."""
    try:
        stat = os.stat(path or _path())
    except (OSError, ValueError):
        return None
    return stat.st_mtime_ns, stat.st_size, stat.st_ino


def load(path=None):
    """The stored choices, or an empty store when the file is missing, corrupt or of another version.

    The parsed file is kept while it stays the same file of the same size and modification
    time (a process that prepares many layers reads it once), so the store returned is
    shared: copy it before changing it."""
    path = path or _path()
    try:
        stat = os.stat(path)
        if not S_ISREG(stat.st_mode) or stat.st_size > MAX_FILE_BYTES:
            # A FIFO would block the open, a device or a huge file would be read whole.
            return {"version": FORMAT_VERSION, "machines": {}}
        stamp = (path, stat.st_mtime_ns, stat.st_size, stat.st_ino)
        if _loaded[0] == stamp:
            return _loaded[1]
        with open(path, encoding="utf-8") as handle:
            store = json.load(handle)
    except (OSError, ValueError, UnicodeDecodeError, RecursionError):
        return {"version": FORMAT_VERSION, "machines": {}}
    if (not isinstance(store, dict) or store.get("version") != FORMAT_VERSION
            or not isinstance(store.get("machines"), dict)):
        store = {"version": FORMAT_VERSION, "machines": {}}
    _loaded[:] = [stamp, store]
    return store


def save(store, path=None):
    """Write the store atomically (a temporary file renamed); failures are ignored: tuning is a cache."""
    path = path or _path()
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tuning-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(store, handle, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except (OSError, UnboundLocalError):
            pass


def measure(layer, candidates):
    """Estimated seconds of the whole layer for each candidate path: its preparation (tables,
    and packed weights as a call with the same weights pays for them: a comparison with the
    kept packing, see ``_packed``; the median of :data:`PREPARE_RUNS`) plus its median run
    of the probe slab (see :data:`PROBE_ROUNDS`), scaled to all output planes."""
    n_out = layer.out_spatial[0]
    planes = max(PROBE_PLANES, 2 * layer.params.stride[0])
    quantum = layer.params.stride[0]   # the probe starts on a whole stride: whole D positions
    if "gemm" in candidates:
        # The gemm path multiplies whole chunks of input planes: a probe of part of one
        # would charge it for the rest, so the probe is whole chunks, two per thread (its
        # threads overlap one chunk's scatter with another's product).
        quantum = layer.gemm_plan().planes * layer.params.stride[0]
        planes = max(-(-planes // quantum), 2 * current_threads()) * quantum
    if "col2im" in candidates:
        # The col2im path computes the products of an output's h input planes before its
        # own once per job: a short probe would charge it that many times over.
        planes = max(planes, 4 * (layer.col2im_plan().halo + 1) * layer.params.stride[0])
    planes = min(n_out, planes)
    o0 = max(0, (n_out - planes) // 2) // quantum * quantum
    o1 = min(n_out, o0 + planes)
    planes = o1 - o0
    i0, i1 = geometry.input_window(o0, o1, layer.input_shape[2], 0, layer.params)
    i1 = max(i1, i0 + 1)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(layer.input_shape[:2] + (i1 - i0,) + layer.input_shape[3:]).astype(layer.dtype)
    out = np.empty(layer.output_shape[:2] + (planes,) + layer.output_shape[3:], dtype=layer.dtype)
    chosen = layer.path
    candidates = list(candidates)
    prepare, runs = {}, {path: [] for path in candidates}
    try:
        for path in candidates:
            layer.path = path
            layer.run_slab(x, i0, o0, o1, out)           # compiles, warms the caches
            spent = []
            for _ in range(PREPARE_RUNS):
                start = time.perf_counter()
                layer.prepare(path, again=True)
                spent.append(time.perf_counter() - start)
            prepare[path] = float(np.median(spent))
        timed = list(candidates)
        for round_ in range(PROBE_MAX_ROUNDS):
            turn = round_ % len(timed)
            for path in timed[turn:] + timed[:turn]:
                layer.path = path
                time.sleep(PROBE_SETTLE)
                for _ in range(PROBE_RUNS):
                    start = time.perf_counter()
                    layer.run_slab(x, i0, o0, o1, out)
                    runs[path].append(time.perf_counter() - start)
            times = {path: prepare[path] + float(np.median(runs[path])) * n_out / planes for path in candidates}
            # Against the fastest still timed: a dropped candidate's estimate is from an
            # earlier round, and a burst that slows this round's runs more than
            # PROBE_DROP-fold would otherwise drop them all.
            fastest = min(times[path] for path in timed)
            timed = [path for path in timed if times[path] <= fastest * PROBE_DROP]
            close = sorted(times[path] for path in timed)
            if round_ + 1 >= PROBE_ROUNDS and (len(close) < 2 or close[1] > close[0] * (1 + PROBE_CLOSE)):
                break
    finally:
        layer.path = chosen
    return times


def tuned_path(layer, candidates, threads):
    """The stored or newly measured fastest of ``candidates`` for ``layer`` on this machine."""
    if len(candidates) < 2:
        return candidates[0]
    machine_name, key = machine_key(threads), layer_key(layer)
    machine = load()["machines"].get(machine_name)
    entry = machine.get(key) if isinstance(machine, dict) else None
    if isinstance(entry, dict) and entry.get("path") in candidates:
        return entry["path"]
    times = measure(layer, candidates)
    best = min(times, key=times.get)
    store = copy.deepcopy(load())  # as it is now on disk: another process may have added to it
    machine = store["machines"].get(machine_name)
    if not isinstance(machine, dict):
        machine = store["machines"][machine_name] = {}
    machine[key] = {"path": best, "seconds": {name: round(value, 6) for name, value in times.items()}}
    save(store)
    return best
