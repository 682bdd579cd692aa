"""Imaging files and options: MGH/MGZ, 4-D series, output types, target grids, 6-value padding, sidecars.

* ``.mgh``/``.mgz`` byte flips, truncations and header fields (version, dims,
  type, delta, Mdc, Pxyz_c, footer, tags), all through ``batch`` runs and half
  through ``info``;
* 4-D NIfTI and MGH with ``--fourth-axis`` against layers of 1, 2 and 3 input
  channels (the documented exit code where the rule fixes it);
* ``--output-dtype`` values with extreme data (NaN, inf, 1e38, 1e300, int64
  limits) into every output format, the written type and range checked;
* ``--like`` with hostile references (a grid no crop reaches, a 2-D file, a
  huge shape, affines far from the input's, a reference in every format, a
  FIFO, a folder, a dangling link);
* ``--voxel-size`` extremes (0, nan, inf, 1e-300, 1e300, subnormals, many commas);
* 6-value ``--padding`` extremes (``shape``, whose exit code follows from the
  formula, and a few ``run``\\ s into every format);
* BIDS sidecars that are huge, deeply nested, not UTF-8, not Unicode, a FIFO, a
  folder, a dangling link, larger than the file-size limit, or the output's own.
"""

from __future__ import annotations

import gzip
import io
import json
import os
import random
import struct

import numpy as np

import fuzzkit
from conftest import AFFINE, h5_bytes, nifti_bytes, npy_bytes, npz_bytes
from fuzzkit import (Case, _output_path, assert_promise, assert_statuses, batch_statuses, flip_bytes, gz, truncations,
                     write)

HUGE = "99999999999999999999"


# --------------------------------------------------------------------------- building files

def mgh_bytes(data, affine=AFFINE, tags=(), footer=(2.5, 0.3, 1.5, 0.9, 200.0)):
    """An MGH file as bytes (nibabel's writer), with FreeSurfer tags appended after the footer."""
    import nibabel as nib

    image = nib.MGHImage(data, affine)
    tr, flip, te, ti, fov = footer
    image.header["tr"], image.header["flip_angle"], image.header["te"] = tr, flip, te
    image.header["ti"], image.header["fov"] = ti, fov
    buffer = io.BytesIO()
    image.to_file_map({"image": nib.FileHolder(fileobj=buffer)})
    out = buffer.getvalue()
    for tag, payload in tags:
        out += struct.pack(">iq", tag, len(payload)) + payload
    return out


def _nifti(data, affine=AFFINE, version=1, **fields):
    """NIfTI bytes with header fields set after the fact (``pixdim``, ``srow_x``, ``dim``, ...)."""
    import nibabel as nib

    raw = bytearray(nifti_bytes(version, data, extension=False, affine=affine))
    klass = nib.Nifti1Header if version == 1 else nib.Nifti2Header
    size = klass.sizeof_hdr
    header = klass.from_fileobj(io.BytesIO(bytes(raw[:size])), check=False)
    for name, value in fields.items():
        header[name] = value
    raw[:size] = header.binaryblock
    return bytes(raw)


def _put(folder, files):
    for name, data in files.items():
        write(folder, name, data)
    return folder


RNG = np.random.default_rng(23)
VOL = RNG.standard_normal((4, 5, 6)).astype(np.float32)
MGH_TAGS = ((3, b"mri_convert in.mgz out.mgz\0"), (41, b"ROW\0"), (99, b"\x01" * 40), (31, b"talairach.xfm\0"))


def _mgh_base():
    frames = RNG.integers(-50, 50, size=(4, 5, 6, 2)).astype(np.int16)
    mgh = mgh_bytes(frames, tags=MGH_TAGS)
    return {"f2.mgh": mgh, "f2.mgz": gz(mgh), "v.mgh": mgh_bytes(VOL)}


# --------------------------------------------------------------------------- MGH / MGZ

MGH_FIELDS = {   # name -> (byte offset, struct format, values)
    "version": (0, ">i", [0, 2, -1, 0x101, 2 ** 31 - 1]),
    "width": (4, ">i", [0, -1, 1, 2 ** 31 - 1, 1 << 20]),
    "height": (8, ">i", [0, -5, 2 ** 31 - 1]),
    "depth": (12, ">i", [0, 1, 65536]),
    "frames": (16, ">i", [0, -1, 1, 3, 2 ** 31 - 1]),
    "type": (20, ">i", [0, 1, 3, 4, 10, 2, 99, -1]),
    "dof": (24, ">i", [-1, 2 ** 31 - 1]),
    "goodRASFlag": (28, ">h", [0, -1, 2]),
    "delta": (30, ">fff", [(0, 0, 0), (np.nan, 1, 1), (np.inf, 1, 1), (-1, 1, 1), (1e-30, 1e-30, 1e-30),
                           (3e38, 3e38, 3e38), (1e-45, 1, 1)]),
    "Mdc": (42, ">9f", [(0,) * 9, (np.nan,) + (0,) * 8, (1, 0, 0, 1, 0, 0, 0, 0, 1), (1e38,) * 9]),
    "Pxyz_c": (78, ">fff", [(np.nan, 0, 0), (np.inf, 0, 0), (3e38, -3e38, 3e38)]),
}


def _mgh_field(data, name, value):
    offset, fmt, _ = MGH_FIELDS[name]
    packed = struct.pack(fmt, *(value if isinstance(value, tuple) else (value,)))
    return data[:offset] + packed + data[offset + len(packed):]


def _tail_variants(frames):
    """MGH files (.mgh bytes) whose tails after the data are hostile: ``(name, bytes, how)``."""
    body = mgh_bytes(frames)
    data_end = 284 + frames.nbytes
    head_and_data = body[:data_end]
    footer = body[data_end:data_end + 20]
    tag = lambda t, n, payload=b"": struct.pack(">iq", t, n) + payload
    return [
        ("tail_none", head_and_data, "no footer at all"),
        ("tail_short", head_and_data + footer[:7], "a footer of 7 bytes"),
        ("tag_huge", head_and_data + footer + tag(3, 2 ** 62, b"abc"), "CMDLINE tag of 2**62 bytes"),
        ("tag_negative", head_and_data + footer + tag(3, -5, b"abc"), "tag length -5"),
        ("tag_unsized", head_and_data + footer + struct.pack(">i", 1) + b"\0" * 50, "an unsized OLD_COLORTABLE tag"),
        ("tag_many", head_and_data + footer + tag(99, 0) * 6000, "6000 empty unknown tags"),
        ("tag_kept_big", head_and_data + footer + tag(5, 3 << 20, b"\xff" * (3 << 20)), "a 3 MiB COLORTABLE tag"),
        ("tag_binary", head_and_data + footer + tag(3, 300, bytes(range(256)) + b"\0" * 44),
         "CMDLINE tag of binary bytes"),
        ("tag_cut", head_and_data + footer + tag(41, 100, b"ROW"), "PEDIR tag cut short"),
        ("tag_junk", head_and_data + footer + bytes(RNG.integers(0, 256, 999, dtype=np.uint8)), "999 random bytes"),
    ]


