"""PyTorch checkpoints (``.pt``, ``.pth``, ``.ckpt``), read without PyTorch and without running their code.

The format
----------
``torch.save`` (PyTorch >= 1.6) writes a zip archive::

    <archive>/data.pkl        the saved object, pickled (protocol 2 by default)
    <archive>/data/<key>      one member per storage: the raw bytes of its elements
    <archive>/byteorder       "little" or "big" (absent in old files: little)
    <archive>/version, .format_version, .storage_alignment, ...

Inside ``data.pkl`` a tensor is a call of ``torch._utils._rebuild_tensor_v2(storage,
offset, size, stride, requires_grad, hooks[, metadata])`` whose storage is a
*persistent id* ``("storage", torch.FloatStorage, "<key>", "cpu", numel)``.

How it is read
--------------
``data.pkl`` is unpickled by :class:`_Unpickler`, a :class:`pickle.Unpickler`
whose ``find_class`` never imports anything: it answers every global name from
the tables below with an object of this module, in the spirit of
``torch.load(weights_only=True)`` (``torch/_weights_only_unpickler.py``) but
stricter, since not even PyTorch's own functions are called. Tensors become lazy
records (storage key, dtype, offset, size, stride); no tensor data is read while
unpickling. Every record of the state dict is then checked against its storage
member (it exists, holds exactly ``numel * itemsize`` bytes, and the strided view
fits in it) before :meth:`PyTorchFormat.load_tensor` allocates anything.

Globals the unpickler answers (everything else: see below)

==============================================  ==================================================
``torch._utils._rebuild_tensor_v2``              every tensor since PyTorch 0.4 -> lazy record
``torch._utils._rebuild_tensor``                 tensors of older files -> lazy record
``torch._utils._rebuild_tensor_v3``              tensors whose dtype has no storage class (uint16)
``torch._utils._rebuild_parameter``              ``nn.Parameter``: the tensor it wraps
``torch._utils._rebuild_parameter_with_state``   ``nn.Parameter`` with Python attributes: the tensor
``torch._tensor._rebuild_from_type_v2``          ``nn.Buffer`` and other Tensor types: the tensor
                                                 when the type is Tensor/Parameter/Buffer
``torch.<X>Storage``, ``torch.cuda.<X>Storage``,  storage types of persistent ids: their dtype
``torch.storage.UntypedStorage``
``torch.<dtype>`` (``torch.float32``, ...)        dtypes (``_rebuild_tensor_v3``)
``torch.Tensor``, ``torch.nn.parameter.*``        the types ``_rebuild_from_type_v2`` names
``torch.Size``                                    a tuple of ints
``torch.device``                                  its description, as a string
``collections.OrderedDict``                       every state dict (its ``_metadata`` is dropped)
``collections.Counter``, ``defaultdict``          plain dicts (optimizer and trainer states)
``builtins.set``, ``frozenset``                   protocol-2 sets (``_non_persistent_buffers_set``)
``builtins.bytearray``, ``builtins.complex``      as ``torch.load(weights_only=True)`` allows;
                                                 ``bytearray`` from bytes only, never from a size
``_codecs.encode``                                how protocol 2 stores ``bytes``; latin-1 only
``torch._utils._rebuild_*`` (other)               quantized, sparse, nested, meta, wrapper-subclass
                                                 tensors: recorded as unsupported, never built
==============================================  ==================================================

A global whose module is one that runs code or reaches the system (``os``,
``posix``, ``nt``, ``sys``, ``subprocess``, ``builtins`` beyond the data types,
``importlib``, ``runpy``, ``pickle``, ``marshal``, ``ctypes``, ``socket``,
``shutil``, ``operator``, ...) is refused with a :class:`FileFormatError` naming
it: no checkpoint needs one, and a file that names ``posix.system`` is an attack
whether or not we would have called it. Any other global (``argparse.Namespace``
and numpy scalars in hyper-parameters, ``pathlib.PosixPath``, Lightning's
``AttributeDict``, the classes of a whole pickled ``nn.Module``) becomes an
inert placeholder: a fresh class of this module, never the named one, whose
construction ignores its arguments and whose state is kept as plain data.
Placeholders cannot become tensors (only the rebuild functions above make tensor
records), so they are safe in the non-tensor parts of a checkpoint; the state of
a whole pickled ``nn.Module`` is walked like ``module.state_dict()``. Everything
the file can reach is sealed (no function objects, classes whose attributes
cannot be set), so a ``BUILD`` opcode cannot alter this module's code either.
Before unpickling, ``pickletools`` scans the stream so that a length or memo
index larger than the file is refused instead of allocated.

Which tensors are the weights (the state dict)
----------------------------------------------
1. If the saved object is a mapping and one of :data:`STATE_DICT_KEYS`
   (``state_dict``, ``model_state_dict``, ``model``, ``net``, ``ema``, ...),
   taken in that order, holds a state dict (a mapping with tensors among its
   values, a pickled ``nn.Module``, or such a checkpoint nested once more), those
   tensors, named by their keys. Optimizer states (``optimizer_states``,
   ``optimizer``) are never in that list, so their ``exp_avg`` tensors are not
   mistaken for layers.
2. Else, if it is a mapping holding tensors directly (``torch.save(model.state_dict())``,
   a MONAI bundle's ``models/model.pt``): those tensors, named by their keys.
3. Else, if it is a pickled ``nn.Module``: the tensors ``module.state_dict()``
   would give (parameters and persistent buffers), under the same names.
4. Else every tensor anywhere, named by its dotted path (``0.weight``, ``layers.2.bias``).

Names are the state-dict keys as saved (``module.up.weight`` from DataParallel,
``model.decoder.up1.weight`` from Lightning); ``--weights FILE:LAYER`` may omit a
``module.`` prefix. bfloat16 tensors are returned as float32 (exact: the bits
shifted left by 16); ``Entry.attrs["stored_dtype"]`` says so.
"""

