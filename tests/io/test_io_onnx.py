"""ONNX models: ConvTranspose nodes read as layers, checked against ONNX runtimes.

Models are built with ``onnx.helper`` (no torch). Each case runs the model
with the ``onnx.reference`` evaluator and, when installed, onnxruntime, and
runs ``convt3d_cli.engine.conv_transpose3d`` with what the reader returned;
they must agree within 2e-5. The reference evaluator is wrong or refuses in
three places, so those cases are checked against onnxruntime only:

* ``group > 1`` (it splits the weight by output channels and adds one bias
  value per group; only depthwise layers without bias come out right);
* ``output_shape`` with auto_pad NOTSET or VALID and a non-zero total padding
  (it raises);
* auto_pad SAME with a stride longer than the kernel's reach plus
  ``output_padding`` (it gives ``input * stride`` planes, onnxruntime and ONNX
  shape inference the full result without padding; convt3d follows
  onnxruntime).

The committed fixtures ``tests/fixtures/weights/onnx_*`` (made by
``make_onnx_fixtures.py`` next to them) carry onnxruntime's outputs, so the
core suite covers those cases with ``onnx`` alone.
"""

import os
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from convt3d_cli import io
from convt3d_cli.engine import conv_transpose3d
from convt3d_cli.errors import FileFormatError, KeyNotFoundError, MissingDependency
from convt3d_cli.io.entries import choose_layer
from convt3d_cli.io.onnx import FORMAT, same_pads

try:
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator
except ImportError:  # the tests that need it skip; the fixture and missing-package tests still run
    onnx = None
try:
    import onnxruntime
except ImportError:
    onnxruntime = None

needs_onnx = pytest.mark.skipif(onnx is None, reason="needs the optional onnx package")
FIXTURES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fixtures", "weights")
FIXTURE_CASES = ("pads_bias", "same_groups", "output_shape", "external")
TOLERANCE = 2e-5


# --------------------------------------------------------------------------- building models

def make_model(path, weight, bias=None, *, attrs=None, name="up", input_shape=None, extra_nodes=(),
               weight_input="W", external=False, opset=17):
    """Save a one-ConvTranspose model (input ``X``, output ``Y``) and return its path."""
    initializers = [] if weight is None else [numpy_helper.from_array(weight, "W")]
    inputs = ["X", weight_input]
    if bias is not None:
        initializers.append(numpy_helper.from_array(bias, "B"))
        inputs.append("B")
    node = helper.make_node("ConvTranspose", inputs, ["Y"], name=name, **(attrs or {}))
    rank = 5 if weight is None else weight.ndim
    shape = list(input_shape) if input_shape is not None else [None] * rank
    graph = helper.make_graph(list(extra_nodes) + [node], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * rank)],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return save(model, path, external=external)


def save(model, path, external=False):
    path = os.fspath(path)
    if external:
        onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                        location="w.bin", size_threshold=0)
    else:
        onnx.save_model(model, path)
    return path


def runtimes(path, x, reference=True):
    """Outputs of the reference evaluator (if trusted for the case) and onnxruntime (if installed)."""
    outputs = {}
    if reference:
        outputs["reference"] = ReferenceEvaluator(path).run(None, {"X": x})[0]
    if onnxruntime is not None:
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        outputs["onnxruntime"] = session.run(None, {"X": x})[0]
    return outputs


def pads_for_output_size(in_spatial, weight_shape, options):
    """The 6 crops that give ``options["output_size"]`` -- what onnxruntime does with ``output_shape``.

    ``total = full + output_padding - size`` per axis; ``pad_rule`` "upper" crops
    ``total // 2`` at the start and the rest at the end, "lower" the other way round.
    A negative total (onnxruntime accepts down to ``1 - stride``) adds planes at the
    end: no crop, ``output_padding = size - full``.
    """
    stride, dilation, output_padding = (np.broadcast_to(options[k], 3) for k in
                                        ("stride", "dilation", "output_padding"))
    begins, ends, paddings = [], [], []
    for axis, n in enumerate(in_spatial):
        full = (n - 1) * stride[axis] + dilation[axis] * (weight_shape[2 + axis] - 1) + 1
        total = full + output_padding[axis] - options["output_size"][axis]
        if total < 0:
            begins.append(0)
            ends.append(0)
            paddings.append(options["output_size"][axis] - full)
            continue
        small, large = total // 2, total - total // 2
        begin, end = (small, large) if options["pad_rule"] == "upper" else (large, small)
        begins.append(begin)
        ends.append(end)
        paddings.append(output_padding[axis])
    return begins + ends, paddings


def convt3d_output(path, x, key=None):
    """What convt3d computes with the layer the reader returns (weight, bias, settings)."""
    layers = FORMAT.layers(path)
    layer = choose_layer(layers, key, path)
    weight = FORMAT.load_tensor(path, layer.weight)
    bias = FORMAT.load_tensor(path, layer.bias) if layer.bias is not None else None
    options = dict(layer.options)
    output_padding = options["output_padding"]
    if "output_size" in options:
        padding, output_padding = pads_for_output_size(x.shape[2:], weight.shape, options)
    else:
        padding = options["padding"]
    return conv_transpose3d(x, weight, bias, stride=options["stride"], padding=padding,
                            output_padding=output_padding, dilation=options["dilation"],
                            groups=options["groups"])