def test_mgh_files(new_case):
    """Flips, truncations, header fields and tails of .mgh/.mgz: every file through one batch run
    per kind (.mgh files written as .mgz, .mgz files as .nii), a sixth through ``info``."""
    base = _mgh_base()
    rng = random.Random("mgh")
    groups = {"mgh": [], "mgz": []}
    for name in ("f2.mgh", "f2.mgz"):
        data = base[name]
        kind = name[-3:]
        for number in range(5):
            damaged, how = flip_bytes(data, rng, header=284 if kind == "mgh" else 60)
            groups[kind].append((f"f{number}.{kind}", damaged, f"{name} flipped {how}"))
        for cut in truncations(len(data), 284 if kind == "mgh" else 30, rng, 2):
            groups[kind].append((f"t{cut}.{kind}", data[:cut], f"{name} truncated to {cut} of {len(data)} bytes"))
    for field, (_, _, values) in MGH_FIELDS.items():
        for number, value in enumerate(values):
            damaged = _mgh_field(base["f2.mgh"], field, value)
            how = f"f2.mgh {field} = {value}"
            kind = "mgz" if (number + len(field)) % 3 == 0 else "mgh"
            groups[kind].append((f"{field}{number}.{kind}", damaged if kind == "mgh" else gz(damaged), how))
    frames = RNG.integers(0, 255, size=(3, 4, 5, 2)).astype(np.uint8)
    for number, (name, data, how) in enumerate(_tail_variants(frames)):
        kind = "mgz" if number % 2 else "mgh"
        groups[kind].append((f"{name}.{kind}", data if kind == "mgh" else gz(data), how))
    mgz = groups["mgz"]
    mgz.append(("concat.mgz", gz(base["f2.mgh"]) + gz(base["f2.mgh"]), "two gzip members"))
    mgz.append(("junk_after.mgz", gz(base["f2.mgh"]) + b"\0garbage", "junk after the gzip stream"))
    mgz.append(("bomb.mgz", gzip.compress(_mgh_field(base["v.mgh"], "width", 1 << 20)[:284] + b"\0" * (8 << 20),
                                          mtime=0), "width 2**20, 8 MiB of zeros in the stream"))
    mgz.append(("plain.mgz", base["f2.mgh"], "an uncompressed .mgh named .mgz"))
    groups["mgh"].append(("gzipped.mgh", base["f2.mgz"], "a gzipped .mgz named .mgh"))

    cases = []
    for kind, files in groups.items():
        for number, (file, data, how) in enumerate(files):
            if number % 8:
                continue
            folder = new_case(f"info-{file}")
            write(folder, file, data)
            cases.append(Case(f"info {how}", ["info", file] + (["--json"] if number % 16 else []), folder, how=how))
        out = "mgz" if kind == "mgh" else "nii"
        folder = new_case(f"batch-{kind}-{out}")
        _put(folder, {file: data for file, data, _ in files})
        args = ["batch", *[f[0] for f in files], "--out-dir", "out", "--format", out, "--kernel", "linear",
                "--stride", "2", "-q", "--json"]
        if out == "nii":
            args += ["--fourth-axis", "volumes", "--output-dtype", "int16"]
        cases.append(Case(f"batch of {len(files)} damaged .{kind} files -> .{out}", args, folder, output="out",
                          expect={0, 1}, how="; ".join(f"{f}: {h}" for f, _, h in files)))
    assert_promise(cases)


# --------------------------------------------------------------------------- 4-D series

def _four_d_files():
    rng = np.random.default_rng(31)
    files = {
        "t1.nii": nifti_bytes(1, rng.standard_normal((4, 5, 6, 1)).astype(np.float32), extension=False),
        "t2.nii": nifti_bytes(1, rng.standard_normal((4, 5, 6, 2)).astype(np.float32), extension=False),
        "t3.nii.gz": gz(nifti_bytes(1, rng.standard_normal((4, 5, 6, 3)).astype(np.float32), extension=False)),
        "c5.nii": nifti_bytes(1, rng.standard_normal((4, 5, 6, 1, 2)).astype(np.float32), extension=False),
        "tc.nii": nifti_bytes(2, rng.standard_normal((4, 5, 6, 3, 2)).astype(np.float32), extension=False),
        "m2.mgz": gz(mgh_bytes(rng.standard_normal((4, 5, 6, 2)).astype(np.float32))),
        "w1.npy": npy_bytes(rng.standard_normal((1, 1, 2, 2, 2)).astype(np.float32)),
        "w2.npz": npz_bytes(weight=rng.standard_normal((2, 3, 2, 2, 2)).astype(np.float32), stride=np.array([2])),
        "w3.npy": npy_bytes(rng.standard_normal((3, 1, 1, 1, 1)).astype(np.float32)),
        "wg.npy": npy_bytes(rng.standard_normal((2, 1, 1, 2, 2, 2)).astype(np.float32)),
    }
    # A 4-D header whose 4th axis is huge but the data is not there.
    big = bytearray(files["t2.nii"])
    big[48:50] = struct.pack("<h", 32767)
    files["tbig.nii"] = bytes(big)
    return files


