"""Keras models and weight files: ``.keras`` archives and Keras ``.h5`` files, through h5py.

What is read
------------
``.keras`` (Keras 3, and tf.keras 2.13+ "Keras v3" saving)
    A zip archive with ``config.json`` (the model: layers with ``class_name`` and
    ``config``), ``metadata.json`` and ``model.weights.h5``. Inside the HDF5 file a
    layer's variables are ``<path>/vars/0`` (kernel), ``<path>/vars/1`` (bias), where
    ``<path>`` is NOT the layer's name: Keras names each child of a model
    ``layers/<snake_case(class)>``, numbered per class in the order of the model's
    layers (``layers/conv3d_transpose``, ``layers/conv3d_transpose_1``, ...), and a
    nested model's layers live under its own path
    (``layers/sequential/layers/conv3d_transpose``). Recent Keras 3 files (3.15
    does) put the layer name on the ``vars`` group as attribute ``name``; it is
    checked when present, and wins over the numbering. Files written by tf.keras 2.13 may use
    ``_layer_checkpoint_dependencies`` where later ones use ``layers``.
Legacy ``.h5`` (Keras 2 / tf.keras ``model.save("m.h5")``; Keras 3 ``model.save("m.h5")``)
    Root attributes ``keras_version``, ``backend``, ``model_config`` (JSON) and a
    group ``model_weights`` whose attribute ``layer_names`` lists the layers; each
    layer's group lists its variables in attribute ``weight_names``
    (``up/kernel:0`` in Keras 2, ``up/kernel`` in Keras 3; a nested model's group
    holds all of its layers' variables, ``inner/up/kernel``). Long attributes are
    split into ``layer_names0``, ``layer_names1``, ...
Legacy weights-only ``.h5`` (Keras 2 ``save_weights("w.h5")``)
    The same layer groups at the root, no model: every 5-D dataset named
    ``kernel:0`` (or ``kernel``) is taken as a Conv3DTranspose kernel with unknown
    settings.
Keras 3 weights-only ``.weights.h5`` (``save_weights``)
    The ``layers/.../vars`` tree without a model: the 5-D ``vars/0`` of every group
    named ``conv3d_transpose[_N]`` is a Conv3DTranspose kernel with unknown settings.

Conv3DTranspose settings
------------------------
The kernel is ``(kD, kH, kW, filters, Cin)`` for both data formats (layout
``"keras"``). The layer's output length per axis is Keras's
``deconv_output_length`` ``O``; TensorFlow and JAX (and Keras 3's torch backend
since it crops asymmetrically) take it from the full transposed-convolution
result ``full = (n-1)*s + d*(k-1) + 1`` by cropping ``b = max(full - O, 0) // 2``
at the start and ``e = full - O - b`` at the end (``e < 0``: bias-only planes
appended). ``full - O`` does not depend on ``n`` (see :func:`keras_crops`), so
the settings are fixed per layer.
"""

from __future__ import annotations

import io as _io
import json
import os
import re
import struct
import zipfile

import numpy as np

from ..errors import FileFormatError, KeyNotFoundError
from ..geometry import split_end_crop
from .base import WeightsFormat
from .dtypes import is_numeric, native
from .hdf5 import refuse_external
from .records import Entry, StoredLayer
from .safety import check_memory, human_bytes, reading, require_file

LABEL = "Keras"
#: What Keras calls the layer (``Convolution3DTranspose`` is an alias of the same class).
KINDS = ("Conv3DTranspose", "Convolution3DTranspose")
_CONFIG = "config.json"
_WEIGHTS = "model.weights.h5"
# config.json of even a very large model is a few MiB; past this it is not a Keras model.
_MAX_JSON_BYTES = 64 << 20
# Nested models deeper than this are a hostile file, not a model.
_MAX_DEPTH = 64
_KERNEL_NAMES = ("kernel:0", "kernel")
_BIAS_NAMES = ("bias:0", "bias")
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")  # zip local file header, 30 bytes