from __future__ import annotations

import _compat_pickle
import io
import math
import os
import pickle
import pickletools
import re
import zipfile
from typing import NamedTuple

import numpy as np

from ..errors import FileFormatError
from .base import WeightsFormat
from .records import Entry
from .safety import check_memory, human_bytes, reading, require_file

LABEL = "a PyTorch checkpoint"

#: Keys of a checkpoint dict that may hold the model's state dict, in the order they are tried.
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model_state", "model", "net", "network",
                   "module", "model_ema", "ema", "ema_state_dict", "state", "weights", "params",
                   "net_g", "generator", "netG")

# Element types: torch name -> (itemsize, NumPy code to read the stored bytes with, or None).
# bfloat16 is read as raw uint16 and widened to float32; bool is read as bytes and compared to 0.
_DTYPES = {
    "float16": (2, "f2"), "float32": (4, "f4"), "float64": (8, "f8"), "bfloat16": (2, "u2"),
    "int8": (1, "i1"), "int16": (2, "i2"), "int32": (4, "i4"), "int64": (8, "i8"),
    "uint8": (1, "u1"), "uint16": (2, "u2"), "uint32": (4, "u4"), "uint64": (8, "u8"),
    "bool": (1, "u1"),
    "complex32": (4, None), "complex64": (8, None), "complex128": (16, None),
    "qint8": (1, None), "quint8": (1, None), "qint32": (4, None), "quint4x2": (1, None),
    "quint2x4": (1, None), "float8_e4m3fn": (1, None), "float8_e5m2": (1, None),
    "float8_e4m3fnuz": (1, None), "float8_e5m2fnuz": (1, None), "float8_e8m0fnu": (1, None),
    "float4_e2m1fn_x2": (1, None), "bits8": (1, None), "bits16": (2, None), "bits1x8": (1, None),
    "bits2x4": (1, None), "bits4x2": (1, None),
}
# Short names PyTorch also accepts for some dtypes.
_DTYPE_ALIASES = {"float": "float32", "double": "float64", "half": "float16", "long": "int64",
                  "int": "int32", "short": "int16", "cfloat": "complex64", "cdouble": "complex128",
                  "chalf": "complex32"}
_STORAGE_DTYPES = {
    "DoubleStorage": "float64", "FloatStorage": "float32", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8", "BoolStorage": "bool",
    "ComplexDoubleStorage": "complex128", "ComplexFloatStorage": "complex64",
    "QInt8Storage": "qint8", "QInt32Storage": "qint32", "QUInt8Storage": "quint8",
    "QUInt4x2Storage": "quint4x2", "QUInt2x4Storage": "quint2x4",
    "UntypedStorage": "uint8",
}
_MAX_RANK = 32

# Modules whose globals only serve to run code or reach the system: a checkpoint naming
# one is refused outright (see the module docstring). Submodules are included.
_REFUSED_MODULES = frozenset({
    "os", "posix", "nt", "sys", "subprocess", "builtins", "importlib", "runpy", "shutil",
    "socket", "pickle", "_pickle", "marshal", "ctypes", "_ctypes", "code", "codeop", "pty",
    "webbrowser", "operator", "_operator", "types", "io", "_io", "tempfile", "multiprocessing",
    "threading", "_thread", "signal", "asyncio", "pdb", "bdb", "timeit", "platform", "glob",
    "zipimport", "pkgutil", "site", "inspect", "gc", "ssl", "http", "urllib", "ftplib",
    "smtplib", "telnetlib", "xmlrpc", "select", "selectors", "mmap", "resource", "fcntl",
    "ptyprocess", "pexpect", "commands", "popen2", "nturl2path", "_posixsubprocess",
    "_winapi", "msvcrt", "winreg", "cProfile", "profile", "trace", "doctest", "unittest",
    "venv", "ensurepip", "distutils", "setuptools", "pip", "torch.hub", "torch.jit", "torch.package",
    "torch.utils.cpp_extension", "numpy.f2py", "numpy.testing",
})
# Builtins that are plain data types: inert placeholders like any unknown class.
_DATA_BUILTINS = frozenset({"object", "int", "float", "str", "bytes", "bool", "list", "tuple",
                            "dict", "type", "slice", "range", "NoneType", "Ellipsis",
                            "NotImplemented"})