# One batch per layer and --fourth-axis: file -> "ok" or "failed" as the 4th-axis rule says
# (None: either; c5.nii is (X,Y,Z,1,C), always channels, whatever the option).
FOURTH_AXIS_BATCHES = [
    (["--kernel", "linear", "--stride", "2"], "auto", "nii",
     {"t1.nii": "ok", "t2.nii": "ok", "t3.nii.gz": "ok", "c5.nii": "ok", "tc.nii": "ok", "m2.mgz": "ok",
      "tbig.nii": "failed"}),
    (["--weights", "w1.npy"], "auto", "nii.gz",
     {"t1.nii": "ok", "t2.nii": "ok", "t3.nii.gz": "ok", "c5.nii": "failed", "tc.nii": "failed", "m2.mgz": "ok",
      "tbig.nii": "failed"}),
    (["--weights", "w2.npz"], "auto", "mgz",
     {"t1.nii": "failed", "t2.nii": "ok", "t3.nii.gz": "failed", "c5.nii": "ok", "tc.nii": "ok", "m2.mgz": "ok"}),
    (["--weights", "w3.npy"], "channels", "h5",
     {"t1.nii": "failed", "t2.nii": "failed", "t3.nii.gz": "ok", "c5.nii": "failed", "tc.nii": "failed",
      "m2.mgz": "failed"}),
    (["--weights", "wg.npy"], "volumes", "mgh",
     {"t1.nii": "failed", "t2.nii": "failed", "t3.nii.gz": "failed", "c5.nii": None, "tc.nii": "ok",
      "m2.mgz": "failed"}),
]


def test_fourth_axis(new_case):
    """4-D NIfTI/MGH (and 5-D NIfTI) against layers of 1, 2 and 3 input channels, per --fourth-axis."""
    files = _four_d_files()
    cases, wanted = [], []
    for number, (layer, mode, out, statuses) in enumerate(FOURTH_AXIS_BATCHES):
        folder = _put(new_case(f"4d-{number}-{mode}"), files)
        args = ["batch", *statuses, "--out-dir", "out", "--format", out, *layer, "--fourth-axis", mode, "-q", "--json"]
        if number % 2:
            args += ["--max-memory", "16M"]
        cases.append(Case(f"batch of 4-D images {' '.join(layer)} --fourth-axis {mode} -> .{out}", args, folder,
                          output="out", expect={1}))
        wanted.append(statuses)
    for source, layer, mode, codes in [("t2.nii", ["--weights", "w3.npy"], "auto", {1}),
                                       ("t2.nii", ["--weights", "w2.npz"], "volumes", {1}),
                                       ("m2.mgz", ["--weights", "w1.npy"], "channels", {1})]:
        folder = _put(new_case(f"4d-run-{source}-{mode}"), files)
        cases.append(Case(f"run {source} {' '.join(layer)} --fourth-axis {mode}", ["run", source, "o.nii", *layer,
                          "--fourth-axis", mode, "-q"], folder, output="o.nii", expect=codes))
    folder = _put(new_case("4d-shape"), files)
    cases.append(Case("shape t3 --fourth-axis channels, 2-channel layer", ["shape", "t3.nii.gz", "--weights",
                      "w2.npz", "--fourth-axis", "channels", "--json"], folder, expect={1}))
    cases.append(Case("shape t3 --fourth-axis bogus", ["shape", "t3.nii.gz", "--weights", "w1.npy",
                      "--fourth-axis", "bogus"], folder, expect={2}))
    outcomes = assert_promise(cases)
    for case, outcome, statuses in zip(cases, outcomes, wanted):
        assert_statuses(case, outcome, {name: status for name, status in statuses.items() if status})


# --------------------------------------------------------------------------- output types

OUTPUT_DTYPES = ["same", "float32", "float64", "int8", "uint8", "int16", "uint16", "int32", "uint32", "int64",
                 "uint64"]
FORMATS = ["nii", "nii.gz", "mgh", "mgz", "h5", "npz", "npy"]
MGH_TYPES = {"float32", "uint8", "int16", "uint16", "int32"}


def _extreme_inputs():
    special = np.array([np.nan, np.inf, -np.inf, 1e38, -1e38, 3e9, -3e9, 0.5, 1.5, 2.5, -0.5, 127.5, 255.5,
                        -128.5, 65535.5, 2.0 ** 31, -2.0 ** 31 - 1, 2.0 ** 63, 1e-45, -0.0], dtype=np.float64)
    f32 = np.resize(special, 4 * 5 * 6).reshape(4, 5, 6).astype(np.float32)
    f64 = np.resize(np.concatenate([special, [1e300, -1e300, 1.7e308, np.finfo(np.float64).tiny]]),
                    4 * 5 * 6).reshape(4, 5, 6)
    i64 = np.resize(np.array([np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0, 1, -1, 2 ** 53 + 1]),
                    4 * 5 * 6).reshape(4, 5, 6).astype(np.int64)
    labels = RNG.integers(0, 255, size=(4, 5, 6)).astype(np.uint8)
    return {
        "f32.nii": nifti_bytes(1, f32, extension=False),
        "f64.npy": npy_bytes(f64),
        "i64.h5": h5_bytes(lambda h: h.create_dataset("volume", data=i64)),
        "labels.nii.gz": gz(nifti_bytes(1, labels, extension=False)),
        "bool.npy": npy_bytes(labels > 100),
        "i16.mgh": mgh_bytes(RNG.integers(-32768, 32767, size=(4, 5, 6)).astype(np.int16)),
    }


def _stored_dtype(folder, spec):
    """The element type an output file stores (NIfTI: its on-disk type, scaling ignored)."""
    import nibabel as nib

    path, key = _output_path(folder, spec)
    lower = str(path).lower()
    if lower.endswith((".nii", ".nii.gz", ".mgh", ".mgz")):
        image = nib.load(str(path))
        return np.dtype(image.get_data_dtype()).newbyteorder("="), np.asanyarray(image.dataobj)
    if lower.endswith(".h5"):
        import h5py

        with h5py.File(path, "r") as handle:
            data = handle[key or "volume"][()]
        return data.dtype, data
    if lower.endswith(".npz"):
        with np.load(path, allow_pickle=False) as archive:
            data = archive[key or "volume"]
        return data.dtype, data
    data = np.load(path, allow_pickle=False)
    return data.dtype, data


#: One batch per output type, each into another format (MGH refusing the types it cannot
#: hold; .nii is written by most other cases), computed in float32 or float64.
DTYPE_BATCHES = [("same", "nii.gz", "float32"), ("float64", "mgh", "float64"), ("int8", "npz", "float64"),
                 ("uint8", "mgz", "float32"), ("int64", "h5", "float64"), ("uint64", "npy", "float32")]


