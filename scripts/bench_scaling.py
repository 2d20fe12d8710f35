"""Throughput with 1 and 2 local dask worker processes on CPU, and with
tilerseg's default threads, measured side by side in one run.

Usage: python scripts/bench_scaling.py [--size 3072] [--reps 2] [--json]

Setup: a synthetic --size² JPEG slide (scripts/make_slide.py),
the shipped demo model (a small U-Net), tile 512 and its halo, batch 4.
Every run is a `tilerseg run` command in its own process, as a user runs
it; its throughput (compute time, model loading excluded) is read from the
ledger it writes.
- threads: no scheduler: one model, dask threads reading and writing around it;
- 1 worker / 2 workers: `--scheduler` to a LocalCluster of that many worker
  processes, the cores split between them (each worker's torch uses its
  threads). Each worker builds the model once, on its first task. The
  workers run with the environment dask's nanny gives them
  (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_=65536); tilerseg sets each
  worker's torch threads to its dask threads.
Each configuration runs --reps times, interleaved; the best is reported."""
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


def run_cli(slide: str, out: str, *extra: str) -> float:
    """Mpx/s of one `tilerseg run`, from its ledger line."""
    env = CLEAN_ENV
    cmd = [sys.executable, "-m", "tilerseg.cli", "run", slide, "-o", out, "--weights", "demo", "--overwrite",
           "--quiet", *extra]
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
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distributed import LocalCluster

    from make_slide import make_slide

    cores = os.cpu_count() or 2
    os.makedirs(a.workdir, exist_ok=True)
    slide = os.path.join(a.workdir, f"slide-{a.size}.tif")
    if not os.path.exists(slide):
        make_slide(slide, a.size, levels=1)
    out = os.path.join(a.workdir, "mask.zarr")
    best = {"threads": 0.0, "1 worker": 0.0, "2 workers": 0.0}
    clusters = {}
    try:
        for n in (1, 2):
            clusters[n] = LocalCluster(n_workers=n, threads_per_worker=max(1, cores // n), processes=True,
                                       dashboard_address=None)
        for _ in range(a.reps):
            best["threads"] = max(best["threads"], run_cli(slide, out))
            for n in (1, 2):
                key = "1 worker" if n == 1 else "2 workers"
                best[key] = max(best[key], run_cli(slide, out, "--scheduler", clusters[n].scheduler_address))
    finally:
        for cl in clusters.values():
            cl.close()
    ratio = best["2 workers"] / best["1 worker"]
    if a.json:
        print(json.dumps({"cores": cores, "size": a.size, "mpx_s": best, "ratio_2_over_1": ratio}))
        return 0
    print(f"{a.size}² JPEG slide, demo model, {cores} cores, best of {a.reps}")
    for k, v in best.items():
        print(f"{k:<10}{v:>8.2f} Mpx/s")
    print(f"2 workers / 1 worker: {ratio:.3f}; 1 worker / threads: {best['1 worker'] / best['threads']:.3f}; "
          f"2 workers / threads: {best['2 workers'] / best['threads']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
