"""Index planning for the kernels: which input taps feed which output positions.

A transposed convolution places input index ``i`` at output ``i * s - p + k * d``.
Read backwards (output-stationary), output ``o`` receives tap ``k`` from input
``i = (o + p - k * d) / s`` when that is an integer inside ``[0, n_in)``.

Grouping outputs by their *phase* ``r = (o + p) mod s`` makes the valid taps a
fixed list per phase, so no multiply ever touches an inserted zero; within a
phase consecutive outputs read consecutive inputs (``i = q + c``), which is what
lets the inner loops run on contiguous data.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np


def gather_table(o_start, o_stop, n_in, k, s, p, d):
    """Taps of every output index in ``[o_start, o_stop)`` along one axis.

    Returns
    -------
    count : ndarray of int64, shape (n,)
        Number of valid taps per output index.
    taps : ndarray of int64, shape (n, max_taps)
        Kernel index of each valid tap.
    inputs : ndarray of int64, shape (n, max_taps)
        Input index each valid tap reads.
    """
    num = np.arange(o_start, o_stop, dtype=np.int64)[:, None] + p - np.arange(k, dtype=np.int64)[None, :] * d
    valid = (num % s == 0) & (num >= 0) & (num // s < n_in)
    count = valid.sum(axis=1).astype(np.int64)
    width = max(1, int(count.max(initial=0)))
    # Valid taps first, in kernel order (a stable sort of the "invalid" flags).
    order = np.argsort(~valid, axis=1, kind="stable")[:, :width]
    used = np.arange(width)[None, :] < count[:, None]
    taps = np.where(used, order, 0).astype(np.int64)
    inputs = np.where(used, np.take_along_axis(num // s, order, axis=1), 0).astype(np.int64)
    return count, taps, inputs


#: The blocked kernel's register blocks, ``name: (channels, positions)``. ``8x16`` needs 16
#: vector registers for its accumulators: AVX-512 has 32, AVX2 alone 16, so there LLVM
#: spills them; ``5x16`` and ``3x32`` hold 10 and 12 and leave registers for the loads.
#: Which one is fastest depends on the CPU and on the layer (the tuner measures those that
#: fit this CPU's registers; ``_layer`` has the rule).
REGISTER_BLOCKS = {"8x16": (8, 16), "5x16": (5, 16), "3x32": (3, 32), "8x32": (8, 32), "12x16": (12, 16),
                   "16x16": (16, 16)}
#: Blocks compiled for 512-bit vectors where the CPU has them (``_kernels._prefer_512_bit``): 8, 16,
#: 12 and 16 accumulators of 16 floats. LLVM's tuning for Intel's AVX-512 CPUs would otherwise
#: compile 256-bit code, at half the rate of their two 512-bit FMA ports; ``16x16`` is the
#: block for rows of 16 outputs with enough independent FMAs for two such ports
#: (benchmarks/README.md, "Intel's AVX-512 CPUs, read from the assembly").
WIDE_VECTOR_BLOCKS = ("8x16", "8x32", "12x16", "16x16")


@dataclass(frozen=True)
class AxisPhase:
    """Outputs ``o = first + q * s`` (``q`` in ``[0, count)``) and their taps.

    Tap ``j`` uses kernel index ``kernel[j]`` and reads input ``q + shift[j]``.
    """

    first: int
    count: int
    kernel: tuple
    shift: tuple


# The records below are NamedTuples: ``*record`` passes their fields as separate arguments
# of a Numba kernel, so the kernels keep plain scalar and array parameters. A record's field
# order is therefore the order of the kernel's parameters.

class PhaseArrays(NamedTuple):
    """One axis's phases as arrays, in the order ``_kernels.paired_rows`` takes them.

    Attributes
    ----------
    first, count, taps : ndarray of int64, shape (s,)
        First output, output count and tap count of each phase.
    kernel, shift : ndarray of int64, shape (s, max_taps)
        Kernel index and input shift of each tap, 0 past a phase's taps.
    """

    first: np.ndarray
    count: np.ndarray
    taps: np.ndarray
    kernel: np.ndarray
    shift: np.ndarray


class PhaseTables(NamedTuple):
    """First output and output count of each phase per axis: the table arguments of
    ``_kernels.blocked_phases``."""

    first_d: np.ndarray
    count_d: np.ndarray
    first_h: np.ndarray
    count_h: np.ndarray
    first_w: np.ndarray
    count_w: np.ndarray


class KernelTables(NamedTuple):
    """Tap count and kernel index of each tap per phase and axis: the table arguments of
    ``_kernels.pack_weights``."""

    taps_d: np.ndarray
    kernel_d: np.ndarray
    taps_h: np.ndarray
    kernel_h: np.ndarray
    taps_w: np.ndarray
    kernel_w: np.ndarray


class PaddedBlock(NamedTuple):
    """Where one job's zero-padded copy of its input starts and how large it is, as the
    blocked, sub-pixel and paired-rows kernels take it.

    Attributes
    ----------
    sd_lo, sh_lo, sw_lo : int
        Lowest input shift along D, H and W: the block's first plane, row and column
        relative to the job's first position.
    n_dp, n_hp, n_wp : int
        Planes, rows and columns of the block (the job's positions plus the halo).
    """

    sd_lo: int
    n_dp: int
    sh_lo: int
    n_hp: int
    sw_lo: int
    n_wp: int


class Blocking(NamedTuple):
    """Jobs of ``_kernels.blocked_phases`` and ``_kernels.subpixel_blocked``.

    Attributes
    ----------
    d_chunk, h_tile : int
        Phase positions along D and H per job.
    rows_per_block : int
        Short rows one position block covers (1: a block stays within one row); the
        plain blocked kernel only.
    padded : PaddedBlock
    """

    d_chunk: int
    h_tile: int
    rows_per_block: int
    padded: PaddedBlock


class BlockedPlan(NamedTuple):
    """What :func:`blocked_plan` returns.

    Callers share it through :func:`cached_blocked_plan`: read it, never change it (nor
    its arrays).

    Attributes
    ----------
    w_shape : tuple
        Shape of the packed weights, ``(G, n_cob, Pd, Ph, Pw, max_terms * channel_block)``.
    kernel_tables : KernelTables
        The tables to pack the weights with (``_kernels.pack_weights``).
    terms : ndarray of int64, shape (Pd, Ph, Pw, max_terms + 1)
        Offset of each term's input in the padded block, ``-1`` after a phase's last term.
    tables : PhaseTables
    blocking : Blocking
    """

    w_shape: tuple
    kernel_tables: KernelTables
    terms: np.ndarray
    tables: PhaseTables
    blocking: Blocking


class SubpixelAxis(NamedTuple):
    """One axis of a sub-pixel layer (:func:`subpixel_phases`).

    Attributes
    ----------
    virtual : list of one AxisPhase
        ``first`` 0, positions ``v`` in ``[0, count)``, taps ``j`` reading ``v + lowest + j``.
    table : ndarray of int64, shape (3, s)
        Per phase: first output, output count, offset.
    tap_index : list of tuples
        Per phase, the window tap (``j``) of each of its taps.
    """

    virtual: list
    table: np.ndarray
    tap_index: list


class ShuffleBlocking(NamedTuple):
    """The blocking arguments of a ``_kernels.shuffle_gemm`` call (:func:`shuffle_blocking`;
    the kernel describes them)."""

    seg_len: int
    chunk: int
    n_ranges: int
    copy_x: bool


class PairedPlan(NamedTuple):
    """What :func:`paired_plan` returns.

    Attributes
    ----------
    d_phases, h_phases : PhaseArrays
    w_kern, w_off : ndarray of int64, shape (2, 2)
        Kernel index (-1: none) and padded-row column offset of the two taps of W phase A
        (the one with the lower first output) and B.
    n_pair, n_a : int
        Outputs per row of phase B and of phase A.
    d_chunk : int
        Phase positions along D per job (a job covers whole planes).
    padded : PaddedBlock
    job_values, job_indices : int
        How many values and int64 indices one job allocates (its padded input block,
        weights, row accumulators; its term lists).
    """

    d_phases: PhaseArrays
    h_phases: PhaseArrays
    w_kern: np.ndarray
    w_off: np.ndarray
    n_pair: int
    n_a: int
    d_chunk: int
    padded: PaddedBlock
    job_values: int
    job_indices: int


def axis_phases(n_out, k, s, p, d):
    """The ``s`` phases of one axis, in phase order ``r = 0 .. s-1``."""
    phases = []
    for r in range(s):
        first = (r - p) % s
        count = 0 if first >= n_out else (n_out - first + s - 1) // s
        kernel, shift = [], []
        for kj in range(k):
            num = first + p - kj * d
            if num % s == 0:
                kernel.append(kj)
                shift.append(num // s)
        phases.append(AxisPhase(first, count, tuple(kernel), tuple(shift)))
    return phases


def fir_taps(n_out, k, s, p, d):
    """Kernel index per output position and window for the direct kernel's W axis.

    Output ``o`` reads input ``floor((o + p) / s) - m`` for windows
    ``m = 0 .. T-1``; with ``rep[j] = x[floor((j + p) / s)]`` (the input row
    repeated ``s`` times) that is ``rep[o - m * s]``, a unit-stride access. The
    tap used is ``(r + m * s) / d`` with ``r = (o + p) mod s`` when that is a
    whole kernel index, else none (``-1``: the coefficient is zero).

    Returns
    -------
    ndarray of int64, shape (T, n_out)
    """
    windows = (k - 1) * d // s + 1
    num = (np.arange(n_out, dtype=np.int64)[None, :] + p) % s + np.arange(windows, dtype=np.int64)[:, None] * s
    return np.where((num % d == 0) & (num // d < k), num // d, -1).astype(np.int64)


def _phase_arrays(phases):
    """One axis's phases as :class:`PhaseArrays`."""
    first = np.array([ph.first for ph in phases], dtype=np.int64)
    count = np.array([ph.count for ph in phases], dtype=np.int64)
    taps = np.array([len(ph.kernel) for ph in phases], dtype=np.int64)
    width = max(1, int(taps.max()))
    kernel = np.zeros((len(phases), width), dtype=np.int64)
    shift = np.zeros((len(phases), width), dtype=np.int64)
    for r, ph in enumerate(phases):
        kernel[r, :len(ph.kernel)] = ph.kernel
        shift[r, :len(ph.shift)] = ph.shift
    return PhaseArrays(first, count, taps, kernel, shift)


def shift_span(phases):
    """``(min, max)`` of the input shifts of one axis's taps (``(0, 0)`` without taps)."""
    shifts = [c for ph in phases for c in ph.shift]
    return (min(shifts), max(shifts)) if shifts else (0, 0)


def q_range(first, count, stride, offset, o_start, o_stop):
    """Positions ``v`` whose output lies in ``[o_start, o_stop)`` for some phase of one axis.

    Phase ``r``'s output at position ``v`` is ``first[r] + (v + offset[r]) * stride`` when
    ``0 <= v + offset[r] < count[r]``. Returns ``(lo, hi)``, empty as ``(0, 0)``.
    """
    lo, hi = None, None
    for f, c, off in zip(first, count, offset):
        q_lo = max(0, -(-(o_start - f) // stride))
        q_hi = min(int(c), -(-(o_stop - f) // stride))
        if q_hi > q_lo:
            lo = q_lo - off if lo is None else min(lo, q_lo - off)
            hi = q_hi - off if hi is None else max(hi, q_hi - off)
    return (0, 0) if lo is None else (int(lo), int(hi))


def subpixel_phases(phases):
    """One axis of a sub-pixel layer: all phases as one stride-1 phase.

    Phase ``r`` reads inputs ``q + shift``. Counting its positions from ``q = v + offset[r]``
    with ``offset[r] = lowest - min(shift)`` aligns every phase's taps to start at input
    ``v + lowest``, so one window of ``span`` inputs (the longest phase's) covers them all;
    a phase simply has zero weights for the window's other taps. This is the sub-pixel
    (pixel-shuffle) form of a transposed convolution: the phases become channels.

    Returns
    -------
    SubpixelAxis
    """
    with_taps = [ph for ph in phases if ph.shift]
    lowest = min((min(ph.shift) for ph in with_taps), default=0)
    offsets = [lowest - min(ph.shift) if ph.shift else 0 for ph in phases]
    tap_index = [tuple(c - min(ph.shift) for c in ph.shift) if ph.shift else () for ph in phases]
    span = max((max(t) + 1 for t in tap_index if t), default=1)
    count = max(max(ph.count - off for ph, off in zip(phases, offsets)), 0)
    table = np.array([[ph.first for ph in phases], [ph.count for ph in phases], offsets], dtype=np.int64)
    virtual = AxisPhase(0, count, tuple(range(span)), tuple(lowest + j for j in range(span)))
    return SubpixelAxis([virtual], table, tap_index)


def subpixel_weight(weight, phases_d, phases_h, phases_w, tables, tap_indices):
    """The stride-1 weights of a sub-pixel layer and its channel table.

    Parameters
    ----------
    weight : ndarray, (G, Cin_g, Cout_g, kD, kH, kW)
    phases_d, phases_h, phases_w : lists of AxisPhase (the real phases)
    tables, tap_indices : the ``table`` and ``tap_index`` of :func:`subpixel_phases` per axis
        (D, H, W)

    Returns
    -------
    weight_sub : ndarray, (G, Cin_g, Cout_g * P, span_d, span_h, span_w)
        Virtual channel ``c`` holds output channel ``co`` in phase ``(rd, rh, rw)``, zero
        where that phase has no tap.
    shuffle : ndarray of int64, (Cout_g * P, 4)
        ``(co, rd, rh, rw)`` of each virtual channel: by output channel, then by where each
        phase's first position lands along D, H and W (so a block's rows are written in
        ascending order, which the hardware prefetchers follow; descending steps cost 3x).
    """
    groups, cin_g, cout_g = weight.shape[:3]
    spans = [max((max(t) + 1 for t in taps if t), default=1) for taps in tap_indices]
    orders = [sorted(range(table.shape[1]), key=lambda r, t=table: t[0, r] + t.shape[1] * t[2, r])
              for table in tables]
    grid = np.array([(co, rd, rh, rw) for co in range(cout_g) for rd in orders[0]
                     for rh in orders[1] for rw in orders[2]], dtype=np.int64).reshape(-1, 4)
    weight_sub = np.zeros((groups, cin_g, len(grid)) + tuple(spans), dtype=weight.dtype)
    taps_d, taps_h, taps_w = tap_indices
    for c, (co, rd, rh, rw) in enumerate(grid):
        for kd, jd in zip(phases_d[rd].kernel, taps_d[rd]):
            for kh, jh in zip(phases_h[rh].kernel, taps_h[rh]):
                for kw, jw in zip(phases_w[rw].kernel, taps_w[rw]):
                    weight_sub[:, :, c, jd, jh, jw] = weight[:, :, co, kd, kh, kw]
    return weight_sub, grid


def blocked_plan(weight_shape, phases_d, phases_h, phases_w, n_ih, n_iw, itemsize, channel_block,
                 position_block, block_bytes, n_jobs_wanted=1, n_outer=1, row_blocks=True,
                 whole_planes=False):
    """Term offsets, blocking and tables for ``_kernels.blocked_phases``.

    Parameters
    ----------
    weight_shape : tuple
        ``(G, Cin_g, Cout_g, kD, kH, kW)``
    phases_d, phases_h, phases_w : sequences of AxisPhase
    n_ih, n_iw : int
        Input height and width.
    itemsize : int
    channel_block, position_block : int
        The kernel's register block.
    block_bytes : int
        Target size of one job's padded input block (about half an L2 cache).
    n_jobs_wanted, n_outer : int
        Jobs wanted to keep every thread busy, and jobs there are without splitting D or H
        (samples x groups).
    row_blocks : bool
        Whether a position block may cover several short rows (``blocked_phases`` only).
    whole_planes : bool
        Prefer jobs of whole planes (split along D only) when that gives enough jobs.

    Returns
    -------
    BlockedPlan
        Callers share it through :func:`cached_blocked_plan`: read it, never change it.
    """
    groups, cin_g, cout_g = weight_shape[:3]
    arrays_d, arrays_h, arrays_w = (_phase_arrays(phases) for phases in (phases_d, phases_h, phases_w))
    sd_lo, sd_hi = shift_span(phases_d)
    sh_lo, sh_hi = shift_span(phases_h)
    sw_lo, sw_hi = shift_span(phases_w)
    n_qd = int(arrays_d.count.max())
    n_qh = int(arrays_h.count.max())
    n_qw = int(arrays_w.count.max())
    if row_blocks and n_qw < position_block and sw_lo == sw_hi:
        # Short rows without a W halo lie back to back in the padded block: one position
        # block then covers several whole rows instead of wasting most of its lanes.
        rows_per_block = position_block // n_qw
        n_wp = n_qw
    else:
        rows_per_block = 1
        n_wp = -(-n_qw // position_block) * position_block + sw_hi - sw_lo
    # H tile first: enough jobs for all threads from samples x groups x H tiles alone, so a
    # streamed slab of only a few planes still keeps every thread busy. Then about as many
    # planes as rows (both halos amortised) within block_bytes, halo included.
    row_bytes = cin_g * n_wp * itemsize
    rows_fit = max(1, block_bytes // row_bytes)
    tiles_wanted = max(1, -(-n_jobs_wanted // max(1, n_outer)))
    h_cap = max(1, n_qh // tiles_wanted)
    side = 1
    while (side + 1 + sd_hi - sd_lo) * (min(side + 1, h_cap) + sh_hi - sh_lo) <= rows_fit and side < max(n_qd, n_qh):
        side += 1
    h_tile = -(-max(1, min(n_qh, h_cap, side)) // rows_per_block) * rows_per_block
    d_chunk = max(1, min(n_qd, rows_fit // (h_tile + sh_hi - sh_lo) - (sd_hi - sd_lo)))
    planes_fit = rows_fit // (n_qh + sh_hi - sh_lo) - (sd_hi - sd_lo)
    chunks_wanted = -(-n_jobs_wanted // max(1, n_outer))
    if whole_planes and planes_fit >= 1 and n_qd >= chunks_wanted:
        # Whole planes per job when D alone gives enough jobs: each output plane is then
        # written in one sweep (H tiles revisit every plane once per tile, and the sub-pixel
        # kernel, which writes several planes at a time, loses half its speed to that).
        h_tile = n_qh
        d_chunk = max(1, min(planes_fit, -(-n_qd // chunks_wanted)))
    n_dp = d_chunk + sd_hi - sd_lo
    n_hp = h_tile + sh_hi - sh_lo

    n_cob = -(-cout_g // channel_block)
    tap_max = cin_g * max(1, max(len(ph.kernel) for ph in phases_d)) * max(
        1, max(len(ph.kernel) for ph in phases_h)) * max(1, max(len(ph.kernel) for ph in phases_w))
    shape = (len(phases_d), len(phases_h), len(phases_w))
    terms = np.full(shape + (tap_max + 1,), -1, dtype=np.int64)
    for rd, pd in enumerate(phases_d):
        for rh, ph in enumerate(phases_h):
            for rw, pw in enumerate(phases_w):
                if not (pd.kernel and ph.kernel and pw.kernel):
                    continue  # no tap reaches this phase: its outputs are the bias
                # Terms in (ci, jd, jh, jw) order, as ``_kernels.pack_weights`` packs the weights.
                planes = np.arange(cin_g)[:, None, None, None] * n_dp + (np.array(pd.shift) - sd_lo)[None, :, None, None]
                rows = planes * n_hp + (np.array(ph.shift) - sh_lo)[None, None, :, None]
                rel = rows * n_wp + (np.array(pw.shift) - sw_lo)[None, None, None, :]
                terms[rd, rh, rw, :rel.size] = rel.reshape(-1)
    return BlockedPlan(
        w_shape=(groups, n_cob) + shape + (tap_max * channel_block,),
        kernel_tables=KernelTables(arrays_d.taps, arrays_d.kernel, arrays_h.taps, arrays_h.kernel,
                                   arrays_w.taps, arrays_w.kernel),
        terms=terms,
        tables=PhaseTables(arrays_d.first, arrays_d.count, arrays_h.first, arrays_h.count,
                           arrays_w.first, arrays_w.count),
        blocking=Blocking(d_chunk, h_tile, rows_per_block, PaddedBlock(sd_lo, n_dp, sh_lo, n_hp, sw_lo, n_wp)),
    )


def paired_fits(phases_w):
    """Whether ``_kernels.paired_rows`` can run a layer: W stride 2, at most two taps per W phase."""
    return len(phases_w) == 2 and all(len(ph.kernel) <= 2 for ph in phases_w)


def shuffle_fits(phases):
    """Whether ``_kernels.shuffle_gemm`` can run a layer: along every axis the kernel equals the
    stride without padding (or is 1), so phase ``r`` is kernel index ``r`` on input ``q``."""
    return all(ph.first == r and ph.kernel == (r,) and ph.shift == (0,)
               for axis in phases for r, ph in enumerate(axis))


def shuffle_blocking(n_positions, n_iw, cin_g, n_virtual, itemsize, chunk_bytes, copy_bytes, n_jobs_wanted,
                     n_outer, position_block, channel_block):
    """The blocking arguments of a ``_kernels.shuffle_gemm`` call.

    Parameters
    ----------
    n_positions, n_iw : int
        Flat input positions of the slab's planes, and the input row length.
    cin_g, n_virtual, itemsize : int
        Input channels per group, virtual channels per group (Cout/G x phases), bytes per value.
    chunk_bytes : int
        Input bytes one job reads (they stay in cache while it runs all its channel blocks).
    copy_bytes : int
        What a job may allocate for a copy of its inputs; when the copy would be larger, the
        job reads them in place.
    n_jobs_wanted, n_outer : int
        Jobs wanted to keep every thread busy, and samples x groups.
    position_block, channel_block : int
        The kernel's register block.

    Returns
    -------
    ShuffleBlocking
    """
    seg_len = n_iw if n_iw >= position_block else position_block
    fit = max(seg_len, chunk_bytes // max(1, cin_g * itemsize) // seg_len * seg_len)
    n_chunks = max(1, -(-n_positions // fit))
    # Jobs from ranges of channel blocks first: each range re-reads its chunk's inputs, where
    # each extra chunk would copy every weight once more. Then from smaller chunks.
    n_blocks = -(-n_virtual // channel_block)
    n_ranges = max(1, min(n_blocks, -(-n_jobs_wanted // (n_outer * n_chunks))))
    if n_outer * n_chunks * n_ranges < n_jobs_wanted:
        n_chunks = max(n_chunks, min(-(-n_positions // seg_len), -(-n_jobs_wanted // (n_outer * n_ranges))))
    per_chunk = -(-n_positions // n_chunks)
    chunk = max(seg_len, -(-per_chunk // seg_len) * seg_len)  # whole segments
    copy_x = cin_g * (chunk + 2 * position_block) * itemsize <= copy_bytes
    return ShuffleBlocking(seg_len, chunk, n_ranges, copy_x)


def paired_plan(phases_d, phases_h, phases_w, cin_g, kernel_dh, itemsize, block_bytes, n_jobs_wanted=1,
                n_outer=1):
    """Tables and blocking for ``_kernels.paired_rows`` (``paired_fits(phases_w)`` must hold).

    Parameters
    ----------
    phases_d, phases_h, phases_w : sequences of AxisPhase
    cin_g, itemsize : int
    kernel_dh : tuple
        Kernel size along D and H.
    block_bytes : int
        Target size of one job's padded input block.
    n_jobs_wanted, n_outer : int
        Jobs wanted to keep every thread busy, and jobs there are without splitting D
        (samples x output channels).

    Returns
    -------
    PairedPlan
    """
    phase_a, phase_b = sorted(phases_w, key=lambda ph: ph.first)
    sw_lo, sw_hi = shift_span(phases_w)
    w_kern = np.full((2, 2), -1, dtype=np.int64)
    w_off = np.zeros((2, 2), dtype=np.int64)
    for r, ph in enumerate((phase_a, phase_b)):
        for j, (k, c) in enumerate(zip(ph.kernel, ph.shift)):
            w_kern[r, j] = k
            w_off[r, j] = c - sw_lo
        if len(ph.kernel) == 1:
            w_off[r, 1] = w_off[r, 0]  # the missing tap: a zero weight on a column that exists
    n_a, n_pair = phase_a.count, phase_b.count
    n_wp = max(1, n_a + sw_hi - sw_lo)
    sd_lo, sd_hi = shift_span(phases_d)
    sh_lo, sh_hi = shift_span(phases_h)
    d_arrays, h_arrays = _phase_arrays(phases_d), _phase_arrays(phases_h)
    n_qd = max(1, int(d_arrays.count.max()))
    n_hp = int(h_arrays.count.max()) + sh_hi - sh_lo
    plane_bytes = max(1, cin_g * n_hp * n_wp * itemsize)
    d_chunk = max(1, block_bytes // plane_bytes - (sd_hi - sd_lo))
    chunks_wanted = -(-n_jobs_wanted // max(1, n_outer))
    d_chunk = min(d_chunk, n_qd, max(1, -(-n_qd // chunks_wanted)))
    n_dp = d_chunk + sd_hi - sd_lo
    k_d, k_h = kernel_dh
    terms = cin_g * max(1, int(d_arrays.taps.max())) * max(1, int(h_arrays.taps.max())) + 4
    return PairedPlan(
        d_arrays, h_arrays, w_kern, w_off, n_pair, n_a, d_chunk, PaddedBlock(sd_lo, n_dp, sh_lo, n_hp, sw_lo, n_wp),
        job_values=cin_g * n_dp * n_hp * n_wp + (cin_g * k_d * k_h + 1) * 4 + 2 * n_a,
        job_indices=2 * len(phases_h) * terms + len(phases_h),
    )


# A layer called again and again (a decoder in a loop, a batch of volumes) plans once: the
# plan depends on shapes and parameters only, and takes about 0.2 ms of Python per call.
cached_blocked_plan = functools.lru_cache(maxsize=32)(blocked_plan)