def test_output_dtypes(new_case):
    """--output-dtype values into every output format, with NaN, inf and out-of-range values; the
    stored type, the report and the range are checked; a format that cannot hold the type fails
    the file (MGH: float64 and integers other than uint8, int16, uint16, int32)."""
    files = _extreme_inputs()
    cases = []
    for number, (name, out_format, dtype) in enumerate(DTYPE_BATCHES):
        layer = [["--kernel", "nearest", "--stride", "2"], ["--kernel", "linear", "--stride", "1,2,1"]][number % 2]
        folder = _put(new_case(f"odt-{name}-{out_format}"), files)
        args = ["batch", *files, "--out-dir", "out", "--format", out_format, *layer, "--output-dtype", name,
                "--dtype", dtype, "-q", "--json"]
        cases.append(Case(f"batch --output-dtype {name} --format {out_format} {' '.join(layer)} --dtype {dtype}",
                          args, folder, output="out", expect={0, 1}))
    checked = len(cases)
    folder = _put(new_case("odt-bad"), files)
    for bad in ["float16", "bool", "", "same,int8"]:
        cases.append(Case(f"run --output-dtype {bad!r}", ["run", "f32.nii", "o.nii", "--kernel", "nearest", "--stride",
                                                           "2", "--output-dtype", bad], folder, expect={2}))
    outcomes = assert_promise(cases)
    problems = []
    for case, outcome, (name, out_format, _) in zip(cases[:checked], outcomes, DTYPE_BATCHES):
        mgh = out_format in ("mgh", "mgz")
        for line in map(json.loads, outcome.stdout.splitlines()):
            source, status = line.get("input"), line.get("status")
            if status == "failed":
                if not mgh or name in MGH_TYPES:
                    problems.append(f"{case.label}: {source} failed: {line.get('error')}")
                continue
            stored, _ = _stored_dtype(case.folder, line["output"])
            if name != "same" and stored != np.dtype(name):
                problems.append(f"{case.label}: {source} stored as {stored}, not {name}")
            if line.get("output_dtype") != stored.name:
                problems.append(f"{case.label}: {source} reports output_dtype {line.get('output_dtype')} "
                                f"but stores {stored}")
            if stored.kind in "iu" and not isinstance(line.get("clipped_voxels"), int):
                problems.append(f"{case.label}: {source}: clipped_voxels {line.get('clipped_voxels')!r}")
            if mgh and stored.name not in MGH_TYPES:
                problems.append(f"{case.label}: {source} wrote an MGH file of {stored}")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- --like

def _like_files():
    """The input n.nii (grid AFFINE, 4x5x6) and references: the x2 grid in every format, and hostile ones."""
    import nibabel as nib

    vol = RNG.standard_normal((4, 5, 6)).astype(np.float32)
    up = np.zeros((8, 10, 12), np.float32)
    # The linear x2 grid of n.nii: spacing / 2, origin moved by -spacing / 4.
    ref = AFFINE.copy()
    ref[:3, :3] /= 2
    ref[:3, 3] -= np.diag(AFFINE)[:3] / 4
    flipped = ref.copy()
    flipped[0, 0] *= -1
    between = ref.copy()
    between[0, 3] += 0.3
    spacing = ref.copy()
    spacing[1, 1] = 0.6
    far = ref.copy()
    far[:3, 3] = 1.7e308
    far_in = AFFINE.copy()
    far_in[:3, 3] = 1.7e308
    huge_spacing = np.diag([1e300, 1e300, 1e300, 1.0])
    files = {
        "n.nii": nifti_bytes(1, vol, extension=False),
        "n2far.nii": nifti_bytes(2, vol, extension=False, affine=far_in),
        "ref.nii": nifti_bytes(1, up, extension=False, affine=ref),
        "ref.nii.gz": gz(nifti_bytes(2, up, extension=False, affine=ref)),
        "ref.mgh": mgh_bytes(up, affine=ref),
        "ref.mgz": gz(mgh_bytes(up, affine=ref)),
        "ref.h5": h5_bytes(lambda h: h.create_dataset("volume", data=up)),
        "ref.npy": npy_bytes(up),
        "ref.npz": npz_bytes(volume=up),
        "ref4d.nii": nifti_bytes(1, np.zeros((8, 10, 12, 3), np.float32), extension=False, affine=ref),
        "flipped.nii": nifti_bytes(1, up, extension=False, affine=flipped),
        "between.nii": nifti_bytes(1, up, extension=False, affine=between),
        "spacing.nii": nifti_bytes(1, up, extension=False, affine=spacing),
        "far.nii": nifti_bytes(2, up, extension=False, affine=far),
        "hugevox.nii": nifti_bytes(2, up, extension=False, affine=huge_spacing),
        "tiny.nii": nifti_bytes(2, up, extension=False, affine=np.diag([1e-11, 1e-11, 1e-11, 1.0])),
        "flat.npy": npy_bytes(np.zeros((4, 5), np.float32)),
        "flat.nii": nifti_bytes(1, np.zeros((4, 5), np.float32), extension=False),
        "one.nii": nifti_bytes(1, np.zeros((1, 1, 1), np.float32), extension=False, affine=ref),
        "nanaffine.nii": _nifti(up, srow_x=[np.nan, 0, 0, 0]),
        "singular.nii": _nifti(up, srow_x=[0, 0, 0, 0], srow_y=[0, 0, 0, 0], srow_z=[0, 0, 0, 0]),
        "noforms.nii": _nifti(up, affine=ref, qform_code=0, sform_code=0),
        "w.pt": b"PK\x05\x06" + b"\0" * 18,
        "ref.txt": b"8 10 12",
        "w.npz": npz_bytes(weight=RNG.standard_normal((1, 1, 3, 3, 3)).astype(np.float32), stride=np.array([2]),
                           padding=np.array([1])),
    }
    # A header declaring 30000^3 float32 voxels on the x2 grid, with no data behind it.
    hdr = nib.Nifti1Header()
    hdr.set_data_shape((30000, 30000, 30000))
    hdr.set_data_dtype(np.float32)
    hdr.set_sform(ref, code=2)
    hdr.set_qform(ref, code=1)
    hdr["vox_offset"] = 352
    files["huge.nii"] = hdr.binaryblock + b"\0" * 4
    files["huge.nii.gz"] = gz(hdr.binaryblock + b"\0" * 4 + b"\0" * 40000)
    return files


LIKE = [   # (reference, extra args, exit codes)
    ("ref.mgz", [], {0}), ("ref4d.nii", [], {0}), ("one.nii", [], {0, 1}),
    ("ref.nii", ["--weights", "w.npz"], {0, 1}),
    ("ref.npy", [], {1}), ("flipped.nii", [], {1}), ("spacing.nii", [], {1}), ("far.nii", [], {1}),
    ("hugevox.nii", [], {1}), ("flat.nii", [], {1}), ("nanaffine.nii", [], {1}), ("huge.nii.gz", [], {1}),
    ("fifo.nii", [], {1}), ("zero.nii", [], {1}), ("ref.nii", ["--stride", "2"], {2}),
]