def assert_agree(path, x, reference=True, key=None):
    outputs = runtimes(path, x, reference)
    if not outputs:
        pytest.skip("the reference evaluator is wrong for this case and onnxruntime is not installed")
    ours = convt3d_output(path, x, key)
    for runtime, expected in outputs.items():
        assert ours.shape == expected.shape, runtime
        np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0, err_msg=runtime)
    return ours


def random(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- agreement with the runtimes

# id -> (weight shape, bias, attributes, input shape, reference evaluator trusted)
CASES = {
    "plain": ((2, 3, 3, 3, 3), False, {}, (1, 2, 4, 5, 3), True),
    "bias": ((2, 3, 2, 3, 2), True, dict(strides=[2, 2, 2]), (2, 2, 3, 4, 3), True),
    "groups": ((4, 3, 2, 3, 2), True, dict(strides=[2, 1, 2], group=2), (1, 4, 3, 3, 3), False),
    "depthwise": ((3, 1, 3, 3, 3), False, dict(strides=[2, 2, 2], group=3), (1, 3, 3, 3, 3), True),
    "dilation": ((2, 2, 3, 2, 3), True, dict(strides=[1, 2, 2], dilations=[2, 1, 3]), (1, 2, 4, 3, 3), True),
    "output_padding": ((1, 2, 3, 3, 2), True, dict(strides=[3, 2, 2], output_padding=[2, 1, 0]),
                       (1, 1, 3, 4, 3), True),
    "pads_end_only": ((1, 1, 2, 2, 2), True, dict(pads=[0, 0, 0, 1, 1, 1]), (1, 1, 3, 3, 3), True),
    "pads_mixed": ((2, 2, 3, 3, 3), True, dict(strides=[2, 2, 2], pads=[1, 0, 2, 0, 1, 1]),
                   (1, 2, 3, 4, 3), True),
    "kernel_shape": ((1, 2, 3, 2, 1), False, dict(kernel_shape=[3, 2, 1], strides=[1, 2, 3]),
                     (1, 1, 3, 3, 3), True),
    "valid": ((1, 1, 3, 3, 3), True, dict(strides=[2, 2, 2], auto_pad="VALID"), (1, 1, 3, 3, 3), True),
    # totals eff - stride per axis: 1 (odd), 2 (even), 1 (odd)
    "same_upper": ((1, 2, 3, 4, 2), True, dict(strides=[2, 2, 1], auto_pad="SAME_UPPER"),
                   (1, 1, 3, 4, 3), True),
    "same_lower": ((1, 2, 3, 4, 2), True, dict(strides=[2, 2, 1], auto_pad="SAME_LOWER"),
                   (1, 1, 3, 4, 3), True),
    # totals 3 (odd), 6 (even), 2 (even) with dilation and output_padding in them
    "same_upper_dilated": ((1, 1, 4, 3, 2), False,
                           dict(strides=[1, 2, 2], dilations=[1, 3, 2], output_padding=[0, 1, 1],
                                auto_pad="SAME_UPPER"), (1, 1, 3, 3, 4), True),
    "same_lower_dilated": ((1, 1, 4, 3, 2), False,
                           dict(strides=[1, 2, 2], dilations=[1, 3, 2], output_padding=[0, 1, 1],
                                auto_pad="SAME_LOWER"), (1, 1, 3, 3, 4), True),
    # stride longer than the kernel's reach: the runtimes disagree, convt3d follows onnxruntime
    "same_upper_clamped": ((1, 1, 1, 2, 2), True, dict(strides=[2, 3, 3], output_padding=[0, 0, 1],
                                                       auto_pad="SAME_UPPER"), (1, 1, 3, 3, 3), False),
    "same_lower_clamped": ((1, 1, 1, 2, 2), True, dict(strides=[2, 3, 3], output_padding=[0, 0, 1],
                                                       auto_pad="SAME_LOWER"), (1, 1, 3, 3, 3), False),
    # full = 9 per axis; totals 3, 2, 1 (the odd voxel at the start: NOTSET is "lower")
    "output_shape": ((1, 2, 3, 3, 3), True, dict(strides=[2, 2, 2], output_shape=[6, 7, 8]),
                     (1, 1, 4, 4, 4), False),
    "output_shape_valid": ((1, 2, 3, 3, 3), True,
                           dict(strides=[2, 2, 2], output_shape=[6, 7, 8], auto_pad="VALID"),
                           (1, 1, 4, 4, 4), False),
    "output_shape_upper": ((1, 2, 3, 3, 3), True,
                           dict(strides=[2, 2, 2], output_shape=[6, 7, 8], auto_pad="SAME_UPPER"),
                           (1, 1, 4, 4, 4), True),
    "output_shape_lower": ((1, 2, 3, 3, 3), True,
                           dict(strides=[2, 2, 2], output_shape=[6, 7, 8], auto_pad="SAME_LOWER"),
                           (1, 1, 4, 4, 4), True),
    # output_padding takes part in the total: full 12 + 1 - 12 = 1, cropped at the start
    "output_shape_output_padding": ((1, 1, 3, 3, 3), True,
                                    dict(strides=[3, 3, 3], output_padding=[1, 1, 1], output_shape=[12, 13, 14]),
                                    (1, 1, 4, 4, 4), False),
    # longer than the full result (by less than the stride): planes added at the end
    "output_shape_longer": ((1, 1, 2, 3, 3), True, dict(strides=[3, 2, 3], output_shape=[13, 10, 12]),
                            (1, 1, 4, 4, 4), False),
    "pads_ignored_with_output_shape": ((1, 1, 3, 3, 3), False,
                                       dict(strides=[2, 2, 2], output_shape=[7, 7, 7], pads=[2, 2, 2, 0, 0, 0]),
                                       (1, 1, 4, 4, 4), False),
}


@needs_onnx
@pytest.mark.parametrize("case", list(CASES))
def test_agrees_with_the_runtimes(tmp_path, case):
    weight_shape, with_bias, attrs, input_shape, reference = CASES[case]
    rng = np.random.default_rng(zlib.crc32(case.encode()))
    out_channels = weight_shape[1] * attrs.get("group", 1)
    bias = random(rng, out_channels) if with_bias else None
    path = make_model(tmp_path / f"{case}.onnx", random(rng, *weight_shape), bias, attrs=attrs,
                      input_shape=input_shape)
    assert_agree(path, random(rng, *input_shape), reference=reference)


@needs_onnx
def test_external_data(tmp_path):
    rng = np.random.default_rng(1)
    weight, bias = random(rng, 2, 3, 3, 2, 3), random(rng, 3)
    path = make_model(tmp_path / "m.onnx", weight, bias, attrs=dict(strides=[2, 1, 2]), external=True)
    assert os.path.getsize(tmp_path / "w.bin") >= weight.nbytes + bias.nbytes
    layer, = FORMAT.layers(path)
    assert layer.weight.attrs["file"] == str(tmp_path / "w.bin")
    np.testing.assert_array_equal(FORMAT.load_tensor(path, layer.weight), weight)
    np.testing.assert_array_equal(FORMAT.load_tensor(path, layer.bias), bias)
    assert_agree(path, random(rng, 1, 2, 3, 4, 3))


@needs_onnx
def test_same_pads_rule():
    # SAME_UPPER: odd extra voxel cropped at the end; SAME_LOWER: at the start (both runtimes)
    assert same_pads(3, 2, 1, 0, "upper") == (0, 1)
    assert same_pads(3, 2, 1, 0, "lower") == (1, 0)
    assert same_pads(4, 1, 1, 0, "upper") == (1, 2)
    assert same_pads(4, 2, 1, 0, "lower") == (1, 1)
    assert same_pads(3, 2, 1, 1, "upper") == (1, 1)   # output_padding is part of the total
    assert same_pads(1, 3, 1, 1, "upper") == (0, 0)   # clamped: onnxruntime adds no planes


# --------------------------------------------------------------------------- what the reader returns

@needs_onnx
def test_layer_record(tmp_path):
    rng = np.random.default_rng(2)
    weight, bias = random(rng, 4, 3, 2, 3, 2), random(rng, 6)
    path = make_model(tmp_path / "m.onnx", weight, bias, attrs=dict(
        strides=[2, 2, 2], group=2, dilations=[1, 2, 1], pads=[1, 0, 2, 0, 1, 1], output_padding=[1, 0, 1]))
    layer, = FORMAT.layers(path)
    assert (layer.name, layer.aliases, layer.kind) == ("up", ("W",), "ConvTranspose")
    assert (layer.layout, layer.layout_source) == ("torch", "ONNX ConvTranspose")
    assert (layer.weight.name, layer.weight.shape, layer.weight.dtype) == ("W", (4, 3, 2, 3, 2), np.float32)
    assert (layer.bias.name, layer.bias.shape) == ("B", (6,))
    assert layer.options == {"stride": 2, "dilation": [1, 2, 1], "groups": 2, "output_padding": [1, 0, 1],
                             "padding": [1, 0, 2, 0, 1, 1]}
    names = [entry.name for entry in FORMAT.tensors(path)]
    assert names == ["W", "B"]


@needs_onnx
def test_read_weights_and_describe(tmp_path):
    rng = np.random.default_rng(3)
    weight, bias = random(rng, 2, 3, 3, 3, 3), random(rng, 3)
    path = make_model(tmp_path / "m.onnx", weight, bias, attrs=dict(strides=[2, 2, 2], auto_pad="SAME_UPPER"))
    weights = io.read_weights(path)
    np.testing.assert_array_equal(weights.weight, weight)
    np.testing.assert_array_equal(weights.bias, bias)
    assert weights.options["padding"] == [0, 0, 0, 1, 1, 1]
    report = io.describe(path)
    assert report["format"] == "onnx"
    assert report["layers"][0]["name"] == "up"
    assert report["layers"][0]["layout_from"] == "ONNX ConvTranspose"


@needs_onnx
def test_unnamed_node_is_named_after_its_position(tmp_path):
    rng = np.random.default_rng(4)
    relu = helper.make_node("Relu", ["X"], ["R"])
    path = make_model(tmp_path / "m.onnx", random(rng, 1, 1, 2, 2, 2), name="", extra_nodes=[relu])
    layer, = FORMAT.layers(path)
    assert layer.name == "ConvTranspose_1"
    assert layer.aliases == ("W",)
    np.testing.assert_array_equal(io.read_weights(f"{path}:ConvTranspose_1").weight,
                                  io.read_weights(f"{path}:W").weight)


@needs_onnx
def test_weight_through_identity_and_constant(tmp_path):
    rng = np.random.default_rng(5)
    weight, bias = random(rng, 1, 2, 2, 2, 2), random(rng, 2)
    constant = helper.make_node("Constant", [], ["Wc"], name="const",
                                value=numpy_helper.from_array(weight, "Wc"))
    identity = helper.make_node("Identity", ["Wc"], ["Wi"], name="ident")
    path = make_model(tmp_path / "m.onnx", None, bias, weight_input="Wi", extra_nodes=[constant, identity],
                      attrs=dict(strides=[2, 2, 2]))
    layer, = FORMAT.layers(path)
    assert layer.weight.name == "Wc"
    assert layer.aliases == ("Wc", "Wi")
    assert [entry.name for entry in FORMAT.tensors(path)] == ["B", "Wc"]
    assert_agree(path, random(rng, 1, 1, 3, 3, 3))


@needs_onnx
@pytest.mark.parametrize("kind, values", [(TensorProto.FLOAT16 if onnx else 0, np.float16),
                                          (TensorProto.DOUBLE if onnx else 0, np.float64)])
@pytest.mark.parametrize("raw", [True, False])
def test_element_types_raw_and_typed(tmp_path, kind, values, raw):
    weight = (np.arange(16, dtype=np.float64).reshape(1, 2, 2, 2, 2) / 4 - 1).astype(values)
    tensor = helper.make_tensor("W", kind, weight.shape,
                                weight.tobytes() if raw else weight.reshape(-1).tolist(), raw=raw)
    node = helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", kind, [None] * 5)],
                              [helper.make_tensor_value_info("Y", kind, [None] * 5)], [tensor])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    layer, = FORMAT.layers(path)
    assert layer.weight.dtype == np.dtype(values)
    loaded = FORMAT.load_tensor(path, layer.weight)
    assert loaded.dtype == np.dtype(values) and loaded.flags.c_contiguous and loaded.flags.writeable
    np.testing.assert_array_equal(loaded, weight)


