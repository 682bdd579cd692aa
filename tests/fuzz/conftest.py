"""Fixtures of the fuzz suite: the valid files every mutation starts from, and a warm Numba cache.

The suite runs ``convt3d`` in subprocesses (see ``fuzzkit.py``); compiled
kernels are cached in ``NUMBA_CACHE_DIR`` (or convt3d's default cache), and the
session fixture :func:`warm_cache` runs a few ordinary commands first, with a
long time limit, so that the fuzz cases after it run in seconds.
"""

from __future__ import annotations

import functools
import io
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fuzzkit  # noqa: E402

#: The committed weights fixtures (``tests/fixtures/weights``, made by the ``make_*_fixtures.py`` there).
WEIGHTS_FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "weights"


@functools.cache
def weights_fixture(name):
    """The bytes of a committed weights fixture; the Keras files come out of ``keras_models.zip``."""
    path = WEIGHTS_FIXTURES / name
    if path.is_file():
        return path.read_bytes()
    with zipfile.ZipFile(WEIGHTS_FIXTURES / "keras_models.zip") as archive:
        return archive.read(name)


def _read_output_with_mgh(read):
    """fuzzkit's output reader, taught MGH (``.mgh``/``.mgz`` outputs are read with nibabel)."""
    @functools.wraps(read)
    def read_output(path, key):
        if str(path).lower().endswith((".mgh", ".mgz")):
            import nibabel as nib

            image = nib.load(str(path))
            data = np.asanyarray(image.dataobj)
            np.asarray(image.affine, dtype=np.float64)
            return tuple(data.shape)
        return read(path, key)
    return read_output


fuzzkit._read_output = _read_output_with_mgh(fuzzkit._read_output)


def _check_promise_with_sidecars(check):
    """fuzzkit's checker, taught BIDS sidecars: a run that exits 0 writes ``OUT.json`` beside its output
    (with ``--overwrite``, over an existing one), and a batch beside each output it reports ``ok``.
    Those files are outputs, not leftovers; after a failure they are still leftovers."""
    @functools.wraps(check)
    def check_promise(case, outcome):
        problems = check(case, outcome)
        if outcome.timed_out or outcome.returncode not in (0, 1):
            return problems
        from convt3d_cli.io.registry import split_name

        outputs = []
        reports = [line for line in fuzzkit._json_lines(outcome.stdout)[0] if isinstance(line, dict)] \
            if case.wants_json else []
        if case.command == "run" and case.output and outcome.returncode == 0:
            # With --json, only when the report names the sidecar it wrote.
            if not case.wants_json or any(report.get("sidecar") for report in reports):
                outputs.append(case.output)
        elif case.command == "batch":
            outputs += [line.get("output") for line in reports if line.get("status") == "ok" and line.get("sidecar")]
        sidecars = set()
        for spec in outputs:
            path = fuzzkit._output_path(case.folder, spec)[0]
            sidecars.add(str(Path(split_name(str(path))[0] + ".json").relative_to(case.folder)))
        overwrite = "--overwrite" in case.args
        return [p for p in problems
                if not (p.kind == "leftover" and p.detail.split(": ", 1)[-1] in sidecars)
                and not (overwrite and p.kind == "input-changed" and p.detail.split(" changed: ")[0] in sidecars)]
    return check_promise


fuzzkit.check_promise = _check_promise_with_sidecars(fuzzkit.check_promise)

AFFINE = np.array([[1.5, 0.0, 0.0, -10.0],
                   [0.0, 1.5, 0.0, 20.0],
                   [0.0, 0.0, 2.0, -30.0],
                   [0.0, 0.0, 0.0, 1.0]])


def nifti_bytes(version, data, *, extension=True, affine=AFFINE):
    """A single-file NIfTI-1 or NIfTI-2 image as bytes (qform code 1, sform code 2, mm/s)."""
    import nibabel as nib

    klass = nib.Nifti1Image if version == 1 else nib.Nifti2Image
    wide = data.dtype.kind in "iu" and data.dtype.itemsize == 8     # nibabel wants 64-bit ints spelled out
    image = klass(data, affine, dtype=data.dtype if wide else None)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    image.header.set_xyzt_units("mm", "sec")
    if extension:
        image.header.extensions.append(nib.nifti1.Nifti1Extension("comment", b"fuzz base image."))
    buffer = io.BytesIO()
    file_map = klass.make_file_map({"image": buffer, "header": buffer})
    image.to_file_map(file_map)
    return buffer.getvalue()