# --------------------------------------------------------------------------- what unpickling makes

class _DType(NamedTuple):
    """A torch dtype or storage type named in the pickle (immutable: BUILD cannot change it)."""

    name: str

    @property
    def itemsize(self):
        return _DTYPES[self.name][0]

    @property
    def supported(self):
        return _DTYPES[self.name][1] is not None


class _TensorType(NamedTuple):
    """``torch.Tensor``, ``nn.Parameter`` or ``nn.Buffer``, as ``_rebuild_from_type_v2`` names them."""

    name: str


class _Storage(NamedTuple):
    """A persistent id ``("storage", type, key, location, numel)``: where a storage's bytes are."""

    key: str
    dtype: _DType
    numel: int


class _Tensor(NamedTuple):
    """A tensor as ``_rebuild_tensor*`` describes it; no data is read until it is loaded."""

    storage: _Storage
    dtype: _DType
    offset: int
    size: tuple
    stride: tuple
    negate: bool


class _Unsupported(NamedTuple):
    """A tensor convt3d does not read (quantized, sparse, a tensor subclass...): why."""

    reason: str


class _Sealed(type):
    """Metaclass of every class the file can reach: a pickle's BUILD cannot set its attributes."""

    def __setattr__(cls, name, value):
        raise AttributeError(f"{cls.__name__} is read-only")

    def __delattr__(cls, name):
        raise AttributeError(f"{cls.__name__} is read-only")


class _Opaque(metaclass=_Sealed):
    """Stands in for an object of a class convt3d does not import (see the module docstring).

    Constructed from anything, it ignores its arguments and keeps the data the
    pickle gives it (``BUILD`` state, items, appended values) as plain data, so
    that the state of a pickled ``nn.Module`` can be walked for its tensors.
    """

    __slots__ = ("mapping", "sequence", "state")
    global_name = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        object.__setattr__(obj, "state", None)
        object.__setattr__(obj, "mapping", {})
        object.__setattr__(obj, "sequence", [])
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setattr__(self, name, value):
        raise AttributeError("read-only")

    def __setstate__(self, state):
        object.__setattr__(self, "state", state)

    def __setitem__(self, key, value):          # SETITEM(S) into a dict subclass
        if isinstance(key, (str, int)):
            self.mapping[key] = value

    def append(self, value):                    # APPEND(S) into a list subclass
        self.sequence.append(value)

    def extend(self, values):
        self.sequence.extend(values)

    def add(self, value):                       # ADDITEMS into a set subclass
        self.sequence.append(value)


class _Dict(dict, metaclass=_Sealed):
    """``OrderedDict``, ``Counter``, ``defaultdict``: a plain dict that ignores BUILD state.

    ``torch.save`` pickles a state dict's ``_metadata`` (module versions) as BUILD
    state; nothing here needs it, and dropping it means no attribute of a dict
    can be set from the file.
    """

    __slots__ = ()

    def __new__(cls, *args, **kwargs):
        return dict.__new__(cls)

    def __init__(self, *args, **kwargs):
        if args and isinstance(args[0], (dict, list, tuple)):
            dict.__init__(self, args[0])

    def __setstate__(self, state):
        pass


class _Call:
    """A function the file may call (an allowed global): immutable, no ``__dict__``."""

    __slots__ = ("fn", "name")

    def __init__(self, name, fn):
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "fn", fn)

    def __setattr__(self, name, value):
        raise AttributeError("read-only")

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return self.name


def _broken(what):
    return FileFormatError(f"data.pkl is damaged: {what}")


def _int(value, what, minimum=0):
    if type(value) is not int or value < minimum:
        raise _broken(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _ints(values, what):
    if type(values) not in (tuple, list):
        raise _broken(f"{what} must be a tuple of integers, got {type(values).__name__}")
    if len(values) > _MAX_RANK:
        raise _broken(f"{what} has {len(values)} dimensions; at most {_MAX_RANK} are read")
    return tuple(_int(v, what) for v in values)


def _tensor(storage, offset, size, stride, metadata=None, dtype=None):
    if not isinstance(storage, _Storage):
        raise _broken(f"a tensor's storage is a {type(storage).__name__}, not a storage")
    size, stride = _ints(size, "a tensor's size"), _ints(stride, "a tensor's stride")
    if len(size) != len(stride):
        raise _broken(f"a tensor has size {size} but stride {stride}")
    if dtype is None:
        dtype = storage.dtype
    elif not isinstance(dtype, _DType):
        raise _broken(f"a tensor's dtype is a {type(dtype).__name__}")
    negate = False
    if metadata:
        if not isinstance(metadata, dict):
            raise _broken("a tensor's metadata is not a dict")
        negate = bool(metadata.get("neg", False))
        if metadata.get("conj", False):
            return _Unsupported("a complex tensor with a lazy conjugate bit")
    return _Tensor(storage, dtype, _int(offset, "a storage offset"), size, stride, negate)


def _rebuild_tensor(storage, offset, size, stride):
    return _tensor(storage, offset, size, stride)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks, metadata=None):
    return _tensor(storage, offset, size, stride, metadata)


