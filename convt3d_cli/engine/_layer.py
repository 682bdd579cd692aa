"""A prepared layer: checked weights and bias plus the slab-wise compute driver.

``PreparedLayer.run_slab`` computes output planes ``[out_start, out_stop)``
along D from an input slab whose first plane is global index ``in_start``
(see ``geometry.input_window``) into a preallocated buffer. Whole-volume calls
are the one-slab case, so streaming reuses exactly the same arithmetic and
gets bitwise-identical results.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

import numpy as np

from .. import geometry
from ..errors import ParameterError, ShapeError
from . import _plan

# Below this many multiply-adds per output voxel and tap (Cin/g * Cout/g), the direct
# gather beats im2col + BLAS: GEMMs with tiny inner dimensions are memory bound.
GEMM_MIN_CHANNEL_PRODUCT = 48

# The GEMM path's scratch (im2col columns + GEMM result) per tile: big enough for BLAS
# to run at full speed, small enough to stay cache-friendly and within the
# "output + 10 %" memory budget.
TILE_BYTES_MIN = 256 * 1024
TILE_BYTES_MAX = 4 * 1024 * 1024
TILE_SHARE_OF_OUTPUT = 0.05
GEMM_MIN_COLUMNS = 256
# Below this many tiles per thread (whole layer), tiles run in order with multi-threaded BLAS.
TILES_PER_WORKER = 2

# Pad all phases to one tap window (one im2col, one tall GEMM) when that costs at most this
# many times the useful multiply-adds (k=3, s=2 costs 64/27 = 2.37).
UNION_MAX_EXTRA = 2.5
# ... and only while the GEMMs are small enough to be memory bound (measured: 16x16 and 3x64
# gain about 20 %, 32x32 loses 5 %).
UNION_MAX_CHANNEL_PRODUCT = 512

# From this many output channels per group on, the register-blocked kernel (blocks of
# 8 channels) beats the FIR kernel.
BLOCKED_MIN_OUT_CHANNELS = 4
# Padded input block of one blocked-kernel job: about half an L2 cache.
BLOCK_BYTES = 512 * 1024

# Repeated input rows one direct-kernel job keeps (per thread): about L2-sized.
REP_BYTES = 1024 * 1024

_DTYPES = {"float32": np.float32, "float64": np.float64}


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
    """

    def __init__(self, input_shape, weight, bias=None, stride=1, padding=0, output_padding=0,
                 dilation=1, groups=1, dtype=np.float32):
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
        self.weight = np.ascontiguousarray(weight.reshape(canonical), dtype=self.dtype)
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
            self.bias = np.ascontiguousarray(bias.reshape(-1), dtype=self.dtype)
        self.use_gemm = self.cin_g * self.cout_g >= GEMM_MIN_CHANNEL_PRODUCT
        self.path = "blocked" if self.cout_g >= BLOCKED_MIN_OUT_CHANNELS else "fir"
        self._blocked = None
        self._static = None
        self._groups = None
        self._stacked = {}

    @property
    def output_shape(self):
        """Full output shape, ``(N, Cout, D, H, W)``."""
        return (self.input_shape[0], self.out_channels) + self.out_spatial

    def _static_tables(self):
        # H and W tables do not depend on the slab; build them once per layer.
        if self._static is None:
            k, s, p, d = (self.params.kernel_size, self.params.stride, self.params.padding,
                          self.params.dilation)
            n_h, n_w = self.input_shape[3:]
            o_h, o_w = self.out_spatial[1:]
            self._static = {
                "h_table": _plan.gather_table(0, o_h, n_h, k[1], s[1], p[1], d[1]),
                "w_fir": _plan.fir_taps(o_w, k[2], s[2], p[2], d[2]),
                "phases_h": _plan.axis_phases(o_h, k[1], s[1], p[1], d[1]),
                "phases_w": _plan.axis_phases(o_w, k[2], s[2], p[2], d[2]),
                "phases_d": _plan.axis_phases(self.out_spatial[0], k[0], s[0], p[0], d[0]),
            }
        return self._static

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
        if self.path == "blocked":
            self._run_blocked(x_slab, in_start, out_start, out_stop, out, progress)
        elif self.use_gemm:
            self._run_gemm(x_slab, in_start, out_start, out_stop, out, progress)
        else:
            self._run_direct(x_slab, in_start, out_start, out_stop, out, progress)

    def _run_direct(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        k, s, p, d = (self.params.kernel_size, self.params.stride, self.params.padding,
                      self.params.dilation)
        static = self._static_tables()
        n_batch = x_slab.shape[0]
        n_planes = out_stop - out_start
        # Progress needs several kernel calls; each call still spreads its planes over all threads.
        step = -(-n_planes // 50) if progress else n_planes
        for o0 in range(out_start, out_stop, step):
            o1 = min(out_stop, o0 + step)
            d_table = _plan.gather_table(o0, o1, self.input_shape[2], k[0], s[0], p[0], d[0])
            kern.direct_fir(x_slab, self.weight, self.bias, out[:, :, o0 - out_start:o1 - out_start],
                            *d_table, *static["h_table"], static["w_fir"], s[2], p[2], in_start,
                            self._direct_chunk(o1 - o0, n_batch))
            if progress:
                progress(n_batch * (o1 - o0))

    def _blocked_plan(self):
        if self._blocked is None:
            kern = _kernels()
            static = self._static_tables()
            self._blocked = _plan.blocked_plan(
                self.weight, static["phases_d"], static["phases_h"], static["phases_w"],
                self.input_shape[3], self.input_shape[4], self.dtype.itemsize, kern.CHANNEL_BLOCK,
                kern.POSITION_BLOCK, BLOCK_BYTES, n_jobs_wanted=4 * _threads(),
                n_outer=self.input_shape[0] * self.groups)
        return self._blocked

    def _run_blocked(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        plan = self._blocked_plan()
        s = self.params.stride
        n_batch = x_slab.shape[0]
        n_planes = out_stop - out_start
        step = -(-n_planes // 50) if progress else n_planes
        for o0 in range(out_start, out_stop, step):
            o1 = min(out_stop, o0 + step)
            kern.blocked_phases(x_slab, plan["w_packed"], plan["terms"], self.bias,
                                out[:, :, o0 - out_start:o1 - out_start], *plan["tables"], s[0], s[1], s[2],
                                *plan["blocking"], in_start, self.input_shape[2], o0)
            if progress:
                progress(n_batch * (o1 - o0))

    def _direct_chunk(self, n_planes, n_batch):
        """Output planes per direct-kernel job: the repeated input rows it caches stay
        near ``REP_BYTES``, and there are enough jobs to keep every thread busy."""
        k, s, d = self.params.kernel_size[0], self.params.stride[0], self.params.dilation[0]
        n_win = self._static_tables()["w_fir"].shape[0]
        rep_plane = self.cin_g * self.input_shape[3] * ((n_win - 1) * self.params.stride[2]
                                                        + self.out_spatial[2]) * self.dtype.itemsize
        in_planes = max(1, REP_BYTES // max(1, rep_plane))
        by_memory = max(1, (in_planes - (k - 1) * d // s - 1) * s)
        jobs_wanted = 4 * _threads()
        by_balance = max(1, -(-(n_batch * self.out_channels * n_planes) // jobs_wanted) // max(1, n_batch * self.out_channels))
        return int(max(1, min(n_planes, by_memory, by_balance)))

    def _run_gemm(self, x_slab, in_start, out_start, out_stop, out, progress):
        kern = _kernels()
        s = self.params.stride
        groups, empty = self._gemm_groups()
        n_batch = x_slab.shape[0]
        n_id = self.input_shape[2]
        workers = _threads()
        # The tile size depends on the layer only, never on the slab: every voxel is then computed
        # by an identically shaped GEMM at the same column, so streamed and in-memory results are
        # bitwise equal (BLAS uses different edge kernels for different shapes).
        out_bytes = self.dtype.itemsize * self.out_channels * int(np.prod(self.out_spatial))
        budget = int(min(TILE_BYTES_MAX, max(TILE_BYTES_MIN, TILE_SHARE_OF_OUTPUT * out_bytes / workers)))
        plans = [pl for pl in (self._group_plan(gr, out_start, out_stop, budget) for gr in groups) if pl]
        # Work items are whole tiles of tile_qd grid planes starting at multiples of tile_qd;
        # different tiles write disjoint output voxels.
        items = [(n, g, pl, t * pl["tile_qd"])
                 for n in range(n_batch) for g in range(self.groups) for pl in plans
                 for t in range(pl["q_lo"] // pl["tile_qd"], -(-pl["q_hi"] // pl["tile_qd"]))]
        cols_size = max((pl["cols_rows"] * pl["tile_cols"] for pl in plans), default=0)
        res_size = max((pl["res_rows"] * pl["tile_cols"] for pl in plans), default=0)
        units_per_item = (out_stop - out_start) * n_batch / max(1, len(items))
        lock = threading.Lock()
        next_item = iter(items)

        def work():
            cols_buf = np.empty(cols_size, dtype=self.dtype)
            res_buf = np.empty(res_size, dtype=self.dtype)
            while True:
                with lock:
                    item = next(next_item, None)
                if item is None:
                    return
                n, g, pl, q0 = item
                n_qd = pl["tile_qd"]
                n_cols = pl["tile_cols"]
                cols = cols_buf[:pl["cols_rows"] * n_cols].reshape(pl["cols_rows"], n_cols)
                res = res_buf[:pl["res_rows"] * n_cols].reshape(pl["res_rows"], n_cols)
                x_g = x_slab[n, g * self.cin_g:(g + 1) * self.cin_g]
                kern.im2col(x_g, cols, pl["shift_d"], pl["shift_h"], pl["shift_w"], q0, n_qd,
                            pl["n_qh"], pl["n_qw"], n_id, in_start)
                np.matmul(pl["weights"][g], cols, out=res)
                kern.scatter_phases(res, out[n, g * self.cout_g:(g + 1) * self.cout_g],
                                    self.bias[g * self.cout_g:(g + 1) * self.cout_g], *pl["scatter"],
                                    s[0], s[1], s[2], q0, n_qd, pl["n_qh"], pl["n_qw"], out_start)
                if progress:
                    with lock:
                        progress(units_per_item)

        # Few, large tiles (small layers): one tile after another, each GEMM on all threads.
        # The choice depends on the whole layer, never on the slab, so streamed slabs
        # run the same code path as the in-memory call.
        whole_tiles = self.input_shape[0] * self.groups * sum(pl["tiles_whole"] for pl in plans)
        if workers > 1 and whole_tiles < TILES_PER_WORKER * workers:
            with _blas_threads(workers):
                work()
            self._fill_bias_only(empty, out, out_start, out_stop)
            return
        with _blas_threads(1):
            n_workers = min(workers, len(items))
            if n_workers <= 1:
                work()
            else:
                with ThreadPoolExecutor(max_workers=n_workers) as pool:
                    for future in [pool.submit(work) for _ in range(n_workers)]:
                        future.result()
        self._fill_bias_only(empty, out, out_start, out_stop)

    def _gemm_groups(self):
        """Phase groups for the GEMM path: exact, or all phases in one padded group.

        Exact groups never multiply by zero but give short GEMMs (``Cout`` rows
        per phase) and one im2col per group; for few channels, when padding all
        phases to a common tap window costs at most ``UNION_MAX_EXTRA`` times the
        useful multiplications, one tall GEMM over one im2col is faster.
        """
        if self._groups is None:
            self._groups = self._choose_groups()
        return self._groups

    def _choose_groups(self):
        static = self._static_tables()
        exact, empty = _plan.phase_groups(static["phases_d"], static["phases_h"], static["phases_w"])
        if len(exact) <= 1 or self.cin_g * self.cout_g > UNION_MAX_CHANNEL_PRODUCT:
            return exact, empty
        union = [_plan.union_phases(static[name]) for name in ("phases_d", "phases_h", "phases_w")]
        padded, empty_union = _plan.phase_groups(*union)
        useful = sum(_plan.real_taps(ph) for group in padded for ph in group.phases)
        computed = sum(len(group.phases) * np.prod([len(sh) for sh in group.base]) for group in padded)
        if len(padded) == 1 and computed <= UNION_MAX_EXTRA * useful:
            return padded, empty_union
        return exact, empty

    def _stacked_weights(self, group):
        """Row (phase, co), column (ci, jd, jh, jw) weight matrix per group; built once per layer."""
        key = id(group)
        if key not in self._stacked:
            kd = np.array([pd.kernel for pd, _, _ in group.phases])
            kh = np.array([ph.kernel for _, ph, _ in group.phases])
            kw = np.array([pw.kernel for _, _, pw in group.phases])
            w = self.weight  # (G, Cin_g, Cout_g, kD, kH, kW)
            if min(kd.min(), kh.min(), kw.min()) < 0:
                # A zero slice after each kernel axis: kernel index -1 (a padded tap) selects it.
                w = np.pad(w, [(0, 0)] * 3 + [(0, 1)] * 3)
            sel = w[:, :, :, kd[:, :, None, None], kh[:, None, :, None], kw[:, None, None, :]]
            # sel: (G, Cin_g, Cout_g, P, Td, Th, Tw) -> (G, P, Cout_g, Cin_g, Td, Th, Tw)
            rows = len(group.phases) * self.cout_g
            self._stacked[key] = np.ascontiguousarray(sel.transpose(0, 3, 2, 1, 4, 5, 6)).reshape(
                self.groups, rows, -1)
        return self._stacked[key]

    def _group_plan(self, group, out_start, out_stop, budget):
        """Tile geometry and stacked weights for one phase group within the slab.

        The im2col grid runs over anchors ``u = q + delta_P``; along H and W it
        starts at ``u0 = min(delta_P)``, along D tiles start at multiples of
        ``tile_qd`` (in ``u``) so tiles are the same for every slab.
        """
        s = self.params.stride
        delta_d, delta_h, delta_w = (np.array(group.delta(axis), dtype=np.int64) for axis in range(3))
        ranges = [_plan.q_range(pd, out_start, out_stop, s[0]) for pd, _, _ in group.phases]
        live = [(lo + dd, hi + dd) for (lo, hi), dd in zip(ranges, delta_d) if hi > lo]
        if not live:
            return None
        u_lo = min(lo for lo, _ in live)
        u_hi = max(hi for _, hi in live)
        counts_d = np.array([pd.count for pd, _, _ in group.phases])
        counts_h = np.array([ph.count for _, ph, _ in group.phases], dtype=np.int64)
        counts_w = np.array([pw.count for _, _, pw in group.phases], dtype=np.int64)
        n_ud_whole = int((delta_d + counts_d).max() - delta_d.min())
        u0_h, u0_w = int(delta_h.min()), int(delta_w.min())
        n_qh = int((delta_h + counts_h).max()) - u0_h
        n_qw = int((delta_w + counts_w).max()) - u0_w
        base_d, base_h, base_w = group.base
        shift_d = np.array(base_d, dtype=np.int64)
        shift_h = np.array(base_h, dtype=np.int64) + u0_h
        shift_w = np.array(base_w, dtype=np.int64) + u0_w
        taps = len(shift_d) * len(shift_h) * len(shift_w)
        cols_rows = self.cin_g * taps
        res_rows = len(group.phases) * self.cout_g
        per_plane = (cols_rows + res_rows) * n_qh * n_qw * self.dtype.itemsize
        # GEMMs narrower than a few hundred columns waste most of BLAS's time on packing.
        min_planes = -(-GEMM_MIN_COLUMNS // (n_qh * n_qw))
        tile_qd = max(1, min(n_ud_whole, max(min_planes, budget // max(1, per_plane))))
        u_lo_whole = int(delta_d.min())
        tiles_whole = -(-(u_lo_whole + n_ud_whole) // tile_qd) - u_lo_whole // tile_qd
        weights = self._stacked_weights(group)
        scatter = (
            np.array([pd.first for pd, _, _ in group.phases], dtype=np.int64),
            np.array([ph.first for _, ph, _ in group.phases], dtype=np.int64),
            np.array([pw.first for _, _, pw in group.phases], dtype=np.int64),
            np.array([lo for lo, _ in ranges], dtype=np.int64),
            np.array([hi for _, hi in ranges], dtype=np.int64),
            counts_h, counts_w, delta_d, delta_h - u0_h, delta_w - u0_w,
        )
        return {
            "q_lo": u_lo, "q_hi": u_hi, "n_qh": n_qh, "n_qw": n_qw, "tile_qd": tile_qd, "tiles_whole": tiles_whole,
            "tile_cols": tile_qd * n_qh * n_qw, "cols_rows": cols_rows, "res_rows": res_rows,
            "shift_d": shift_d, "shift_h": shift_h, "shift_w": shift_w,
            "weights": weights, "scatter": scatter,
        }

    def _fill_bias_only(self, empty, out, out_start, out_stop):
        """Phases that no tap reaches (e.g. dilation a multiple of stride) hold only the bias."""
        s = self.params.stride
        bias = self.bias[None, :, None, None, None]
        for pd, ph, pw in empty:
            lo, hi = _plan.q_range(pd, out_start, out_stop, s[0])
            if hi <= lo:
                continue
            first = pd.first + lo * s[0] - out_start
            last = pd.first + (hi - 1) * s[0] - out_start + 1
            out[:, :, first:last:s[0], ph.first::s[1], pw.first::s[2]] = bias


def _is_int_like(value):
    try:
        return int(value) == value and not isinstance(value, bool)
    except (TypeError, ValueError):
        return False


def _threads():
    """Worker count for the GEMM path: Numba's current thread setting (honours NUMBA_NUM_THREADS)."""
    import numba
    return max(1, numba.get_num_threads())


@contextmanager
def _blas_threads(count):
    """Limit BLAS threads: 1 while our workers run tiles in parallel (no oversubscription),
    or our thread count when tiles run one after another."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - a declared dependency; degrade to oversubscription
        limiter = nullcontext()
    else:
        limiter = threadpool_limits(limits=count, user_api="blas")
    with limiter:
        yield
