"""Resume and fault tolerance: a run killed with SIGKILL continues with
--resume to the same bytes, a dask worker killed mid-run has its tasks
rerun elsewhere, and one bad input of a batch fails alone."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import cli, cli_process, data, textured_tiff


@pytest.fixture(scope="module")
def big_tiff(tmp_path_factory) -> str:
    """1200x1200 RGB: 121 windows of the tiny model, one per block, a run of several seconds."""
    path = tmp_path_factory.mktemp("resume") / "big.tif"
    textured_tiff(path, (1200, 1200), seed=7, periods=(41.0, 29.0), noise=25)
    return str(path)


def _args(src, model):
    return [src, "--weights", model, "--tile", "256", "--halo", "72", "--batch-size", "1", "--quiet"]


def _start(*args) -> subprocess.Popen:
    return cli_process("run", *args)


def _wait_for_marks(marks: str, n: int, proc: subprocess.Popen, timeout: float = 300) -> int:
    t0 = time.time()
    while time.time() - t0 < timeout:
        k = len(os.listdir(marks)) if os.path.isdir(marks) else 0
        if k >= n:
            return k
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was interrupted: {proc.stderr.read()}")
        time.sleep(0.02)
    raise AssertionError("no blocks finished in time")


def _ledger(folder) -> list[dict]:
    with open(os.path.join(folder, "tilerseg-ledger.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def reference(big_tiff, tiny_model_dir, tmp_path_factory) -> bytes:
    out = tmp_path_factory.mktemp("ref") / "ref.ome.tif"
    r = cli("run", *_args(big_tiff, tiny_model_dir), "-o", str(out))
    assert r.returncode == 0, r.stderr
    return out.read_bytes()


@pytest.mark.slow
def test_killed_run_resumes_to_identical_bytes_computing_fewer_windows(tmp_path, big_tiff, tiny_model_dir,
                                                                        reference):
    out = tmp_path / "out.ome.tif"
    marks = str(tmp_path / ".out.ome.tif.tilerseg" / "done")
    proc = _start(*_args(big_tiff, tiny_model_dir), "-o", str(out))
    _wait_for_marks(marks, 20, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = len(os.listdir(marks))
    assert not out.exists()  # nothing that looks like an output
    assert _ledger(tmp_path) if (tmp_path / "tilerseg-ledger.jsonl").exists() else True

    r = cli("run", *_args(big_tiff, tiny_model_dir), "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    assert out.read_bytes() == reference
    assert not (tmp_path / ".out.ome.tif.tilerseg").exists()
    entry = _ledger(tmp_path)[-1]
    assert entry["status"] == "done" and entry["output"] == str(out)
    # the blocks finished before the kill (one window each here) were not computed again
    assert entry["windows_computed"] == entry["windows_total"] - finished
    assert 0 < entry["windows_computed"] < entry["windows_total"]


@pytest.mark.slow
def test_killed_instance_run_resumes_to_identical_bytes(tmp_path, big_tiff, tiny_model_dir):
    """--instances after kill -9: the finished probabilities are kept, the
    objects are labelled again, and the labels and table are the bytes of an
    uninterrupted run."""
    args = [*_args(big_tiff, tiny_model_dir), "--instances", "--threshold", "0.6"]
    ref = tmp_path / "ref.ome.tif"
    assert cli("run", *args, "-o", str(ref)).returncode == 0
    out = tmp_path / "out.ome.tif"
    proc = _start(*args, "-o", str(out))
    _wait_for_marks(str(tmp_path / ".out.ome.tif.tilerseg" / "done"), 20, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists() and not (tmp_path / "out.csv").exists()
    r = cli("run", *args, "-o", str(out), "--resume")
    assert r.returncode == 0 and "resumed" in r.stdout, r.stderr
    assert out.read_bytes() == ref.read_bytes()
    assert (tmp_path / "out.csv").read_bytes() == (tmp_path / "ref.csv").read_bytes()


@pytest.mark.slow
def test_sigterm_is_an_interrupt_recorded_in_the_ledger_and_resume_gives_identical_bytes(
        tmp_path, big_tiff, tiny_model_dir, reference):
    """What SLURM/PBS/LSF send at walltime and on scancel: one line, a
    failed ledger line saying so, the finished blocks kept, and --resume
    finishes to the bytes of an uninterrupted run."""
    out = tmp_path / "out.ome.tif"
    state = tmp_path / ".out.ome.tif.tilerseg"
    proc = _start(*_args(big_tiff, tiny_model_dir), "-o", str(out))
    _wait_for_marks(str(state / "done"), 10, proc)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 143, stderr
    lines = [ln for ln in stderr.splitlines() if not ln.startswith("tilerseg: warning") and "windows" not in ln
             and "tiling:" not in ln]
    assert any("terminated (SIGTERM)" in ln and "--resume" in ln for ln in lines), stderr
    assert "Traceback" not in stderr
    assert not out.exists() and state.exists() and os.listdir(state / "done")
    entry = _ledger(tmp_path)[-1]
    assert entry["status"] == "failed" and "SIGTERM" in entry["error"] and "--resume" in entry["error"]

    r = cli("run", *_args(big_tiff, tiny_model_dir), "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == reference
    assert _ledger(tmp_path)[-1]["status"] == "done"


@pytest.mark.slow
def test_a_second_run_on_the_same_output_is_refused_and_the_first_finishes_intact(tmp_path, tiny_model_dir):
    src = tmp_path / "img.tif"
    textured_tiff(src, (700, 700), seed=5, periods=(23.0, 31.0), noise=20)
    args = _args(str(src), tiny_model_dir)
    ref = tmp_path / "ref.ome.tif"
    assert cli("run", *args, "-o", str(ref)).returncode == 0
    out = tmp_path / "out.ome.tif"
    lock = tmp_path / ".out.ome.tif.tilerseg.lock"
    first = _start(*args, "-o", str(out))
    t0 = time.time()
    while not lock.exists() and time.time() - t0 < 60:
        time.sleep(0.05)
    time.sleep(max(0.0, 2 - (time.time() - t0)))  # the same command, about 2 s later
    second = _start(*args, "-o", str(out))
    _, err2 = second.communicate(timeout=120)
    assert first.poll() is None, "the first run ended before the second started: make the image larger"
    assert second.returncode == 1
    assert err2.strip().count("\n") == 0 and f"another tilerseg run is writing it (process {first.pid}" in err2
    _, err1 = first.communicate(timeout=600)
    assert first.returncode == 0, err1
    assert out.read_bytes() == ref.read_bytes()
    assert not lock.exists() and not (tmp_path / ".out.ome.tif.tilerseg").exists()


@pytest.mark.slow
def test_resume_refuses_other_settings_and_keeps_the_unfinished_run(tmp_path, big_tiff, tiny_model_dir):
    out = tmp_path / "out.zarr"
    state = tmp_path / ".out.zarr.tilerseg"
    proc = _start(*_args(big_tiff, tiny_model_dir), "-o", str(out))
    _wait_for_marks(str(state / "done"), 5, proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    r = cli("run", *_args(big_tiff, tiny_model_dir), "--threshold", "0.3", "-o", str(out), "--resume")
    assert r.returncode == 1 and "other settings (threshold)" in r.stderr, r.stderr
    assert state.exists() and not out.exists()


@pytest.mark.slow
def test_killed_worker_tasks_are_retried_and_output_is_identical(tmp_path, big_tiff, tiny_model_dir, reference):
    from distributed import Client, LocalCluster

    out = tmp_path / "out.ome.tif"
    marks = str(tmp_path / ".out.ome.tif.tilerseg" / "done")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        proc = _start(*_args(big_tiff, tiny_model_dir), "-o", str(out), "--scheduler", cluster.scheduler_address)
        _wait_for_marks(marks, 10, proc)
        pids = client.run(os.getpid)
        os.kill(next(iter(pids.values())), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    assert out.read_bytes() == reference


@pytest.mark.slow
def test_manifest_with_a_corrupt_input_writes_the_others_and_exits_nonzero(tmp_path, tiny_model_dir):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{data('rasterio/RGB.byte.tif')}\n"
                        f"# a comment, and a slide that cannot be decoded:\n{data('openslide/unreadable.svs')}\n"
                        f"{data('rasterio/cogeo.tif')} named.zarr\n")
    r = cli("run", "--manifest", str(manifest), "-o", str(tmp_path / "out") + "/", "--weights", tiny_model_dir,
            "--tile", "256", "--halo", "72", "--quiet")
    assert r.returncode == 1
    assert "unreadable.svs" in r.stderr and "Traceback" not in r.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["RGB.byte.mask.zarr", "tilerseg-ledger.jsonl"]
    assert (tmp_path / "named.zarr").is_dir()  # a manifest's relative output is beside the manifest
    entries = _ledger(tmp_path / "out")
    assert [e["status"] for e in entries] == ["done", "failed", "done"]
    assert entries[1]["input"].endswith("unreadable.svs") and "corrupt" in entries[1]["error"]
    for e in entries:
        assert set(e) >= {"input", "output", "status", "windows_computed", "windows_total", "seconds", "throughput",
                          "error"}
    # RGB.byte.tif has nodata margins: their windows are skipped, not computed
    assert 0 < entries[0]["windows_computed"] < entries[0]["windows_total"] and entries[0]["throughput"] > 0

    # rerun with --resume: the done inputs are skipped, the bad one fails again
    r = cli("run", "--manifest", str(manifest), "-o", str(tmp_path / "out") + "/", "--weights", tiny_model_dir,
            "--tile", "256", "--halo", "72", "--quiet", "--resume")
    assert r.returncode == 1 and "2 skipped" in r.stdout
    assert [e["status"] for e in _ledger(tmp_path / "out")] == ["done", "failed", "done", "failed"]


@pytest.mark.slow
def test_several_inputs_to_a_folder(tmp_path, tiny_model_dir):
    r = cli("run", data("rasterio/RGB.byte.tif"), data("rasterio/cogeo.tif"), "-o", str(tmp_path) + "/",
            "--format", "tif", "--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--quiet")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == ["RGB.byte.mask.tif", "cogeo.mask.tif", "tilerseg-ledger.jsonl"]
    assert "2 done, 0 failed" in r.stdout


def test_cluster_script_prints_a_valid_slurm_script():
    root = os.path.join(os.path.dirname(__file__), "..", "pipelines", "cluster-slurm-gpu.yaml")
    r = cli("cluster-script", root)
    assert r.returncode == 0, r.stderr
    script = r.stdout
    assert script.startswith("#!/usr/bin/env bash")
    directives = [ln for ln in script.splitlines() if ln.startswith("#SBATCH")]
    for want in ("-p gpu", "--cpus-per-task=16", "-t 12:00:00", "--gres=gpu:2", "-J tilerseg"):
        assert any(want in d for d in directives), (want, directives)
    assert "distributed.cli.dask_worker tcp://" in script and "--nworkers 2" in script  # a worker per GPU
    # workers keep activations in the heap (tilerseg.allocator), exported before the worker starts
    lines = script.splitlines()
    start = next(i for i, ln in enumerate(lines) if "dask_worker" in ln)
    assert {"export MALLOC_ARENA_MAX=1", "export MALLOC_MMAP_MAX_=0"} <= set(lines[:start])
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # valid shell


def test_cluster_config_errors_are_one_line(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("cluster: slurm\ncores: 4\nmemory: 8GB\nqueu: gpu\n")
    r = cli("cluster-script", str(bad))
    assert r.returncode == 1 and "unknown key(s) queu" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_zarr_output_to_an_fsspec_url_equals_a_local_one(tmp_path, tiny_model_dir):
    """Any fsspec URL zarr supports (here memory://, in this process): the
    group is written in place, OME metadata last, and the state removed."""
    import fsspec
    import zarr

    import tilerseg

    src = data("rasterio/RGB.byte.tif")
    kw = dict(weights=tiny_model_dir, tile=256, halo=72)
    url = "memory://tilerseg-test/out.zarr"
    tilerseg.run(src, url, **kw)
    tilerseg.run(src, tmp_path / "local.zarr", **kw)
    remote = zarr.open_group(url, mode="r")
    local = zarr.open_group(str(tmp_path / "local.zarr"), mode="r")
    assert np.array_equal(remote["0"][...], local["0"][...]) and (remote["0"][...] == 255).any()
    assert remote.attrs["ome"] == local.attrs["ome"]
    fs = fsspec.filesystem("memory")
    assert not fs.exists("/tilerseg-test/.out.zarr.tilerseg")
    r = cli("run", src, "-o", "memory://x/out.png", "--weights", tiny_model_dir, cwd=tmp_path)  # its ledger: cwd
    assert r.returncode == 1 and "write PNGs to a local path" in r.stderr  # file outputs by URL: test_remote


@pytest.mark.slow
def test_preview_of_a_one_line_manifest_shows_its_input(tmp_path, tiny_model_dir):
    src = data("rasterio/RGB.byte.tif")
    (tmp_path / "list.txt").write_text(f"{src} m.zarr\n")
    args = ["--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "--quiet"]
    r = cli("run", src, "-o", str(tmp_path / "d.zarr"), "--preview", str(tmp_path / "direct.png"), *args)
    assert r.returncode == 0, r.stderr
    r = cli("run", "--manifest", str(tmp_path / "list.txt"), "--preview", str(tmp_path / "listed.png"), *args,
            cwd=tmp_path)  # no -o: the ledger goes to the current folder
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "listed.png").read_bytes() == (tmp_path / "direct.png").read_bytes()
