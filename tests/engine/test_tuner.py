"""The measured path choice: stored per machine, reused, pinned, ignored when corrupt."""

import json
import os
import time

import numpy as np
import pytest

from convt3d_cli import conv_transpose3d
from convt3d_cli.engine import PreparedLayer, _layer, _tuner
from convt3d_cli.errors import ParameterError
from reference import conv_transpose3d_ref


@pytest.fixture
def store(tmp_path, monkeypatch):
    """Tuning on for every layer, its file in a fresh folder."""
    path = tmp_path / _tuner.FILE_NAME
    monkeypatch.setattr(_tuner, "_path", lambda: str(path))
    monkeypatch.delenv("CONVT3D_PATH", raising=False)
    monkeypatch.delenv("CONVT3D_TUNE", raising=False)
    monkeypatch.setattr(_tuner, "TUNE_MIN_MACS", 0)
    monkeypatch.setattr(_layer, "COLUMNS_MAX_MACS", 0)
    return path


def layer_data(seed=0, k=2, s=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, 4, 5, 6, 7)).astype(np.float32)
    w = rng.standard_normal((4, 3, k, k, k)).astype(np.float32)
    b = rng.standard_normal(3).astype(np.float32)
    return x, w, b, dict(stride=s)


def test_the_winner_is_measured_once_and_stored(store, monkeypatch):
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    assert layer.path_source == "measured"
    saved = json.loads(store.read_text())
    [machine] = saved["machines"].values()
    [entry] = machine.values()
    assert entry["path"] == layer.path
    assert set(entry["seconds"]) == set(layer.candidate_paths()) >= {"blocked", "shuffle", "gemm", "fir"}

    def no_measuring(*args):
        raise AssertionError("measured again")

    monkeypatch.setattr(_tuner, "measure", no_measuring)
    again = PreparedLayer(x.shape, w, b, **kwargs)
    assert again.path == layer.path and again.path_source == "measured"


def test_a_tuned_layer_is_exact_and_streams_bitwise(store):
    from convt3d_cli import geometry

    x, w, b, kwargs = layer_data(1, k=3, s=2)
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    whole = np.empty(layer.output_shape, np.float32)
    layer.run_slab(x, 0, 0, whole.shape[2], whole)
    np.testing.assert_allclose(whole, conv_transpose3d_ref(x, w, b, **kwargs), rtol=0, atol=1e-4)
    for o in range(whole.shape[2]):
        i0, i1 = geometry.input_window(o, o + 1, x.shape[2], 0, layer.params)
        out = np.empty(whole.shape[:2] + (1,) + whole.shape[3:], np.float32)
        layer.run_slab(np.ascontiguousarray(x[:, :, i0:max(i1, i0 + 1)]), i0, o, o + 1, out)
        assert np.array_equal(out[:, :, 0], whole[:, :, o])


