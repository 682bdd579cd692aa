"""PyTorch checkpoints: state dicts read without PyTorch and without running code from the file.

Three groups:

* committed fixtures (``tests/fixtures/weights/torch_*``, written by
  ``make_torch_fixtures.py``) against the values PyTorch holds, stored beside
  them in ``*_expected.npz``: always run;
* hostile and damaged files built here byte by byte (pickles assembled opcode
  by opcode, zips with ``zipfile``): always run;
* files written by ``torch.save`` in the test, compared bitwise with the
  tensors, and layers run through the engine against ``conv_transpose3d``:
  only with PyTorch installed.
"""

import os
import pathlib
import pickle
import struct
import sys
import zipfile

import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import FileFormatError, KeyNotFoundError
from convt3d_cli.io.pytorch import FORMAT

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "weights")


def fixture(name):
    return os.path.join(FIXTURES, name)


def read_all(path):
    """Name -> array for every tensor the format lists."""
    return {entry.name: FORMAT.load_tensor(path, entry) for entry in FORMAT.tensors(path)}


def assert_same(actual, expected):
    """Same dtype, shape and bytes (bitwise, so -0.0 and NaN payloads count)."""
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


# --------------------------------------------------------------------------- a pickle assembler
# Protocol-2 opcodes written by hand: exactly what a hostile file can hold, and no PyTorch needed.

def op_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def op_str(text):
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def op_int(value):
    if -2 ** 31 <= value < 2 ** 31:
        return b"J" + struct.pack("<i", value)
    data = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(data)]) + data


def op_tuple(*items):
    return b"(" + b"".join(items) + b"t"


def op_call(function, *args):
    return function + op_tuple(*args) + b"R"


def op_dict(*pairs):
    if not pairs:
        return b"}"
    return b"}(" + b"".join(k + v for k, v in pairs) + b"u"


def op_list(*items):
    return b"]" + (b"(" + b"".join(items) + b"e" if items else b"")


NONE, FALSE = b"N", b"\x89"


def pickled(body):
    return b"\x80\x02" + body + b"."


def op_storage(key, numel, storage="FloatStorage"):
    return op_tuple(op_str("storage"), op_global("torch", storage), op_str(key), op_str("cpu"),
                    op_int(numel)) + b"Q"


def op_tensor(key, numel, size, stride=None, offset=0, storage="FloatStorage"):
    if stride is None:
        stride = [int(np.prod(size[i + 1:])) for i in range(len(size))]
    return op_call(op_global("torch._utils", "_rebuild_tensor_v2"), op_storage(key, numel, storage),
                   op_int(offset), op_tuple(*map(op_int, size)), op_tuple(*map(op_int, stride)),
                   FALSE, op_call(op_global("collections", "OrderedDict")))