def _h5py():
    import h5py

    return h5py


# --------------------------------------------------------------------------- layer settings

def keras_crops(kernel, stride, dilation, padding, output_padding):
    """Begin and end crops Keras applies to the full transposed-convolution output, one axis.

    Parameters
    ----------
    kernel, stride, dilation : int
    padding : {"valid", "same"}
    output_padding : int or None

    Returns
    -------
    begin, end : int
        ``output = full - begin - end`` with ``full = (n-1)*stride + dilation*(kernel-1) + 1``;
        ``end`` may be negative (the output runs past ``full``).

    Notes
    -----
    Keras's output length (``deconv_output_length``; Keras 3
    ``compute_conv_transpose_output_shape``) with ``k = dilation*(kernel-1) + 1``:

    - valid, no output_padding: ``(n-1)*s + max(k, s)``
    - same, no output_padding: ``n*s``
    - with output_padding ``op``: ``(n-1)*s + k - 2*pad + op``, ``pad`` = 0 (valid)
      or ``k // 2`` (same), i.e. ``(n-1)*s + k % 2 + op`` for same.

    TensorFlow computes the layer as the gradient of a forward convolution of
    that output with the same padding rule, whose SAME padding puts
    ``(full - O) // 2`` before the data (VALID: none); Keras's JAX backend pads
    the dilated input by ``k - 1 - begin`` on the left, which gives the same
    ``begin`` (``max((k - s) // 2, 0)`` for same without output_padding).
    """
    k = dilation * (kernel - 1) + 1
    if output_padding is None:
        tail = max(k, stride) if padding == "valid" else stride
    else:
        tail = k + output_padding if padding == "valid" else k % 2 + output_padding
    excess = k - tail  # full - O, whatever n is
    begin = max(excess, 0) // 2 if padding == "same" else 0
    return begin, excess - begin


def _triple(value, key, name, where, *, minimum):
    """An int or 1/3 ints from a layer config -> 3 ints >= minimum, else FileFormatError."""
    items = value if isinstance(value, (list, tuple)) else [value]
    if len(items) == 1:
        items = list(items) * 3
    ok = len(items) == 3 and all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                                 for v in items)
    if not ok:
        raise FileFormatError(f"{where}: layer '{name}' has {key}={value!r}; expected 1 or 3 "
                              f"integers >= {minimum}")
    return [int(v) for v in items]


