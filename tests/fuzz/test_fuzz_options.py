"""Extreme option values: strides, padding, dilation, kernel sizes, groups, --max-memory, ...

For ``shape`` (pure arithmetic) the outcome is known from the documentation:
exit 2 when a rule of *Semantics* is broken or a value does not parse, else 0,
however large the output. ``run`` must refuse what it cannot hold (exit 1:
memory) instead of allocating it. Layer options stored in a weights file with
extreme values follow the same rules (exit 1 or 2, never a crash).
"""

from __future__ import annotations

import random

import numpy as np

from conftest import h5_bytes, npz_bytes
from fuzzkit import Case, assert_promise, write

HUGE = "99999999999999999999"
GOOGOL4 = "1" + "0" * 400     # an integer no float can hold
VALUES = ["0", "-1", "1", "2", "3", "1000000000", HUGE, GOOGOL4, "-" + HUGE, "9223372036854775808", "1,2",
          "1,2,3,4", "", " ", "a", "1.5", "nan", "0x10", "2,0,2", "1_000", " 2 ", "+3", "2,-1,2", "1e9"]
INPUT = (5, 6, 7)
OPTIONS = ("stride", "padding", "output-padding", "dilation")


def parse(text):
    """What the documentation accepts: one or three integers; None when it does not parse."""
    try:
        numbers = tuple(int(p) for p in str(text).split(","))
    except ValueError:
        return None
    if len(numbers) not in (1, 3):
        return None
    return numbers * 3 if len(numbers) == 1 else numbers


def expected(values, kernel_size=(2, 2, 2), in_spatial=INPUT, channels=1, out_channels=1, groups=1):
    """``(code, output spatial shape or None)`` that ``shape`` must give for these layer options."""
    parsed = {name: parse(text) for name, text in values.items()}
    if any(v is None for v in parsed.values()):
        return 2, None
    s = parsed.get("stride", (1, 1, 1))
    p = parsed.get("padding", (0, 0, 0))
    op = parsed.get("output-padding", (0, 0, 0))
    d = parsed.get("dilation", (1, 1, 1))
    k = kernel_size
    if min(k) < 1 or min(s) < 1 or min(d) < 1 or min(p) < 0 or min(op) < 0 or groups < 1:
        return 2, None
    if any(o >= max(si, di) for o, si, di in zip(op, s, d)):
        return 2, None
    if channels % groups or out_channels % groups:
        return 2, None
    out = tuple((n - 1) * si - 2 * pi + di * (ki - 1) + oi + 1
                for n, si, pi, di, ki, oi in zip(in_spatial, s, p, d, k, op))
    if min(out) < 1:
        return 2, None
    return 0, out


def _run_expect(nbytes):
    """A valid layer: small outputs are written (0); more than the 1 GiB file-size limit of the
    fuzz runs cannot be (1); in between either."""
    return {0} if nbytes < (64 << 20) else ({0, 1} if nbytes < (1 << 30) else {1})


def _beyond_planning(stride, kernel_size):
    """*Checked before anything is built*: kernel size x stride at most 2**20 per axis, the
    product of the strides at most 2**21; a run beyond is refused (the documentation gives
    no exit code: 1 as a size problem or 2 as a parameter problem)."""
    return (any(k * s > 2 ** 20 for k, s in zip(kernel_size, stride))
            or np.prod(stride, dtype=object) > 2 ** 21)


def _option_args(values):
    args = []
    for name, text in values.items():
        args.append(f"--{name}={text}")
    return args


