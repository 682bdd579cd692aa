"""Damaged and hostile weights files: PyTorch checkpoints, safetensors, ONNX models, Keras files.

Every mutation starts from a committed fixture of ``tests/fixtures/weights`` (see
the ``make_*_fixtures.py`` scripts there): byte flips and truncations of the
whole file, then mutations of the fields each format is made of (the opcodes of
a checkpoint's ``data.pkl`` and its zip members, a safetensors JSON header, the
protobuf fields of an ONNX model and its external data, a ``.keras`` archive's
``config.json`` and members, a Keras ``.h5`` file's attributes and datasets),
and hand-made hostile files (pickles that would run code, memo and length
bombs, nesting, names that are not Unicode, paths that leave the model's folder).

Each damaged file goes through ``info`` (headers and layer settings),
``shape --weights`` or ``run --weights`` (which also reads the tensors and
computes). The promise is the suite's (see ``fuzzkit.py``); files whose meaning
is certain are also held to their exit code: a pickle that names ``os.system``
must be refused (1), and it must not have run (the case folder is compared
before and after, so a file it created would be reported).
"""

from __future__ import annotations

import io
import json
import os
import pickle
import pickletools
import random
import struct
import zipfile

import numpy as np
import pytest

from conftest import npy_bytes, weights_fixture
from fuzzkit import Case, assert_promise, flip_bytes, truncations, write

#: Volumes the layers are run on: 1, 2 and 4 channels.
VOLUMES = {
    "x1.npy": np.random.default_rng(5).standard_normal((1, 3, 4, 3)).astype(np.float32),
    "x2.npy": np.random.default_rng(6).standard_normal((2, 3, 4, 3)).astype(np.float32),
    "x4.npy": np.random.default_rng(7).standard_normal((4, 3, 4, 3)).astype(np.float32),
}


def _put_volumes(folder):
    for name, array in VOLUMES.items():
        write(folder, name, npy_bytes(array))
    return folder


def _cases(new_case, files, layer=None, volume="x2.npy", run_every=3, tag="", expect=None, extra=None, first=0):
    """Cases for damaged weights files ``[(name, bytes, how)]``.

    The files take turns: ``info`` (text or ``--json``), ``shape --weights`` and
    ``run --weights`` (every ``run_every``-th file). ``extra(folder)`` adds
    files beside each (external data).
    """
    cases = []
    for number, (name, data, how) in enumerate(files, start=first):
        folder = new_case(f"{tag}{name}")
        write(folder, name, data)
        if extra is not None:
            extra(folder)
        spec = f"{name}:{layer}" if layer else name
        kind = number % run_every
        if kind == 0:
            _put_volumes(folder)
            args = ["run", volume, "out.npy", "--weights", spec, "-q", "--json"]
            cases.append(Case(f"run --weights {how}", args, folder, output="out.npy", how=how, expect=expect))
        elif kind == 1:
            args = ["info", name] + (["--json"] if number % 2 else [])
            cases.append(Case(f"info {how}", args, folder, how=how, expect=expect))
        else:
            _put_volumes(folder)
            args = ["shape", volume, "--weights", spec, "--json"]
            cases.append(Case(f"shape --weights {how}", args, folder, how=how, expect=expect))
    return cases


def _info_text(new_case, files, names):
    """Plain-text ``info`` cases (names from inside the file reach stdout as they are) for ``names``."""
    cases = []
    for name, data, how in files:
        if name.split(".")[0] in names:
            folder = new_case(f"text-{name}")
            write(folder, name, data)
            cases.append(Case(f"info (text) {how}", ["info", name], folder, how=how))
    return cases


def _damaged(data, name, seed, flips, cuts, header, step=2):
    """Byte flips and truncations of ``data`` (every ``step``-th cut): ``[(name, bytes, how)]``."""
    stem, suffix = name.split(".", 1)
    rng = random.Random(f"{seed}-{name}")
    out = []
    for number in range(flips):
        damaged, how = flip_bytes(data, rng, header=header)
        out.append((f"{stem}_f{number}.{suffix}", damaged, f"{name} flipped {how}"))
    for cut in truncations(len(data), header, rng, cuts)[::step]:
        out.append((f"{stem}_t{cut}.{suffix}", data[:cut], f"{name} truncated to {cut} of {len(data)} bytes"))
    return out


# --------------------------------------------------------------------------- PyTorch

def _zip_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(info.filename, archive.read(info)) for info in archive.infolist()]


def _zip(members, compress=zipfile.ZIP_STORED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compress) as archive:
        for name, data in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = compress
            archive.writestr(info, data)
    return buffer.getvalue()


def _with_pickle(checkpoint, pkl):
    """``checkpoint`` (zip bytes) with its ``data.pkl`` replaced."""
    return _zip([(n, pkl if n.endswith("/data.pkl") else d) for n, d in _zip_members(checkpoint)])


def _data_pkl(checkpoint):
    return next(d for n, d in _zip_members(checkpoint) if n.endswith("/data.pkl"))


def _ops(data):
    """``(opcode name, argument, start, end)`` of every opcode of a pickle."""
    ops = list(pickletools.genops(data))
    return [(op.name, arg, pos, ops[i + 1][2] if i + 1 < len(ops) else len(data))
            for i, (op, arg, pos) in enumerate(ops)]


def _int_op(value):
    return pickle.dumps(value, protocol=2)[2:-1]


