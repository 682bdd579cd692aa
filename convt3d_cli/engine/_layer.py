"""A prepared layer: checked weights and bias plus the slab-wise compute driver.

``PreparedLayer.run_slab`` computes output planes ``[out_start, out_stop)``
along D from an input slab whose first plane is global index ``in_start``
(see ``geometry.input_window``) into a preallocated buffer. Whole-volume calls
are the one-slab case, so streaming reuses exactly the same arithmetic and
gets bitwise-identical results.
"""

from __future__ import annotations

import mmap
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from .. import geometry, threads
from ..errors import ParameterError, ShapeError
from . import _col2im, _columns, _cpu, _gemm, _packed, _plan

# Path selection (``choose_path`` tries paired rows, shuffle GEMM, sub-pixel, blocked, then
# FIR). Each rule below says when a kernel is chosen and why; ``benchmarks/bench_paths.py``
# runs every kernel on the same few-channel layers and shows the measurements behind the
# thresholds.
#
# Blocked (register blocks of 8 output channels) instead of FIR when Cin*Cout per group is
# at least 64, or at least 16 with at least 3 input channels: with fewer channels each
# input load and padded-block copy serves too few multiplies to pay off.
BLOCKED_MIN_CHANNEL_PRODUCT = 64
BLOCKED_MIN_PRODUCT_FEW = 16
BLOCKED_MIN_IN_CHANNELS_FEW = 3
# Paired rows (W stride 2, at most two taps per W phase) for one input channel per group
# at any number of outputs, and for two while Cin*Cout is below the blocked threshold: it
# computes both W phases of a row in one pass from unit-stride loads, without the FIR
# kernel's coefficient rows or the sub-pixel kernel's scatter. From 3 input channels on
# the sub-pixel and blocked kernels win, because they share one input load among 8
# channels.
PAIRED_MAX_IN_CHANNELS = 2
# Shuffle GEMM (kernel == stride without padding: the U-Net decoder's k2 s2, pointwise
# layers) from 2 input channels per group on, unless paired rows take the layer: every
# output has exactly one tap, so it reads each input once, with no halo and no packed
# weights. On the largest layers it is as fast as the blocked kernel and needs far less
# memory (that one packs the whole layer's weights per call). Not for W stride 3, where it
# would scatter one value at a time.
SHUFFLE_MIN_IN_CHANNELS = 2
# It accumulates 8 channels x 32 positions: only on CPUs whose registers hold that block
# (AVX-512). With AVX2 alone it spills, and on Zen 3 the blocked kernel's 5x16 or 3x32
# block was faster on every kernel == stride layer from 8 channels on (bench_paths).
SHUFFLE_BLOCK = "8x32"
# Input bytes one shuffle-GEMM job reads: they stay in L2 (1 MiB here) while the job runs
# through all its channel blocks.
SHUFFLE_CHUNK_BYTES = 512 * 1024
# Sub-pixel (phases as the channels of one stride-1 convolution) instead of FIR and blocked
# when:
# - there are at most 32 virtual channels (Cout/G x phases), beyond which the blocked
#   kernel wins;
# - W stride is 1, or 2 with the two W phases side by side, because any other W layout
#   scatters one value at a time;
# - there are at least 2 input channels per group: the phases fill the 8-channel register
#   blocks that so few output channels would leave mostly empty, so it beats FIR below the
#   blocked thresholds and the blocked kernel above them;
# - or, with one input channel, the shared window has at least 8 taps of which at least
#   3/4 are real, because with one channel the window's zero taps cost as much as its real
#   ones (k3 s2, with 42 % real taps, and k2, with one tap, stay FIR).
# Its block is 8 virtual channels x 32 positions, so only where the registers hold that
# (AVX-512), as for the shuffle GEMM. With AVX2 alone LLVM spills it (49 stack loads and
# stores per term, ``benchmarks/inspect_codegen.py``), and the blocked kernel's AVX2 blocks
# were faster on every few-channel layer measured, FIR too where sub-pixel would replace it
# (benchmarks/README.md): those layers take the blocked kernel there.
SUBPIXEL_MAX_VIRTUAL_CHANNELS = 32
SUBPIXEL_BLOCK = "8x32"
SUBPIXEL_MIN_TAPS_ONE_INPUT = 8
SUBPIXEL_MIN_REAL_SHARE_ONE_INPUT = 0.75
# Columns (NumPy alone, no compiled kernel: ``_columns``) for layers of fewer multiply-adds
# than this. A process that runs many layers (a library caller, a ``convt3d batch``
# worker) loads Numba's kernels once for all of them, after which a kernel computes such
# a layer in a millisecond or so and the columns path in up to about 20 ms; a tiny call
# (a test, a sample) then never loads Numba at all.
COLUMNS_MAX_MACS = 5e6
# The same for the one layer of a ``convt3d run`` process. Loading Numba and its cached
# kernels costs it about 1 s, and compiling them on a first run tens of seconds; below this
# size the columns path finishes the whole run sooner (the sweep of
# ``benchmarks/bench_startup.py``: equal near 4.5e8).
COLUMNS_MAX_MACS_ONE_LAYER = 3e8
_columns_limit = None  # set by the two blocks below; None: COLUMNS_MAX_MACS
# A layer's register block and path follow from its shapes and settings alone (the
# ``col2im`` path also needs finite weights, checked on every layer). ``conv_transpose3d``
# builds a layer per call, and working them out again (phase tables, rules, the tuner's key
# and store) runs as the first Python after a kernel, from cold caches: on a small layer a
# tenth of the call (benchmarks/README.md, "What a call costs besides its kernel"). So the
# decisions of recent layers are kept, by shapes and settings.
DECISIONS_KEPT = 64
_decisions = {}
_decisions_lock = threading.Lock()


def _tuner_stamp():
    from . import _tuner

    return _tuner.stamp()


def _still_holds(layer, phases, block, path, source, store):
    """Whether a kept decision is the one ``layer`` would make: the ``col2im`` path needs
    finite weights, and a measured path the same tuning file (changed, removed or
    corrupted, it is read and measured again)."""
    if path == "col2im" and not layer._fits("col2im"):
        return False
    return source != "measured" or _tuner_stamp() == store


def forget_decisions():
    """Decide every layer afresh (tests that change the rules; a new tuning file)."""
    with _decisions_lock:
        _decisions.clear()


def _decisions_after_fork():
    """A forked child may inherit the lock held by a thread it does not have."""
    global _decisions_lock
    _decisions_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_decisions_after_fork)


@contextmanager
def _limit(value, unless_set=False):
    global _columns_limit
    previous = _columns_limit
    if not (unless_set and previous is not None):
        _columns_limit = value
    try:
        yield
    finally:
        _columns_limit = previous