def test_a_burst_after_a_candidate_was_dropped_still_ends_in_a_choice(monkeypatch):
    """Round 1 drops "fir" (4x slower); then "blocked" runs 100x slower (a host burst), past
    PROBE_DROP times fir's old estimate. The still-timed candidate is kept, not dropped too."""
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, path="blocked", **kwargs)
    clock = [0.0]
    rounds = {"blocked": 0}

    def fake_run(x_slab, in_start, out_start, out_stop, out, progress=None):
        if layer.path == "fir":
            clock[0] += 4.0
        else:
            rounds["blocked"] += 1
            clock[0] += 1.0 if rounds["blocked"] <= 3 else 100.0   # the untimed run, then round 1

    monkeypatch.setattr(layer, "run_slab", fake_run)
    monkeypatch.setattr(layer, "prepare", lambda path, again=False: None)
    monkeypatch.setattr(_tuner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(_tuner, "PROBE_SETTLE", 0)
    times = _tuner.measure(layer, ["blocked", "fir"])
    assert set(times) == {"blocked", "fir"} and rounds["blocked"] > 3 + _tuner.PROBE_RUNS


@pytest.mark.parametrize("content", ["{not json", "[]", '{"version": 999, "machines": {}}', "\\x00" * 10])
def test_a_corrupt_or_stale_file_is_ignored_and_rewritten(store, content):
    store.write_text(content)
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    assert layer.path_source == "measured"
    assert json.loads(store.read_text())["version"] == _tuner.FORMAT_VERSION


def test_a_stored_path_that_cannot_run_the_layer_is_measured_again(store):
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    saved = json.loads(store.read_text())
    machine = next(iter(saved["machines"].values()))
    key = next(iter(machine))
    machine[key]["path"] = "nonsense"
    store.write_text(json.dumps(saved))
    again = PreparedLayer(x.shape, w, b, **kwargs)
    assert again.path in layer.candidate_paths()
    assert json.loads(store.read_text())["machines"][next(iter(saved["machines"]))][key]["path"] != "nonsense"


def test_pinning_and_switching_off(store, monkeypatch):
    x, w, b, kwargs = layer_data()
    for path in ("blocked", "fir", "gemm", "shuffle", "subpixel"):
        layer = PreparedLayer(x.shape, w, b, path=path, **kwargs)
        assert layer.path == path and layer.path_source == "pinned"
        np.testing.assert_allclose(conv_transpose3d(x, w, b, **kwargs), conv_transpose3d_ref(x, w, b, **kwargs),
                                   rtol=0, atol=1e-4)
    monkeypatch.setenv("CONVT3D_PATH", "gemm")
    assert PreparedLayer(x.shape, w, b, **kwargs).path == "gemm"
    monkeypatch.setenv("CONVT3D_PATH", "warp")
    with pytest.raises(ParameterError):
        PreparedLayer(x.shape, w, b, **kwargs)
    monkeypatch.delenv("CONVT3D_PATH")
    monkeypatch.setenv("CONVT3D_TUNE", "0")
    if store.exists():
        store.unlink()
    assert PreparedLayer(x.shape, w, b, **kwargs).path_source == "rule"
    assert not store.exists()


def test_a_pinned_path_that_cannot_run_the_layer_falls_back(store):
    x, w, b, kwargs = layer_data(k=3, s=3)          # kernel 3 stride 3 W: no paired rows; k == s: gemm fits
    assert PreparedLayer(x.shape, w, b, path="paired", **kwargs).path == "fir"
    x, w, b, kwargs = layer_data(k=3, s=2)          # k != s: no shuffle or gemm
    assert PreparedLayer(x.shape, w, b, path="gemm", **kwargs).path == "blocked"


def test_small_layers_keep_the_rules(tmp_path, monkeypatch):
    monkeypatch.setattr(_tuner, "_path", lambda: str(tmp_path / _tuner.FILE_NAME))
    monkeypatch.delenv("CONVT3D_PATH", raising=False)
    x, w, b, kwargs = layer_data()
    assert PreparedLayer(x.shape, w, b, **kwargs).path_source == "rule"
    assert not (tmp_path / _tuner.FILE_NAME).exists()


def test_small_layers_take_the_columns_path_and_one_layer_runs_up_to_a_larger_size():
    from convt3d_cli.engine._layer import (COLUMNS_MAX_MACS, COLUMNS_MAX_MACS_ONE_LAYER, choose_path,
                                           many_layers, one_layer_process)

    assert COLUMNS_MAX_MACS < COLUMNS_MAX_MACS_ONE_LAYER
    middle = (COLUMNS_MAX_MACS + COLUMNS_MAX_MACS_ONE_LAYER) / 2
    assert choose_path(1, 1, None, COLUMNS_MAX_MACS / 2) == "columns"
    assert choose_path(1, 1, None, middle) == "fir"
    with one_layer_process():
        assert choose_path(1, 1, None, middle) == "columns"
        assert choose_path(1, 1, None, COLUMNS_MAX_MACS_ONE_LAYER) == "fir"
    with many_layers(), one_layer_process():  # a batch worker's files keep the library's line
        assert choose_path(1, 1, None, middle) == "fir"
    assert choose_path(1, 1, None, middle) == "fir"
    assert choose_path(1, 1) == "fir"  # without the layer's size: the kernels' rules


def test_every_register_block_has_a_path_and_a_kernel():
    from convt3d_cli.engine import _numba_env
    kern = _numba_env.kernels()
    assert {_layer.register_block(name) for name in _layer.BLOCKED_VARIANTS} == set(kern.REGISTER_BLOCKS)
    assert set(kern.BLOCKED_KERNELS) == set(kern.REGISTER_BLOCKS)
    assert {_layer.register_block(name) for name in _layer.WIDE_VECTOR_VARIANTS} == set(kern.WIDE_VECTOR_BLOCKS)
    assert _layer.register_block("blocked") in kern.REGISTER_BLOCKS


@pytest.mark.parametrize("features, block", [
    (("avx2", "fma"), "5x16"),                       # AVX2 alone: 16 registers
    (("avx2", "avx512f", "fma"), "8x16"),            # AVX-512: 32 registers
    ((), "8x16"),                                    # not x86, or not known
])
def test_the_default_register_block_follows_the_vector_registers(monkeypatch, features, block):
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", features))
    assert _layer.default_register_block() == block
    assert _layer.register_block("blocked") == block
    assert _layer.register_block("blocked-3x32") == "3x32"


def test_the_tuner_measures_every_register_block(store):
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    candidates = layer.candidate_paths()
    measured = {layer.block_of(p) for p in candidates if _layer.is_blocked(p)}
    # every block that fits, and the layer's own (8x16 on a CPU without AVX2, where none fits)
    assert measured == set(_layer.fitting_blocks()) | {layer.block}
    # the layer's own block is measured once, as "blocked"
    assert "blocked" in candidates and "blocked-" + layer.block not in candidates


def test_only_blocks_that_fit_the_registers_are_measured(monkeypatch):
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "fma")))
    # 16 registers of 8 floats: 5x16 (the default, 10 accumulators) and 3x32 (12)
    assert _layer.fitting_blocks() == ("5x16", "3x32")
    assert _layer.measured_blocked_paths() == ("blocked", "blocked-3x32")
    assert _layer.measured_blocked_paths("3x32") == ("blocked", "blocked-5x16")
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "avx512f", "fma")))
    # 32 registers: every block (8x16 is the default), 8x32, 12x16 and 16x16 as 16, 12 and 16 zmm
    assert _layer.measured_blocked_paths() == ("blocked", "blocked-5x16", "blocked-3x32", "blocked-8x32",
                                               "blocked-12x16", "blocked-16x16")
    # float64: half the lanes per register, so 8x32 and 16x16 (32 zmm) would spill
    assert _layer.fitting_blocks(8) == ("8x16", "5x16", "3x32", "12x16")
    assert _layer.measured_blocked_paths(itemsize=8) == ("blocked", "blocked-5x16", "blocked-3x32",
                                                         "blocked-12x16")
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "fma")))
    assert _layer.fitting_blocks(8) == ()               # AVX2: even 5x16 needs 20 ymm of doubles
    assert _layer.measured_blocked_paths(itemsize=8) == ("blocked",)


