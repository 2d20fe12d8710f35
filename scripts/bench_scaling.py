"""Throughput with 1 and 2 local dask worker processes on CPU, and with
tilerseg's default threads, measured side by side in one run.

Usage: python scripts/bench_scaling.py [--size 3072] [--reps 2] [--tile auto|512] [--manifest 6] [--json]

Setup: a synthetic --size² JPEG slide (scripts/make_slide.py),
the shipped demo model (a small U-Net), --tile (default auto, as a user
runs it; 512 gives many more, smaller tasks) and its halo.
Every run is a `tilerseg run` command in its own process, as a user runs
it; its throughput (compute time, model loading excluded) is read from the
ledger it writes.
- threads: no scheduler: one model, dask threads reading and writing around it;
- 1 worker / 2 workers: `--scheduler` to a LocalCluster of that many worker
  processes, the cores split between them (each worker's torch uses its
  threads). Each worker builds the model once, on its first task. The
  workers run with the environment dask's nanny gives them
  (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_=65536) plus the allocator settings
  tilerseg's job scripts export (tilerseg.allocator.WORKER_ENV), given before
  the worker process starts (cluster.nanny_config, the nanny's pre-spawn-environ: LocalCluster's
  env= sets them after, too late for glibc, and makes the model 1.5x
  slower); tilerseg sets each worker's torch threads to its dask threads. The workers build the model
  before the clock starts, as the threaded run does.
For the distributed runs it also reports the tasks' overhead (worker
thread-seconds not spent computing a task, per task) and the scheduler's
CPU time (the scheduler runs in this script's process).
Then manifests of --manifest and twice as many small slides (768², 0 to
skip) run on the 2-worker cluster one input at a time (``--concurrent 1``)
and with the default (inputs together): the seconds each additional input
adds, side by side (a process's first input waits for its imports and
model, the same in both modes, which would hide the difference).
Each configuration runs --reps times, interleaved, with only its own
processes alive (a cluster is started for its run and closed after); the
best is reported."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# distributed's LocalCluster sets OMP_NUM_THREADS=1 and MALLOC_TRIM_THRESHOLD_
# in this process's environment for its workers; the commands run here must
# not inherit them (they halve the threaded run's speed), so keep a copy now
CLEAN_ENV = dict(os.environ, HF_HUB_OFFLINE="1")


TILE: list[str] = []


def run_command(*args: str) -> list[str]:
    """A `tilerseg run` command line with the demo model and the bench's tile."""
    return [sys.executable, "-m", "tilerseg.cli", "run", *args, "--weights", "demo", "--overwrite", "--quiet", *TILE]