def one_layer_process():
    """Layers prepared inside this block are the only work of their process (one file of
    ``convt3d run``, ``pipeline.run_file``): the rules keep the columns path up to
    :data:`COLUMNS_MAX_MACS_ONE_LAYER`, unless inside :func:`many_layers`."""
    return _limit(COLUMNS_MAX_MACS_ONE_LAYER, unless_set=True)


def many_layers():
    """Layers prepared inside this block are among many of one process (a batch worker's
    files): the rules keep the columns path below :data:`COLUMNS_MAX_MACS` only."""
    return _limit(COLUMNS_MAX_MACS)
# What the planner may enumerate (see _check_plannable).
MAX_AXIS_TERMS = 1 << 20
MAX_PHASES = 1 << 21
# Padded input block of one job of the sub-pixel and paired kernels: about half an L2 cache,
# but for small outputs no more than a few per cent of the output per thread (the "output +
# 10 %" memory budget); below BLOCK_BYTES_MIN the halo copies start to cost more than that saves.
BLOCK_BYTES = 512 * 1024
BLOCK_BYTES_MIN = 96 * 1024
BLOCK_SHARE_OF_OUTPUT = 0.04
# The register-blocked kernel's input block: BLOCKED_L2_SHARE of this CPU's L2 cache, within
# [BLOCK_BYTES_MIN, BLOCK_BYTES]; BLOCKED_BLOCK_BYTES_UNKNOWN when the L2 size is not known.
# The kernel sweeps the block once per block of output channels, so the block must stay in
# the L2 while the output rows and the weights pass through it too. An int in
# BLOCKED_BLOCK_BYTES replaces the rule (tests, benchmarks/bench_block_size.py).
BLOCKED_L2_SHARE = 0.25
BLOCKED_BLOCK_BYTES_UNKNOWN = 256 * 1024
BLOCKED_BLOCK_BYTES = None

# A fresh output's pages are mapped by all the run's threads from this size on
# (_fault_in), each thread in runs of whole huge pages: x86-64's transparent huge pages
# are 2 MiB, and NumPy asks for them on large arrays.
PARALLEL_PAGES_BYTES = 8 * 1024 * 1024
HUGE_PAGE_BYTES = 2 * 1024 * 1024

# Repeated input rows one direct-kernel job keeps (per thread): about L2-sized.
REP_BYTES = 1024 * 1024

_DTYPES = {"float32": np.float32, "float64": np.float64}

#: The blocked kernel with one register block each (``_plan.REGISTER_BLOCKS``:
#: output channels x positions). ``blocked`` runs the layer's block
#: (:func:`layer_register_block`); these pin one, and the tuner measures those that fit
#: this CPU's registers (:func:`fitting_blocks`).
BLOCKED_VARIANTS = tuple("blocked-" + block for block in _plan.REGISTER_BLOCKS)
#: The blocks compiled for 512-bit vectors (``_plan.WIDE_VECTOR_BLOCKS``).
WIDE_VECTOR_VARIANTS = tuple("blocked-" + block for block in _plan.WIDE_VECTOR_BLOCKS)

#: Every compute path. ``gemm`` is NumPy's BLAS on the layers the shuffle kernel serves
#: (kernel == stride, no start crop): one matrix product per chunk of input planes.
#: ``col2im`` is NumPy's BLAS on any layer with finite weights, one product per input plane
#: whose taps a compiled kernel sums (``_col2im``); the tuner measures it on layers of
#: ``_col2im.MIN_IN_CHANNELS`` input channels per group or more. ``columns`` is NumPy alone
#: on any layer (``_columns``), chosen for small layers only.
PATHS = ("fir", "blocked", "subpixel", "paired", "shuffle", "gemm", "col2im", "columns") + BLOCKED_VARIANTS


def blocked_block_bytes():
    """The register-blocked kernel's input block on this CPU (:data:`BLOCKED_L2_SHARE`)."""
    if BLOCKED_BLOCK_BYTES is not None:
        return BLOCKED_BLOCK_BYTES
    l2 = _cpu.l2_bytes()
    if l2 is None:
        return BLOCKED_BLOCK_BYTES_UNKNOWN
    return int(min(BLOCK_BYTES, max(BLOCK_BYTES_MIN, BLOCKED_L2_SHARE * l2)))


def default_register_block():
    """This CPU's register block for the ``blocked`` path (``_plan.REGISTER_BLOCKS``),
    before a layer's own choice (:func:`layer_register_block`).

    ``5x16`` on x86 CPUs with AVX2 but not AVX-512: their 16 vector registers cannot hold
    the 16 accumulators of ``8x16`` plus its loads, and ``5x16`` (10 accumulators) was
    the fastest block on N4-like layers of ``benchmarks/bench_paths.py`` on AMD Zen 3.
    ``8x16`` elsewhere: 8 of AVX-512's 32 registers, the block the kernel was tuned with
    on AVX-512 CPUs. Large layers measure every block that fits (``_tuner``).
    """
    _, features = _cpu.model_and_features()
    return "5x16" if "avx2" in features and "avx512f" not in features else "8x16"


def register_block(path):
    """The register block a blocked-kernel path runs with (``"blocked"``: this CPU's
    default; a layer may pick another, ``PreparedLayer.block``)."""
    return path.partition("-")[2] or default_register_block()