def _like_specials(folder):
    os.mkfifo(os.path.join(folder, "fifo.nii"))
    os.mkdir(os.path.join(folder, "folder.nii"))
    os.symlink("nowhere.nii", os.path.join(folder, "dangling.nii"))
    os.symlink("/dev/zero", os.path.join(folder, "zero.nii"))


def test_like_references(new_case):
    files = _like_files()
    cases = []
    for number, (ref, extra, codes) in enumerate(LIKE):
        folder = _put(new_case(f"like-{ref}"), files)
        _like_specials(folder)
        layer = ["--weights", "w.npz"] if "--weights" in extra else ["--kernel", "linear"]
        extra = [a for a in extra if a not in ("--weights", "w.npz")]
        output = ["out.nii", "out.nii.gz", "out.mgz", "out.h5"][number % 4]
        args = ["run", "n.nii", output, *layer, "--like", ref, *extra, "-q", "--json"]
        cases.append(Case(f"run --like {ref} {' '.join(layer + extra)} -> {output}", args, folder, output=output,
                          expect=codes, timeout=8.0 if ref == "fifo.nii" else 30.0, retry=ref != "fifo.nii"))
    folder = _put(new_case("like-ref-is-output"), files)
    cases.append(Case("run n.nii ref.nii --like ref.nii --overwrite (the reference is an input)",
                      ["run", "n.nii", "ref.nii", "--kernel", "linear", "--like", "ref.nii", "--overwrite", "-q"],
                      folder, output="ref.nii", expect={1}))
    folder = _put(new_case("like-batch"), files)
    cases.append(Case("batch --like ref.mgh with hostile inputs", ["batch", "n.nii", "n2far.nii", "far.nii",
                      "hugevox.nii", "flat.nii", "ref4d.nii", "--out-dir", "o", "--kernel", "nearest", "--like",
                      "ref.mgh", "-q", "--json"], folder, output="o", expect={1}))
    outcomes = assert_promise(cases)
    for case, outcome in zip(cases, outcomes):
        if outcome.returncode == 0 and case.command == "run" and "--json" in case.args:
            report = json.loads(outcome.stdout)
            ref = case.args[case.args.index("--like") + 1]
            assert report["output_shape"][-3:] == [8, 10, 12] or ref == "one.nii", (case.label, report)
    assert_statuses(cases[-1], outcomes[-1], {"n.nii": "ok", "n2far.nii": "failed", "far.nii": "failed",
                                              "flat.nii": "failed"})


# --------------------------------------------------------------------------- --voxel-size

VOXEL_SIZES = [   # (value, exit codes) for n.nii (voxels 1.5, 1.5, 2 mm)
    ("0", {2}), ("nan", {2}), ("inf", {2}), ("1e-300", {1, 2}), ("5e-324", {1, 2}),
    ("1e-310", {1, 2}), ("1e-5", {1, 2}), ("1,1,1,1", {2}), (",".join(["0.5"] * 3000), {2}), ("\u0661", {2}),
    ("0.75,nan,1", {2}),
]


def test_voxel_size(new_case):
    files = {
        "n.nii": nifti_bytes(1, VOL, extension=False),
        "big.nii": nifti_bytes(2, VOL, extension=False, affine=np.diag([1e200, 1e200, 1e200, 1.0])),
        "small.nii": nifti_bytes(2, VOL, extension=False, affine=np.diag([1e-6, 1e-6, 1e-6, 1.0])),
        "v.mgz": gz(mgh_bytes(VOL)),
        "v.h5": h5_bytes(lambda h: h.create_dataset("volume", data=VOL)),
    }
    cases = []
    for number, (value, codes) in enumerate(VOXEL_SIZES):
        output = ["o.nii", "o.mgz", "o.npy"][number % 3]
        folder = _put(new_case(f"voxel-{number}"), files)
        cases.append(Case(f"run --voxel-size {value[:40]!r}", ["run", "n.nii", output, "--kernel",
                          "linear" if number % 2 else "nearest", f"--voxel-size={value}", "-q", "--json"],
                          folder, output=output, expect=codes))
    for source, value, codes in [("big.nii", "1", {1, 2}), ("small.nii", "1e-306", {1, 2}), ("v.h5", "1e-300", {1, 2})]:
        folder = _put(new_case(f"voxel-{source}"), files)
        cases.append(Case(f"run {source} --voxel-size {value}", ["run", source, "o.nii", "--kernel", "nearest",
                                                                 "--voxel-size", value, "-q"], folder,
                          output="o.nii", expect=codes))
    folder = _put(new_case("voxel-batch"), files)
    cases.append(Case("batch --voxel-size 0.5,0.5,1", ["batch", "n.nii", "v.mgz", "v.h5", "big.nii", "small.nii",
                                                       "--out-dir", "b", "--kernel", "linear",
                                                       "--voxel-size", "0.5,0.5,1", "-q", "--json"],
                      folder, output="b", expect={1}))
    outcomes = assert_promise(cases)
    assert_statuses(cases[-1], outcomes[-1], {"n.nii": "ok", "v.mgz": "ok", "v.h5": "ok", "big.nii": "failed",
                                              "small.nii": "failed"})


# --------------------------------------------------------------------------- 6-value padding

PAD_VALUES = ["0", "1", "2", "-1", "5", HUGE, "1" + "0" * 400, "9223372036854775808"]


def _pad_expect(begins, ends, op=(0, 0, 0), n_in=(5, 6, 7), k=3, s=2, d=1):
    if min(begins + ends) < 0 or min(op) < 0 or any(o >= max(s, d) for o in op):
        return 2
    out = [(n - 1) * s - b - e + d * (k - 1) + o + 1 for n, b, e, o in zip(n_in, begins, ends, op)]
    return 0 if min(out) >= 1 else 2