def npy_bytes(array):
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def h5_bytes(build):
    """An HDF5 file as bytes; ``build(handle)`` fills it."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as handle:
        build(handle)
    return buffer.getvalue()


def make_base():
    """Name -> bytes of the valid inputs (volumes and weights) the fuzz cases start from."""
    rng = np.random.default_rng(17)
    vol = rng.standard_normal((4, 5, 6)).astype(np.float32)
    ints = rng.integers(-100, 100, size=(5, 6, 7)).astype(np.int16)
    base = {
        "n1.nii": nifti_bytes(1, ints),
        "n2.nii": nifti_bytes(2, rng.standard_normal((5, 6, 7)).astype(np.float32)),
        "c4.nii": nifti_bytes(1, rng.standard_normal((4, 5, 6, 2)).astype(np.float32), extension=False),
        "vol.npy": npy_bytes(vol),
        "vol.npz": npz_bytes(volume=rng.standard_normal((2, 4, 5, 6)).astype(np.float32),
                             mask=np.ones((4, 5, 6), dtype=np.uint8)),
        "w.npz": npz_bytes(weight=rng.standard_normal((1, 1, 3, 3, 3)).astype(np.float32),
                           bias=np.array([0.5], dtype=np.float32), stride=np.array([2]),
                           padding=np.array([1]), output_padding=np.array([1])),
        "w.npy": npy_bytes(rng.standard_normal((1, 1, 2, 2, 2)).astype(np.float32)),
    }
    base["n1.nii.gz"] = fuzzkit.gz(base["n1.nii"])
    base["n2.nii.gz"] = fuzzkit.gz(base["n2.nii"])

    def volume_h5(handle):
        dset = handle.create_dataset("volume", data=vol, chunks=(2, 5, 6), compression="gzip")
        dset.attrs["spacing"] = np.array([1.0, 2.0, 3.0])
        handle.create_dataset("other/mask", data=np.ones((4, 5, 6), dtype=np.uint8))
        handle.attrs["note"] = "fuzz"

    def weight_h5(handle):
        dset = handle.create_dataset("layer/weight", data=rng.standard_normal((1, 1, 2, 2, 2)).astype(np.float32))
        dset.attrs["stride"] = 2
        handle.create_dataset("layer/bias", data=np.array([0.25], dtype=np.float32))

    base["vol.h5"] = h5_bytes(volume_h5)
    base["w.h5"] = h5_bytes(weight_h5)
    return base


@pytest.fixture(scope="session")
def base():
    """Name -> bytes of the valid base files (see :func:`make_base`)."""
    return make_base()


@pytest.fixture
def put(base):
    """``put(folder, name, ...)``: copy base files into a case folder (``name=new`` renames)."""
    def put(folder, *names):
        for name in names:
            source, _, target = name.partition("=")
            fuzzkit.write(folder, target or source, base[source])
        return folder
    return put


@pytest.fixture
def new_case(tmp_path):
    """``new_case(label)``: a fresh, empty folder for one case."""
    return lambda label: fuzzkit.case_folder(tmp_path, label)


WARM_UP = [
    ["run", "vol.npy", "o1.npy", "--kernel", "nearest", "--stride", "2", "-q", "--json"],
    ["run", "n1.nii", "o2.nii.gz", "--kernel", "linear", "--stride", "2", "-q", "--json"],
    ["run", "vol.npy", "o3.h5", "--weights", "w.npz", "-q", "--json"],
    ["run", "vol.npz:volume", "o4.npz", "--kernel", "nearest", "--stride", "3", "--dtype", "float64", "-q",
     "--json"],
    ["run", "vol.npy", "o5.npy", "--weights", "w.npy", "--dilation", "2", "-q", "--json"],
    ["run", "c4.nii", "o6.nii", "--kernel", "linear", "--stride", "2,1,3", "-q", "--json"],
    ["run", "n2.nii.gz", "o7.nii", "--weights", "w.h5", "--stride", "3", "--padding", "1", "-q", "--json"],
    ["batch", "n1.nii.gz", "n2.nii", "vol.h5", "--out-dir", "ob", "--kernel", "nearest", "--stride", "2", "-q",
     "--json"],
]


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory, base):
    """Run ordinary commands once (long time limit) so Numba's cache is warm; returns their results."""
    folder = tmp_path_factory.mktemp("warm")
    cases = []
    for number, args in enumerate(WARM_UP):
        sub = folder / f"w{number}"
        sub.mkdir()
        for name, data in base.items():
            fuzzkit.write(sub, name, data)
        output = args[args.index("--out-dir") + 1] if "--out-dir" in args else args[2]
        cases.append(fuzzkit.Case(f"warm-up {number}", args, sub, output=output, expect={0},
                                  timeout=fuzzkit.COMPILE_TIMEOUT, retry=False))
    outcomes = fuzzkit.run_cases(cases, jobs=1)
    return list(zip(cases, outcomes))


@pytest.fixture(autouse=True)
def _warm(warm_cache):
    """Every fuzz test runs after the warm-up."""
    return warm_cache
