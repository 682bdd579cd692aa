"""The ``col2im`` path: NumPy's BLAS for every layer, its taps summed by a compiled kernel.

Every input voxel feeds each tap of the kernel once: for one input plane of one group,
``Y = W (Cout_g * kD * kH * kW, Cin_g) @ X (Cin_g, H * W)`` holds everything the plane
adds to the output, one row per (output channel, tap). Each output is then its bias plus
the entries of ``Y`` its taps read (the col2im step of the GEMM formulation; the
``columns`` path does the same with NumPy's elementwise arithmetic, for small layers).
The product runs at the BLAS's rate, which NumPy's OpenBLAS picks per CPU: where the
compiled kernels' register blocks suit a CPU less well than OpenBLAS's, this path can
win, and the tuner measures it (``_tuner``). The sum reads each entry of ``Y`` once.

Jobs. One job is a sample, a group, a block of output channels and a range of *owner*
planes: output plane ``o`` belongs to input plane ``min(n_id - 1, (o + pD) // sD)``, the
last it can read, so once a job has the products of its owner plane and the ``h``
before it (``h = (kD - 1) * dD // sD``) it sums that plane's outputs. A job keeps the
products of ``h + 1`` planes in a ring and computes each once (its first owner plane's
``h`` predecessors again); the jobs run on the run's threads side by side, BLAS on one
thread each (see ``_gemm`` for why).

Rows. The product runs on input planes whose rows are padded with zeros to a
``pitch``, so that the sum can treat a whole phase plane as one flat run: a tap whose
W input falls off the row reads a zero product there, and the rows a tap reaches past
the H extent are left out of its run. That reads ``0 * w`` where the layer has no tap,
so layers with non-finite weights do not take this path (``fits``).

Bits. A product's shape is set by the layer alone (the channel block, ``Cin_g`` and the
padded plane), BLAS runs on one thread, and each output sums its taps in one fixed
order after its bias, so any slab, any window along D and any thread count give the
same bits as a whole run. Along H and W the padded plane's shape would change:
``PreparedLayer.block_axes`` keeps such layers whole there.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import numpy as np

from . import _gemm, _plan

#: One product (a channel block's rows times a padded input plane) stays near this size
#: (at least one output channel): large enough for BLAS to run near its best rate on
#: planes of a few hundred columns, small enough that the ring of ``h + 1`` products stays
#: in the last-level cache for the sum.
PRODUCT_BYTES = 1 << 20
#: Input channels per group from which the tuner measures this path: the products' inner
#: dimension. With 16 NumPy's single-threaded sgemm ran at about half its best rate on the
#: Zen 3 VM (45-48 against 85 GFLOP/s; 56-60 with 32, 80-85 from 64 on).
MIN_IN_CHANNELS = 32
#: Jobs wanted per thread, at least (ranges of owner planes are split further for them).
JOBS_PER_THREAD = 2


class Col2imPlan(NamedTuple):
    """How the ``col2im`` path runs a layer: its tables and the products' shape.

    Attributes
    ----------
    channels : int
        Output channels per product (the last block of a group may hold fewer).
    halo : int
        Input planes before its owner plane an output plane can read (``h``).
    pitch : int
        Columns of a padded input row (``W`` plus zeros).
    guard : int
        Zeros before and after each product in the ring (a flat run of the first or last
        row may reach that far past it).
    h_tables, w_tables : tuple of ndarrays
        Per H phase ``(first, count, taps, kernel, shift, lo, hi)`` (rows ``lo .. hi - 1``
        of the phase read input row ``q + shift``); per W phase ``(first, count, taps,
        kernel, shift)``.
    """

    channels: int
    halo: int
    pitch: int
    guard: int
    h_tables: tuple
    w_tables: tuple


def fits(weight):
    """Whether the path can run a layer with these weights: all finite (see the module)."""
    return bool(np.isfinite(weight).all())


def _phase_tables(n_out, n_in, k, s, p, d):
    """One axis's phases as arrays: first output, count, taps, kernel index and input shift
    of each tap, and the phase positions ``[lo, hi)`` whose input is inside ``[0, n_in)``."""
    phases = _plan.axis_phases(n_out, k, s, p, d)
    width = max(1, max(len(ph.kernel) for ph in phases))
    first = np.array([ph.first for ph in phases], dtype=np.int64)
    count = np.array([ph.count for ph in phases], dtype=np.int64)
    taps = np.array([len(ph.kernel) for ph in phases], dtype=np.int64)
    kernel = np.zeros((s, width), dtype=np.int64)
    shift = np.zeros((s, width), dtype=np.int64)
    lo = np.zeros((s, width), dtype=np.int64)
    hi = np.zeros((s, width), dtype=np.int64)
    for r, ph in enumerate(phases):
        for j, (kj, sj) in enumerate(zip(ph.kernel, ph.shift)):
            kernel[r, j], shift[r, j] = kj, sj
            lo[r, j] = min(ph.count, max(0, -sj))
            hi[r, j] = max(lo[r, j], min(ph.count, n_in - sj))
    return first, count, taps, kernel, shift, lo, hi


def plan(weight_shape, params, input_spatial, output_spatial, itemsize):
    """The :class:`Col2imPlan` of a layer.

    Parameters
    ----------
    weight_shape : tuple
        ``(G, Cin_g, Cout_g, kD, kH, kW)``.
    params : geometry.LayerParams
    input_spatial, output_spatial : tuple
        ``(D, H, W)`` of the whole input and output.
    itemsize : int
    """
    cout_g = weight_shape[2]
    k, s, p, d = params.kernel_size, params.stride, params.padding, params.dilation
    n_ih, n_iw = input_spatial[1:]
    h_tables = _phase_tables(output_spatial[1], n_ih, k[1], s[1], p[1], d[1])
    w_tables = _phase_tables(output_spatial[2], n_iw, k[2], s[2], p[2], d[2])
    count, taps, shift = w_tables[1], w_tables[2], w_tables[4]
    reach_before = reach_after = 0
    for r in range(s[2]):
        for j in range(taps[r]):
            reach_before = max(reach_before, -int(shift[r, j]))
            reach_after = max(reach_after, int(count[r]) - 1 + int(shift[r, j]) - (n_iw - 1))
    # Reads past a row's end land on its own zeros, reads before its start on the zeros
    # that end the row before: both need as many zero columns.
    pitch = n_iw + max(reach_before, reach_after)
    taps_all = int(np.prod(k))
    most = int(max(1, min(cout_g, PRODUCT_BYTES // max(1, taps_all * n_ih * pitch * itemsize))))
    channels = -(-cout_g // -(-cout_g // most))   # blocks of even size
    guard = pitch + max(reach_before, reach_after) + 1
    halo = (k[0] - 1) * d[0] // s[0]
    return Col2imPlan(channels, halo, pitch, guard, h_tables, w_tables)


def _sums_shape(col_plan):
    """Shape of one output plane's phase sums: H phases x W phases x padded phase rows."""
    h_count = col_plan.h_tables[1]
    return len(h_count), len(col_plan.w_tables[1]), int(max(1, h_count.max(initial=1))) * col_plan.pitch