def test_six_value_padding(new_case):
    """``shape`` with seeded 6-value paddings (exit code from the formula), stored 6-value paddings,
    and a few ``run``\\ s with uneven crops into several formats."""
    rng = random.Random("six-padding")
    cases = []
    folder = new_case("pad-shape")
    for number in range(5):
        values = [rng.choice(PAD_VALUES) if rng.random() < 0.4 else str(rng.randint(0, 3)) for _ in range(6)]
        op = [str(rng.randint(0, 1)) for _ in range(3)] if number % 3 == 0 else None
        numbers = [int(v) for v in values]
        code = _pad_expect(tuple(numbers[:3]), tuple(numbers[3:]), tuple(int(v) for v in op) if op else (0, 0, 0))
        args = ["shape", "--input-shape", "1,1,5,6,7", "--out-channels", "1", "--kernel-size", "3", "--stride", "2",
                f"--padding={','.join(values)}"] + ([f"--output-padding={','.join(op)}"] if op else []) + \
            (["--json"] if number % 2 else [])
        label = f"shape --padding {','.join(v[:12] for v in values)}" + (f" --output-padding {op}" if op else "")
        cases.append(Case(label, args, folder, expect={code}))
    for text in ["1,1,1,1,1,1,1", " 1, 1, 1, 1, 1, 1", ",".join(["1"] * 5000)]:
        cases.append(Case(f"shape --padding {text[:30]!r}", ["shape", "--input-shape", "1,1,5,6,7", "--out-channels",
                          "1", "--kernel-size", "3", "--stride", "2", f"--padding={text}"], folder,
                          expect={0} if text.strip().startswith("1, 1") else {2}))
    vol = RNG.standard_normal((5, 6, 7)).astype(np.float32)
    weight = RNG.standard_normal((1, 1, 3, 3, 3)).astype(np.float32)
    stored = {
        "vol.nii": nifti_bytes(1, vol, extension=False),
        "w6.npz": npz_bytes(weight=weight, stride=np.array([2]), padding=np.array([0, 1, 2, 2, 1, 0])),
        "w6neg.npz": npz_bytes(weight=weight, stride=np.array([2]), padding=np.array([0, 0, 0, -1, 0, 0])),
        "w6huge.npz": npz_bytes(weight=weight, stride=np.array([2]), padding=np.array([0, 0, 0, 2 ** 62, 0, 0])),
        "w6float.npz": npz_bytes(weight=weight, padding=np.array([0.5, 0, 0, 0, 0, 1.0])),
        "w6.h5": h5_bytes(lambda h: (h.create_dataset("weight", data=weight),
                                     h["weight"].attrs.__setitem__("padding", np.array([1, 0, 1, 0, 1, 0])),
                                     h.attrs.__setitem__("stride", 2))),
        "w6bad.h5": h5_bytes(lambda h: (h.create_dataset("weight", data=weight),
                                        h["weight"].attrs.__setitem__("padding", np.array([[1, 0, 1], [0, 1, 0]])))),
        "w.npy": npy_bytes(weight),
    }
    for number, (weights, extra, codes, output) in enumerate([
        ("w6.npz", [], {0}, "o.mgz"), ("w6neg.npz", [], {1, 2}, "o.nii"), ("w6huge.npz", [], {1, 2}, "o.nii"),
        ("w6float.npz", [], {1}, "o.nii"), ("w6.h5", [], {0}, None), ("w6bad.h5", [], {0, 1}, None),
        ("w.npy", ["--stride", "3", "--padding", "0,1,0,5,5,5", "--output-padding", "2,0,2"], {0}, "o.nii.gz"),
        ("w.npy", ["--stride", "1", "--padding", "4,0,0,4,0,0"], {2}, "o.nii"),
        ("w6.npz", ["--padding", HUGE + ",0,0,0,0,0"], {2}, "o.nii"),
    ]):
        folder = _put(new_case(f"pad-run-{number}"), stored)
        if output is None:       # the stored options are read by shape too
            cases.append(Case(f"shape --weights {weights}", ["shape", "vol.nii", "--weights", weights, "--json"],
                              folder, expect=codes))
            continue
        cases.append(Case(f"run --weights {weights} {' '.join(extra)} -> {output}", ["run", "vol.nii", output,
                          "--weights", weights, *extra, "-q", "--json"], folder, output=output, expect=codes))
    assert_promise(cases)


# --------------------------------------------------------------------------- BIDS sidecars

def _sidecar_variants():
    """``(name, bytes or a maker(folder, name), how, batch status)`` of an input's sidecar NAME.json."""
    valid = {"RepetitionTime": 2.0, "SliceTiming": [0.0, 0.5, 1.0, 1.5, 2.0, 2.5], "TaskName": "rest"}

    def fifo(folder, name):
        os.mkfifo(os.path.join(folder, f"{name}.json"))

    def folder_(folder, name):
        os.mkdir(os.path.join(folder, f"{name}.json"))

    def dangling(folder, name):
        os.symlink("nowhere.json", os.path.join(folder, f"{name}.json"))

    def devzero(folder, name):
        os.symlink("/dev/zero", os.path.join(folder, f"{name}.json"))

    return [
        ("valid", json.dumps(valid).encode(), "a valid sidecar", "ok"),
        ("huge", b'{"x": "' + b"a" * (17 << 20) + b'"}', "17 MiB", "failed"),
        ("deep", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, "objects nested 100000 deep", "failed"),
        ("deep900", ('{"a":' * 900 + "1" + "}" * 900).encode(), "objects nested 900 deep", None),
        ("latin1", '{"Manufacturer": "Müller"}'.encode("latin-1"), "latin-1, not UTF-8", "failed"),
        ("bom", b"\xef\xbb\xbf" + json.dumps(valid).encode(), "UTF-8 with a byte-order mark", None),
        ("surrogate", b'{"TaskName": "\\ud800"}', "a lone surrogate escape", "failed"),
        ("surrogate_key", b'{"\\udfff": 1}', "a key that is a lone surrogate", "failed"),
        ("nan", b'{"RepetitionTime": NaN, "EchoTime": Infinity, "x": -Infinity}', "NaN and Infinity", None),
        ("bigint", b'{"n": ' + b"9" * 5000 + b"}", "a 5000-digit number", "failed"),
        ("list", b"[1, 2, 3]", "a JSON list", "failed"),
        ("empty", b"", "an empty file", "failed"),
        ("dupes", b'{"a": 1, "a": 2, "Sources": 5, "ConvTranspose3d": "x"}', "repeated and reserved keys", "ok"),
        ("fifo", fifo, "a FIFO", None),
        ("folder", folder_, "a folder", None),
        ("dangling", dangling, "a dangling link", None),
        ("devzero", devzero, "a link to /dev/zero", None),
    ]


