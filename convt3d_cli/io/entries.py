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

from ..errors import FileFormatError, KeyNotFoundError
from ..geometry import LAYER_OPTIONS


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
        sizes = (1,) if name == "groups" else (1, 3)
        ok = (value.ndim <= 1 and value.size in sizes and value.dtype.kind in "iuf"
              and np.all(np.isfinite(value)) and np.all(value == np.round(value)))
        if not ok:
            expected = "an integer" if name == "groups" else "1 or 3 integers"
            raise FileFormatError(f"{where}: stored option '{name}' must be {expected}, "
                                  f"got {value.tolist()!r}")
        ints = [int(v) for v in value.reshape(-1)]
        options[name] = ints[0] if len(ints) == 1 else ints
    return options