def _rebuild_tensor_v3(storage, offset, size, stride, requires_grad, hooks, dtype, metadata=None):
    return _tensor(storage, offset, size, stride, metadata, dtype)


def _rebuild_parameter(data, requires_grad, hooks, state=None):
    return data


def _rebuild_from_type_v2(func, new_type, args, state):
    if not (isinstance(func, _Call) and func.name in _TENSOR_REBUILDERS):
        raise _broken(f"_rebuild_from_type_v2 calls {func!r}, not a tensor rebuild function")
    if not isinstance(args, tuple):
        raise _broken("_rebuild_from_type_v2 arguments are not a tuple")
    result = func(*args)
    if isinstance(new_type, _TensorType):
        return result
    name = getattr(new_type, "global_name", type(new_type).__name__)
    return _Unsupported(f"a tensor of subclass {name}")


def _unsupported_rebuild(kind):
    def rebuild(*args):
        return _Unsupported(kind)
    return rebuild


def _size(values=()):
    return _ints(values, "torch.Size")


def _device(*args):
    return ":".join(str(a) for a in args if isinstance(a, (str, int)))


def _encode(text, encoding="utf-8"):
    # Protocol 2 writes bytes as _codecs.encode(str, "latin1"); no other codec is looked up.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise _broken(f"_codecs.encode with {encoding!r}; only latin1 (bytes) is read")
    return text.encode("latin-1")


def _set(items=()):
    if not isinstance(items, (list, tuple)):
        raise _broken("a set built from something other than a list")
    return set(items)


def _frozenset(items=()):
    if not isinstance(items, (list, tuple)):
        raise _broken("a frozenset built from something other than a list")
    return frozenset(items)


def _bytearray(data=b"", encoding=None):
    # bytearray(n) would allocate n bytes; only bytes or latin-1 text are accepted.
    if isinstance(data, (bytes, bytearray)):
        return bytearray(data)
    if isinstance(data, str) and encoding in ("latin1", "latin-1"):
        return bytearray(data, "latin-1")
    raise _broken("bytearray built from something other than bytes")


def _complex(real=0.0, imag=0.0):
    if not all(type(v) in (int, float) for v in (real, imag)):
        raise _broken("complex built from something other than numbers")
    return complex(real, imag)


