"""``.onnx``: the ``ConvTranspose`` nodes of an ONNX model as trained layers.

Every ``ConvTranspose`` node of the main graph whose weight (second input) is a
stored 5-D tensor is one layer: the weight and the bias (third input) come from
the model's initializers, from ``Constant`` nodes, or through ``Identity`` nodes
of either; the node's attributes become the layer settings. A weight computed by
other nodes or fed as a graph input is not stored in the file and is refused.
Sub-graphs (``If``/``Loop`` bodies) and model-local functions are not searched.

The ``onnx`` package is an optional dependency (``pip install "convt3d[onnx]"``),
imported on first use; the model is parsed with it but nothing in the file is
run. External data is read by this module from files beside the model only, and
every tensor's declared size is checked against the bytes present before
anything is converted.

Attributes -> settings (all verified against onnxruntime 1.32 and, where it
computes them, the ``onnx.reference`` evaluator; see
``tests/io/test_io_onnx.py``). With ``eff = dilation * (k - 1) + 1``:

``pads`` (begin D,H,W, end D,H,W)
    ``padding`` with 6 values. ``auto_pad=VALID``: zero padding.
``auto_pad=SAME_UPPER`` / ``SAME_LOWER`` (no ``output_shape``)
    ``total = max(0, eff + output_padding - stride)`` per axis, the same for
    every input size; SAME_UPPER crops ``total // 2`` at the start and the rest at
    the end, SAME_LOWER the other way round. The output is ``input * stride``
    whenever ``total`` is not clamped; when the stride is longer than
    ``eff + output_padding`` onnxruntime (and ONNX shape inference) clamp the
    total to 0, giving ``full + output_padding`` planes, while the Python
    reference evaluator adds planes up to ``input * stride``: convt3d follows
    onnxruntime.
``output_shape``
    ``output_size`` (3 spatial values; ONNX excludes N and C, and onnxruntime
    refuses 5 values) and ``pad_rule``: ``"upper"`` for SAME_UPPER, ``"lower"``
    otherwise (NOTSET and VALID take the odd voxel at the start, as onnxruntime
    does). ``pads`` is then ignored, as the ONNX specification says.
``strides``, ``dilations``, ``group``, ``output_padding``
    ``stride``, ``dilation``, ``groups``, ``output_padding``.
``kernel_shape``
    Must equal the weight's kernel size.

An unnamed node is called ``ConvTranspose_<i>``, ``i`` being its position in
the graph's node list (0-based); its weight's name addresses it too.
"""

from __future__ import annotations

import math
import os

import numpy as np

from ..errors import FileFormatError, MissingDependency
from .base import WeightsFormat
from .dtypes import native
from .records import Entry, StoredLayer
from .safety import check_memory, human_bytes, reading, require_file

LABEL = "an ONNX model"
INSTALL_HINT = 'pip install "convt3d[onnx]"'

