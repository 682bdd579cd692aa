"""``--scheduler``: the same batch on a real Dask cluster (scheduler and two worker processes on 127.0.0.1)."""

import pytest

distributed = pytest.importorskip("distributed")

from convt3d_cli import _distributed, batch as batch_module  # noqa: E402


@pytest.fixture(scope="module")
def scheduler(warm_kernels):
    """Address of a local Dask cluster: 2 worker processes with 1 thread each, no dashboard."""
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                                  dashboard_address=None) as cluster:
        yield cluster.scheduler_address


def test_cluster_batch_equals_local_batch(kit, batch, scans, good_inputs, scheduler):
    inputs = good_inputs[:1] + [f"scans/{kit.CORRUPT}"] + good_inputs[1:]
    local = batch(*inputs, "--out-dir", "local", "--suffix", "_x2", "--json")
    remote = batch(*inputs, "--out-dir", "remote", "--suffix", "_x2", "--json", "--scheduler", scheduler)
    assert local.exit_code == remote.exit_code == 1, remote.stderr
    assert kit.summary(local.stderr) == kit.summary(remote.stderr) == (4, 0, 1)
    # Same files, byte for byte (the workers run in other processes, from other folders).
    assert kit.digests(batch.cwd / "local") == kit.digests(batch.cwd / "remote")
    assert len(kit.digests(batch.cwd / "remote")) == len(kit.GOOD)
    # Same reports, statuses and reasons, with the paths as the user gave them.
    here, there = kit.json_lines(local.stdout), kit.json_lines(remote.stdout)
    assert set(here) == set(there) == set(inputs)
    for spec, record in here.items():
        expected = kit.stable(record)
        expected["output"] = expected["output"].replace("local/", "remote/")
        assert kit.stable(there[spec]) == expected
    assert there[f"scans/{kit.CORRUPT}"]["status"] == "failed"
    assert f"FAILED scans/{kit.CORRUPT}: " in remote.stderr


def test_cluster_resume_with_skip_existing(kit, batch, scans, good_inputs, scheduler):
    assert batch(*good_inputs[:2], "--out-dir", "out", "--scheduler", scheduler).exit_code == 0
    result = batch(*good_inputs, "--out-dir", "out", "--scheduler", scheduler, "--skip-existing")
    assert result.exit_code == 0, result.stderr
    assert kit.summary(result.stderr) == (2, 2, 0)


def test_unreachable_scheduler_is_one_error_line(batch, scans, good_inputs):
    import dask

    with dask.config.set({"distributed.comm.timeouts.connect": "1s"}):
        result = batch(good_inputs[0], "--out-dir", "out", "--scheduler", "tcp://127.0.0.1:9")
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: cannot reach the Dask scheduler at tcp://127.0.0.1:9")
    assert len(result.stderr.splitlines()) == 1


def test_lost_tasks_explain_what_to_do():
    task = batch_module.make_task(0, "a.nii.gz", "out/a.nii.gz", {})
    missing = _distributed._lost(task, ModuleNotFoundError("No module named 'convt3d_cli'"))
    assert missing.status == "failed" and "install convt3d on every worker" in missing.error
    killed = type("KilledWorker", (Exception,), {})
    assert "--skip-existing" in _distributed._lost(task, killed("x")).error