def run_cli(slide: str, out: str, *extra: str) -> float:
    """Mpx/s of one `tilerseg run`, from its ledger line."""
    env = CLEAN_ENV
    cmd = run_command(slide, "-o", out, *extra)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=os.path.dirname(out))
    if r.returncode:
        raise SystemExit(r.stderr)
    with open(os.path.join(os.path.dirname(out), "tilerseg-ledger.jsonl")) as f:
        return json.loads(f.readlines()[-1])["throughput"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3072)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tilerseg-bench-scaling"))
    p.add_argument("--tile", default="auto")
    p.add_argument("--manifest", type=int, default=6, help="N: manifests of N and 2N small inputs (0: none)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    if a.manifest == 1:
        p.error("--manifest: 0, or 2 and more (a batch of one input has no [k/N] lines to time)")
    TILE[:] = ["--tile", a.tile]
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import dask
    from distributed import LocalCluster

    from make_slide import make_slide

    from tilerseg.cluster import nanny_config  # workers start with what tilerseg's job scripts export

    cores = os.cpu_count() or 2
    os.makedirs(a.workdir, exist_ok=True)
    slide = os.path.join(a.workdir, f"slide-{a.size}.tif")
    if not os.path.exists(slide):
        make_slide(slide, a.size, levels=1)
    out = os.path.join(a.workdir, "mask.zarr")
    best = {"threads": 0.0, "1 worker": 0.0, "2 workers": 0.0}
    extra = {}
    for _ in range(a.reps):
        # one configuration alive at a time: idle schedulers, nannies and workers of another cluster
        # cost about 0.1 core here, which would be charged to whichever run is measured meanwhile
        best["threads"] = max(best["threads"], run_cli(slide, out))
        for n in (1, 2):
            key = "1 worker" if n == 1 else "2 workers"
            with dask.config.set(nanny_config()), LocalCluster(n_workers=n, threads_per_worker=max(1, cores // n),
                                                               processes=True, dashboard_address=":0") as cluster:
                mpx, info = run_distributed(cluster, slide, out, a.size)
            if mpx > best[key]:
                best[key], extra[key] = mpx, info
    ratio = best["2 workers"] / best["1 worker"]
    many = run_manifest(a, make_slide, cores) if a.manifest else None
    if a.json:
        print(json.dumps({"cores": cores, "size": a.size, "mpx_s": best, "ratio_2_over_1": ratio, "tasks": extra,
                          "manifest": many}))
        return 0
    print(f"{a.size}² JPEG slide, demo model, --tile {a.tile}, {cores} cores, best of {a.reps}")
    for k, v in best.items():
        more = extra.get(k)
        tail = (f"  {more['tasks']} tasks, overhead {more['overhead_ms']:.0f} ms/task, scheduler CPU "
                f"{more['scheduler_cpu_s']:.2f} s ({more['scheduler_cpu_ms_per_task']:.1f} ms/task)") if more else ""
        print(f"{k:<10}{v:>8.2f} Mpx/s{tail}")
    print(f"2 workers / 1 worker: {ratio:.3f}; 1 worker / threads: {best['1 worker'] / best['threads']:.3f}; "
          f"2 workers / threads: {best['2 workers'] / best['threads']:.3f}")
    if many:
        print(f"manifest of 768² slides on 2 workers, seconds per additional input ({2 * a.manifest} inputs minus "
              f"{a.manifest}): one at a time {many['one_at_a_time_s']:.2f} s, together {many['together_s']:.2f} s: "
              f"{many['together_s'] / many['one_at_a_time_s']:.2f}x the time")
    return 0


def run_manifest(a, make_slide, cores: int) -> dict:
    """Seconds per additional input of a manifest on a 2-worker cluster,
    one input at a time and together (the default): the span of a batch of
    2N inputs minus that of N (the first input of a process waits for its
    imports and model, which would otherwise hide the rest), best of the
    reps, interleaved."""
    import dask
    from distributed import LocalCluster

    from tilerseg.cluster import nanny_config

    folder = os.path.join(a.workdir, "many")
    os.makedirs(folder, exist_ok=True)
    paths = []
    for k in range(2 * a.manifest):
        paths.append(os.path.join(folder, f"small-{k}.tif"))
        if not os.path.exists(paths[-1]):
            make_slide(paths[-1], 768, levels=1, seed=k)
    lists = {}
    for n in (a.manifest, 2 * a.manifest):
        lists[n] = os.path.join(folder, f"list-{n}.txt")
        with open(lists[n], "w") as f:
            f.write("\n".join(paths[:n]) + "\n")
    spans = {}
    with dask.config.set(nanny_config()), LocalCluster(n_workers=2, threads_per_worker=max(1, cores // 2),
                                                       processes=True, dashboard_address=":0") as cluster:
        for _ in range(a.reps):
            for key, extra in (("one_at_a_time_s", ["--concurrent", "1"]), ("together_s", [])):
                for n, manifest in lists.items():
                    cmd = run_command("--manifest", manifest, "-o", os.path.join(folder, "out") + "/",
                                      "--scheduler", cluster.scheduler_address, *extra)
                    spans[key, n] = min(spans.get((key, n), float("inf")), _inputs_span(cmd, folder))
    n = a.manifest
    return {key: (spans[key, 2 * n] - spans[key, n]) / n for key in ("one_at_a_time_s", "together_s")}


def _inputs_span(cmd: list[str], cwd: str) -> float:
    """Seconds from the first input's start (its ``[1/N]`` line) to the last
    one's ``wrote`` line: the batch itself, without the process's start-up."""
    import time

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=CLEAN_ENV,
                            cwd=cwd)
    first = last = None
    for line in proc.stdout:
        now = time.perf_counter()
        if line.startswith("[") and first is None:
            first = now
        elif line.startswith("wrote "):
            last = now
    if proc.wait() or first is None or last is None:
        raise SystemExit(f"{' '.join(cmd)} failed")
    return last - first
    return best


def run_distributed(cluster, slide: str, out: str, size: int) -> tuple[float, dict]:
    """Mpx/s of one `--scheduler` run on ``cluster``, with its tasks'
    overhead (worker thread time not spent computing, per task) and the
    scheduler's CPU time (the scheduler runs in this process)."""
    import resource

    from distributed import Client, get_task_stream

    with Client(cluster) as client, get_task_stream(client) as ts:
        threads = sum(w["nthreads"] for w in client.scheduler_info()["workers"].values())
        cpu0 = resource.getrusage(resource.RUSAGE_SELF)
        mpx = run_cli(slide, out, "--scheduler", cluster.scheduler_address)
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    stream = [t for t in ts.data if "tilerseg" in str(t.get("key")) and "warm" not in str(t.get("key"))]
    seconds = size * size / 1e6 / mpx  # the run's computing time (model building excluded)
    compute = sum(s["stop"] - s["start"] for t in stream for s in t["startstops"] if s["action"] == "compute")
    n = max(1, len(stream))
    sched = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return mpx, {"tasks": len(stream), "overhead_ms": 1e3 * max(0.0, seconds * threads - compute) / n,
                 "scheduler_cpu_s": sched, "scheduler_cpu_ms_per_task": 1e3 * sched / n}

if __name__ == "__main__":
    raise SystemExit(main())