def layer_settings(config, where):
    """What a Conv3DTranspose ``config`` means for the engine.

    Parameters
    ----------
    config : dict
        The layer's ``config`` from the model JSON.
    where : str
        The file, for messages.

    Returns
    -------
    dict
        ``filters``, ``kernel_size``, ``use_bias`` and ``options`` (``stride``,
        ``dilation``, ``padding`` (3 ints when begin and end crops agree, else 6),
        ``output_padding``).

    Raises
    ------
    FileFormatError
        A setting is missing, malformed, or cannot be expressed with the engine's parameters.
    """
    name = config.get("name", "?")
    padding = config.get("padding", "valid")
    if not isinstance(padding, str) or padding.lower() not in ("valid", "same"):
        raise FileFormatError(f"{where}: layer '{name}' has padding={padding!r}; convt3d "
                              f"understands Conv3DTranspose padding 'valid' and 'same'")
    padding = padding.lower()
    fmt = config.get("data_format", "channels_last")
    if fmt not in (None, "channels_last", "channels_first"):
        raise FileFormatError(f"{where}: layer '{name}' has data_format={fmt!r}")
    filters = config.get("filters")
    if not isinstance(filters, int) or isinstance(filters, bool) or filters < 1:
        raise FileFormatError(f"{where}: layer '{name}' has filters={filters!r}; expected a "
                              f"positive integer")
    kernel = _triple(config.get("kernel_size"), "kernel_size", name, where, minimum=1)
    stride = _triple(config.get("strides", 1), "strides", name, where, minimum=1)
    # tf.keras 2 drops dilation_rate from the config (its layer ignored it): 1.
    dilation = _triple(config.get("dilation_rate", 1), "dilation_rate", name, where, minimum=1)
    groups = config.get("groups", 1)
    if groups != 1:
        raise FileFormatError(f"{where}: layer '{name}' has groups={groups!r}; Conv3DTranspose "
                              f"has no groups")
    raw_op = config.get("output_padding")
    output_padding = (None,) * 3 if raw_op is None else _triple(
        raw_op, "output_padding", name, where, minimum=0)
    begins, ends, extra = [], [], []
    for axis in range(3):
        begin, end = keras_crops(kernel[axis], stride[axis], dilation[axis], padding,
                                 output_padding[axis])
        pad_end, op = split_end_crop(end)
        if op >= max(stride[axis], dilation[axis]):
            raise FileFormatError(
                f"{where}: layer '{name}' cannot be computed by convt3d: axis {'DHW'[axis]} "
                f"needs {op} extra output planes, but output_padding must be smaller than the "
                f"stride ({stride[axis]}) or the dilation ({dilation[axis]})")
        begins.append(begin)
        ends.append(pad_end)
        extra.append(op)
    crops = begins if begins == ends else begins + ends
    use_bias = config.get("use_bias", True)
    if not isinstance(use_bias, bool):
        raise FileFormatError(f"{where}: layer '{name}' has use_bias={use_bias!r}")
    return {
        "filters": filters, "kernel_size": kernel, "use_bias": use_bias,
        "options": {"stride": stride, "padding": crops, "output_padding": extra,
                    "dilation": dilation},
    }


# --------------------------------------------------------------------------- model configs