@needs_onnx
def test_several_layers_need_a_name(tmp_path):
    rng = np.random.default_rng(6)
    w1, w2 = random(rng, 1, 2, 2, 2, 2), random(rng, 2, 1, 3, 3, 3)
    nodes = [helper.make_node("ConvTranspose", ["X", "W1"], ["H"], name="up1", strides=[2, 2, 2]),
             helper.make_node("ConvTranspose", ["H", "W2"], ["Y"], name="up2", pads=[1, 1, 1, 1, 1, 1])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * 5)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 5)],
                              [numpy_helper.from_array(w1, "W1"), numpy_helper.from_array(w2, "W2")])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(FileFormatError) as err:
        io.read_weights(path)
    assert "up1 (1, 2, 2, 2, 2) float32" in str(err.value)
    assert "up2 (2, 1, 3, 3, 3) float32" in str(err.value)
    assert io.read_weights(f"{path}:up2").options["padding"] == 1
    np.testing.assert_array_equal(io.read_weights(f"{path}:W1").weight, w1)
    with pytest.raises(KeyNotFoundError, match="up1"):
        io.read_weights(f"{path}:up3")


# --------------------------------------------------------------------------- refused models

@needs_onnx
def test_truncated_at_every_byte(tmp_path):
    rng = np.random.default_rng(7)
    path = make_model(tmp_path / "m.onnx", random(rng, 1, 1, 2, 2, 2), random(rng, 1),
                      attrs=dict(strides=[2, 2, 2]))
    data = Path(path).read_bytes()
    cut = tmp_path / "cut.onnx"
    for length in range(len(data)):
        cut.write_bytes(data[:length])
        with pytest.raises(FileFormatError):
            FORMAT.layers(str(cut))