def test_sidecars(new_case):
    """Hostile input sidecars (one batch: each volume with its own), the output's sidecar in the way,
    and a sidecar that does not fit the file-size limit when the volume does."""
    vol = nifti_bytes(1, VOL, extension=False)
    cases = []
    folder = new_case("sidecar-batch")
    wanted, names = {}, []
    for name, content, _, status in _sidecar_variants():
        source = f"{name}.nii" if len(names) % 2 else f"{name}.nii.gz"
        write(folder, source, vol if source.endswith(".nii") else gz(vol))
        if callable(content):
            content(folder, name)
        else:
            write(folder, f"{name}.json", content)
        names.append(source)
        if status:
            wanted[source] = status
    how = "; ".join(f"{name}.json: {how}" for name, _, how, _ in _sidecar_variants())
    cases.append(Case("batch of volumes with hostile sidecars", ["batch", *names, "--out-dir", "out", "--kernel",
                      "nearest", "--stride", "2", "-q", "--json"], folder, output="out", expect={1}, how=how,
                      retry=False))
    valid = json.dumps({"RepetitionTime": 2.0}).encode()
    # The output's sidecar: the input's own, an existing file, a folder, a link; larger than RLIMIT_FSIZE.
    for label, setup, args, codes, fsize in [
        ("OUT.json is the input's sidecar (n.nii -> n.nii.gz)", {}, ["n.nii.gz"], {1}, None),
        ("OUT.json exists", {"o.json": b"{}"}, ["o.nii"], {1}, None),
        ("OUT.json exists, --no-sidecar, the input's is not UTF-8", {"o.json": b"{}", "n.json": b"\xff" * 9},
         ["o.nii", "--no-sidecar"], {0}, None),
        ("OUT.json exists, --overwrite", {"o.json": b"{}"}, ["o.mgz", "--overwrite"], {0}, None),
        ("OUT.json is a folder, --overwrite", "dir", ["o.nii", "--overwrite"], {1}, None),
        ("the sidecar does not fit RLIMIT_FSIZE (the volume does)", {"n.json": b'{"x": "' + b"a" * 150_000 + b'"}'},
         ["o.nii"], {1}, 100_000),
    ]:
        folder = new_case(f"sidecar-out-{label}")
        write(folder, "n.nii", vol)
        write(folder, "n.json", valid)
        if setup == "dir":
            os.mkdir(os.path.join(folder, "o.json"))
        else:
            _put(folder, setup)
        cases.append(Case(f"run with a sidecar: {label}", ["run", "n.nii", *args, "--kernel", "nearest", "--stride",
                          "2", "-q", "--json"], folder, output=args[0], expect=codes, fsize=fsize))
    outcomes = assert_promise(cases)
    assert_statuses(cases[0], outcomes[0], wanted)
    problems = []
    for line in map(json.loads, outcomes[0].stdout.splitlines()):
        if line.get("status") != "ok":
            continue
        stem = line["input"].split(".")[0]
        path = cases[0].folder / "out" / f"{stem}.json"
        has_input_sidecar = (cases[0].folder / f"{stem}.json").is_file()
        if has_input_sidecar != path.is_file() or (line.get("sidecar") is None) == has_input_sidecar:
            problems.append(f"{line['input']}: input sidecar {has_input_sidecar}, output sidecar {path.is_file()}, "
                            f"reported {line.get('sidecar')!r}")
        elif path.is_file():
            try:
                fields = json.loads(path.read_bytes().decode("utf-8"))
            except ValueError as exc:
                problems.append(f"{path.name} is not UTF-8 JSON: {exc}")
                continue
            if not isinstance(fields, dict) or "ConvTranspose3d" not in fields:
                problems.append(f"{path.name} lacks the layer record")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------------- HDF5 external storage

def test_hdf5_external_raw_storage(new_case):
    """HDF5 datasets whose values HDF5 reads from external raw files (``H5Pset_external``): a FIFO,
    a link to /dev/zero, a file outside the folder; as volumes and as weights."""
    files = {
        "fifo.h5": h5_bytes(lambda h: h.create_dataset("volume", shape=(4, 5, 6), dtype="f4",
                                                       external=[("pipe.raw", 0, 480)])),
        "zero.h5": h5_bytes(lambda h: h.create_dataset("volume", shape=(4, 5, 6), dtype="f4",
                                                       external=[("zero.raw", 0, 480)])),
        "etc.h5": h5_bytes(lambda h: h.create_dataset("volume", shape=(1, 1, 4), dtype="u1",
                                                      external=[("/etc/hostname", 0, 4)])),
        "wfifo.h5": h5_bytes(lambda h: h.create_dataset("weight", shape=(1, 1, 2, 2, 2), dtype="f4",
                                                        external=[("pipe.raw", 0, 32)])),
        "n.nii": nifti_bytes(1, VOL, extension=False),
    }
    cases = []
    for label, args, output in [
        ("weights stored in a FIFO", ["run", "n.nii", "o.nii", "--weights", "wfifo.h5", "-q"], "o.nii"),
        ("batch of volumes stored in a FIFO, /dev/zero, /etc/hostname",
         ["batch", "fifo.h5", "zero.h5", "etc.h5", "n.nii", "--out-dir", "b", "--kernel", "nearest", "--stride", "2",
          "-q", "--json"], "b"),
        ("info of a volume stored in a FIFO", ["info", "fifo.h5"], None),
    ]:
        folder = _put(new_case(f"external-{label}"), files)
        os.mkfifo(os.path.join(folder, "pipe.raw"))
        os.symlink("/dev/zero", os.path.join(folder, "zero.raw"))
        cases.append(Case(f"HDF5 external storage: {label}", args, folder, output=output,
                          expect={0} if args[0] == "info" else {1}, timeout=8.0, retry=False))
    outcomes = assert_promise(cases)
    assert_statuses(cases[1], outcomes[1], {"fifo.h5": "failed", "zero.h5": "failed", "etc.h5": "failed",
                                            "n.nii": "ok"})


def _virtual(handle, name, source_file, source_name, shape, dtype="f4"):
    import h5py

    layout = h5py.VirtualLayout(shape=shape, dtype=dtype)
    layout[...] = h5py.VirtualSource(source_file, source_name, shape=shape)
    handle.create_virtual_dataset(name, layout, fillvalue=0)


def _same_file_chain(handle):
    # A virtual dataset of this file whose source is itself virtual, made of a FIFO's "file".
    _virtual(handle, "inner", "pipe.h5", "data", (4, 5, 6))
    _virtual(handle, "volume", ".", "inner", (4, 5, 6))


