"""Decisions kept between layers of the same shapes (``_layer._decisions``).

``conv_transpose3d`` builds a layer per call; the register block and path of a layer
with the shapes and settings of a recent one are taken from it, never from its weights'
values, except the ``col2im`` path's need for finite weights.
"""

import os

import numpy as np
import pytest

from convt3d_cli.engine import PreparedLayer, _layer, conv_transpose3d
from helpers import child_finishes
from reference import conv_transpose3d_ref


@pytest.fixture
def counted(monkeypatch):
    """How often the rules are consulted."""
    calls = []
    real = _layer.choose_path

    def choose(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(_layer, "choose_path", choose)
    monkeypatch.setattr(_layer, "COLUMNS_MAX_MACS", 0)
    return calls


def _data(seed=0, cin=6, cout=5):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((1, cin, 5, 6, 7)).astype(np.float32),
            rng.standard_normal((cin, cout, 3, 3, 3)).astype(np.float32))


def test_a_layer_of_known_shapes_takes_the_kept_decision(counted):
    x, w = _data()
    first = PreparedLayer(x.shape, w, None, 2, 1)
    second = PreparedLayer(x.shape, w * 3, None, 2, 1)       # other weights, same shapes
    assert len(counted) == 1
    assert (second.path, second.block, second.path_source) == (first.path, first.block, first.path_source)
    out = conv_transpose3d(x, w * 3, None, 2, 1)
    np.testing.assert_allclose(out, conv_transpose3d_ref(x, w * 3, None, stride=2, padding=1), rtol=1e-4,
                               atol=1e-4)


@pytest.mark.parametrize("change", ["input", "stride", "dtype", "threads", "pinned", "environment"])
def test_other_shapes_or_settings_are_decided_again(counted, monkeypatch, change):
    x, w = _data()
    PreparedLayer(x.shape, w, None, 2, 1)
    args, kwargs = [x.shape, w, None, 2, 1], {}
    if change == "input":
        args[0] = (2,) + x.shape[1:]
    elif change == "stride":
        args[3] = 1
    elif change == "dtype":
        kwargs["dtype"] = np.float64
    elif change == "threads":
        from convt3d_cli import threads

        monkeypatch.setattr(_layer, "_threads", lambda: threads.current() + 1)
    elif change == "pinned":
        kwargs["path"] = "fir"
    else:
        monkeypatch.setenv("CONVT3D_PATH", "fir")
    layer = PreparedLayer(*args, **kwargs)
    assert len(counted) == 2 or layer.path_source == "pinned"
    if change in ("pinned", "environment"):
        assert layer.path == "fir"


def test_col2im_is_not_kept_for_weights_that_are_not_finite():
    x, w = _data(1, cin=16, cout=4)
    assert PreparedLayer(x.shape, w, None, 2, 1, path="col2im").path == "col2im"
    w[0, 0, 0, 0, 0] = np.nan
    layer = PreparedLayer(x.shape, w, None, 2, 1, path="col2im")
    assert layer.path == "blocked"                           # BLAS would spread the NaN
    assert PreparedLayer(x.shape, np.ones_like(w), None, 2, 1, path="col2im").path == "col2im"


def test_threads_deciding_the_same_layers_agree():
    from concurrent.futures import ThreadPoolExecutor

    shapes = [_data(seed, cin=4 + seed % 3) for seed in range(6)]
    expected = [PreparedLayer(x.shape, w, None, 2, 1).path for x, w in shapes]
    _layer.forget_decisions()
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda k: PreparedLayer(shapes[k % 6][0].shape, shapes[k % 6][1], None, 2, 1).path,
                            range(48)))
    assert got == [expected[k % 6] for k in range(48)]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this system")
def test_a_child_forked_while_the_lock_is_held_can_still_decide():
    x, w = _data()
    with _layer._decisions_lock:     # as if another thread were storing a decision at the fork
        pid = os.fork()
        if pid == 0:                 # the child: must not wait for a lock no thread of its own holds
            try:
                PreparedLayer(x.shape, w, None, 2, 1)
            finally:
                os._exit(0)
    assert child_finishes(pid), "the forked child hung on the decisions lock"


def test_a_layer_made_untuned_measures_when_asked(counted, monkeypatch):
    """``tune=False`` keeps the rules' path (and keeps nothing for other layers) until
    ``tune()``, which measures once and keeps the measured decision."""
    from convt3d_cli.engine import _tuner

    measured = []

    def tuned(layer, candidates, threads):
        measured.append(candidates)
        return candidates[-1]

    monkeypatch.setattr(_tuner, "enabled", lambda: True)
    monkeypatch.setattr(_tuner, "TUNE_MIN_MACS", 0)
    monkeypatch.setattr(_tuner, "tuned_path", tuned)
    x, w = _data()
    layer = PreparedLayer(x.shape, w, None, 2, 1, tune=False)
    assert layer.path_source == "rule" and not measured and not _layer._decisions
    layer.tune()
    assert layer.path_source == "measured" and len(measured) == 1
    assert layer.path == measured[0][-1]
    layer.tune()                                   # once only
    again = PreparedLayer(x.shape, w, None, 2, 1)   # the kept, measured decision
    assert len(measured) == 1 and (again.path, again.path_source) == (layer.path, "measured")
    out = np.empty(layer.output_shape, np.float32)
    layer.run_slab(x, 0, 0, layer.output_shape[2], out)
    np.testing.assert_allclose(out, conv_transpose3d_ref(x, w, None, stride=2, padding=1), rtol=1e-4, atol=1e-4)