def scratch_bytes(col_plan, cin_g, kernel_size, input_spatial, itemsize, threads):
    """What a run allocates besides its output: per thread, the ring of products, a padded
    input plane and the phase sums of one output plane."""
    taps = int(np.prod(kernel_size))
    n_ih = input_spatial[1]
    ring = (col_plan.halo + 1) * (col_plan.channels * taps * n_ih * col_plan.pitch + 2 * col_plan.guard)
    padded = cin_g * n_ih * col_plan.pitch
    return threads * (ring + padded + int(np.prod(_sums_shape(col_plan)))) * itemsize


def owner(o, n_id, params):
    """The input plane whose product completes output plane ``o``'s inputs."""
    return int(min(n_id - 1, max(0, (o + params.padding[0]) // params.stride[0])))


def run(col_plan, weight, bias, params, x_slab, in_start, n_id, out_start, out_stop, out, threads, summer,
        progress=None):
    """Compute output planes ``[out_start, out_stop)`` of a layer into ``out``.

    Parameters
    ----------
    col_plan : Col2imPlan
    weight : ndarray, (G, Cin_g, Cout_g, kD, kH, kW)
    bias : ndarray, (G * Cout_g,)
    params : geometry.LayerParams
    x_slab : ndarray, (N, G * Cin_g, d, H, W)
        Input planes ``[in_start, in_start + d)`` of the ``n_id`` of the layer.
    out : ndarray, (N, G * Cout_g, out_stop - out_start, H', W')
    threads : int
    summer : callable
        ``_kernels.col2im_sum``.
    progress : callable(int), optional
        Called with the number of output planes (N * D) finished since the last call.
    """
    if out_stop <= out_start:
        return
    groups, cin_g, cout_g = weight.shape[:3]
    k = weight.shape[3:]
    taps = int(np.prod(k))
    n_batch, _, n_slab, n_ih, n_iw = x_slab.shape
    n_co, halo, pitch, guard = col_plan.channels, col_plan.halo, col_plan.pitch, col_plan.guard
    ring_len = halo + 1
    weight_t = weight.reshape(groups, cin_g, cout_g * taps).transpose(0, 2, 1)  # a view: BLAS transposes it
    d_count, d_taps, d_inputs = _plan.gather_table(out_start, out_stop, n_id, k[0], params.stride[0],
                                                   params.padding[0], params.dilation[0])
    owners = np.array([owner(o, n_id, params) for o in range(out_start, out_stop)], dtype=np.int64)
    q_lo, q_hi = int(owners[0]), int(owners[-1]) + 1
    # Owner ranges: enough jobs for the threads, each range paying its halo once.
    outer = n_batch * groups * -(-cout_g // n_co)
    n_ranges = max(1, min(q_hi - q_lo, -(-JOBS_PER_THREAD * threads // outer)))
    bounds = [q_lo + (q_hi - q_lo) * r // n_ranges for r in range(n_ranges + 1)]
    jobs = [(n, g, co0, bounds[r], bounds[r + 1]) for r in range(n_ranges) if bounds[r + 1] > bounds[r]
            for n in range(n_batch) for g in range(groups) for co0 in range(0, cout_g, n_co)]
    first_plane = np.searchsorted(owners, np.arange(q_lo, q_hi + 1), side="left")
    scratch = {}
    h_tables, w_tables = col_plan.h_tables, col_plan.w_tables

    def buffers(rows):
        """This thread's ring, padded plane and sums for products of ``rows`` rows."""
        key = (threading.get_ident(), rows)
        if key not in scratch:
            ring = np.zeros((ring_len, 2 * guard + rows * n_ih * pitch), dtype=out.dtype)
            padded = np.zeros((cin_g, n_ih, pitch), dtype=out.dtype) if pitch > n_iw else None
            sums = np.empty(_sums_shape(col_plan), dtype=out.dtype)
            scratch[key] = ring, padded, sums
        return scratch[key]

    def job(n, g, co0, a, b):
        co1 = min(cout_g, co0 + n_co)
        rows = (co1 - co0) * taps
        ring, padded, sums = buffers(rows)
        w_rows = weight_t[g, co0 * taps:co1 * taps]
        for i in range(a - halo, b):
            if 0 <= i < n_id and in_start <= i < in_start + n_slab:
                plane = x_slab[n, g * cin_g:(g + 1) * cin_g, i - in_start]
                if padded is not None:
                    padded[:, :, :n_iw] = plane
                    plane = padded
                product = ring[i % ring_len, guard:guard + rows * n_ih * pitch].reshape(rows, n_ih * pitch)
                np.matmul(w_rows, plane.reshape(cin_g, n_ih * pitch), out=product)
            if i < a:
                continue
            for j in range(first_plane[i - q_lo], first_plane[i - q_lo + 1]):
                summer(ring, ring_len, guard, bias, out, n, g * cout_g + co0, co1 - co0, j, d_count[j], d_taps[j],
                       d_inputs[j], *h_tables, *w_tables, k[0], k[1], k[2], n_ih * pitch, pitch, sums)

    share = 1.0 / (groups * -(-cout_g // n_co))   # of its planes' outputs, per sample

    def done(index):
        if progress:
            a, b = jobs[index][3:]
            progress(share * (first_plane[b - q_lo] - first_plane[a - q_lo]))

    macs = n_batch * groups * cout_g * taps * cin_g * (q_hi - q_lo) * n_ih * pitch
    _gemm.run_jobs(jobs, job, threads, done, macs)
