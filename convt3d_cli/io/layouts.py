"""Weight layouts of the frameworks, and their conversion to the engine's (PyTorch's).

The engine takes ``(Cin, Cout/groups, kD, kH, kW)`` or MegEngine's grouped
``(groups, Cin/groups, Cout/groups, kD, kH, kW)``. Other frameworks store a
transposed-convolution kernel differently:

``torch``, ``megengine``
    ``(Cin, Cout/groups, kD, kH, kW)``; MegEngine's grouped 6-D form as is.
``keras``
    ``(kD, kH, kW, Cout, Cin)``. TensorFlow's ``conv3d_transpose`` is the
    gradient of ``conv3d`` with that kernel, and so is PyTorch's
    ``conv_transpose3d`` with ``(Cin, Cout, k...)``: the same taps, only the
    axes move (no flip).
``flax``
    ``(kD, kH, kW, Cin, Cout)`` of ``flax.linen.ConvTranspose`` with its default
    ``transpose_kernel=False``: a plain convolution of the stride-dilated input,
    so the taps run the other way and the spatial axes are flipped as well.
"""

from __future__ import annotations

import numpy as np

from ..errors import ParameterError, ShapeError

#: Layout name -> what it looks like, for messages and ``--help``.
LAYOUTS = {
    "torch": "(Cin, Cout/groups, kD, kH, kW)",
    "megengine": "(Cin, Cout, kD, kH, kW) or (groups, Cin/groups, Cout/groups, kD, kH, kW)",
    "keras": "(kD, kH, kW, Cout, Cin)",
    "flax": "(kD, kH, kW, Cin, Cout)",
}

# Axis order taking a 5-D stored kernel to (Cin, Cout, kD, kH, kW), and whether taps flip.
_PERMUTATIONS = {"keras": ((4, 3, 0, 1, 2), False), "flax": ((3, 4, 0, 1, 2), True)}


def check_layout(layout):
    """Refuse an unknown layout name; return it."""
    if layout not in LAYOUTS:
        raise ParameterError("weight_layout", f"weight layout must be one of {', '.join(LAYOUTS)}, "
                                              f"got {layout!r}")
    return layout


def engine_shape(shape, layout, where):
    """The shape a stored weight of ``layout`` has once converted (header only).

    Raises
    ------
    ShapeError
        A channels-last layout needs a 5-D weight (those frameworks have no grouped form).
    """
    shape = tuple(int(n) for n in shape)
    check_layout(layout)
    if layout not in _PERMUTATIONS:
        return shape
    if len(shape) != 5:
        raise ShapeError(f"{where}: a {layout} weight must be 5-D {LAYOUTS[layout]}; got shape {shape}")
    order, _ = _PERMUTATIONS[layout]
    return tuple(shape[i] for i in order)


def to_engine(weight, layout, where=""):
    """Convert a stored weight of ``layout`` to the engine's layout (a C-contiguous copy if moved).

    Parameters
    ----------
    weight : numpy.ndarray
    layout : str
        A key of :data:`LAYOUTS`.
    where : str
        File and tensor, for messages.

    Returns
    -------
    numpy.ndarray
    """
    engine_shape(weight.shape, layout, where)
    if layout not in _PERMUTATIONS:
        return weight
    order, flip = _PERMUTATIONS[layout]
    moved = np.transpose(weight, order)
    if flip:
        moved = moved[:, :, ::-1, ::-1, ::-1]
    return np.ascontiguousarray(moved)
