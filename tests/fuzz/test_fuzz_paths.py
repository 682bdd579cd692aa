"""Odd path kinds: FIFOs nobody writes to, devices, folders, dangling links, outputs that are inputs,
missing folders, odd names, and a full disk (a file-size limit: writes fail with EFBIG).

A FIFO or a device must never block: those cases have a short time limit and
no retry.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from conftest import npy_bytes
from fuzzkit import SHORT_TIMEOUT, Case, assert_promise, write

NEAREST = ["--kernel", "nearest", "--stride", "2"]
SUFFIXES = [".nii", ".nii.gz", ".npy", ".npz", ".h5"]


def _fifo(folder, name):
    os.mkfifo(folder / name)
    return name


def _short(label, args, folder, **kw):
    kw.setdefault("expect", {1})
    return Case(label, args, folder, timeout=SHORT_TIMEOUT, retry=False, **kw)


def test_fifo_without_writer(new_case, put):
    """A FIFO as input, weights, bias or output: refused at once (exit 1), never waited on; as a
    list file it is read without blocking."""
    cases = []
    for suffix in SUFFIXES:
        folder = new_case(f"fifo-run{suffix}")
        name = _fifo(folder, f"x{suffix}")
        cases.append(_short(f"run FIFO{suffix} as input", ["run", name, "out.npy", *NEAREST, "-q"], folder,
                            output="out.npy"))
        folder = new_case(f"fifo-info{suffix}")
        name = _fifo(folder, f"x{suffix}")
        cases.append(_short(f"info FIFO{suffix}", ["info", name], folder))
    folder = new_case("fifo-shape")
    cases.append(_short("shape FIFO.npy", ["shape", _fifo(folder, "x.npy"), *NEAREST], folder))
    for suffix in (".npz", ".npy", ".h5"):
        folder = put(new_case(f"fifo-weights{suffix}"), "vol.npy")
        name = _fifo(folder, f"w{suffix}")
        cases.append(_short(f"run --weights FIFO{suffix}", ["run", "vol.npy", "out.npy", "--weights", name, "-q"],
                            folder, output="out.npy"))
        folder = put(new_case(f"fifo-shape-weights{suffix}"), "vol.npy")
        name = _fifo(folder, f"w{suffix}")
        cases.append(_short(f"shape --weights FIFO{suffix}", ["shape", "vol.npy", "--weights", name], folder))
    folder = put(new_case("fifo-bias"), "vol.npy", "w.npy")
    cases.append(_short("run --bias FIFO.npy", ["run", "vol.npy", "out.npy", "--weights", "w.npy", "--bias",
                                                _fifo(folder, "b.npy"), "-q"], folder, output="out.npy"))
    folder = put(new_case("fifo-batch"), "vol.npy")
    cases.append(_short("batch with a FIFO among the inputs", ["batch", "vol.npy", _fifo(folder, "x.nii"), "--out-dir",
                                                               "out", *NEAREST, "-q", "--json"],
                        folder, output="out"))
    folder = put(new_case("fifo-batch-weights"), "vol.npy")
    cases.append(_short("batch --weights FIFO", ["batch", "vol.npy", "--out-dir", "out", "--weights",
                                                 _fifo(folder, "w.npz"), "-q", "--json"], folder, output="out"))
    folder = put(new_case("fifo-list"), "vol.npy")
    # A pipe is a supported list (``<(find ...)``): one nobody writes to is an empty list, at once.
    cases.append(_short("batch --from-list FIFO", ["batch", "--from-list", _fifo(folder, "list.txt"), "--out-dir",
                                                   "out", *NEAREST, "-q"], folder, expect={0}))
    folder = put(new_case("fifo-output"), "vol.npy")
    cases.append(_short("run to an existing FIFO output, no --overwrite",
                        ["run", "vol.npy", _fifo(folder, "out.npy"), *NEAREST, "-q"], folder))
    assert_promise(cases)


def test_devices_folders_and_links(new_case, put):
    cases = []
    for suffix in SUFFIXES:
        for device in ("/dev/zero", "/dev/null", "/dev/urandom"):
            if device == "/dev/urandom" and suffix not in (".npy", ".nii.gz"):
                continue
            tag = os.path.basename(device)
            folder = new_case(f"{tag}{suffix}")
            os.symlink(device, folder / f"x{suffix}")
            cases.append(_short(f"run x{suffix} -> {device}", ["run", f"x{suffix}", "out.npy", *NEAREST, "-q"],
                                folder, output="out.npy"))
            folder = new_case(f"info-{tag}{suffix}")
            os.symlink(device, folder / f"x{suffix}")
            cases.append(_short(f"info x{suffix} -> {device}", ["info", f"x{suffix}"], folder))
        folder = new_case(f"folder{suffix}")
        (folder / f"x{suffix}").mkdir()
        cases.append(Case(f"run a folder named x{suffix}", ["run", f"x{suffix}", "out.npy", *NEAREST, "-q"], folder,
                          output="out.npy", expect={1}))
        folder = new_case(f"dangling{suffix}")
        os.symlink("missing" + suffix, folder / f"gone{suffix}")
        cases.append(Case(f"run a dangling link gone{suffix}", ["run", f"gone{suffix}", "out.npy", *NEAREST, "-q"],
                          folder, output="out.npy", expect={1}))
    for suffix in (".npz", ".npy", ".h5"):
        folder = put(new_case(f"zero-weights{suffix}"), "vol.npy")
        os.symlink("/dev/zero", folder / f"w{suffix}")
        cases.append(_short(f"run --weights w{suffix} -> /dev/zero", ["run", "vol.npy", "out.npy", "--weights",
                                                                    f"w{suffix}", "-q"], folder, output="out.npy"))
        folder = put(new_case(f"dir-weights{suffix}"), "vol.npy")
        (folder / f"w{suffix}").mkdir()
        cases.append(Case(f"run --weights a folder w{suffix}", ["run", "vol.npy", "out.npy", "--weights", f"w{suffix}",
                                                               "-q"], folder, output="out.npy", expect={1}))
        folder = put(new_case(f"dangling-weights{suffix}"), "vol.npy")
        os.symlink("nothing", folder / f"w{suffix}")
        cases.append(Case(f"shape --weights dangling w{suffix}", ["shape", "vol.npy", "--weights", f"w{suffix}"],
                          folder, expect={1}))
    folder = new_case("devnull-input")
    cases.append(_short("run /dev/null", ["run", "/dev/null", "out.npy", *NEAREST, "-q"], folder, output="out.npy"))
    folder = new_case("devnull-info")
    cases.append(_short("info /dev/null", ["info", "/dev/null"], folder))
    folder = new_case("loop")
    os.symlink("loop.npy", folder / "loop.npy")
    cases.append(Case("run a symlink loop", ["run", "loop.npy", "out.npy", *NEAREST, "-q"], folder, output="out.npy",
                      expect={1}))
    assert_promise(cases)


def test_outputs(new_case, put, base):
    """Missing folders, outputs that are inputs however spelled, odd output names."""
    cases = []

    def add(label, args, files=("vol.npy",), output=None, expect=frozenset({1}), setup=None):
        folder = put(new_case(label), *files)
        if setup:
            setup(folder)
        if output is None and args[0] == "run":
            output = args[2]
        cases.append(Case(label, args, folder, output=output, expect=expect))

    add("output in a missing folder", ["run", "vol.npy", "missing/out.npy", *NEAREST, "-q"])
    add("output in a missing folder (nii.gz)", ["run", "vol.npy", "a/b/c/out.nii.gz", *NEAREST, "-q"])
    add("output is the input", ["run", "vol.npy", "vol.npy", *NEAREST, "-q"])
    add("output is the input, --overwrite", ["run", "vol.npy", "vol.npy", *NEAREST, "--overwrite", "-q"])
    add("output is ./input, --overwrite", ["run", "vol.npy", "./vol.npy", *NEAREST, "--overwrite", "-q"])
    add("output is sub/../input, --overwrite", ["run", "vol.npy", "sub/../vol.npy", *NEAREST, "--overwrite", "-q"],
        setup=lambda f: (f / "sub").mkdir())
    add("output is a symlink to the input, --overwrite", ["run", "vol.npy", "link.npy", *NEAREST, "--overwrite", "-q"],
        setup=lambda f: os.symlink("vol.npy", f / "link.npy"))
    add("output is a hard link to the input, --overwrite",
        ["run", "vol.npy", "hard.npy", *NEAREST, "--overwrite", "-q"], setup=lambda f: os.link(f / "vol.npy", f / "hard.npy"))
    add("output is the weights, --overwrite", ["run", "vol.npy", "w.npy", "--weights", "w.npy", "--overwrite", "-q"],
        files=("vol.npy", "w.npy"))
    add("output is the input HDF5 under another key", ["run", "vol.h5:/volume", "vol.h5:/up", *NEAREST, "--overwrite",
                                                       "-q"], files=("vol.h5",))
    add("output is an existing folder", ["run", "vol.npy", "out.npy", *NEAREST, "--overwrite", "-q"],
        setup=lambda f: (f / "out.npy").mkdir())
    add("output is a dangling link, no --overwrite", ["run", "vol.npy", "out.npy", *NEAREST, "-q"],
        setup=lambda f: os.symlink("nowhere.npy", f / "out.npy"))
    add("output is a dangling link, --overwrite", ["run", "vol.npy", "out.npy", *NEAREST, "--overwrite", "-q"],
        setup=lambda f: os.symlink("nowhere.npy", f / "out.npy"), expect={0, 1})
    add("output without a suffix", ["run", "vol.npy", "out", *NEAREST, "-q"])
    add("output named only .npy", ["run", "vol.npy", ".npy", *NEAREST, "-q"], expect={0, 1})
    add("output is .", ["run", "vol.npy", ".", *NEAREST, "-q"])
    add("output name of 250 characters", ["run", "vol.npy", "o" * 250 + ".npy", *NEAREST, "-q"], expect={0})
    add("output name of 300 characters", ["run", "vol.npy", "o" * 300 + ".npy", *NEAREST, "-q"])
    add("output path of 5000 characters", ["run", "vol.npy", "d/" * 2500 + "o.npy", *NEAREST, "-q"])
    add("empty input name", ["run", "", "out.npy", *NEAREST, "-q"])
    add("input named like an option", ["run", "-x.npy", "out.npy", *NEAREST, "-q"], files=("vol.npy=-x.npy",),
        expect={2})
    add("input named like an option after --", ["run", *NEAREST, "-q", "--", "-x.npy", "out.npy"],
        files=("vol.npy=-x.npy",), output="out.npy", expect={0})
    add("input file named weird.npy:odd.npy", ["run", "weird.npy:odd.npy", "out.npy", *NEAREST, "-q"],
        files=("vol.npy=weird.npy:odd.npy",), output="out.npy", expect={0})
    # Without a supported suffix of its own the format is unknown: refused, not guessed.
    add("input file named a.npy:b", ["run", "a.npy:b", "out.npy", *NEAREST, "-q"], files=("vol.npy=a.npy:b",),
        expect={1})
    add("corrupt input with a newline in its name", ["run", "bad\nname.npy", "out.npy", *NEAREST, "-q"],
        setup=lambda f: write(f, "bad\nname.npy", b"\x93NUMPY garbage"))
    add("input name not UTF-8, not quiet, --json", ["run", os.fsdecode(b"\xff\xfe.npy"), "out.npy", *NEAREST, "--json"],
        setup=lambda f: write(f, os.fsdecode(b"\xff\xfe.npy"), base["vol.npy"]), expect={0})
    add("corrupt input name not UTF-8", ["info", os.fsdecode(b"bad\xff.nii")],
        setup=lambda f: write(f, os.fsdecode(b"bad\xff.nii"), b"\0" * 400))
    add("batch --out-dir is a file", ["batch", "vol.npy", "--out-dir", "vol.npy", *NEAREST, "-q"], output=None)
    add("batch --out-dir /dev/null", ["batch", "vol.npy", "--out-dir", "/dev/null", *NEAREST, "-q"], output=None)
    add("batch writing over its own input", ["batch", "vol.npy", "--out-dir", ".", *NEAREST, "-q", "--json"],
        output=None)
    add("batch, the same input twice", ["batch", "vol.npy", "./vol.npy", "--out-dir", "out", *NEAREST, "-q"],
        output="out")
    add("batch --from-list - with stdin closed", ["batch", "--from-list", "-", "--out-dir", "out", *NEAREST, "-q"],
        output="out", expect={0})
    assert_promise(cases)


@pytest.mark.parametrize("output", ["out.nii", "out.nii.gz", "out.h5", "out.npz", "out.npy"])
def test_disk_full(output, new_case):
    """Writes fail half-way (EFBIG from a 100 KB file-size limit, as on a full disk): exit 1, nothing left."""
    volume = np.random.default_rng(9).standard_normal((32, 32, 32)).astype(np.float32)
    folder = new_case(f"full-{output}")
    write(folder, "big.npy", npy_bytes(volume))
    cases = [Case(f"run to {output} on a full disk", ["run", "big.npy", output, *NEAREST, "-q"], folder,
                  output=output, expect={1}, fsize=100_000)]
    folder = new_case(f"full-batch-{output}")
    write(folder, "big.npy", npy_bytes(volume))
    write(folder, "small.npy", npy_bytes(volume[:4, :4, :4]))
    fmt = output.split(".", 1)[1]
    cases.append(Case(f"batch to {fmt} on a full disk", ["batch", "big.npy", "small.npy", "--out-dir", "out",
                                                         "--format", fmt, *NEAREST, "-q", "--json"], folder,
                      output="out", expect={1}, fsize=100_000))
    assert_promise(cases)