@pytest.mark.parametrize("path", _layer.BLOCKED_VARIANTS)
def test_each_register_block_matches_the_reference_on_ragged_channels(path, monkeypatch):
    # 13 output channels: a partial last channel block for every register block; 37 columns:
    # a partial last position block; groups and a start crop on top.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 6, 4, 5, 37)).astype(np.float32)
    w = rng.standard_normal((6, 13, 3, 3, 4)).astype(np.float32)
    b = rng.standard_normal(26).astype(np.float32)
    kwargs = dict(stride=(1, 2, 2), padding=(1, 0, 1), groups=2)
    assert PreparedLayer(x.shape, w, b, path=path, **kwargs).path == path
    monkeypatch.setenv("CONVT3D_PATH", path)
    out = conv_transpose3d(x, w, b, **kwargs)
    np.testing.assert_allclose(out, conv_transpose3d_ref(x, w, b, **kwargs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("batch, cin, cout, n, k, s, p, block, wide", [
    (4, 64, 32, 16, 4, 2, 1, "5x16", "16x16"),    # N4: 16 outputs per phase row fill half of 3x32's 32
    (2, 16, 16, 32, 3, 1, 1, "3x32", "8x32"),     # N2: rows of 32; 16 channels pad to 18, not 20
    (1, 32, 2, 20, 3, 2, 1, "3x32", "8x32"),      # two output channels: 2 of 3 lanes, not 2 of 5
    (1, 64, 35, 20, 3, 2, 1, "5x16", "8x32"),     # 35 channels: 7 full blocks of 5; 40 of 8, 48 of 16
    (1, 320, 256, 8, 2, 2, 0, "3x32", "8x32"),    # rows of 8 packed 4 to a 32-wide block, 256 of 258
    (1, 16, 24, 20, 3, 2, 1, "3x32", "8x32"),     # 24 channels: 8 blocks of 3; 3 of 8, not 2 of 16
    (1, 16, 8, 48, 3, 2, 1, "5x16", "8x16"),      # rows of 48: 3 blocks of 16, not 2 of 32
    (1, 48, 48, 16, 3, 2, 1, "5x16", "16x16"),    # rows of 16: half of 8x32's lanes empty
])
def test_a_layer_runs_the_block_that_wastes_fewer_lanes(monkeypatch, batch, cin, cout, n, k, s, p, block, wide):
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "fma")))
    layer = PreparedLayer((batch, cin, n, n, n), np.zeros((cin, cout, k, k, k), np.float32), stride=s, padding=p)
    assert layer.block == block and layer.block_of("blocked") == block
    # AVX-512, float32: of 8x32, 16x16 and 8x16 the one that wastes fewest lanes (that order on a tie)
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ("avx2", "avx512f", "fma")))
    layer = PreparedLayer((batch, cin, n, n, n), np.zeros((cin, cout, k, k, k), np.float32), stride=s, padding=p)
    assert layer.block == wide and layer.block_of("blocked") == wide
    layer = PreparedLayer((batch, cin, n, n, n), np.zeros((cin, cout, k, k, k), np.float32), stride=s, padding=p,
                          dtype=np.float64)
    assert layer.block == "8x16"                                   # 8x32 and 16x16 of doubles would spill
    monkeypatch.setattr(_layer._cpu, "model_and_features", lambda: ("a CPU", ()))
    layer = PreparedLayer((batch, cin, n, n, n), np.zeros((cin, cout, k, k, k), np.float32), stride=s, padding=p)
    assert layer.block == "8x16"                                   # no AVX2: the AVX-512 default


