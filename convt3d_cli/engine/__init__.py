"""The ConvTranspose3d engine: ``conv_transpose3d`` and the ``ConvTranspose3d`` module.

Semantics are exactly ``torch.nn.functional.conv_transpose3d`` (and MegEngine's
``ConvTranspose3d``): cross-correlation, zero padding, groups, dilation and
output padding per axis. Numba is imported on the first call, not here.
"""

from __future__ import annotations

import math

import numpy as np

from .. import geometry
from .. import threads as _threads
from ..errors import ParameterError, ShapeError
from ._layer import PreparedLayer, compute_dtype

__all__ = ["conv_transpose3d", "ConvTranspose3d", "PreparedLayer", "ProgressAdapter", "compute_dtype"]


def conv_transpose3d(x, weight, bias=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1,
                     *, dtype=None, out=None, threads=None, progress=None, path=None):
    """Transposed 3-D convolution, equal to ``torch.nn.functional.conv_transpose3d``.

    Parameters
    ----------
    x : array_like
        Input of shape ``(N, Cin, D, H, W)`` or ``(Cin, D, H, W)``. Integer data is converted.
    weight : array_like
        ``(Cin, Cout/groups, kD, kH, kW)`` (PyTorch; MegEngine with groups=1) or
        ``(groups, Cin/groups, Cout/groups, kD, kH, kW)`` (MegEngine grouped).
    bias : array_like, optional
        ``(Cout,)`` or ``(1, Cout, 1, 1, 1)``.
    stride, output_padding, dilation : int or tuple of 3 ints
    padding : int, 3 ints, 6 ints or two triples
        Crop of the full result at both ends of each axis; ``(bD, bH, bW, eD, eH, eW)``
        or ``((bD, bH, bW), (eD, eH, eW))`` crops the start and the end differently
        (ONNX ``pads``, "same" padding).
    groups : int
    dtype : {"float32", "float64"}, optional
        Compute and result dtype. Default: float64 when ``x`` is float64, else float32.
    out : ndarray, optional
        Preallocated, C-contiguous result of the right shape and dtype, apart from
        the input's memory.
    threads : int, optional
        Numba threads for this call (default: ``NUMBA_NUM_THREADS`` or all cores).
    progress : callable, optional
        ``progress(done, total)`` is called as output planes are finished.
    path : str, optional
        Compute path to use instead of the engine's choice (one of
        ``PreparedLayer``'s ``PATHS``, e.g. ``"gemm"`` or ``"blocked-5x16"``); like the
        ``CONVT3D_PATH`` environment variable, for comparing or pinning kernels. A path
        that cannot run the layer falls back to one that can.

    Returns
    -------
    numpy.ndarray
        ``(N, Cout, D', H', W')`` or ``(Cout, D', H', W')`` (same rank as ``x``) where
        ``D' = (D - 1) * stride - 2 * padding + dilation * (kD - 1) + output_padding + 1``
        (``- bD - eD`` in place of ``- 2 * padding`` for begin/end crops).

    Raises
    ------
    ParameterError
        For an invalid stride, padding, output_padding, dilation, groups or dtype.
    ShapeError
        For a wrong input or weight rank, a channel mismatch or a wrong bias shape.

    Examples
    --------
    >>> import numpy as np
    >>> x = np.ones((1, 1, 2, 2, 2), dtype=np.float32)
    >>> conv_transpose3d(x, np.ones((1, 1, 2, 2, 2)), stride=2).shape
    (1, 1, 4, 4, 4)
    """
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise ShapeError(f"input must be numeric, got dtype {x.dtype}")
    ctype = compute_dtype(x.dtype, dtype)
    layer = PreparedLayer(x.shape, weight, bias, stride, padding, output_padding, dilation, groups, ctype,
                          path=path)
    x5 = np.ascontiguousarray(x.reshape(layer.input_shape), dtype=ctype)
    full_shape = layer.output_shape
    if out is None:
        result = np.empty(full_shape, dtype=ctype)
    else:
        result = _check_out(out, full_shape if layer.batched else full_shape[1:], ctype).reshape(full_shape)
        if np.may_share_memory(result, x5):
            raise ShapeError("out must not share memory with the input")
    total = full_shape[0] * full_shape[2]
    report = ProgressAdapter(progress, total) if progress else None
    previous = None
    if threads is not None:
        if not isinstance(threads, (int, np.integer)) or threads < 1:
            raise ParameterError("threads", f"threads must be a positive integer, got {threads!r}")
        previous = _threads.use(threads)
    try:
        layer.run_slab(x5, 0, 0, full_shape[2], result, report)
    finally:
        if previous is not None:
            _threads.use(previous)
    if report:
        report.finish()
    return result if layer.batched else result[0]


def _check_out(out, shape, dtype):
    if not isinstance(out, np.ndarray):
        raise ShapeError("out must be a NumPy array")
    if out.shape != tuple(shape) or out.dtype != dtype or not out.flags.c_contiguous:
        raise ShapeError(f"out must be a C-contiguous {np.dtype(dtype).name} array of shape {tuple(shape)}, "
                         f"got {out.dtype} {out.shape}")
    if not out.flags.writeable:
        raise ShapeError("out must be writeable")
    return out