@needs_onnx
def test_random_byte_changes_end_in_one_line_errors(tmp_path):
    """Corrupted models: nothing but convt3d's errors escape, each on one line (names are escaped)."""
    from convt3d_cli.errors import Convt3dError

    rng = np.random.default_rng(16)
    path = make_model(tmp_path / "m.onnx", random(rng, 2, 2, 2, 2, 2), random(rng, 2),
                      attrs=dict(strides=[2, 2, 2], pads=[1, 0, 0, 0, 1, 0]))
    data = Path(path).read_bytes()
    bad = tmp_path / "bad.onnx"
    refused = 0
    for _ in range(500):
        changed = bytearray(data)
        for where in rng.integers(len(data), size=rng.integers(1, 4)):
            changed[where] = rng.integers(256)
        bad.write_bytes(bytes(changed))
        try:
            for layer in FORMAT.layers(str(bad)):
                FORMAT.load_tensor(str(bad), layer.weight)
            FORMAT.tensors(str(bad))
        except Convt3dError as exc:
            assert "\n" not in str(exc)
            refused += 1
    assert refused > 100


@needs_onnx
@pytest.mark.parametrize("content", [b"", b"\0" * 64, b"not an onnx model\n" * 4, bytes(range(256)) * 3,
                                     np.random.default_rng(8).bytes(4096)])