def _str_op(text):
    raw = text.encode("utf-8", "surrogatepass")
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global_op(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


INT_VALUES = [0, 1, 3, 255, 65536, 2 ** 31 - 1, 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 64 + 1, 10 ** 30, 10 ** 5000, -1,
              -(2 ** 63)]
STR_VALUES = ["", "storage", "1", "99", "cuda:0", "0.weight", "state_dict", "a\ud800b", "\x00", "x" * 70000,
              "../../etc/passwd"]
GLOBALS = [("posix", "system"), ("os", "system"), ("builtins", "eval"), ("__builtin__", "eval"),
           ("subprocess", "Popen"), ("nt", "system"), ("torch.hub", "load"), ("torch.jit", "load"),
           ("operator", "attrgetter"), ("pickle", "loads"), ("builtins", "getattr"), ("copyreg", "_reconstructor"),
           ("torch._utils", "_rebuild_qtensor"), ("torch._utils", "_rebuild_evil"), ("collections", "Counter"),
           ("torch", "HalfStorage"), ("torch", "ComplexFloatStorage"), ("builtins", "set"), ("builtins", "bytearray"),
           ("_codecs", "encode"), ("torch", "Size"), ("torch._tensor", "_rebuild_from_type_v2"),
           ("numpy.core.multiarray", "_reconstruct"), ("functools", "partial"), ("torch", "float8_e4m3fn")]


def _mutate_pickle(data, rng):
    """One seeded mutation of a pickle's opcodes: ``(bytes, how)``."""
    ops = _ops(data)
    kind = rng.choice(["int", "int", "str", "global", "drop", "repeat"])
    if kind == "int":
        picks = [o for o in ops if o[0] in ("BININT1", "BININT2", "BININT", "LONG1")]
        value = rng.choice(INT_VALUES)
        replacement = _int_op(value)
        how = f"int -> {value if value < 10 ** 40 else '10**5000'}"
    elif kind == "str":
        picks = [o for o in ops if o[0] in ("BINUNICODE", "SHORT_BINUNICODE")]
        text = rng.choice(STR_VALUES)
        replacement = _str_op(text)
        how = f"string -> {text[:20]!r}"
    elif kind == "global":
        picks = [o for o in ops if o[0] in ("GLOBAL", "STACK_GLOBAL")]
        module, name = rng.choice(GLOBALS)
        replacement = _global_op(module, name)
        how = f"global -> {module}.{name}"
    else:
        picks = [o for o in ops if o[0] not in ("PROTO", "STOP")]
        how = kind
        replacement = None
    op = rng.choice(picks)
    _, arg, start, end = op
    if replacement is None:
        replacement = b"" if kind == "drop" else data[start:end] * 2
    where = f"{op[0]} {str(arg)[:30]!r} at {start}"
    return data[:start] + replacement + data[end:], f"data.pkl {where}: {how}"


def _tensor_pickle(tensors, extra=b""):
    """A protocol-2 state dict ``{name: tensor}``; ``tensors`` maps names to
    ``(storage key, storage type, numel, offset, size, stride)``; ``extra`` holds
    more key/value opcodes of the dict."""
    out = b"\x80\x02" + _global_op("collections", "OrderedDict") + b")R("
    for name, (key, storage, numel, offset, size, stride) in tensors.items():
        out += _str_op(name) + _global_op("torch._utils", "_rebuild_tensor_v2") + b"(("
        out += _str_op("storage") + _global_op("torch", storage) + _str_op(key) + _str_op("cpu") + _int_op(numel)
        out += b"tQ" + _int_op(offset)
        out += b"(" + b"".join(_int_op(v) for v in size) + b"t"
        out += b"(" + b"".join(_int_op(v) for v in stride) + b"t"
        out += b"\x89" + _global_op("collections", "OrderedDict") + b")R" + b"t" + b"R"
    return out + extra + b"u."


def _checkpoint(pkl, storages, prefix="archive", extra=()):
    members = [(f"{prefix}/data.pkl", pkl), (f"{prefix}/byteorder", b"little")]
    members += [(f"{prefix}/data/{key}", data) for key, data in storages.items()]
    members += [(f"{prefix}/version", b"3\n"), *extra]
    return _zip(members)


def _hostile_pickles():
    """Hand-made ``data.pkl`` streams: ``(name, pickle, storages, how, exit codes)``."""
    weight = np.arange(8, dtype="<f4").tobytes()
    good = {"up.weight": ("0", "FloatStorage", 8, 0, (1, 1, 2, 2, 2), (8, 8, 4, 2, 1))}
    touch = _str_op("touch PWNED")
    items = [
        ("rce_global", b"\x80\x02" + _global_op("posix", "system") + b"(" + touch + b"tR.", "posix.system REDUCE",
         {1}),
        ("rce_os", b"\x80\x02" + _global_op("os", "system") + touch + b"\x85R.", "os.system REDUCE", {1}),
        ("rce_inst", b"\x80\x02(" + touch + b"iposix\nsystem\n.", "INST posix.system", {1}),
        ("rce_obj", b"\x80\x02(" + _global_op("subprocess", "Popen") + b"(" + touch + b"lo.", "OBJ subprocess.Popen",
         {1}),
        ("rce_stack", b"\x80\x04" + b"\x8c\x08builtins\x8c\x04exec\x93" + _str_op("open('PWNED','w')") + b"\x85R.",
         "STACK_GLOBAL builtins.exec", {1}),
        ("rce_compat", b"\x80\x02" + _global_op("__builtin__", "eval") + _str_op("open('PWNED','w')") + b"\x85R.",
         "Python 2 name __builtin__.eval", {1}),
        ("rce_nested", _tensor_pickle(good, _str_op("cb") + _global_op("os", "system") + touch + b"\x85R"),
         "a valid state dict whose last value calls os.system", {1}),
        ("rce_build", b"\x80\x02" + _global_op("torch._utils", "_rebuild_tensor_v2") + b"}" +
         _str_op("fn") + _global_op("posix", "system") + b"sb.", "BUILD on an allowed function", {1}),
        ("memo_bomb", b"\x80\x02N" + b"r" + struct.pack("<I", 2 ** 31 - 5) + b".", "LONG_BINPUT 2**31", {1}),
        ("bytes_bomb", b"\x80\x03B" + struct.pack("<I", 2 ** 32 - 1) + b"xx.", "BINBYTES of 4 GiB, 2 bytes there",
         {1}),
        ("deep", b"\x80\x02" + b"(" * 100_000 + b"t" * 100_000 + b".", "tuples nested 100000 deep", {1}),
        ("laughs", b"\x80\x02" + _global_op("torch", "FloatStorage") + b"q\x00" +
         b"".join(b"h" + bytes([i]) + b"h" + bytes([i]) + b"\x86q" + bytes([i + 1]) for i in range(60)) + b".",
         "2**60 paths through 60 shared pairs", {1}),
        ("zero_stride", _tensor_pickle({"up.weight": ("0", "FloatStorage", 8, 0, (1, 1, 2, 2, 2 ** 40),
                                                      (0, 0, 0, 0, 0))}),
         "a 2**43-element weight on one element (stride 0)", {1, 2}),
        ("zero_axis", _tensor_pickle({"up.weight": ("0", "FloatStorage", 8, 0, (0, 1, 2 ** 70, 1, 1),
                                                    (1, 1, 1, 1, 1))}), "weight of shape (0, 1, 2**70, 1, 1)",
         {1, 2}),
        ("huge_numel", _tensor_pickle({"up.weight": ("0", "FloatStorage", 2 ** 62, 0, (1, 1, 2, 2, 2),
                                                     (8, 8, 4, 2, 1))}), "storage numel 2**62, 32 bytes", {1}),
        ("surrogate_name", _tensor_pickle({"up\ud800.weight": good["up.weight"]}), "a name with a lone surrogate",
         {0, 1}),
        ("many", _tensor_pickle({f"l{i}.weight": ("0", "FloatStorage", 8, 0, (1, 1, 2, 2, 2), (8, 8, 4, 2, 1))
                                 for i in range(5000)}), "5000 weights on one storage", {1}),
    ]
    return [(name, pkl, {"0": weight}, how, codes) for name, pkl, how, codes in items]


def test_damaged_pytorch_checkpoints(new_case):
    """Byte flips and truncations of the PyTorch fixtures (zip directories, local headers, data.pkl)."""
    cases = []
    for name, layer, volume, flips in [("torch_state_dict.pt", "2", "x2.npy", 2),
                                       ("torch_lightning.ckpt", "2", "x2.npy", 1),
                                       ("torch_legacy.pt", None, "x1.npy", 1)]:
        data = weights_fixture(name)
        header = 600 if name != "torch_legacy.pt" else 120
        files = _damaged(data, name, "torch", flips=flips, cuts=1, header=header, step=3)
        # The zip directory sits at the end: damage there too.
        rng = random.Random(f"tail-{name}")
        for number in range(1 if name != "torch_legacy.pt" else 0):
            tail = bytearray(data)
            for _ in range(3):
                tail[rng.randrange(len(data) - 300, len(data))] = rng.randrange(256)
            files.append((f"{name.split('.')[0]}_d{number}.{name.split('.')[1]}", bytes(tail),
                          f"{name}: 3 bytes of the zip directory changed (seed tail-{name} #{number})"))
        cases += _cases(new_case, files, layer=layer, volume=volume, tag="pt-")
    assert_promise(cases)


def test_pytorch_pickle_opcodes(new_case):
    """Seeded mutations of data.pkl's opcodes: integers (sizes, strides, offsets, numels), strings
    (storage keys, names, locations), globals (code-running ones must be refused), dropped and
    repeated opcodes."""
    rng = random.Random("pickle-opcodes")
    files = []
    for name, rounds in [("torch_state_dict.pt", 6), ("torch_lightning.ckpt", 2), ("torch_whole_module.pt", 2)]:
        checkpoint = weights_fixture(name)
        pkl = _data_pkl(checkpoint)
        for number in range(rounds):
            mutated, how = pkl, []
            for _ in range(rng.choice([1, 1, 2])):
                mutated, step = _mutate_pickle(mutated, rng)
                how.append(step)
            stem, suffix = name.split(".")
            files.append((f"{stem}_p{number}.{suffix}", _with_pickle(checkpoint, mutated),
                          f"{name}: " + "; ".join(how)))
    cases = []
    for number, (file, data, how) in enumerate(files):
        refused = "global -> " in how and any(f"global -> {m}.{n}" in how for m, n in GLOBALS[:11])
        expect = {1} if refused else None
        cases += _cases(new_case, [(file, data, how)], layer="2", volume="x2.npy", run_every=2, tag="pkl-",
                        expect=expect, first=number)
    assert_promise(cases)


def test_pytorch_hostile_pickles(new_case):
    """Pickles that would run code when unpickled normally, bombs, nesting, lying tensor records."""
    cases = []
    for number, (name, pkl, storages, how, codes) in enumerate(_hostile_pickles()):
        data = _checkpoint(pkl, storages)
        file = f"{name}.pt"
        folder = _put_volumes(new_case(f"hostile-{name}"))
        write(folder, file, data)
        # Code-running globals and records that only loading the tensor can catch go through run.
        if number % 2 == 0 or name.startswith("rce") or name in ("zero_axis", "zero_stride", "huge_numel"):
            args = ["run", "x1.npy", "out.npy", "--weights", file, "-q", "--json"]
            cases.append(Case(f"run --weights {how}", args, folder, output="out.npy", expect=codes, how=how))
        if number % 2 == 1:
            folder = new_case(f"hostile-info-{name}")
            write(folder, file, data)
            # info describes a checkpoint without tensors; a refused global is refused there too.
            cases.append(Case(f"info {how}", ["info", file], folder,
                              expect=codes if name.startswith("rce") else codes | {0}, how=how))
        if name == "surrogate_name":
            cases += _info_text(new_case, [(file, data, how)], {name})
    assert_promise(cases)


def test_pytorch_zip_members(new_case):
    """Checkpoints whose zip members lie: missing storages, wrong sizes, byte orders, two
    checkpoints in one archive, TorchScript and legacy files, a deflated data.pkl."""
    base = weights_fixture("torch_state_dict.pt")
    members = _zip_members(base)
    prefix = members[0][0].split("/")[0]

    def edit(drop=(), change=None, add=(), compress=zipfile.ZIP_STORED):
        change = change or {}
        out = [(n, change.get(n.split("/", 1)[1], d)) for n, d in members if n.split("/", 1)[1] not in drop]
        return _zip(out + list(add), compress)

    legacy = weights_fixture("torch_legacy.pt")
    files = [
        ("nostore.pt", edit(drop=["data/2"]), "the storage of 2.weight missing"),
        ("short.pt", edit(change={"data/2": b"\0" * 100}), "storage data/2 shorter than declared"),
        ("long.pt", edit(change={"data/2": b"\0" * 400}), "storage data/2 longer than declared"),
        ("big.pt", edit(change={"byteorder": b"big"}), "byteorder big on little-endian storages"),
        ("twice.pt", edit(add=[("other/data.pkl", _data_pkl(base))]), "two data.pkl in one archive"),
        ("script.pt", edit(add=[(f"{prefix}/constants.pkl", b"\x80\x02)."), (f"{prefix}/code/x.py", b"import os")]),
         "TorchScript members"),
        ("deflated.pt", edit(compress=zipfile.ZIP_DEFLATED), "every member deflated"),
        ("legacy_rce.pt", legacy[:40] + b"cposix\nsystem\n(Vtouch PWNED\ntR.",
         "legacy magic followed by a posix.system pickle"),
        ("keras_named.ckpt", weights_fixture("keras_layers.keras"), "a .keras zip named .ckpt"),
    ]
    # A data.pkl declared (central directory and local header) far larger than it is.
    lying = bytearray(base)
    at = lying.find(b"PK\x01\x02")
    lying[at + 24:at + 28] = struct.pack("<I", 0xFFFFFFF0)       # uncompressed size
    files.append(("lying.pt", bytes(lying), "central directory: data.pkl declares 4 GiB"))
    assert_promise(_cases(new_case, files, layer="2", volume="x2.npy", run_every=2, tag="zip-"))


# --------------------------------------------------------------------------- safetensors

def _safetensors(header, data=b"", length=None, raw=None):
    text = raw if raw is not None else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _st_parts():
    data = weights_fixture("st_weights.safetensors")
    length = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + length]), data[8 + length:]


