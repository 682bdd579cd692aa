"""Every element type and odd shapes, in NIfTI, npy and HDF5: numeric ones are read, others refused.

Values are extreme on purpose (NaN, inf, the integer limits). Every other file
gets an ``info`` case; each format's files go through one ``batch`` run whose per-file
statuses must follow the documentation (*Element types*, *Files, axes and keys*).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import h5_bytes, nifti_bytes, npy_bytes
from fuzzkit import Case, assert_promise, assert_statuses, write

NUMERIC = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float16", "float32", "float64",
           "longdouble", "bool"]


def extreme(dtype, shape=(3, 4, 5)):
    """An array of ``dtype`` holding its limits (and NaN/inf for floats)."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape))
    if dtype.kind == "b":
        values = np.arange(size) % 2 == 0
    elif dtype.kind in "iu":
        info = np.iinfo(dtype)
        values = np.resize(np.array([info.min, info.max, 0, 1], dtype=dtype), size)
    elif dtype.kind == "f":
        info = np.finfo(dtype)
        values = np.resize(np.array([np.nan, np.inf, -np.inf, info.max, info.min, info.tiny, 0, -0.0], dtype=dtype),
                           size)
    elif dtype.kind == "c":
        values = np.resize(np.array([1 + 2j, np.nan], dtype=dtype), size)
    else:
        raise AssertionError(dtype)
    return values.astype(dtype).reshape(shape)


def _batch(new_case, files, tag, extra=()):
    folder = new_case(f"batch-{tag}")
    for name, data, _ in files:
        write(folder, name, data)
    return Case(f"batch of {len(files)} {tag} files", ["batch", *[f[0] for f in files], "--out-dir", "out",
                                                         *extra, "--kernel", "nearest", "--stride", "2", "-q", "--json"],
                folder, output="out", expect={0, 1}, how="; ".join(f"{n}: {h}" for n, _, h in files))


def _infos(new_case, files):
    cases = []
    for name, data, how in files[::2]:       # every file goes through the batch; half also through info
        folder = new_case(f"info-{name}")
        write(folder, name, data)
        cases.append(Case(f"info {how}", ["info", name, "--json"], folder, how=how))
    return cases


def _run(new_case, files, tag, wanted, extra=()):
    cases = _infos(new_case, files)
    batch = _batch(new_case, files, tag, extra)
    outcomes = assert_promise(cases + [batch])
    assert_statuses(batch, outcomes[-1], wanted)


def test_npy_element_types(new_case):
    files, wanted = [], {}
    for number, dtype in enumerate(NUMERIC + ["complex64", "complex128", ">f4", ">i8", ">u2"]):
        name = f"t{number:02d}_{np.dtype(dtype).str.replace('<', 'le').replace('>', 'be').replace('|', '')}.npy"
        files.append((name, npy_bytes(extreme(dtype)), f".npy {dtype} with its limits"))
        wanted[name] = "failed" if np.dtype(dtype).kind == "c" else "ok"
    for label, array in [("bytes", np.array([[[b"ab"]]])), ("unicode", np.array([[["x"]]])),
                         ("datetime", np.zeros((2, 2, 2), dtype="M8[s]")), ("void", np.zeros((2, 2, 2), dtype="V3")),
                         ("structured", np.zeros((2, 2, 2), dtype=[("a", "<f4"), ("b", "<i2")]))]:
        name = f"t_{label}.npy"
        files.append((name, npy_bytes(array), f".npy {label}"))
        wanted[name] = "failed"
    _run(new_case, files, "npy dtypes", wanted)


def test_npy_shapes(new_case):
    shapes = {(1, 1, 1): "ok", (1, 1, 1, 1): "ok", (1, 1, 1, 1, 1): "ok", (3, 1, 2, 2, 2): "ok",
              (64, 1, 1, 1): "ok", (1, 1, 300): "ok", (2,): "failed", (2, 2): "failed", (1, 1, 1, 2, 2, 2): "failed",
              (0, 2, 2): "failed", (2, 0, 2, 2): "failed", (0, 1, 2, 2, 2): "failed"}
    files, wanted = [], {}
    for number, (shape, status) in enumerate(shapes.items()):
        name = f"s{number:02d}.npy"
        files.append((name, npy_bytes(np.ones(shape, dtype=np.float32)), f".npy shape {shape}"))
        wanted[name] = status
    _run(new_case, files, "npy shapes", wanted)
    # The same volumes into NIfTI: a batch (N > 1) becomes the 4th axis (volumes).
    wanted = {name: status for (name, _, _), (shape, status) in zip(files, shapes.items())}
    case = _batch(new_case, files, "npy shapes -> nii", ["--format", "nii"])
    [outcome] = assert_promise([case])
    assert_statuses(case, outcome, wanted)


NIFTI_TYPES = ["uint8", "int8", "int16", "uint16", "int32", "uint32", "int64", "uint64", "float32", "float64",
               "longdouble", "complex64", "complex128"]


