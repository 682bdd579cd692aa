"""Slow, obviously-correct NumPy references for the engine tests.

``conv_transpose3d_ref`` scatters every kernel tap as one strided slice
assignment on an uncropped canvas, then crops the padding: the textbook
definition, with no phase tricks shared with the engine. ``conv3d_ref`` is the
plain correlation, used for the adjoint identity.
"""

import numpy as np


def _triple(v):
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


def conv_transpose3d_ref(x, w, bias=None, stride=1, padding=0, output_padding=0, dilation=1, groups=1):
    """x (N, Cin, D, H, W); w (Cin, Cout/groups, kD, kH, kW); float64 result.

    ``padding`` may hold 6 values (begin D,H,W then end D,H,W): the canvas is cropped
    by the begins at the start and by the ends at the end.
    """
    if isinstance(padding, (tuple, list)) and len(padding) == 6:
        p, p_end = tuple(padding[:3]), tuple(padding[3:])
    else:
        p = p_end = _triple(padding)
    s, op, d = (_triple(v) for v in (stride, output_padding, dilation))
    x = np.asarray(x, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n, cin = x.shape[:2]
    spatial = x.shape[2:]
    cout_g = w.shape[1]
    k = w.shape[2:]
    cin_g = cin // groups
    full = [(spatial[a] - 1) * s[a] + d[a] * (k[a] - 1) + 1 + op[a] for a in range(3)]
    canvas = np.zeros((n, cout_g * groups) + tuple(full))
    for ci in range(cin):
        g = ci // cin_g
        for co in range(cout_g):
            for kd in range(k[0]):
                for kh in range(k[1]):
                    for kw in range(k[2]):
                        starts = (kd * d[0], kh * d[1], kw * d[2])
                        sl = tuple(slice(starts[a], starts[a] + (spatial[a] - 1) * s[a] + 1, s[a]) for a in range(3))
                        canvas[(slice(None), g * cout_g + co) + sl] += x[:, ci] * w[ci, co, kd, kh, kw]
    outsize = [full[a] - p[a] - p_end[a] for a in range(3)]
    out = canvas[:, :, p[0]:p[0] + outsize[0], p[1]:p[1] + outsize[1], p[2]:p[2] + outsize[2]]
    if bias is not None:
        out = out + np.asarray(bias, dtype=np.float64).reshape(1, -1, 1, 1, 1)
    return out


def conv3d_ref(y, w, stride=1, padding=0, dilation=1, groups=1, in_spatial=None):
    """Correlation adjoint to ``conv_transpose3d_ref`` (no bias): maps the output grid back to the input grid.

    y (N, Cout, D', H', W'); w (Cin, Cout/groups, k...); returns (N, Cin, *in_spatial).
    """
    s, p, d = (_triple(v) for v in (stride, padding, dilation))
    y = np.asarray(y, dtype=np.float64)
    w = np.asarray(w, dtype=np.float64)
    n = y.shape[0]
    cin = w.shape[0]
    cout_g = w.shape[1]
    k = w.shape[2:]
    cin_g = cin // groups
    x = np.zeros((n, cin) + tuple(in_spatial))
    for i0 in range(in_spatial[0]):
        for i1 in range(in_spatial[1]):
            for i2 in range(in_spatial[2]):
                for kd in range(k[0]):
                    for kh in range(k[1]):
                        for kw in range(k[2]):
                            o = (i0 * s[0] - p[0] + kd * d[0], i1 * s[1] - p[1] + kh * d[1],
                                 i2 * s[2] - p[2] + kw * d[2])
                            if all(0 <= o[a] < y.shape[2 + a] for a in range(3)):
                                for ci in range(cin):
                                    g = ci // cin_g
                                    x[:, ci, i0, i1, i2] += y[:, g * cout_g:(g + 1) * cout_g, o[0], o[1], o[2]] @ w[ci, :, kd, kh, kw]
    return x
