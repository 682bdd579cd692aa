"""Zarr stores for the tests (tests/stores, tests/fuzz): NGFF 0.4/0.5 images and plain arrays written with
zarr-python. Kept out of conftest.py: with several conftest modules, ``from conftest import ...`` finds
whichever one was imported first."""

import hashlib
import os

import numpy as np

SPACE = [{"name": n, "type": "space", "unit": "micrometer"} for n in "zyx"]


def write_image(path, data, *, fmt=3, axes="zyx", chunks=None, scale=(1.0, 1.0, 1.0), translation=None,
                key="0", ngff=True, levels=None):
    """Write ``data`` as an OME-Zarr image (NGFF 0.5 for Zarr v3, 0.4 for v2) or a plain array.

    ``axes`` names the array's dimensions (``"czyx"``, ``"tczyx"``); ``scale`` and
    ``translation`` are the spatial (z, y, x) parts; other axes get scale 1. ``levels``
    adds more arrays ``{key: (data, spatial_scale)}`` to the multiscale image.
    """
    import zarr
    from zarr.storage import LocalStore

    group = zarr.open_group(LocalStore(str(path)), mode="w", zarr_format=fmt)
    entries = [(key, data, scale)] + [(k, d, s) for k, (d, s) in (levels or {}).items()]
    datasets = []
    for name, values, spatial in entries:
        kwargs = {"shape": values.shape, "chunks": chunks or tuple(min(8, n) for n in values.shape),
                  "dtype": values.dtype, "fill_value": 0}
        if fmt == 3:
            kwargs["dimension_names"] = list(axes)
        array = group.create_array(name, **kwargs)
        array[...] = values
        full = [1.0] * (len(axes) - 3) + list(spatial)
        transforms = [{"type": "scale", "scale": full}]
        if translation is not None and name == key:
            transforms.append({"type": "translation", "translation": [0.0] * (len(axes) - 3) + list(translation)})
        datasets.append({"path": name, "coordinateTransformations": transforms})
    if ngff:
        kinds = {"t": "time", "c": "channel"}
        meta = {"name": "image", "axes": [{"name": a, "type": kinds.get(a, "space"),
                                           **({"unit": "micrometer"} if a in "zyx" else {})} for a in axes],
                "datasets": datasets}
        if fmt == 3:
            group.attrs.update({"ome": {"version": "0.5", "multiscales": [meta]}})
        else:
            group.attrs.update({"multiscales": [{"version": "0.4", **meta}]})
    return str(path)


def read_array(path, key="0"):
    import zarr

    return zarr.open_array(str(path), path=key, mode="r")[...]


def tree_digest(path):
    digest = hashlib.sha256()
    for folder, dirs, files in sorted(os.walk(path)):
        dirs.sort()
        for name in sorted(files):
            digest.update(name.encode())
            with open(os.path.join(folder, name), "rb") as handle:
                digest.update(handle.read())
    return digest.hexdigest()


def same_bits(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
