"""NIfTI-1 and NIfTI-2 headers with hostile fields: ``info``, ``shape`` and a ``batch`` run of each file.

Every file is a valid base image (``conftest.make_base``) whose header bytes are
rewritten field by field through nibabel's header layout, with no validation:
named cases for the fields the issue lists, then seeded random mutations of
one to three fields. ``.nii.gz`` variants are the same bytes gzip-compressed.
"""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import pytest

from fuzzkit import Case, assert_promise, gz, write

NAN, INF = math.nan, math.inf
HEADER_SIZE = {1: 348, 2: 540}


def _layout(version):
    import nibabel as nib

    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    return klass.template_dtype.newbyteorder("<")


def _fit(value, dtype):
    """``value`` converted to a field's type: integers clipped to its range, floats as they are."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.array(min(max(int(value), info.min), info.max), dtype=dtype)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            return np.array(value, dtype=np.float64).astype(dtype)
    if dtype.kind == "S":
        return np.array(bytes(value)[:dtype.itemsize], dtype=dtype)
    raise AssertionError(dtype)


def mutate(raw, version, changes):
    """Header bytes of ``raw`` with ``changes`` applied: ``(field, index or None, value)``.

    ``field`` may also be ``esize``/``ecode``/``extender`` (the first extension's raw bytes).
    """
    buf = bytearray(raw)
    size = HEADER_SIZE[version]
    header = np.frombuffer(buf, dtype=_layout(version), count=1)
    for name, index, value in changes:
        if name == "extender":
            buf[size:size + 4] = bytes(value)
            continue
        if name in ("esize", "ecode"):
            struct.pack_into("<i", buf, size + 4 + (0 if name == "esize" else 4),
                             max(-2 ** 31, min(2 ** 31 - 1, int(value))))
            continue
        column = header[name]
        if index is None and column.ndim == 1:
            column[0] = _fit(value, column.dtype)
        elif index is None:
            column[0, :] = _fit(value, column.dtype)
        else:
            column[0, index] = _fit(value, column.dtype)
    return bytes(buf)


def huge_dim(version):
    return 2 ** 40 if version == 2 else 32767


# (label, changes) -- the fields named in the issue first.
NAMED = [
    ("pixdim1=nan", [("pixdim", 1, NAN)]),
    ("pixdim1=inf", [("pixdim", 1, INF)]),
    ("pixdim2=0", [("pixdim", 2, 0.0)]),
    ("pixdim3=-2", [("pixdim", 3, -2.0)]),
    ("pixdim1=1e38", [("pixdim", 1, 1e38)]),
    ("pixdim0(qfac)=nan", [("pixdim", 0, NAN)]),
    ("pixdim=nan,forms=0", [("pixdim", 1, NAN), ("qform_code", None, 0), ("sform_code", None, 0)]),
    ("scl_slope=nan", [("scl_slope", None, NAN)]),
    ("scl_slope=inf", [("scl_slope", None, INF)]),
    ("scl_slope=0", [("scl_slope", None, 0.0)]),
    ("scl_slope=1e38", [("scl_slope", None, 1e38)]),
    ("scl_inter=nan", [("scl_slope", None, 2.0), ("scl_inter", None, NAN)]),
    ("scl_inter=inf", [("scl_inter", None, INF)]),
    ("scl_inter=1e38", [("scl_slope", None, 1e38), ("scl_inter", None, 1e38)]),
    ("quatern_b=nan", [("quatern_b", None, NAN)]),
    ("quatern_c=inf", [("quatern_c", None, INF)]),
    ("quatern_b=2", [("quatern_b", None, 2.0), ("quatern_c", None, 2.0)]),
    ("qoffset_x=nan", [("qoffset_x", None, NAN)]),
    ("quatern=nan,sform=0", [("quatern_d", None, NAN), ("sform_code", None, 0)]),
    ("srow=0", [("srow_x", None, 0.0), ("srow_y", None, 0.0), ("srow_z", None, 0.0)]),
    ("srow_x=nan", [("srow_x", None, NAN)]),
    ("srow_z=inf", [("srow_z", 2, INF)]),
    ("srow=nan,qform=0", [("srow_y", 1, NAN), ("qform_code", None, 0)]),
    ("qform_code=-1", [("qform_code", None, -1)]),
    ("sform_code=99", [("sform_code", None, 99)]),
    ("xyzt_units=255", [("xyzt_units", None, 255)]),
    ("xyzt_units=0x47", [("xyzt_units", None, 0x47)]),
    ("intent_code=9999", [("intent_code", None, 9999)]),
    ("intent_code=-1", [("intent_code", None, -1)]),
    ("intent_code=1002,p1=nan", [("intent_code", None, 1002), ("intent_p1", None, NAN)]),
    ("dim0=0", [("dim", 0, 0)]),
    ("dim0=-1", [("dim", 0, -1)]),
    ("dim0=8", [("dim", 0, 8)]),
    ("dim0=9", [("dim", 0, 9)]),
    ("dim0=100", [("dim", 0, 100)]),
    ("dim1=0", [("dim", 1, 0)]),
    ("dim1=-1", [("dim", 1, -1)]),
    ("dim0=4,dim4=0", [("dim", 0, 4), ("dim", 4, 0)]),
    ("dim0=4,dim4=huge", [("dim", 0, 4), ("dim", 4, "HUGE")]),
    ("dims=huge", [("dim", 1, "HUGE"), ("dim", 2, "HUGE"), ("dim", 3, "HUGE")]),
    ("dim0=5,dim4=2,dim5=3", [("dim", 0, 5), ("dim", 4, 2), ("dim", 5, 3)]),
    ("datatype=12345", [("datatype", None, 12345)]),
    ("datatype=0", [("datatype", None, 0)]),
    ("datatype=32(complex64)", [("datatype", None, 32), ("bitpix", None, 64)]),
    ("datatype=128(rgb24)", [("datatype", None, 128), ("bitpix", None, 24)]),
    ("datatype=1536(float128)", [("datatype", None, 1536), ("bitpix", None, 128)]),
    ("datatype=1(binary)", [("datatype", None, 1), ("bitpix", None, 1)]),
    ("bitpix=0", [("bitpix", None, 0)]),
    ("vox_offset=0", [("vox_offset", None, 0)]),
    ("vox_offset=1", [("vox_offset", None, 1)]),
    ("vox_offset=1e9", [("vox_offset", None, 1e9)]),
    ("vox_offset=-1", [("vox_offset", None, -1)]),
    ("vox_offset=nan", [("vox_offset", None, NAN)]),
    ("sizeof_hdr=0", [("sizeof_hdr", None, 0)]),
    ("magic=garbage", [("magic", None, b"\xff\xfe\x00\x01\xff\xfe\x00\x01")]),
    ("magic=ni1/ni2(pair)", [("magic", None, "PAIR")]),
    ("esize=-8", [("esize", None, -8)]),
    ("esize=2**31-1", [("esize", None, 2 ** 31 - 1)]),
    ("esize=7", [("esize", None, 7)]),
    ("ecode=garbage", [("ecode", None, -12345)]),
    ("extender=0,vox_offset=huge", [("extender", None, b"\0\0\0\0"), ("vox_offset", None, 2 ** 31)]),
    ("descrip,intent_name=0xff", [("descrip", None, b"\xff\xfe" * 40), ("intent_name", None, b"\xff" * 16)]),
    ("slice fields garbage", [("slice_code", None, 255), ("slice_start", None, -5), ("slice_end", None, 32767),
                              ("dim_info", None, 255), ("slice_duration", None, NAN)]),
    ("cal_min=nan,cal_max=inf,toffset=nan", [("cal_min", None, NAN), ("cal_max", None, INF),
                                             ("toffset", None, NAN)]),
]


def _resolve(changes, version):
    out = []
    for name, index, value in changes:
        if value == "HUGE":
            value = huge_dim(version)
        if value == "PAIR":
            value = b"ni1\0" if version == 1 else b"ni2\0\r\n\x1a\n"
        if name == "vox_offset" and version == 2 and isinstance(value, float) and not math.isfinite(value):
            value = 2 ** 62
        out.append((name, index, value))
    return out


INT_POOL = [0, 1, -1, 2, 3, 4, 5, 7, 8, 9, 16, 64, 127, 128, 255, 256, 1000, 1024, 32767, -32768,
            2 ** 31 - 1, -2 ** 31, 2 ** 40, 2 ** 62, -2 ** 63, 2 ** 63 - 1]
FLOAT_POOL = [NAN, INF, -INF, 0.0, -0.0, -1.0, 1e38, -1e38, 3.4e38, 1e-40, 1e-45, 0.5, 2.0, 1e308, 5e-324]
DATATYPES = [0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024, 1280, 1536, 1792, 2048, 2304, 255, -1,
             12345, 32767]
# Fields the issue names come twice (twice as likely).
FIELDS = ["dim", "dim", "datatype", "datatype", "bitpix", "vox_offset", "vox_offset", "pixdim", "pixdim",
          "scl_slope", "scl_slope", "scl_inter", "qform_code", "sform_code", "quatern_b", "quatern_c",
          "quatern_d", "qoffset_x", "srow_x", "srow_y", "srow_z", "xyzt_units", "xyzt_units", "intent_code",
          "intent_code", "intent_p1", "dim_info", "slice_code", "slice_start", "slice_end", "slice_duration",
          "toffset", "cal_min", "cal_max", "descrip", "intent_name", "magic", "sizeof_hdr", "esize", "ecode"]


def random_changes(rng, version):
    layout = _layout(version)
    changes = []
    for name in rng.sample(FIELDS, rng.randint(1, 3)):
        if name in ("esize", "ecode"):
            changes.append((name, None, rng.choice(INT_POOL)))
            continue
        dtype, _ = layout.fields[name]
        base, shape = (dtype.subdtype if dtype.subdtype else (dtype, ()))
        index = rng.randrange(shape[0]) if shape else None
        if name == "dim" and index == 0:
            value = rng.choice([-1, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 100, -32768, 32767])
        elif name == "datatype":
            value = rng.choice(DATATYPES)
        elif base.kind in "iu":
            value = rng.choice(INT_POOL)
        elif base.kind == "f":
            value = rng.choice(FLOAT_POOL)
        else:
            value = bytes(rng.randrange(256) for _ in range(base.itemsize))
        changes.append((name, index, value))
    return changes


def _describe(changes):
    return ", ".join(f"{n}{'' if i is None else f'[{i}]'}={v!r}" for n, i, v in changes)


def _header_cases(new_case, base, items, tag):
    """One ``info`` case per file, plus one ``batch`` case holding every file of each suffix."""
    cases, groups = [], {}
    for number, (version, label, changes, gzipped) in enumerate(items):
        raw = mutate(base[f"n{version}.nii"], version, changes)
        suffix = ".nii.gz" if gzipped else ".nii"
        name = f"h{number:03d}{suffix}"
        data = gz(raw) if gzipped else raw
        how = f"NIfTI-{version} {suffix}: {_describe(changes)}"
        folder = new_case(f"{tag}-{label}-{name}")
        write(folder, name, data)
        info = ["info", name] + (["--json"] if number % 2 == 0 else [])
        cases.append(Case(f"info NIfTI-{version} {label} ({suffix})", info, folder, how=how))
        groups.setdefault((version, suffix), []).append((name, data, how))
    for (version, suffix), files in groups.items():
        folder = new_case(f"{tag}-batch-v{version}{suffix}")
        for name, data, _ in files:
            write(folder, name, data)
        how = "; ".join(f"{name}: {how}" for name, _, how in files)
        cases.append(Case(f"batch of {len(files)} mutated NIfTI-{version} {suffix} files",
                          ["batch", *[f[0] for f in files], "--out-dir", "out", "--kernel", "nearest",
                           "--stride", "2", "-q", "--json"], folder, output="out", expect={0, 1}, how=how))
    return cases


@pytest.mark.parametrize("version", [1, 2])
def test_named_header_fields(version, new_case, base):
    """The fields the issue lists: NaN/inf/0/negative/huge pixdim, scaling, forms, codes, dims."""
    items = [(version, label, _resolve(changes, version), number % 3 == 1)
             for number, (label, changes) in enumerate(NAMED)]
    assert_promise(_header_cases(new_case, base, items, f"named{version}"))


SEEDS = 12


@pytest.mark.parametrize("version", [1, 2])
def test_random_header_mutations(version, new_case, base):
    """Seeded mutations of 1-3 random header fields: ``info`` on each (``shape`` on half), then batches."""
    items = []
    for seed in range(SEEDS):
        rng = random.Random(f"nifti{version}-{seed}")
        items.append((version, f"seed {seed}", random_changes(rng, version), seed % 2 == 1))
    cases = _header_cases(new_case, base, items, f"random{version}")
    for case in [c for c in cases if c.command == "info"][::2]:
        name = case.args[1]
        folder = new_case(f"shape-{case.folder.name}")
        write(folder, name, (case.folder / name).read_bytes())
        cases.append(Case(case.label.replace("info", "shape --kernel linear"),
                          ["shape", name, "--kernel", "linear", "--stride", "2", "--json"], folder, how=case.how))
    assert_promise(cases)


def test_nifti2_huge_time_axis_with_run(new_case, base):
    """NIfTI-2 dim[4] = 2**40 (a 4-D header over a 3-D payload): refused by size, never allocated."""
    raw = mutate(base["n2.nii"], 2, [("dim", 0, 4), ("dim", 4, 2 ** 40)])
    cases = []
    for suffix, data in ((".nii", raw), (".nii.gz", gz(raw))):
        for out in ("out.nii", "out.npy"):
            folder = new_case(f"huge-t{suffix}-{out}")
            write(folder, f"big{suffix}", data)
            cases.append(Case(f"run NIfTI-2 dim4=2**40 {suffix} -> {out}",
                              ["run", f"big{suffix}", out, "--kernel", "nearest", "--stride", "2", "-q", "--json"],
                              folder, output=out, expect={1}))
        folder = new_case(f"huge-t-shape{suffix}")
        write(folder, f"big{suffix}", data)
        cases.append(Case(f"shape NIfTI-2 dim4=2**40 {suffix}",
                          ["shape", f"big{suffix}", "--kernel", "nearest", "--stride", "2"], folder))
    assert_promise(cases)
