"""One Zarr volume computed block by block on a real Dask cluster (2 worker processes on 127.0.0.1)."""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
from helpers import invoke_in
from zarrkit import read_array, same_bits, write_image

from convt3d_cli import errors, pipeline
from convt3d_cli.engine import conv_transpose3d
from convt3d_cli.engine._layer import one_layer_process

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def warm(tmp_path_factory):
    """Compile the kernels the tests use in this process first: the workers then load them from the cache."""
    folder = tmp_path_factory.mktemp("warm")
    x = np.ones((2, 6, 6, 6), np.float32)
    store = write_image(folder / "w.ome.zarr", x, axes="czyx")
    np.save(folder / "w.npy", np.ones((2, 3, 3, 3, 3), np.float32))
    pipeline.run_file(store, str(folder / "o.ome.zarr"), weights=str(folder / "w.npy"),
                      layer_options={"stride": 2, "padding": 1})
    pipeline.run_file(store, str(folder / "p.ome.zarr"), kernel="linear", layer_options={"stride": 3})


@pytest.fixture
def cluster(warm):
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as local:
        yield local


def _layer(tmp_path, rng, cin=2, cout=3):
    weight = rng.standard_normal((cin, cout, 3, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(cout).astype(np.float32)
    np.savez(tmp_path / "layer.npz", weight=weight, bias=bias)
    return str(tmp_path / "layer.npz"), weight, bias


def test_cluster_blocks_equal_the_in_memory_engine(tmp_path, rng, cluster):
    # A few MB out (3 x 79 x 83 x 88 float32), input chunks smaller than the blocks' windows.
    x = rng.standard_normal((2, 40, 42, 44)).astype(np.float32)
    write_image(tmp_path / "in.ome.zarr", x, axes="czyx", chunks=(2, 9, 10, 11))
    layer, weight, bias = _layer(tmp_path, rng)
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "out.ome.zarr", "--weights", "layer.npz", "--stride", "2",
                       "--padding", "1", "--chunks", "8,12,10", "--max-memory", "12M",
                       "--scheduler", cluster.scheduler_address, "--json", "-q")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["blocks"] > 8
    with one_layer_process():  # the path a run's rules take for this layer
        expected = conv_transpose3d(x[None], weight, bias, stride=2, padding=1, dtype="float32")[0]
    assert same_bits(read_array(tmp_path / "out.ome.zarr"), expected)
    local = pipeline.run_file(str(tmp_path / "in.ome.zarr"), str(tmp_path / "local.ome.zarr"), weights=layer,
                              layer_options={"stride": 2, "padding": 1}, store_options={"chunks": (8, 12, 10)})
    assert same_bits(read_array(tmp_path / "local.ome.zarr"), expected)
    # The same NGFF metadata as the local run.
    here, there = (json.loads((tmp_path / name / "zarr.json").read_text())["attributes"]["ome"]
                   for name in ("out.ome.zarr", "local.ome.zarr"))
    there["multiscales"][0]["name"] = "out.ome.zarr"
    assert here == there
    assert local["blocks"] >= 1


def test_stride_3_builtin_and_groups_on_the_cluster(tmp_path, rng, cluster):
    x = rng.standard_normal((4, 14, 15, 16)).astype(np.float32)     # stride 3: 2.3 MB out
    store = write_image(tmp_path / "in.ome.zarr", x, axes="czyx")
    for name, kwargs in (("linear", {"kernel": "linear", "layer_options": {"stride": 3}}),
                         ("groups", {"weights": None, "layer_options": {"stride": 2, "groups": 2}})):
        if name == "groups":
            weight = rng.standard_normal((4, 3, 2, 2, 2)).astype(np.float32)
            np.save(tmp_path / "g.npy", weight)
            kwargs["weights"] = str(tmp_path / "g.npy")
        opts = {"store_options": {"chunks": (6, 8, 10)}, "max_memory": 9 << 20}
        remote = pipeline.run_file(store, str(tmp_path / f"{name}-c.ome.zarr"), scheduler=cluster.scheduler_address,
                                   **kwargs, **opts)
        pipeline.run_file(store, str(tmp_path / f"{name}-l.ome.zarr"), **kwargs, **opts)
        assert remote["blocks"] > 1 and remote["scheduler"] == cluster.scheduler_address
        assert same_bits(read_array(tmp_path / f"{name}-c.ome.zarr"), read_array(tmp_path / f"{name}-l.ome.zarr"))


def test_a_worker_killed_mid_run_changes_nothing(tmp_path, rng, cluster):
    x = rng.standard_normal((8, 32, 32, 32)).astype(np.float32)
    store = write_image(tmp_path / "in.ome.zarr", x, axes="czyx", chunks=(8, 8, 8, 8))
    layer, weight, bias = _layer(tmp_path, rng, 8, 8)
    out = tmp_path / "out.ome.zarr"
    markers = tmp_path / ".out.ome.zarr.convt3d-partial" / ".convt3d-blocks"
    outcome = {}
    with distributed.Client(cluster.scheduler_address) as client:
        victim = next(iter(client.run(os.getpid).values()))

    def run():
        try:
            outcome["report"] = pipeline.run_file(store, str(out), weights=layer,
                                                  layer_options={"stride": 2, "padding": 1},
                                                  store_options={"chunks": (8, 8, 8)}, max_memory=10 << 20,
                                                  scheduler=cluster.scheduler_address)
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    while not (markers.is_dir() and len(os.listdir(markers)) >= 2) and time.monotonic() < deadline \
            and thread.is_alive():
        time.sleep(0.01)
    done_at_kill = len(os.listdir(markers)) if markers.is_dir() else None
    if thread.is_alive():
        os.kill(victim, signal.SIGKILL)
    thread.join(300)
    assert "error" not in outcome, outcome.get("error")
    report = outcome["report"]
    assert report["blocks"] >= 8
    assert done_at_kill is not None and done_at_kill < report["blocks"], "the run ended before the kill"
    with one_layer_process():  # the path a run's rules take for this layer
        expected = conv_transpose3d(x[None], weight, bias, stride=2, padding=1, dtype="float32")[0]
    assert same_bits(read_array(out), expected)


def test_a_damaged_chunk_on_the_cluster_is_one_error_and_no_output(tmp_path, rng, cluster):
    store = write_image(tmp_path / "in.ome.zarr", rng.standard_normal((8, 8, 8)).astype(np.float32), chunks=(4, 4, 4))
    (tmp_path / "in.ome.zarr" / "0" / "c" / "0" / "1" / "1").write_bytes(os.urandom(64))
    result = invoke_in(tmp_path, "run", "in.ome.zarr", "out.ome.zarr", "-k", "linear", "--stride", "2", "-q",
                       "--chunks", "4", "--scheduler", cluster.scheduler_address)
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "0/c/0/1/1" in lines[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.ome.zarr"]
    with pytest.raises(errors.FileFormatError, match="0/c/0/1/1"):
        pipeline.run_file(store, str(tmp_path / "out.ome.zarr"), kernel="linear", layer_options={"stride": 2},
                          scheduler=cluster.scheduler_address)


def test_scheduler_and_resume_are_for_zarr_outputs(tmp_path, rng):
    np.save(tmp_path / "a.npy", np.ones((4, 4, 4), np.float32))
    for flag in (["--scheduler", "tcp://127.0.0.1:9"], ["--resume"]):
        result = invoke_in(tmp_path, "run", "a.npy", "b.npy", "-k", "linear", "--stride", "2", *flag)
        assert result.exit_code == 2 and "for Zarr outputs" in result.output
