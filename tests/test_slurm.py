"""Batch runs on a real one-node SLURM (the ``slurm`` fixture, tests/slurm.py):
``--cluster slurm`` submits worker jobs through dask-jobqueue, nothing
mocked, and its outputs equal a local threaded run byte for byte, also when
a worker job is cancelled mid-run or reaches its walltime, or the client
itself is terminated and resumed.

The manifest's first input is larger than the others: the inputs run
together on the cluster, so the small ones finish while it is still being
computed, and a fault injected once one input is done lands mid-run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import cli, cli_process, textured_tiff

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("slurm")]
JOB = "tilerseg-test"
ARGS = ("--tile", "256", "--halo", "72", "--quiet")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A manifest of three small RGB TIFFs."""
    folder = tmp_path_factory.mktemp("slurm-inputs")
    paths = []
    for k, shape in enumerate([(1536, 1792), (448, 512), (512, 576)]):
        path = folder / f"in{k}.tif"
        textured_tiff(path, shape, seed=10 + k, periods=(23.0 + k, 41.0), noise=25)
        paths.append(str(path))
    manifest = folder / "list.txt"
    manifest.write_text("\n".join(paths) + "\n")
    return str(manifest), paths


@pytest.fixture(scope="module")
def local_run(tmp_path_factory, inputs, tiny_model_dir):
    """The oracle: the same manifest run here with threads."""
    out = tmp_path_factory.mktemp("slurm-local")
    r = cli("run", "--manifest", inputs[0], "-o", f"{out}/", "--weights", tiny_model_dir, *ARGS)
    assert r.returncode == 0, r.stderr
    return tree(out)


def tree(folder) -> dict[str, bytes]:
    """Every output file's bytes by relative path (the ledger aside)."""
    files = {}
    for here, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(here, name)
            if name != "tilerseg-ledger.jsonl":
                with open(path, "rb") as f:
                    files[os.path.relpath(path, folder)] = f.read()
    return files


def ledger(folder) -> list[dict]:
    with open(os.path.join(folder, "tilerseg-ledger.jsonl")) as f:
        return [json.loads(ln) for ln in f]


def cluster_config(tmp_path, **extra) -> str:
    """Two one-core worker jobs; their logs in ``tmp_path/logs``."""
    cfg = {"cluster": "slurm", "jobs": 2, "cores": 1, "memory": "2GB", "processes": 1, "walltime": "00:10:00",
           "job_name": JOB, "log_directory": str(tmp_path / "logs"), "local_directory": str(tmp_path / "scratch"),
           "death_timeout": 30, **extra}
    path = tmp_path / "cluster.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in cfg.items()))
    return str(path)


def run_args(inputs, out, tiny_model_dir, config):
    return ("run", "--manifest", inputs[0], "-o", f"{out}/", "--weights", tiny_model_dir, *ARGS,
            "--cluster", "slurm", "--cluster-config", config)