def test_shape_layer_options(new_case):
    """``shape --input-shape`` with seeded extreme stride/padding/output-padding/dilation/kernel size."""
    rng = random.Random("shape-options")
    cases = []
    for number in range(40):
        values = {name: rng.choice(VALUES) for name in rng.sample(OPTIONS, rng.randint(1, 4))}
        kernel = rng.choice(["2", "3", "1", "0", "-2", "1000000000", HUGE, "2,3,4", "x"])
        code, _ = expected(values, parse(kernel) or (0, 0, 0))
        args = ["shape", "--input-shape", "1,1,5,6,7", "--out-channels", "1", f"--kernel-size={kernel}",
                *_option_args(values)] + (["--json"] if number % 2 else [])
        cases.append(Case(f"shape k={kernel!r} {values}", args, new_case(f"shape-{number}"), expect={code}))
    for groups, out_channels in [("0", "1"), ("-1", "1"), ("2", "4"), ("3", "4"), (HUGE, "1"), ("1", HUGE),
                                 ("1", "0"), ("1", "-5")]:
        channels = 4
        try:
            g, oc = int(groups), int(out_channels)
        except ValueError:
            g = oc = 0
        code = 2 if g < 1 or oc < 1 or channels % g or oc % g else 0
        cases.append(Case(f"shape groups={groups} out-channels={out_channels}",
                          ["shape", "--input-shape", "1,4,5,6,7", "--out-channels", out_channels, "--kernel-size", "2",
                           "--groups", groups, "--json"], new_case("shape-groups"), expect={code}))
    for shape in ["1,1,5,6,7", "0,1,5,6,7", "1,1,0,6,7", "-1,1,5,6,7", "1,1,5,6", "1,1," + HUGE + ",1,1", "5,6,7",
                  "1,1,5,6,7,8", "a"]:
        cases.append(Case(f"shape --input-shape {shape}",
                          ["shape", "--input-shape", shape, "--out-channels", "1", "--kernel-size", "2",
                           "--stride", "2"], new_case("shape-input"), expect={0, 1, 2}))
    for target in ["10,12,14", "1,1,1", "0,0,0", HUGE, "-5", "10"]:
        cases.append(Case(f"shape --target {target}",
                          ["shape", "--input-shape", "1,1,5,6,7", "--out-channels", "1", "--kernel-size", "3",
                           "--stride", "2", "--target", target, "--json"], new_case("shape-target"), expect={0, 1, 2}))
    assert_promise(cases)


def test_shape_builtin_kernel_strides(new_case, put):
    cases = []
    for number, stride in enumerate(["0", "-1", "1", "2", "3,1,2", "1000000000", HUGE, "2,2", "2.0", "x", "1,1,0"]):
        parsed = parse(stride)
        code = 2 if parsed is None or min(parsed) < 1 else 0
        for kernel in ("nearest", "linear"):
            folder = put(new_case(f"kshape-{kernel}-{number}"), "n1.nii")
            cases.append(Case(f"shape --kernel {kernel} --stride {stride!r}",
                              ["shape", "n1.nii", "--kernel", kernel, f"--stride={stride}", "--json"], folder,
                              expect={code}))
    assert_promise(cases)


def test_run_builtin_kernel_strides(new_case, put):
    """``run --kernel`` with extreme strides: a valid but enormous output is refused (exit 1), not allocated."""
    cases = []
    for number, stride in enumerate(["0", "-3", "1000000000", HUGE, "1,1,1000000000", "1,1,100000", "2,1,1",
                                     "1,2,-1", "65536,1,1", "512,1,1", "1000,1,1", GOOGOL4]):
        parsed = parse(stride)
        for kernel in ("nearest", "linear"):
            if parsed is None or min(parsed) < 1:
                expect = {2}
            elif _beyond_planning(parsed, [s if kernel == "nearest" else 2 * s - s % 2 for s in parsed]):
                expect = {1, 2}
            else:
                expect = _run_expect(np.prod([n * s for n, s in zip(INPUT, parsed)], dtype=object) * 4)
            out = "out.nii.gz" if number % 2 else "out.npy"
            folder = put(new_case(f"krun-{kernel}-{number}"), "n1.nii")
            cases.append(Case(f"run --kernel {kernel} --stride {stride}",
                              ["run", "n1.nii", out, "--kernel", kernel, f"--stride={stride}", "-q", "--json"], folder,
                              output=out, expect=expect))
    assert_promise(cases)


def test_run_weights_options(new_case, put):
    """``run --weights`` with extreme command-line options (k=2, one channel)."""
    rng = random.Random("run-options")
    cases = []
    specials = [{"stride": "1000000000"}, {"dilation": "1000000000"}, {"dilation": HUGE}, {"padding": HUGE},
                {"stride": "1,1,1000000000"}, {"dilation": "1,1,1000000000"}, {"stride": HUGE},
                {"padding": "1000000000", "stride": "1000000000"}, {"output-padding": "1", "stride": "2"},
                {"stride": "3", "dilation": "2", "padding": "1", "output-padding": "2"}, {"stride": GOOGOL4},
                {"dilation": GOOGOL4}]
    randoms = [{name: rng.choice(VALUES) for name in rng.sample(OPTIONS, rng.randint(1, 3))} for _ in range(10)]
    for number, values in enumerate(specials + randoms):
        out = ["out.npy", "out.nii", "out.h5", "out.npz"][number % 4]
        folder = put(new_case(f"wrun-{number}"), "vol.npy", "w.npy", "n1.nii")
        source = "n1.nii" if out.endswith(".nii") else "vol.npy"
        code, out_shape = expected(values, in_spatial=INPUT if source == "n1.nii" else (4, 5, 6))
        expect = {code} if code else _run_expect(np.prod(out_shape, dtype=object) * 4)
        if code == 0 and _beyond_planning(parse(values.get("stride", "1")), (2, 2, 2)):
            expect = {1, 2}
        quiet = ["-q"] if number % 5 else []
        cases.append(Case(f"run --weights {values} -> {out}",
                          ["run", source, out, "--weights", "w.npy", *_option_args(values), *quiet, "--json"],
                          folder, output=out, expect=expect))
    assert_promise(cases)


