"""Built-in depthwise upsampling kernels: ``nearest`` and ``linear``.

See ``docs/behaviour.md``, *Built-in kernels*, for what users may rely on.

Both are ordinary transposed convolutions with one group per channel, so they
run on the same engine as user weights:

``nearest``
    kernel size ``s``, padding 0, all-ones weights: every voxel becomes an
    ``s x s x s`` block (``np.repeat`` along each axis).
``linear``
    Equals ``torch.nn.functional.interpolate(mode="trilinear",
    align_corners=False)`` for integer factors. Per axis the kernel has
    ``k = 2*s - s % 2`` taps of the tent ``1 - |(j - (k-1)/2) / s|`` and
    padding ``(k - s) // 2``, which centres input voxel ``i`` on output
    coordinate ``i*s + (s-1)/2`` (half-pixel alignment). On its own that tent
    fades the outermost ``s//2`` output voxels towards zero, because their
    missing neighbour counts as 0. Interpolation instead clamps to the edge
    voxel, so the input is replicate-padded by one voxel per side and the
    padding grows by ``s``; the output size stays ``s * n``:
    ``(n + 2 - 1)*s - 2*(p + s) + k = (n - 1)*s - 2*p + k = n*s``.

The geometry reported to users (formula, output affine) uses the equivalent
*unpadded* layer ``(k, s, (k - s)//2)``, which has the same output size and,
through :func:`geometry.output_affine`, the half-pixel aligned affine.
"""

from __future__ import annotations

import numpy as np

from .errors import ParameterError
from .geometry import LayerParams, as_triple, check_input_shape

KERNELS = ("nearest", "linear")


def _check_name(name):
    if name not in KERNELS:
        raise ParameterError("kernel", f"unknown built-in kernel {name!r}; choose one of {', '.join(KERNELS)}")


def kernel_size(name, stride):
    """Per-axis kernel size of a built-in kernel for the given stride(s)."""
    _check_name(name)
    s = as_triple(stride, "stride")
    if name == "nearest":
        return s
    return tuple(2 * v - v % 2 for v in s)


def builtin_params(name, stride, channels=1):
    """Layer parameters that describe a built-in kernel (for the formula and the affine).

    Parameters
    ----------
    name : {"nearest", "linear"}
    stride : int or 3 ints
        Integer upsampling factor per axis.
    channels : int, optional
        Number of channels; the layer is depthwise, so ``groups = channels``.

    Returns
    -------
    LayerParams
        ``kernel_size = k``, ``stride = s``, ``padding = (k - s)//2``; its output
        size is ``s * n`` on every axis.

    Raises
    ------
    ParameterError
        For an unknown name or an invalid stride.
    """
    k = kernel_size(name, stride)
    s = as_triple(stride, "stride")
    if min(s) < 1:
        raise ParameterError("stride", f"stride must be >= 1, got {stride!r}")
    padding = tuple((kv - sv) // 2 for kv, sv in zip(k, s))
    return LayerParams.create(k, s, padding, 0, 1, channels)


def _taps(name, k, s):
    """1-D weights of one axis."""
    if name == "nearest":
        return np.ones(k)
    j = np.arange(k, dtype=np.float64)
    return 1.0 - np.abs((j - (k - 1) / 2.0) / s)


def builtin_weight(name, stride, channels=1, dtype="float32"):
    """Depthwise weight ``(channels, 1, kD, kH, kW)`` of a built-in kernel (PyTorch layout).

    The 3-D kernel is the outer product of the per-axis taps, so the
    interpolation is separable exactly like trilinear interpolation.
    """
    k = kernel_size(name, stride)
    s = as_triple(stride, "stride")
    taps = [_taps(name, kv, sv) for kv, sv in zip(k, s)]
    kernel = np.einsum("i,j,k->ijk", *taps).astype(dtype)
    # A real (writeable) array, as from a weights file: a broadcast view is read-only.
    return np.array(np.broadcast_to(kernel, (channels, 1) + kernel.shape), order="C")


def apply_builtin(x, name, stride, *, dtype="float32", threads=None, progress=None):
    """Upsample with a built-in kernel.

    Parameters
    ----------
    x : numpy.ndarray
        ``(N, C, D, H, W)`` or ``(C, D, H, W)``; each channel is upsampled on its own.
    name : {"nearest", "linear"}
    stride : int or 3 ints
        Integer factor per axis.
    dtype : {"float32", "float64"}
        Compute dtype (the result's dtype).
    threads, progress
        Passed to :func:`convt3d_cli.engine.conv_transpose3d`.

    Returns
    -------
    numpy.ndarray
        Same rank as ``x``, spatial shape ``s * (D, H, W)``.
    """
    from .engine import conv_transpose3d

    x = np.asarray(x)
    channels = check_input_shape(x.shape)[0][1]
    params = builtin_params(name, stride, channels)
    weight = builtin_weight(name, stride, channels, dtype)
    if name == "nearest":
        return conv_transpose3d(x, weight, stride=params.stride, padding=params.padding,
                                groups=channels, dtype=dtype, threads=threads, progress=progress)
    # Replicate one edge voxel per side so that the border output voxels see
    # the edge value where interpolation clamps; the extra padding s per side
    # crops what the added voxels would otherwise contribute beyond the edge.
    pad = [(0, 0)] * (x.ndim - 3) + [(1, 1)] * 3
    padded = np.pad(np.asarray(x, dtype=dtype), pad, mode="edge")
    padding = tuple(p + s for p, s in zip(params.padding, params.stride))
    return conv_transpose3d(padded, weight, stride=params.stride, padding=padding,
                            groups=channels, dtype=dtype, threads=threads, progress=progress)
