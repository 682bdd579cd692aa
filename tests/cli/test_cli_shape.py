"""``convt3d shape``: the report without computing, from numbers or from file headers; ``--target``."""

import json

import pytest


def test_formula_on_stdout_exactly(convt3d):
    result = convt3d.ok("shape", "--input-shape", "16,3,32,32,32", "--out-channels", "64", "--kernel-size", "3",
                        "--stride", "2", "--padding", "1")
    lines = result.stdout.splitlines()
    assert "D_out = (32 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 0 + 1 = 63" in lines
    assert "H_out = (32 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 0 + 1 = 63" in lines
    assert "W_out = (32 - 1) * 2 - 2 * 1 + 1 * (3 - 1) + 0 + 1 = 63" in lines
    assert "output:  (16, 64, 63, 63, 63)" in lines
    assert result.stderr == ""


def test_per_axis_options_and_four_numbers(convt3d):
    result = convt3d.ok("shape", "--input-shape", "2,10,12,14", "--out-channels", "4", "--kernel-size", "3,3,1",
                        "--stride", "2,2,1", "--dilation", "1,2,1", "--groups", "2", "--json")
    report = json.loads(result.stdout)
    assert report["output_shape"] == [4, 21, 27, 14]
    assert report["weight_shape"] == [2, 2, 3, 3, 1]
    assert report["formula"][1] == "H_out = (12 - 1) * 2 - 2 * 0 + 2 * (3 - 1) + 0 + 1 = 27"


def test_json_has_the_report_keys(convt3d, report_keys):
    result = convt3d.ok("shape", "vol.nii.gz", "--weights", "w12.npz", "--json")
    report = json.loads(result.stdout)
    assert report_keys - {"output", "seconds", "dtype"} <= set(report)
    assert report["input_shape"] == [1, 1, 8, 7, 6]
    assert report["output_shape"] == [1, 2, 16, 14, 12]
    assert report["stride"] == [2, 2, 2]          # from the weights file


def test_file_input_reads_no_voxel_data(convt3d, monkeypatch):
    from convt3d_cli import io

    def refuse(*args, **kwargs):
        raise AssertionError("shape must not read voxel data")

    monkeypatch.setattr(io, "read_volume", refuse)
    result = convt3d.ok("shape", "scan.h5:/scan/data", "--kernel", "linear", "--stride", "3")
    assert "output:  (1, 2, 18, 18, 18)" in result.stdout.splitlines()


def test_target_lists_choices_and_the_options_to_use(convt3d):
    result = convt3d.ok("shape", "--input-shape", "1,1,32,32,32", "--out-channels", "8", "--kernel-size", "3",
                        "--stride", "2", "--target", "64,64,63")
    lines = result.stdout.splitlines()
    assert "D: 32 -> 64 with kernel_size=3 stride=2 dilation=1: padding=1 output_padding=1" in lines
    assert "W: 32 -> 63 with kernel_size=3 stride=2 dilation=1: padding=1 output_padding=0" in lines
    assert lines[-1] == "use: --padding 1 --output-padding 1,1,0"


def test_target_json(convt3d):
    result = convt3d.ok("shape", "--input-shape", "1,1,8,8,8", "--out-channels", "1", "--kernel-size", "4",
                        "--stride", "2", "--target", "16", "--json")
    report = json.loads(result.stdout)
    assert [axis["choices"] for axis in report["target"]] == [[[1, 0]]] * 3


@pytest.mark.parametrize("kernel, size", [("nearest", 16), ("linear", 16)])
def test_builtin_kernels_give_s_times_n(convt3d, kernel, size):
    result = convt3d.ok("shape", "--input-shape", "3,8,8,8", "--kernel", kernel, "--stride", "2", "--json")
    assert json.loads(result.stdout)["output_shape"] == [3, size, size, size]