def test_the_gemm_path_is_probed_on_whole_chunks(store, monkeypatch):
    from convt3d_cli.engine import _gemm

    monkeypatch.setattr(_gemm, "MIN_COLUMNS", 60)    # 2 planes of 6 x 7 per chunk
    x = np.random.default_rng(3).standard_normal((1, 4, 9, 6, 7)).astype(np.float32)
    w = np.ones((4, 3, 2, 2, 2), np.float32)
    layer = PreparedLayer(x.shape, w, None, 2, path="gemm")
    quantum = layer.gemm_plan().planes * 2
    assert quantum == 4
    probes = []
    original = PreparedLayer.run_slab

    def recording(self, x_slab, in_start, out_start, out_stop, out, progress=None):
        if self.path == "gemm":
            probes.append((out_start, out_stop))
        return original(self, x_slab, in_start, out_start, out_stop, out, progress)

    monkeypatch.setattr(PreparedLayer, "run_slab", recording)
    times = _tuner.measure(layer, ["gemm", "blocked"])
    assert set(times) == {"gemm", "blocked"}
    assert probes and all(o0 % quantum == 0 and (o1 - o0) % quantum == 0 for o0, o1 in set(probes))


def test_the_store_is_read_again_when_the_file_changes(store):
    _tuner.save({"version": _tuner.FORMAT_VERSION, "machines": {"a": {"k": {"path": "fir"}}}})
    assert _tuner.load()["machines"]["a"]["k"]["path"] == "fir"
    _tuner.save({"version": _tuner.FORMAT_VERSION, "machines": {"a": {"k": {"path": "gemm"}}}})
    assert _tuner.load()["machines"]["a"]["k"]["path"] == "gemm"
    store.write_text("{broken")
    assert _tuner.load()["machines"] == {}


