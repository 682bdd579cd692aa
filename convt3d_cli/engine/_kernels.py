"""Numba kernels. They take checked, contiguous arrays and index tables from
``_plan`` and do no validation or I/O.

Every kernel is output-stationary: each parallel iteration owns a disjoint set
of output rows, so ``prange`` needs no atomics and results do not depend on the
thread count. ``im2col`` and ``scatter_phases`` are serial and release the GIL:
the GEMM path runs whole tiles (im2col, BLAS, scatter) on its own worker
threads, because nesting Numba's OpenMP pool with BLAS threads makes both spin
against each other. Input slabs are addressed with ``in_start`` (the global index of
their first plane along D) so the same kernels serve whole volumes and
streamed slabs.
"""

import numpy as np
from numba import njit, prange

_JIT = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)


@njit(parallel=True, **_JIT)
def direct_gather(x, w, bias, out, d_count, d_taps, d_inputs, h_count, h_taps, h_inputs,
                  w_first, w_nq, w_ntaps, w_kernel, w_shift, stride_w, in_start):
    """Few-channel path: per output row, accumulate each W-phase contiguously.

    x : (N, Cin, Dslab, H, W); w : (G, Cin/G, Cout/G, kD, kH, kW); bias : (Cout,)
    out : (N, Cout, Dout_slab, Hout, Wout); D/H tables index the output slab rows.
    """
    n_batch, c_out, n_od, n_oh, _ = out.shape
    cin_g = w.shape[1]
    cout_g = w.shape[2]
    n_iw = x.shape[4]
    n_phase = w_nq.shape[0]
    nq_max = 1
    for r in range(n_phase):
        nq_max = max(nq_max, w_nq[r])
    for job in prange(n_batch * c_out * n_od):
        od = job % n_od
        plane = job // n_od
        co = plane % c_out
        n = plane // c_out
        g = co // cout_g
        co_g = co - g * cout_g
        b = bias[co]
        acc = np.empty(nq_max, dtype=out.dtype)
        for oh in range(n_oh):
            out_row = out[n, co, od, oh]
            for r in range(n_phase):
                nq = w_nq[r]
                if nq == 0:
                    continue
                acc[:nq] = b
                for a in range(d_count[od]):
                    kd = d_taps[od, a]
                    id_local = d_inputs[od, a] - in_start
                    for bb in range(h_count[oh]):
                        kh = h_taps[oh, bb]
                        ih = h_inputs[oh, bb]
                        for ci in range(cin_g):
                            x_row = x[n, g * cin_g + ci, id_local, ih]
                            for j in range(w_ntaps[r]):
                                wv = w[g, ci, co_g, kd, kh, w_kernel[r, j]]
                                c = w_shift[r, j]
                                lo = max(0, -c)
                                hi = min(nq, n_iw - c)
                                if hi <= lo:
                                    continue
                                # Slices first, then a 0-based counter: Numba can prove the
                                # index non-negative, drops wraparound checks and vectorises.
                                dst = acc[lo:hi]
                                src = x_row[lo + c:hi + c]
                                for t in range(hi - lo):
                                    dst[t] += wv * src[t]
                dst_row = out_row[w_first[r]::stride_w]
                for t in range(nq):
                    dst_row[t] = acc[t]


@njit(**_JIT)
def im2col(x, cols, shift_d, shift_h, shift_w, q0_d, n_qd, n_qh, n_qw, n_id, in_start):
    """Columns of the shifted inputs one phase group reads, zero outside the volume.

    x : (Cin_g, Dslab, H, W) one sample, one group; n_id is the global D size.
    cols : (Cin_g * Td * Th * Tw, >= n_qd * n_qh * n_qw), row = (ci, jd, jh, jw).
    """
    cin_g = x.shape[0]
    n_slab = x.shape[1]
    n_ih = x.shape[2]
    n_iw = x.shape[3]
    td = shift_d.shape[0]
    th = shift_h.shape[0]
    tw = shift_w.shape[0]
    n_rows = cin_g * td * th * tw
    plane = n_qh * n_qw
    for job in range(n_rows * n_qd):
        row = job // n_qd
        a = job - row * n_qd
        jw = row % tw
        rest = row // tw
        jh = rest % th
        rest = rest // th
        jd = rest % td
        ci = rest // td
        col_row = cols[row]
        base = a * plane
        id_global = q0_d + a + shift_d[jd]
        id_local = id_global - in_start
        # Outside the volume the columns are zero padding; outside the slab they belong to
        # grid planes this slab does not output (tiles are fixed per layer), so any value works.
        if id_global < 0 or id_global >= n_id or id_local < 0 or id_local >= n_slab:
            col_row[base:base + plane] = 0
            continue
        c = shift_w[jw]
        lo = min(n_qw, max(0, -c))
        hi = max(lo, min(n_qw, n_iw - c))
        for qh in range(n_qh):
            seg = base + qh * n_qw
            ih = qh + shift_h[jh]
            if ih < 0 or ih >= n_ih:
                col_row[seg:seg + n_qw] = 0
                continue
            col_row[seg:seg + lo] = 0
            col_row[seg + lo:seg + hi] = x[ci, id_local, ih, lo + c:hi + c]
            col_row[seg + hi:seg + n_qw] = 0


@njit(**_JIT)
def scatter_phases(res, out, bias, first_d, first_h, first_w, lo_d, hi_d, count_h, count_w,
                   delta_d, off_h, off_w, stride_d, stride_h, stride_w, u0_d, n_ud, n_qh, n_qw, out_start):
    """Write GEMM results (+ bias) to their phase positions in the output slab.

    res : (P * Cout_g, >= n_ud * n_qh * n_qw), row = (phase, co), column = grid (u_d, u_h, u_w);
    out : (Cout_g, Dout_slab, Hout, Wout). Phase ``p`` owns outputs ``first + q * stride``; its
    ``q`` sits at grid ``u_d = q + delta_d[p]`` and grid columns ``q + off_h[p]``, ``q + off_w[p]``.
    Only ``q_d`` in ``[lo_d, hi_d)`` belong to this slab.
    """
    n_phase = first_d.shape[0]
    cout_g = out.shape[0]
    plane = n_qh * n_qw
    for job in range(n_phase * cout_g * n_ud):
        a = job % n_ud
        rest = job // n_ud
        co = rest % cout_g
        p = rest // cout_g
        qd = u0_d + a - delta_d[p]
        if qd < lo_d[p] or qd >= hi_d[p]:
            continue
        od = first_d[p] + qd * stride_d - out_start
        b = bias[co]
        res_row = res[p * cout_g + co]
        fw = first_w[p]
        nw = count_w[p]
        for qh in range(count_h[p]):
            dst = out[co, od, first_h[p] + qh * stride_h, fw::stride_w]
            start = a * plane + (qh + off_h[p]) * n_qw + off_w[p]
            src = res_row[start:start + nw]
            for t in range(nw):
                dst[t] = src[t] + b