ST_FIELD_VALUES = {
    "dtype": ["F32", "f32", "F8_E4M3", "F4", "C64", "X99", "", None, 7, ["F32"]],
    "shape": [[], [0], [2, 3, 2, 2, 2], [-1, 3, 2, 2, 2], [2 ** 62, 2 ** 62], [1.5], [True], "[2]", None,
              [10 ** 30, 0], [2, 3, 2, 2, 2, 1, 1, 1], [3] * 64],
    "data_offsets": [[0, 0], [64, 64], [160, 64], [-1, 95], [64, 2 ** 64], [64.0, 160.0], [64], [64, 160, 1], None,
                     [10 ** 300, 10 ** 300 + 96], "64,160"],
}


def test_safetensors_headers(new_case):
    """The 8-byte length and the JSON header: flips, truncations, seeded field values, hostile headers."""
    data = weights_fixture("st_weights.safetensors")
    header, payload = _st_parts()
    files = _damaged(data, "st.safetensors", "safetensors", flips=2, cuts=1, header=620, step=3)
    rng = random.Random("safetensors-fields")
    names = [k for k in header if k != "__metadata__"]
    for number in range(5):
        mutated = json.loads(json.dumps(header))
        steps = []
        for _ in range(rng.choice([1, 1, 2])):
            name = "up.weight" if rng.random() < 0.5 else rng.choice(names)
            field = rng.choice(list(ST_FIELD_VALUES))
            value = rng.choice(ST_FIELD_VALUES[field])
            mutated[name][field] = value
            steps.append(f"{name}.{field} = {json.dumps(value)[:40]}")
        files.append((f"st_m{number}.safetensors", _safetensors(mutated, payload), "; ".join(steps)))
    weight = {"dtype": "F32", "shape": [1, 1, 2, 2, 2], "data_offsets": [0, 32]}
    zeros = b"\0" * 32
    hostile = [
        ("len_huge", _safetensors(None, zeros, length=2 ** 64 - 1, raw=b"{}"), "length field 2**64-1"),
        ("deep", _safetensors(None, raw=b"[" * 100_000 + b"]" * 100_000), "a header nested 100000 deep"),
        ("dtype_list", _safetensors({"w": dict(weight, dtype=["F32"])}, zeros), "dtype a list"),
        ("utf8", _safetensors(None, zeros, raw=b'{"\xff\xfe.weight": ' + json.dumps(weight).encode() + b"}"),
         "a name that is not UTF-8"),
        ("surrogate", _safetensors({"up\ud800.weight": weight}, zeros), "a name with a lone surrogate"),
        ("control", _safetensors({"up\x1b[2J\n.weight": weight}, zeros), "a name with control characters"),
        ("bigint", _safetensors(None, zeros, raw=b'{"w": {"dtype": "F32", "shape": [' + b"9" * 5000 +
                                b'], "data_offsets": [0, 32]}}'), "a 5000-digit shape"),
        ("f4_odd", _safetensors({"w": {"dtype": "F4", "shape": [10 ** 4000 + 1, 10 ** 4000 + 1],
                                       "data_offsets": [0, 0]}}), "F4 tensor with 8000-digit element count"),
        ("zero_dim", _safetensors({"w": {"dtype": "F32", "shape": [0, 1, 10 ** 4000, 1, 1], "data_offsets": [0, 0]}}),
         "a 5-D weight (0, 1, 10**4000, 1, 1)"),
        ("zero_cin", _safetensors({"w": {"dtype": "F32", "shape": [0, 1, 2, 2, 2], "data_offsets": [0, 0]}}),
         "a 5-D weight (0, 1, 2, 2, 2)"),
        ("gap", _safetensors({"w": dict(weight, data_offsets=[4, 36])}, b"\0" * 36), "4 bytes before the tensor"),
        ("space_pad", _safetensors(None, zeros, raw=json.dumps({"w": weight}).encode() + b" " * 8),
         "the header padded with spaces"),
    ]
    files += [(f"{name}.safetensors", blob, how) for name, blob, how in hostile]
    cases = _cases(new_case, files, volume="x1.npy", run_every=2, tag="st-")
    cases += _info_text(new_case, files, {"surrogate", "control", "dtype_list"})
    # One name 300000 times (21 MB, under the 100 MB limit): finding the repeats must stay linear.
    repeats = _safetensors(None, zeros, raw=b"{" + b",".join([b'"w":' + json.dumps(weight).encode()] * 300_000) + b"}")
    cases += _info_text(new_case, [("repeats.safetensors", repeats, "the same name 300000 times")], {"repeats"})
    assert_promise(cases)


