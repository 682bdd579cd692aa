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
def direct_fir(x, w, bias, out, d_count, d_taps, d_inputs, h_count, h_taps, h_inputs,
               w_kidx, stride_w, pad_w, in_start, chunk):
    """Few-channel path: unit-stride FIR rows over repeat-upsampled input rows.

    x : (N, Cin, Dslab, H, W); w : (G, Cin/G, Cout/G, kD, kH, kW); bias : (Cout,)
    out : (N, Cout, Dout_slab, Hout, Wout); D/H tables index the output slab rows
    (global input indices); ``w_kidx`` comes from ``_plan.fir_taps``.

    Along W, output ``o`` reads ``rep[o - m * s]`` for windows ``m`` where ``rep``
    is the input row repeated ``s`` times, with a per-position coefficient (zero
    where no tap lands). Every access is then unit-stride and vectorises, with
    no strided scatter of phases. One job is a chunk of consecutive output planes
    of one channel: it builds the repeated rows of the input planes it reads once.
    """
    n_batch, c_out, n_od, n_oh, n_ow = out.shape
    cin_g = w.shape[1]
    cout_g = w.shape[2]
    k_d = w.shape[3]
    k_h = w.shape[4]
    n_ih = x.shape[3]
    n_iw = x.shape[4]
    n_win = w_kidx.shape[0]
    lead = (n_win - 1) * stride_w
    n_rep = lead + n_ow
    n_chunks = (n_od + chunk - 1) // chunk
    for job in prange(n_batch * c_out * n_chunks):
        ch = job % n_chunks
        plane = job // n_chunks
        co = plane % c_out
        n = plane // c_out
        g = co // cout_g
        co_g = co - g * cout_g
        b = bias[co]
        od0 = ch * chunk
        od1 = min(n_od, od0 + chunk)
        id_lo = x.shape[2] + in_start
        id_hi = -1
        for od in range(od0, od1):
            for a in range(d_count[od]):
                id_lo = min(id_lo, d_inputs[od, a])
                id_hi = max(id_hi, d_inputs[od, a])
        n_id = max(0, id_hi - id_lo + 1)
        rep = np.zeros((cin_g, n_id, n_ih, n_rep), dtype=out.dtype)
        for ci in range(cin_g):
            for di in range(n_id):
                id_local = id_lo + di - in_start
                for ih in range(n_ih):
                    x_row = x[n, g * cin_g + ci, id_local, ih]
                    r_row = rep[ci, di, ih]
                    # rep[i * s + off] = x[i] for each of the s copies: one strided copy per copy.
                    for jj in range(stride_w):
                        off = lead - pad_w + jj
                        i_lo = max(0, -(off // stride_w))
                        i_hi = min(n_iw, -((off - n_rep) // stride_w))
                        if i_hi <= i_lo:
                            continue
                        dst = r_row[off + i_lo * stride_w::stride_w]
                        src_x = x_row[i_lo:i_hi]
                        for i in range(i_hi - i_lo):
                            dst[i] = src_x[i]
        coef = np.zeros((cin_g, k_d, k_h, n_win, n_ow), dtype=out.dtype)
        for ci in range(cin_g):
            for kd in range(k_d):
                for kh in range(k_h):
                    for m in range(n_win):
                        c_row = coef[ci, kd, kh, m]
                        for t in range(n_ow):
                            kw = w_kidx[m, t]
                            if kw >= 0:
                                c_row[t] = w[g, ci, co_g, kd, kh, kw]
        # Each output row is a sum of (coefficient row x shifted repeated row) terms; applying
        # them four at a time cuts loop overhead and output-row traffic fourfold.
        rep2 = rep.reshape((cin_g * n_id * n_ih, n_rep))
        coef2 = coef.reshape((cin_g * k_d * k_h * n_win, n_ow))
        max_terms = d_taps.shape[1] * h_taps.shape[1] * cin_g * n_win
        t_rep = np.empty(max_terms, dtype=np.int64)
        t_coef = np.empty(max_terms, dtype=np.int64)
        t_start = np.empty(max_terms, dtype=np.int64)
        for od in range(od0, od1):
            for oh in range(n_oh):
                nt = 0
                for a in range(d_count[od]):
                    kd = d_taps[od, a]
                    di = d_inputs[od, a] - id_lo
                    for bb in range(h_count[oh]):
                        kh = h_taps[oh, bb]
                        ih = h_inputs[oh, bb]
                        for ci in range(cin_g):
                            for m in range(n_win):
                                t_rep[nt] = (ci * n_id + di) * n_ih + ih
                                t_coef[nt] = ((ci * k_d + kd) * k_h + kh) * n_win + m
                                t_start[nt] = lead - m * stride_w
                                nt += 1
                out_row = out[n, co, od, oh]
                for t in range(n_ow):
                    out_row[t] = b
                j = 0
                while j + 4 <= nt:
                    c0 = coef2[t_coef[j]]
                    c1 = coef2[t_coef[j + 1]]
                    c2 = coef2[t_coef[j + 2]]
                    c3 = coef2[t_coef[j + 3]]
                    s0 = rep2[t_rep[j], t_start[j]:t_start[j] + n_ow]
                    s1 = rep2[t_rep[j + 1], t_start[j + 1]:t_start[j + 1] + n_ow]
                    s2 = rep2[t_rep[j + 2], t_start[j + 2]:t_start[j + 2] + n_ow]
                    s3 = rep2[t_rep[j + 3], t_start[j + 3]:t_start[j + 3] + n_ow]
                    for t in range(n_ow):
                        out_row[t] += (c0[t] * s0[t] + c1[t] * s1[t]) + (c2[t] * s2[t] + c3[t] * s3[t])
                    j += 4
                while j < nt:
                    c0 = coef2[t_coef[j]]
                    s0 = rep2[t_rep[j], t_start[j]:t_start[j] + n_ow]
                    for t in range(n_ow):
                        out_row[t] += c0[t] * s0[t]
                    j += 1


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
