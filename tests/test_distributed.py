"""`--scheduler` on a dask cluster of worker processes equals the local run:
a LocalCluster, and a scheduler and workers started with the `dask`
commands, as a user would, one of them killed mid-run."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cli, cli_process, data, textured_tiff
from tilerseg.allocator import WORKER_ENV


@pytest.mark.slow
def test_scheduler_address_output_equals_local(tmp_path, tiny_model_dir, monkeypatch):
    import zarr
    from distributed import LocalCluster

    src = data("rasterio/RGB.byte.tif")
    args = ["--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--quiet"]
    for k in WORKER_ENV:  # workers started without the allocator settings (an earlier cluster may have left them)
        monkeypatch.delenv(k, raising=False)
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        r = cli("run", src, "-o", str(tmp_path / "d.zarr"), "--scheduler", cluster.scheduler_address, *args)
        assert r.returncode == 0, r.stderr
    # these workers were started without MALLOC_ARENA_MAX/MALLOC_MMAP_MAX_: one warning, naming the fix
    assert r.stderr.count("2 of 2 dask workers were started without tilerseg's allocator settings") == 1, r.stderr
    assert "pre-spawn-environ" in r.stderr
    r = cli("run", src, "-o", str(tmp_path / "l.zarr"), *args)
    assert r.returncode == 0, r.stderr
    a = zarr.open_array(str(tmp_path / "d.zarr" / "0"), mode="r")[...]
    b = zarr.open_array(str(tmp_path / "l.zarr" / "0"), mode="r")[...]
    assert np.array_equal(a, b) and (a == 255).any()


@pytest.mark.slow
def test_nanny_config_starts_workers_with_the_allocator_settings():
    """The advice the warning gives for LocalCluster works: under
    cluster.nanny_config the workers are started with the settings,
    under env= they are not (it is applied after the start).

    A LocalCluster's nannies run in this process and leave their
    pre-spawn variables in its os.environ, which later workers inherit:
    env= runs first, and the environment is restored after."""
    import dask
    from distributed import Client, LocalCluster

    from tilerseg.allocator import started_with_env
    from tilerseg.cluster import nanny_config

    saved = dict(os.environ)
    try:
        for k in WORKER_ENV:
            os.environ.pop(k, None)
        with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None,
                          env=WORKER_ENV) as cluster, Client(cluster) as c:
            assert list(c.run(started_with_env).values()) == [False]
        with dask.config.set(nanny_config()), LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                                           dashboard_address=None) as cluster, Client(cluster) as c:
            assert list(c.run(started_with_env).values()) == [True]
    finally:
        os.environ.clear()
        os.environ.update(saved)


def _dask(*args, cwd) -> subprocess.Popen:
    """`dask ARGS` in its own session (so a kill takes its nanny and worker)."""
    dask = shutil.which("dask", path=os.path.dirname(sys.executable)) or "dask"
    return subprocess.Popen([dask, *args], cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, env=dict(os.environ, HF_HUB_OFFLINE="1", **WORKER_ENV))


def _stop(proc: subprocess.Popen, sig=signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    proc.wait(timeout=60)


@pytest.mark.slow
def test_dask_commands_scheduler_and_workers_with_one_killed(tmp_path, tiny_model_dir):
    """`dask scheduler` and two `dask worker` processes (run in another
    folder: they open the input by its path); one is killed with SIGKILL
    mid-run, its tasks rerun on the other: the bytes of the local run."""
    from distributed import Client

    src = str(tmp_path / "in.tif")
    textured_tiff(src, (800, 800), seed=5, periods=(31.0, 47.0), noise=25)
    args = ["--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--batch-size", "1", "--quiet"]
    r = cli("run", src, "-o", str(tmp_path / "local.ome.tif"), *args)
    assert r.returncode == 0, r.stderr
    elsewhere = tmp_path / "workers"
    elsewhere.mkdir()
    sched_file = str(tmp_path / "scheduler.json")
    procs = [_dask("scheduler", "--scheduler-file", sched_file, "--port", "0", "--dashboard-address", ":0",
                   cwd=elsewhere)]
    try:
        for _ in range(2):
            procs.append(_dask("worker", "--scheduler-file", sched_file, "--nthreads", "1", "--nworkers", "1",
                               cwd=elsewhere))
        t0 = time.monotonic()
        while not os.path.exists(sched_file) and time.monotonic() - t0 < 60:
            time.sleep(0.2)
        with Client(scheduler_file=sched_file, timeout="60s") as client:
            client.wait_for_workers(2, timeout=120)
            out = tmp_path / "dist.ome.tif"
            proc = cli_process("run", src, "-o", str(out), "--scheduler", client.scheduler.address, *args)
            marks = tmp_path / ".dist.ome.tif.tilerseg" / "done"
            while not (marks.is_dir() and len(os.listdir(marks)) >= 4):
                assert proc.poll() is None, proc.communicate()[1]
                time.sleep(0.05)
            _stop(procs[1], signal.SIGKILL)  # a worker lost: its tasks rerun on the other
            stdout, stderr = proc.communicate(timeout=600)
            assert proc.returncode == 0, stderr
            assert "allocator settings" not in stderr  # started as the README says: nothing to warn about
            assert len(client.scheduler_info()["workers"]) == 1
    finally:
        for p in reversed(procs):
            _stop(p)
    assert out.read_bytes() == (tmp_path / "local.ome.tif").read_bytes()


@pytest.mark.slow
def test_manifest_inputs_run_together_on_a_scheduler(tmp_path, tiny_model_dir):
    """A manifest's inputs on a scheduler start together (all three begin
    before any is written), and each output equals the local run's; the
    ledger has a `done` line per input."""
    import json

    import zarr
    from distributed import LocalCluster

    inputs = []
    for k in range(3):
        path = tmp_path / f"in{k}.tif"
        textured_tiff(str(path), (300 + 40 * k, 360), seed=k, periods=(23.0 + k, 41.0), noise=20)
        inputs.append(str(path))
    manifest = tmp_path / "list.txt"
    manifest.write_text("\n".join(inputs) + "\n")
    args = ["--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--quiet", "--manifest", str(manifest)]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0",
                      memory_limit="4GiB") as cluster:
        r = cli("run", "-o", str(tmp_path / "dist") + "/", "--scheduler", cluster.scheduler_address, *args)
        # without --tile, windows are sized for the workers' memory, not this machine's
        auto = cli("run", inputs[0], "-o", str(tmp_path / "auto.zarr"), "--weights", tiny_model_dir,
                   "--scheduler", cluster.scheduler_address, "--quiet")
    assert r.returncode == 0, r.stderr
    assert auto.returncode == 0 and "1.00 GiB, 25% of a dask worker's memory limit (4.00 GiB)" in auto.stderr, \
        auto.stderr
    lines = r.stdout.splitlines()
    starts = [n for n, line in enumerate(lines) if line.startswith("[")]
    wrote = [n for n, line in enumerate(lines) if line.startswith("wrote ")]
    assert len(starts) == 3 and len(wrote) == 3 and max(starts) < min(wrote), r.stdout
    r = cli("run", "-o", str(tmp_path / "local") + "/", *args)
    assert r.returncode == 0, r.stderr
    assert r.stdout.index("[2/3]") > r.stdout.index("wrote "), "a local run takes one input at a time"
    for k in range(3):
        a = zarr.open_array(str(tmp_path / "dist" / f"in{k}.mask.zarr" / "0"), mode="r")[...]
        b = zarr.open_array(str(tmp_path / "local" / f"in{k}.mask.zarr" / "0"), mode="r")[...]
        assert a.shape == (300 + 40 * k, 360) and np.array_equal(a, b)
    ledger = [json.loads(x) for x in (tmp_path / "dist" / "tilerseg-ledger.jsonl").read_text().splitlines()]
    assert sorted(e["input"] for e in ledger if e["status"] == "done") == sorted(inputs)
