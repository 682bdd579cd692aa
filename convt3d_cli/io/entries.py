"""Which array of a file to use: ``PATH:KEY``, or the default when there is no key.

A file holding several arrays (npz members, HDF5 datasets) is a list of
:class:`~convt3d_cli.io.records.Entry`; the rules here pick the volume, the
weight or the bias among them, pair a weight with its own bias, and read the
layer options stored beside a weight (see ``docs/behaviour.md``, *Files, axes
and keys*).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import FileFormatError, KeyNotFoundError, ParameterError, ShapeError
from ..geometry import LAYER_OPTIONS
from .layouts import LAYOUTS, engine_shape
from .records import StoredLayer


def entry_source(path, entry):
    """``path:name`` of an entry, or just ``path`` for a single-array file."""
    return path if entry.name is None else f"{path}:{entry.name}"


@dataclass(frozen=True)
class Role:
    """What an array is picked for, and how a default is found without a key."""

    noun: str          # "volume", "weight", "bias"
    stem: str          # conventional name
    ranks: tuple       # ranks worth considering when a file holds several arrays
    skip_options_and_bias: bool = False

    def candidate(self, entry):
        if not entry.numeric or entry.ndim not in self.ranks:
            return False
        if self.skip_options_and_bias:
            base = basename(entry.name)
            if base in LAYER_OPTIONS or matches(entry.name, "bias"):
                return False
        return True


VOLUME = Role("volume", "volume", (3, 4, 5))
WEIGHT = Role("weight", "weight", (5, 6), skip_options_and_bias=True)
BIAS = Role("bias", "bias", (1, 5))


def bare(name):
    """Entry name without a leading ``/`` (HDF5 paths) and without ``.npy`` (npz members)."""
    name = name.lstrip("/")
    return name[:-4] if name.endswith(".npy") else name


def basename(name):
    return bare(name).rsplit("/", 1)[-1]


def matches(name, stem):
    """``weight``, ``conv.weight`` and ``/layer/weight`` all match stem ``weight``."""
    base = basename(name)
    return base == stem or base.endswith("." + stem)


def listing(entries, limit=20):
    """``a (3, 4, 5) float32, b (2,) int64`` -- what a file holds, for error messages."""
    if not entries:
        return "no arrays"
    labels = [entry.label() for entry in entries[:limit]]
    if len(entries) > limit:
        labels.append(f"... and {len(entries) - limit} more")
    return ", ".join(labels)


def find_entry(entries, key, path):
    """The entry named ``key``, else :class:`KeyNotFoundError` listing what is there."""
    wanted = bare(key)
    for entry in entries:
        if entry.name is not None and bare(entry.name) == wanted:
            return entry
    raise KeyNotFoundError(f"{path} has no array '{key}'; it holds: {listing(entries)}")


def by_name(candidates, stem):
    """The candidate called ``stem``, else the single one ending in ``.stem``/``/stem``, else None."""
    exact = [e for e in candidates if bare(e.name) == stem]
    if len(exact) == 1:
        return exact[0]
    tail = [e for e in candidates if matches(e.name, stem)]
    return tail[0] if len(tail) == 1 else None


def choose_entry(entries, key, role, path):
    """Pick the array to read (see the module docstring).

    With a key: that array. Without: the only array of the file; else, among
    the arrays that could serve ``role``, the only one, or the one with the
    conventional name (``volume``; ``weight`` or a single ``*.weight``).

    Raises
    ------
    KeyNotFoundError
        ``key`` is not in the file.
    FileFormatError
        No unambiguous default; the message lists what the file holds.
    """
    if key is not None:
        return find_entry(entries, key, path)
    if len(entries) == 1:
        return entries[0]
    candidates = [e for e in entries if role.candidate(e)]
    if len(candidates) == 1:
        return candidates[0]
    picked = by_name(candidates, role.stem)
    if picked is not None:
        return picked
    ranks = " or ".join(f"{r}-D" for r in role.ranks)
    if not candidates:
        raise FileFormatError(f"{path} holds no {ranks} numeric array to use as the {role.noun}; "
                              f"it holds: {listing(entries)}")
    raise FileFormatError(f"{path} holds several arrays and none is the obvious {role.noun} "
                          f"(named '{role.stem}'); choose one with {path}:KEY. "
                          f"It holds: {listing(entries)}")


def find_bias(entries, weight_name, path):
    """The bias stored beside a weight, or ``None`` when the file has none.

    A layer's weight (``conv.weight``, ``/layer/weight``) pairs with its
    sibling (``conv.bias``, ``/layer/bias``) or a plain ``bias``, never with
    another layer's bias. Any other weight takes ``bias`` or a single
    ``*.bias``; several unrelated biases are an error rather than a guess.
    """
    if weight_name is None:
        return None
    numeric = [e for e in entries if e.numeric and e.name != weight_name]
    name = bare(weight_name)
    if name.endswith("weight"):
        sibling = name[: -len("weight")] + "bias"
        for entry in numeric:
            if bare(entry.name) == sibling:
                return entry
        if name != "weight":
            plain = [e for e in numeric if bare(e.name) == "bias" and e.ndim in BIAS.ranks]
            return plain[0] if plain else None
    candidates = [e for e in numeric if e.ndim in BIAS.ranks]
    picked = by_name(candidates, "bias")
    if picked is not None:
        return picked
    if any(matches(e.name, "bias") for e in candidates):
        raise FileFormatError(
            f"{path} holds several biases and none belongs to '{weight_name}'; name one with "
            f"--bias PATH:KEY or use --no-bias. It holds: {listing(entries)}")
    return None




def parse_options(raw, where):
    """Layer options found in a file -> ints or lists of 3 ints.

    Parameters
    ----------
    raw : dict
        Option name -> stored value (array, scalar or list).
    where : str
        File (and key) for error messages.

    Raises
    ------
    FileFormatError
        A value is not 1 or 3 integers (``groups``: 1 integer).
    """
    options = {}
    for name in LAYER_OPTIONS:
        if name not in raw:
            continue
        value = np.asarray(raw[name])
        sizes = {"groups": (1,), "padding": (1, 3, 6)}.get(name, (1, 3))
        ok = (value.ndim <= 1 and value.size in sizes and value.dtype.kind in "iuf"
              and np.all(np.isfinite(value)) and np.all(value == np.round(value)))
        if not ok:
            expected = {"groups": "an integer", "padding": "1, 3 or 6 integers"}.get(name, "1 or 3 integers")
            raise FileFormatError(f"{where}: stored option '{name}' must be {expected}, "
                                  f"got {value.tolist()!r}")
        ints = [int(v) for v in value.reshape(-1)]
        options[name] = ints[0] if len(ints) == 1 else ints
    return options


# --------------------------------------------------------------------------- layers of weights files

_WEIGHT_RANKS = (5, 6)
# Wrappers that prefix every key of a saved module (DataParallel / DistributedDataParallel,
# torch.compile); LAYER may be given with or without them.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def layers_from_tensors(entries, layout_source=""):
    """One :class:`StoredLayer` per 5-D or 6-D numeric tensor of a plain tensor container.

    ``decoder.up1.weight`` becomes layer ``decoder.up1`` with bias
    ``decoder.up1.bias`` when that tensor is 1-D; any other name is its own layer name.
    ``layout_source`` says why the tensors are in PyTorch layout (a PyTorch checkpoint);
    empty when that is only assumed (safetensors may come from any framework).
    """
    by_name = {entry.name: entry for entry in entries}
    layers = []
    for entry in entries:
        if not entry.numeric or entry.ndim not in _WEIGHT_RANKS:
            continue
        name, bias = entry.name, None
        for sep in (".", "/"):
            if name.endswith(sep + "weight"):
                name = name[: -len("weight") - 1]
                bias = by_name.get(name + sep + "bias")
                break
        if bias is not None and (bias.ndim != 1 or not bias.numeric):
            bias = None
        layers.append(StoredLayer(name=name, weight=entry, bias=bias, aliases=(entry.name,),
                                  layout_source=layout_source))
    return layers


def shown(name):
    """A name from a file as messages print it: control characters escaped, so an error stays one line."""
    return name if name.isprintable() else name.encode("unicode_escape").decode("ascii")


def _unwrapped(name):
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _names(layer):
    names = {layer.name, *layer.aliases}
    return names | {_unwrapped(n) for n in names}


def layer_listing(layers, limit=20):
    """``decoder.up1 (16, 8, 2, 2, 2) float32, ...`` for error messages."""
    if not layers:
        return "no 5-D or 6-D weight"
    labels = [f"{shown(layer.name)} {tuple(layer.weight.shape)} {layer.weight.dtype.name}" for layer in layers[:limit]]
    if len(layers) > limit:
        labels.append(f"... and {len(layers) - limit} more")
    return ", ".join(labels)


def choose_layer(layers, key, path):
    """Pick the layer ``--weights PATH[:LAYER]`` names.

    With a key: the layer of that name, module path, tensor or initializer name
    (with or without a ``module.`` wrapper prefix). Without: the only layer.

    Raises
    ------
    KeyNotFoundError
        No layer answers to ``key``; the message lists the candidates.
    FileFormatError
        No key and not exactly one candidate, or a key that names several layers.
    """
    if key is None:
        if len(layers) == 1:
            return layers[0]
        if not layers:
            raise FileFormatError(f"{path} holds no 5-D or 6-D tensor that could be a "
                                  f"ConvTranspose3d weight")
        raise FileFormatError(f"{path} holds several layers that could be a ConvTranspose3d weight; "
                              f"choose one with {path}:LAYER. It holds: {layer_listing(layers)}")
    wanted = {key, _unwrapped(key)}
    found = [layer for layer in layers if wanted & _names(layer)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise FileFormatError(f"{path}: '{shown(key)}' names several layers ({layer_listing(found)}); "
                              f"give the full tensor name")
    raise KeyNotFoundError(f"{path} has no layer or tensor '{shown(key)}' that could be a ConvTranspose3d "
                           f"weight; it holds: {layer_listing(layers)}")


def layer_report(path, layer):
    """The ``convt3d info`` entry of one layer (JSON-ready apart from NumPy scalars)."""
    where = f"{path}:{layer.weight.name}"
    try:
        converted = list(engine_shape(layer.weight.shape, layer.layout, where))
    except (ParameterError, ShapeError) as exc:  # a listing shows odd tensors instead of failing
        converted = None
        note = str(exc)
    else:
        note = None
    report = {
        "name": layer.name,
        "kind": layer.kind or None,
        "weight": layer.weight.name,
        "stored_shape": list(layer.weight.shape),
        "dtype": layer.weight.dtype.name,
        "layout": layer.layout,
        "layout_axes": LAYOUTS.get(layer.layout),
        "layout_from": layer.layout_source or "assumed",
        "weight_shape": converted,
        "bias": layer.bias.name if layer.bias is not None else None,
        "bias_shape": list(layer.bias.shape) if layer.bias is not None else None,
        "settings": dict(layer.options),
    }
    if note:
        report["note"] = note
    return report
