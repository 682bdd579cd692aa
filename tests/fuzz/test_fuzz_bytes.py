"""Byte flips and truncations of valid .nii, .nii.gz, .npy, .npz and .h5 files, volumes and weights.

Every other damaged volume gets an ``info`` case; all the damaged files of a
format go through one ``batch`` run. Damaged weights go through ``shape --weights``
(headers only) and a few through ``run --weights``.
"""

from __future__ import annotations

import random

import pytest

from fuzzkit import Case, assert_promise, flip_bytes, truncations, write

FLIPS = 6
CUTS = 2
# Bytes before the data: damage there changes the meaning of everything after it.
HEADER_BYTES = {"n1.nii": 384, "n1.nii.gz": 40, "vol.npy": 128, "vol.npz": 200, "vol.h5": 2048,
                "w.npz": 200, "w.h5": 2048}


def _damaged(base, name, seed_tag):
    """``(new name, bytes, how)`` for every flip and truncation of base file ``name``."""
    data = base[name]
    suffix = name[name.index("."):]
    stem = name[:name.index(".")]
    rng = random.Random(f"{seed_tag}-{name}")
    out = []
    for number in range(FLIPS):
        damaged, how = flip_bytes(data, rng, header=HEADER_BYTES[name])
        out.append((f"{stem}_f{number:02d}{suffix}", damaged, f"{name} flipped {how}"))
    for cut in truncations(len(data), HEADER_BYTES[name], rng, CUTS):
        out.append((f"{stem}_t{cut:05d}{suffix}", data[:cut], f"{name} truncated to {cut} of {len(data)} bytes"))
    return out


@pytest.mark.parametrize("name", ["n1.nii", "n1.nii.gz", "vol.npy", "vol.npz", "vol.h5"])
def test_damaged_volumes(name, new_case, base):
    cases, files = [], _damaged(base, name, "volume")
    for number, (file, data, how) in enumerate(files):
        if number % 2:      # every damaged file goes through the batch; half also through info
            continue
        folder = new_case(f"info-{file}")
        write(folder, file, data)
        cases.append(Case(f"info {how}", ["info", file] + (["--json"] if number % 4 else []), folder, how=how))
    folder = new_case(f"batch-{name}")
    for file, data, _ in files:
        write(folder, file, data)
    out = "npy" if name.endswith((".nii", ".nii.gz")) else "nii"
    cases.append(Case(f"batch of {len(files)} damaged {name} files (--format {out})",
                      ["batch", *[f[0] for f in files], "--out-dir", "out", "--format", out, "--kernel", "linear",
                       "--stride", "2", "-q", "--json"], folder, output="out", expect={0, 1},
                      how="; ".join(f"{f}: {h}" for f, _, h in files)))
    assert_promise(cases)


@pytest.mark.parametrize("name", ["w.npz", "w.h5"])
def test_damaged_weights(name, new_case, base, put):
    cases, files = [], _damaged(base, name, "weights")
    for number, (file, data, how) in enumerate(files):
        folder = put(new_case(f"shape-{file}"), "vol.npy")
        write(folder, file, data)
        cases.append(Case(f"shape --weights {how}", ["shape", "vol.npy", "--weights", file, "--json"], folder,
                          how=how))
        if number % 4 == 0:
            folder = put(new_case(f"run-{file}"), "vol.npy")
            write(folder, file, data)
            cases.append(Case(f"run --weights {how}", ["run", "vol.npy", "out.npy", "--weights", file, "-q",
                                                        "--json"], folder, output="out.npy", how=how))
    assert_promise(cases)