def test_garbage(tmp_path, content):
    path = tmp_path / "m.onnx"
    path.write_bytes(content)
    with pytest.raises(FileFormatError) as err:
        FORMAT.layers(str(path))
    assert "\n" not in str(err.value)
    with pytest.raises(FileFormatError):
        FORMAT.tensors(str(path))


@needs_onnx
def test_an_npy_file_renamed(tmp_path):
    path = tmp_path / "m.onnx"
    with open(path, "wb") as handle:
        np.save(handle, np.ones((2, 2, 2, 2, 2), np.float32))
    with pytest.raises(FileFormatError, match="m.onnx"):
        io.read_weights(str(path))


@needs_onnx
def test_no_conv_transpose(tmp_path):
    graph = helper.make_graph([helper.make_node("Relu", ["X"], ["Y"])], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * 5)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 5)])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(FileFormatError, match=r"no ConvTranspose node \(its graph holds: Relu\)"):
        FORMAT.layers(path)


@needs_onnx
def test_conv_transpose_inside_a_sub_graph_is_not_read(tmp_path):
    rng = np.random.default_rng(14)
    inner = make_model(tmp_path / "inner.onnx", random(rng, 1, 1, 2, 2, 2))
    body = onnx.load(inner).graph
    branch = helper.make_node("If", ["cond"], ["Y"], name="if", then_branch=body, else_branch=body)
    graph = helper.make_graph([branch], "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 5)])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(FileFormatError, match=r"no ConvTranspose node \(its graph holds: If\); nodes inside "
                                              r"functions or sub-graphs are not read"):
        FORMAT.layers(path)


@needs_onnx
def test_empty_auto_pad_is_notset(tmp_path):
    rng = np.random.default_rng(15)
    path = make_model(tmp_path / "m.onnx", random(rng, 1, 1, 3, 3, 3), attrs=dict(auto_pad="", strides=[2, 2, 2]))
    assert FORMAT.layers(path)[0].options["padding"] == 0
    assert_agree(path, random(rng, 1, 1, 3, 3, 3))
    # with pads: onnxruntime's shape inference refuses the pair, the reference evaluator uses the pads
    path = make_model(tmp_path / "p.onnx", random(rng, 1, 1, 3, 3, 3), attrs=dict(auto_pad="", pads=[1] * 6))
    assert FORMAT.layers(path)[0].options["padding"] == 1
    x = random(rng, 1, 1, 3, 3, 3)
    np.testing.assert_allclose(convt3d_output(path, x), ReferenceEvaluator(path).run(None, {"X": x})[0],
                               atol=TOLERANCE, rtol=0)


@needs_onnx
def test_only_a_2d_conv_transpose(tmp_path):
    rng = np.random.default_rng(9)
    path = make_model(tmp_path / "m.onnx", random(rng, 1, 1, 3, 3), name="up2d")
    with pytest.raises(FileFormatError, match="this is a 3-D tool; node 'up2d' is a 2-D ConvTranspose"):
        io.read_weights(path)
    # a 3-D node beside it is the layer
    w3 = random(rng, 1, 1, 2, 2, 2)
    nodes = [helper.make_node("ConvTranspose", ["X", "W2"], ["Y2"], name="up2d"),
             helper.make_node("ConvTranspose", ["X3", "W3"], ["Y3"], name="up3d")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                           for n in ("X", "X3")],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("Y2", "Y3")],
                              [numpy_helper.from_array(random(rng, 1, 1, 3, 3), "W2"),
                               numpy_helper.from_array(w3, "W3")])
    path = save(helper.make_model(graph), tmp_path / "mixed.onnx")
    assert [layer.name for layer in FORMAT.layers(path)] == ["up3d"]