def write_checkpoint(path, data_pkl, storages=None, prefix="archive", byteorder=b"little", extra=None):
    """A zip laid out like torch.save's: <prefix>/data.pkl, <prefix>/data/<key>, byteorder, version."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            archive.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in (storages or {}).items():
            archive.writestr(f"{prefix}/data/{key}", data)
        archive.writestr(f"{prefix}/version", b"3\n")
        for name, data in (extra or {}).items():
            archive.writestr(name, data)
    return str(path)


W = np.arange(2 * 3 * 2 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2, 2) / 7
B = np.array([0.5, -1.5, 2.25], np.float32)


def good_body(extra_pairs=()):
    """{"up.weight": W, "up.bias": B, ...} as torch.save pickles a state dict."""
    return op_dict((op_str("up.weight"), op_tensor("0", W.size, W.shape)),
                   (op_str("up.bias"), op_tensor("1", B.size, B.shape)), *extra_pairs)


def good_storages():
    return {"0": W.tobytes(), "1": B.tobytes()}


def good_checkpoint(path, extra_pairs=()):
    return write_checkpoint(path, pickled(good_body(extra_pairs)), good_storages())


# --------------------------------------------------------------------------- committed fixtures

READABLE = ["torch_state_dict.pt", "torch_dataparallel.pth", "torch_lightning.ckpt", "torch_mixed.pt",
            "torch_whole_module.pt", "torch_bigendian.pt"]


@pytest.mark.parametrize("name", READABLE)
def test_fixture_values_match_what_pytorch_saved(name):
    path = fixture(name)
    expected = np.load(fixture(name.rsplit(".", 1)[0] + "_expected.npz"))
    got = read_all(path)
    assert list(got) == list(expected.files)       # names and order of the state dict
    for key in expected.files:
        assert_same(got[key], expected[key])


def test_fixture_layers_pair_weight_and_bias():
    layers = {layer.name: layer for layer in FORMAT.layers(fixture("torch_state_dict.pt"))}
    assert set(layers) == {"0", "2"}               # Conv3d and ConvTranspose3d: both 5-D
    assert layers["2"].weight.name == "2.weight" and layers["2"].weight.shape == (2, 3, 2, 2, 2)
    assert layers["2"].bias.name == "2.bias" and layers["2"].bias.shape == (3,)
    assert layers["2"].layout == "torch"


def test_lightning_checkpoint_reads_the_state_dict_not_the_optimizer():
    path = fixture("torch_lightning.ckpt")
    names = [entry.name for entry in FORMAT.tensors(path)]
    assert names == ["model.0.weight", "model.0.bias", "model.2.weight", "model.2.bias"]
    report = io.describe(path)
    assert report["state_dict"] == "checkpoint['state_dict']"
    # Hyper-parameters of other classes are kept as inert placeholders, and listed.
    assert "argparse.Namespace" in report["objects_not_loaded"]
    assert "pathlib.PurePosixPath" in report["objects_not_loaded"]
    weights = io.read_weights(f"{path}:model.2")
    expected = np.load(fixture("torch_lightning_expected.npz"))
    assert_same(weights.weight, expected["model.2.weight"])
    assert_same(weights.bias, expected["model.2.bias"])
    assert weights.source == f"{path}:model.2.weight"


def test_dataparallel_prefix_may_be_left_out():
    path = fixture("torch_dataparallel.pth")
    expected = np.load(fixture("torch_dataparallel_expected.npz"))
    for spec in (f"{path}:module.2", f"{path}:2", f"{path}:module.2.weight"):
        weights = io.read_weights(spec)
        assert_same(weights.weight, expected["module.2.weight"])
        assert_same(weights.bias, expected["module.2.bias"])


def test_two_candidate_layers_need_a_key():
    with pytest.raises(FileFormatError, match="choose one with"):
        io.read_weights(fixture("torch_state_dict.pt"))
    with pytest.raises(KeyNotFoundError, match="no layer or tensor 'decoder'"):
        io.read_weights(fixture("torch_state_dict.pt") + ":decoder")


def test_whole_pickled_module_is_read_as_its_state_dict_without_its_classes():
    report = io.describe(fixture("torch_whole_module.pt"))
    assert "read as its state_dict()" in report["state_dict"]
    assert "torch.nn.modules.conv.ConvTranspose3d" in report["objects_not_loaded"]


def test_mixed_fixture_dtypes_and_bfloat16_note():
    entries = {entry.name: entry for entry in FORMAT.tensors(fixture("torch_mixed.pt"))}
    assert entries["bf16"].dtype == np.float32
    assert entries["bf16"].attrs["stored_dtype"] == "bfloat16"
    assert "float32" in entries["bf16"].attrs["converted"]
    assert entries["f32_transposed"].attrs["stride"] == (1, 4)
    assert entries["slice"].attrs["offset"] == 3
    assert entries["expanded"].attrs["stride"] == (0, 1)
    assert entries["scalar"].shape == () and entries["empty"].shape == (0, 4)
    assert entries["i64"].dtype == np.dtype("<i8") and entries["bool"].dtype == np.bool_


def test_bigendian_fixture_says_big_and_reads_native():
    entries = FORMAT.tensors(fixture("torch_bigendian.pt"))
    assert entries[0].dtype == np.dtype(">f4") and entries[1].dtype == np.dtype(">i2")
    values = FORMAT.load_tensor(fixture("torch_bigendian.pt"), entries[1])
    assert values.dtype.isnative and values.tolist() == [-2, 513]


def test_legacy_fixture_is_refused_with_how_to_convert():
    with pytest.raises(FileFormatError, match="legacy format") as err:
        FORMAT.tensors(fixture("torch_legacy.pt"))
    assert "torch.save(torch.load(" in str(err.value)


def test_torchscript_fixture_is_refused_with_how_to_convert():
    with pytest.raises(FileFormatError, match="TorchScript") as err:
        io.read_weights(fixture("torch_script.pt"))
    assert "torch.jit.load(" in str(err.value) and ".state_dict()" in str(err.value)


def test_a_checkpoint_is_not_a_volume():
    with pytest.raises(FileFormatError, match="holds trained weights.*not a volume"):
        io.probe_volume(fixture("torch_state_dict.pt"))


# --------------------------------------------------------------------------- hand-made files

def test_hand_made_state_dict_reads(tmp_path):
    path = good_checkpoint(tmp_path / "m.pt")
    got = read_all(path)
    assert_same(got["up.weight"], W)
    assert_same(got["up.bias"], B)
    weights = io.read_weights(path)
    assert_same(weights.weight, W)
    assert_same(weights.bias, B)


def test_any_archive_folder_name_and_missing_byteorder(tmp_path):
    path = write_checkpoint(tmp_path / "m.pt", pickled(good_body()), good_storages(), prefix="m",
                            byteorder=None)
    assert_same(read_all(path)["up.weight"], W)


@pytest.mark.parametrize("key, where", [
    ("state_dict", "checkpoint['state_dict']"),
    ("model_state_dict", "checkpoint['model_state_dict']"),
    ("model", "checkpoint['model']"),
    ("ema", "checkpoint['ema']"),
])
def test_state_dict_under_a_well_known_key_beats_other_tensors(tmp_path, key, where):
    optimizer = op_dict((op_str("state"), op_dict((op_int(0), op_dict(
        (op_str("exp_avg"), op_tensor("2", 3, [3])), (op_str("step"), op_tensor("3", 1, [])))))))
    body = op_dict((op_str("epoch"), op_int(4)),
                   (op_str("best_score"), op_tensor("3", 1, [])),      # a tensor at the top level
                   (op_str("optimizer"), optimizer),
                   (op_str(key), good_body()))
    storages = {**good_storages(), "2": np.ones(3, np.float32).tobytes(), "3": b"\0\0\0\0"}
    path = write_checkpoint(tmp_path / "c.ckpt", pickled(body), storages)
    assert [e.name for e in FORMAT.tensors(path)] == ["up.weight", "up.bias"]
    assert io.describe(path)["state_dict"] == where


def test_nested_checkpoint_and_dotted_path_fallback(tmp_path):
    nested = op_dict((op_str("checkpoint"), op_dict((op_str("model"), op_dict((op_str("net"), good_body()))))))
    path = write_checkpoint(tmp_path / "n.pt", pickled(nested), good_storages())
    # "checkpoint" is not a well-known key: every tensor, named by its path.
    assert [e.name for e in FORMAT.tensors(path)] == ["checkpoint.model.net.up.weight",
                                                      "checkpoint.model.net.up.bias"]
    as_list = op_list(op_tensor("0", W.size, W.shape), op_tensor("1", B.size, B.shape))
    path = write_checkpoint(tmp_path / "l.pt", pickled(as_list), good_storages())
    assert [e.name for e in FORMAT.tensors(path)] == ["0", "1"]


def test_shared_and_cyclic_structures_are_walked_once(tmp_path):
    # 64 levels of [x, x] (2**64 paths) and a list that holds itself: the walk must end.
    body = op_tensor("1", B.size, B.shape) + b"q\x00"          # memo 0: the tensor
    for level in range(1, 65):
        body = b"(" + body + b"h" + bytes([level - 1]) + b"lq" + bytes([level])
    cyclic = b"]q\x41h\x41a"                                   # l = []; l.append(l)
    path = write_checkpoint(tmp_path / "dag.pt", pickled(op_list(body, cyclic)), good_storages())
    # Each list is walked once; the shared tensor keeps the names it has in the deepest list.
    assert [e.name for e in FORMAT.tensors(path)] == ["0" + ".0" * 64, "0" + ".0" * 63 + ".1"]


def test_unsupported_tensors_are_listed_not_read(tmp_path):
    complex_tensor = op_tensor("2", 2, [2], storage="ComplexFloatStorage")
    quantized = op_call(op_global("torch._utils", "_rebuild_qtensor"), op_int(0))
    path = good_checkpoint(tmp_path / "q.pt", [(op_str("c"), complex_tensor), (op_str("q"), quantized)])
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("archive/data/2", b"\0" * 16)
    assert [e.name for e in FORMAT.tensors(path)] == ["up.weight", "up.bias"]
    report = io.describe(path)
    assert report["unsupported_tensors"] == {"c": "element type complex64", "q": "a quantized tensor"}
    only = write_checkpoint(tmp_path / "only.pt", pickled(op_dict((op_str("q"), quantized))))
    with pytest.raises(FileFormatError, match="no tensor convt3d can read: q \\(a quantized tensor\\)"):
        FORMAT.tensors(only)


def test_int_and_bool_storages_and_rebuild_v3(tmp_path):
    ints = np.array([[-5, 7, 9]], np.int64)
    flags = np.array([1, 0, 2], np.uint8)          # a stored 2 is still True
    v3 = op_call(op_global("torch._utils", "_rebuild_tensor_v3"),
                 op_storage("2", 6, "UntypedStorage"), op_int(0), op_tuple(op_int(3)), op_tuple(op_int(1)),
                 FALSE, op_call(op_global("collections", "OrderedDict")), op_global("torch", "uint16"))
    body = op_dict((op_str("i"), op_tensor("0", 3, [1, 3], storage="LongStorage")),
                   (op_str("b"), op_tensor("1", 3, [3], storage="BoolStorage")),
                   (op_str("u16"), v3))
    storages = {"0": ints.tobytes(), "1": flags.tobytes(),
                "2": np.array([1, 65535, 300], "<u2").tobytes()}
    got = read_all(write_checkpoint(tmp_path / "ints.pt", pickled(body), storages))
    assert_same(got["i"], ints)
    assert_same(got["b"], np.array([True, False, True]))
    assert_same(got["u16"], np.array([1, 65535, 300], np.uint16))


def test_negation_bit_is_applied(tmp_path):
    values = np.array([1.0, -2.0], np.float32)
    negated = op_call(op_global("torch._utils", "_rebuild_tensor_v2"), op_storage("0", 2), op_int(0),
                      op_tuple(op_int(2)), op_tuple(op_int(1)), FALSE,
                      op_call(op_global("collections", "OrderedDict")),
                      op_dict((op_str("neg"), b"\x88")))
    path = write_checkpoint(tmp_path / "neg.pt", pickled(op_dict((op_str("n"), negated))),
                            {"0": values.tobytes()})
    assert_same(read_all(path)["n"], -values)


# --------------------------------------------------------------------------- code in the file is never run

def exec_payload(marker):
    return f"open({str(marker)!r}, 'w').close()"


PAYLOADS = {
    "posix.system": lambda m: op_call(op_global("posix", "system"), op_str(f"touch '{m}'")),
    "os.system": lambda m: op_call(op_global("os", "system"), op_str(f"touch '{m}'")),
    "builtins.exec": lambda m: op_call(op_global("builtins", "exec"), op_str(exec_payload(m))),
    "builtins.eval": lambda m: op_call(op_global("__builtin__", "eval"), op_str(exec_payload(m))),
    "subprocess.call": lambda m: op_call(op_global("subprocess", "call"),
                                         op_list(op_str("touch"), op_str(str(m)))),
    "builtins.getattr": lambda m: op_call(op_call(op_global("builtins", "getattr"),
                                                  op_global("pathlib", "Path"), op_str("touch"))),
    "builtins.__import__": lambda m: op_call(op_global("builtins", "__import__"), op_str("os")),
    "runpy.run_path": lambda m: op_call(op_global("runpy", "run_path"), op_str(str(m))),
    "operator.methodcaller": lambda m: op_call(op_global("operator", "methodcaller"), op_str("x")),
}


@pytest.mark.parametrize("forbidden", sorted(PAYLOADS))
def test_a_global_that_runs_code_is_refused_and_not_run(tmp_path, forbidden):
    marker = tmp_path / "pwned"
    attack = PAYLOADS[forbidden](marker)
    path = good_checkpoint(tmp_path / "model.pt", [(op_str("x"), attack)])
    with pytest.raises(FileFormatError) as err:
        FORMAT.tensors(path)
    assert f"refusing to load {forbidden} from {path}" in str(err.value)
    assert "only tensors, containers and numbers are read" in str(err.value)
    assert not marker.exists()


def test_the_exec_payload_is_live_for_a_plain_unpickler(tmp_path):
    # Control for the test above: the same bytes do run code through pickle.loads.
    marker = tmp_path / "pwned"
    pickle.loads(pickled(PAYLOADS["builtins.exec"](marker)))
    assert marker.exists()


def test_stack_global_and_inst_opcodes_go_through_the_same_check(tmp_path):
    marker = tmp_path / "pwned"
    cmd = op_str(exec_payload(marker))

    def short(text):                                  # SHORT_BINUNICODE
        return b"\x8c" + bytes([len(text)]) + text.encode()

    stack_global = b"\x80\x04" + short("builtins") + short("exec") + b"\x93" + b"(" + cmd + b"tR."
    inst = b"\x80\x02(" + cmd + b"ibuiltins\nexec\n."
    for number, data in enumerate((stack_global, inst)):
        path = write_checkpoint(tmp_path / f"m{number}.pt", data)
        with pytest.raises(FileFormatError, match="refusing to load builtins.exec"):
            FORMAT.tensors(path)
    assert not marker.exists()


def test_other_globals_become_placeholders_that_are_never_imported_or_called(tmp_path):
    # logging.FileHandler(path) creates the file when called; "this" prints when imported.
    marker = tmp_path / "created-by-filehandler"
    handler = op_call(op_global("logging", "FileHandler"), op_str(str(marker)))
    zen = op_call(op_global("this", "s"), op_str("x"))
    pickle.loads(pickled(handler)).close()       # control: a plain unpickler does create it
    assert marker.exists()
    marker.unlink()
    had_this = "this" in sys.modules
    path = good_checkpoint(tmp_path / "m.pt", [(op_str("h"), handler), (op_str("z"), zen)])
    assert_same(read_all(path)["up.weight"], W)
    assert not marker.exists()
    assert ("this" in sys.modules) == had_this
    assert {"logging.FileHandler", "this.s"} <= set(io.describe(path)["objects_not_loaded"])


def test_build_cannot_patch_the_reader(tmp_path):
    # BUILD with slot state sets attributes on whatever is on the stack: here the class the
    # reader gives for OrderedDict, its tensor rebuild function and a placeholder class.
    from convt3d_cli.io import pytorch

    targets = (op_global("collections", "OrderedDict"), op_global("torch._utils", "_rebuild_tensor_v2"),
               op_global("argparse", "Namespace"))
    for target in targets:
        patch = target + op_tuple(NONE, op_dict((op_str("__setstate__"), op_int(1)),
                                                (op_str("fn"), op_int(2)))) + b"b"
        path = good_checkpoint(tmp_path / "patch.pt", [(op_str("p"), patch)])
        with pytest.raises(FileFormatError):
            FORMAT.tensors(path)
    assert "fn" not in vars(pytorch._Dict) and callable(pytorch._ALLOWED["torch._utils._rebuild_tensor_v2"].fn)
    # Whatever path BUILD takes, everything the file can reach refuses new attributes.
    placeholder = pytorch._Unpickler(b"", "x")._placeholder("argparse.Namespace")
    for thing in (pytorch._Dict, placeholder, placeholder(), pytorch._ALLOWED["torch.Size"],
                  pytorch._ALLOWED["torch._utils._rebuild_tensor_v2"]):
        with pytest.raises(AttributeError):
            thing.__setstate__ = print
    assert_same(read_all(good_checkpoint(tmp_path / "after.pt"))["up.weight"], W)


def test_bytearray_of_a_huge_size_is_not_allocated(tmp_path):
    big = op_call(op_global("builtins", "bytearray"), op_int(2 ** 45))
    path = good_checkpoint(tmp_path / "big.pt", [(op_str("b"), big)])
    with pytest.raises(FileFormatError, match="bytearray built from something other than bytes"):
        FORMAT.tensors(path)


@pytest.mark.parametrize("data, phrase", [
    (b"\x80\x04\x8e" + struct.pack("<Q", 2 ** 60) + b"abc.", "data.pkl is damaged"),       # BINBYTES8
    (b"\x80\x02]r\xf0\xff\xff\xff.", "memo index 4294967280 is larger than the pickle"),    # LONG_BINPUT
    (b"\x80\x02}q\x00(garbage", "data.pkl is damaged"),
    (b"not a pickle at all", "data.pkl is damaged"),
    (b"\x80\x02]h\x07.", "data.pkl cannot be unpickled"),                                     # memo miss
])
def test_a_malformed_pickle_is_one_clear_error(tmp_path, data, phrase):
    path = write_checkpoint(tmp_path / "bad.pt", data)
    with pytest.raises(FileFormatError, match=phrase):
        FORMAT.tensors(path)


# --------------------------------------------------------------------------- tensors vs storages

def tensor_file(tmp_path, tensor, storages):
    return write_checkpoint(tmp_path / "t.pt", pickled(op_dict((op_str("w"), tensor))), storages)


@pytest.mark.parametrize("tensor, storages, phrase", [
    (op_tensor("0", 100, [100]), {"0": b"\0" * 16},
     "storage data/0 should hold 100 float32 values .* but holds 16 bytes"),
    (op_tensor("0", 4, [4]), {}, "refers to storage data/0, which the archive does not hold"),
    (op_tensor("0", 4, [3], offset=2), {"0": b"\0" * 16}, "reaches element 5 of a storage that holds 4"),
    (op_tensor("0", 4, [2, 2], stride=[3, 1]), {"0": b"\0" * 16}, "reaches element 5 of a storage"),
    (op_tensor("0", 4, [4], offset=-1), {"0": b"\0" * 16}, "must be an integer >= 0"),
    (op_tensor("0", 4, [-4]), {"0": b"\0" * 16}, "must be an integer >= 0"),
    (op_tensor("0", 4, [4], stride=[-1]), {"0": b"\0" * 16}, "must be an integer >= 0"),
    (op_tensor("0", 4, [1] * 40), {"0": b"\0" * 16}, "40 dimensions; at most 32"),
    (op_tensor("0", 4, [2, 2], stride=[1]), {"0": b"\0" * 16}, "size \\(2, 2\\) but stride \\(1,\\)"),
])
def test_a_tensor_that_does_not_fit_its_storage_is_refused_before_reading(tmp_path, tensor, storages, phrase):
    path = tensor_file(tmp_path, tensor, storages)
    with pytest.raises(FileFormatError, match=phrase):
        FORMAT.tensors(path)


def test_a_storage_larger_than_the_file_is_refused(tmp_path):
    # The zip directory claims 10**9 bytes for data/0 and the pickle agrees: the file has far fewer.
    path = tensor_file(tmp_path, op_tensor("0", 250_000_000, [4]), {"0": b"\0" * 16})
    data = bytearray(pathlib.Path(path).read_bytes())
    name = b"archive/data/0"
    start = data.index(b"PK\x01\x02")                    # central directory entries
    while data[start + 46:start + 46 + len(name)] != name:
        start = data.index(b"PK\x01\x02", start + 4)
    data[start + 20:start + 28] = struct.pack("<II", 10 ** 9, 10 ** 9)   # compressed, uncompressed size
    pathlib.Path(path).write_bytes(bytes(data))
    with pytest.raises(FileFormatError, match="extends past the end of the file"):
        FORMAT.tensors(path)


def test_a_storage_declared_twice_with_different_sizes_is_refused(tmp_path):
    body = op_dict((op_str("a"), op_tensor("0", 4, [4])), (op_str("b"), op_tensor("0", 2, [2])))
    path = write_checkpoint(tmp_path / "twice.pt", pickled(body), {"0": b"\0" * 16})
    with pytest.raises(FileFormatError, match="declared twice"):
        FORMAT.tensors(path)


def test_strided_reads_match_numpy(tmp_path):
    base = np.arange(60, dtype=np.float64)
    body = op_dict((op_str("t"), op_tensor("0", 60, [3, 4], stride=[1, 5], offset=7, storage="DoubleStorage")),
                   (op_str("z"), op_tensor("0", 60, [2, 3], stride=[0, 2], offset=1, storage="DoubleStorage")))
    got = read_all(write_checkpoint(tmp_path / "s.pt", pickled(body), {"0": base.tobytes()}))
    assert_same(got["t"], np.lib.stride_tricks.as_strided(base[7:], (3, 4), (8, 40)).copy())
    assert_same(got["z"], np.lib.stride_tricks.as_strided(base[1:], (2, 3), (0, 16)).copy())


# --------------------------------------------------------------------------- not a checkpoint

def test_truncated_zip(tmp_path):
    data = pathlib.Path(good_checkpoint(tmp_path / "whole.pt")).read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(FileFormatError, match="truncated or damaged zip archive"):
        FORMAT.tensors(str(cut))


def test_hand_made_legacy_file(tmp_path):
    legacy = tmp_path / "old.pth"
    legacy.write_bytes(b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little") + b".")
    with pytest.raises(FileFormatError, match="legacy format .* torch.save\\(torch.load\\("):
        FORMAT.tensors(str(legacy))


def test_hand_made_torchscript_archive(tmp_path):
    path = write_checkpoint(tmp_path / "ts.pt", pickled(NONE),
                            extra={"archive/constants.pkl": pickled(op_tuple()),
                                   "archive/code/__torch__/m.py": b"def forward(self): ..."})
    with pytest.raises(FileFormatError, match="TorchScript archive"):
        FORMAT.tensors(path)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "other.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data/0", b"\0" * 4)
    with pytest.raises(FileFormatError, match="zip archive without data.pkl"):
        FORMAT.tensors(str(path))


def test_several_archives_in_one_zip(tmp_path):
    path = good_checkpoint(tmp_path / "two.pt")
    with zipfile.ZipFile(path, "a") as archive:
        archive.writestr("other/data.pkl", pickled(NONE))
    with pytest.raises(FileFormatError, match="holds several checkpoints"):
        FORMAT.tensors(path)


def test_bad_byteorder_record(tmp_path):
    path = write_checkpoint(tmp_path / "b.pt", pickled(good_body()), good_storages(), byteorder=b"middle")
    with pytest.raises(FileFormatError, match="byteorder record says b'middle'"):
        FORMAT.tensors(path)


@pytest.mark.parametrize("content, phrase", [
    (b"just some text, not a checkpoint", "is not a PyTorch checkpoint"),
    (struct.pack("<Q", 2) + b"{}", "looks like a safetensors file"),
    (b"", "is not a PyTorch checkpoint"),
])
def test_not_a_checkpoint(tmp_path, content, phrase):
    path = tmp_path / "x.pt"
    path.write_bytes(content)
    with pytest.raises(FileFormatError, match=phrase):
        FORMAT.tensors(str(path))


def test_a_folder_is_not_a_checkpoint(tmp_path):
    (tmp_path / "d.pt").mkdir()
    with pytest.raises(FileFormatError, match="is a folder"):
        FORMAT.tensors(str(tmp_path / "d.pt"))


def test_a_changed_file_is_read_again(tmp_path):
    path = good_checkpoint(tmp_path / "m.pt")
    assert len(FORMAT.tensors(path)) == 2
    write_checkpoint(path, pickled(op_dict((op_str("only"), op_tensor("1", 3, [3])))), good_storages())
    os.utime(path, ns=(1, 1))       # a different mtime even on coarse file systems
    assert [e.name for e in FORMAT.tensors(path)] == ["only"]


# --------------------------------------------------------------------------- against PyTorch itself

@pytest.fixture
def torch():
    return pytest.importorskip("torch")


def as_expected(torch, tensor):
    tensor = tensor.detach()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.contiguous().numpy()


def test_hand_made_checkpoint_is_what_torch_loads(tmp_path, torch):
    # The assembler above writes what torch.load(weights_only=True) reads the same way.
    path = good_checkpoint(tmp_path / "m.pt")
    loaded = torch.load(path, weights_only=True)
    assert_same(loaded["up.weight"].numpy(), W)
    assert_same(loaded["up.bias"].numpy(), B)


def make_model(torch, groups=1):
    """encoder / decoder.1 (the ConvTranspose3d) / norm, from torch.nn classes only (picklable whole)."""
    torch.manual_seed(3)
    return torch.nn.ModuleDict({
        "encoder": torch.nn.Conv3d(2, 4, 3, padding=1),
        "decoder": torch.nn.Sequential(
            torch.nn.ReLU(),
            torch.nn.ConvTranspose3d(4, 6, (3, 2, 2), stride=(2, 1, 2), padding=(1, 0, 1),
                                     output_padding=(1, 0, 0), dilation=(1, 2, 1), groups=groups)),
        "norm": torch.nn.BatchNorm3d(6),
    })


@pytest.mark.parametrize("groups", [1, 2])
def test_state_dict_saved_by_torch_reads_bitwise(tmp_path, torch, groups):
    net = make_model(torch, groups)
    path = str(tmp_path / "net.pt")
    torch.save(net.state_dict(), path)
    got = read_all(path)
    assert list(got) == list(net.state_dict())
    for name, tensor in net.state_dict().items():
        assert_same(got[name], as_expected(torch, tensor))
    layer = {l.name: l for l in FORMAT.layers(path)}["decoder.1"]
    assert layer.weight.shape == (4, 6 // groups, 3, 2, 2) and layer.bias.name == "decoder.1.bias"


def test_lightning_style_checkpoint_with_a_real_adam_step(tmp_path, torch):
    net = make_model(torch)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    out = net.decoder(net.encoder(torch.randn(1, 2, 3, 3, 3)))
    out.square().mean().backward()
    optimizer.step()
    state = {"model." + k: v for k, v in net.state_dict().items()}
    path = str(tmp_path / "last.ckpt")
    torch.save({"epoch": 1, "global_step": 1, "state_dict": state,
                "optimizer_states": [optimizer.state_dict()], "lr_schedulers": [],
                "hyper_parameters": {"lr": 1e-2, "groups": 1}}, path)
    got = read_all(path)
    assert list(got) == list(state)              # exp_avg / exp_avg_sq / step are not layers
    for name, tensor in state.items():
        assert_same(got[name], as_expected(torch, tensor))
    weights = io.read_weights(f"{path}:model.decoder.1")
    assert_same(weights.weight, as_expected(torch, state["model.decoder.1.weight"]))


def test_dataparallel_prefixed_state_dict(tmp_path, torch):
    net = make_model(torch)
    path = str(tmp_path / "dp.pth")
    torch.save({"module." + k: v for k, v in net.state_dict().items()}, path)
    weights = io.read_weights(f"{path}:decoder.1")
    assert_same(weights.weight, as_expected(torch, net.decoder[1].weight))
    assert weights.source.endswith(":module.decoder.1.weight")


def test_dtypes_views_and_parameters_saved_by_torch(tmp_path, torch):
    base = torch.randn(6, 5, dtype=torch.float64)
    saved = {
        "transposed": torch.randn(3, 4, 5).permute(2, 0, 1),
        "bf16": torch.randn(4, 3).bfloat16(),
        "bf16_view": torch.randn(4, 6).bfloat16()[:, 1::2],
        "f64": base,
        "f64_column": base[:, 2],
        "half": torch.randn(5).half(),
        "int16": torch.tensor([-7, 8], dtype=torch.int16),
        "uint8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([[True], [False]]),
        "param": torch.nn.Parameter(torch.randn(2, 2)),
        "buffer": torch.nn.Buffer(torch.ones(3)) if hasattr(torch.nn, "Buffer") else torch.ones(3),
        "neg_view": torch.randn(3)._neg_view(),
    }
    path = str(tmp_path / "mixed.pt")
    torch.save(saved, path)
    got = read_all(path)
    assert list(got) == list(saved)
    for name, tensor in saved.items():
        assert_same(got[name], as_expected(torch, tensor.resolve_neg()))


def test_whole_module_pickle_matches_its_state_dict(tmp_path, torch):
    net = make_model(torch)
    path = str(tmp_path / "whole.pt")
    torch.save(net, path)
    got = read_all(path)
    assert list(got) == list(net.state_dict())
    for name, tensor in net.state_dict().items():
        assert_same(got[name], as_expected(torch, tensor))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit.script/save are deprecated
def test_torchscript_and_legacy_saved_by_torch_are_refused(tmp_path, torch):
    scripted = str(tmp_path / "ts.pt")
    torch.jit.save(torch.jit.script(torch.nn.ConvTranspose3d(1, 1, 2)), scripted)
    with pytest.raises(FileFormatError, match="TorchScript"):
        FORMAT.tensors(scripted)
    legacy = str(tmp_path / "legacy.pt")
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False, pickle_protocol=4)
    with pytest.raises(FileFormatError, match="legacy format"):
        FORMAT.tensors(legacy)


def test_pickle_protocol_4_checkpoint(tmp_path, torch):
    net = make_model(torch)
    path = str(tmp_path / "p4.pt")
    torch.save(net.state_dict(), path, pickle_protocol=4)
    got = read_all(path)
    for name, tensor in net.state_dict().items():
        assert_same(got[name], as_expected(torch, tensor))


@pytest.mark.parametrize("groups, dtype", [(1, "float32"), (2, "float32"), (1, "bfloat16"), (1, "float64")])
def test_weights_read_run_like_torch_conv_transpose3d(tmp_path, torch, groups, dtype):
    from convt3d_cli.engine import conv_transpose3d

    net = make_model(torch, groups)
    up = net.decoder[1].to(getattr(torch, dtype))
    path = str(tmp_path / "net.pt")
    torch.save(net.state_dict(), path)
    weights = io.read_weights(f"{path}:decoder.1")
    x = torch.randn(2, 4, 3, 4, 5, dtype=torch.float64 if dtype == "float64" else torch.float32)
    reference_weight = up.weight.detach().to(x.dtype)
    reference_bias = up.bias.detach().to(x.dtype)
    expected = torch.nn.functional.conv_transpose3d(
        x, reference_weight, reference_bias, stride=up.stride, padding=up.padding,
        output_padding=up.output_padding, groups=up.groups, dilation=up.dilation).numpy()
    got = conv_transpose3d(x.numpy(), weights.weight, weights.bias, stride=up.stride, padding=up.padding,
                           output_padding=up.output_padding, dilation=up.dilation, groups=up.groups)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-5)
