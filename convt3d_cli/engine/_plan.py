"""Index planning for the kernels: which input taps feed which output positions.

A transposed convolution places input index ``i`` at output ``i * s - p + k * d``.
Read backwards (output-stationary), output ``o`` receives tap ``k`` from input
``i = (o + p - k * d) / s`` when that is an integer inside ``[0, n_in)``.

Grouping outputs by their *phase* ``r = (o + p) mod s`` makes the valid taps a
fixed list per phase, so no multiply ever touches an inserted zero; within a
phase consecutive outputs read consecutive inputs (``i = q + c``), which is what
lets the inner loops and the GEMMs run on contiguous data.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    n = o_stop - o_start
    per_output = []
    for o in range(o_start, o_stop):
        pairs = []
        for kj in range(k):
            num = o + p - kj * d
            if num % s == 0 and 0 <= num // s < n_in:
                pairs.append((kj, num // s))
        per_output.append(pairs)
    width = max(1, max((len(pairs) for pairs in per_output), default=1))
    count = np.zeros(n, dtype=np.int64)
    taps = np.zeros((n, width), dtype=np.int64)
    inputs = np.zeros((n, width), dtype=np.int64)
    for row, pairs in enumerate(per_output):
        count[row] = len(pairs)
        for j, (kj, i) in enumerate(pairs):
            taps[row, j] = kj
            inputs[row, j] = i
    return count, taps, inputs


@dataclass(frozen=True)
class AxisPhase:
    """Outputs ``o = first + q * s`` (``q`` in ``[0, count)``) and their taps.

    Tap ``j`` uses kernel index ``kernel[j]`` and reads input ``q + shift[j]``.
    """

    first: int
    count: int
    kernel: tuple
    shift: tuple


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


def q_range(phase, o_start, o_stop, s):
    """Range of ``q`` whose output ``phase.first + q * s`` lies in ``[o_start, o_stop)``."""
    lo = max(0, -((phase.first - o_start) // s))      # ceil((o_start - first) / s)
    hi = min(phase.count, -((phase.first - o_stop) // s))
    return lo, max(lo, hi)


@dataclass
class PhaseGroup:
    """Output phases (one per axis combination) that read the same pattern of shifted inputs.

    Phase ``P`` reads input ``q + delta_P + base[j]`` for its output ``q``. Phases
    with the same ``base`` lists (shift patterns relative to their smallest
    shift) share one im2col matrix over the anchor ``u = q + delta_P``, and one
    GEMM with all their weights stacked on its rows computes them together:
    ``k == s`` collapses to a single GEMM, and so does ``k == 2 s``.
    """

    base: tuple            # (base_d, base_h, base_w): each a tuple of shifts, min 0
    phases: list           # list of (AxisPhase_d, AxisPhase_h, AxisPhase_w)

    def delta(self, axis):
        """Per-phase offset ``delta_P`` (the smallest shift) along ``axis``."""
        return [min(phase[axis].shift) for phase in self.phases]


def union_phases(phases):
    """Align one axis' phases to the union of their relative shift windows.

    Each phase keeps its anchor (smallest shift) and gets one tap per window
    offset; offsets it has no tap for get kernel index ``-1`` (a zero weight).
    All phases of the axis then share one shift pattern, so every 3-D phase
    falls into one group: one im2col and one tall GEMM at the price of some
    multiplications by zero.
    """
    window = sorted({c - min(ph.shift) for ph in phases if ph.kernel for c in ph.shift})
    aligned = []
    for ph in phases:
        if not ph.kernel:
            aligned.append(ph)
            continue
        anchor = min(ph.shift)
        by_offset = {c - anchor: kj for kj, c in zip(ph.kernel, ph.shift)}
        aligned.append(AxisPhase(ph.first, ph.count, tuple(by_offset.get(b, -1) for b in window),
                                 tuple(anchor + b for b in window)))
    return aligned


def real_taps(phase_triple):
    """Number of non-padding taps of a 3-D phase."""
    return int(np.prod([sum(1 for kj in ax.kernel if kj >= 0) for ax in phase_triple]))


def phase_groups(phases_d, phases_h, phases_w):
    """Group 3-D phases by relative shift pattern; phases without taps are returned apart.

    Returns
    -------
    groups : list of PhaseGroup
    empty : list of tuple
        Phases (with at least one output) that receive no tap at all: they hold
        only the bias.
    """
    groups = {}
    empty = []
    for pd in phases_d:
        for ph in phases_h:
            for pw in phases_w:
                if not (pd.count and ph.count and pw.count):
                    continue
                if not (pd.kernel and ph.kernel and pw.kernel):
                    empty.append((pd, ph, pw))
                    continue
                key = tuple(tuple(c - min(ax.shift) for c in ax.shift) for ax in (pd, ph, pw))
                groups.setdefault(key, PhaseGroup(key, [])).phases.append((pd, ph, pw))
    return list(groups.values()), empty


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
    table = np.full((windows, n_out), -1, dtype=np.int64)
    for o in range(n_out):
        r = (o + p) % s
        for m in range(windows):
            num = r + m * s
            if num % d == 0 and num // d < k:
                table[m, o] = num // d
    return table
