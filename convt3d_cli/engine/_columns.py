"""The ``columns`` path: any layer with NumPy alone, for layers too small to pay for Numba.

The inputs become their "columns": what every tap of every input voxel adds to the
output, ``Cout_g * kD*kH*kW`` values per voxel and group, summed over the input channels
(the col2im algorithm of PyTorch's ``slow_conv_transpose3d``). Each output phase then sums
its taps' columns in a dense array and is stored into the output once.

It needs no compiled kernel, so runs whose layer is small use it and never load Numba:
loading Numba and its cached kernels costs more than such a run's arithmetic. The output
is computed in tiles of a few planes (and rows, when a plane's columns are large), each
from the columns of the inputs it reads.

Bits: every sum is elementwise NumPy in one fixed order (input channels in order, then
each output voxel's taps in (kD, kH, kW) order after its bias), never a BLAS reduction
whose order could follow the array shapes, so any block of the output, along any axis,
gets the same bits as the whole run.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

#: Columns computed at once, those of one tile of outputs (a few planes or rows): half
#: of the output, so that a small run under a tight --max-memory stays small, within
#: these bounds. From a few MiB on NumPy's per-call cost (one call per phase and tap of a
#: tile) is a small share of a tile's work.
TILE_BYTES_MIN = 16 * 1024
TILE_BYTES_MAX = 8 * 1024 * 1024


class ColumnsPlan(NamedTuple):
    """A layer's weights as one matrix per group and its taps' reach.

    Attributes
    ----------
    w_mat : ndarray, (G, Cin_g, Cout_g * kD * kH * kW)
    kernel_size, stride, offsets
        Per axis; ``offsets[a][t]`` is ``t * dilation - padding`` for tap ``t``.
    """

    w_mat: np.ndarray
    kernel_size: tuple
    stride: tuple
    offsets: tuple


def plan(weight, params):
    """The :class:`ColumnsPlan` of a layer (``weight`` in the grouped canonical layout)."""
    groups, cin_g = weight.shape[:2]
    w_mat = np.ascontiguousarray(weight.reshape(groups, cin_g, -1))
    k = tuple(params.kernel_size)
    offsets = tuple(tuple(t * d - p for t in range(kk))
                    for kk, d, p in zip(k, params.dilation, params.padding))
    return ColumnsPlan(w_mat, k, tuple(params.stride), offsets)


def _phase_reach(offset, stride, first, n_in, in_lo, count):
    """For the outputs ``first + stride * j`` (``j < count``) of one phase and one tap of that
    phase: the first ``j`` it reaches and its inputs ``[i0, i1)`` within ``[in_lo, n_in)``
    (input ``i`` feeds output ``i * stride + offset``)."""
    base = (first - offset) // stride          # the input of output j = 0 (exact: same phase)
    i0 = max(in_lo, base)
    i1 = min(n_in, base + count)
    return i0 - base, i0, max(i0, i1)


def _axis_phases(offsets, stride, out_lo, out_hi, in_lo, in_hi):
    """The phases of outputs ``[out_lo, out_hi)`` along one axis: ``(r, count, taps)`` with the
    phase's outputs ``out_lo + r + stride * j`` (``j < count``) and, per tap of that phase,
    ``(tap, j0, i0, i1)`` from :func:`_phase_reach` for inputs ``[in_lo, in_hi)``."""
    phases = []
    for r in range(min(stride, out_hi - out_lo)):
        first = out_lo + r
        count = len(range(first, out_hi, stride))
        taps = [(t, *_phase_reach(off, stride, first, in_hi, in_lo, count))
                for t, off in enumerate(offsets) if (off - first) % stride == 0]
        phases.append((r, count, taps))
    return phases


def _reach(offsets):
    """How far an axis' taps reach beyond an output's own position (``(k-1) * dilation``)."""
    return offsets[-1] - offsets[0]


def _inputs_for(count, offsets, stride):
    """Most inputs ``count`` consecutive outputs read along one axis."""
    return (count - 1 + _reach(offsets)) // stride + 1


def _outputs_for(inputs, offsets, stride, n_out):
    """Most consecutive outputs (at least 1, at most ``n_out``) that read at most ``inputs``."""
    return int(max(1, min(n_out, (inputs - 1) * stride - _reach(offsets) + 1)))


def tile_shape(plan_, input_shape, itemsize, output_shape):
    """Output planes and rows of one tile: the columns of its inputs (and with several input
    channels, one channel's products) within half the output's bytes, between
    :data:`TILE_BYTES_MIN` and :data:`TILE_BYTES_MAX`.

    Whole planes when several input planes' columns fit; otherwise, of the tiles of at
    most four strides of planes, the one that computes the fewest columns per output (the
    inputs a tile shares with its neighbours are computed again there). At least one plane
    and one row, whatever the budget.
    """
    n, _, _, n_ih, n_iw = input_shape
    n_out_d, n_out_h = output_shape[2:4]
    s, offsets = plan_.stride, plan_.offsets
    budget = min(TILE_BYTES_MAX, max(TILE_BYTES_MIN, int(np.prod(output_shape)) * itemsize // 2))
    if plan_.w_mat.shape[1] > 1:
        budget //= 2
    row = max(1, n * plan_.w_mat.shape[0] * plan_.w_mat.shape[2] * n_iw * itemsize)  # one input row's columns
    rows = max(1, budget // row)
    if rows // n_ih >= _inputs_for(min(n_out_d, 4 * s[0]), offsets[0], s[0]):
        return _outputs_for(rows // n_ih, offsets[0], s[0], n_out_d), n_out_h
    best, shape = None, (1, 1)
    for t_d in range(1, min(n_out_d, 4 * s[0]) + 1):
        in_d = _inputs_for(t_d, offsets[0], s[0])
        if rows < in_d:
            break
        t_h = _outputs_for(rows // in_d, offsets[1], s[1], n_out_h)
        cost = in_d * min(n_ih, _inputs_for(t_h, offsets[1], s[1])) / (t_d * t_h)
        if best is None or cost < best:
            best, shape = cost, (t_d, t_h)
    return shape


def scratch_bytes(plan_, input_shape, itemsize, output_shape):
    """What :func:`run` allocates besides its output: one tile's columns, one input channel's
    products (with several channels) and one phase's sums."""
    n, cout = output_shape[:2]
    t_d, t_h = tile_shape(plan_, input_shape, itemsize, output_shape)
    s, offsets = plan_.stride, plan_.offsets
    columns = (n * plan_.w_mat.shape[0] * plan_.w_mat.shape[2] * _inputs_for(t_d, offsets[0], s[0])
               * min(input_shape[3], _inputs_for(t_h, offsets[1], s[1])) * input_shape[4])
    phase = n * cout * -(-t_d // s[0]) * -(-t_h // s[1]) * -(-output_shape[4] // s[2])
    products = columns if plan_.w_mat.shape[1] > 1 else 0
    return (columns + products + phase) * itemsize


def run(plan_, x_slab, in_start, n_id, bias, out_start, out_stop, out, progress=None):
    """Compute output planes ``[out_start, out_stop)`` into ``out`` (see ``PreparedLayer.run_slab``).

    Parameters
    ----------
    plan_ : ColumnsPlan
    x_slab : ndarray, (N, Cin, d, H, W)
        Input planes ``[in_start, in_start + d)``.
    n_id : int
        Input planes of the whole volume.
    bias : ndarray, (Cout,)
    out : ndarray, (N, Cout, out_stop - out_start, Hout, Wout)
    progress : callable(int), optional
        Called with the output planes (N * D) finished, about 50 times.
    """
    n, _, _, n_ih, n_iw = x_slab.shape
    n_oh, n_ow = out.shape[3:]
    groups, cin_g, m = plan_.w_mat.shape
    cout_g = out.shape[1] // groups
    k, s, offsets = plan_.kernel_size, plan_.stride, plan_.offsets
    out6 = out.reshape((n, groups, cout_g) + out.shape[2:])
    bias6 = bias.reshape(1, groups, cout_g, 1, 1, 1)
    weights = [plan_.w_mat[:, ci].reshape(1, groups, m, 1, 1, 1) for ci in range(cin_g)]
    x7 = x_slab.reshape((n, groups, cin_g) + x_slab.shape[2:])
    w_phases = _axis_phases(offsets[2], s[2], 0, n_ow, 0, n_iw)
    scratch = np.empty(scratch_bytes(plan_, x_slab.shape, x_slab.itemsize, out.shape) // x_slab.itemsize,
                       dtype=out.dtype)
    n_out = out_stop - out_start
    tile_d, tile_h = tile_shape(plan_, x_slab.shape, x_slab.itemsize, out.shape)
    if progress:
        tile_d = min(tile_d, -(-n_out // 50))  # about 50 progress steps; the bits do not depend on it
    for o0 in range(out_start, out_stop, tile_d):
        o1 = min(out_stop, o0 + tile_d)
        q0 = max(0, -((offsets[0][-1] - o0) // s[0]))
        q1 = min(n_id, (o1 - 1 - offsets[0][0]) // s[0] + 1)
        for r0 in range(0, n_oh, tile_h):
            r1 = min(n_oh, r0 + tile_h)
            target = out6[:, :, :, o0 - out_start:o1 - out_start, r0:r1]
            h0 = max(0, -((offsets[1][-1] - r0) // s[1]))
            h1 = min(n_ih, (r1 - 1 - offsets[1][0]) // s[1] + 1)
            if q1 <= q0 or h1 <= h0:
                target[...] = bias6
                continue
            # The tile's columns: every input channel's products, summed in channel order.
            xs = x7[:, :, :, q0 - in_start:q1 - in_start, h0:h1]
            shape = (n, groups, m, q1 - q0, h1 - h0, n_iw)
            size = int(np.prod(shape))
            cols = scratch[:size].reshape(shape)
            np.multiply(weights[0], xs[:, :, 0, None], out=cols)
            if cin_g > 1:
                product = scratch[size:2 * size].reshape(shape)
                for ci in range(1, cin_g):
                    np.multiply(weights[ci], xs[:, :, ci, None], out=product)
                    cols += product
            cols = cols.reshape((n, groups, cout_g) + k + cols.shape[3:])
            # One output phase at a time: its taps summed in a dense array (unit-stride
            # additions), then stored into the strided phase once.
            for rd, n_d, d_taps in _axis_phases(offsets[0], s[0], o0, o1, q0, q1):
                for rh, n_h, h_taps in _axis_phases(offsets[1], s[1], r0, r1, h0, h1):
                    for rw, n_w, w_taps in w_phases:
                        acc = scratch[-n * out.shape[1] * n_d * n_h * n_w:].reshape(
                            (n, groups, cout_g, n_d, n_h, n_w))
                        acc[...] = bias6
                        for kd, jd, id0, id1 in d_taps:
                            for kh, jh, ih0, ih1 in h_taps:
                                for kw, jw, iw0, iw1 in w_taps:
                                    acc[:, :, :, jd:jd + id1 - id0, jh:jh + ih1 - ih0, jw:jw + iw1 - iw0] += (
                                        cols[:, :, :, kd, kh, kw, id0 - q0:id1 - q0, ih0 - h0:ih1 - h0, iw0:iw1])
                        target[:, :, :, rd::s[0], rh::s[1], rw::s[2]] = acc
        if progress:
            progress(n * (o1 - o0))
