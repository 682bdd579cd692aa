"""``--jobs``: worker processes (spawned), thread split, same bytes as one process; the real console script."""

import json
import multiprocessing
import os
import subprocess
from concurrent.futures import ProcessPoolExecutor

from convt3d_cli import batch as batch_module
from helpers import console_script


def _console_script():
    return console_script()


def test_jobs_2_equals_jobs_1_bit_for_bit(kit, batch, scans, good_inputs):
    inputs = good_inputs[:2] + [f"scans/{kit.CORRUPT}"] + good_inputs[2:]
    one = batch(*inputs, "--out-dir", "one", "--json")
    two = batch(*inputs, "--out-dir", "two", "--json", "--jobs", "2")
    assert one.exit_code == two.exit_code == 1
    assert kit.summary(one.stderr) == kit.summary(two.stderr) == (4, 0, 1)
    assert kit.digests(batch.cwd / "one") == kit.digests(batch.cwd / "two")
    assert sorted(kit.digests(batch.cwd / "two")) == sorted(kit.GOOD)
    first, second = kit.json_lines(one.stdout), kit.json_lines(two.stdout)
    assert {k: (v["status"], v["error"]) for k, v in first.items()} == \
        {k: (v["status"], v["error"]) for k, v in second.items()}
    for spec, record in first.items():
        expected = kit.stable(record)
        expected["output"] = expected["output"].replace("one/", "two/")
        assert kit.stable(second[spec]) == expected


def test_worker_processes_split_the_cores():
    # What a worker sees after the initializer: Numba and BLAS capped at the share given.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(1, mp_context=context, initializer=batch_module._init_worker,
                             initargs=(1,)) as pool:
        assert pool.submit(os.getenv, "NUMBA_NUM_THREADS").result() == "1"
        assert pool.submit(os.getenv, "OPENBLAS_NUM_THREADS").result() == "1"
        from convt3d_cli.threads import use as set_threads

        assert pool.submit(set_threads, 1).result() == 1     # returns the thread count it found


def test_threads_default_to_a_share_of_the_cores(monkeypatch, tmp_path):
    seen = {}

    def fake_pool(tasks, jobs, threads, on_result):
        seen.update(jobs=jobs, threads=threads)
        for task in tasks:
            on_result(batch_module.lost_result(task, "not run"))

    monkeypatch.setattr(batch_module, "_run_local", fake_pool)
    monkeypatch.setattr(batch_module, "available_cores", lambda: 8)
    inputs = [str(tmp_path / f"s{i}.nii") for i in range(5)]
    batch_module.run_batch(inputs, str(tmp_path / "out"), jobs=3, kernel="linear", layer_options={"stride": 2})
    assert seen == {"jobs": 3, "threads": 2}
    batch_module.run_batch(inputs[:2], str(tmp_path / "out"), jobs=16, kernel="linear",
                           layer_options={"stride": 2})
    assert seen == {"jobs": 2, "threads": 4}                   # no more workers than files
    results = batch_module.run_batch(inputs, str(tmp_path / "out"), jobs=3, threads=1, kernel="linear",
                                     layer_options={"stride": 2})
    assert seen["threads"] == 1
    assert [r.index for r in results] == list(range(5))       # input order, whatever the completion order


def test_console_script_with_jobs(kit, tmp_path, scans, good_inputs):
    (tmp_path / "list.txt").write_text("\n".join(good_inputs + [f"scans/{kit.CORRUPT}"]) + "\n")
    proc = subprocess.run([str(_console_script()), "batch", "--from-list", "list.txt", "--out-dir", "out",
                           "--suffix", "_x2", "--jobs", "2", "--json", *kit.LAYER],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(r["status"] for r in records) == ["failed"] + ["ok"] * 4
    assert kit.summary(proc.stderr) == (4, 0, 1)
    assert "\x1b" not in proc.stderr                           # no progress bar when stderr is no terminal
    assert sorted(os.listdir(tmp_path / "out")) == sorted(
        name.replace(".nii", "_x2.nii", 1) for name in kit.GOOD)


DYING_WORKER = """
import os

from convt3d_cli import batch


def run_task(task):
    # Stands in for batch.run_task in the workers: the process dies on one file, like an OOM kill.
    if "sub02" in task.input:
        os._exit(137)
    return batch.run_task(task)
"""


def test_a_worker_that_dies_fails_only_its_file(kit, tmp_path, scans, good_inputs, monkeypatch):
    # The stand-in must be importable in the spawned workers (they get this sys.path), under a
    # name of its own: the test modules' `conftest` imports would be ambiguous there.
    helpers = tmp_path / "helpers"
    helpers.mkdir()
    (helpers / "convt3d_dying_worker.py").write_text(DYING_WORKER)
    monkeypatch.syspath_prepend(str(helpers))
    import convt3d_dying_worker

    monkeypatch.setattr(batch_module, "run_task", convt3d_dying_worker.run_task)
    monkeypatch.chdir(tmp_path)
    seen = []
    results = batch_module.run_batch(good_inputs, "out", jobs=2, kernel="linear", layer_options={"stride": 2},
                                     on_result=seen.append)
    assert [r.status for r in results] == ["ok", "failed", "ok", "ok"], [r.error for r in results]
    assert "worker process ended abruptly, twice" in results[1].error
    assert len(seen) == 4
    assert sorted(os.listdir(tmp_path / "out")) == sorted(n for n in kit.GOOD if "sub02" not in n)