@needs_onnx
def test_weight_computed_in_the_graph(tmp_path):
    rng = np.random.default_rng(10)
    scale = helper.make_node("Mul", ["W0", "S"], ["Wm"], name="scale")
    graph = helper.make_graph(
        [scale, helper.make_node("ConvTranspose", ["X", "Wm"], ["Y"], name="up")], "g",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * 5)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 5)],
        [numpy_helper.from_array(random(rng, 1, 1, 2, 2, 2), "W0"),
         numpy_helper.from_array(np.float32(2.0), "S")])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(FileFormatError, match="weight 'Wm' is computed in the graph by Mul node 'scale', "
                                              "not stored"):
        FORMAT.layers(path)


@needs_onnx
def test_weight_fed_at_run_time(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up")], "g",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None] * 5) for n in ("X", "W")],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 5)])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(FileFormatError, match="weight 'W' is a graph input fed at run time"):
        FORMAT.layers(path)


@needs_onnx
def test_bfloat16_weight_is_named(tmp_path):
    tensor = helper.make_tensor("W", TensorProto.BFLOAT16, (1, 1, 2, 2, 2), [0.5] * 8)
    graph = helper.make_graph([helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.BFLOAT16, [None] * 5)],
                              [helper.make_tensor_value_info("Y", TensorProto.BFLOAT16, [None] * 5)], [tensor])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    with pytest.raises(FileFormatError, match="node 'up': weight 'W' has element type BFLOAT16"):
        FORMAT.layers(path)
    assert FORMAT.tensors(path) == []


BAD_ATTRIBUTES = [
    (dict(strides=[0, 1, 1]), "'strides' values must be >= 1"),
    (dict(strides=[2, 2]), "'strides' must hold 3 values"),
    (dict(dilations=[1, -1, 1]), "'dilations' values must be >= 1"),
    (dict(pads=[0, 0, 0, -1, 0, 0]), "'pads' values must be >= 0"),
    (dict(pads=[1, 1, 1]), "'pads' must hold 6 values"),
    (dict(output_padding=[0, 2, 0], strides=[2, 2, 2]), "'output_padding'"),
    (dict(output_padding=[-1, 0, 0]), "'output_padding' values must be >= 0"),
    (dict(kernel_shape=[3, 3, 2]), "'kernel_shape' \\[3, 3, 2\\] disagrees with the weight's kernel \\[3, 3, 3\\]"),
    (dict(group=0), "'group' must be >= 1"),
    (dict(group=4), "'group' must be >= 1 and divide the weight's 2 input channels, got 4"),
    (dict(auto_pad="SAME"), "'auto_pad' must be one of"),
    (dict(auto_pad="SAME_UPPER", pads=[1, 1, 1, 1, 1, 1]), "'pads' cannot be combined with auto_pad SAME_UPPER"),
    (dict(output_shape=[1, 3, 8, 8, 8]), "'output_shape' must hold the 3 spatial sizes only"),
    (dict(output_shape=[8, 0, 8]), "'output_shape' values must be >= 1"),
    (dict(strides=[2.0, 2.0, 2.0]), "'strides' must be a list of integers"),
    (dict(group=[1]), "'group' must be an integer"),
    (dict(spacing=[1, 1, 1]), "unknown ConvTranspose attribute 'spacing'"),
]


@needs_onnx
@pytest.mark.parametrize("attrs, message", BAD_ATTRIBUTES, ids=[m for _, m in BAD_ATTRIBUTES])
def test_bad_attributes_name_node_and_attribute(tmp_path, attrs, message):
    path = make_model(tmp_path / "m.onnx", np.ones((2, 1, 3, 3, 3), np.float32), name="up7", attrs=attrs)
    with pytest.raises(FileFormatError, match="node 'up7': .*" + message) as err:
        FORMAT.layers(path)
    assert "\n" not in str(err.value)


@needs_onnx
def test_bias_of_the_wrong_size(tmp_path):
    path = make_model(tmp_path / "m.onnx", np.ones((2, 3, 2, 2, 2), np.float32), np.ones(2, np.float32))
    with pytest.raises(FileFormatError, match="bias 'B' must be 3 numbers"):
        FORMAT.layers(path)


def _external_model(tmp_path, location="w.bin"):
    """A model whose weight is external data at ``location`` (w.bin written beside it)."""
    rng = np.random.default_rng(11)
    path = make_model(tmp_path / "m.onnx", random(rng, 1, 1, 2, 2, 2), external=True)
    model = onnx.load(path, load_external_data=False)
    for item in model.graph.initializer[0].external_data:
        if item.key == "location":
            item.value = location
    with open(path, "wb") as handle:
        handle.write(model.SerializeToString())
    return path


@needs_onnx
@pytest.mark.parametrize("location", ["../w.bin", "sub/../../w.bin", "/etc/passwd", "..\\w.bin",
                                      "C:\\Windows\\win.ini"])
def test_external_data_cannot_leave_the_folder(tmp_path, location):
    (tmp_path / "sub").mkdir()
    path = _external_model(tmp_path / "sub" if location.startswith("..") else tmp_path, location)
    with pytest.raises(FileFormatError, match="leaves the model's folder"):
        FORMAT.layers(path)
    with pytest.raises(FileFormatError, match="leaves the model's folder"):
        FORMAT.tensors(path)


