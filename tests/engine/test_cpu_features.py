"""The vector features the rules see are those the kernels are compiled with (``_cpu``)."""

import pytest

from convt3d_cli.engine import _cpu, _layer

HOST = ("avx2", "avx512_bf16", "avx512_vnni", "avx512f", "fma")


@pytest.mark.parametrize("name, text, expected", [
    ("", "", HOST),                                                  # Numba compiles for the host
    ("host", "", HOST),
    ("znver3", "+avx,+avx2,+fma,+f16c,-avx512f", ("avx2", "fma")),   # AVX-512 off: its extensions too
    ("", "-avx2", ("fma",)),
    ("generic", "", ()),                                             # a cache for any x86-64 node
    ("x86-64-v3", "", ("avx2", "fma")),
    ("x86-64-v4", "+avx512vnni", ("avx2", "avx512_vnni", "avx512f", "fma")),
    ("skylake-avx512", "", HOST),                                    # another named CPU: the host's
    ("", "avx2,+,-, +amx-tile ,bogus", HOST + ("amx_tile",)),        # unsigned or empty tokens are skipped
])
def test_features_follow_numbas_target(name, text, expected):
    assert _cpu.compiled_features(HOST, name, text) == tuple(sorted(expected))


def test_the_environment_is_read(monkeypatch):
    monkeypatch.setenv("NUMBA_CPU_NAME", "znver3")
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx2,+fma,-avx512f")
    assert _cpu.compiled_features(HOST) == ("avx2", "fma")
    monkeypatch.delenv("NUMBA_CPU_NAME")
    monkeypatch.delenv("NUMBA_CPU_FEATURES")
    assert _cpu.compiled_features(HOST) == HOST


def test_rules_follow_code_compiled_without_avx512(monkeypatch):
    _cpu.model_and_features.cache_clear()
    try:
        monkeypatch.setenv("NUMBA_CPU_FEATURES", "-avx512f")
        assert "avx512f" not in _cpu.model_and_features()[1]
        assert _layer.default_register_block() in ("5x16", "8x16")   # 5x16 where the CPU has AVX2
        assert "8x32" not in _layer.fitting_blocks()
    finally:
        _cpu.model_and_features.cache_clear()