def test_nifti_element_types_and_shapes(new_case):
    files, wanted = [], {}
    for number, dtype in enumerate(NIFTI_TYPES):
        for version in (1, 2):
            name = f"d{number:02d}v{version}.nii"
            try:
                data = nifti_bytes(version, extreme(dtype))
            except Exception:  # noqa: BLE001 - a type this nibabel cannot write
                continue
            files.append((name, data, f"NIfTI-{version} {dtype} with its limits"))
            wanted[name] = "failed" if np.dtype(dtype).kind == "c" else "ok"
    rgb = np.zeros((3, 4, 5), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
    files.append(("rgb.nii", nifti_bytes(1, rgb), "NIfTI-1 RGB24"))
    wanted["rgb.nii"] = "failed"
    for number, (shape, status) in enumerate({(1, 1, 1): "ok", (2, 2, 2, 1): "ok", (2, 2, 2, 1, 3): "ok",
                                               (2, 2, 2, 2, 2): "ok", (3, 3): "failed",
                                               (2, 2, 2, 1, 1, 2): "failed",
                                               (2, 2, 2, 1, 1, 1, 2): "failed"}.items()):
        name = f"shape{number}.nii"
        files.append((name, nifti_bytes(1, np.ones(shape, dtype=np.float32)), f"NIfTI-1 shape {shape}"))
        wanted[name] = status
    _run(new_case, files, "NIfTI types", wanted)


def _h5(build):
    return h5_bytes(build)


def test_hdf5_element_types_and_layouts(new_case):
    import h5py

    files, wanted = [], {}

    def add(name, build, status, how):
        try:
            data = _h5(build)
        except Exception as exc:  # noqa: BLE001 - this h5py cannot make it
            pytest.fail(f"cannot build {name}: {exc}")
        files.append((name, data, how))
        wanted[name] = status

    for dtype in ["uint8", "int8", "int64", "uint64", "float16", "float64", "bool", ">f4"]:
        add(f"t_{dtype.replace('>', 'be')}.h5", lambda h, d=dtype: h.create_dataset("volume", data=extreme(d)), "ok",
            f"HDF5 {dtype}")
    add("complex.h5", lambda h: h.create_dataset("volume", data=extreme("complex64")), "failed", "HDF5 complex")
    add("string.h5", lambda h: h.create_dataset("volume", data=np.array([[["ab"]]], dtype=h5py.string_dtype())),
        "failed", "HDF5 variable-length strings")
    add("compound.h5", lambda h: h.create_dataset("volume", data=np.zeros((2, 2, 2), dtype=[("a", "<f4")])), "failed",
        "HDF5 compound")
    add("enum.h5", lambda h: h.create_dataset("volume", data=np.ones((2, 2, 2), dtype="i1"),
                                              dtype=h5py.enum_dtype({"A": 0, "B": 1}, basetype="i1")),
        "ok", "HDF5 enum")
    add("arraytype.h5", lambda h: h.create_dataset("volume", shape=(2, 2, 2), dtype=np.dtype(("<f4", (3,)))),
        None, "HDF5 array element type")
    add("opaque.h5", lambda h: h.create_dataset("volume", data=np.zeros((2, 2, 2), dtype="V4")), "failed",
        "HDF5 opaque")
    add("empty.h5", lambda h: h.create_dataset("volume", data=h5py.Empty("f4")), "failed", "HDF5 empty (null) dataset")
    add("scalar.h5", lambda h: h.create_dataset("volume", data=np.float32(1)), "failed", "HDF5 scalar dataset")
    add("zero.h5", lambda h: h.create_dataset("volume", shape=(0, 4, 4), dtype="f4"), "failed", "HDF5 (0,4,4)")
    add("unwritten.h5", lambda h: h.create_dataset("volume", shape=(3, 4, 5), dtype="f4", chunks=(1, 4, 5),
                                                   maxshape=(None, 4, 5), fillvalue=np.nan), "ok",
        "HDF5 chunked, never written (fill value NaN)")
    add("filters.h5", lambda h: h.create_dataset("volume", data=extreme("float32"), chunks=(1, 2, 5), shuffle=True,
                                                 fletcher32=True, compression="gzip", compression_opts=9), "ok",
        "HDF5 shuffle+fletcher32+gzip")
    add("scaleoffset.h5", lambda h: h.create_dataset("volume", data=np.arange(60, dtype="i4").reshape(3, 4, 5),
                                                     chunks=(3, 4, 5), scaleoffset=0), "ok", "HDF5 scale-offset")
    add("softlink.h5", lambda h: h.__setitem__("volume", h5py.SoftLink("/nowhere")), "failed",
        "HDF5 dangling soft link")
    add("extlink.h5", lambda h: h.__setitem__("volume", h5py.ExternalLink("missing.h5", "/x")), "failed",
        "HDF5 external link to a missing file")

    def virtual(h):
        layout = h5py.VirtualLayout(shape=(3, 4, 5), dtype="f4")
        layout[:] = h5py.VirtualSource("missing.h5", "data", shape=(3, 4, 5))
        h.create_virtual_dataset("volume", layout, fillvalue=0)

    add("virtual.h5", virtual, "failed", "HDF5 virtual dataset over another (missing) file: refused like an "
        "external link, since HDF5 would open whatever the name finds")
    add("deep.h5", lambda h: h.create_dataset("/".join(["g"] * 60) + "/volume", data=np.ones((2, 2, 2), "f4")), "ok",
        "HDF5 dataset 60 groups deep")

    def many(h):
        for number in range(300):
            h.create_dataset(f"d{number}", data=np.ones((2, 2, 2), "f4"))
        h.create_dataset("volume", data=np.ones((2, 2, 2), "f4"))

    add("many.h5", many, "ok", "HDF5 301 datasets")

    def attrs(h):
        dset = h.create_dataset("volume", data=np.ones((2, 2, 2), "f4"))
        dset.attrs["spacing"] = np.array([np.nan, np.inf, 0.0])
        dset.attrs["voxel_size"] = "garbage"
        dset.attrs["element_size_um"] = np.zeros((3, 3))
        dset.attrs["bytes"] = np.void(b"\xff" * 8)
        h.attrs["stride"] = np.array([[1, 2], [3, 4]])

    add("attrs.h5", attrs, "ok", "HDF5 hostile voxel-size attributes")
    _run(new_case, files, "HDF5 types", {name: status for name, status in wanted.items() if status})