def to_snake_case(name):
    """Keras's ``naming.to_snake_case``: how a class names its weights group."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _layer_name(layer):
    config = layer.get("config") if isinstance(layer.get("config"), dict) else {}
    name = config.get("name", layer.get("name"))
    return name if isinstance(name, str) else None


def _children(obj):
    """The layer list of a model config (Sequential, Functional, tf.keras Model), else None.

    Keras up to 2.2 wrote a Sequential's config as the bare list of its layers.
    """
    config = obj.get("config")
    if isinstance(config, dict) and isinstance(config.get("layers"), list):
        return config["layers"]
    if isinstance(config, list) and obj.get("class_name") == "Sequential":
        return config
    return None


def walk_config(model, where):
    """Every layer of a model config, nested models included, in the order Keras saves them.

    Yields
    ------
    layer : dict
        ``{"class_name": ..., "config": {...}}``.
    chain : tuple of str
        Names of the enclosing models below the top one.
    h5_path : str
        Where a ``.keras`` file keeps the layer's variables (``layers/conv3d_transpose_1``).
    """
    def walk(layers, chain, prefix, depth):
        if depth > _MAX_DEPTH:
            raise FileFormatError(f"{where}: models nested more than {_MAX_DEPTH} deep")
        used = {}
        for layer in layers:
            if not isinstance(layer, dict) or not isinstance(layer.get("class_name"), str):
                raise FileFormatError(f"{where}: a layer of the model config is not "
                                      f"{{'class_name': ..., 'config': ...}}")
            snake = to_snake_case(layer["class_name"])
            # Keras numbers the children of a model per class, in their order (saving_lib).
            count = used.get(snake)
            used[snake] = 0 if count is None else count + 1
            unique = snake if count is None else f"{snake}_{count + 1}"
            path = f"{prefix}layers/{unique}"
            yield layer, chain, path
            inner = _children(layer)
            if inner is not None:
                yield from walk(inner, chain + (_layer_name(layer) or unique,), path + "/",
                                depth + 1)

    if not isinstance(model, dict):
        raise FileFormatError(f"{where}: the model config is not a JSON object")
    layers = _children(model)
    if layers is not None:
        yield from walk(layers, (), "", 0)
    elif model.get("class_name") in KINDS:
        yield model, (), ""  # a single layer saved on its own: variables at the root


def _no_layer_error(where, seen):
    if not seen:
        return FileFormatError(f"{where}: the model config lists no layers (a subclassed model "
                               f"keeps them in code); convt3d needs a Conv3DTranspose layer")
    classes = ", ".join(f"{name} ({cls})" for cls, name in seen[:30])
    more = f" and {len(seen) - 30} more" if len(seen) > 30 else ""
    return FileFormatError(f"{where} has no Conv3DTranspose layer; its layers are: {classes}{more}")


# --------------------------------------------------------------------------- opening files

class _Window(_io.RawIOBase):
    """A read-only, seekable view of ``size`` bytes at ``offset`` of an open file.

    h5py reads a ``.keras`` file's stored (uncompressed) ``model.weights.h5`` through
    it: random access without loading the member, which zipfile's own reader
    (Python < 3.12) emulates by re-reading from the start on every backward seek.
    """

    def __init__(self, handle, offset, size):
        super().__init__()
        self.handle, self.offset, self.size, self.pos = handle, offset, size, 0

    def readable(self):
        return True

    def seekable(self):
        return True

    def tell(self):
        return self.pos

    def seek(self, pos, whence=0):
        base = (0, self.pos, self.size)[whence]
        self.pos = max(0, base + pos)
        return self.pos

    def readinto(self, buffer):
        view = memoryview(buffer).cast("B")
        count = max(0, min(len(view), self.size - self.pos))
        if count == 0:
            return 0
        self.handle.seek(self.offset + self.pos)
        got = self.handle.readinto(view[:count])
        self.pos += got
        return got


def _member(archive, name, where):
    """The ZipInfo of ``name``, else FileFormatError listing the members."""
    try:
        return archive.getinfo(name)
    except KeyError:
        names = ", ".join(archive.namelist()[:20]) or "nothing"
        raise FileFormatError(f"{where} is not a Keras model archive: it has no {name} "
                              f"(it holds {names})") from None


def _read_member(archive, info, where, limit):
    """The bytes of a member, read with a bound (a lying header cannot make it allocate more)."""
    if info.file_size > limit:
        raise FileFormatError(f"{where}: {info.filename} declares {human_bytes(info.file_size)}, "
                              f"more than {human_bytes(limit)}")
    check_memory(info.file_size, f"{where}:{info.filename}")
    with archive.open(info) as handle:
        data = handle.read(info.file_size + 1)
    if len(data) != info.file_size:
        raise FileFormatError(f"{where}: {info.filename} holds {len(data)} bytes, not the "
                              f"{info.file_size} its header declares")
    return data


def _json(data, what, where):
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as exc:
        raise FileFormatError(f"{where}: {what} is not valid JSON ({' '.join(str(exc).split())})") \
            from None


class _Opened:
    """An open Keras file: its model config (or ``None``) and its weights as an h5py File."""

    def __init__(self, path):
        self.path = path
        self.handles = []
        self.config = None
        self.h5 = None
        self.archive = path.lower().endswith(".keras")

    def __enter__(self):
        try:
            if self.archive:
                self._open_archive()
            else:
                self.h5 = _h5py().File(self.path, "r")
                self.handles.append(self.h5)
                self.config = self._h5_config()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        while self.handles:
            try:
                self.handles.pop().close()
            except Exception:  # noqa: BLE001, S110 - closing a broken file must not hide the real error
                pass

    def _open_archive(self):
        raw = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        self.handles.append(raw)
        archive = zipfile.ZipFile(raw)
        self.handles.append(archive)
        info = _member(archive, _CONFIG, self.path)
        self.config = _json(_read_member(archive, info, self.path, _MAX_JSON_BYTES),
                            _CONFIG, self.path)
        if _WEIGHTS not in archive.namelist() and "model.weights.npz" in archive.namelist():
            raise FileFormatError(f"{self.path} keeps its weights in model.weights.npz; convt3d "
                                  f"reads .keras files saved with the default HDF5 weights")
        info = _member(archive, _WEIGHTS, self.path)
        if info.flag_bits & 0x1:
            raise FileFormatError(f"{self.path}: {_WEIGHTS} is encrypted")
        if info.compress_type == zipfile.ZIP_STORED:
            stream = self._stored(raw, info)
        else:
            # Compressed by hand after Keras wrote it: h5py needs random access, so inflate it.
            stream = _io.BytesIO(_read_member(archive, info, self.path, 1 << 62))
        self.h5 = _h5py().File(stream, "r")
        self.handles.append(self.h5)

    def _stored(self, raw, info):
        """A window on an uncompressed member, after checking it lies inside the file."""
        raw.seek(info.header_offset)
        header = raw.read(_LOCAL_HEADER.size)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise FileFormatError(f"{self.path}: the zip entry of {_WEIGHTS} is damaged")
        fields = _LOCAL_HEADER.unpack(header)
        start = info.header_offset + _LOCAL_HEADER.size + fields[-2] + fields[-1]
        size = os.fstat(raw.fileno()).st_size
        if start + info.file_size > size:
            raise FileFormatError(f"{self.path} is truncated: {_WEIGHTS} needs "
                                  f"{human_bytes(info.file_size)} from byte {start} but the file "
                                  f"has {size} bytes")
        return _io.BufferedReader(_Window(raw, start, info.file_size), 1 << 16)

    def _h5_config(self):
        """The ``model_config`` attribute of a legacy ``.h5`` model, ``None`` for a weights file."""
        text = self.h5.attrs.get("model_config")
        if text is None:
            return None
        if isinstance(text, np.ndarray) and text.shape == ():
            text = text[()]
        if isinstance(text, (bytes, np.bytes_)):
            text = bytes(text).decode("utf-8")
        if not isinstance(text, str):
            raise FileFormatError(f"{self.path}: attribute model_config is not text")
        return _json(text, "attribute model_config", self.path)


# --------------------------------------------------------------------------- HDF5 helpers

def _text_list(attrs, name):
    """A list-of-strings attribute, joined from ``name0``, ``name1``, ... when Keras split it."""
    if name in attrs:
        values = list(np.asarray(attrs[name]).reshape(-1))
    else:
        values, index = [], 0
        while f"{name}{index}" in attrs:
            values.extend(np.asarray(attrs[f"{name}{index}"]).reshape(-1))
            index += 1
    out = []
    for value in values:
        out.append(bytes(value).decode("utf-8") if isinstance(value, (bytes, np.bytes_))
                   else str(value))
    return out


def _is_bfloat16(dataset):
    """Keras stores bfloat16 variables as 2-byte opaque data with attribute ``dtype``."""
    if dataset.dtype.kind != "V" or dataset.dtype.itemsize != 2:
        return False
    tag = dataset.attrs.get("dtype")
    if isinstance(tag, (bytes, np.bytes_)):
        tag = bytes(tag).decode("ascii", "replace")
    return tag == "bfloat16"


def _entry(name, dataset):
    """An Entry for a numeric dataset (bfloat16 is read as float32), else None."""
    if _is_bfloat16(dataset):
        return Entry(name=name, shape=tuple(int(n) for n in dataset.shape),
                     dtype=np.dtype("float32"), attrs={"bfloat16": True})
    dtype = dataset.dtype
    if not is_numeric(dtype):
        return None
    return Entry(name=name, shape=tuple(int(n) for n in dataset.shape), dtype=dtype,
                 needs_copy=native(dtype) != dtype, attrs={})


def _datasets(h5):
    """``(name, dataset)`` of every dataset, in HDF5 order (names without a leading ``/``)."""
    h5py = _h5py()
    found = []

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset):
            found.append((name, obj))

    h5.visititems(visit)
    return found


def _get(group, path):
    """The object at ``path`` under ``group`` reached through hard links only, else None.

    ``Group.get`` follows external links (HDF5 then opens the named file itself: a FIFO
    there blocks forever) and soft links (which may pass through one); Keras writes neither.
    """
    h5py = _h5py()
    current = group.file if path.startswith("/") else group
    for part in (p for p in path.split("/") if p):
        if not isinstance(current, h5py.Group) or not isinstance(current.get(part, getlink=True), h5py.HardLink):
            return None
        current = current[part]
    return current


def _dataset(h5, name):
    h5py = _h5py()
    obj = _get(h5, name)
    return obj if isinstance(obj, h5py.Dataset) else None


def _join(*parts):
    return "/".join(p.strip("/") for p in parts if p and p.strip("/"))


# --------------------------------------------------------------------------- finding layers

class _Finder:
    """Builds the StoredLayers of an open Keras file."""

    def __init__(self, opened):
        self.opened = opened
        self.path = opened.path
        self.h5 = opened.h5
        self.entries = {}
        for name, dataset in _datasets(self.h5):
            entry = _entry(name, dataset)
            if entry is not None:
                self.entries[name] = entry

    # ---- with a model config

    def from_config(self):
        found, seen = [], []
        for layer, chain, h5_path in walk_config(self.opened.config, self.path):
            name = _layer_name(layer) or h5_path
            seen.append((layer["class_name"], name))
            if layer["class_name"] not in KINDS:
                continue
            config = layer.get("config")
            if not isinstance(config, dict):
                raise FileFormatError(f"{self.path}: layer '{name}' has no config")
            settings = layer_settings(config, self.path)
            if self.opened.archive:
                kernel, bias = self._archive_variables(name, h5_path, settings["use_bias"])
            else:
                kernel, bias = self._legacy_variables(name, chain, settings["use_bias"])
            self._check_shapes(name, settings, kernel, bias)
            aliases = tuple(a for a in (kernel.name, "/".join(chain + (name,))) if a != name)
            found.append(StoredLayer(
                name=name, weight=kernel, bias=bias, layout="keras",
                layout_source="Keras layer config", options=settings["options"],
                aliases=aliases, kind="Conv3DTranspose"))
        if not found:
            raise _no_layer_error(self.path, seen)
        return found

    def _missing(self, name, what):
        return FileFormatError(f"{self.path}: the weights of Conv3DTranspose layer '{name}' are "
                               f"missing ({what})")

    def _archive_variables(self, name, h5_path, use_bias):
        """``vars/0`` and ``vars/1`` of the layer's group in ``model.weights.h5``."""
        h5py = _h5py()
        candidates = [h5_path]
        legacy = "/".join("_layer_checkpoint_dependencies" if part == "layers" else part
                          for part in h5_path.split("/"))
        if legacy != h5_path:
            candidates.append(legacy)  # tf.keras 2.13
        group = None
        for candidate in candidates:
            obj = _get(self.h5, _join(candidate, "vars"))
            if isinstance(obj, h5py.Group):
                group = obj
                break
        tagged = self._tagged_vars().get(name)
        if group is not None:
            tag = group.attrs.get("name")
            if isinstance(tag, (bytes, np.bytes_)):
                tag = bytes(tag).decode("utf-8", "replace")
            if tag is not None and tag != name:
                group = None  # Keras's numbering did not match; trust the name tag
        if group is None:
            if tagged is None:
                raise self._missing(name, f"no group {candidates[0]}/vars")
            group = tagged
        prefix = group.name.lstrip("/")
        kernel = self.entries.get(_join(prefix, "0"))
        if kernel is None:
            raise self._missing(name, f"no numeric dataset {_join(prefix, '0')}")
        bias = None
        if use_bias:
            bias = self.entries.get(_join(prefix, "1"))
            if bias is None:
                raise self._missing(name, f"use_bias is set but there is no {_join(prefix, '1')}")
        return kernel, bias

    def _tagged_vars(self):
        """``vars`` groups by their ``name`` attribute (recent Keras 3), names that occur once."""
        if not hasattr(self, "_tags"):
            h5py = _h5py()
            counts, groups = {}, {}

            def visit(name, obj):
                if isinstance(obj, h5py.Group) and name.rsplit("/", 1)[-1] == "vars":
                    tag = obj.attrs.get("name")
                    if isinstance(tag, (bytes, np.bytes_)):
                        tag = bytes(tag).decode("utf-8", "replace")
                    if isinstance(tag, str):
                        counts[tag] = counts.get(tag, 0) + 1
                        groups[tag] = obj

            self.h5.visititems(visit)
            self._tags = {tag: groups[tag] for tag, n in counts.items() if n == 1}
        return self._tags

    def _weights_group(self):
        group = _get(self.h5, "model_weights")
        return group if isinstance(group, _h5py().Group) else self.h5

    def _legacy_variables(self, name, chain, use_bias):
        """Kernel and bias of a layer of a legacy ``.h5`` model, from ``weight_names``."""
        h5py = _h5py()
        top = chain[0] if chain else name
        root = self._weights_group()
        group = _get(root, top)
        if not isinstance(group, h5py.Group):
            raise self._missing(name, f"no group {_join(root.name, top)}")
        names = _text_list(group.attrs, "weight_names")

        def pick(stems):
            hits = []
            for weight in names:
                parts = weight.split("/")
                if parts[-1] not in stems:
                    continue
                if chain and (len(parts) < 2 or parts[-2] != name):
                    continue  # another layer of the nested model
                hits.append(weight)
            if len(hits) > 1 and chain:
                # The same layer name in two models nested in `top`: match the whole chain.
                tail = list(chain[1:]) + [name]
                hits = [h for h in hits if h.split("/")[-1 - len(tail):-1] == tail]
            return hits

        result = []
        for stems, wanted in ((_KERNEL_NAMES, True), (_BIAS_NAMES, use_bias)):
            if not wanted:
                result.append(None)
                continue
            hits = pick(stems)
            if len(hits) != 1:
                listed = ", ".join(names) or "none"
                raise self._missing(name, f"{len(hits)} matching {stems[1]} variables among the "
                                          f"weight_names of {group.name}: {listed}")
            key = _join(group.name, hits[0])
            entry = self.entries.get(key)
            if entry is None:
                raise self._missing(name, f"no numeric dataset {key}")
            result.append(entry)
        return result[0], result[1]

    def _check_shapes(self, name, settings, kernel, bias):
        expected = tuple(settings["kernel_size"]) + (settings["filters"],)
        if kernel.ndim != 5 or tuple(kernel.shape[:4]) != expected:
            raise FileFormatError(
                f"{self.path}: Conv3DTranspose layer '{name}' has kernel {kernel.name} of shape "
                f"{tuple(kernel.shape)}, but its config (kernel_size {settings['kernel_size']}, "
                f"filters {settings['filters']}) needs ({', '.join(map(str, expected))}, Cin)")
        if bias is not None and tuple(bias.shape) != (settings["filters"],):
            raise FileFormatError(
                f"{self.path}: Conv3DTranspose layer '{name}' has bias {bias.name} of shape "
                f"{tuple(bias.shape)}; its config has filters {settings['filters']}")

    # ---- without a model config

    def from_weights(self):
        """Layers of a weights-only file: ``kernel:0`` datasets, Keras 3 ``conv3d_transpose`` groups."""
        found = []
        for name, entry in self.entries.items():
            parts = name.split("/")
            if entry.ndim != 5:
                continue
            if parts[-1] in _KERNEL_NAMES:
                bias_name = _BIAS_NAMES[_KERNEL_NAMES.index(parts[-1])]
                bias = self.entries.get("/".join(parts[:-1] + [bias_name]))
                layer = parts[-2] if len(parts) > 1 else name
                source = f"dataset name {parts[-1]}"
            elif (len(parts) >= 3 and parts[-1] == "0" and parts[-2] == "vars"
                  and re.fullmatch(r"conv3d_transpose(_\d+)?", parts[-3])):
                bias = self.entries.get("/".join(parts[:-1] + ["1"]))
                tag = _get(self.h5, "/".join(parts[:-1])).attrs.get("name")
                if isinstance(tag, (bytes, np.bytes_)):
                    tag = bytes(tag).decode("utf-8", "replace")
                layer = tag if isinstance(tag, str) and tag else "/".join(parts[:-2])
                source = f"Keras weights path {'/'.join(parts[:-2])}"
            else:
                continue
            if bias is not None and (bias.ndim != 1 or bias.shape[0] != entry.shape[3]):
                bias = None
            group = "/".join(parts[:-2] if parts[-1] == "0" else parts[:-1])
            aliases = tuple(dict.fromkeys(a for a in (name, group) if a != layer))
            found.append(StoredLayer(name=layer, weight=entry, bias=bias, layout="keras",
                                     layout_source=source, options={}, aliases=aliases,
                                     kind="Conv3DTranspose"))
        return found