@needs_onnx
def test_external_data_through_a_link_leaving_the_folder(tmp_path):
    inner = tmp_path / "model"
    inner.mkdir()
    path = _external_model(inner, "link.bin")
    os.replace(inner / "w.bin", tmp_path / "outside.bin")
    os.symlink(tmp_path / "outside.bin", inner / "link.bin")
    with pytest.raises(FileFormatError, match="is a link that leaves the model's folder"):
        FORMAT.layers(path)


@needs_onnx
def test_external_data_in_a_subfolder(tmp_path):
    path = _external_model(tmp_path, "data/w.bin")
    (tmp_path / "data").mkdir()
    os.replace(tmp_path / "w.bin", tmp_path / "data" / "w.bin")
    layer, = FORMAT.layers(path)
    assert FORMAT.load_tensor(path, layer.weight).shape == (1, 1, 2, 2, 2)


@needs_onnx
def test_external_data_is_an_input_no_output_replaces(tmp_path, monkeypatch):
    """The external data file is read like the model: ``read_weights`` names it, and an
    output (or its sidecar) at its path is refused even with --overwrite."""
    from click.testing import CliRunner

    from convt3d_cli.cli import cli

    path = _external_model(tmp_path)
    assert io.read_weights(path).files == (str(tmp_path / "w.bin"),)
    np.save(tmp_path / "v.npy", np.ones((4, 4, 4), np.float32))
    before = (tmp_path / "w.bin").read_bytes()
    monkeypatch.chdir(tmp_path)
    for output in ("w.bin", "w.npy"):
        if output == "w.npy":
            os.replace(tmp_path / "w.bin", tmp_path / "w.npy")
            path = _external_model(tmp_path, "w.npy")
            os.remove(tmp_path / "w.bin")
        result = CliRunner().invoke(cli, ["run", "v.npy", output, "--weights", "m.onnx", "--overwrite"])
        assert result.exit_code == 1 and "never replaces an input" in result.stderr, result.stderr
        assert (tmp_path / output).read_bytes() == before


@needs_onnx
def test_external_data_missing_or_short(tmp_path):
    path = _external_model(tmp_path)
    data = (tmp_path / "w.bin").read_bytes()
    (tmp_path / "w.bin").write_bytes(data[:-1])
    with pytest.raises(FileFormatError, match="declares .* which has only 31 bytes"):
        FORMAT.layers(path)
    os.remove(tmp_path / "w.bin")
    with pytest.raises(FileFormatError, match="external data file .*w.bin is missing"):
        FORMAT.layers(path)
    os.mkfifo(tmp_path / "w.bin")
    with pytest.raises(FileFormatError, match="named pipe"):
        FORMAT.layers(path)


@needs_onnx
def test_external_data_length_disagrees(tmp_path):
    path = _external_model(tmp_path)
    model = onnx.load(path, load_external_data=False)
    for item in model.graph.initializer[0].external_data:
        if item.key == "length":
            item.value = "16"
    save(model, path)
    with pytest.raises(FileFormatError, match=r"declares \(1, 1, 2, 2, 2\) float \(32 bytes\) but its external "
                                              r"data is 16 bytes long"):
        FORMAT.layers(path)


@needs_onnx
@pytest.mark.parametrize("external", [False, True])
def test_huge_dimensions_without_the_data(tmp_path, external):
    tensor = helper.make_tensor("W", TensorProto.FLOAT, (1, 1, 2, 2, 2), [1.0] * 8)
    tensor.ClearField("float_data")
    del tensor.dims[:]
    tensor.dims.extend([10**6, 10**6, 10**6, 10**6, 10**6])
    if external:
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value="w.bin")
        (tmp_path / "w.bin").write_bytes(b"\0" * 64)
    graph = helper.make_graph([helper.make_node("ConvTranspose", ["X", "W"], ["Y"], name="up")], "g",
                              [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None] * 5)],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None] * 5)], [tensor])
    path = save(helper.make_model(graph), tmp_path / "m.onnx")
    expected = "which has only 64 bytes" if external else "but holds 0 values"
    declared = r"declares \(1000000, 1000000, 1000000, 1000000, 1000000\) float \(.* EiB\)"
    with pytest.raises(FileFormatError, match=declared + ".*" + expected):
        FORMAT.layers(path)
    with pytest.raises(FileFormatError, match=expected):
        FORMAT.tensors(path)


# --------------------------------------------------------------------------- without the onnx package

def test_missing_onnx_package_is_one_line_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)     # "import onnx" now raises ImportError
    path = os.path.join(FIXTURES, "onnx_pads_bias.onnx")
    for call in (FORMAT.layers, FORMAT.tensors):
        with pytest.raises(MissingDependency) as err:
            call(path)
        assert str(err.value) == f'reading {path} needs the optional onnx package: pip install "convt3d[onnx]"'
        assert err.value.exit_code == 2