def test_memory_and_misc_options(new_case, put):
    cases = []
    sizes = {"0": {2}, "1": {1}, "1K": {1}, "-5": {2}, "nan": {2}, "1e9": {2}, "0.0000001": {2}, "1.5GiB": {0},
             HUGE: {0}, HUGE + "T": {0}, "18446744073709551616": {0}, "9" * 400: {0, 2}, "64M": {0}, "1 G": {0},
             "": {2}, "2X": {2}}
    for number, (size, expect) in enumerate(sizes.items()):
        folder = put(new_case(f"mem-{number}"), "n1.nii")
        cases.append(Case(f"run --max-memory {size!r}", ["run", "n1.nii", "out.nii", "--kernel", "linear", "--stride",
                                                        "2", f"--max-memory={size}", "-q", "--json"],
                          folder, output="out.nii", expect=expect))
    for level, expect in {"-1": {2}, "4": {2}, HUGE: {2}, "0": {0}, "3": {0}, "x": {2}}.items():
        folder = put(new_case(f"level-{level}"), "n1.nii")
        cases.append(Case(f"run --compress-level {level}", ["run", "n1.nii", "out.nii.gz", "--kernel", "nearest",
                                                            "--stride", "2", f"--compress-level={level}", "-q"],
                          folder, output="out.nii.gz", expect=expect))
    for args, expect in [(["--dtype", "float16"], {2}), (["--groups", "0"], {2}), (["--jobs", "0"], {2}),
                         (["--jobs", HUGE], {0, 1}), (["--format", "tiff"], {2}), (["--suffix", "../x"], {2}),
                         (["--suffix", "\n"], {0, 1})]:
        folder = put(new_case("misc"), "vol.npy", "w.npy")
        command = "batch" if args[0] in ("--jobs", "--format", "--suffix") else "run"
        if command == "batch":
            argv = ["batch", "vol.npy", "--out-dir", "out", "--weights", "w.npy", *args, "-q", "--json"]
            output = "out"
        else:
            argv = ["run", "vol.npy", "out.npy", "--weights", "w.npy", *args, "-q"]
            output = "out.npy"
        cases.append(Case(f"{command} {' '.join(args)!r}", argv, folder, output=output, expect=expect))
    assert_promise(cases)


# Stored options: (label, arrays stored beside the weight, shape's exit codes, run's exit codes).
# A valid but enormous layer is fine for ``shape`` (arithmetic) and refused by ``run`` (memory, exit 1).
HUGE_OK = ({0}, {1})
BAD_FILE = ({1}, {1})        # a malformed stored option: exit 1
BAD_PARAM = ({2}, {2})       # a well-formed option breaking a rule of *Semantics*: exit 2
STORED = [
    ("stride=1e9 (float)", {"stride": np.array([1e9])}, *HUGE_OK),
    ("stride=2**62", {"stride": np.array([2 ** 62])}, *HUGE_OK),
    ("stride=uint64 max", {"stride": np.array([2 ** 64 - 1], dtype=np.uint64)}, *HUGE_OK),
    ("stride=1e300", {"stride": np.array([1e300])}, *HUGE_OK),
    ("stride=2**62,dilation=2**62", {"stride": np.array([2 ** 62]), "dilation": np.array([2 ** 62])}, *HUGE_OK),
    ("dilation=1e9", {"dilation": np.array([1000000000])}, *HUGE_OK),
    ("dilation=1,1,1e9", {"dilation": np.array([1, 1, 1000000000])}, *HUGE_OK),
    ("padding=1e9,stride=1e9", {"padding": np.array([10 ** 9]), "stride": np.array([10 ** 9])}, *HUGE_OK),
    ("padding=-1", {"padding": np.array([-1])}, *BAD_PARAM),
    ("stride=0", {"stride": np.array([0])}, *BAD_PARAM),
    ("dilation=0", {"dilation": np.array([0])}, *BAD_PARAM),
    ("groups=0", {"groups": np.array(0)}, *BAD_PARAM),
    ("groups=2**40", {"groups": np.array(2 ** 40)}, *BAD_PARAM),
    ("output_padding=5", {"output_padding": np.array([5])}, *BAD_PARAM),
    ("stride int8 -1", {"stride": np.array([-1], dtype=np.int8)}, *BAD_PARAM),
    ("stride two values", {"stride": np.array([1, 2])}, *BAD_FILE),
    ("stride 2-D", {"stride": np.array([[2]])}, *BAD_FILE),
    ("stride NaN", {"stride": np.array([np.nan])}, *BAD_FILE),
    ("stride inf", {"stride": np.array([np.inf])}, *BAD_FILE),
    ("stride bool", {"stride": np.array([True])}, *BAD_FILE),
    ("stride complex", {"stride": np.array([2 + 0j])}, *BAD_FILE),
    ("stride text", {"stride": np.array(["2"])}, *BAD_FILE),
    ("stride empty", {"stride": np.zeros(0)}, *BAD_FILE),
    ("stride 1e6 elements", {"stride": np.ones(10 ** 6, dtype=np.int8)}, *BAD_FILE),
    ("stride=2.5", {"stride": np.array([2.5])}, *BAD_FILE),
    ("stride=3 (fine)", {"stride": np.array([3])}, {0}, {0}),
]