class ProgressAdapter:
    """Turn the engine's fractional plane counts into ``progress(done, total)`` calls.

    ``run_slab`` reports finished output planes as (fractional) units; callers
    that drive several slabs keep one adapter for the whole run.
    """

    def __init__(self, callback, total):
        self.callback, self.total, self.done, self.reported = callback, total, 0.0, 0

    def __call__(self, units):
        self.done += units
        whole = min(self.total, int(self.done + 1e-9))
        if whole > self.reported:
            self.reported = whole
            self.callback(whole, self.total)

    def slab_done(self, planes_so_far):
        """Snap to an exact count after a slab (fractions may not add up exactly)."""
        self.done = float(planes_so_far)
        self(0)

    def finish(self):
        if self.reported < self.total:
            self.reported = self.total
            self.callback(self.total, self.total)


class ConvTranspose3d:
    """A ConvTranspose3d layer holding NumPy weights, like ``torch.nn.ConvTranspose3d``.

    Parameters
    ----------
    in_channels, out_channels : int
    kernel_size, stride, output_padding, dilation : int or tuple of 3 ints
    padding : int, 3 ints, 6 ints or two triples
        As for :func:`conv_transpose3d`.
    groups : int
    bias : bool
        Whether the layer has a learnable bias.
    dtype : {"float32", "float64"}
    seed : int or numpy.random.Generator, optional
        Source of the initial weights (``rng`` is an alias). Weights and bias are drawn
        uniformly from ``±1/sqrt(fan_in)`` with ``fan_in = out_channels / groups * prod(kernel_size)``,
        PyTorch's default initialisation for transposed convolutions.

    Examples
    --------
    >>> m = ConvTranspose3d(3, 64, 3, stride=2, padding=1)
    >>> m.output_shape((16, 3, 32, 32, 32))
    (16, 64, 63, 63, 63)
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 dilation=1, groups=1, bias=True, *, dtype="float32", seed=None, rng=None):
        self.params = geometry.LayerParams.create(kernel_size, stride, padding, output_padding, dilation, groups)
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
                raise ParameterError(name, f"{name} must be a positive integer, got {value!r}")
            if value % self.params.groups:
                raise ParameterError("groups", f"{name} ({value}) must be divisible by groups ({self.params.groups})")
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.dtype = compute_dtype(None, dtype if dtype is not None else "float32")
        generator = np.random.default_rng(rng if rng is not None else seed)
        k = self.params.kernel_size
        fan_in = self.out_channels // self.params.groups * k[0] * k[1] * k[2]
        bound = 1.0 / math.sqrt(fan_in)
        shape = (self.in_channels, self.out_channels // self.params.groups) + k
        self.weight = generator.uniform(-bound, bound, size=shape).astype(self.dtype)
        self.bias = generator.uniform(-bound, bound, size=self.out_channels).astype(self.dtype) if bias else None

    @property
    def kernel_size(self):
        return self.params.kernel_size

    @property
    def stride(self):
        return self.params.stride

    @property
    def padding(self):
        """3 values, or 6 (begins then ends) when the two ends of an axis are cropped differently."""
        return self.params.padding_spec

    @property
    def output_padding(self):
        return self.params.output_padding

    @property
    def dilation(self):
        return self.params.dilation

    @property
    def groups(self):
        return self.params.groups

    def output_shape(self, input_shape):
        """Output shape for ``input_shape`` (``(N, C, D, H, W)`` or ``(C, D, H, W)``)."""
        p = self.params
        full, batched = geometry.check_input_shape(input_shape)
        if full[1] != self.in_channels:
            raise ShapeError(f"channel mismatch: the layer expects {self.in_channels} input channels, "
                             f"got {full[1]}")
        return geometry.output_shape(input_shape, self.out_channels, p.kernel_size, p.stride, p.padding_spec,
                                     p.output_padding, p.dilation, p.groups)

    def forward(self, x, *, out=None, threads=None, progress=None, path=None):
        """Apply the layer to ``x``; see :func:`conv_transpose3d`."""
        p = self.params
        return conv_transpose3d(x, self.weight, self.bias, p.stride, p.padding_spec, p.output_padding, p.dilation,
                                p.groups, dtype=self.dtype.name, out=out, threads=threads, progress=progress,
                                path=path)

    __call__ = forward

    def __repr__(self):
        p = self.params
        parts = [f"{self.in_channels}, {self.out_channels}, kernel_size={p.kernel_size}", f"stride={p.stride}"]
        if p.padding_spec != (0, 0, 0):
            parts.append(f"padding={p.padding_spec}")
        if p.output_padding != (0, 0, 0):
            parts.append(f"output_padding={p.output_padding}")
        if p.dilation != (1, 1, 1):
            parts.append(f"dilation={p.dilation}")
        if p.groups != 1:
            parts.append(f"groups={p.groups}")
        if self.bias is None:
            parts.append("bias=False")
        if self.dtype != np.float32:
            parts.append(f"dtype={self.dtype.name}")
        return f"ConvTranspose3d({', '.join(parts)})"
