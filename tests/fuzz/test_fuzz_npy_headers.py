"""Hand-made ``.npy`` headers: versions 1/2/3 (and unknown ones), bad ``descr``, object and
structured types, Fortran order, huge or negative shapes, lying header lengths.

Every file gets ``info`` (every other one ``shape`` too); all of them then go through one ``batch``
run, and the same members inside ``.npz`` archives through another. Valid
headers of every version must be read (exit 0).
"""

from __future__ import annotations

import io
import random
import struct
import zipfile

import numpy as np

from fuzzkit import Case, assert_promise, assert_statuses, write

MAGIC = b"\x93NUMPY"
SHAPE = (4, 5, 6)
PAYLOAD = np.arange(np.prod(SHAPE), dtype="<f4").tobytes()


def npy(header, payload=PAYLOAD, version=(1, 0), length=None, pad=True):
    """``.npy`` bytes with header text ``header`` (a str), padded as NumPy pads it unless ``pad`` is false.

    ``length`` overrides the header-length field (a lie when it differs).
    """
    text = header.encode("latin1") if version != (3, 0) else header.encode("utf8")
    size_field = 2 if version[0] == 1 else 4
    if pad:
        total = len(MAGIC) + 2 + size_field + len(text) + 1
        text += b" " * ((64 - total % 64) % 64) + b"\n"
    if length is None:
        length = len(text)
    packed = struct.pack("<H", length & 0xFFFF) if size_field == 2 else struct.pack("<I", length & 0xFFFFFFFF)
    return MAGIC + bytes(version) + packed + text + payload


def head(descr="'<f4'", fortran="False", shape=SHAPE):
    return "{'descr': %s, 'fortran_order': %s, 'shape': %s, }" % (descr, fortran, shape if isinstance(shape, str)
                                                                   else repr(tuple(shape)))


BIG = 2 ** 40
# (label, bytes, exit codes the documentation fixes or None)
CASES = [
    ("v1 valid", npy(head()), {0}),
    ("v2 valid", npy(head(), version=(2, 0)), {0}),
    ("v3 valid", npy(head(), version=(3, 0)), {0}),
    ("v3 utf8 header", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 5, 6), } # é", version=(3, 0)),
     {0}),
    ("v4", npy(head(), version=(4, 0)), {1}),
    ("v0", npy(head(), version=(0, 0)), {1}),
    ("v255.255", npy(head(), version=(255, 255)), {1}),
    ("v1 fortran", npy(head(fortran="True")), {0}),
    ("v1 big-endian", npy(head("'>f4'"), payload=np.arange(120, dtype=">f4").tobytes()), {0}),
    ("v1 float16", npy(head("'<f2'"), payload=PAYLOAD[:240]), {0}),
    ("v1 bool", npy(head("'|b1'"), payload=bytes(120)), {0}),
    ("v1 uint64", npy(head("'<u8'"), payload=b"\xff" * 960), {0}),
    ("v1 float128", npy(head("'<f16'"), payload=bytes(1920)), None),
    ("object dtype", npy(head("'|O'"), payload=b"\x80\x04N."), {1}),
    ("object dtype huge shape", npy(head("'|O'", shape=(BIG, BIG, BIG)), payload=b""), {1}),
    ("structured", npy(head("[('a', '<f4'), ('b', '<i4')]"), payload=PAYLOAD * 2), {1}),
    ("structured with object", npy(head("[('a', '|O')]"), payload=b""), {1}),
    ("complex", npy(head("'<c8'"), payload=PAYLOAD * 2), {1}),
    ("bytes", npy(head("'|S4'")), {1}),
    ("unicode", npy(head("'<U1'")), {1}),
    ("datetime", npy(head("'<M8[s]'"), payload=PAYLOAD * 2), {1}),
    ("void", npy(head("'|V4'")), {1}),
    ("descr garbage", npy(head("'nonsense'")), {1}),
    ("descr int", npy(head("7")), {1}),
    ("descr call", npy(head("__import__('os').getcwd()")), {1}),
    ("descr subarray", npy(head("('<f4', (1000000, 1000000))"), payload=b""), {1}),
    ("fortran garbage", npy(head(fortran="'yes'")), {1}),
    ("shape huge", npy(head(shape=(BIG, BIG, BIG))), {1}),
    ("shape 2**63", npy(head(shape=(2 ** 63, 1, 1))), {1}),
    ("shape product overflows int64", npy(head(shape=(2 ** 32, 2 ** 32, 2 ** 32))), {1}),
    ("shape negative", npy(head(shape=(-1, 5, 6))), {1}),
    ("shape zero", npy(head(shape=(0, 5, 6)), payload=b""), {1}),
    ("shape scalar", npy(head(shape=()), payload=PAYLOAD[:4]), {1}),
    ("shape 2-D", npy(head(shape=(20, 6))), {1}),
    ("shape 6-D", npy(head(shape=(1, 1, 4, 5, 6, 1))), {1}),
    ("shape 32-D", npy(head(shape=(1,) * 32), payload=PAYLOAD[:4]), {1}),
    ("shape 64-D", npy(head(shape=(1,) * 64), payload=PAYLOAD[:4]), {1}),
    ("shape not a tuple", npy(head(shape="'abc'")), {1}),
    ("shape floats", npy(head(shape="(4.0, 5.0, 6.0)")), {1}),
    ("5-D huge channels", npy(head(shape=(1, BIG, 1, 1, 1))), {1}),
    ("header not a dict", npy("[1, 2, 3]"), {1}),
    ("header missing key", npy("{'descr': '<f4', 'shape': (4, 5, 6)}"), {1}),
    ("header extra key", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 5, 6), 'x': 1}"), None),
    ("header unterminated", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 5", pad=False), {1}),
    ("header length lies short", npy(head(), length=10), {1}),
    ("header length lies long (v1)", npy(head(), length=0xFFFF), {1}),
    ("header length lies long (v2)", npy(head(), version=(2, 0), length=0xFFFFFFFF), {1}),
    ("header length zero", npy(head(), length=0), {1}),
    ("payload short", npy(head(), payload=PAYLOAD[:100]), {1}),
    ("payload long", npy(head(), payload=PAYLOAD * 3), None),
    ("magic only", MAGIC, {1}),
    ("empty", b"", {1}),
    ("nested expression", npy("{'descr': '<f4', 'fortran_order': False, 'shape': " + "(" * 200 + ")" * 200 + "}"),
     {1}),
    ("deep header 10 KB", npy("{'descr': '<f4', 'fortran_order': False, 'shape': (4, 5, 6), 'pad': '"
                              + "x" * 10000 + "'}", version=(2, 0)), None),
]


