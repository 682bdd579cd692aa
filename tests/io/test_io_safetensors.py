"""safetensors files: our reader of the documented format, against the fixture, hostile headers and the library.

The committed fixture (``tests/fixtures/weights/st_weights.safetensors``, written by
``make_torch_fixtures.py`` with ``safetensors.torch.save_file``) is checked against
``st_weights_expected.npz`` without any optional package. With the ``safetensors``
package installed, the hostile files are also shown to the library, which must
refuse them too (our reader follows its rules), and valid files must read the same.
"""

import json
import os
import pathlib
import struct

import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.errors import FileFormatError
from convt3d_cli.io.safetensors import FORMAT, MAX_HEADER_BYTES

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "weights")
FIXTURE = os.path.join(FIXTURES, "st_weights.safetensors")


def assert_same(actual, expected):
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    assert actual.tobytes() == np.ascontiguousarray(expected).tobytes()


def read_all(path):
    return {entry.name: FORMAT.load_tensor(path, entry) for entry in FORMAT.tensors(path)}


def write(path, header, data=b"", length=None):
    """A safetensors file from a header (dict, or raw bytes) and a data buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return str(path)


def tensor(dtype, shape, begin, end):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


# --------------------------------------------------------------------------- the committed fixture

def test_fixture_values_match_what_pytorch_saved():
    expected = np.load(os.path.join(FIXTURES, "st_weights_expected.npz"))
    got = read_all(FIXTURE)
    assert list(got) == list(expected.files)
    for name in expected.files:
        assert_same(got[name], expected[name])


def test_fixture_layer_metadata_and_unsupported_types():
    entries = {entry.name: entry for entry in FORMAT.tensors(FIXTURE)}
    assert entries["up.weight"].dtype == np.float32
    assert entries["up.weight"].attrs["stored_dtype"] == "BF16"
    assert "float32" in entries["up.weight"].attrs["converted"]
    assert entries["flag"].dtype == np.bool_ and entries["long"].dtype == np.dtype("<i8")
    assert "fp8" not in entries
    report = io.describe(FIXTURE)
    assert report["metadata"] == {"format": "pt", "note": "fixture"}
    assert report["unsupported_tensors"] == {"fp8": "F8_E4M3"}
    assert [layer["name"] for layer in report["layers"]] == ["up"]
    assert report["layers"][0]["bias"] == "up.bias"


def test_fixture_through_read_weights():
    expected = np.load(os.path.join(FIXTURES, "st_weights_expected.npz"))
    weights = io.read_weights(FIXTURE)                   # the only 5-D tensor, with its bias
    assert_same(weights.weight, expected["up.weight"])
    assert_same(weights.bias, expected["up.bias"])
    assert weights.source == f"{FIXTURE}:up.weight"


def test_a_safetensors_file_is_not_a_volume():
    with pytest.raises(FileFormatError, match="holds trained weights.*not a volume"):
        io.probe_volume(FIXTURE)


# --------------------------------------------------------------------------- hand-made files

def test_every_read_type(tmp_path):
    values = {
        "F16": np.array([1.5, -2.0], "<f2"), "F32": np.array([[3.25]], "<f4"),
        "F64": np.array([1e300], "<f8"), "I8": np.array([-128, 127], "i1"),
        "I16": np.array([-300], "<i2"), "I32": np.array([70000], "<i4"),
        "I64": np.array([-(2 ** 40)], "<i8"), "U8": np.array([255], "u1"),
        "U16": np.array([65535], "<u2"), "U32": np.array([2 ** 32 - 1], "<u4"),
        "U64": np.array([2 ** 64 - 1], "<u8"),
    }
    header, data = {}, b""
    for name, array in values.items():
        header[name] = tensor(name, array.shape, len(data), len(data) + array.nbytes)
        data += array.tobytes()
    bf16_bits = np.array([0x3FC0, 0xC000, 0x7F80], "<u2")      # 1.5, -2.0, +inf
    header["BF16"] = tensor("BF16", (3,), len(data), len(data) + 6)
    data += bf16_bits.tobytes()
    header["BOOL"] = tensor("BOOL", (3,), len(data), len(data) + 3)
    data += bytes([0, 1, 7])                                      # a stored 7 is True
    got = read_all(write(tmp_path / "all.safetensors", header, data))
    for name, array in values.items():
        assert_same(got[name], array.astype(array.dtype.newbyteorder("=")))
    assert_same(got["BF16"], np.array([1.5, -2.0, np.inf], np.float32))
    assert_same(got["BOOL"], np.array([False, True, True]))


def test_empty_and_scalar_tensors_and_padding(tmp_path):
    header = json.dumps({"e": tensor("F32", (0, 3), 0, 0), "s": tensor("F32", (), 0, 4)}).encode() + b"    "
    got = read_all(write(tmp_path / "e.safetensors", header, np.float32(2.5).tobytes()))
    assert got["e"].shape == (0, 3)
    assert_same(got["s"], np.array(2.5, np.float32))


def test_file_without_tensors(tmp_path):
    path = write(tmp_path / "none.safetensors", {"__metadata__": {"a": "b"}})
    assert FORMAT.tensors(path) == []
    with pytest.raises(FileFormatError, match="holds no 5-D or 6-D tensor"):
        io.read_weights(path)


ONE = {"a": tensor("F32", (1,), 0, 4)}
# case -> (header, data (None: write the header bytes alone), declared header length, message)
HOSTILE = {
    "too short": (b"\x10\x00\x00", None, None, "too short to be a safetensors file"),
    "header length past the end": (ONE, b"\0" * 4, 1000,
                                   "is truncated: its header should be 1000 bytes"),
    "header length over the limit": (ONE, b"\0" * 4, 10 ** 15, "larger than the 100000000-byte limit"),
    "data past the end": ({"a": tensor("F32", (4,), 0, 16)}, b"\0" * 4, None,
                          "is truncated: its header declares 16 bytes of data but the file holds 4"),
    "bytes nobody covers": (ONE, b"\0" * 8, None, "4 bytes after its last tensor"),
    "overlapping offsets": ({"a": tensor("F32", (2,), 0, 8), "b": tensor("F32", (2,), 4, 12)}, b"\0" * 12,
                            None, "overlaps the tensor before it"),
    "a gap": ({"a": tensor("F32", (1,), 0, 4), "b": tensor("F32", (1,), 8, 12)}, b"\0" * 12, None,
              "starts at byte 8 but the tensor before it ends at 4"),
    "reversed offsets": ({"a": tensor("F32", (0,), 4, 0)}, b"", None, "0 <= begin <= end"),
    "three offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 4]}}, b"\0" * 4, None,
                      "data_offsets must be \\[begin, end\\]"),
    "missing offsets": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, None, "data_offsets must be"),
    "size and offsets disagree": ({"a": tensor("F32", (3,), 0, 8)}, b"\0" * 8, None,
                                  "needs 12 bytes but data_offsets \\[0, 8\\] hold 8 bytes"),
    "huge shape": ({"a": tensor("F32", (2 ** 40, 2 ** 40), 0, 4)}, b"\0" * 4, None, "needs .* EiB"),
    "negative shape": ({"a": tensor("F32", (-1,), 0, 4)}, b"\0" * 4, None, "non-negative integers"),
    "float shape": ({"a": {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]}}, b"\0" * 4, None,
                    "non-negative integers"),
    "bool shape": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, None,
                   "non-negative integers"),
    "unknown dtype": ({"a": tensor("Q9", (1,), 0, 4)}, b"\0" * 4, None, "unknown element type 'Q9'"),
    "sub-byte end": ({"a": tensor("F4", (3,), 0, 2)}, b"\0" * 2, None, "do not end on a byte boundary"),
    "bad JSON": (b"{not json", b"", None, "the header is not valid JSON"),
    "bad UTF-8": (b'{"\xff": 1}', b"", None, "the header is not valid JSON"),
    "empty header": (b"", b"", None, "the header is not valid JSON"),
    "a list header": (b"[1, 2]", b"", None, "the header is a JSON list, not an object"),
    "deep JSON": (b"[" * 100_000 + b"]" * 100_000, b"", None, "nested too deeply"),
    "entry not an object": ({"a": 3}, b"", None, "the header entry is not an object"),
    "metadata not strings": ({"__metadata__": {"x": 1}, **ONE}, b"\0" * 4, None,
                             "__metadata__ must map names to strings"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_headers_are_one_clear_error(tmp_path, case):
    header, data, length, phrase = HOSTILE[case]
    path = tmp_path / "h.safetensors"
    if data is None:
        path.write_bytes(header)
    else:
        write(path, header, data, length)
    with pytest.raises(FileFormatError, match=phrase):
        FORMAT.tensors(str(path))


def test_repeated_names_are_refused(tmp_path):
    # The library keeps the last of two entries with one name; a weight must not be ambiguous.
    raw = b'{"a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}, "a": {"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = write(tmp_path / "dup.safetensors", raw, b"\0" * 4)
    with pytest.raises(FileFormatError, match="names 'a' more than once"):
        FORMAT.tensors(path)


def test_truncated_after_a_valid_header(tmp_path):
    path = write(tmp_path / "t.safetensors", {"w": tensor("F32", (2, 1, 2, 2, 2), 0, 64)}, b"\0" * 64)
    data = pathlib.Path(path).read_bytes()
    pathlib.Path(path).write_bytes(data[:-10])
    with pytest.raises(FileFormatError, match="is truncated"):
        io.read_weights(path)


def test_the_header_limit_is_the_librarys():
    assert MAX_HEADER_BYTES == 100_000_000


# --------------------------------------------------------------------------- against the library

@pytest.fixture
def safetensors():
    return pytest.importorskip("safetensors")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_the_library_refuses_the_same_files(tmp_path, safetensors, case):
    header, data, length, _ = HOSTILE[case]
    path = tmp_path / "h.safetensors"
    if data is None:
        path.write_bytes(header)
    else:
        write(path, header, data, length)
    with pytest.raises(Exception) as err, safetensors.safe_open(str(path), framework="numpy") as handle:
        [handle.get_slice(name) for name in handle.keys()]  # noqa: SIM118 - safe_open is no dict
    assert type(err.value).__name__ == "SafetensorError"


def test_the_library_reads_what_we_read(safetensors):
    expected = read_all(FIXTURE)
    with safetensors.safe_open(FIXTURE, framework="numpy") as handle:
        assert set(handle.keys()) == set(expected) | {"fp8"}
        assert handle.metadata() == {"format": "pt", "note": "fixture"}
        for name, values in expected.items():
            if handle.get_slice(name).get_dtype() != "BF16":     # the library cannot give BF16 to NumPy
                assert_same(values, handle.get_tensor(name))


def test_state_dict_saved_by_safetensors_torch(tmp_path, safetensors):
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    from convt3d_cli.engine import conv_transpose3d

    torch.manual_seed(5)
    up = torch.nn.ConvTranspose3d(4, 6, (2, 3, 2), stride=(2, 2, 1), padding=(0, 1, 1), groups=2)
    state = {"decoder.up." + k: v for k, v in up.state_dict().items()}
    state["decoder.norm.weight"] = torch.randn(6).bfloat16()
    state["step"] = torch.tensor(7)
    path = str(tmp_path / "m.safetensors")
    save_file(state, path, metadata={"format": "pt"})
    got = read_all(path)
    assert set(got) == set(state)
    for name, value in state.items():
        value = value.float() if value.dtype == torch.bfloat16 else value
        assert_same(got[name], value.numpy())
    weights = io.read_weights(f"{path}:decoder.up")
    x = torch.randn(1, 4, 3, 4, 5)
    expected = torch.nn.functional.conv_transpose3d(x, up.weight.detach(), up.bias.detach(), stride=up.stride,
                                                    padding=up.padding, groups=2).numpy()
    result = conv_transpose3d(x.numpy(), weights.weight, weights.bias, stride=up.stride, padding=up.padding,
                              groups=2)
    np.testing.assert_allclose(result, expected, rtol=0, atol=2e-5)
