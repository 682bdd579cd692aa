"""The blocked kernel's input blocks follow this CPU's L2 cache (``_cpu.l2_bytes``)."""

import numpy as np
import pytest

from convt3d_cli.engine import PreparedLayer, _cpu, _layer


def _fake_caches(tmp_path, monkeypatch, entries):
    """A sysfs-like cache folder: ``entries`` is ``{name: {field: text}}``."""
    for name, fields in entries.items():
        folder = tmp_path / name
        folder.mkdir()
        for field, text in fields.items():
            (folder / field).write_text(text + "\n")
    monkeypatch.setattr(_cpu, "CACHE_DIR", str(tmp_path))
    _cpu.l2_bytes.cache_clear()


@pytest.fixture(autouse=True)
def _forget_the_cache_size():
    _cpu.l2_bytes.cache_clear()
    yield
    _cpu.l2_bytes.cache_clear()


@pytest.mark.parametrize("text, size", [("512K", 512 << 10), ("2048K", 2 << 20), ("1M", 1 << 20),
                                        ("1048576", 1 << 20), (" 2m ", 2 << 20)])
def test_l2_size_is_read_from_sysfs(tmp_path, monkeypatch, text, size):
    _fake_caches(tmp_path, monkeypatch, {
        "index0": {"level": "1", "type": "Data", "size": "32K"},
        "index1": {"level": "1", "type": "Instruction", "size": "32K"},
        "index2": {"level": "2", "type": "Unified", "size": text},
        "index3": {"level": "3", "type": "Unified", "size": "32768K"},
    })
    assert _cpu.l2_bytes() == size


@pytest.mark.parametrize("entries", [
    {},                                                                    # no caches listed
    {"index0": {"level": "1", "type": "Data", "size": "32K"}},             # no L2
    {"index2": {"level": "2", "type": "Unified", "size": "lots"}},         # malformed size
    {"index2": {"level": "2", "type": "Unified", "size": "0K"}},
    {"index2": {"level": "2", "type": "Unified"}},                         # size missing
    {"index2": {"level": "2", "type": "Instruction", "size": "512K"}},     # not a data cache
])
def test_an_unknown_l2_size_is_none(tmp_path, monkeypatch, entries):
    _fake_caches(tmp_path, monkeypatch, entries)
    assert _cpu.l2_bytes() is None


def test_no_cache_folder_is_none(tmp_path, monkeypatch):
    monkeypatch.setattr(_cpu, "CACHE_DIR", str(tmp_path / "missing"))
    assert _cpu.l2_bytes() is None


@pytest.mark.parametrize("l2, expected", [
    (512 << 10, 128 << 10),                       # AMD Zen 3: a quarter
    (1 << 20, 256 << 10),                         # Zen 4
    (2 << 20, 512 << 10),                         # Intel Sapphire Rapids
    (64 << 20, _layer.BLOCK_BYTES),               # capped
    (128 << 10, _layer.BLOCK_BYTES_MIN),          # floored
    (None, _layer.BLOCKED_BLOCK_BYTES_UNKNOWN),
])
def test_blocked_input_block_is_a_share_of_the_l2(monkeypatch, l2, expected):
    monkeypatch.setattr(_cpu, "l2_bytes", lambda: l2)
    assert _layer.blocked_block_bytes() == expected


def test_blocked_plan_uses_the_l2_rule_and_keeps_the_bits(monkeypatch):
    """The input block changes the jobs' split, never a result."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 64, 24, 24, 24)).astype(np.float32)
    w = rng.standard_normal((64, 5, 3, 3, 3)).astype(np.float32)
    results, blockings = [], []
    for l2 in (512 << 10, 2 << 20):
        monkeypatch.setattr(_cpu, "l2_bytes", lambda: l2)
        monkeypatch.setattr(_layer, "BLOCK_SHARE_OF_OUTPUT", 1e9)  # no small-output cap
        layer = PreparedLayer(x.shape, w, None, 2, 1, 1, path="blocked")
        blockings.append(layer._blocked_plan("blocked").plan.blocking)
        out = np.empty(layer.output_shape, np.float32)
        layer.run_slab(x, 0, 0, layer.output_shape[2], out)
        results.append(out)
    assert blockings[0] != blockings[1]
    assert np.array_equal(results[0], results[1])