def test_missing_onnx_package_exits_2(monkeypatch, tmp_path):
    from helpers import invoke_in

    monkeypatch.setitem(sys.modules, "onnx", None)
    np.save(tmp_path / "in.npy", np.ones((1, 2, 3, 3, 3), np.float32))
    model = os.path.join(FIXTURES, "onnx_pads_bias.onnx")
    result = invoke_in(tmp_path, "run", "in.npy", "out.npy", "--weights", model)
    assert result.exit_code == 2, result.output
    assert 'pip install "convt3d[onnx]"' in result.output
    assert not (tmp_path / "out.npy").exists()
    assert invoke_in(tmp_path, "info", model).exit_code == 2


# --------------------------------------------------------------------------- committed fixtures

def test_fixtures_are_committed_and_small():
    for case in FIXTURE_CASES:
        for suffix in (".onnx", ".npz"):
            path = os.path.join(FIXTURES, f"onnx_{case}{suffix}")
            assert os.path.isfile(path), path
            assert os.path.getsize(path) < 16_384, path
    assert os.path.isfile(os.path.join(FIXTURES, "onnx_external.bin"))


@needs_onnx
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixtures_give_onnxruntimes_output(case):
    path = os.path.join(FIXTURES, f"onnx_{case}.onnx")
    with np.load(os.path.join(FIXTURES, f"onnx_{case}.npz")) as saved:
        x, expected = saved["input"], saved["expected"]
    ours = convt3d_output(path, x)
    assert ours.shape == expected.shape
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


@needs_onnx
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_fixtures_through_the_layer_plan(case):
    """``io.read_weights`` and ``layerplan.plan_layer`` resolve the settings (output_shape too)."""
    from convt3d_cli.layerplan import plan_layer

    path = os.path.join(FIXTURES, f"onnx_{case}.onnx")
    with np.load(os.path.join(FIXTURES, f"onnx_{case}.npz")) as saved:
        x, expected = saved["input"], saved["expected"]
    weights = io.read_weights(path)
    cli = {name: None for name in ("stride", "padding", "output_padding", "dilation", "groups")}
    plan = plan_layer(x.shape, cli, weight_shape=weights.weight.shape, file_options=weights.options,
                      file_source=path)
    params = plan.params
    ours = conv_transpose3d(x, weights.weight, weights.bias, stride=params.stride,
                            padding=params.padding + params.padding_end, output_padding=params.output_padding,
                            dilation=params.dilation, groups=params.groups)
    np.testing.assert_allclose(ours, expected, atol=TOLERANCE, rtol=0)


@needs_onnx
@pytest.mark.parametrize("case", FIXTURE_CASES)
def test_cli_run_on_the_fixtures(tmp_path, case):
    from helpers import invoke_in

    with np.load(os.path.join(FIXTURES, f"onnx_{case}.npz")) as saved:
        x, expected = saved["input"], saved["expected"]
    np.save(tmp_path / "in.npy", x)
    result = invoke_in(tmp_path, "run", "in.npy", "out.npy", "--weights", os.path.join(FIXTURES, f"onnx_{case}.onnx"))
    assert result.exit_code == 0, result.output
    got = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(got.reshape(expected.shape), expected, atol=TOLERANCE, rtol=0)


@needs_onnx
def test_cli_run_equals_the_reference_evaluator(tmp_path):
    from helpers import invoke_in

    rng = np.random.default_rng(12)
    attrs = dict(strides=[2, 1, 2], dilations=[1, 2, 1], pads=[1, 0, 2, 0, 1, 1], output_padding=[1, 0, 0])
    path = make_model(tmp_path / "m.onnx", random(rng, 2, 3, 2, 3, 3), random(rng, 3), attrs=attrs)
    x = random(rng, 1, 2, 3, 4, 5)
    np.save(tmp_path / "in.npy", x)
    result = invoke_in(tmp_path, "run", "in.npy", "out.npy", "--weights", "m.onnx")
    assert result.exit_code == 0, result.output
    expected = ReferenceEvaluator(path).run(None, {"X": x})[0]
    got = np.load(tmp_path / "out.npy")
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, atol=TOLERANCE, rtol=0)


@needs_onnx
def test_output_shape_longer_than_the_full_result_through_the_layer_plan(tmp_path):
    from convt3d_cli.layerplan import plan_layer

    rng = np.random.default_rng(13)
    path = make_model(tmp_path / "m.onnx", random(rng, 1, 1, 2, 3, 3), attrs=dict(
        strides=[3, 2, 3], output_shape=[13, 10, 12]), input_shape=(1, 1, 4, 4, 4))
    weights = io.read_weights(path)
    cli = {name: None for name in ("stride", "padding", "output_padding", "dilation", "groups")}
    plan = plan_layer((1, 1, 4, 4, 4), cli, weight_shape=weights.weight.shape, file_options=weights.options,
                      file_source=path)
    # full is (11, 9, 12): two planes added at the end of D, one at the end of H (onnxruntime's output)
    assert plan.params.padding + plan.params.padding_end == (0, 0, 0, 0, 0, 0)
    assert plan.params.output_padding == (2, 1, 0)