# ONNX TensorProto.DataType codes convt3d reads -> (NumPy type, field holding in-file values
# when raw_data is not used). float16/bool/8- and 16-bit integers travel in int32_data.
_TYPES = {
    1: ("f4", "float_data"), 2: ("u1", "int32_data"), 3: ("i1", "int32_data"),
    4: ("u2", "int32_data"), 5: ("i2", "int32_data"), 6: ("i4", "int32_data"),
    7: ("i8", "int64_data"), 9: ("b1", "int32_data"), 10: ("f2", "int32_data"),
    11: ("f8", "double_data"), 12: ("u4", "uint64_data"), 13: ("u8", "uint64_data"),
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
_DEFAULT_DOMAINS = ("", "ai.onnx")
# AttributeProto.AttributeType codes
_INT, _STRING, _TENSOR, _GRAPH, _INTS, _GRAPHS = 2, 3, 4, 5, 7, 10
_AUTO_PADS = ("NOTSET", "SAME_UPPER", "SAME_LOWER", "VALID")
_ATTRIBUTES = ("auto_pad", "dilations", "group", "kernel_shape", "output_padding", "output_shape",
               "pads", "strides")
_SPATIAL = 3


def _onnx(path):
    """The ``onnx`` package, or :class:`MissingDependency` with the install hint."""
    try:
        import onnx
    except ImportError:
        raise MissingDependency(f"reading {path} needs the optional onnx package: "
                                f"{INSTALL_HINT}") from None
    return onnx


def _type_name(onnx, code):
    try:
        return onnx.TensorProto.DataType.Name(code)
    except ValueError:
        return f"type {code}"


def _shown(text, limit=120):
    """A name from the file, safe for a one-line message: control characters escaped, long names cut."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- the model

def _load_model(path):
    """The parsed model (external data not loaded), after checking it is an ONNX model at all."""
    require_file(path)
    onnx = _onnx(path)
    # The file is read whole and parsed: about twice its size at the peak.
    check_memory(2 * os.path.getsize(path), path)
    with reading(path, LABEL):
        model = onnx.load_model(path, load_external_data=False)
    # Protobuf parses an empty file, and a file cut at a field boundary, without complaint.
    missing = [what for what, ok in (("a graph", model.HasField("graph")),
                                     ("an IR version", model.ir_version > 0),
                                     ("operator sets", model.ir_version < 3 or len(model.opset_import) > 0))
               if not ok]
    if missing:
        raise FileFormatError(f"{path} is not an ONNX model, or is truncated: it has no "
                              f"{' and no '.join(missing)}")
    return onnx, model


def _stored_tensors(graph):
    """Tensor name -> ``(TensorProto, origin)`` for the initializers and ``Constant`` node values."""
    stored = {}
    for tensor in graph.initializer:
        stored.setdefault(tensor.name, (tensor, "initializer"))
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and len(node.output) == 1:
            for attribute in node.attribute:
                if attribute.name == "value" and attribute.type == _TENSOR:
                    stored.setdefault(node.output[0], (attribute.t, f"Constant node '{_shown(node.name)}'"))
    return stored


class _Graph:
    """What :meth:`resolve` needs to know about a graph, indexed once."""

    def __init__(self, graph):
        self.stored = _stored_tensors(graph)
        self.producers = {}
        for node in graph.node:
            for output in node.output:
                self.producers.setdefault(output, node)
        self.inputs = {value.name for value in graph.input}
        self.sparse = {tensor.values.name for tensor in graph.sparse_initializer}

    def resolve(self, name):
        """Follow ``Identity`` nodes back from ``name`` to a stored tensor.

        Returns
        -------
        tuple
            ``(tensor name, TensorProto, None)`` or ``(name, None, why it is not stored)``.
        """
        seen = set()
        while True:
            if name in self.stored:
                return name, self.stored[name][0], None
            if name in self.sparse:
                return name, None, "a sparse initializer; convt3d reads dense tensors only"
            if name in self.inputs:
                return name, None, "a graph input fed at run time, not stored in the file"
            node = self.producers.get(name)
            if node is None:
                return name, None, "not defined anywhere in the graph"
            if (node.op_type == "Identity" and node.domain in _DEFAULT_DOMAINS and node.input
                    and name not in seen):
                seen.add(name)
                name = node.input[0]
                continue
            return name, None, (f"computed in the graph by {_shown(node.op_type)} node '{_shown(node.name)}', "
                                f"not stored")


# --------------------------------------------------------------------------- tensors

def _folder(path):
    return os.path.dirname(os.path.abspath(path))


def _external_file(path, tensor, where):
    """``(file, offset, length or None)`` of a tensor's external data, refusing paths that leave the model's folder."""
    info = {item.key: item.value for item in tensor.external_data}
    location = info.get("location", "")
    if not location:
        raise FileFormatError(f"{where}: external data without a location")
    parts = location.replace("\\", "/").split("/")
    if (os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in parts
            or (len(location) > 1 and location[1] == ":") or "\0" in location):
        raise FileFormatError(f"{where}: external data location '{_shown(location)}' leaves the model's folder; "
                              f"convt3d reads external data only from files beside the model")
    folder = _folder(path)
    target = os.path.join(folder, *[part for part in parts if part not in ("", ".")])
    real_folder = os.path.realpath(folder)
    if os.path.commonpath([os.path.realpath(target), real_folder]) != real_folder:
        raise FileFormatError(f"{where}: external data location '{_shown(location)}' is a link that leaves the "
                              f"model's folder; convt3d reads external data only from files beside the model")
    if not os.path.exists(target):
        raise FileFormatError(f"{where}: its external data file {target} is missing")
    require_file(target)
    numbers = {}
    for key in ("offset", "length"):
        if key in info:
            text = info[key].strip()
            if not text.isdigit():
                raise FileFormatError(f"{where}: external data {key} must be a byte count >= 0, got {info[key]!r}")
            numbers[key] = int(text)
    return target, numbers.get("offset", 0), numbers.get("length")


def _tensor_entry(onnx, path, name, tensor):
    """An :class:`Entry` for a stored tensor after checking its bytes are all there; ``None`` if not numeric."""
    where = f"{path}:{_shown(name)}"
    if tensor.data_type not in _TYPES:
        return None
    code, field_name = _TYPES[tensor.data_type]
    dtype = np.dtype(code)
    dtype = dtype if dtype.itemsize == 1 else dtype.newbyteorder("<")  # ONNX stores little-endian
    shape = tuple(int(n) for n in tensor.dims)
    if any(n < 0 for n in shape):
        raise FileFormatError(f"{where} has a negative dimension: {shape}")
    size = math.prod(shape)
    nbytes = size * dtype.itemsize
    declared = f"declares {shape} {_type_name(onnx, tensor.data_type).lower()} ({human_bytes(nbytes)})"
    attrs = {}
    if tensor.data_location == _EXTERNAL:
        target, offset, length = _external_file(path, tensor, where)
        if length is not None and length != nbytes:
            raise FileFormatError(f"{where} {declared} but its external data is {length} bytes long")
        available = os.path.getsize(target)
        if offset + nbytes > available:
            raise FileFormatError(f"{where} {declared} at byte {offset} of {target}, which has only "
                                  f"{available} bytes (truncated?)")
        attrs = {"file": target, "offset": offset}
    elif tensor.HasField("raw_data"):
        held = len(tensor.raw_data)
        if held != nbytes:
            raise FileFormatError(f"{where} {declared} but holds {held} bytes")
    else:
        held = len(getattr(tensor, field_name))
        if held != size:
            raise FileFormatError(f"{where} {declared} but holds {held} values")
    return Entry(name=name, shape=shape, dtype=dtype, attrs=attrs)


def _tensor_values(onnx, path, entry, tensor):
    """The values of a checked tensor, native byte order, C-ordered, writable."""
    check_memory(entry.nbytes, f"{path}:{_shown(entry.name)}")
    if "file" in entry.attrs:
        values = np.empty(entry.shape, dtype=native(entry.dtype))
        view = memoryview(values.reshape(-1).view(np.uint8))
        with open(entry.attrs["file"], "rb") as handle:
            handle.seek(entry.attrs["offset"])
            got = handle.readinto(view)
        if got != entry.nbytes:
            raise FileFormatError(f"{path}:{_shown(entry.name)}: its external data file {entry.attrs['file']} "
                                  f"ended early ({got} of {entry.nbytes} bytes)")
        if entry.dtype.itemsize > 1 and not np.little_endian:
            values = values.view(entry.dtype).astype(native(entry.dtype))
        return values
    if tensor.HasField("raw_data"):
        values = np.frombuffer(tensor.raw_data, dtype=entry.dtype).reshape(entry.shape)
    else:
        values = onnx.numpy_helper.to_array(tensor)
    return np.array(values, dtype=native(entry.dtype), order="C")


# --------------------------------------------------------------------------- attributes

def _attributes(node, where):
    found = {}
    for attribute in node.attribute:
        if attribute.name in found:
            raise FileFormatError(f"{where}: attribute '{_shown(attribute.name)}' is given twice")
        if attribute.name not in _ATTRIBUTES:
            raise FileFormatError(f"{where}: unknown ConvTranspose attribute '{_shown(attribute.name)}'")
        found[attribute.name] = attribute
    return found


def _ints(attrs, name, count, where, minimum, default):
    """A list of ``count`` ints ``>= minimum`` from an INTS attribute, or ``default``."""
    if name not in attrs:
        return list(default)
    attribute = attrs[name]
    if attribute.type != _INTS:
        raise FileFormatError(f"{where}: attribute '{name}' must be a list of integers")
    values = [int(v) for v in attribute.ints]
    if len(values) != count:
        raise FileFormatError(f"{where}: attribute '{name}' must hold {count} values (D, H, W"
                              f"{' begins then ends' if count == 2 * _SPATIAL else ''}), got {values}")
    if min(values) < minimum:
        raise FileFormatError(f"{where}: attribute '{name}' values must be >= {minimum}, got {values}")
    return values


def _compact(values):
    """``[2, 2, 2]`` -> ``2``; a 6-value padding with equal ends -> its 3 values."""
    if len(values) == 2 * _SPATIAL and values[:_SPATIAL] == values[_SPATIAL:]:
        values = values[:_SPATIAL]
    return values[0] if len(set(values)) == 1 else list(values)


def same_pads(kernel, stride, dilation, output_padding, rule):
    """Begin and end crop of ``auto_pad`` SAME_UPPER (``rule="upper"``) or SAME_LOWER on one axis.

    Parameters
    ----------
    kernel, stride, dilation, output_padding : int
    rule : {"upper", "lower"}
        Where an odd total's extra voxel is cropped: ``"upper"`` at the end.

    Returns
    -------
    tuple of int
        ``(begin, end)``; the output is ``full - begin - end + output_padding``.

    Notes
    -----
    ``total = max(0, dilation * (kernel - 1) + 1 + output_padding - stride)``: the
    output is ``input * stride`` unless the stride is longer than the kernel's reach
    plus ``output_padding``, where onnxruntime clamps the total at 0.
    """
    total = max(0, dilation * (kernel - 1) + 1 + output_padding - stride)
    small, large = total // 2, total - total // 2
    return (small, large) if rule == "upper" else (large, small)


def node_options(node, weight_shape, where):
    """The layer settings of a ``ConvTranspose`` node (see the module docstring).

    Parameters
    ----------
    node : onnx.NodeProto
    weight_shape : tuple of int
        ``(Cin, Cout/group, kD, kH, kW)``.
    where : str
        File and node, for messages.

    Returns
    -------
    dict
        ``stride``, ``dilation``, ``groups``, ``output_padding`` and either
        ``padding`` (3 or 6 values) or ``output_size`` with ``pad_rule``.

    Raises
    ------
    FileFormatError
        An attribute of the wrong type, length or range, naming it.
    """
    attrs = _attributes(node, where)
    kernel = list(weight_shape[2:])
    stride = _ints(attrs, "strides", _SPATIAL, where, 1, [1] * _SPATIAL)
    dilation = _ints(attrs, "dilations", _SPATIAL, where, 1, [1] * _SPATIAL)
    output_padding = _ints(attrs, "output_padding", _SPATIAL, where, 0, [0] * _SPATIAL)
    pads = _ints(attrs, "pads", 2 * _SPATIAL, where, 0, [0] * (2 * _SPATIAL))
    if "kernel_shape" in attrs:
        stated = _ints(attrs, "kernel_shape", _SPATIAL, where, 1, kernel)
        if stated != kernel:
            raise FileFormatError(f"{where}: attribute 'kernel_shape' {stated} disagrees with the weight's "
                                  f"kernel {kernel}")
    groups = 1
    if "group" in attrs:
        if attrs["group"].type != _INT:
            raise FileFormatError(f"{where}: attribute 'group' must be an integer")
        groups = int(attrs["group"].i)
        if groups < 1 or weight_shape[0] % groups:
            raise FileFormatError(f"{where}: attribute 'group' must be >= 1 and divide the weight's "
                                  f"{weight_shape[0]} input channels, got {groups}")
    auto_pad = "NOTSET"
    if "auto_pad" in attrs:
        if attrs["auto_pad"].type != _STRING:
            raise FileFormatError(f"{where}: attribute 'auto_pad' must be a string")
        # onnxruntime reads an empty auto_pad as NOTSET; some exporters write one.
        auto_pad = attrs["auto_pad"].s.decode("utf-8", errors="replace") or "NOTSET"
        if auto_pad not in _AUTO_PADS:
            raise FileFormatError(f"{where}: attribute 'auto_pad' must be one of {', '.join(_AUTO_PADS)}, "
                                  f"got {auto_pad!r}")
    for axis in range(_SPATIAL):
        if output_padding[axis] >= max(stride[axis], dilation[axis]):
            raise FileFormatError(f"{where}: attribute 'output_padding' {output_padding} must be smaller than "
                                  f"the stride {stride} or the dilation {dilation} on each axis")
    if "pads" in attrs and auto_pad != "NOTSET" and (auto_pad != "VALID" or any(pads)):
        raise FileFormatError(f"{where}: attribute 'pads' cannot be combined with auto_pad {auto_pad}")
    options = {"stride": _compact(stride), "output_padding": _compact(output_padding),
               "dilation": _compact(dilation), "groups": groups}
    if "output_shape" in attrs:
        attribute = attrs["output_shape"]
        if attribute.type == _INTS and len(attribute.ints) == _SPATIAL + 2:
            raise FileFormatError(f"{where}: attribute 'output_shape' must hold the 3 spatial sizes only "
                                  f"(ONNX leaves out N and C), got {list(attribute.ints)}")
        options["output_size"] = _ints(attrs, "output_shape", _SPATIAL, where, 1, None)
        options["pad_rule"] = "upper" if auto_pad == "SAME_UPPER" else "lower"
    elif auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        rule = "upper" if auto_pad == "SAME_UPPER" else "lower"
        crops = [same_pads(*axis, rule) for axis in zip(kernel, stride, dilation, output_padding)]
        options["padding"] = _compact([b for b, _ in crops] + [e for _, e in crops])
    elif auto_pad == "VALID":
        options["padding"] = 0
    else:
        options["padding"] = _compact(pads)
    return options


# --------------------------------------------------------------------------- the format

class OnnxFormat(WeightsFormat):
    """ONNX models (``.onnx``): the ``ConvTranspose`` nodes are the layers."""

    name = "onnx"
    label = "ONNX"
    volume_hint = "pass it to --weights (FILE.onnx:LAYER names a ConvTranspose node or its weight)"

    def tensors(self, path):
        onnx, model = _load_model(path)
        entries = []
        with reading(path, LABEL):
            for name, (tensor, _) in _stored_tensors(model.graph).items():
                entry = _tensor_entry(onnx, path, name, tensor)
                if entry is not None:
                    entries.append(entry)
        return entries

    def load_tensor(self, path, entry):
        onnx, model = _load_model(path)
        with reading(path, LABEL):
            stored = _stored_tensors(model.graph)
            if entry.name not in stored:
                raise FileFormatError(f"{path} no longer holds the tensor '{_shown(entry.name)}'")
            tensor = stored[entry.name][0]
            checked = _tensor_entry(onnx, path, entry.name, tensor)
            if checked is None or checked.shape != tuple(entry.shape) or checked.dtype != entry.dtype:
                raise FileFormatError(f"{path}:{_shown(entry.name)} changed while it was being read")
            return _tensor_values(onnx, path, checked, tensor)

    def layers(self, path):
        onnx, model = _load_model(path)
        with reading(path, LABEL):
            return self._layers(onnx, path, model)

    def _layers(self, onnx, path, model):
        graph = model.graph
        index = _Graph(graph)
        nodes = [(position, node) for position, node in enumerate(graph.node)
                 if node.op_type == "ConvTranspose" and node.domain in _DEFAULT_DOMAINS]
        if not nodes:
            kinds = sorted({_shown(node.op_type, 40) for node in graph.node})
            held = ", ".join(kinds[:20]) + (" ..." if len(kinds) > 20 else "") if kinds else "no nodes"
            nested = len(model.functions) > 0 or any(
                attribute.type in (_GRAPH, _GRAPHS) for node in graph.node for attribute in node.attribute)
            elsewhere = "; nodes inside functions or sub-graphs are not read" if nested else ""
            raise FileFormatError(f"{path} has no ConvTranspose node (its graph holds: {held}){elsewhere}")
        layers, other_ranks, not_stored = [], [], []
        for position, node in nodes:
            name = node.name or f"ConvTranspose_{position}"
            where = f"{path}: node '{_shown(name)}'" if node.name else \
                f"{path}: node '{name}' (unnamed, named after its position {position} in the graph)"
            if len(node.input) < 2 or not node.input[1]:
                raise FileFormatError(f"{where} has no weight input")
            weight_name, weight, why = index.resolve(node.input[1])
            if weight is None:
                not_stored.append(f"node '{_shown(name)}': weight '{_shown(node.input[1])}' is {why}")
                continue
            if len(weight.dims) != 5:
                other_ranks.append((name, len(weight.dims) - 2, weight_name, tuple(weight.dims)))
                continue
            entry = _tensor_entry(onnx, path, weight_name, weight)
            if entry is None:
                raise FileFormatError(f"{where}: weight '{_shown(weight_name)}' has element type "
                                      f"{_type_name(onnx, weight.data_type)}; convt3d reads integer or "
                                      f"floating-point tensors (float16/32/64, int8-64, uint8-64, bool)")
            options = node_options(node, entry.shape, where)
            bias = None
            if len(node.input) > 2 and node.input[2]:
                bias_name, bias_tensor, why = index.resolve(node.input[2])
                if bias_tensor is None:
                    not_stored.append(f"node '{_shown(name)}': bias '{_shown(node.input[2])}' is {why}")
                    continue
                bias = _tensor_entry(onnx, path, bias_name, bias_tensor)
                out_channels = entry.shape[1] * options["groups"]
                if bias is None or bias.shape != (out_channels,):
                    shown = "non-numeric" if bias is None else f"shape {bias.shape}"
                    raise FileFormatError(f"{where}: bias '{_shown(bias_name)}' must be {out_channels} numbers "
                                          f"(one per output channel), got {shown}")
            aliases = tuple(dict.fromkeys(n for n in (weight_name, node.input[1]) if n != name))
            layers.append(StoredLayer(name=name, weight=entry, bias=bias, layout="torch",
                                      layout_source="ONNX ConvTranspose", options=options,
                                      aliases=aliases, kind="ConvTranspose"))
        if not layers:
            raise FileFormatError(_no_layer_message(path, other_ranks, not_stored))
        return layers


def _no_layer_message(path, other_ranks, not_stored):
    """Why a model with ConvTranspose nodes has no layer convt3d can use."""
    reasons = []
    if other_ranks:
        name, dims, weight, shape = other_ranks[0]
        more = f" (and {len(other_ranks) - 1} more of other ranks)" if len(other_ranks) > 1 else ""
        reasons.append(f"this is a 3-D tool; node '{_shown(name)}' is a {dims}-D ConvTranspose (weight "
                       f"'{_shown(weight)}' of shape {shape}, a 3-D layer has a 5-D weight){more}")
    if not_stored:
        reasons.append("; ".join(not_stored[:5]) + (" ..." if len(not_stored) > 5 else ""))
    return f"{path} has no usable 3-D ConvTranspose layer: " + "; ".join(reasons)


FORMAT = OnnxFormat()