def _random_cases(count):
    rng = random.Random("npy-headers")
    descrs = ["'<f4'", "'>f8'", "'|u1'", "'<i8'", "'|O'", "'<c16'", "'|S0'", "'<f4 '", "''", "None", "'f'",
              "'<f0'", "'<i99'", "[]", "{}"]
    shapes = [SHAPE, (1, 1, 1), (BIG,), (BIG, 1, 1), (4, 5, -6), (2 ** 31, 2 ** 31, 2), (1, 1, 4, 5, 6), "None",
              "(4, 5, 6, )", "[4, 5, 6]", "(True, 5, 6)", "(4, 5, 6) + (1,)"]
    out = []
    for number in range(count):
        version = rng.choice([(1, 0), (2, 0), (3, 0)])
        header = head(rng.choice(descrs), rng.choice(["False", "True", "0", "None"]), rng.choice(shapes))
        payload = PAYLOAD[: rng.choice([0, 4, 240, 480, 960])]
        out.append((f"random {number}: {header} v{version[0]}", npy(header, payload, version), None))
    return out


def _npz(member):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("volume.npy", member)
    return buffer.getvalue()


def _cases(new_case, items, tag):
    cases, files = [], []
    for number, (label, data, expect) in enumerate(items):
        name = f"a{number:03d}.npy"
        folder = new_case(f"{tag}-info-{name}")
        write(folder, name, data)
        info_expect = None if expect is None else (expect | {0} if expect == {1} else expect)
        cases.append(Case(f"info .npy {label}", ["info", name, "--json"], folder, expect=info_expect, how=label))
        if number % 2:
            folder = new_case(f"{tag}-shape-{name}")
            write(folder, name, data)
            cases.append(Case(f"shape .npy {label}", ["shape", name, "--kernel", "nearest", "--stride", "2",
                                                      "--json"], folder, expect=expect, how=label))
        files.append((name, data, label, expect))
    for archive in (True,) if tag == "named" else (False, True):   # test_batch_statuses runs the named .npy
        folder = new_case(f"{tag}-batch-{'npz' if archive else 'npy'}")
        names = []
        for name, data, _, _ in files:
            if archive:
                name = name.replace(".npy", ".npz")
                data = _npz(data)
            write(folder, name, data)
            names.append(name)
        how = "; ".join(f"{n}: {label} (exit {sorted(e) if e else 'any'})" for n, (_, _, label, e) in
                        zip(names, files))
        cases.append(Case(f"batch of {len(files)} crafted {'.npz members' if archive else '.npy files'}",
                          ["batch", *names, "--out-dir", "out", "--kernel", "nearest", "--stride", "2", "-q",
                           "--json"], folder, output="out", expect={0, 1}, how=how))
    return cases, files


def test_crafted_npy_headers(new_case):
    cases, _ = _cases(new_case, CASES, "named")
    assert_promise(cases)


def test_random_npy_headers(new_case):
    cases, _ = _cases(new_case, _random_cases(8), "random")
    assert_promise(cases)


def test_batch_statuses_follow_the_header(new_case):
    """Each file of a batch ends as the documentation says: valid headers ok, refused ones failed."""
    folder = new_case("statuses")
    names, wanted = [], {}
    for number, (label, data, expect) in enumerate(CASES):
        if expect is None:
            continue
        name = f"s{number:03d}.npy"
        write(folder, name, data)
        names.append(name)
        wanted[name] = "ok" if expect == {0} else "failed"
    case = Case("batch statuses", ["batch", *names, "--out-dir", "out", "--kernel", "nearest", "--stride", "2",
                                   "-q", "--json"], folder, output="out", expect={1})
    [outcome] = assert_promise([case])
    assert_statuses(case, outcome, wanted)