# --------------------------------------------------------------------------- ONNX

def _onnx():
    return pytest.importorskip("onnx")


def _onnx_cases():
    """``(name, model bytes, how, extra files)`` of mutated ONNX models."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    base = onnx.load_model_from_string(weights_fixture("onnx_pads_bias.onnx"))
    out = []

    def add(name, how, change, extra=None):
        model = onnx.ModelProto()
        model.CopyFrom(base)
        change(model)
        out.append((name, model.SerializeToString(), how, extra))

    def attr(name, value):
        def change(model):
            node = model.graph.node[0]
            kept = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            node.attribute.extend(kept)
            if value is not None:
                node.attribute.append(helper.make_attribute(name, value))
        return change

    for name, value, how in [
        ("strides", [0, 1, 1], "strides 0"), ("strides", 2.5, "strides a float"),
        ("pads", [0, 0, 0, 2 ** 40, 0, 0], "pads 2**40"), ("dilations", [2 ** 40, 1, 1], "dilation 2**40"),
        ("group", 3, "group 3 (2 input channels)"), ("auto_pad", b"\xff\xfeX", "auto_pad not UTF-8"),
        ("output_shape", [2 ** 62, 1, 1], "output_shape 2**62"),
        ("kernel_shape", [9, 9, 9], "kernel_shape not the weight's"),
    ]:
        add(f"attr_{len(out)}", f"onnx_pads_bias.onnx: attribute {name} = {value!r}", attr(name, value))

    def tensor(index, **fields):
        def change(model):
            t = model.graph.initializer[index]
            for key, value in fields.items():
                if key == "dims":
                    del t.dims[:]
                    t.dims.extend(value)
                elif key == "raw_data":
                    t.raw_data = value
                else:
                    setattr(t, key, value)
        return change

    for index, fields, how in [
        (0, {"dims": [2 ** 62, 3, 2, 3, 2]}, "weight dims 2**62"), (0, {"dims": [0, 3, 2, 3, 2]}, "0 input channels"),
        (0, {"data_type": 8}, "weight element type string"), (1, {"dims": [4]}, "a bias of 4 values"),
    ]:
        add(f"tensor_{len(out)}", f"onnx_pads_bias.onnx: initializer {index} {how}", tensor(index, **fields))

    def graph_change(fn):
        def change(model):
            fn(model.graph)
        return change

    def identity_loop(graph):
        graph.node.append(helper.make_node("Identity", ["b"], ["a"]))
        graph.node.append(helper.make_node("Identity", ["a"], ["b"]))
        graph.node[0].input[1] = "a"

    def graph_weight(graph):
        graph.input.append(helper.make_tensor_value_info("up.weight", TensorProto.FLOAT, [2, 3, 2, 3, 2]))
        del graph.initializer[0]

    def many_nodes(graph):
        for i in range(3000):
            node = helper.make_node("ConvTranspose", ["x", "up.weight", "up.bias"], [f"y{i}"], name=f"n{i}",
                                    strides=[2, 1, 2])
            graph.node.append(node)

    def no_nodes(graph):
        del graph.node[:]

    def weird_names(graph):
        graph.node[0].name = "up\x1b[2J\u202e\n"

    def constant(graph):
        t = graph.initializer[0]
        graph.node.insert(0, helper.make_node("Constant", [], ["up.weight"], value=t))
        graph.node.insert(0, helper.make_node("Constant", [], ["up.weight"], value_float=1.0))
        del graph.initializer[0]

    for name, fn, how in [("loop", identity_loop, "weight through an Identity loop"),
                          ("many", many_nodes, "3001 ConvTranspose nodes"),
                          ("constant", constant, "weight from two Constant nodes of one name")]:
        add(name, f"onnx_pads_bias.onnx: {how}", graph_change(fn))

    def zero_ir(model):
        model.ir_version = 0


    # External data: the fixture whose tensors sit in onnx_external.bin beside it.
    external = onnx.load_model_from_string(weights_fixture("onnx_external.onnx"))
    blob = weights_fixture("onnx_external.bin")

    def ext(name, how, entries, files):
        model = onnx.ModelProto()
        model.CopyFrom(external)
        t = model.graph.initializer[0]
        kept = {e.key: e.value for e in t.external_data}
        kept.update(entries)
        del t.external_data[:]
        for key, value in kept.items():
            if value is not None:
                t.external_data.add(key=key, value=value)
        out.append((name, model.SerializeToString(), f"onnx_external.onnx: {how}", files))

    def fifo(folder):
        os.mkfifo(os.path.join(folder, "pipe.bin"))
        write(folder, "onnx_external.bin", blob)

    def devlink(folder):
        os.symlink("/dev/zero", os.path.join(folder, "zero.bin"))
        write(folder, "onnx_external.bin", blob)

    def outlink(folder):
        os.symlink("/etc/hostname", os.path.join(folder, "host.bin"))
        write(folder, "onnx_external.bin", blob)

    def subfolder(folder):
        os.mkdir(os.path.join(folder, "sub.bin"))
        write(folder, "onnx_external.bin", blob)

    def plain(folder):
        write(folder, "onnx_external.bin", blob)

    for name, how, entries, files in [
        ("ext_ok", "valid external data", {}, plain),
        ("ext_up", "location ../onnx_external.bin", {"location": "../onnx_external.bin"}, plain),
        ("ext_nul", "location with a NUL byte", {"location": "onnx_external.bin\0x"}, plain),
        ("ext_fifo", "location a FIFO beside the model", {"location": "pipe.bin"}, fifo),
        ("ext_dev", "location a link to /dev/zero", {"location": "zero.bin"}, devlink),
        ("ext_out", "location a link out of the folder", {"location": "host.bin"}, outlink),
        ("ext_offset", "offset 2**62", {"offset": str(2 ** 62)}, plain),
    ]:
        ext(name, how, entries, files)
    return out


def test_onnx_models(new_case):
    """ONNX protobuf flips and truncations, then attribute, initializer, graph and external-data fields."""
    _onnx()
    data = weights_fixture("onnx_pads_bias.onnx")
    files = _damaged(data, "onnx_pads_bias.onnx", "onnx", flips=1, cuts=0, header=len(data), step=3)
    cases = _cases(new_case, files, volume="x2.npy", run_every=2, tag="onnx-")
    for number, (name, blob, how, extra) in enumerate(_onnx_cases()):
        file = f"{name}.onnx"
        cases += _cases(new_case, [(file, blob, how)], volume="x2.npy", run_every=1 if name.startswith("ext") else 3,
                        tag="onnx-", extra=extra, first=number)
    assert_promise(cases)


# --------------------------------------------------------------------------- Keras

def _keras_members(data):
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        return [(i.filename, archive.read(i), i.compress_type) for i in archive.infolist()]


def _keras_zip(members, compress=None):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data, kind in members:
            info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = kind if compress is None else compress
            archive.writestr(info, data)
    return buffer.getvalue()


def _conv_layers(config):
    """Every Conv3DTranspose layer dict of a model config, nested ones included."""
    found = []

    def walk(obj):
        if isinstance(obj, dict):
            if obj.get("class_name") == "Conv3DTranspose" and isinstance(obj.get("config"), dict):
                found.append(obj)
            for value in obj.values():
                walk(value)
        elif isinstance(obj, list):
            for value in obj:
                walk(value)

    walk(config)
    return found


KERAS_FIELDS = {
    "strides": [0, -1, 2 ** 62, [2, 2], [1.5, 1, 1], True, "2", [2, 2, 2, 2], None],
    "kernel_size": [0, 2 ** 40, [3, 3], [1, 1, 1], "3", None],
    "padding": ["SAME", "causal", "full", 7, None, ""],
    "filters": [0, -1, 2 ** 40, True, 2.0, None, 1],
    "dilation_rate": [0, 2 ** 40, [2, 1, 3], [1, 1]],
    "output_padding": [-1, 2 ** 40, [1, 0, 2], [5, 5, 5], "1"],
    "use_bias": ["yes", 0, None, False],
    "data_format": ["channels_middle", 3, None],
    "groups": [2, 0, "1"],
    "name": [None, 7, "", "same_s2", "up\ud800", "x" * 5000, ["a"]],
}


def test_keras_archives(new_case):
    """``.keras`` zips: flips and truncations, seeded config fields, members missing, deflated, encrypted."""
    data = weights_fixture("keras_layers.keras")
    members = _keras_members(data)
    config = json.loads(next(d for n, d, _ in members if n == "config.json"))
    files = _damaged(data, "kl.keras", "keras", flips=2, cuts=1, header=len(data), step=3)
    rng = random.Random("keras-config")

    def with_config(value, raw=None):
        text = raw if raw is not None else json.dumps(value).encode()
        return _keras_zip([(n, text if n == "config.json" else d, k) for n, d, k in members])

    for number in range(4):
        mutated = json.loads(json.dumps(config))
        layers = _conv_layers(mutated)
        steps = []
        for _ in range(rng.choice([1, 1, 2])):
            layer = rng.choice(layers)
            field = rng.choice(list(KERAS_FIELDS))
            value = rng.choice(KERAS_FIELDS[field])
            layer["config"][field] = value
            steps.append(f"{layer['name']}.{field} = {json.dumps(value)[:40]}")
        files.append((f"kl_c{number}.keras", with_config(mutated), "config.json: " + "; ".join(steps)))

    def nest(depth):
        inner = {"class_name": "Conv3DTranspose", "config": {"name": "up", "filters": 1, "kernel_size": 2}}
        for level in range(depth):
            inner = {"class_name": "Sequential", "config": {"name": f"s{level}", "layers": [inner]}}
        return inner

    weights = next(d for n, d, _ in members if n == "model.weights.h5")
    hostile = [
        ("nested_65", with_config(nest(65)), "models nested 65 deep"),
        ("deep_json", with_config(None, raw=b"[" * 100_000 + b"]" * 100_000), "config.json nested 100000 deep"),
        ("surrogate", with_config(None, raw=json.dumps(config).replace("same_s2", "same\\ud800s2").encode()),
         "a layer name with a lone surrogate"),
        ("list", with_config([1, 2]), "config.json a list"),
        ("many", with_config({"class_name": "Sequential", "config": {"name": "m", "layers": [
            {"class_name": "Conv3DTranspose", "config": {"name": f"u{i}", "filters": 2, "kernel_size": 3}}
            for i in range(3000)]}}), "3000 Conv3DTranspose layers"),
        ("noweights", _keras_zip([m for m in members if m[0] != "model.weights.h5"]), "no model.weights.h5"),
        ("npzweights", _keras_zip([m for m in members if m[0] != "model.weights.h5"] +
                                  [("model.weights.npz", b"PK\x05\x06" + b"\0" * 18, zipfile.ZIP_STORED)]),
         "weights in model.weights.npz"),
        ("deflated", _keras_zip(members, compress=zipfile.ZIP_DEFLATED), "every member deflated"),
        ("weights_junk", _keras_zip([(n, d if n != "model.weights.h5" else d[:4096] + b"\0" * (len(d) - 4096), k)
                                     for n, d, k in members]), "model.weights.h5 zeroed after 4 KiB"),
        ("pt_named", weights_fixture("torch_state_dict.pt"), "a PyTorch zip named .keras"),
    ]
    encrypted = bytearray(data)
    at = encrypted.find(b"PK\x01\x02")
    while at >= 0:
        name_len = struct.unpack("<H", encrypted[at + 28:at + 30])[0]
        if encrypted[at + 46:at + 46 + name_len] == b"model.weights.h5":
            encrypted[at + 8] |= 1
        at = encrypted.find(b"PK\x01\x02", at + 4)
    hostile.append(("encrypted", bytes(encrypted), "model.weights.h5 flagged encrypted"))
    files += [(f"{name}.keras", blob, how) for name, blob, how in hostile]
    del weights
    cases = _cases(new_case, files, layer=None, volume="x2.npy", run_every=2, tag="keras-")
    # The layer by name, where the file is the fixture's model (which has several).
    for case in cases:
        if case.command in ("run", "shape") and case.args[case.args.index("--weights") + 1].startswith("kl"):
            at = case.args.index("--weights") + 1
            case.args[at] += ":same_s2"
    cases += _info_text(new_case, files, {"surrogate"})
    assert_promise(cases)


def _h5_copy(data, change):
    """``data`` (an HDF5 file) with ``change(handle)`` applied, as bytes."""
    import h5py

    buffer = io.BytesIO(data)
    with h5py.File(buffer, "r+") as handle:
        change(handle)
    return buffer.getvalue()


def test_keras_h5_files(new_case):
    """Keras ``.h5`` models and weight files: flips and truncations, then model_config, layer and
    weight names, and the kernel datasets themselves (types, shapes, external storage)."""
    import h5py

    model = weights_fixture("keras_k2.h5")
    files = _damaged(model, "k2.h5", "keras-h5", flips=2, cuts=1, header=4096, step=3)
    files += _damaged(weights_fixture("keras_layers.weights.h5"), "kw.weights.h5", "keras-w", flips=1, cuts=0,
                      header=4096, step=6)
    config = json.loads(h5py.File(io.BytesIO(model), "r").attrs["model_config"])
    kernel = "model_weights/k2_same/k2_same/kernel:0"

    def set_config(value):
        def change(handle):
            handle.attrs["model_config"] = value
        return change

    def set_attr(path, name, value):
        def change(handle):
            handle[path].attrs[name] = value
        return change

    def replace_kernel(**kwargs):
        def change(handle):
            del handle[kernel]
            handle.create_dataset(kernel, **kwargs)
        return change

    def fifo_kernel(folder):
        os.mkfifo(os.path.join(folder, "pipe.raw"))

    def zero_link(folder):
        os.symlink("/dev/zero", os.path.join(folder, "zero.raw"))

    edits = [
        ("cfg_text", set_config("not json"), "model_config not JSON", None),
        ("cfg_deep", set_config("[" * 100_000 + "]" * 100_000), "model_config nested 100000 deep", None),
        ("cfg_surrogate", set_config(json.dumps(config).replace("k2_same", "k2\\ud800same")),
         "a layer name with a lone surrogate", None),
        ("cfg_stride0", set_config(json.dumps(config).replace('"strides": [2, 2, 2]', '"strides": [0, 2, 2]')),
         "strides 0 in the config", None),
        ("names_missing", set_attr("model_weights/k2_same", "weight_names", np.array([b"nothing"])),
         "weight_names naming no dataset", None),
        ("k_shape", replace_kernel(data=np.ones((3, 3, 3, 2), np.float32)), "kernel 4-D", None),
        ("k_huge", replace_kernel(shape=(3, 3, 3, 2, 2 ** 40), dtype="f4", chunks=(1, 1, 1, 1, 1024)),
         "kernel (3,3,3,2,2**40), never written", None),
        ("k_external_fifo", replace_kernel(shape=(3, 3, 3, 2, 2), dtype="f4", external=[("pipe.raw", 0, 432)]),
         "kernel stored in an external raw file that is a FIFO", fifo_kernel),
        ("k_external_dev", replace_kernel(shape=(3, 3, 3, 2, 2), dtype="f4", external=[("zero.raw", 0, 432)]),
         "kernel stored in an external raw file linked to /dev/zero", zero_link),
        ("k_external_abs", replace_kernel(shape=(3, 3, 3, 2, 2), dtype="f4", external=[("/etc/hostname", 0, 432)]),
         "kernel stored in /etc/hostname (external storage)", None),
    ]
    extras = {}
    for name, change, how, extra in edits:
        files.append((f"{name}.h5", _h5_copy(model, change), f"keras_k2.h5: {how}"))
        if extra is not None:
            extras[f"{name}.h5"] = extra
    cases = []
    for number, (file, blob, how) in enumerate(files):
        cases += _cases(new_case, [(file, blob, how)], layer="k2_same" if not file.startswith("kw") else None,
                        volume="x2.npy", run_every=1 if file in extras or file.startswith("k_") else 2,
                        tag="kh5-", extra=extras.get(file), first=number)
    for case in cases:    # the FIFO case must give up at once
        if "FIFO" in case.label:
            case.timeout, case.retry = 8.0, False
    assert_promise(cases)


# --------------------------------------------------------------------------- --weight-layout

def test_weight_layouts(new_case):
    """--weight-layout against plain arrays of every rank and files that state their layout (refused: 2)."""
    rng = np.random.default_rng(9)
    files = {
        "w6.npy": npy_bytes(rng.standard_normal((2, 1, 1, 2, 2, 2)).astype(np.float32)),
        "wk.npy": npy_bytes(rng.standard_normal((2, 2, 2, 3, 2)).astype(np.float32)),
        "w4.npy": npy_bytes(rng.standard_normal((2, 2, 2, 3)).astype(np.float32)),
        "torch_state_dict.pt": weights_fixture("torch_state_dict.pt"),
        "onnx_pads_bias.onnx": weights_fixture("onnx_pads_bias.onnx"),
        "st_weights.safetensors": weights_fixture("st_weights.safetensors"),
        "keras_k2.h5": weights_fixture("keras_k2.h5"),
    }
    cases = []
    for number, (spec, layout, codes) in enumerate([
        ("wk.npy", "keras", {0}), ("w6.npy", "megengine", {0}), ("w6.npy", "keras", {1}),
("torch_state_dict.pt:2", "flax", {2}), ("onnx_pads_bias.onnx", "megengine", {2}),
        ("st_weights.safetensors:up", "keras", {0, 1}), ("keras_k2.h5:k2_same", "torch", {2}),
        ("keras_k2.h5:k2_same", "keras", {0}), ("wk.npy", "caffe", {2}),
    ]):
        folder = _put_volumes(new_case(f"layout-{number}"))
        for name, data in files.items():
            write(folder, name, data)
        command = ["run", "x2.npy", "out.nii", "--weights", spec, "--weight-layout", layout, "-q", "--json"] \
            if number % 4 == 0 else ["shape", "x2.npy", "--weights", spec, "--weight-layout", layout, "--json"]
        cases.append(Case(f"{command[0]} --weights {spec} --weight-layout {layout}", command, folder,
                          output="out.nii" if command[0] == "run" else None, expect=codes))
    assert_promise(cases)