def test_what_a_path_prepares_once_counts_in_its_estimate(store, monkeypatch):
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, path="blocked", **kwargs)
    original = PreparedLayer.prepare
    prepared = []

    def slow_prepare(self, path=None, again=False):
        if again and path == "blocked":
            prepared.append(path)
            time.sleep(0.05)
        return original(self, path, again)

    monkeypatch.setattr(PreparedLayer, "prepare", slow_prepare)
    times = _tuner.measure(layer, ["blocked", "gemm"])
    assert prepared == ["blocked"] * _tuner.PREPARE_RUNS and times["blocked"] >= 0.05


def test_a_preparation_counts_as_its_median_not_its_first_time(store, monkeypatch):
    # The first preparation after a run finds cold caches; later calls pay less.
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, path="blocked", **kwargs)
    original = PreparedLayer.prepare
    pauses = iter([0.5] + [0.02] * (_tuner.PREPARE_RUNS - 1))

    def prepare(self, path=None, again=False):
        if again and path == "blocked":
            time.sleep(next(pauses))
        return original(self, path, again)

    monkeypatch.setattr(PreparedLayer, "prepare", prepare)
    times = _tuner.measure(layer, ["blocked", "gemm"])
    assert 0.02 <= times["blocked"] < 0.5


def test_prepare_builds_what_a_run_would():
    x, w, b, kwargs = layer_data(k=3)
    for path in ("blocked", "subpixel", "paired", "fir", "columns"):
        layer = PreparedLayer(x.shape, w, b, path=path, **kwargs)
        layer.prepare()
        built = dict(layer._plans), layer._static
        layer.prepare(again=True)
        assert set(layer._plans) == set(built[0]) and (layer._static is None) == (built[1] is None)
        out = np.empty(layer.output_shape, np.float32)
        layer.run_slab(x, 0, 0, out.shape[2], out)
        np.testing.assert_allclose(out, conv_transpose3d_ref(x, w, b, **kwargs), rtol=0, atol=1e-4)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_a_fifo_or_oversized_tuning_file_is_ignored_not_waited_on(store, monkeypatch):
    os.mkfifo(store)
    assert _tuner.load()["machines"] == {}          # would block in open() on a FIFO
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    assert layer.path_source == "measured"
    assert json.loads(store.read_text())["version"] == _tuner.FORMAT_VERSION   # replaced by a file
    monkeypatch.setattr(_tuner, "MAX_FILE_BYTES", 10)
    assert _tuner.load()["machines"] == {}