_TENSOR_REBUILDERS = {
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_tensor_v3": _rebuild_tensor_v3,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}
_UNSUPPORTED_REBUILDERS = {
    "_rebuild_qtensor": "a quantized tensor",
    "_rebuild_sparse_tensor": "a sparse tensor",
    "_rebuild_sparse_csr_tensor": "a sparse tensor",
    "_rebuild_nested_tensor": "a nested tensor",
    "_rebuild_meta_tensor_no_storage": "a meta tensor (no data)",
    "_rebuild_wrapper_subclass": "a tensor subclass",
    "_rebuild_device_tensor_from_numpy": "a tensor saved from a NumPy array of another device",
    "_rebuild_device_tensor_from_cpu_tensor": "a tensor saved from another device",
    "_rebuild_xla_tensor": "an XLA tensor",
    "_rebuild_mps_tensor": "an MPS tensor",
}


def _allowed_globals():
    table = {name: _Call(name, fn) for name, fn in _TENSOR_REBUILDERS.items()}
    table["torch._tensor._rebuild_from_type_v2"] = _Call("torch._tensor._rebuild_from_type_v2",
                                                         _rebuild_from_type_v2)
    for short, kind in _UNSUPPORTED_REBUILDERS.items():
        table[f"torch._utils.{short}"] = _Call(f"torch._utils.{short}", _unsupported_rebuild(kind))
    for name in ("torch.Tensor", "torch.nn.parameter.Parameter", "torch.nn.parameter.Buffer",
                 "torch.nn.Parameter", "torch.nn.Buffer"):
        table[name] = _TensorType(name)
    table.update({
        "torch.Size": _Call("torch.Size", _size),
        "torch.device": _Call("torch.device", _device),
        "collections.OrderedDict": _Dict,
        "collections.Counter": _Dict,
        "collections.defaultdict": _Dict,
        "builtins.set": _Call("builtins.set", _set),
        "builtins.frozenset": _Call("builtins.frozenset", _frozenset),
        "builtins.bytearray": _Call("builtins.bytearray", _bytearray),
        "builtins.complex": _Call("builtins.complex", _complex),
        "_codecs.encode": _Call("_codecs.encode", _encode),
    })
    for storage, dtype in _STORAGE_DTYPES.items():
        for module in ("torch", "torch.cuda", "torch.storage"):
            table[f"{module}.{storage}"] = _DType(dtype)
    for name in _DTYPES:
        table[f"torch.{name}"] = _DType(name)
    for alias, name in _DTYPE_ALIASES.items():
        table[f"torch.{alias}"] = _DType(name)
    return table


_ALLOWED = _allowed_globals()


def _refused_module(module):
    parts = module.split(".")
    return any(".".join(parts[:i]) in _REFUSED_MODULES for i in range(1, len(parts) + 1))


class _Unpickler(pickle.Unpickler):
    """Unpickles ``data.pkl`` without importing or calling anything named in it."""

    def __init__(self, data, path):
        super().__init__(io.BytesIO(data), encoding="utf-8")
        self.path = path
        self.storages = {}
        self.placeholders = {}

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:      # Python 2 names of protocol <= 2
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        if full in _ALLOWED:
            return _ALLOWED[full]
        if (module == "builtins" and name in _DATA_BUILTINS) or full == "types.SimpleNamespace":
            return self._placeholder(full)
        if _refused_module(module):
            raise FileFormatError(
                f"refusing to load {full} from {self.path}: only tensors, containers and numbers are "
                f"read (like torch.load(weights_only=True)), and {full} can run code or reach the "
                f"system; nothing from the file was run")
        if module.startswith("torch._utils") and name.startswith("_rebuild"):
            return _Call(full, _unsupported_rebuild(f"a tensor rebuilt by {full}"))
        return self._placeholder(full)

    def _placeholder(self, full):
        if full not in self.placeholders:
            self.placeholders[full] = _Sealed("Opaque", (_Opaque,), {"__slots__": (), "global_name": full})
        return self.placeholders[full]

    def persistent_load(self, pid):
        if type(pid) is not tuple or len(pid) != 5:
            raise _broken(f"persistent id {pid!r:.80} is not a storage")
        kind, storage_type, key, _location, numel = pid
        if isinstance(kind, bytes):
            kind = kind.decode("ascii", "replace")
        if isinstance(key, bytes):
            key = key.decode("ascii", "replace")
        if kind != "storage" or not isinstance(storage_type, _DType) or type(key) is not str:
            raise _broken(f"persistent id {pid!r:.80} is not a storage")
        storage = _Storage(key, storage_type, _int(numel, "a storage size"))
        known = self.storages.setdefault(key, storage)
        if known != storage:
            raise _broken(f"storage data/{key} is declared twice, as {known.numel} {known.dtype.name} "
                          f"and as {storage.numel} {storage.dtype.name}")
        return storage


def _prescan(data):
    """Walk the opcodes first: a length or memo index larger than the stream is refused, not allocated.

    The C unpickler allocates a counted bytes/str before reading it and grows its
    memo table to any index a PUT names; :mod:`pickletools` reads arguments from
    the stream itself and fails on a short one.
    """
    limit = len(data)
    try:
        for op, arg, _pos in pickletools.genops(data):
            if op.name in ("PUT", "BINPUT", "LONG_BINPUT") and isinstance(arg, int) and arg > limit:
                raise _broken(f"memo index {arg} is larger than the pickle ({limit} bytes)")
    except FileFormatError:
        raise
    except Exception as exc:  # ValueError and friends from a malformed stream
        raise _broken(" ".join(str(exc).split()) or type(exc).__name__) from exc


# --------------------------------------------------------------------------- finding the state dict

def _is_tensorish(value):
    return isinstance(value, (_Tensor, _Unsupported))


def _mapping_items(obj):
    """(key, value) pairs of a dict or of a dict-like placeholder; ``None`` for anything else."""
    if isinstance(obj, dict):
        return list(dict.items(obj))
    if isinstance(obj, _Opaque) and obj.mapping and not _module_state(obj):
        return list(obj.mapping.items())
    return None


def _module_state(obj):
    """The ``__dict__`` of a pickled ``nn.Module`` placeholder, else ``None``."""
    if not isinstance(obj, _Opaque):
        return None
    state = obj.state
    if type(state) is tuple and len(state) == 2:
        state = state[0]
    if isinstance(state, dict) and isinstance(state.get("_parameters"), dict):
        return state
    return None


def _module_tensors(obj, prefix, out, seen, depth=0):
    """``module.state_dict()`` of a pickled module: parameters, persistent buffers, children."""
    state = _module_state(obj)
    if state is None or id(obj) in seen or depth > 200:
        return
    seen.add(id(obj))
    skip = state.get("_non_persistent_buffers_set")
    skip = skip if isinstance(skip, (set, frozenset)) else set()
    for part in ("_parameters", "_buffers"):
        table = state.get(part)
        for name, value in (dict.items(table) if isinstance(table, dict) else ()):
            if _is_tensorish(value) and not (part == "_buffers" and name in skip):
                out[f"{prefix}{name}"] = value
    children = state.get("_modules")
    for name, child in (dict.items(children) if isinstance(children, dict) else ()):
        _module_tensors(child, f"{prefix}{name}.", out, seen, depth + 1)


def _direct_tensors(obj):
    items = _mapping_items(obj)
    if items is None:
        return None
    found = {str(k): v for k, v in items if isinstance(k, (str, int)) and _is_tensorish(v)}
    return found or None


def _state_dict_in(obj, depth=0):
    """The state dict ``obj`` is or holds under a well-known key (rules 1-3), with where it was."""
    items = _mapping_items(obj)
    if items is not None and depth < 3:
        table = {k: v for k, v in items if isinstance(k, str)}
        for key in STATE_DICT_KEYS:
            if key in table:
                found = _state_dict_in(table[key], depth + 1)
                if found is not None:
                    return found[0], f"[{key!r}]" + found[1]
    direct = _direct_tensors(obj)
    if direct is not None:
        return direct, ""
    if _module_state(obj) is not None:
        tensors = {}
        _module_tensors(obj, "", tensors, set())
        return tensors, f" (a pickled {type(obj).global_name}, read as its state_dict())"
    return None


def _all_tensors(root):
    """Rule 4: every tensor reachable from ``root``, named by its dotted path; each container once."""
    out, seen, stack = {}, set(), [("", root, 0)]
    while stack:
        prefix, obj, depth = stack.pop()
        if _is_tensorish(obj):
            out.setdefault(prefix or "tensor", obj)
            continue
        if id(obj) in seen or depth > 200:
            continue
        if isinstance(obj, (dict, list, tuple, _Opaque)):
            seen.add(id(obj))
        if isinstance(obj, dict):
            children = [(str(k), v) for k, v in dict.items(obj) if isinstance(k, (str, int))]
        elif isinstance(obj, (list, tuple)):
            children = [(str(i), v) for i, v in enumerate(obj)]
        elif isinstance(obj, _Opaque):
            module = {}
            _module_tensors(obj, "", module, set())
            children = list(module.items()) or list(obj.mapping.items())
            if not children and isinstance(obj.state, (dict, tuple, list)):
                stack.append((prefix, obj.state, depth + 1))
            children = [(str(k), v) for k, v in children]
        else:
            continue
        for key, value in reversed(children):
            stack.append((f"{prefix}.{key}" if prefix else key, value, depth + 1))
    return out


def find_state_dict(root):
    """The tensors that are the model's weights (see the module docstring), and where they were.

    Returns
    -------
    tensors : dict
        Name -> lazy tensor record (or the reason it cannot be read).
    where : str
        ``"checkpoint['state_dict']"``, ``"the saved mapping"``, ... for reports.
    """
    found = _state_dict_in(root)
    if found is not None:
        tensors, where = found
        if where.startswith("["):
            return tensors, "checkpoint" + where
        return tensors, "the saved object" + where
    return _all_tensors(root), "every tensor of the saved object, by path"


# --------------------------------------------------------------------------- the archive

_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def _not_a_zip(path, head):
    """The error for a file ``zipfile`` cannot open: legacy, TorchScript-free, truncated, other."""
    if b"\x8a\x0a" + _LEGACY_MAGIC in head[:40]:
        return FileFormatError(
            f"{path} is a PyTorch checkpoint in the legacy format (saved by PyTorch < 1.6 or with "
            f"_use_new_zipfile_serialization=False); convt3d reads the zip format only. Convert it "
            f"in PyTorch: torch.save(torch.load({path!r}, weights_only=True), 'new.pt')")
    if head[257:262] == b"ustar":
        return FileFormatError(
            f"{path} is a PyTorch checkpoint in the tar format of PyTorch < 0.4; convt3d reads the "
            f"zip format only. Convert it in PyTorch: torch.save(torch.load({path!r}), 'new.pt')")
    if head[:4] == b"PK\x03\x04":
        return FileFormatError(f"{path} is a truncated or damaged zip archive (a PyTorch checkpoint "
                               f"cut short?); its zip directory cannot be read")
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100_000_000:
        return FileFormatError(f"{path} looks like a safetensors file, not a PyTorch checkpoint; "
                               f"rename it to end in .safetensors")
    return FileFormatError(f"{path} is not a PyTorch checkpoint: it is neither a zip archive "
                           f"(torch.save since PyTorch 1.6) nor a legacy pickle checkpoint")


def _archive_prefix(path, names):
    """The folder every record sits in (``archive``, or the file stem for PyTorch < 1.11)."""
    if any(re.fullmatch(r"[^/]+/constants\.pkl", n) for n in names) or \
            any(re.match(r"[^/]+/code/", n) for n in names):
        raise FileFormatError(
            f"{path} is a TorchScript archive (torch.jit.save), which holds code; convt3d reads "
            f"state dicts only. In PyTorch: torch.save(torch.jit.load({path!r}).state_dict(), 'weights.pt')")
    pickles = [n for n in names if re.fullmatch(r"[^/]+/data\.pkl", n)]
    if not pickles:
        raise FileFormatError(f"{path} is a zip archive without data.pkl, so not a checkpoint written "
                              f"by torch.save (a torch.export .pt2 or another zip?)")
    if len(pickles) > 1:
        raise FileFormatError(f"{path} holds several checkpoints ({', '.join(pickles[:4])}); "
                              f"torch.save writes one")
    return pickles[0][: -len("/data.pkl")]


class _Checkpoint(NamedTuple):
    entries: list
    unsupported: dict
    ignored: tuple
    where: str


def _entry(path, name, record, prefix, infos, byteorder, file_size):
    """Check a tensor record against its storage member; its :class:`Entry`, or why it is skipped."""
    where = f"{path}:{name}"
    if isinstance(record, _Unsupported):
        return record.reason
    dtype, storage = record.dtype, record.storage
    if not dtype.supported:
        return f"element type {dtype.name}"
    if dtype.name == "bool" and record.negate:
        return "a bool tensor with a negation bit"
    member = f"{prefix}/data/{storage.key}"
    info = infos.get(member)
    if info is None:
        raise FileFormatError(f"{where} refers to storage data/{storage.key}, which the archive does "
                              f"not hold; the file is incomplete or damaged")
    storage_bytes = storage.numel * storage.dtype.itemsize
    if info.file_size != storage_bytes:
        raise FileFormatError(
            f"{where}: storage data/{storage.key} should hold {storage.numel} {storage.dtype.name} "
            f"values ({human_bytes(storage_bytes)}) but holds {info.file_size} bytes; the file is "
            f"damaged")
    if info.header_offset + 30 + len(info.filename.encode()) + info.compress_size > file_size:
        raise FileFormatError(f"{where}: storage data/{storage.key} extends past the end of the "
                              f"file ({file_size} bytes); the file is truncated")
    if storage_bytes % dtype.itemsize:
        raise FileFormatError(f"{where}: storage data/{storage.key} ({storage_bytes} bytes) is not "
                              f"a whole number of {dtype.name} values")
    capacity = storage_bytes // dtype.itemsize
    shape = record.size
    if math.prod(shape) > 0:
        last = record.offset + sum(s * (n - 1) for s, n in zip(record.stride, shape))
        if last >= capacity:
            raise FileFormatError(
                f"{where}: shape {shape} with strides {record.stride} from element {record.offset} "
                f"reaches element {last + 1} of a storage that holds {capacity}; the file is damaged")
    elif any(n >= 2 ** 63 for n in shape) or math.prod(n for n in shape if n) >= 2 ** 63:
        # An empty tensor fits any storage, but (0, 2**70) is no shape NumPy (or PyTorch) can make.
        raise FileFormatError(f"{where}: shape {shape!r:.100} has a dimension or an element count of 2**63 or "
                              f"more; the file is damaged")
    code = _DTYPES[dtype.name][1]
    stored = np.dtype(code).newbyteorder("<" if byteorder == "little" else ">")
    out_dtype = {"bfloat16": np.dtype(np.float32), "bool": np.dtype(bool)}.get(dtype.name, stored)
    attrs = {"member": member, "storage_bytes": storage_bytes, "offset": record.offset,
             "stride": record.stride, "stored_dtype": dtype.name, "read_as": stored.str,
             "negate": record.negate}
    if dtype.name == "bfloat16":
        attrs["converted"] = "bfloat16 -> float32 (exact)"
    return Entry(name=name, shape=tuple(shape), dtype=out_dtype, needs_copy=True, attrs=attrs)


def _read_checkpoint(path):
    require_file(path)
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(512)
    with reading(path, LABEL):
        try:
            archive = zipfile.ZipFile(path)
        except zipfile.BadZipFile:
            raise _not_a_zip(path, head) from None
        with archive:
            names = archive.namelist()
            prefix = _archive_prefix(path, names)
            infos = {info.filename: info for info in archive.infolist()}
            byteorder = "little"
            if f"{prefix}/byteorder" in infos:
                if infos[f"{prefix}/byteorder"].file_size > 16:
                    raise FileFormatError(f"{path}: the byteorder record is not 'little' or 'big'")
                mark = archive.read(f"{prefix}/byteorder").strip()
                if mark not in (b"little", b"big"):
                    raise FileFormatError(f"{path}: the byteorder record says {mark[:16]!r}, not "
                                          f"'little' or 'big'")
                byteorder = mark.decode()
            pkl = infos[f"{prefix}/data.pkl"]
            check_memory(pkl.file_size, f"{path}:data.pkl")
            data = archive.read(pkl)
        unpickler = _Unpickler(data, path)
        try:
            _prescan(data)
            root = unpickler.load()
        except MemoryError:
            raise
        except FileFormatError as exc:
            if str(exc).startswith("refusing"):
                raise
            raise FileFormatError(f"cannot read {path} as {LABEL}: {exc}") from exc
        except Exception as exc:  # any failure of a malformed stream
            raise FileFormatError(f"cannot read {path} as {LABEL}: data.pkl cannot be unpickled "
                                  f"({' '.join(str(exc).split()) or type(exc).__name__})") from exc
        tensors, where = find_state_dict(root)
        entries, unsupported = [], {}
        for name, record in tensors.items():
            made = _entry(path, name, record, prefix, infos, byteorder, size)
            if isinstance(made, Entry):
                entries.append(made)
            else:
                unsupported[name] = made
        if not entries and unsupported:
            listing = ", ".join(f"{n} ({why})" for n, why in list(unsupported.items())[:10])
            raise FileFormatError(f"{path} holds no tensor convt3d can read: {listing}; convt3d reads "
                                  f"float16/32/64, bfloat16, integer and bool tensors")
        return _Checkpoint(entries, unsupported, tuple(sorted(unpickler.placeholders)), where)


def _load(path, entry):
    attrs = entry.attrs
    stored = np.dtype(attrs["read_as"])
    shape, stride, offset = entry.shape, attrs["stride"], attrs["offset"]
    where = f"{path}:{entry.name}"
    if entry.size == 0:
        return np.zeros(shape, dtype=entry.dtype)
    first = offset * stored.itemsize
    last = (offset + sum(s * (n - 1) for s, n in zip(stride, shape)) + 1) * stored.itemsize
    check_memory((last - first) + 2 * entry.nbytes, where)
    with reading(path, LABEL), zipfile.ZipFile(path) as archive:
        info = archive.getinfo(attrs["member"])
        if info.file_size != attrs["storage_bytes"]:
            raise FileFormatError(f"{path} changed while it was read (storage {attrs['member']})")
        with archive.open(info) as member:
            member.seek(first)
            buffer = member.read(last - first)
    if len(buffer) != last - first:
        raise FileFormatError(f"{where}: the storage ends early; the file is truncated")
    flat = np.frombuffer(buffer, dtype=stored)
    view = np.lib.stride_tricks.as_strided(flat, shape=shape,
                                           strides=tuple(s * stored.itemsize for s in stride),
                                           writeable=False)
    values = np.array(view, dtype=stored.newbyteorder("="), order="C")
    del view, flat, buffer
    if attrs["stored_dtype"] == "bfloat16":
        values = (values.astype(np.uint32) << 16).view(np.float32)
    elif attrs["stored_dtype"] == "bool":
        values = values != 0
    if attrs["negate"]:
        values = np.negative(values)
    return values


_CACHE = {}


def _stat_key(path):
    st = os.stat(path)
    return (os.path.realpath(path), st.st_size, st.st_mtime_ns, st.st_ino)


class PyTorchFormat(WeightsFormat):
    """``torch.save`` checkpoints: state dicts, Lightning ``.ckpt`` files, MONAI bundle models."""

    name = "pytorch"
    label = "PyTorch"
    tensor_layout_source = "PyTorch checkpoint"
    volume_hint = "pass it to --weights (FILE.pt:LAYER names a layer such as decoder.up1)"

    def _checkpoint(self, path):
        require_file(path)
        key = _stat_key(path)
        if key not in _CACHE:
            checkpoint = _read_checkpoint(path)
            _CACHE.clear()             # one file at a time: a command reads one checkpoint
            _CACHE[key] = checkpoint
        return _CACHE[key]

    def tensors(self, path):
        """Every readable tensor of the checkpoint's state dict (see the module docstring).

        Parameters
        ----------
        path : str

        Returns
        -------
        list of Entry
            ``dtype`` is what :meth:`load_tensor` returns (float32 for bfloat16);
            ``attrs`` hold the storage member, offset and strides.

        Raises
        ------
        FileFormatError
            Not a zip checkpoint, a refused global, a damaged pickle, a tensor that
            does not fit its storage.
        """
        return list(self._checkpoint(path).entries)

    def load_tensor(self, path, entry):
        """The values of ``entry``, C-ordered, native byte order (bfloat16 widened to float32)."""
        return _load(path, entry)

    def describe(self, path, key):
        report = super().describe(path, key)
        checkpoint = self._checkpoint(path)
        report["state_dict"] = checkpoint.where
        if checkpoint.unsupported:
            report["unsupported_tensors"] = dict(checkpoint.unsupported)
        if checkpoint.ignored:
            report["objects_not_loaded"] = list(checkpoint.ignored)
        return report


FORMAT = PyTorchFormat()
