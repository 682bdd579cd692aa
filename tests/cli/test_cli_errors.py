"""Every refusal: one ``Error:`` line, the right exit code, no traceback, no file created or changed."""

import gzip
import os

import numpy as np
import pytest

from convt3d_cli import OutputError

RUN = ("run", "vol.npy", "out.npy")
NEAREST = ("--kernel", "nearest", "--stride", "2")


# ---- output safety (exit 1) -------------------------------------------------------------

def test_existing_output_without_overwrite(convt3d, data):
    np.save(data / "out.npy", np.zeros(3))
    convt3d.fails(*RUN, *NEAREST, code=1, match="--overwrite")


@pytest.mark.parametrize("spelling", ["vol.npy", "./vol.npy", "ABSOLUTE", "link.npy", "sub/../vol.npy"])
def test_output_is_the_input_even_with_overwrite(convt3d, data, spelling):
    (data / "sub").mkdir()
    os.symlink(data / "vol.npy", data / "link.npy")
    output = str(data / "vol.npy") if spelling == "ABSOLUTE" else spelling
    convt3d.fails("run", "vol.npy", output, *NEAREST, "--overwrite", code=1, match="input")


def test_output_is_the_weights_file(convt3d):
    convt3d.fails("run", "vol.npy", "w11.npy", "--weights", "w11.npy", "--overwrite", code=1, match="input")


def test_output_in_the_same_hdf5_file_under_another_key(convt3d):
    convt3d.fails("run", "scan.h5:/scan/data", "scan.h5:/scan/up", "--weights", "w21.h5:/layer/weight",
                  "--overwrite", code=1, match="input")


def test_missing_output_folder(convt3d):
    convt3d.fails("run", "vol.npy", "nowhere/out.npy", *NEAREST, code=1, match="does not exist")


def test_output_with_unknown_suffix_is_refused_before_computing(convt3d):
    convt3d.fails("run", "vol.npy", "out.tiff", *NEAREST, code=1)


# ---- data problems (exit 1) --------------------------------------------------------------

def test_channel_mismatch_reports_formula_first(convt3d):
    result, error = convt3d.fails("run", "vols.npz:volume", "out.npy", "--weights", "w12.npz", code=1,
                                  match="channel")
    assert "D_out = (6 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 1 + 1 = 12" in result.stderr


def test_bias_of_the_wrong_shape(convt3d):
    convt3d.fails("run", "vol.npy", "out.npy", "--weights", "w12.npz:weight", "--bias", "bias3.npy",
                  code=1, match="bias")


@pytest.mark.parametrize("name", ["missing.nii.gz", "missing.npy"])
def test_missing_input(convt3d, name):
    convt3d.fails("run", name, "out.npy", *NEAREST, code=1)


def test_missing_weights(convt3d):
    convt3d.fails(*RUN, "--weights", "nothing.npz", code=1)


def test_unknown_key(convt3d):
    convt3d.fails("run", "vols.npz:nope", "out.npy", *NEAREST, code=1, match="nope")


def test_ambiguous_npz_lists_its_arrays(convt3d, data):
    np.savez(data / "two.npz", a=np.zeros((4, 4, 4)), b=np.zeros((4, 4, 4)))
    convt3d.fails("run", "two.npz", "out.npy", *NEAREST, code=1)


def test_unsupported_input_suffix(convt3d, data):
    (data / "vol.tiff").write_bytes(b"II*\x00")
    convt3d.fails("run", "vol.tiff", "out.npy", *NEAREST, code=1)


def test_corrupt_nifti(convt3d, data):
    (data / "bad.nii.gz").write_bytes(gzip.compress(b"this is not a NIfTI header" * 20))
    convt3d.fails("run", "bad.nii.gz", "out.npy", *NEAREST, code=1)


def test_not_gzip_at_all(convt3d, data):
    (data / "bad.nii.gz").write_bytes(b"\x00" * 10)
    convt3d.fails("run", "bad.nii.gz", "out.npy", *NEAREST, code=1)