def fitting_blocks(itemsize=4):
    """The register blocks whose accumulators of ``itemsize``-byte floats fit this CPU's
    vector registers with three to spare for the loads (32 registers with AVX-512, of 64
    bytes for the blocks compiled for 512-bit vectors; else 16 of 32 bytes): the ones worth
    measuring. A block that spills never wins and costs its compilation. Code compiled
    without AVX2 is counted as AVX2's: with SSE's 16-byte registers no block fits, and the
    rule's ``8x16`` was the fastest block there on most layers (benchmarks/README.md,
    "Code for CPUs without AVX2"), so the tuner measures it beside these."""
    _, features = _cpu.model_and_features()
    registers = 32 if "avx512f" in features else 16
    found = []
    for block, (channels, positions) in _plan.REGISTER_BLOCKS.items():
        width = (64 if "avx512f" in features and block in _plan.WIDE_VECTOR_BLOCKS else 32) // itemsize
        if channels * -(-positions // width) + 3 <= registers:
            found.append(block)
    return tuple(found)


def measured_blocked_paths(default=None, itemsize=4):
    """The blocked paths the tuner measures on this CPU: ``blocked`` (a layer's block,
    ``default``, else this CPU's) and every other block of :func:`fitting_blocks`."""
    default = default or default_register_block()
    return ("blocked",) + tuple("blocked-" + block for block in fitting_blocks(itemsize) if block != default)


def lane_share(cout_g, phases_w, block):
    """The share of a register block's lanes that hold real outputs of a layer: its output
    channels over the channel blocks' (``cout_g`` of a multiple of the block's channels)
    times the phase rows' outputs over the position blocks' (``_plan.blocked_plan`` packs
    several short rows into one block where the rows need no W halo)."""
    channels, positions = _plan.REGISTER_BLOCKS[block]
    n_qw = max(phase.count for phase in phases_w)
    lo, hi = _plan.shift_span(phases_w)
    if n_qw == 0:
        rows = 1.0
    elif n_qw < positions and lo == hi:
        rows = (positions // n_qw) * n_qw / positions
    else:
        rows = n_qw / (-(-n_qw // positions) * positions)
    return cout_g / (-(-cout_g // channels) * channels) * rows


#: The AVX-512 blocks a layer's rule chooses from, in the order that settles a tie in
#: :func:`lane_share` (:func:`layer_register_block`).
AVX512_RULE_BLOCKS = ("8x32", "16x16", "8x16")


def layer_register_block(cout_g, phases_w, itemsize=4):
    """The register block of a layer's ``blocked`` path (``itemsize``: of its dtype).

    On AVX2 alone, of ``5x16`` and ``3x32`` the one that wastes fewer lanes
    (:func:`lane_share`; ``5x16`` on a tie). In the sweep of ``benchmarks/bench_paths.py``
    on Zen 3 this picked the faster of the two wherever they differed by more than the
    noise: ``3x32`` for few output channels or 32-output phase rows, ``5x16`` for N4's
    16-output rows. With AVX-512, of :data:`AVX512_RULE_BLOCKS` that fit the registers in
    the layer's dtype, the one that wastes fewest lanes, ``8x32`` then ``16x16`` on a tie:
    both have twice ``8x16``'s independent FMAs, which two 512-bit FMA ports need, and on
    Zen 4 each was the fastest of the three wherever it wasted fewest lanes, ``8x32`` by
    0-8 % on a tie with ``16x16`` (benchmarks/README.md, "The rule's AVX-512 block").
    Elsewhere :func:`default_register_block`.
    """
    default = default_register_block()
    if default == "5x16":
        return max(("5x16", "3x32"), key=lambda block: lane_share(cout_g, phases_w, block))
    if "avx512f" in _cpu.model_and_features()[1]:
        fitting = fitting_blocks(itemsize)
        options = [block for block in AVX512_RULE_BLOCKS if block == default or block in fitting]
        return max(options, key=lambda block: lane_share(cout_g, phases_w, block))   # the first of equals
    return default


def is_blocked(path):
    """Whether ``path`` is the blocked kernel with some register block."""
    return path == "blocked" or path in BLOCKED_VARIANTS


class FirTables(NamedTuple):
    """The FIR kernel's H and W tables (``PreparedLayer._static_tables``).

    Attributes
    ----------
    h_table : tuple
        ``(count, taps, inputs)`` of every output row (``_plan.gather_table``).
    w_fir : ndarray of int64, shape (T, Wout)
        Kernel index per window and output column (``_plan.fir_taps``).
    """

    h_table: tuple
    w_fir: np.ndarray


@dataclass(frozen=True, eq=False)
class PreparedBlocked:
    """A layer's run of the plain or the sub-pixel blocked kernel: the shared plan and what
    the layer adds to it.

    Attributes
    ----------
    plan : _plan.BlockedPlan
        The cached plan, shared with other layers of the same shapes: read only.
    w_packed : ndarray, shape ``plan.w_shape``
        The layer's weights packed in term order.
    bias_blocks : ndarray, (G, n_cob, channel_block * position_block)
        Where the accumulator blocks start: the bias, zero past a group's (virtual) channels.
    shuffle : ndarray of int64, (Cout_g * P, 4), or None
        Sub-pixel only: ``(co, rd, rh, rw)`` of each virtual channel (``_plan.subpixel_weight``).
    sub : tuple of 3 ndarrays, or None
        Sub-pixel only: the D, H and W ``table`` of ``_plan.subpixel_phases``.
    """

    plan: _plan.BlockedPlan
    w_packed: np.ndarray
    bias_blocks: np.ndarray
    shuffle: np.ndarray | None = None
    sub: tuple | None = None


def _kernels():
    from . import _numba_env
    return _numba_env.kernels()


def compute_dtype(x_dtype, dtype):
    """The dtype the engine computes in: ``dtype`` if given, else float64 for float64 input, else float32."""
    if dtype is None:
        return np.dtype(np.float64) if np.dtype(x_dtype) == np.float64 else np.dtype(np.float32)
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _DTYPES:
        raise ParameterError("dtype", f"dtype must be float32 or float64, got {dtype!r}")
    return np.dtype(_DTYPES[name])


def choose_path(cin_g, cout_g, phases=None, macs=None):
    """``"columns"``, ``"blocked"``, ``"subpixel"``, ``"paired"``, ``"shuffle"`` or ``"fir"``:
    the fastest path for this layer.

    Parameters
    ----------
    cin_g, cout_g : int
        Input and output channels per group.
    phases : list of 3 lists of AxisPhase, optional
        The layer's output phases per axis (``_plan.axis_phases``); without them the
        sub-pixel, paired-rows and shuffle-GEMM kernels are not considered.
    macs : int, optional
        Multiply-adds of the whole layer; without them the columns path is not considered.
    """
    if macs is not None and macs < (COLUMNS_MAX_MACS if _columns_limit is None else _columns_limit):
        return "columns"
    product = cin_g * cout_g
    if phases is not None and _plan.paired_fits(phases[2]) and (
            cin_g == 1 or (cin_g <= PAIRED_MAX_IN_CHANNELS and product < BLOCKED_MIN_CHANNEL_PRODUCT)):
        return "paired"
    if (phases is not None and cin_g >= SHUFFLE_MIN_IN_CHANNELS and len(phases[2]) <= 2
            and _plan.shuffle_fits(phases) and SHUFFLE_BLOCK in fitting_blocks()):
        return "shuffle"
    if phases is not None and _subpixel_pays(cin_g, cout_g, phases):
        return "subpixel" if SUBPIXEL_BLOCK in fitting_blocks() else "blocked"
    if product >= BLOCKED_MIN_CHANNEL_PRODUCT or (
            product >= BLOCKED_MIN_PRODUCT_FEW and cin_g >= BLOCKED_MIN_IN_CHANNELS_FEW):
        return "blocked"
    return "fir"


def _subpixel_pays(cin_g, cout_g, phases):
    """The measured rule of ``SUBPIXEL_*`` (see there)."""
    n_phases = int(np.prod([len(axis) for axis in phases]))
    if n_phases < 2 or cout_g * n_phases > SUBPIXEL_MAX_VIRTUAL_CHANNELS or len(phases[2]) > 2:
        return False
    subpixel = [_plan.subpixel_phases(axis) for axis in phases]
    if len(phases[2]) == 2:
        first, _, offset = subpixel[2].table
        cols = first + 2 * offset
        if abs(int(cols[0] - cols[1])) != 1:
            return False  # the two W phases are not side by side: no interleaved runs
    if cin_g >= 2:
        return True
    window = int(np.prod([len(axis.virtual[0].kernel) for axis in subpixel]))
    real = np.prod([np.mean([len(ph.kernel) for ph in axis]) for axis in phases])
    return window >= SUBPIXEL_MIN_TAPS_ONE_INPUT and real / window >= SUBPIXEL_MIN_REAL_SHARE_ONE_INPUT


class PreparedLayer:
    """Weights, bias and parameters checked against an input shape.

    Parameters
    ----------
    input_shape : tuple
        ``(N, C, D, H, W)`` or ``(C, D, H, W)`` of the whole input.
    weight, bias : array_like
    stride, padding, output_padding, dilation, groups
        As for :func:`conv_transpose3d`.
    dtype : numpy dtype
        Compute dtype (float32 or float64).
    path : str, optional
        Pin a compute path (see :func:`conv_transpose3d`).
    tune : bool
        False: keep the rules' path for now and measure later, with :meth:`tune` (a caller
        that first checks what the layer's shapes need: measuring compiles and runs kernels).
    """

    def __init__(self, input_shape, weight, bias=None, stride=1, padding=0, output_padding=0,
                 dilation=1, groups=1, dtype=np.float32, path=None, tune=True):
        self.input_shape, self.batched = geometry.check_input_shape(input_shape)
        self.dtype = np.dtype(dtype)
        weight = np.asarray(weight)
        if weight.dtype.kind not in "biuf":
            raise ShapeError(f"weight must be numeric, got dtype {weight.dtype}")
        if not _is_int_like(groups):
            raise ParameterError("groups", f"groups must be a positive integer, got {groups!r}")
        if int(groups) < 1:
            raise ParameterError("groups", f"groups must be >= 1, got {groups}")
        canonical = geometry.canonical_weight_shape(weight.shape, self.input_shape[1], int(groups))
        self.params = geometry.LayerParams.create(canonical[3:], stride, padding, output_padding,
                                                  dilation, groups)
        _check_plannable(self.params)
        self.weight = _writeable(np.ascontiguousarray(weight.reshape(canonical), dtype=self.dtype))
        self.groups, self.cin_g, self.cout_g = canonical[:3]
        self.out_channels = self.groups * self.cout_g
        self.out_spatial = geometry.output_spatial(self.input_shape[2:], self.params)
        if bias is None:
            self.bias = np.zeros(self.out_channels, dtype=self.dtype)
        else:
            bias = np.asarray(bias)
            if bias.dtype.kind not in "biuf":
                raise ShapeError(f"bias must be numeric, got dtype {bias.dtype}")
            geometry.check_bias_shape(bias.shape, self.out_channels)
            self.bias = _writeable(np.ascontiguousarray(bias.reshape(-1), dtype=self.dtype))
        self._axis_phases = None
        self._plans = {}
        self._gemm_plan = None
        self._col2im_plan = None
        self._finite_weights = None
        self._static = None
        pinned = path if path is not None else (os.environ.get("CONVT3D_PATH") or None)
        if pinned is not None and pinned not in PATHS:
            raise ParameterError("path", f"path must be one of {', '.join(PATHS)}, got {pinned!r:.80}")
        key = (self.input_shape, canonical, self.params, self.dtype.str, pinned, _threads(), _columns_limit,
               os.environ.get("CONVT3D_TUNE"), os.environ.get("NUMBA_CACHE_DIR"), _cpu.model_and_features())
        self._untuned = None
        known = _decisions.get(key)
        if known is not None and _still_holds(self, *known):
            self._axis_phases, self.block, self.path, self.path_source = known[:4]
            return
        self._decide(pinned, tune)
        if not tune and pinned is None and self.path != "columns":
            self._untuned = key  # measured and kept by tune()
            return
        self._keep_decision(key)

    def tune(self):
        """Measure the path now if the layer was made with ``tune=False`` (else nothing)."""
        key, self._untuned = self._untuned, None
        if key is not None:
            self._tune()
            self._keep_decision(key)

    def _keep_decision(self, key):
        if self._finite_weights is False:
            return  # decided by these weights' values: not for the next layer's
        store = _tuner_stamp() if self.path_source == "measured" else None
        with _decisions_lock:
            _decisions[key] = (self._axis_phases, self.block, self.path, self.path_source, store)
            while len(_decisions) > DECISIONS_KEPT:
                _decisions.pop(next(iter(_decisions)))

    def _decide(self, pinned, tune=True):
        """The register block of the ``blocked`` path (:func:`layer_register_block`) and the
        path: ``pinned``, the rules' or (``tune``) the tuner's."""
        self.block = layer_register_block(self.cout_g, self._phases()[2], self.dtype.itemsize)
        if pinned is not None:
            self.path = pinned
        else:
            self.path = choose_path(self.cin_g, self.cout_g, self._phases(), _layer_macs(self))
        self.path_source = "pinned" if pinned is not None else "rule"
        # A forced path (or the rule's shuffle on a layer whose end crop cuts an input's
        # outputs) that cannot run the layer falls back to one that can.
        if self.path == "paired" and not _plan.paired_fits(self._phases()[2]):
            self.path = "fir"
        if self.path in ("shuffle", "gemm", "col2im") and not self._fits(self.path):
            self.path = "blocked"
        if pinned is None and self.path != "columns" and tune:
            self._tune()

    def candidate_paths(self):
        """The paths that can run this layer, the rule's choice first."""
        phases = self._phases()
        found = [self.path]
        blocked = measured_blocked_paths(self.block, self.dtype.itemsize)
        for path in blocked[:1] + ("subpixel", "fir", "paired", "shuffle", "gemm", "col2im") + blocked[1:]:
            if path == "paired" and not _plan.paired_fits(phases[2]):
                continue
            if path == "col2im" and (self.cin_g < _col2im.MIN_IN_CHANNELS or self._fits("gemm")):
                continue  # too few channels for BLAS's rate; the gemm path is its one-tap case
            if path in ("shuffle", "gemm", "col2im") and not self._fits(path):
                continue
            if path not in found:
                found.append(path)
        return found

    def _fits(self, path):
        """Whether the shuffle-GEMM or a BLAS path can run this layer: for ``col2im`` finite
        weights; else kernel == stride without a start crop, and for ``shuffle`` every
        input's outputs inside the H and W extent (it stores whole phases there; ``gemm``
        crops them)."""
        if path == "col2im":
            if self._finite_weights is None:
                self._finite_weights = _col2im.fits(self.weight)
            return self._finite_weights
        if not _plan.shuffle_fits(self._phases()):
            return False
        if path == "shuffle":
            s = self.params.stride
            return all(n_out >= n_in * s_i for n_out, n_in, s_i in
                       zip(self.out_spatial[1:], self.input_shape[3:], s[1:]))
        return True

    def _tune(self):
        """Replace the rule's choice by the measured one on large layers (see :mod:`._tuner`)."""
        from . import _tuner

        if not _tuner.enabled() or _layer_macs(self) < _tuner.TUNE_MIN_MACS:
            return
        self.path = _tuner.tuned_path(self, self.candidate_paths(), _threads())
        self.path_source = "measured"
        keep = (self._plan_name(self.path), self._plan_name("blocked"))  # paired falls back to blocked
        self._plans = {name: plan for name, plan in self._plans.items() if name in keep}

    @property
    def block_axes(self):
        """Spatial axes (0 = D, 1 = H, 2 = W) along which outputs may be computed in
        separate blocks (:meth:`window`) with the same bits as a whole run.

        Every path computes each output from the same taps in the same order whatever
        the D and H extent. Along W, the FIR kernel sums a row's windows and the paired
        kernel a row pair's terms in an order set by the row's length, so those stay
        whole; the ``gemm`` path's products hold chunks of whole input planes, whose
        shape BLAS's sums depend on (:mod:`._gemm`), so it is cut along D only
        (``tests/engine/test_blocks.py`` checks every path).
        """
        return {"gemm": (0,), "col2im": (0,), "fir": (0, 1), "paired": (0, 1)}.get(self.path, (0, 1, 2))

    def window(self, input_shape, params, origin=0):
        """The same weights and path on an input window: the layer of one output block.

        Parameters
        ----------
        input_shape : tuple
            ``(N, Cin, d, h, w)`` of the window (``geometry.block_window`` per axis).
        params : geometry.LayerParams
            The block's crops (``geometry.block_params``).
        origin : int
            The window's first input plane (along D) in this layer: the ``gemm`` path keeps
            this layer's chunks of planes (:meth:`gemm_plan`).

        Returns
        -------
        PreparedLayer
            Runs with :attr:`path` of this layer, never its own rule or measurement.
        """
        sub = PreparedLayer(input_shape, self.weight, self.bias, params.stride, params.padding_spec,
                            params.output_padding, params.dilation, params.groups, self.dtype, path=self.path)
        if sub.path != self.path:  # block_window keeps whole phases; a fallback would change the bits
            raise RuntimeError(f"a block of this layer cannot run the {self.path} kernel")
        whole = self.gemm_plan()
        sub._gemm_plan = whole._replace(origin=whole.origin + int(origin))
        if self.path == "col2im":
            sub._col2im_plan = self.col2im_plan()
        return sub

    @property
    def output_shape(self):
        """Full output shape, ``(N, Cout, D, H, W)``."""
        return (self.input_shape[0], self.out_channels) + self.out_spatial

    def prepare(self, path=None, again=False):
        """Build what ``path`` (default :attr:`path`) computes from: packed weights and
        tables, which :meth:`run_slab` otherwise builds on its first call. With ``again``,
        build it anew (the tuner times it: a whole run pays it once)."""
        path = path or self.path
        if again:
            self._plans.pop(self._plan_name(path), None)
            if path == "fir":
                self._static = None
        if is_blocked(path) or path == "subpixel":
            self._blocked_plan(path)
        elif path == "paired":
            self._paired_plan()
        elif path == "columns":
            self._columns_plan()
        elif path == "fir":
            self._static_tables()
        elif path == "col2im":
            if again:
                self._col2im_plan = None
            self.col2im_plan()

    def _static_tables(self):
        """The FIR kernel's H and W tables; they do not depend on the slab, so once per layer."""
        if self._static is None:
            k, s, p, d = (self.params.kernel_size, self.params.stride, self.params.padding,
                          self.params.dilation)
            self._static = FirTables(
                h_table=_plan.gather_table(0, self.out_spatial[1], self.input_shape[3], k[1], s[1], p[1], d[1]),
                w_fir=_plan.fir_taps(self.out_spatial[2], k[2], s[2], p[2], d[2]),
            )
        return self._static

    def _phases(self):
        """Per-axis output phases (the path choice and the blocked kernels' tables), once."""
        if self._axis_phases is None:
            k, s, p, d = (self.params.kernel_size, self.params.stride, self.params.padding, self.params.dilation)
            self._axis_phases = [_plan.axis_phases(n, *args) for n, args in zip(self.out_spatial, zip(k, s, p, d))]
        return self._axis_phases

    def run_slab(self, x_slab, in_start, out_start, out_stop, out, progress=None):
        """Compute output planes ``[out_start, out_stop)`` into ``out``.

        Parameters
        ----------
        x_slab : ndarray, (N, Cin, d, H, W), compute dtype, C-contiguous
            Input planes ``[in_start, in_start + d)``; must cover
            ``geometry.input_window(out_start, out_stop, ...)``.
        out : ndarray, (N, Cout, out_stop - out_start, Hout, Wout), compute dtype, C-contiguous
        progress : callable(int), optional
            Called with the number of output planes (N * D) finished since the last call.
        """
        path = self.path
        # The NumPy-only path maps its output's pages from this thread: it never loads Numba.
        _fault_in(out, workers=1 if path == "columns" else None)
        if path in ("fir", "subpixel") and not _all_finite(x_slab):
            # The FIR, sub-pixel and paired kernels multiply some inputs by zeros (a window
            # position, a phase or a padding term without a tap there); 0 * inf and 0 * nan
            # would spread to outputs that do not depend on that input. The blocked and
            # shuffle kernels multiply real taps only. The paired kernel counts non-finite
            # inputs as it copies them and hands its planes over itself.
            path = "blocked"
        if path == "columns":
            _columns.run(self._columns_plan(), x_slab, in_start, self.input_shape[2], self.bias, out_start,
                         out_stop, out, progress)
        elif path == "shuffle":
            self._run_shuffle(x_slab, in_start, out_start, out_stop, out, progress)
        elif path == "gemm":
            self._run_gemm(x_slab, in_start, out_start, out_stop, out, progress)
        elif path == "col2im":
            _col2im.run(self.col2im_plan(), self.weight, self.bias, self.params, x_slab, in_start,
                        self.input_shape[2], out_start, out_stop, out, _threads(), _kernels().col2im_sum, progress)
        elif is_blocked(path):
            self._run_blocked(x_slab, in_start, out_start, out_stop, out, progress, path=path)
        elif path == "subpixel":
            self._run_subpixel(x_slab, in_start, out_start, out_stop, out, progress)
        elif path == "paired":
            self._run_paired(x_slab, in_start, out_start, out_stop, out, progress)
        else:
            self._run_direct(x_slab, in_start, out_start, out_stop, out, progress)

    def _run_direct(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        k, s, p, d = (self.params.kernel_size, self.params.stride, self.params.padding,
                      self.params.dilation)
        static = self._static_tables()
        n_batch = x_slab.shape[0]
        for o0, o1 in _plane_steps(out_start, out_stop, n_batch, progress):
            d_table = _plan.gather_table(o0, o1, self.input_shape[2], k[0], s[0], p[0], d[0])
            kern.direct_fir(x_slab, self.weight, self.bias, out, *d_table, *static.h_table, static.w_fir,
                            s[2], p[2], in_start, self._direct_chunk(o1 - o0, n_batch), o1 - o0, o0 - out_start,
                            _threads())

    def scratch_bytes(self, window=None):
        """Upper bound of the memory one ``run_slab`` call allocates besides its output.

        The weight copies and, per thread, one job's buffers: on the FIR path its repeated
        input rows and coefficient rows, on the blocked paths one padded input block (plus
        the packed weights, once).

        Parameters
        ----------
        window : tuple, optional
            ``(input_shape, output_shape)`` of one block of this layer (:meth:`window`):
            the ``columns`` path sizes its tiles by the output it computes. Default: the
            whole layer, which bounds every slab and block.
        """
        weights = 3 * self.weight.nbytes
        if self.path == "columns":
            input_shape, output_shape = window or (self.input_shape, self.output_shape)
            return weights + _columns.scratch_bytes(self._columns_plan(), input_shape, self.dtype.itemsize,
                                                    output_shape)
        if self.path == "fir":
            return weights + _threads() * self._fir_job_bytes()
        if self.path == "paired":
            return weights + _threads() * self._paired_job_bytes()
        if self.path == "shuffle":
            return weights + _threads() * self._shuffle_job_bytes()
        if self.path == "gemm":
            return weights + _gemm.scratch_bytes(self.gemm_plan(), self.cin_g, self.params.stride,
                                                 self.input_shape[2:], self.dtype.itemsize, _threads())
        if self.path == "col2im":
            return weights + _col2im.scratch_bytes(self.col2im_plan(), self.cin_g, self.params.kernel_size,
                                                   self.input_shape[2:], self.dtype.itemsize, _threads())
        prepared = self._blocked_plan(self.path)
        padded = prepared.plan.blocking.padded
        kern = _kernels()
        cb, pb = self._block_sizes(self.path)
        # The padded input block plus the kernel's result blocks (a row of them for the
        # sub-pixel kernel), per thread.
        blocks = (padded.n_wp + kern.WIDE_POSITION_BLOCK) * cb + self.params.stride[2] * (cb + 1) * pb
        block = (self.cin_g * padded.n_dp * padded.n_hp * padded.n_wp + kern.WIDE_POSITION_BLOCK
                 + blocks) * self.dtype.itemsize
        return weights + prepared.w_packed.nbytes + prepared.plan.terms.nbytes + _threads() * block

    def _columns_plan(self):
        if "columns" not in self._plans:
            self._plans["columns"] = _columns.plan(self.weight, self.params)
        return self._plans["columns"]

    def block_of(self, path):
        """The register block a blocked-kernel path runs with on this layer."""
        return self.block if path == "blocked" else register_block(path)

    def _plan_name(self, path):
        """The key of ``path``'s plan in ``_plans``: a blocked path's names its register block."""
        return "blocked-" + self.block_of(path) if is_blocked(path) else path

    def _block_sizes(self, path):
        """``(channels, positions)`` of the register block ``path`` runs with."""
        kern = _kernels()
        if is_blocked(path):
            return _plan.REGISTER_BLOCKS[self.block_of(path)]
        return kern.CHANNEL_BLOCK, kern.WIDE_POSITION_BLOCK

    def _blocked_plan(self, path="blocked"):
        """The :class:`PreparedBlocked` of a blocked path or of the sub-pixel kernel, once."""
        name = self._plan_name(path)
        if name not in self._plans:
            kern = _kernels()
            phases = self._phases()
            weight = self.weight
            shuffle = sub = None
            channel_block, position_block = self._block_sizes(path)
            if path == "subpixel":
                subpixel = [_plan.subpixel_phases(axis) for axis in phases]
                sub = tuple(axis.table for axis in subpixel)
                weight, shuffle = _plan.subpixel_weight(
                    weight, *phases, list(sub), [axis.tap_index for axis in subpixel])
                phases = [axis.virtual for axis in subpixel]
            # Shared with every layer of the same shapes: the layer's own arrays go beside it.
            plan = _plan.cached_blocked_plan(
                weight.shape, *(tuple(axis) for axis in phases),
                self.input_shape[3], self.input_shape[4], self.dtype.itemsize, channel_block,
                position_block, self._block_bytes(None if path == "subpixel" else blocked_block_bytes()),
                n_jobs_wanted=4 * _threads(), n_outer=self.input_shape[0] * self.groups,
                row_blocks=path != "subpixel", whole_planes=path == "subpixel")

            def pack():
                w_packed = np.empty(plan.w_shape, dtype=self.dtype)
                kern.pack_weights(weight, w_packed, *plan.kernel_tables, channel_block)
                return w_packed

            layout = (plan.w_shape, channel_block) + tuple((t.shape, t.tobytes()) for t in plan.kernel_tables)
            w_packed = _packed.packed(weight, layout, pack)
            n_cob = w_packed.shape[1]
            channel_bias = self.bias.reshape(self.groups, self.cout_g)
            if path == "subpixel":
                channel_bias = channel_bias[:, shuffle[:, 0]]
            bias_blocks = np.zeros((self.groups, n_cob * channel_block), dtype=self.dtype)
            bias_blocks[:, :channel_bias.shape[1]] = channel_bias
            bias_blocks = np.repeat(bias_blocks, position_block, axis=1).reshape(self.groups, n_cob, -1)
            self._plans[name] = PreparedBlocked(plan, w_packed, bias_blocks, shuffle, sub)
        return self._plans[name]

    def _block_bytes(self, cap=None):
        """A job's padded input block: ``cap`` (default :data:`BLOCK_BYTES`), or less for
        small outputs (:meth:`_copy_bytes`), and no less than :data:`BLOCK_BYTES_MIN`."""
        cap = BLOCK_BYTES if cap is None else cap
        return max(min(cap, BLOCK_BYTES_MIN), min(cap, self._copy_bytes()))

    def _copy_bytes(self):
        """Each thread's share of the memory budget for input copies (BLOCK_SHARE_OF_OUTPUT)."""
        out_bytes = self.dtype.itemsize * int(np.prod(self.output_shape))
        return int(BLOCK_SHARE_OF_OUTPUT * out_bytes / _threads())

    def _run_subpixel(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        prepared = self._blocked_plan("subpixel")
        plan = prepared.plan
        tables, blocking = plan.tables, plan.blocking
        sub_d, sub_h, sub_w = prepared.sub
        real_first, real_count, real_offset = sub_d  # the real D phases
        # Each axis has a single virtual phase (``_plan.subpixel_phases``): the kernel takes
        # its position count, not the phase tables.
        n_vd, n_vh, n_vw = int(tables.count_d[0]), int(tables.count_h[0]), int(tables.count_w[0])
        for o0, o1 in _plane_steps(out_start, out_stop, x_slab.shape[0], progress):
            v_lo, v_hi = _plan.q_range(real_first, real_count, self.params.stride[0], real_offset, o0, o1)
            kern.subpixel_blocked(x_slab, prepared.w_packed, plan.terms, prepared.bias_blocks, out, n_vd, n_vh,
                                  n_vw, blocking.d_chunk, blocking.h_tile, *blocking.padded, in_start,
                                  self.input_shape[2], o0, v_lo, v_hi, prepared.shuffle, sub_d, sub_h, sub_w,
                                  o1 - o0, o0 - out_start, _threads())

    def _paired_plan(self):
        if "paired" not in self._plans:
            self._plans["paired"] = _plan.paired_plan(
                *self._phases(), self.cin_g, self.params.kernel_size[:2], self.dtype.itemsize,
                self._block_bytes(), n_jobs_wanted=4 * _threads(),
                n_outer=self.input_shape[0] * self.out_channels)
        return self._plans["paired"]

    def _run_paired(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        plan = self._paired_plan()
        args = (*plan.d_phases, *plan.h_phases, plan.w_kern, plan.w_off, plan.n_pair, plan.n_a, plan.d_chunk,
                *plan.padded)
        bits, exponent = _bits(x_slab)
        for o0, o1 in _plane_steps(out_start, out_stop, x_slab.shape[0], progress):
            if kern.paired_rows(x_slab, self.weight, self.bias, out, *args, in_start, self.input_shape[2], o0,
                                o1 - o0, o0 - out_start, bits, exponent, _threads()):
                # Non-finite inputs: these planes again with real taps only (see run_slab).
                self._run_blocked(x_slab, in_start, out_start, out_stop, out, None, (o0, o1))

    def _run_blocked(self, x_slab, in_start, out_start, out_stop, out, progress, planes=None, path="blocked"):
        """The blocked kernel of ``path`` on output planes ``planes`` (global ``(o0, o1)``,
        default the whole slab ``[out_start, out_stop)`` in progress steps)."""
        kern = _kernels()
        prepared = self._blocked_plan(path)
        kernel = kern.BLOCKED_KERNELS[self.block_of(path)]
        plan = prepared.plan
        blocking = plan.blocking
        s = self.params.stride
        steps = [planes] if planes else _plane_steps(out_start, out_stop, x_slab.shape[0], progress)
        for o0, o1 in steps:
            kernel(x_slab, prepared.w_packed, plan.terms, prepared.bias_blocks, out, *plan.tables,
                                s[0], s[1], s[2], blocking.d_chunk, blocking.h_tile, blocking.rows_per_block,
                                *blocking.padded, in_start, self.input_shape[2], o0, o1 - o0, o0 - out_start,
                                _threads())

    def _shuffle_blocking(self, n_slab, in_start, out_start, out_stop):
        """``_plan.shuffle_blocking`` for the input planes that output planes ``[out_start,
        out_stop)`` read from a slab of ``n_slab`` planes starting at ``in_start``."""
        kern = _kernels()
        s_d = self.params.stride[0]
        n_ih, n_iw = self.input_shape[3:]
        d_lo = max(in_start, out_start // s_d)
        d_hi = min(in_start + n_slab, self.input_shape[2], (out_stop - 1) // s_d + 1)
        return _plan.shuffle_blocking(
            max(0, d_hi - d_lo) * n_ih * n_iw, n_iw, self.cin_g, self.cout_g * int(np.prod(self.params.stride)),
            self.dtype.itemsize, SHUFFLE_CHUNK_BYTES, self._copy_bytes(), 4 * _threads(),
            self.input_shape[0] * self.groups, kern.WIDE_POSITION_BLOCK, kern.CHANNEL_BLOCK)

    def _run_shuffle(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        s = self.params.stride
        weight = self.weight.reshape(self.groups, self.cin_g, -1)  # (G, Cin_g, Cout_g * P): a view
        for o0, o1 in _plane_steps(out_start, out_stop, x_slab.shape[0], progress):
            kern.shuffle_gemm(x_slab, weight, self.bias, out, s[0], s[1], s[2],
                              *self._shuffle_blocking(x_slab.shape[2], in_start, o0, o1), in_start,
                              self.input_shape[2], o0, o1 - o0, o0 - out_start, _threads())

    def _run_gemm(self, x_slab, in_start, out_start, out_stop, out, progress):
        """BLAS products over chunks of whole input planes (:mod:`._gemm`)."""
        _gemm.run(self.gemm_plan(), self.weight, self.bias, x_slab, in_start, self.input_shape[2], out_start,
                  out_stop, out, _threads(), _kernels().gemm_scatter, progress)

    def gemm_plan(self):
        """How the ``gemm`` path cuts this layer into jobs (``_gemm.plan``); a :meth:`window`
        keeps the chunks of the layer it is cut from."""
        if self._gemm_plan is None:
            self._gemm_plan = _gemm.plan(self.cout_g, self.params.stride, self.input_shape[2:],
                                         self.dtype.itemsize)
        return self._gemm_plan

    def col2im_plan(self):
        """The ``col2im`` path's tables and product shape (``_col2im.plan``); a :meth:`window`
        keeps its layer's."""
        if self._col2im_plan is None:
            self._col2im_plan = _col2im.plan(self.weight.shape, self.params, self.input_shape[2:],
                                             self.out_spatial, self.dtype.itemsize)
        return self._col2im_plan

    def _shuffle_job_bytes(self):
        """What one ``shuffle_gemm`` job allocates: a copy of its inputs when it makes one, a
        zero-padded last block, one channel block's weights and result blocks."""
        kern = _kernels()
        pb = kern.WIDE_POSITION_BLOCK
        seg_len = self._shuffle_blocking(self.input_shape[2], 0, 0, self.out_spatial[0]).seg_len
        values = self.cin_g * (pb + kern.CHANNEL_BLOCK) + (2 + -(-seg_len // pb)) * kern.CHANNEL_BLOCK * pb
        # A job copies its inputs only when the copy (at most its chunk plus two blocks per
        # channel) fits its share; a slab's chunks may differ from the whole volume's.
        copy = self._copy_bytes() if self.cin_g * (seg_len + 2 * pb) * self.dtype.itemsize <= self._copy_bytes() else 0
        return values * self.dtype.itemsize + copy + 16 * (self.cin_g + 1)

    def _paired_job_bytes(self):
        """What one ``paired_rows`` job allocates: its padded input block, the weights of
        its output channel, two row accumulators and the term lists."""
        plan = self._paired_plan()
        return plan.job_values * self.dtype.itemsize + plan.job_indices * 8

    def _fir_job_bytes(self):
        """What one FIR job allocates: repeated rows of the input planes its chunk reads
        (about ``REP_BYTES``, at least one chunk's worth) and one coefficient row per
        (input channel, kD, kH, window), which grows with the kernel, not the volume."""
        k, s, d = self.params.kernel_size, self.params.stride, self.params.dilation
        n_win = self._static_tables().w_fir.shape[0]
        n_ow = self.out_spatial[2]
        chunk = self._direct_chunk(self.out_spatial[0], self.input_shape[0])
        in_planes = (chunk - 1) // s[0] + (k[0] - 1) * d[0] // s[0] + 2
        rep = (self.cin_g * in_planes * self.input_shape[3] + 1) * ((n_win - 1) * s[2] + n_ow)
        coef = (self.cin_g * k[0] * k[1] * n_win + 1) * n_ow
        return (rep + coef) * self.dtype.itemsize

    def _direct_chunk(self, n_planes, n_batch):
        """Output planes per direct-kernel job: the repeated input rows it caches stay
        near ``REP_BYTES``, and there are enough jobs to keep every thread busy."""
        k, s, d = self.params.kernel_size[0], self.params.stride[0], self.params.dilation[0]
        n_win = self._static_tables().w_fir.shape[0]
        rep_plane = self.cin_g * self.input_shape[3] * ((n_win - 1) * self.params.stride[2]
                                                        + self.out_spatial[2]) * self.dtype.itemsize
        in_planes = max(1, REP_BYTES // max(1, rep_plane))
        by_memory = max(1, (in_planes - (k - 1) * d // s - 1) * s)
        jobs_wanted = 4 * _threads()
        by_balance = max(1, -(-(n_batch * self.out_channels * n_planes) // jobs_wanted) // max(1, n_batch * self.out_channels))
        return int(max(1, min(n_planes, by_memory, by_balance)))


def _layer_macs(layer):
    """Multiply-adds of the whole layer: every input voxel times every tap it feeds."""
    return (layer.input_shape[0] * layer.groups * layer.cin_g * layer.cout_g
            * int(np.prod(layer.input_shape[2:])) * int(np.prod(layer.params.kernel_size)))


def _check_plannable(params):
    """Refuse strides and kernels whose phase tables could not be planned in reasonable time.

    The planner enumerates, in Python, every (phase, tap) pair of each axis and
    every phase of the volume; real layers have a few dozen (stride 4, kernel 8).
    The bounds only stop settings such as a stride of 10^9 from planning for hours
    or exhausting memory before any size check could name them.
    """
    for axis, (k, s) in enumerate(zip(params.kernel_size, params.stride)):
        if k * s > MAX_AXIS_TERMS:
            name = "stride" if s >= k else "kernel_size"
            raise ParameterError(name, f"{name} {s if name == 'stride' else k} along {geometry.AXES[axis]} is "
                                       f"too large to plan (kernel_size x stride must be at most "
                                       f"{MAX_AXIS_TERMS}, got {k} x {s})")
    phases = params.stride[0] * params.stride[1] * params.stride[2]
    if phases > MAX_PHASES:
        raise ParameterError("stride", f"stride {geometry.format_triple(params.stride)} has {phases} output "
                                       f"phases; at most {MAX_PHASES} can be planned")


def _plane_steps(out_start, out_stop, n_batch, progress):
    """Output-plane ranges for the kernel calls of one slab, reporting progress after each.

    Without progress it is one call; with it, about 50 (each still spreads its planes over
    all threads). Every call gets the whole ``out`` and its plane range: a range of planes of
    a multi-channel ``out`` is not contiguous, and Numba would compile and run a strided
    variant of the kernel for it (twice as slow).
    """
    n_planes = out_stop - out_start
    step = -(-n_planes // 50) if progress else n_planes
    for o0 in range(out_start, out_stop, step):
        o1 = min(out_stop, o0 + step)
        yield o0, o1
        if progress:
            progress(n_batch * (o1 - o0))


def _writeable(array):
    """``array``, or a copy of it when it is read-only: Numba types read-only arrays apart,
    so a read-only weight or bias (a broadcast view, a memory map) would compile every
    kernel a second time. Weights are small; inputs are not copied."""
    return array if array.flags.writeable else array.copy()


def _bits(x):
    """``x`` (float32 or float64, C-contiguous) flat as unsigned integers of its width, and
    the exponent mask: a value is non-finite when all its exponent bits are set."""
    if x.dtype == np.float64:
        return x.reshape(-1).view(np.uint64), np.uint64(0x7FF0000000000000)
    return x.reshape(-1).view(np.uint32), np.uint32(0x7F800000)


def _fault_in(out, workers=None, parallel_from=None):
    """Write a zero to every memory page of ``out`` (C-contiguous, all of it about to be
    overwritten), in order, by ``workers`` threads (default: the run's thread count).

    A fresh array's pages are mapped by the system on their first write. When those writes
    come from the kernels' threads, each writing all over the output at once, every page
    costs about ten times as much as in order (benchmarks/README.md, "Fresh output pages");
    on pages already mapped this costs a few microseconds per 16 MB. Mapping a page is
    mostly the system zeroing it, which the threads share from ``parallel_from`` bytes on
    (:data:`PARALLEL_PAGES_BYTES`), each in its own runs of whole huge pages; below that
    one thread costs under a millisecond.
    """
    parallel_from = PARALLEL_PAGES_BYTES if parallel_from is None else parallel_from
    workers = _threads() if workers is None else workers
    if workers > 1 and out.nbytes >= parallel_from:
        raw = out.reshape(-1).view(np.uint8)
        first = -out.ctypes.data % HUGE_PAGE_BYTES
        _kernels().map_pages(raw, mmap.PAGESIZE, HUGE_PAGE_BYTES, first, workers)
        return
    flat = out.reshape(-1)
    flat[::max(1, mmap.PAGESIZE // out.itemsize)] = 0


def _all_finite(x):
    """Whether every value of ``x`` (float32 or float64, C-contiguous) is finite."""
    return _kernels().count_nonfinite(*_bits(x)) == 0


def _is_int_like(value):
    try:
        return int(value) == value and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def _threads():
    """The current thread setting (honours NUMBA_NUM_THREADS and ``threads=``)."""
    return threads.current()