def _same_file(handle):
    handle["data"] = VOL
    _virtual(handle, "volume", ".", "data", VOL.shape)


def test_hdf5_virtual_datasets(new_case):
    """HDF5 virtual datasets, whose values HDF5 reads from the files their sources name: a FIFO
    (would block forever), another HDF5 file, the same file through a second virtual dataset
    made of a FIFO; as volumes and as weights. One made of its own file's datasets is read."""
    files = {
        "vfifo.h5": h5_bytes(lambda h: _virtual(h, "volume", "pipe.h5", "data", (4, 5, 6))),
        "vother.h5": h5_bytes(lambda h: _virtual(h, "volume", "other.h5", "data", (4, 5, 6))),
        "other.h5": h5_bytes(lambda h: h.create_dataset("data", data=VOL)),
        "vchain.h5": h5_bytes(_same_file_chain),
        "vsame.h5": h5_bytes(_same_file),
        "wfifo.h5": h5_bytes(lambda h: _virtual(h, "weight", "pipe.h5", "data", (1, 1, 2, 2, 2))),
        "n.nii": nifti_bytes(1, VOL, extension=False),
    }
    cases = []
    for label, args, output, expect in [
        ("weights made of a FIFO", ["run", "n.nii", "o.nii", "--weights", "wfifo.h5", "-q"], "o.nii", {1}),
        ("volume made of a FIFO", ["run", "vfifo.h5", "o.nii", "--kernel", "nearest", "--stride", "2", "-q"],
         "o.nii", {1}),
        ("batch of virtual volumes",
         ["batch", "vfifo.h5", "vother.h5", "vchain.h5", "vsame.h5", "--out-dir", "b", "--kernel", "nearest",
          "--stride", "2", "-q", "--json"], "b", {1}),
    ]:
        folder = _put(new_case(f"virtual-{label}"), files)
        os.mkfifo(os.path.join(folder, "pipe.h5"))
        cases.append(Case(f"HDF5 virtual dataset: {label}", args, folder, output=output, expect=expect,
                          timeout=8.0, retry=False))
    outcomes = assert_promise(cases)
    assert_statuses(cases[2], outcomes[2], {"vfifo.h5": "failed", "vother.h5": "failed", "vchain.h5": "failed",
                                            "vsame.h5": "ok"})


def _keras_link_to_fifo(handle):
    import h5py

    handle.attrs["keras_version"] = "2.13.1"
    handle.attrs["model_config"] = json.dumps({"class_name": "Sequential", "config": {"name": "s", "layers": [
        {"class_name": "Conv3DTranspose", "config": {"name": "up", "filters": 1, "kernel_size": [2, 2, 2],
                                                     "strides": [2, 2, 2], "padding": "valid",
                                                     "data_format": "channels_last", "use_bias": True}}]}})
    weights = handle.create_group("model_weights")
    weights.attrs["layer_names"] = [b"up"]
    weights["up"] = h5py.ExternalLink("pipe.h5", "/")


def test_hdf5_external_links_to_a_fifo(new_case):
    """External links are not followed, also where a file is checked for being Keras's
    (any ``.h5`` given as weights or to ``info``) and in a Keras model's weight groups."""
    import h5py

    def layers_link(handle):
        handle.create_group("layers")
        handle["layers/conv3d_transpose"] = h5py.ExternalLink("pipe.h5", "/")

    files = {"a.h5": h5_bytes(layers_link), "b.h5": h5_bytes(_keras_link_to_fifo),
             "n.nii": nifti_bytes(1, VOL, extension=False)}
    cases = []
    for label, args, output, expect in [
        ("info of a file whose layers group links out", ["info", "a.h5"], None, {0}),
        ("weights whose layers group links out", ["run", "n.nii", "o.nii", "--weights", "a.h5", "-q"], "o.nii", {1}),
        ("info of a Keras model whose weights link out", ["info", "b.h5"], None, {1}),
        ("a Keras model whose weights link out", ["run", "n.nii", "o.nii", "--weights", "b.h5", "-q"], "o.nii", {1}),
    ]:
        folder = _put(new_case(f"extlink-{label}"), files)
        os.mkfifo(os.path.join(folder, "pipe.h5"))
        cases.append(Case(f"HDF5 external link to a FIFO: {label}", args, folder, output=output, expect=expect,
                          timeout=8.0, retry=False))
    assert_promise(cases)


# --------------------------------------------------------------------------- --threads, batch --jobs

def test_threads_and_jobs(new_case, monkeypatch):
    """--threads beyond any core count (run, and batch --jobs 2 workers), and a batch --jobs 2 whose two
    outputs share a sidecar name (one must fail, leaving neither its volume nor its sidecar).

    multiprocessing's resource tracker, a child of convt3d, exits right after it and is reaped by
    PID 1; an init that reaps slowly (a container's) keeps that zombie ~2 s in the process group.
    The allowance is raised for these cases: a worker really left running still fails them.
    """
    monkeypatch.setattr(fuzzkit, "LINGER", 5.0)
    vol = nifti_bytes(1, VOL, extension=False)
    cases = []
    for number, (value, codes) in enumerate([(HUGE, {0}), ("0", {2}), ("1.5", {2})]):
        folder = _put(new_case(f"threads-{number}"), {"n.nii": vol})
        cases.append(Case(f"run --threads {value}", ["run", "n.nii", "o.mgz", "--kernel", "linear", "--stride", "2",
                          f"--threads={value}", "-q", "--json"], folder, output="o.mgz", expect=codes))
    folder = _put(new_case("jobs"), {"a.nii": vol, "a.nii.gz": gz(vol), "b.mgz": gz(mgh_bytes(VOL)),
                                     "a.json": json.dumps({"RepetitionTime": 2.0}).encode()})
    cases.append(Case(f"batch a.nii a.nii.gz b.mgz --jobs 2 --threads {HUGE}: two outputs, one sidecar name",
                      ["batch", "a.nii", "a.nii.gz", "b.mgz", "--out-dir", "out", "--kernel", "nearest", "--stride",
                       "2", "--jobs", "2", f"--threads={HUGE}", "-q", "--json"], folder, output="out", expect={1}))
    outcomes = assert_promise(cases)
    statuses = batch_statuses(outcomes[-1])
    assert statuses.get("b.mgz", (None,))[0] == "ok", statuses
    assert sorted(statuses[name][0] for name in ("a.nii", "a.nii.gz")) == ["failed", "ok"], statuses