# --------------------------------------------------------------------------- the format

def is_keras_h5(path):
    """Whether an HDF5 file was written by Keras (a legacy model or weights file, or ``.weights.h5``).

    Cheap: opens the file and looks at the root attributes and the top groups
    only. Never raises; a file h5py cannot open is not a Keras file.
    """
    try:
        h5py = _h5py()
        with h5py.File(path, "r") as h5:
            attrs = h5.attrs
            if any(key in attrs for key in ("keras_version", "model_config", "layer_names",
                                            "layer_names0")):
                return True
            weights = _get(h5, "model_weights")
            if isinstance(weights, h5py.Group) and ("layer_names" in weights.attrs
                                                    or "layer_names0" in weights.attrs):
                return True
            for top in ("layers", "_layer_checkpoint_dependencies"):
                group = _get(h5, top)
                if isinstance(group, h5py.Group):
                    for child in (_get(group, key) for key in group):
                        if isinstance(child, h5py.Group) and ("vars" in child or "layers" in child):
                            return True
    except Exception:  # noqa: BLE001 - any failure means "not recognisably Keras"
        return False
    return False


class KerasFormat(WeightsFormat):
    """Keras ``.keras`` archives and Keras ``.h5`` files (see the module docstring)."""

    name = "keras"
    label = LABEL
    volume_hint = ("pass it to --weights FILE[:LAYER], LAYER the name of a Conv3DTranspose layer")

    def tensors(self, path):
        require_file(path)
        with reading(path, LABEL), _Opened(path) as opened:
            return list(_Finder(opened).entries.values())

    def layers(self, path):
        require_file(path)
        with reading(path, LABEL), _Opened(path) as opened:
            finder = _Finder(opened)
            if opened.config is not None:
                return finder.from_config()
            return finder.from_weights()

    def load_tensor(self, path, entry):
        require_file(path)
        where = f"{path}:{entry.name}"
        with reading(path, LABEL), _Opened(path) as opened:
            dataset = _dataset(opened.h5, entry.name)
            if dataset is None:
                raise KeyNotFoundError(f"{path} has no dataset '{entry.name}'")
            now = _entry(entry.name, dataset)
            if now is None or now.shape != tuple(entry.shape) or now.dtype != entry.dtype:
                raise FileFormatError(f"{where} changed while it was being read")
            refuse_external(dataset, where)
            if entry.attrs.get("bfloat16"):
                check_memory(entry.nbytes + entry.size * 2, where)
                bits = np.ascontiguousarray(dataset[()]).view("<u2")
                # bfloat16 is the top half of a float32: exact.
                return (bits.astype("<u4") << 16).view("<f4").astype(np.float32).reshape(entry.shape)
            check_memory(entry.nbytes * (2 if entry.needs_copy else 1), where)
            array = dataset[()]
            array = np.asarray(array, dtype=native(array.dtype), order="C")
            return array.reshape(entry.shape)


FORMAT = KerasFormat()