def test_stored_options_in_npz(new_case, put):
    rng = np.random.default_rng(5)
    weight = rng.standard_normal((1, 1, 2, 2, 2)).astype(np.float32)
    cases = []
    for number, (label, arrays, shape_expect, run_expect) in enumerate(STORED):
        data = npz_bytes(weight=weight, **arrays)
        folder = put(new_case(f"stored-shape-{number}"), "vol.npy")
        write(folder, "w.npz", data)
        cases.append(Case(f"shape --weights (npz {label})", ["shape", "vol.npy", "--weights", "w.npz", "--json"],
                          folder, expect=shape_expect, how=label))
        folder = put(new_case(f"stored-run-{number}"), "vol.npy")
        write(folder, "w.npz", data)
        cases.append(Case(f"run --weights (npz {label})", ["run", "vol.npy", "out.npy", "--weights", "w.npz", "-q",
                                                           "--json"], folder, output="out.npy",
                          expect=run_expect, how=label))
    assert_promise(cases)


HDF5_ATTRS = [
    ("stride=1e9", {"stride": 1e9}, *HUGE_OK),
    ("dilation=2**62", {"dilation": np.int64(2 ** 62)}, *HUGE_OK),
    ("stride='2'", {"stride": "2"}, *BAD_FILE),
    ("stride=[[1,2],[3,4]]", {"stride": np.array([[1, 2], [3, 4]])}, *BAD_FILE),
    ("stride=NaN", {"stride": np.nan}, *BAD_FILE),
    ("padding=-5", {"padding": -5}, *BAD_PARAM),
    ("groups=1.5", {"groups": 1.5}, *BAD_FILE),
    ("stride=opaque bytes", {"stride": np.void(b"\xff\xff")}, {0, 1}, {0, 1}),
    ("stride empty", {"stride": np.zeros(0)}, *BAD_FILE),
    ("groups=2**63-1", {"groups": np.int64(2 ** 63 - 1)}, *BAD_PARAM),
    ("output_padding=1e300", {"output_padding": 1e300}, *BAD_PARAM),
]


def test_stored_options_in_hdf5_attributes(new_case, put):
    rng = np.random.default_rng(6)
    weight = rng.standard_normal((1, 1, 2, 2, 2)).astype(np.float32)
    cases = []
    for number, (label, values, shape_expect, run_expect) in enumerate(HDF5_ATTRS):
        def build(handle, values=values, root=number % 2 == 0):
            dset = handle.create_dataset("weight", data=weight)
            target = handle if root else dset
            for name, value in values.items():
                target.attrs[name] = value
        data = h5_bytes(build)
        where = "root" if number % 2 == 0 else "dataset"
        folder = put(new_case(f"h5attr-shape-{number}"), "vol.npy")
        write(folder, "w.h5", data)
        cases.append(Case(f"shape --weights (HDF5 {where} attribute {label})",
                          ["shape", "vol.npy", "--weights", "w.h5", "--json"], folder, expect=shape_expect, how=label))
        folder = put(new_case(f"h5attr-run-{number}"), "vol.npy")
        write(folder, "w.h5", data)
        cases.append(Case(f"run --weights (HDF5 {where} attribute {label})",
                          ["run", "vol.npy", "out.npy", "--weights", "w.h5", "-q"], folder, output="out.npy",
                          expect=run_expect, how=label))
    assert_promise(cases)