def test_truncated_nifti(convt3d, data):
    raw = gzip.decompress((data / "vol.nii.gz").read_bytes())
    (data / "cut.nii").write_bytes(raw[: len(raw) - 100])
    convt3d.fails("run", "cut.nii", "out.npy", *NEAREST, code=1)


def test_truncated_npy(convt3d, data):
    raw = (data / "vol.npy").read_bytes()
    (data / "cut.npy").write_bytes(raw[: len(raw) // 2])
    convt3d.fails("run", "cut.npy", "out.npy", *NEAREST, code=1)


def test_pickled_npz_is_refused(convt3d, data):
    np.savez(data / "obj.npz", volume=np.array([{"a": 1}], dtype=object))
    convt3d.fails("run", "obj.npz", "out.npy", *NEAREST, code=1)


def test_max_memory_too_small_names_the_option(convt3d):
    convt3d.fails(*RUN, *NEAREST, "--max-memory", "1K", code=1, match="--max-memory")


def test_memory_refusal_comes_before_measuring_paths(convt3d, monkeypatch):
    """Measuring a layer's paths compiles and runs kernels (minutes on a fresh install);
    a run that cannot fit is refused before, and a run that fits is still measured."""
    from convt3d_cli.engine import _layer, _tuner

    monkeypatch.setattr(_tuner, "enabled", lambda: True)
    monkeypatch.setattr(_tuner, "TUNE_MIN_MACS", 0)
    monkeypatch.setattr(_layer, "COLUMNS_MAX_MACS_ONE_LAYER", 0)   # a compiled path, which is measured
    measured = []

    def refuse(layer, candidates, threads):
        raise AssertionError("measured before refusing")

    monkeypatch.setattr(_tuner, "tuned_path", refuse)
    # One output plane fits 1 MiB (checked before the layer is built); the slab's fixed buffers do not.
    convt3d.fails(*RUN, "--kernel", "linear", "--stride", "2", "--max-memory", "1M", code=1, match="--max-memory")

    def first(layer, candidates, threads):
        measured.append(candidates)
        return candidates[0]

    monkeypatch.setattr(_tuner, "tuned_path", first)
    convt3d.ok(*RUN, "--kernel", "linear", "--stride", "2", "-q")
    assert measured


def test_max_memory_counts_the_kernels_own_buffers(convt3d):
    """A wide kernel needs large per-thread coefficient rows (about 100 MB here for k=128
    on a 6^3 volume) whatever the slab: the budget must see them and refuse up front, not
    run past --max-memory (or, for stride 200, get the process killed for memory)."""
    convt3d.fails(*RUN, "--kernel", "linear", "--stride", "64", "--max-memory", "64M", code=1,
                  match="--max-memory")


def test_target_unreachable(convt3d):
    result, _ = convt3d.fails("shape", "--input-shape", "1,1,8,8,8", "--out-channels", "1", "--kernel-size", "3",
                              "--stride", "2", "--target", "17,16,20", code=1, match="W")
    assert "no padding/output_padding gives this size" in result.stdout


# ---- invalid layer parameters (exit 2, one Error line, no usage text needed) -------------------

@pytest.mark.parametrize("options, name", [
    (("--output-padding", "2"), "output_padding"),
    (("--stride", "0"), "stride"),
    (("--padding", "-1"), "padding"),
    (("--dilation", "0"), "dilation"),
    (("--padding", "9"), "padding"),              # the output would be empty
    (("--groups", "2"), "groups"),                # 1 input channel
])
def test_invalid_layer_parameters(convt3d, options, name):
    convt3d.fails(*RUN, "--weights", "w11.npy", *options, code=2, match=name)


# ---- usage problems (exit 2) ---------------------------------------------------------------

@pytest.mark.parametrize("args", [
    RUN + ("--weights", "w11.npy", "--kernel", "linear", "--stride", "2"),
    RUN,
    RUN + ("--weights", "w12.npz", "--bias", "bias3.npy", "--no-bias"),
    RUN + ("--kernel", "linear"),
    RUN + ("--kernel", "linear", "--stride", "2", "--padding", "1"),
    RUN + ("--kernel", "linear", "--stride", "2", "--no-bias"),
    RUN + ("--kernel", "cubic", "--stride", "2"),
    RUN + ("--weights", "w11.npy", "--stride", "2,x"),
    RUN + ("--weights", "w11.npy", "--stride", "2,2"),
    RUN + ("--weights", "w11.npy", "--dtype", "float16"),
    RUN + ("--weights", "w11.npy", "--max-memory", "lots"),
    ("run", "vol.npy"),
    ("shape", "vol.npy", "--input-shape", "1,1,4,4,4", "--kernel-size", "3", "--out-channels", "1"),
    ("shape", "--input-shape", "1,4,4", "--kernel-size", "3", "--out-channels", "1"),
    ("shape", "--input-shape", "1,1,4,4,4", "--kernel-size", "3"),
    ("shape", "--input-shape", "1,1,4,4,4", "--kernel", "linear", "--stride", "2", "--target", "8"),
    ("frobnicate",),
])
def test_usage_errors(convt3d, args):
    convt3d.fails(*args, code=2)


def test_out_channels_not_a_multiple_of_groups(convt3d):
    convt3d.fails("shape", "--input-shape", "1,2,4,4,4", "--out-channels", "3", "--kernel-size", "3",
                  "--groups", "2", code=2, match="out_channels")


# ---- tracebacks only with --debug -----------------------------------------------------------

def test_debug_lets_the_exception_through(convt3d, data):
    np.save(data / "out.npy", np.zeros(3))
    result = convt3d("--debug", *RUN, *NEAREST)
    assert result.exit_code == 1
    assert isinstance(result.exception, OutputError)


def test_quiet_failure_is_exactly_one_line(convt3d):
    result, error = convt3d.fails("run", "vols.npz:volume", "out.npy", "--weights", "w12.npz", "-q", code=1)
    assert result.stderr.splitlines() == [error]


# ---- format rules of the output, checked before computing -------------------------------

@pytest.fixture
def no_compute(monkeypatch):
    """Make any computation fail the test: these refusals must come first."""
    import convt3d_cli.builtin
    import convt3d_cli.engine

    def refuse(*args, **kwargs):
        raise AssertionError("computed before refusing")

    monkeypatch.setattr(convt3d_cli.engine, "conv_transpose3d", refuse)
    monkeypatch.setattr(convt3d_cli.builtin, "apply_builtin", refuse)


def test_nifti_output_cannot_take_a_key(convt3d, no_compute):
    convt3d.fails("run", "vol.npy", "out.nii.gz:scan", *NEAREST, code=1, match=":scan")


def test_batch_into_nifti_becomes_volumes(convt3d, data):
    import h5py
    import nibabel as nib

    with h5py.File(data / "batch.h5", "w") as fh:
        fh["volume"] = np.zeros((2, 1, 4, 4, 4), dtype=np.float32)
    convt3d.ok("run", "batch.h5", "out.nii.gz", *NEAREST, "-q")
    assert nib.load(data / "out.nii.gz").shape == (8, 8, 8, 2)


@pytest.mark.parametrize("args", [
    ("run", "vol.npy", "vol.npy", *NEAREST, "--overwrite"),
    ("run", "vol.npy", "nowhere/out.npy", *NEAREST),
    ("run", "vol.npy", "out.tiff", *NEAREST),
    ("run", "vols.npz:volume", "out.npy", "--weights", "w12.npz"),
    ("run", "vol.npy", "out.npy", *NEAREST, "--max-memory", "1K"),
])
def test_refusals_happen_before_computing(convt3d, no_compute, args):
    convt3d.fails(*args, code=1)


def test_corrupt_weights_file(convt3d, data):
    (data / "bad.npz").write_bytes(b"PK\x03\x04 definitely not a zip archive")
    convt3d.fails(*RUN, "--weights", "bad.npz", code=1)


def test_weights_in_a_nifti_are_refused(convt3d):
    convt3d.fails(*RUN, "--weights", "vol.nii.gz", code=1)