def test_a_burst_of_host_load_is_not_charged_to_the_path_timed_during_it(monkeypatch):
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, path="blocked", **kwargs)
    clock, calls = [0.0], []
    cost = {"blocked": 1.0, "fir": 1.2, "gemm": 9.0}

    def run_slab(self, *args, **kwargs):
        calls.append(self.path)
        burst = 3 < len(calls) <= 6          # the first timed runs (after 3 untimed ones) take twice as long
        clock[0] += cost[self.path] * (2 if burst else 1)

    monkeypatch.setattr(PreparedLayer, "run_slab", run_slab)
    monkeypatch.setattr(_tuner.time, "perf_counter", lambda: clock[0])
    times = _tuner.measure(layer, ["blocked", "fir", "gemm"])
    assert min(times, key=times.get) == "blocked"
    assert times["fir"] / times["blocked"] == pytest.approx(1.2, rel=0.01)
    # gemm, far slower, is timed in the first round only; the close two in every round
    assert calls.count("gemm") == 1 + _tuner.PROBE_RUNS
    assert calls.count("blocked") >= 1 + _tuner.PROBE_ROUNDS * _tuner.PROBE_RUNS
    assert layer.path == "blocked"


def test_a_blas_path_is_not_timed_beside_the_previous_kernels_spinning_workers(monkeypatch):
    # After a parallel Numba kernel its OpenMP workers spin for a while and a BLAS path
    # runs at half its rate beside them, for longer than a run; an idle pause ends that.
    x, w, b, kwargs = layer_data()
    layer = PreparedLayer(x.shape, w, b, path="blocked", **kwargs)
    clock, spinning = [0.0], [False]
    cost = {"blocked": 1.0, "gemm": 0.8}

    def run_slab(self, *args, **kwargs):
        clock[0] += cost[self.path] * (2 if spinning[0] and self.path == "gemm" else 1)
        spinning[0] = spinning[0] or self.path == "blocked"

    def sleep(seconds):
        assert seconds >= _tuner.PROBE_SETTLE
        spinning[0] = False

    monkeypatch.setattr(PreparedLayer, "run_slab", run_slab)
    monkeypatch.setattr(_tuner.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(_tuner.time, "sleep", sleep)
    times = _tuner.measure(layer, ["blocked", "gemm"])
    assert min(times, key=times.get) == "gemm"
    assert times["gemm"] / times["blocked"] == pytest.approx(0.8, rel=0.01)


def test_a_choice_made_by_other_kernel_code_is_measured_again(store, monkeypatch):
    """After an upgrade that changes the kernels, a stored choice is stale: the digest of
    the engine's code is part of the machine's key."""
    x, w, b, kwargs = layer_data()
    PreparedLayer(x.shape, w, b, **kwargs)
    measured = []
    real = _tuner.measure

    def counting(*args):
        measured.append(1)
        return real(*args)

    monkeypatch.setattr(_tuner, "measure", counting)
    PreparedLayer(x.shape, w, b, **kwargs)
    assert not measured                                  # same code: the stored choice
    monkeypatch.setattr(_tuner, "code_digest", lambda: "0123456789ab")
    _layer.forget_decisions()                            # other code runs in a new process
    PreparedLayer(x.shape, w, b, **kwargs)
    assert measured == [1]                               # other code: measured again
    assert len(json.loads(store.read_text())["machines"]) == 2


def test_the_code_digest_follows_the_kernel_sources():
    digest = _tuner.code_digest()
    assert len(digest) == 12 and digest != "unknown"
    assert f"kernels {digest}" in _tuner.machine_key(2)


def test_a_kept_decision_follows_a_changed_tuning_file(store):
    # conv_transpose3d keeps a measured path only while the tuning file stays the same.
    x, w, b, kwargs = layer_data(3)
    layer = PreparedLayer(x.shape, w, b, **kwargs)
    assert layer.path_source == "measured" and store.exists()
    store.write_text("{corrupt")                             # ignored, measured and written again
    assert PreparedLayer(x.shape, w, b, **kwargs).path_source == "measured"
    saved = json.loads(store.read_text())
    assert saved["version"] == _tuner.FORMAT_VERSION
    [machine] = saved["machines"].values()
    [entry] = machine.values()
    other = "fir" if entry["path"] != "fir" else "blocked"
    entry["path"] = other                                    # a choice stored by another process
    store.write_text(json.dumps(saved))
    assert PreparedLayer(x.shape, w, b, **kwargs).path == other