def wait_for(predicate, proc, timeout=300, what="") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before {what}: {proc.communicate()[1][-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def blocks_done(out) -> int:
    """Blocks finished so far in the run's unfinished outputs (their ``done`` marks)."""
    n = 0
    for here, dirs, names in os.walk(out):
        if os.path.basename(here) == "done":
            n += len(names)
    return n


def done_lines(out) -> int:
    try:
        return sum(e["status"] == "done" for e in ledger(out))
    except OSError:
        return 0


def test_manifest_through_slurm_equals_a_local_run(tmp_path, slurm, inputs, local_run, tiny_model_dir):
    out = tmp_path / "out"
    before = {j["JobId"] for j in slurm.finished()}
    r = cli(*run_args(inputs, out, tiny_model_dir, cluster_config(tmp_path)))
    assert r.returncode == 0, r.stderr
    assert tree(out) == local_run
    assert [e["status"] for e in ledger(out)] == ["done"] * 3
    assert slurm.wait_empty(JOB) == []  # the jobs left the queue with the run
    ran = slurm.finished_since(before, JOB, 2)
    assert len(ran) == 2, ran  # the scheduler's log shows both worker jobs
    logs = "".join((tmp_path / "logs" / n).read_text() for n in os.listdir(tmp_path / "logs"))
    assert logs.count("Registered to") >= 2, logs[-3000:]  # and each worker joined


def test_a_cancelled_worker_job_moves_its_tasks(tmp_path, slurm, inputs, local_run, tiny_model_dir):
    out = tmp_path / "out"
    proc = cli_process(*run_args(inputs, out, tiny_model_dir, cluster_config(tmp_path)))
    running = lambda: [j for j in slurm.jobs(JOB) if j["state"] == "RUNNING"]  # noqa: E731
    wait_for(lambda: len(running()) == 2 and done_lines(out) >= 1, proc, what="two workers and one input done")
    assert done_lines(out) < 3  # the large input is still running
    slurm.cmd("scancel", running()[0]["id"])
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert tree(out) == local_run
    assert [e["status"] for e in ledger(out)] == ["done"] * 3
    assert slurm.wait_empty(JOB) == []


def test_a_terminated_client_records_it_cancels_its_jobs_and_resumes(tmp_path, slurm, inputs, local_run,
                                                                     tiny_model_dir):
    out = tmp_path / "out"
    config = cluster_config(tmp_path)
    proc = cli_process(*run_args(inputs, out, tiny_model_dir, config))
    wait_for(lambda: done_lines(out) >= 1, proc, what="one input done")
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0
    last = ledger(out)[-1]
    assert last["status"] == "failed" and "terminated" in last["error"], last
    stopped = {e["input"] for e in ledger(out) if e["status"] == "failed" and "terminated" in e["error"]}
    assert inputs[1][0] in stopped  # the large input, still running when the signal came
    assert slurm.wait_empty(JOB, timeout=30) == []  # no worker job outlives its client
    r = cli(*run_args(inputs, out, tiny_model_dir, config), "--resume")
    assert r.returncode == 0, r.stderr
    assert tree(out) == local_run
    assert [e["status"] for e in ledger(out)][-2:] != ["failed", "failed"]
    assert slurm.wait_empty(JOB) == []


def test_a_worker_job_at_its_walltime_is_replaced(tmp_path, slurm, tiny_model_dir):
    """SLURM itself ends the worker job at its time limit (SIGTERM, then
    SIGKILL after KillWait) mid-run: a replacement job starts, takes the
    lost tasks, and the output is the local run's bytes.

    The limit is cut on the running job with ``scontrol update`` to SLURM's
    smallest, one minute: slurmctld's own walltime path ends it (it checks
    limits about every 30 s). The job's processes are stopped (SIGSTOP) once
    its first block is written, so the run cannot finish before the limit
    however fast this machine is (a 4096² input took 52 s on one core of a
    Xeon with AMX, and its job was cancelled at the run's end, not timed
    out); 2048² then suffices."""
    src = tmp_path / "big.tif"
    textured_tiff(src, (2048, 2048), seed=3, periods=(29.0, 43.0), noise=25)
    local = tmp_path / "local" / "mask.zarr"
    out = tmp_path / "out" / "mask.zarr"
    local.parent.mkdir()
    out.parent.mkdir()
    r = cli("run", str(src), "-o", str(local), "--weights", tiny_model_dir, *ARGS)
    assert r.returncode == 0, r.stderr
    before = {j["JobId"] for j in slurm.finished()}
    proc = cli_process("run", str(src), "-o", str(out), "--weights", tiny_model_dir, *ARGS, "--cluster", "slurm",
                       "--cluster-config", cluster_config(tmp_path, jobs=1))
    running = lambda: [j for j in slurm.jobs(JOB) if j["state"] == "RUNNING"]  # noqa: E731
    wait_for(lambda: len(running()) == 1 and blocks_done(out.parent) >= 1, proc, what="the worker's first block")
    victim = running()[0]["id"]
    assert slurm.freeze(victim), f"no process of job {victim} found"
    slurm.cmd("scontrol", "update", f"JobId={victim}", "TimeLimit=1")
    ended = lambda: [j for j in slurm.finished() if j.get("JobId") == victim]  # noqa: E731
    wait_for(ended, proc, timeout=240, what=f"job {victim} to reach its time limit")
    assert ended()[0].get("JobState") == "TIMEOUT", ended()
    stdout, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr
    assert tree(out) == tree(local)
    assert slurm.wait_empty(JOB) == []  # the replacement is cancelled with the run
    ran = slurm.finished_since(before, JOB, 2)
    assert len(ran) >= 2, ran  # the timed-out job and its replacement


def test_the_printed_cluster_script_runs_a_worker_that_connects(tmp_path, slurm):
    from distributed import Client, LocalCluster

    config = cluster_config(tmp_path)
    with LocalCluster(n_workers=0, dashboard_address=None) as cluster, Client(cluster) as client:
        r = cli("cluster-script", config, "--scheduler", cluster.scheduler_address)
        assert r.returncode == 0, r.stderr
        script = tmp_path / "worker.sh"
        script.write_text(r.stdout)
        job = slurm.cmd("sbatch", "--parsable", str(script)).strip().split(";")[0]
        try:
            client.wait_for_workers(1, timeout=120)
            assert client.run(lambda: os.environ.get("SLURM_JOB_ID")) and \
                set(client.run(lambda: os.environ.get("SLURM_JOB_ID")).values()) == {job}
        finally:
            slurm.cmd("scancel", job)
    assert slurm.wait_empty(JOB) == []

