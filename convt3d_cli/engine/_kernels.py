"""Numba kernels. They take checked, contiguous arrays and index tables from
``_plan`` and do no validation or I/O.

Every kernel is output-stationary: each job owns a disjoint set of output rows,
so jobs need no atomics on the outputs, and every output is summed in an order
fixed by the layer alone, so results do not depend on the thread count, on
which thread ran a job or on how the volume is cut into slabs. Input slabs are
addressed with ``in_start`` (the global index of their first plane along D) so
the same kernels serve whole volumes and streamed slabs.

The parallel kernels hand out their jobs at run time (``_job_claims``,
``_claim``): each of the run's ``workers`` threads takes the jobs of its own
contiguous share first, then the jobs left in the other shares. ``prange``
alone splits the iterations into equal fixed shares, and the run lasts as long
as its slowest share: a thread that wakes late or shares its core with other
work holds the others up.
"""

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from ._plan import REGISTER_BLOCKS, WIDE_VECTOR_BLOCKS

_JIT = dict(cache=True, fastmath=True, error_model="numpy", nogil=True)
#: Bytes one ``_store_pairs`` writes: a 512-bit vector (two 256-bit or four 128-bit ones
#: where the CPU has no wider registers).
PAIR_BYTES = 64


@intrinsic
def _fetch_add(typingctx, counters, i):
    """``counters[i] += 1`` as one atomic step; returns the value before it."""
    if not (isinstance(counters, types.Array) and counters.dtype == types.int64
            and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        index = context.cast(builder, args[1], sig.args[1], types.intp)
        one = context.get_constant(types.int64, 1)
        return builder.atomic_rmw("add", builder.gep(array.data, [index]), one, "monotonic")
    return types.int64(counters, i), codegen


def _pairs_codegen(add):
    """The code of ``_store_pairs`` (``add``: with a value added to every element)."""
    def codegen(context, builder, sig, args):
        element = context.get_value_type(sig.args[0].dtype)
        size = context.get_abi_sizeof(element)
        lanes = PAIR_BYTES // size
        half = ir.VectorType(element, lanes // 2)

        def address(k):
            array = context.make_array(sig.args[k])(context, builder, args[k])
            return builder.gep(array.data, [context.cast(builder, args[k + 1], sig.args[k + 1], types.intp)])

        first = builder.load(builder.bitcast(address(2), half.as_pointer()), align=size)
        second = builder.load(builder.bitcast(address(4), half.as_pointer()), align=size)
        if add:
            value = context.cast(builder, args[6], sig.args[6], sig.args[0].dtype)
            splat = builder.insert_element(ir.Constant(half, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            splat = builder.shuffle_vector(splat, ir.Constant(half, ir.Undefined),
                                           ir.Constant(ir.VectorType(ir.IntType(32), lanes // 2), [0] * (lanes // 2)))
            first = builder.fadd(first, splat)
            second = builder.fadd(second, splat)
        order = [i // 2 + (lanes // 2) * (i % 2) for i in range(lanes)]
        pairs = builder.shuffle_vector(first, second, ir.Constant(ir.VectorType(ir.IntType(32), lanes), order))
        builder.store(pairs, builder.bitcast(address(0), ir.VectorType(element, lanes).as_pointer()), align=size)
        return context.get_dummy_value()
    return codegen


def _pairs_arguments(dst, dst_index, a, a_index, b, b_index):
    return (all(isinstance(v, types.Array) and v.ndim == 1 for v in (dst, a, b))
            and dst.dtype == a.dtype == b.dtype and isinstance(dst.dtype, types.Float)
            and all(isinstance(i, types.Integer) for i in (dst_index, a_index, b_index)))


@intrinsic
def _store_pairs(typingctx, dst, dst_index, a, a_index, b, b_index):
    """``dst[dst_index + 2t] = a[a_index + t]`` and ``dst[dst_index + 2t + 1] = b[b_index + t]``
    for the ``PAIR_BYTES`` of ``dst`` from ``dst_index``: two vector loads interleaved in
    registers and one vector store. The three arrays must have unit strides (``_interleave``
    checks); nothing is bounds-checked."""
    if not _pairs_arguments(dst, dst_index, a, a_index, b, b_index):
        return None
    return types.none(dst, dst_index, a, a_index, b, b_index), _pairs_codegen(False)


@intrinsic
def _store_pairs_plus(typingctx, dst, dst_index, a, a_index, b, b_index, value):
    """``_store_pairs`` with ``value`` added to every element."""
    if not (_pairs_arguments(dst, dst_index, a, a_index, b, b_index) and isinstance(value, types.Float)):
        return None
    return types.none(dst, dst_index, a, a_index, b, b_index, value), _pairs_codegen(True)


@njit(inline="always", **_JIT)
def _interleave(dst, a, b, count):
    """``dst[2t] = a[t]`` and ``dst[2t + 1] = b[t]`` for ``t < count``: the stride-2 store
    of two W phases. Whole vectors go through ``_store_pairs``: LLVM vectorises such a loop
    only when it runs for several vector widths, and output rows are often shorter."""
    t = 0
    if dst.strides[0] == dst.itemsize and a.strides[0] == a.itemsize and b.strides[0] == b.itemsize:
        pairs = PAIR_BYTES // (2 * dst.itemsize)
        while t + pairs <= count:
            _store_pairs(dst, 2 * t, a, t, b, t)
            t += pairs
    for u in range(t, count):
        dst[2 * u] = a[u]
        dst[2 * u + 1] = b[u]


@njit(inline="always", **_JIT)
def _interleave_plus(dst, a, b, count, value):
    """``_interleave`` with ``value`` added to every element."""
    t = 0
    if dst.strides[0] == dst.itemsize and a.strides[0] == a.itemsize and b.strides[0] == b.itemsize:
        pairs = PAIR_BYTES // (2 * dst.itemsize)
        while t + pairs <= count:
            _store_pairs_plus(dst, 2 * t, a, t, b, t, value)
            t += pairs
    for u in range(t, count):
        dst[2 * u] = a[u] + value
        dst[2 * u + 1] = b[u] + value


@intrinsic
def _prefetch_for_write(typingctx, array, index):
    """Ask for the cache line of ``array.flat[index]`` ahead of a store to it (LLVM's
    ``prefetch``, write, keep in all levels). A hint: any address is safe."""
    if not (isinstance(array, types.Array) and isinstance(index, types.Integer)):
        return None

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        at = builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        # Named by llvmlite for its pointer kind (llvm.prefetch.p0i8 or .p0).
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p],
                                              ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.bitcast(at, i8p), ir.Constant(i32, 1), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()
    return types.none(array, index), codegen


@njit(inline="always", **_JIT)
def _prefetch_row(out, n, co0, n_co, od_local, oh, start, count):
    """``_prefetch_for_write`` the lines of ``out[n, co0:co0 + n_co, od_local, oh,
    start:start + count]`` (clipped to the row)."""
    stop = min(out.shape[4], start + count)
    if start >= stop:
        return
    line = 64 // out.itemsize
    for cb in range(n_co):
        row = out[n, co0 + cb, od_local, oh]
        for e in range(start, stop + line - 1, line):
            _prefetch_for_write(row, min(e, stop - 1))


@njit(**_JIT)
def _job_claims(n_jobs, workers):
    """The claim counters of ``n_jobs`` jobs on ``workers`` threads (one per worker, at most
    one per job): worker ``v``'s share is jobs ``[v * n_jobs // n, (v + 1) * n_jobs // n)``
    and its counter starts at the first of them (``_claim``)."""
    n_workers = max(0, min(workers, n_jobs))
    claims = np.empty(n_workers, dtype=np.int64)
    for v in range(n_workers):
        claims[v] = v * n_jobs // n_workers
    return claims


@njit(inline="always", **_JIT)
def _claim(claims, n_jobs, worker, victim):
    """The next job for ``worker``: the next unclaimed job of ``victim``'s share, else of the
    shares after it, up to (not including) the worker's own again.

    Returns ``(job, victim)``, the share it came from, to pass back on the next call;
    ``job`` is -1 when no job is left. A worker starts with ``victim = worker``, so it runs
    its own share in order (jobs next to each other read neighbouring inputs) and then
    helps with the rest. Each claim is one atomic increment: no job runs twice or not at all.
    """
    n_workers = claims.shape[0]
    worker = np.int64(worker)
    victim = np.int64(victim)
    while True:
        job = _fetch_add(claims, victim)
        if job < (victim + 1) * n_jobs // n_workers:
            return job, victim
        victim = (victim + 1) % n_workers
        if victim == worker:
            return np.int64(-1), victim


@njit(parallel=True, **_JIT)
def direct_fir(x, w, bias, out, d_count, d_taps, d_inputs, h_count, h_taps, h_inputs,
               w_kidx, stride_w, pad_w, in_start, chunk, n_od, plane0, workers):
    """Few-channel path: unit-stride FIR rows over repeat-upsampled input rows.

    x : (N, Cin, Dslab, H, W); w : (G, Cin/G, Cout/G, kD, kH, kW); bias : (Cout,)
    out : (N, Cout, Dout_slab, Hout, Wout); the ``n_od`` planes computed go to ``out``'s
    planes ``plane0 ..`` (the D tables index them from 0, with global input indices);
    ``w_kidx`` comes from ``_plan.fir_taps``; ``workers``: the run's thread count (the
    module's notes: jobs are claimed at run time).

    Along W, output ``o`` reads ``rep[o - m * s]`` for windows ``m`` where ``rep``
    is the input row repeated ``s`` times, with a per-position coefficient (zero
    where no tap lands). Every access is then unit-stride and vectorises, with
    no strided scatter of phases. One job is a chunk of consecutive output planes
    of one channel: it builds the repeated rows of the input planes it reads once.
    """
    n_batch, c_out, n_oh, n_ow = out.shape[0], out.shape[1], out.shape[3], out.shape[4]
    cin_g, cout_g, k_d, k_h = w.shape[1:5]
    n_ih = x.shape[3]
    n_iw = x.shape[4]
    n_win = w_kidx.shape[0]
    lead = (n_win - 1) * stride_w
    n_rep = lead + n_ow
    n_chunks = (n_od + chunk - 1) // chunk
    n_jobs = n_batch * c_out * n_chunks
    claims = _job_claims(n_jobs, workers)
    for worker in prange(claims.shape[0]):
        job, victim = _claim(claims, n_jobs, worker, worker)
        while job >= 0:
            ch, n, co, g, co_g = _channel_job(job, n_chunks, c_out, cout_g)
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
            # One extra all-zero row at the end: the padding terms read it (0 * 0, never 0 * inf).
            # The repeats below fill [copy_lo, copy_hi) of every row; only the rest is zeroed
            # (zeroing whole rows first cost a tenth of a one-channel layer).
            rep2 = np.empty((cin_g * n_id * n_ih + 1, n_rep), dtype=out.dtype)
            rep2[cin_g * n_id * n_ih] = 0
            copy_lo = min(n_rep, max(0, lead - pad_w))
            copy_hi = max(copy_lo, min(n_rep, lead - pad_w + n_iw * stride_w))
            rep = rep2[:cin_g * n_id * n_ih].reshape((cin_g, n_id, n_ih, n_rep))
            for ci in range(cin_g):
                for di in range(n_id):
                    id_local = id_lo + di - in_start
                    for ih in range(n_ih):
                        x_row = x[n, g * cin_g + ci, id_local, ih]
                        r_row = rep[ci, di, ih]
                        r_row[:copy_lo] = 0
                        r_row[copy_hi:] = 0
                        if stride_w == 2:
                            _repeat_row_twice(x_row, r_row, lead - pad_w)
                            continue
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
            # One extra all-zero coefficient row pads every row's term list to a multiple of four.
            coef = np.zeros((cin_g * k_d * k_h * n_win + 1, n_ow), dtype=out.dtype)
            zero_row = cin_g * k_d * k_h * n_win
            for ci in range(cin_g):
                for kd in range(k_d):
                    for kh in range(k_h):
                        for m in range(n_win):
                            c_row = coef[((ci * k_d + kd) * k_h + kh) * n_win + m]
                            for t in range(n_ow):
                                kw = w_kidx[m, t]
                                if kw >= 0:
                                    c_row[t] = w[g, ci, co_g, kd, kh, kw]
            # Each output row is a sum of (coefficient row x shifted repeated row) terms; applying
            # them four at a time, the first four together with the bias, cuts loop overhead and
            # output-row traffic.
            max_terms = d_taps.shape[1] * h_taps.shape[1] * cin_g * n_win + 4
            t_rep = np.zeros(max_terms, dtype=np.int64)
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
                    while nt % 4 or nt == 0:
                        t_rep[nt] = cin_g * n_id * n_ih
                        t_coef[nt] = zero_row
                        t_start[nt] = 0
                        nt += 1
                    out_row = out[n, co, plane0 + od, oh]
                    for j in range(0, nt, 4):
                        c0 = coef[t_coef[j]]
                        c1 = coef[t_coef[j + 1]]
                        c2 = coef[t_coef[j + 2]]
                        c3 = coef[t_coef[j + 3]]
                        s0 = rep2[t_rep[j], t_start[j]:t_start[j] + n_ow]
                        s1 = rep2[t_rep[j + 1], t_start[j + 1]:t_start[j + 1] + n_ow]
                        s2 = rep2[t_rep[j + 2], t_start[j + 2]:t_start[j + 2] + n_ow]
                        s3 = rep2[t_rep[j + 3], t_start[j + 3]:t_start[j + 3] + n_ow]
                        if j == 0:
                            for t in range(n_ow):
                                out_row[t] = b + ((c0[t] * s0[t] + c1[t] * s1[t]) + (c2[t] * s2[t] + c3[t] * s3[t]))
                        else:
                            for t in range(n_ow):
                                out_row[t] += (c0[t] * s0[t] + c1[t] * s1[t]) + (c2[t] * s2[t] + c3[t] * s3[t])
            job, victim = _claim(claims, n_jobs, worker, victim)


@njit(**_JIT)
def _channel_job(job, n_chunks, c_out, cout_g):
    """Decode a job of the per-channel kernels: ``(chunk, sample, channel, group, channel in group)``."""
    chunk = job % n_chunks
    plane = job // n_chunks
    co = plane % c_out
    g = co // cout_g
    return chunk, plane // c_out, co, g, co - g * cout_g


@njit(**_JIT)
def _repeat_row_twice(src, dst, off):
    """dst[2 i + off] = dst[2 i + off + 1] = src[i] where inside dst (the stride-2 repeat).

    The main run is one ``_interleave``; the two edge values are done one by one.
    """
    n_src = src.shape[0]
    n_dst = dst.shape[0]
    i_lo = min(n_src, max(0, (1 - off) // 2))              # 2 i + off >= 0
    i_hi = max(i_lo, min(n_src, (n_dst - 1 - off) // 2))  # 2 i + off + 1 <= n_dst - 1
    run = src[i_lo:i_hi]
    _interleave(dst[2 * i_lo + off:2 * i_hi + off], run, run, i_hi - i_lo)
    for i in (i_lo - 1, i_hi):
        if 0 <= i < n_src:
            for j in (2 * i + off, 2 * i + off + 1):
                if 0 <= j < n_dst:
                    dst[j] = src[i]


# Register block of ``blocked_phases``: CHANNEL_BLOCK output channels x POSITION_BLOCK
# consecutive outputs of one phase row. 8 x 16 float32 accumulators are 8 AVX-512 (16 AVX2)
# registers; each term then costs one vector load of inputs and 8 broadcast FMAs. The
# sub-pixel and shuffle kernels use the same channel block.
CHANNEL_BLOCK = 8
POSITION_BLOCK = 16



@njit(**_JIT)
def _job_block(job, x, dtype, groups, n_chunks, n_tiles, q_lo, q_hi, d_chunk, n_qh, h_tile, d_shift, n_dp,
               h_shift, n_hp, w_shift, n_wp, tail, in_start, n_id):
    """Decode a blocked-kernel job (sample, group, D chunk, H tile) and fill its input block.

    Returns ``n, g, q0, q1, qh0, qh1`` and the zero-padded block (``_fill_block``) with
    ``tail`` zeros after it, so that a position block can be read at any row offset.
    The ``n_chunks`` chunks split ``[q_lo, q_hi)`` evenly (none longer than ``d_chunk``):
    a slab whose positions run one past a multiple of ``d_chunk`` would otherwise have a
    chunk of one position, and a thread whose share of job numbers holds only such jobs
    would soon have to take over the others' long jobs, one at a time.
    """
    tile = job % n_tiles
    rest = job // n_tiles
    chunk = rest % n_chunks
    rest = rest // n_chunks
    g = rest % groups
    n = rest // groups
    q0 = q_lo + chunk * (q_hi - q_lo) // n_chunks
    q1 = q_lo + (chunk + 1) * (q_hi - q_lo) // n_chunks
    qh0 = tile * h_tile
    qh1 = min(n_qh, qh0 + h_tile)
    cin_g = x.shape[1] // groups
    n_xp = cin_g * n_dp * n_hp * n_wp + tail
    xp = np.empty(n_xp, dtype=dtype)
    xp[n_xp - tail:] = 0
    _fill_block(x, xp, n, g, cin_g, q0 + d_shift, n_dp, qh0 + h_shift, n_hp, w_shift, n_wp, in_start, n_id)
    return n, g, q0, q1, qh0, qh1, xp


@njit(**_JIT)
def _slab_positions(first_d, count_d, stride_d, out_start, n_od, n_id):
    """``(lo, hi)``: the D positions ``q`` of any phase whose output lies in the slab's
    planes ``[out_start, out_start + n_od)`` (phase ``r``'s output is ``first_d[r] + q * stride_d``);
    empty when ``hi <= lo``."""
    q_lo = n_id + 1
    q_hi = 0
    for r in range(stride_d):
        lo = max(0, (out_start - first_d[r] + stride_d - 1) // stride_d)
        hi = min(count_d[r], (out_start + n_od - first_d[r] + stride_d - 1) // stride_d)
        if hi > lo:
            q_lo = min(q_lo, lo)
            q_hi = max(q_hi, hi)
    return q_lo, q_hi


@njit(**_JIT)
def _fill_block(x, xp, n, g, cin_g, d0, n_dp, h0, n_hp, w0, n_wp, in_start, n_id):
    """Copy input planes ``d0 ..``, rows ``h0 ..``, columns ``w0 ..`` of group ``g`` into the
    zero-padded block ``xp`` (``cin_g x n_dp x n_hp x n_wp``), zeros outside the input.

    ``d0`` counts global planes; the slab ``x`` starts at plane ``in_start`` of ``n_id``.
    """
    n_slab, n_ih, n_iw = x.shape[2], x.shape[3], x.shape[4]
    c_lo = min(n_wp, max(0, -w0))
    c_hi = max(c_lo, min(n_wp, n_iw - w0))
    r_lo = min(n_hp, max(0, -h0))
    r_hi = max(r_lo, min(n_hp, n_ih - h0))
    for ci in range(cin_g):
        for pl in range(n_dp):
            plane = (ci * n_dp + pl) * n_hp
            id_global = d0 + pl
            id_local = id_global - in_start
            # Planes outside the slab only feed outputs of other slabs: zero is as good.
            if id_global < 0 or id_global >= n_id or id_local < 0 or id_local >= n_slab:
                xp[plane * n_wp:(plane + n_hp) * n_wp] = 0
                continue
            xp[plane * n_wp:(plane + r_lo) * n_wp] = 0
            xp[(plane + r_hi) * n_wp:(plane + n_hp) * n_wp] = 0
            src_plane = x[n, g * cin_g + ci, id_local]
            for r in range(r_lo, r_hi):
                row = (plane + r) * n_wp
                src = src_plane[h0 + r, c_lo + w0:c_hi + w0]
                dst = xp[row + c_lo:row + c_hi]
                # Slices first: indexing with c + shift (possibly negative to Numba) would add
                # a wraparound check per element and stop vectorisation.
                for c in range(c_hi - c_lo):
                    dst[c] = src[c]
                xp[row:row + c_lo] = 0
                xp[row + c_hi:row + n_wp] = 0


def blocked_kernel(channel_block, position_block, unsigned_index=True, wide_vectors=False):
    """``blocked_phases`` compiled for one register block (see ``REGISTER_BLOCKS``).

    The block's sizes are closure constants, so that LLVM unrolls the block and keeps it in
    registers; Numba caches each block's kernel under its own key. ``unsigned_index``: see
    ``_accumulate_terms``. ``wide_vectors`` asks LLVM for 512-bit vectors (``_prefer_512_bit``).
    """
    acc_size = channel_block * position_block

    @njit(parallel=True, **_JIT)
    def blocked_phases(x, w_packed, terms, bias_blocks, out, first_d, count_d, first_h, count_h, first_w, count_w,
                       stride_d, stride_h, stride_w, d_chunk, h_tile, rows_per_block, shift_d_min, n_dp,
                       shift_h_min, n_hp, shift_w_min, n_wp, in_start, n_id, out_start, n_od, plane0, workers):
        """Many-channel path: register-blocked gather, one output phase at a time.

        x : (N, Cin, Dslab, H, W); out : (N, Cout, Dout_slab, Hout, Wout): output planes
            ``out_start .. out_start + n_od - 1`` (global) go to its planes ``plane0 ..``
        w_packed : (G, n_cob, Pd, Ph, Pw, T * channel_block) weights of each phase's terms
            (ci, jd, jh, jw) for blocks of output channels (zero past Cout/G);
        terms : (Pd, Ph, Pw, T + 1) offset of each term's input row segment in the job's padded
            input block, ``-1`` after the last term (an uncountable loop: LLVM then vectorises
            the register block instead of the term loop, which would need gathers);
        first_*, count_* : per-phase first output and output count along each axis.
        rows_per_block : > 1 only for rows shorter than a position block that need no W halo
            (``n_wp`` = row length): one block then covers that many whole rows.
        workers : the run's thread count (the module's notes: jobs are claimed at run time).

        Phase ``r`` of an axis owns outputs ``first[r] + q * stride``. One job covers ``d_chunk``
        values of ``q`` along D (all D phases) and ``h_tile`` along H, for one sample and group.
        It copies the input it reads into a zero-padded block of ``n_dp`` planes x ``n_hp`` rows
        x ``n_wp`` columns per input channel, starting at input plane ``q0 + shift_d_min``, row
        ``qh0 + shift_h_min`` and column ``shift_w_min`` (so the inner loop has no bounds checks),
        then for every block of ``channel_block`` channels x ``position_block`` outputs accumulates all
        terms in registers and writes each output once.
        """
        n_batch, c_out = out.shape[:2]
        groups = w_packed.shape[0]
        n_cob = w_packed.shape[1]
        cout_g = c_out // groups
        n_qh = 0
        n_qw = 0
        q_lo, q_hi = _slab_positions(first_d, count_d, stride_d, out_start, n_od, n_id)
        for r in range(stride_h):
            n_qh = max(n_qh, count_h[r])
        for r in range(stride_w):
            n_qw = max(n_qw, count_w[r])
        if q_hi <= q_lo or n_qh == 0 or n_qw == 0:
            return
        n_chunks = (q_hi - q_lo + d_chunk - 1) // d_chunk
        n_tiles = (n_qh + h_tile - 1) // h_tile
        row_len = position_block if rows_per_block == 1 else n_qw
        block_w = position_block if rows_per_block == 1 else n_qw
        n_jobs = n_batch * groups * n_chunks * n_tiles
        claims = _job_claims(n_jobs, workers)
        for worker in prange(claims.shape[0]):
            job, victim = _claim(claims, n_jobs, worker, worker)
            while job >= 0:
                n, g, q0, q1, qh0, qh1, xp = _job_block(
                    job, x, out.dtype, groups, n_chunks, n_tiles, q_lo, q_hi, d_chunk, n_qh, h_tile, shift_d_min,
                    n_dp, shift_h_min, n_hp, shift_w_min, n_wp, position_block, in_start, n_id)
                if wide_vectors:
                    _prefer_512_bit()
                acc = numba.carray(_stack_block(out.dtype, acc_size), acc_size)
                # One block per W phase, padded so a full position block can be read at any row offset.
                blocks = np.zeros((stride_w, acc_size + position_block), dtype=out.dtype)
                # Channel blocks outermost: consecutive blocks then write the same few output planes
                # row after row (few TLB pages in use) while the input block stays in cache.
                for cob in range(n_cob):
                    n_co = min(channel_block, cout_g - cob * channel_block)
                    for qd in range(q0, q1):
                        for rd in range(stride_d):
                            od = first_d[rd] + qd * stride_d
                            if qd >= count_d[rd] or od < out_start or od >= out_start + n_od:
                                continue
                            for qh in range(qh0, qh1, rows_per_block):
                                for rh in range(stride_h):
                                    if qh >= count_h[rh]:
                                        continue
                                    for qw0 in range(0, n_qw, block_w):
                                        xbase = ((qd - q0) * n_hp + qh - qh0) * n_wp + qw0
                                        # The block's output lines, asked for before its terms are summed:
                                        # its stores then find them in cache instead of waiting for memory.
                                        for r in range(rows_per_block):
                                            if qh + r < qh1 and qh + r < count_h[rh]:
                                                _prefetch_row(out, n, g * cout_g + cob * channel_block, n_co,
                                                              plane0 + od - out_start,
                                                              first_h[rh] + (qh + r) * stride_h,
                                                              stride_w * qw0, stride_w * row_len)
                                        for rw in range(stride_w):
                                            if count_w[rw] <= qw0:
                                                continue
                                            _accumulate_terms(acc, bias_blocks[g, cob], xp, xbase,
                                                              terms[rd, rh, rw], w_packed[g, cob, rd, rh, rw],
                                                              position_block, channel_block, unsigned_index)
                                            blk = blocks[rw]
                                            for i in range(acc_size):
                                                blk[i] = acc[i]
                                        for r in range(rows_per_block):
                                            qh_r = qh + r
                                            if qh_r >= qh1 or qh_r >= count_h[rh]:
                                                break
                                            oh = first_h[rh] + qh_r * stride_h
                                            _store_rows(out, blocks, n, g * cout_g + cob * channel_block, n_co,
                                                        plane0 + od - out_start, oh, r * row_len, qw0, row_len,
                                                        first_w, count_w, stride_w, position_block)
                job, victim = _claim(claims, n_jobs, worker, victim)

    return blocked_phases


#: The 8 x 16 block as first tuned (on AVX-512): sliced inputs and weights.
blocked_phases = blocked_kernel(CHANNEL_BLOCK, POSITION_BLOCK, unsigned_index=False,
                                wide_vectors="8x16" in WIDE_VECTOR_BLOCKS)

#: The blocked kernel of each register block.
BLOCKED_KERNELS = {name: blocked_phases if size == (CHANNEL_BLOCK, POSITION_BLOCK)
                   else blocked_kernel(*size, wide_vectors=name in WIDE_VECTOR_BLOCKS)
                   for name, size in REGISTER_BLOCKS.items()}


@njit(inline="always", **_JIT)
def _accumulate_terms(acc, start, xp, xbase, term_rows, w_terms, width, channel_block=CHANNEL_BLOCK,
                      unsigned_index=False):
    """One register block of the blocked kernels: ``acc`` (``channel_block`` x ``width``) =
    ``start`` plus every term's inputs ``xp[xbase + term_rows[j]:][:width]`` times its
    ``channel_block`` weights.

    Inlined by Numba, so ``acc`` stays the caller's stack block and ``width`` a constant: LLVM
    then keeps the accumulators in registers (a call, or a run-time width, would spill them).
    ``term_rows`` ends with -1 (an uncountable loop: LLVM vectorises the block instead of
    the term loop, which would need gathers). With ``unsigned_index`` (a constant) the terms
    are read at unsigned offsets: Numba then emits neither the wraparound of a negative
    index nor a slice's clamping, and the term loop is the loads, the FMAs and three integer
    operations. The 8-channel kernels keep the slices their code was tuned with.
    """
    for i in range(channel_block * width):
        acc[i] = start[i]
    j = 0
    while True:
        rel = term_rows[j]
        if rel < 0:
            break
        if unsigned_index:
            xo = np.uint64(xbase + rel)
            wo = np.uint64(j * channel_block)
            for t in range(width):
                xv = xp[xo + np.uint64(t)]
                for cb in range(channel_block):
                    acc[cb * width + t] += xv * w_terms[wo + np.uint64(cb)]
        else:
            xs = xp[xbase + rel:xbase + rel + width]
            ws = w_terms[j * channel_block:(j + 1) * channel_block]
            for t in range(width):
                xv = xs[t]
                for cb in range(channel_block):
                    acc[cb * width + t] += xv * ws[cb]
        j += 1


# Register block of ``subpixel_blocked``: 8 virtual channels x 32 positions (16 AVX-512
# registers). Twice the plain kernel's positions: each block's rows then go out as runs of
# 32 that LLVM stores with full-width permutes (runs of 16 end up as scalar stores).
WIDE_POSITION_BLOCK = 32
_ACC_WIDE = CHANNEL_BLOCK * WIDE_POSITION_BLOCK


@intrinsic
def _prefer_512_bit(typingctx):
    """Mark the function being compiled ``"prefer-vector-width"="512"``.

    LLVM's tuning for most AVX-512 CPUs (Intel's among them) prefers 256-bit vectors, so
    a loop compiles to ymm registers and runs at half the rate of two 512-bit FMA ports.
    This function attribute lifts that preference for the kernels that ask; on a CPU
    without AVX-512 it changes nothing. (llvmlite's attribute set knows no string
    attributes, hence ``set.add``.)
    """
    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, '"prefer-vector-width"="512"')
        return context.get_dummy_value()
    return types.none(), codegen


@intrinsic
def _stack_block(typingctx, dtype, size):
    """A pointer to ``size`` (a compile-time constant) uninitialised elements on the stack.

    Unlike a NumPy array (heap memory that LLVM must assume the inputs may
    alias) a stack block indexed only by constants is promoted to registers.
    """
    if not isinstance(size, types.IntegerLiteral):
        return None  # Numba retries with the literal value
    n = size.literal_value

    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=n)
    return types.CPointer(dtype.dtype)(dtype, size), codegen


@intrinsic
def _stack_block_wide(typingctx, dtype):
    """As ``_stack_block``, ``_ACC_WIDE`` elements."""
    def codegen(context, builder, sig, args):
        return cgutils.alloca_once(builder, context.get_value_type(dtype.dtype), size=_ACC_WIDE)
    return types.CPointer(dtype.dtype)(dtype), codegen


@njit(parallel=True, **_JIT)
def subpixel_blocked(x, w_packed, terms, bias_blocks, out, n_vd, n_vh, n_vw, d_chunk, h_tile, shift_d_min,
                     n_dp, shift_h_min, n_hp, shift_w_min, n_wp, in_start, n_id, out_start, v_lo, v_hi,
                     shuffle, sub_d, sub_h, sub_w, n_od, plane0, workers):
    """Few-channel path: the layer's phases as channels of one stride-1 convolution.

    With ``_plan.subpixel_phases`` every output phase of every output channel becomes a
    virtual channel (``shuffle`` rows ``(co, rd, rh, rw)``) reading one shared window of
    inputs, zero weights where a phase lacks a tap: the pixel-shuffle form. One channel
    then fills a whole register block (8 phases for stride 2), where the plain kernel would
    use one lane in eight.

    x : (N, Cin, Dslab, H, W); out : (N, Cout, Dout_slab, Hout, Wout), planes as for
        ``blocked_phases`` (``out_start``, ``n_od``, ``plane0``)
    w_packed : (G, n_cob, 1, 1, 1, T * CHANNEL_BLOCK); terms : (1, 1, 1, T + 1), as for
        ``blocked_phases`` with one phase;
    n_vd, n_vh, n_vw : positions along each axis; ``v_lo, v_hi`` the D positions with
        outputs in this slab (``_plan.q_range``);
    sub_* : (3, stride) per real phase: first output, count, offset (``q = v + offset``);
    workers : the run's thread count (jobs are claimed at run time).

    Jobs and the padded input block are those of ``blocked_phases``. A row's blocks are kept
    block after block in a row buffer and scattered once the row is done
    (``_store_subpixel_row``): whole rows, in ascending order, keep the stores streaming.
    """
    n_batch, c_out = out.shape[:2]
    groups = w_packed.shape[0]
    n_cob = w_packed.shape[1]
    n_virtual = shuffle.shape[0]
    if v_hi <= v_lo or n_vh == 0 or n_vw == 0:
        return
    n_chunks = (v_hi - v_lo + d_chunk - 1) // d_chunk
    n_tiles = (n_vh + h_tile - 1) // h_tile
    n_wblocks = (n_vw + WIDE_POSITION_BLOCK - 1) // WIDE_POSITION_BLOCK
    term_rows = terms[0, 0, 0]
    n_jobs = n_batch * groups * n_chunks * n_tiles
    claims = _job_claims(n_jobs, workers)
    for worker in prange(claims.shape[0]):
        job, victim = _claim(claims, n_jobs, worker, worker)
        while job >= 0:
            n, g, v0, v1, vh0, vh1, xp = _job_block(job, x, out.dtype, groups, n_chunks, n_tiles, v_lo, v_hi, d_chunk,
                                                    n_vh, h_tile, shift_d_min, n_dp, shift_h_min, n_hp, shift_w_min,
                                                    n_wp, WIDE_POSITION_BLOCK, in_start, n_id)
            _prefer_512_bit()
            acc = numba.carray(_stack_block_wide(out.dtype), _ACC_WIDE)
            row_buf = np.empty(n_wblocks * _ACC_WIDE, dtype=out.dtype)
            for cob in range(n_cob):
                n_c = min(CHANNEL_BLOCK, n_virtual - cob * CHANNEL_BLOCK)
                w_terms = w_packed[g, cob, 0, 0, 0]
                start = bias_blocks[g, cob]
                for vd in range(v0, v1):
                    for vh in range(vh0, vh1):
                        for wb in range(n_wblocks):
                            xbase = ((vd - v0) * n_hp + vh - vh0) * n_wp + wb * WIDE_POSITION_BLOCK
                            _accumulate_terms(acc, start, xp, xbase, term_rows, w_terms, WIDE_POSITION_BLOCK)
                            blk = row_buf[wb * _ACC_WIDE:(wb + 1) * _ACC_WIDE]
                            for i in range(_ACC_WIDE):
                                blk[i] = acc[i]
                        _store_subpixel_row(out, row_buf, n_vw, n, g * (c_out // groups), cob * CHANNEL_BLOCK, n_c,
                                            vd, vh, shuffle, sub_d, sub_h, sub_w, out_start, n_od, plane0)
            job, victim = _claim(claims, n_jobs, worker, victim)


@njit(**_JIT)
def _store_subpixel_row(out, row_buf, n_vw, n, co_base, c0, n_c, vd, vh, shuffle, sub_d, sub_h, sub_w,
                        out_start, n_od, plane0):
    """Scatter one row of a sub-pixel layer's blocks to the output.

    ``row_buf`` holds the row's blocks one after another: channel ``cb`` at position ``v``
    is ``row_buf[(v // PB) * _ACC_WIDE + cb * PB + v % PB]`` (``PB = WIDE_POSITION_BLOCK``).
    Virtual channel ``c0 + cb`` is output channel ``co_base + shuffle[c, 0]`` in phase
    ``shuffle[c, 1:]``; its value at position ``v`` along an axis is that phase's output
    ``q = v + offset`` (``sub_*[2, r]``), at ``first + q * stride`` when ``0 <= q < count``.
    With stride 2 along W, the two W phases of a row (adjacent channels) usually fill one
    contiguous run: it is stored interleaved, a block at a time.
    """
    stride_d, stride_h, stride_w = sub_d.shape[1], sub_h.shape[1], sub_w.shape[1]
    pb = WIDE_POSITION_BLOCK
    cb = 0
    while cb < n_c:
        c = c0 + cb
        rd, rh, rw = shuffle[c, 1], shuffle[c, 2], shuffle[c, 3]
        qd = vd + sub_d[2, rd]
        qh = vh + sub_h[2, rh]
        od = sub_d[0, rd] + qd * stride_d - out_start
        n_done = 1
        if (stride_w == 2 and cb + 1 < n_c and shuffle[c + 1, 3] != rw
                and abs(sub_w[0, 0] + 2 * sub_w[2, 0] - sub_w[0, 1] - 2 * sub_w[2, 1]) == 1):
            n_done = 2
        if qd < 0 or qd >= sub_d[1, rd] or qh < 0 or qh >= sub_h[1, rh] or od < 0 or od >= n_od:
            cb += n_done
            continue
        row = out[n, co_base + shuffle[c, 0], plane0 + od, sub_h[0, rh] + qh * stride_h]
        # Valid positions of this channel's phase: 0 <= v + offset < count.
        lo = min(n_vw, max(0, -sub_w[2, rw]))
        hi = max(lo, min(n_vw, sub_w[1, rw] - sub_w[2, rw]))
        col = sub_w[0, rw] + sub_w[2, rw] * stride_w
        if n_done == 2:
            # Channel a's phase owns the lower column of each output pair, b's the next one.
            rw_b = shuffle[c + 1, 3]
            col_b = sub_w[0, rw_b] + sub_w[2, rw_b] * 2
            cb_a, cb_b = (cb, cb + 1) if col < col_b else (cb + 1, cb)
            col = min(col, col_b)
            rw_a, rw_b = shuffle[c0 + cb_a, 3], shuffle[c0 + cb_b, 3]
            lo_a = min(n_vw, max(0, -sub_w[2, rw_a]))
            hi_a = max(lo_a, min(n_vw, sub_w[1, rw_a] - sub_w[2, rw_a]))
            lo_b = min(n_vw, max(0, -sub_w[2, rw_b]))
            hi_b = max(lo_b, min(n_vw, sub_w[1, rw_b] - sub_w[2, rw_b]))
            lo = max(lo_a, lo_b)
            hi = max(lo, min(hi_a, hi_b))
            for wb in range(lo // pb, (hi + pb - 1) // pb):
                t0 = max(lo, wb * pb)
                t1 = min(hi, (wb + 1) * pb)
                src_a = row_buf[wb * _ACC_WIDE + cb_a * pb + t0 - wb * pb:]
                src_b = row_buf[wb * _ACC_WIDE + cb_b * pb + t0 - wb * pb:]
                _interleave(row[col + 2 * t0:col + 2 * t1], src_a, src_b, t1 - t0)
            # The ends where only one of the two phases has an output (a position or two).
            for v in range(lo_a, min(hi_a, lo)):
                row[col + 2 * v] = row_buf[(v // pb) * _ACC_WIDE + cb_a * pb + v % pb]
            for v in range(max(lo_a, hi), hi_a):
                row[col + 2 * v] = row_buf[(v // pb) * _ACC_WIDE + cb_a * pb + v % pb]
            for v in range(lo_b, min(hi_b, lo)):
                row[col + 2 * v + 1] = row_buf[(v // pb) * _ACC_WIDE + cb_b * pb + v % pb]
            for v in range(max(lo_b, hi), hi_b):
                row[col + 2 * v + 1] = row_buf[(v // pb) * _ACC_WIDE + cb_b * pb + v % pb]
        else:
            for wb in range(lo // pb, (hi + pb - 1) // pb):
                t0 = max(lo, wb * pb)
                t1 = min(hi, (wb + 1) * pb)
                src = row_buf[wb * _ACC_WIDE + cb * pb + t0 - wb * pb:]
                if stride_w == 1:
                    seg = row[col + t0:col + t1]
                    for t in range(t1 - t0):
                        seg[t] = src[t]
                else:
                    for t in range(t1 - t0):
                        row[col + (t0 + t) * stride_w] = src[t]
        cb += n_done


@njit(parallel=True, **_JIT)
def shuffle_gemm(x, w, bias, out, stride_d, stride_h, stride_w, seg_len, chunk, n_ranges, copy_x, in_start,
                 n_id, out_start, n_od, plane0, workers):
    """Layers whose kernel equals their stride (no padding, no dilation): a GEMM and a pixel shuffle.

    x : (N, Cin, Dslab, H, W); bias : (Cout,); out : (N, Cout, Dout_slab, Hout, Wout), planes
        as for ``blocked_phases`` (``out_start``, ``n_od``, ``plane0``)
    w : (G, Cin/G, V) the weights as they come, ``V = Cout/G * P`` virtual channels with
        ``P = stride_d * stride_h * stride_w``: ``v = co * P + (kd * stride_h + kh) * stride_w + kw``;
    seg_len : flat input positions stored at once: one input row when rows are at least
        WIDE_POSITION_BLOCK long (each output row is then written in one sweep), else one block;
    chunk : input positions per job, a multiple of ``seg_len``;
    n_ranges : the virtual channels are split into this many ranges (jobs for small volumes);
    copy_x : copy each job's inputs to a block whose channel stride is not a power of two.
        Read in place, channels of a 2^k-sized volume all fall into the same cache sets;
    workers : the run's thread count (jobs are claimed at run time).

    Every output has exactly one tap: output ``(sd * d + kd, sh * h + kh, sw * w + kw)`` of
    channel ``co`` is the bias plus the sum over ``ci`` of ``x[ci, d, h, w] * w[ci, co, kd, kh, kw]``.
    Over a run of flat input positions that is the GEMM (V x Cin) @ (Cin x positions) whose
    A matrix is the weight array itself; it is computed in register blocks of 8 virtual
    channels x 32 positions as in the blocked kernels and stored by a pixel shuffle (for
    W stride 2, a W-phase pair as one interleaved run). No input is read twice, so there
    is no halo, and a job copies only one block's weights (Cin/G x 8) at a time, where the
    other blocked kernels pack the whole layer's weights first (2.6 MB next to a 4 MB
    output for 320->256 at 8^3). Outputs no input reaches (output_padding) are the bias.
    """
    n_batch, c_out, n_oh, n_ow = out.shape[0], out.shape[1], out.shape[3], out.shape[4]
    groups, cin_g, n_virtual = w.shape
    cout_g = c_out // groups
    n_slab, n_ih, n_iw = x.shape[2], x.shape[3], x.shape[4]
    n_phase = stride_d * stride_h * stride_w
    plane_len = n_ih * n_iw
    slab_len = n_slab * plane_len
    pb = WIDE_POSITION_BLOCK
    n_seg_blocks = (seg_len + pb - 1) // pb
    # Input planes (global) with outputs in this slab.
    d_lo = max(in_start, out_start // stride_d)
    d_hi = min(in_start + n_slab, n_id, (out_start + n_od - 1) // stride_d + 1)
    p_lo = (d_lo - in_start) * plane_len
    p_hi = (d_hi - in_start) * plane_len
    n_chunks = max(0, (p_hi - p_lo + chunk - 1) // chunk)
    n_vb = (n_virtual + CHANNEL_BLOCK - 1) // CHANNEL_BLOCK
    per_range = (n_vb + n_ranges - 1) // n_ranges
    xs = x.reshape(-1)
    # A copied block's channel stride: room for a block read past the chunk's end, and an
    # odd number of cache lines.
    line = 64 // x.itemsize
    stride_ci = (chunk + pb + line - 1) // line * line
    if (stride_ci // line) % 2 == 0:
        stride_ci += line
    n_jobs = n_batch * groups * n_chunks * n_ranges
    claims = _job_claims(n_jobs, workers)
    for worker in prange(claims.shape[0]):
        job, victim = _claim(claims, n_jobs, worker, worker)
        while job >= 0:
            _prefer_512_bit()
            vr = job % n_ranges
            rest = job // n_ranges
            c0 = p_lo + (rest % n_chunks) * chunk
            c1 = min(p_hi, c0 + chunk)
            rest = rest // n_chunks
            g = rest % groups
            n = rest // groups
            # Term rows: where each input channel's positions start in ``src_x``, -1 at the end
            # (see _accumulate_terms); position ``p`` is at ``p - base`` from there.
            terms = np.empty(cin_g + 1, dtype=np.int64)
            terms[cin_g] = -1
            if copy_x:
                src_x = np.empty(cin_g * stride_ci, dtype=out.dtype)
                for ci in range(cin_g):
                    terms[ci] = ci * stride_ci
                    src = xs[(n * x.shape[1] + g * cin_g + ci) * slab_len + c0:]
                    dst = src_x[ci * stride_ci:(ci + 1) * stride_ci]
                    for t in range(c1 - c0):
                        dst[t] = src[t]
                    dst[c1 - c0:] = 0
                base = c0
            else:
                src_x = xs
                for ci in range(cin_g):
                    terms[ci] = (n * x.shape[1] + g * cin_g + ci) * slab_len
                base = 0
            # In place, a block that would read past its channel's slab reads a zero-padded copy
            # (a copied block has that room already).
            n_tail = 0 if copy_x else cin_g
            tail = np.zeros(n_tail * pb, dtype=out.dtype)
            tail_terms = np.empty(n_tail + 1, dtype=np.int64)
            for ci in range(n_tail):
                tail_terms[ci] = ci * pb
            tail_terms[n_tail] = -1
            w_block = np.empty(cin_g * CHANNEL_BLOCK, dtype=out.dtype)
            start = np.empty(_ACC_WIDE, dtype=out.dtype)
            seg_buf = np.empty(n_seg_blocks * _ACC_WIDE, dtype=out.dtype)
            acc = numba.carray(_stack_block_wide(out.dtype), _ACC_WIDE)
            for vb in range(vr * per_range, min(n_vb, (vr + 1) * per_range)):
                v0 = vb * CHANNEL_BLOCK
                n_v = min(CHANNEL_BLOCK, n_virtual - v0)
                for ci in range(cin_g):
                    src = w[g, ci, v0:v0 + n_v]
                    dst = w_block[ci * CHANNEL_BLOCK:(ci + 1) * CHANNEL_BLOCK]
                    for cb in range(n_v):
                        dst[cb] = src[cb]
                    for cb in range(n_v, CHANNEL_BLOCK):
                        dst[cb] = 0
                for cb in range(CHANNEL_BLOCK):
                    value = bias[g * cout_g + (v0 + cb) // n_phase] if cb < n_v else 0
                    for t in range(pb):
                        start[cb * pb + t] = value
                for seg in range(c0, c1, seg_len):
                    n_pos = min(seg_len, c1 - seg)
                    for wb in range((n_pos + pb - 1) // pb):
                        p = seg + wb * pb
                        if copy_x or p + pb <= slab_len:
                            _accumulate_terms(acc, start, src_x, p - base, terms, w_block, pb)
                        else:
                            nb = min(pb, c1 - p)
                            for ci in range(cin_g):
                                src = xs[terms[ci] + p:terms[ci] + p + nb]
                                dst = tail[ci * pb:(ci + 1) * pb]
                                for t in range(nb):
                                    dst[t] = src[t]
                            _accumulate_terms(acc, start, tail, 0, tail_terms, w_block, pb)
                        blk = seg_buf[wb * _ACC_WIDE:(wb + 1) * _ACC_WIDE]
                        for i in range(_ACC_WIDE):
                            blk[i] = acc[i]
                    _store_shuffled(out, seg_buf, n, g * cout_g, v0, n_v, seg, n_pos, plane_len, n_iw, n_phase,
                                    stride_d, stride_h, stride_w, in_start, out_start, n_od, plane0)
            job, victim = _claim(claims, n_jobs, worker, victim)
    # Outputs past the last input's taps (output_padding): the bias.
    full_d, full_h, full_w = n_id * stride_d, n_ih * stride_h, n_iw * stride_w
    if full_h < n_oh or full_w < n_ow or out_start + n_od > full_d:
        for job in prange(n_batch * c_out * n_od):
            od = job % n_od
            co = (job // n_od) % c_out
            plane = out[job // (n_od * c_out), co, plane0 + od]
            value = bias[co]
            if out_start + od >= full_d:
                plane[:, :] = value
            else:
                plane[full_h:, :] = value
                plane[:full_h, full_w:] = value


@njit(**_JIT)
def _store_shuffled(out, seg_buf, n, co_base, v0, n_v, p, n_pos, plane_len, n_iw, n_phase, stride_d, stride_h,
                    stride_w, in_start, out_start, n_od, plane0):
    """Pixel-shuffle one ``shuffle_gemm`` segment to the output, run by run.

    The segment holds virtual channels ``v0 ..`` at flat slab positions ``p .. p + n_pos``
    in blocks: channel ``cb`` at position ``t`` is ``seg_buf[(t // PB) * _ACC_WIDE + cb * PB + t % PB]``
    (``PB = WIDE_POSITION_BLOCK``). A run is the part of one input row inside one block.
    """
    pb = WIDE_POSITION_BLOCK
    t = 0
    while t < n_pos:
        pos = p + t
        dl = pos // plane_len
        rem = pos - dl * plane_len
        ih = rem // n_iw
        iw = rem - ih * n_iw
        run = min(n_iw - iw, n_pos - t)
        cb = 0
        while cb < n_v:
            v = v0 + cb
            co = v // n_phase
            ph = v - co * n_phase
            kw = ph % stride_w
            kh = (ph // stride_w) % stride_h
            kd = ph // (stride_w * stride_h)
            od = (in_start + dl) * stride_d + kd - out_start
            paired = stride_w == 2 and kw == 0 and cb + 1 < n_v
            if 0 <= od < n_od:
                row = out[n, co_base + co, plane0 + od, ih * stride_h + kh]
                u0 = 0
                while u0 < run:
                    tt = t + u0
                    m = min(run - u0, pb - tt % pb)
                    src = seg_buf[(tt // pb) * _ACC_WIDE + cb * pb + tt % pb:]
                    col = iw + u0
                    if paired:
                        # Phase kw = 1 is the next virtual channel: one interleaved run.
                        src_b = seg_buf[(tt // pb) * _ACC_WIDE + (cb + 1) * pb + tt % pb:]
                        _interleave(row[2 * col:2 * (col + m)], src, src_b, m)
                    elif stride_w == 1:
                        dst = row[col:col + m]
                        for u in range(m):
                            dst[u] = src[u]
                    else:
                        for u in range(m):
                            row[(col + u) * stride_w + kw] = src[u]
                    u0 += m
            cb += 2 if paired else 1
        t += run


@njit(**_JIT)
def gemm_scatter(prod, bias, out, n, co_base, stride_d, stride_h, stride_w, chunk_start, dl_lo, dl_hi, n_ih, n_iw,
                 out_start):
    """Pixel-shuffle one BLAS product of the ``gemm`` path to the output, adding the bias.

    ``prod`` is ``(n_co * sD * sH * sW, kp * n_ih * n_iw)``: row ``(co, kd, kh, kw)``,
    column ``(dl, ih, iw)`` is the output of channel ``co_base + co`` at
    ``((chunk_start + dl) * sD + kd, ih * sH + kh, iw * sW + kw)``. Input planes
    ``dl_lo <= dl < dl_hi`` are stored where their outputs fall in ``out``, whose first plane
    is output plane ``out_start``; outputs past the H and W extent are dropped, and the rows
    and columns of ``out`` past the inputs' reach get the bias. One thread: the ``gemm``
    path runs its products in parallel. Both arrays must be C-contiguous.

    Both are addressed as flat arrays, one offset per output row: a row is often a single
    vector (16 outputs of 8 input columns at stride 2), and a view per row would cost more
    than its store.
    """
    n_c, n_od, n_oh, n_ow = out.shape[1], out.shape[2], out.shape[3], out.shape[4]
    n_phase = stride_d * stride_h * stride_w
    plane = n_ih * n_iw
    n_cols = prod.shape[1]
    h_n = min(n_oh, n_ih * stride_h)
    w_n = min(n_ow, n_iw * stride_w)
    half = w_n // 2
    pairs = PAIR_BYTES // (2 * out.itemsize)
    flat = out.reshape(-1)
    src_flat = prod.reshape(-1)
    # The product is read one phase row (a pair at stride_w == 2) at a time, front to
    # back, so the reads stream and only the stores hop between output rows.
    for co in range(prod.shape[0] // n_phase):
        value = bias[co_base + co]
        channel = (n * n_c + co_base + co) * n_od
        for kd in range(stride_d):
            for kh in range(stride_h):
                r0 = ((co * stride_d + kd) * stride_h + kh) * stride_w
                for dl in range(dl_lo, dl_hi):
                    od = (chunk_start + dl) * stride_d + kd - out_start
                    if od < 0 or od >= n_od:
                        continue
                    for ih in range((h_n - kh + stride_h - 1) // stride_h):
                        dst = ((channel + od) * n_oh + ih * stride_h + kh) * n_ow
                        src = r0 * n_cols + dl * plane + ih * n_iw
                        if stride_w == 2:
                            t = 0
                            while t + pairs <= half:
                                _store_pairs_plus(flat, dst + 2 * t, src_flat, src + t, src_flat, src + n_cols + t,
                                                  value)
                                t += pairs
                            for u in range(t, half):
                                flat[dst + 2 * u] = src_flat[src + u] + value
                                flat[dst + 2 * u + 1] = src_flat[src + n_cols + u] + value
                            if w_n > 2 * half:
                                flat[dst + 2 * half] = src_flat[src + half] + value
                        else:
                            for kw in range(stride_w):
                                for iw in range((w_n - kw + stride_w - 1) // stride_w):
                                    flat[dst + iw * stride_w + kw] = src_flat[src + kw * n_cols + iw] + value
                        for c in range(w_n, n_ow):
                            flat[dst + c] = value
        if h_n < n_oh:
            out_c = out[n, co_base + co]
            for dl in range(dl_lo, dl_hi):
                for kd in range(stride_d):
                    od = (chunk_start + dl) * stride_d + kd - out_start
                    if 0 <= od < n_od:
                        out_c[od, h_n:, :] = value


@njit(**_JIT)
def col2im_sum(ring, ring_len, guard, bias, out, n, co_base, n_co, od_local, d_count, d_taps, d_inputs,
               h_first, h_count, h_taps, h_kernel, h_shift, h_lo, h_hi,
               w_first, w_count, w_taps, w_kernel, w_shift, w_lo, w_hi, k_d, k_h, k_w, cols, pitch, sums):
    """One output plane of the ``col2im`` path for ``n_co`` output channels: each output is
    its bias plus the product entries of its taps, in (kD, kH, kW) order.

    ``ring[i % ring_len]`` holds input plane ``i``'s product: ``guard`` zeros, then one row
    of ``cols`` (input rows of ``pitch`` columns, zeros past W) per (channel, kd, kh, kw),
    then ``guard`` zeros. ``d_*``: the plane's D taps and their input planes; ``h_*`` and
    ``w_*``: the H and W phase tables (``_col2im._phase_tables``). The sums of one
    (H phase, W phase) run over whole padded rows at once, so every tap adds one flat run
    of its product (``sums[rh, rw]``, ``pitch`` per row; the columns past a phase's outputs
    are never stored); a W input past either end of its row reads the padding zeros. One
    thread: the ``col2im`` path runs its jobs in parallel.
    """
    s_h = h_first.shape[0]
    s_w = w_first.shape[0]
    for co in range(n_co):
        value = bias[co_base + co]
        for rh in range(s_h):
            for rw in range(s_w):
                acc = sums[rh, rw]
                for i in range(h_count[rh] * pitch):
                    acc[i] = value
        for t in range(d_count):
            src = ring[d_inputs[t] % ring_len]
            kd = d_taps[t]
            for rh in range(s_h):
                for jh in range(h_taps[rh]):
                    q0 = h_lo[rh, jh]
                    q1 = h_hi[rh, jh]
                    if q1 <= q0:
                        continue
                    row0 = ((co * k_d + kd) * k_h + h_kernel[rh, jh]) * k_w
                    start = guard + (q0 + h_shift[rh, jh]) * pitch
                    for rw in range(s_w):
                        acc = sums[rh, rw, q0 * pitch:q1 * pitch]
                        for jw in range(w_taps[rw]):
                            off = start + (row0 + w_kernel[rw, jw]) * cols + w_shift[rw, jw]
                            y = src[off:off + acc.shape[0]]
                            for i in range(acc.shape[0]):
                                acc[i] += y[i]
        dst = out[n, co_base + co, od_local]
        for rh in range(s_h):
            for qh in range(h_count[rh]):
                row = dst[h_first[rh] + qh * s_h]
                if s_w == 1:
                    acc = sums[rh, 0, qh * pitch:]
                    for q in range(w_count[0]):
                        row[q] = acc[q]
                elif s_w == 2:
                    # Both W phases in one pass (unit-stride loads, interleaved stores).
                    even = 0 if w_first[0] == 0 else 1
                    acc = sums[rh, even, qh * pitch:]
                    odd = sums[rh, 1 - even, qh * pitch:]
                    pairs = w_count[1 - even]
                    _interleave(row, acc, odd, pairs)
                    if w_count[even] > pairs:
                        row[2 * pairs] = acc[pairs]
                else:
                    for rw in range(s_w):
                        acc = sums[rh, rw, qh * pitch:]
                        first = w_first[rw]
                        for q in range(w_count[rw]):
                            row[first + q * s_w] = acc[q]


@njit(parallel=True, **_JIT)
def pack_weights(weight, w_packed, taps_d, kernel_d, taps_h, kernel_h, taps_w, kernel_w, channel_block):
    """Each phase's weights in term order for ``blocked_phases`` (and its other register blocks).

    weight : (G, Cin_g, Cout_g, kD, kH, kW); w_packed : (G, n_cob, Pd, Ph, Pw, T * channel_block),
    any content (every element is written); ``kernel_*[r, j]`` is the kernel index of tap ``j``
    of phase ``r`` (``taps_*[r]`` taps). Term ``(ci, jd, jh, jw)`` holds the weights of
    ``channel_block`` consecutive output channels, zero past Cout_g and past the phase's terms.
    """
    groups, cin_g, cout_g = weight.shape[0], weight.shape[1], weight.shape[2]
    n_cob = w_packed.shape[1]
    p_d, p_h, p_w = w_packed.shape[2], w_packed.shape[3], w_packed.shape[4]
    for job in prange(groups * n_cob):
        g = job // n_cob
        cob = job % n_cob
        n_co = min(channel_block, cout_g - cob * channel_block)
        for rd in range(p_d):
            for rh in range(p_h):
                for rw in range(p_w):
                    dst = w_packed[g, cob, rd, rh, rw]
                    j = 0
                    for ci in range(cin_g):
                        for jd in range(taps_d[rd]):
                            for jh in range(taps_h[rh]):
                                for jw in range(taps_w[rw]):
                                    kd = kernel_d[rd, jd]
                                    kh = kernel_h[rh, jh]
                                    kw = kernel_w[rw, jw]
                                    for cb in range(n_co):
                                        dst[j * channel_block + cb] = weight[g, ci, cob * channel_block + cb, kd, kh, kw]
                                    for cb in range(n_co, channel_block):
                                        dst[j * channel_block + cb] = 0
                                    j += 1
                    dst[j * channel_block:] = 0


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def map_pages(raw, page, span, first, workers):
    """Write a zero to every ``page``-th byte of ``raw`` and to its last byte, so that every
    memory page it spans is mapped, on ``workers`` threads.

    The jobs are runs of ``raw`` cut at ``first + k * span``: with ``first`` the distance
    from ``raw``'s start to the next ``span``-aligned address, no ``span``-sized page is
    written by two threads. Each thread writes the runs of its own share in order, then
    claims what is left of the others (the module's notes): a thread that wakes late, as
    beside a streamed run's compression threads, holds nobody up.
    """
    n = raw.shape[0]
    if n == 0:
        return
    n_jobs = 1 + max(0, (n - first + span - 1) // span)
    claims = _job_claims(n_jobs, workers)
    for worker in prange(claims.shape[0]):
        job, victim = _claim(claims, n_jobs, worker, worker)
        while job >= 0:
            lo = 0 if job == 0 else min(n, first + (job - 1) * span)
            hi = n if job == n_jobs - 1 else min(n, first + job * span)
            for i in range(lo, hi, page):
                raw[i] = 0
            if hi == n and hi > lo:
                raw[n - 1] = 0
            job, victim = _claim(claims, n_jobs, worker, victim)


@njit(parallel=True, cache=True, error_model="numpy", nogil=True)
def count_nonfinite(bits, exponent):
    """How many values have an all-ones exponent (inf or nan), given their bit patterns.

    Integer tests rather than ``np.isfinite``: under the fast-math flags of the other
    kernels LLVM may assume that floats are finite, so no float test is trusted here.
    """
    total = 0
    for i in prange(bits.shape[0]):
        if bits[i] & exponent == exponent:
            total += 1
    return total


@njit(**_JIT)
def _store_rows(out, blocks, n, co0, n_co, od_local, oh, pos0, qw0, row_len, first_w,
                count_w, stride_w, position_block):
    """Copy one row's share of the W-phase blocks (bias included) to the output row ``oh``."""
    if stride_w == 2:
        # The two W phases fill one contiguous output run.
        even = 0 if first_w[0] == 0 else 1
        odd = 1 - even
        n_even = max(0, min(row_len, count_w[even] - qw0))
        n_odd = max(0, min(row_len, count_w[odd] - qw0))
        for cb in range(n_co):
            src_even = blocks[even, cb * position_block + pos0:]
            src_odd = blocks[odd, cb * position_block + pos0:]
            seg = out[n, co0 + cb, od_local, oh, 2 * qw0:2 * qw0 + n_even + n_odd]
            _interleave(seg, src_even, src_odd, n_odd)
            if n_even > n_odd:
                seg[2 * n_odd] = src_even[n_odd]
        return
    for cb in range(n_co):
        row = out[n, co0 + cb, od_local, oh]
        for rw in range(stride_w):
            n_pos = min(row_len, count_w[rw] - qw0)
            if n_pos <= 0:
                continue
            src = blocks[rw, cb * position_block + pos0:]
            seg = row[first_w[rw] + qw0 * stride_w:]
            if stride_w == 1:
                for t in range(n_pos):
                    seg[t] = src[t]
            else:
                for t in range(n_pos):
                    seg[t * stride_w] = src[t]


@njit(parallel=True, **_JIT)
def paired_rows(x, w, bias, out, first_d, count_d, taps_d, kern_d, shift_d, first_h, count_h, taps_h, kern_h,
                shift_h, w_kern, w_off, n_pair, n_a, d_chunk, sd_lo, n_dp, sh_lo, n_hp, sw_lo, n_wp, in_start,
                n_id, out_start, n_od, plane0, x_bits, exponent, workers):
    """Few-channel path for W stride 2: both W phases of an output row in one pass.

    x : (N, Cin, Dslab, H, W); w : (G, Cin/G, Cout/G, kD, kH, kW); bias : (Cout,)
    out : (N, Cout, Dout_slab, Hout, Wout), planes as for ``blocked_phases`` (``out_start``,
        ``n_od``, ``plane0``)
    first_*, count_*, taps_*, kern_*, shift_* : D and H phases (``_plan.paired_plan``): first
        output, output count, tap count, kernel index and input shift of each tap.
    w_kern, w_off : (2, 2) kernel index (-1: none) and padded-row column offset of the two
        taps of W phase A (even columns, ``n_a`` outputs) and B (odd columns, ``n_pair``).
    x_bits, exponent : ``x`` flat as unsigned integers of its width, and the exponent mask.
    workers : the run's thread count (jobs are claimed at run time).

    Returns the number of non-finite inputs the jobs read (checked by each group's first
    output channel; a plane two chunks read counts twice). When it is not 0 the outputs are not valid: zero-weight terms multiply inputs,
    and 0 * nan or 0 * inf would reach outputs that do not depend on them. The caller then
    runs the blocked kernel; counting here saves a separate pass over the input.

    Output ``2 q`` is A's position ``q`` and ``2 q + 1`` is B's, so with every (input
    channel, D tap, H tap) as a term, position ``q`` of a row is a sum over terms of
    ``wA0 * row[q + a0] + wA1 * row[q + a1]`` (and the same for B): unit-stride loads of
    a padded input row, broadcast weights, and one interleaved store of the pair. Four
    loads and four FMAs per term give 32 outputs, where the FIR kernel needs a coefficient
    row per output and the sub-pixel kernel a row buffer and a scatter. When A reads columns
    ``(c + 1, c)`` and B ``(c + 2, c + 1)`` (k4 s2 p1), a term needs three loads.

    One job is a chunk of D positions (all D phases) of one sample and output channel; it
    copies the input planes it reads into a zero-padded block (``_fill_block``: no bounds
    checks below). Terms depend on the D and H phase only, so a plane's term lists serve
    every row. Rows are written in ascending order (phases sorted by first output):
    descending steps make the stores about three times slower.
    """
    n_batch, c_out = out.shape[:2]
    cin_g, cout_g, k_d, k_h = w.shape[1:5]
    stride_d = first_d.shape[0]
    stride_h = first_h.shape[0]
    q_lo, q_hi = _slab_positions(first_d, count_d, stride_d, out_start, n_od, n_id)
    n_nonfinite = 0
    if q_hi <= q_lo:
        return n_nonfinite
    n_chunks = (q_hi - q_lo + d_chunk - 1) // d_chunk
    order_d = np.argsort(first_d)
    order_h = np.argsort(first_h)
    n_qh = count_h.max()
    max_terms = cin_g * max(1, taps_d.max()) * max(1, taps_h.max()) + 4
    # Unsigned offsets: Numba then adds no negative-index wraparound, which LLVM would turn
    # into gathers.
    oa0, oa1 = np.uint64(w_off[0, 0]), np.uint64(w_off[0, 1])
    ob0, ob1 = np.uint64(w_off[1, 0]), np.uint64(w_off[1, 1])
    one, two = np.uint64(1), np.uint64(2)
    # A reads columns (c + 1, c) and B (c + 2, c + 1): the middle column is loaded once.
    shared_column = oa0 == oa1 + one and ob1 == oa0 and ob0 == ob1 + one
    n_jobs = n_batch * c_out * n_chunks
    claims = _job_claims(n_jobs, workers)
    for worker in prange(claims.shape[0]):
        job, victim = _claim(claims, n_jobs, worker, worker)
        while job >= 0:
            chunk, n, co, g, co_g = _channel_job(job, n_chunks, c_out, cout_g)
            b = bias[co]
            q0 = q_lo + chunk * d_chunk
            q1 = min(q_hi, q0 + d_chunk)
            xp = np.empty(cin_g * n_dp * n_hp * n_wp, dtype=out.dtype)
            _fill_block(x, xp, n, g, cin_g, q0 + sd_lo, n_dp, sh_lo, n_hp, sw_lo, n_wp, in_start, n_id)
            if co_g == 0:
                # The group's other output channels read the same planes: checked once.
                n_nonfinite += _nonfinite_planes(x_bits, exponent, x.shape, n, g * cin_g, cin_g, q0 + sd_lo, n_dp,
                                                 in_start, n_id)
            # Per (ci, kd, kh): A's two tap weights, then B's (zero for a missing tap); one zero
            # entry at the end for padding terms.
            zero_w = cin_g * k_d * k_h * 4
            wt = np.zeros(zero_w + 4, dtype=out.dtype)
            for ci in range(cin_g):
                for kd in range(k_d):
                    for kh in range(k_h):
                        for k in range(4):
                            kw = w_kern[k // 2, k % 2]
                            if kw >= 0:
                                wt[((ci * k_d + kd) * k_h + kh) * 4 + k] = w[g, ci, co_g, kd, kh, kw]
            t_row = np.empty((stride_h, max_terms), dtype=np.uint64)
            t_w = np.empty((stride_h, max_terms), dtype=np.int64)
            n_terms = np.empty(stride_h, dtype=np.int64)
            acc_a = np.empty(n_a, dtype=out.dtype)
            acc_b = np.empty(n_a, dtype=out.dtype)
            for qd in range(q0, q1):
                for i_d in range(stride_d):
                    rd = order_d[i_d]
                    od = first_d[rd] + qd * stride_d - out_start
                    if qd >= count_d[rd] or od < 0 or od >= n_od:
                        continue
                    od += plane0
                    for rh in range(stride_h):
                        # Terms of this (D phase, H phase): offsets of their rows at qh = 0.
                        nt = 0
                        for ci in range(cin_g):
                            for jd in range(taps_d[rd]):
                                pl = ci * n_dp + qd - q0 + shift_d[rd, jd] - sd_lo
                                for jh in range(taps_h[rh]):
                                    t_row[rh, nt] = (pl * n_hp + shift_h[rh, jh] - sh_lo) * n_wp
                                    t_w[rh, nt] = ((ci * k_d + kern_d[rd, jd]) * k_h + kern_h[rh, jh]) * 4
                                    nt += 1
                        n_terms[rh] = nt
                        # Whole groups of four: padding terms read row 0 with zero weights (the
                        # input is finite on this path, so 0 * x is 0).
                        while nt < 4 or nt % 4:
                            t_row[rh, nt] = 0
                            t_w[rh, nt] = zero_w
                            nt += 1
                    for qh in range(n_qh):
                        for i_h in range(stride_h):
                            rh = order_h[i_h]
                            if qh >= count_h[rh]:
                                continue
                            # The row is indexed, never sliced into views: with views, the
                            # 128^3 k4 s2 p1 layer took 4.8 against 3.9 ms (measured, same process).
                            oh = first_h[rh] + qh * stride_h
                            nt = n_terms[rh]
                            rel = np.uint64(qh * n_wp)
                            for q in range(n_pair, n_a):
                                # A's last output when the row length is odd.
                                out[n, co, od, oh, 2 * q] = _paired_tail(xp, wt, t_row, t_w, rh, nt, rel, q, oa0, oa1,
                                                                         b)
                            o0, o1 = t_row[rh, 0] + rel, t_row[rh, 1] + rel
                            o2, o3 = t_row[rh, 2] + rel, t_row[rh, 3] + rel
                            k0, k1, k2, k3 = t_w[rh, 0], t_w[rh, 1], t_w[rh, 2], t_w[rh, 3]
                            wa00, wa01, wb00, wb01 = wt[k0], wt[k0 + 1], wt[k0 + 2], wt[k0 + 3]
                            wa10, wa11, wb10, wb11 = wt[k1], wt[k1 + 1], wt[k1 + 2], wt[k1 + 3]
                            wa20, wa21, wb20, wb21 = wt[k2], wt[k2 + 1], wt[k2 + 2], wt[k2 + 3]
                            wa30, wa31, wb30, wb31 = wt[k3], wt[k3 + 1], wt[k3 + 2], wt[k3 + 3]
                            # One, two and four terms (one input channel: D and H taps of a
                            # stride-2 layer) each get their own loop; fewer loads than padding.
                            if nt == 1:
                                for q in range(n_pair):
                                    u = o0 + np.uint64(q)
                                    out[n, co, od, oh, 2 * q] = b + (wa00 * xp[u + oa0] + wa01 * xp[u + oa1])
                                    out[n, co, od, oh, 2 * q + 1] = b + (wb00 * xp[u + ob0] + wb01 * xp[u + ob1])
                            elif nt == 2:
                                for q in range(n_pair):
                                    u0 = o0 + np.uint64(q)
                                    u1 = o1 + np.uint64(q)
                                    out[n, co, od, oh, 2 * q] = b + ((wa00 * xp[u0 + oa0] + wa01 * xp[u0 + oa1])
                                                                     + (wa10 * xp[u1 + oa0] + wa11 * xp[u1 + oa1]))
                                    out[n, co, od, oh, 2 * q + 1] = b + ((wb00 * xp[u0 + ob0] + wb01 * xp[u0 + ob1])
                                                                         + (wb10 * xp[u1 + ob0] + wb11 * xp[u1 + ob1]))
                            elif nt <= 4 and shared_column:
                                # k4 s2 p1 and alike: three columns per term instead of four loads.
                                for q in range(n_pair):
                                    u0 = o0 + np.uint64(q) + oa1
                                    u1 = o1 + np.uint64(q) + oa1
                                    u2 = o2 + np.uint64(q) + oa1
                                    u3 = o3 + np.uint64(q) + oa1
                                    x00, x01, x02 = xp[u0], xp[u0 + one], xp[u0 + two]
                                    x10, x11, x12 = xp[u1], xp[u1 + one], xp[u1 + two]
                                    x20, x21, x22 = xp[u2], xp[u2 + one], xp[u2 + two]
                                    x30, x31, x32 = xp[u3], xp[u3 + one], xp[u3 + two]
                                    out[n, co, od, oh, 2 * q] = b + (
                                        ((wa00 * x01 + wa01 * x00) + (wa10 * x11 + wa11 * x10))
                                        + ((wa20 * x21 + wa21 * x20) + (wa30 * x31 + wa31 * x30)))
                                    out[n, co, od, oh, 2 * q + 1] = b + (
                                        ((wb00 * x02 + wb01 * x01) + (wb10 * x12 + wb11 * x11))
                                        + ((wb20 * x22 + wb21 * x21) + (wb30 * x32 + wb31 * x31)))
                            elif nt <= 4:
                                for q in range(n_pair):
                                    u0 = o0 + np.uint64(q)
                                    u1 = o1 + np.uint64(q)
                                    u2 = o2 + np.uint64(q)
                                    u3 = o3 + np.uint64(q)
                                    out[n, co, od, oh, 2 * q] = b + (
                                        ((wa00 * xp[u0 + oa0] + wa01 * xp[u0 + oa1]) + (wa10 * xp[u1 + oa0] + wa11 * xp[u1 + oa1]))
                                        + ((wa20 * xp[u2 + oa0] + wa21 * xp[u2 + oa1]) + (wa30 * xp[u3 + oa0] + wa31 * xp[u3 + oa1])))
                                    out[n, co, od, oh, 2 * q + 1] = b + (
                                        ((wb00 * xp[u0 + ob0] + wb01 * xp[u0 + ob1]) + (wb10 * xp[u1 + ob0] + wb11 * xp[u1 + ob1]))
                                        + ((wb20 * xp[u2 + ob0] + wb21 * xp[u2 + ob1]) + (wb30 * xp[u3 + ob0] + wb31 * xp[u3 + ob1])))
                            else:
                                # More terms (several input channels): four at a time into row
                                # accumulators, then one interleaved store.
                                for j in range(0, nt + (-nt) % 4, 4):
                                    if j > 0:
                                        o0, o1, o2, o3 = (t_row[rh, j] + rel, t_row[rh, j + 1] + rel,
                                                          t_row[rh, j + 2] + rel, t_row[rh, j + 3] + rel)
                                        k0, k1, k2, k3 = t_w[rh, j], t_w[rh, j + 1], t_w[rh, j + 2], t_w[rh, j + 3]
                                        wa00, wa01, wb00, wb01 = wt[k0], wt[k0 + 1], wt[k0 + 2], wt[k0 + 3]
                                        wa10, wa11, wb10, wb11 = wt[k1], wt[k1 + 1], wt[k1 + 2], wt[k1 + 3]
                                        wa20, wa21, wb20, wb21 = wt[k2], wt[k2 + 1], wt[k2 + 2], wt[k2 + 3]
                                        wa30, wa31, wb30, wb31 = wt[k3], wt[k3 + 1], wt[k3 + 2], wt[k3 + 3]
                                    for q in range(n_pair):
                                        u0 = o0 + np.uint64(q)
                                        u1 = o1 + np.uint64(q)
                                        u2 = o2 + np.uint64(q)
                                        u3 = o3 + np.uint64(q)
                                        va = (((wa00 * xp[u0 + oa0] + wa01 * xp[u0 + oa1]) + (wa10 * xp[u1 + oa0] + wa11 * xp[u1 + oa1]))
                                              + ((wa20 * xp[u2 + oa0] + wa21 * xp[u2 + oa1]) + (wa30 * xp[u3 + oa0] + wa31 * xp[u3 + oa1])))
                                        vb = (((wb00 * xp[u0 + ob0] + wb01 * xp[u0 + ob1]) + (wb10 * xp[u1 + ob0] + wb11 * xp[u1 + ob1]))
                                              + ((wb20 * xp[u2 + ob0] + wb21 * xp[u2 + ob1]) + (wb30 * xp[u3 + ob0] + wb31 * xp[u3 + ob1])))
                                        if j == 0:
                                            acc_a[q] = b + va
                                            acc_b[q] = b + vb
                                        else:
                                            acc_a[q] += va
                                            acc_b[q] += vb
                                for q in range(n_pair):
                                    out[n, co, od, oh, 2 * q] = acc_a[q]
                                    out[n, co, od, oh, 2 * q + 1] = acc_b[q]
            job, victim = _claim(claims, n_jobs, worker, victim)

    return n_nonfinite


@njit(**_JIT)
def _nonfinite_planes(x_bits, exponent, x_shape, n, c0, n_c, d0, n_dp, in_start, n_id):
    """How many values of channels ``c0 ..`` (``n_c``), global planes ``d0 ..`` (``n_dp``, those
    inside the input and the slab) of sample ``n`` are non-finite (all exponent bits set)."""
    n_chan, n_slab = x_shape[1], x_shape[2]
    plane_len = x_shape[3] * x_shape[4]
    count = 0
    for ci in range(n_c):
        for pl in range(n_dp):
            d_local = d0 + pl - in_start
            if d0 + pl < 0 or d0 + pl >= n_id or d_local < 0 or d_local >= n_slab:
                continue
            plane = x_bits[((n * n_chan + c0 + ci) * n_slab + d_local) * plane_len:][:plane_len]
            for i in range(plane_len):
                count += (plane[i] & exponent) == exponent
    return count


@njit(**_JIT)
def _paired_tail(xp, wt, t_row, t_w, rh, n_terms, rel, q, oa0, oa1, b):
    """Phase A's output at position ``q`` of a ``paired_rows`` row of H phase ``rh`` (the odd
    last column)."""
    total = b
    u = rel + np.uint64(q)
    for j in range(n_terms):
        k = t_w[rh, j]
        total += wt[k] * xp[t_row[rh, j] + u + oa0] + wt[k + 1] * xp[t_row[rh, j] + u + oa1]
    return total
