"""Throughput with 1 and 2 local dask worker processes on CPU, and with
tilerseg's default threads, measured side by side in one run.

Usage: python scripts/bench_scaling.py [--size 3072] [--reps 2] [--json]

Setup (issue 6): a synthetic --size² JPEG slide (scripts/make_slide.py),
the shipped demo model (a small U-Net), tile 512 and its halo, batch 4.
- threads: `tilerseg run` as on one machine (no scheduler): one model,
  dask threads reading and writing around it;
- 1 worker / 2 workers: a LocalCluster of that many worker processes,
  the cores split between them (each worker's torch uses its threads),
  connected as `--scheduler` would be. Each worker builds the model once.
Each configuration runs --reps times, interleaved; the best is reported,
with the 2-worker / 1-worker ratio (ideal: cores / cores = 1 on one machine
with all cores in use either way; > 1 when one process cannot keep the
cores busy)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=3072)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tilerseg-bench-scaling"))
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging

    logging.getLogger("distributed").setLevel(logging.WARNING)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from distributed import Client, LocalCluster

    import tilerseg
    from make_slide import make_slide
    from tilerseg.demo import demo_weights

    cores = os.cpu_count() or 2
    os.makedirs(a.workdir, exist_ok=True)
    slide = os.path.join(a.workdir, f"slide-{a.size}.tif")
    if not os.path.exists(slide):
        make_slide(slide, a.size, levels=1)
    weights = demo_weights()

    def once(scheduler) -> float:
        rep = tilerseg.run(slide, os.path.join(a.workdir, "mask.zarr"), weights=weights, scheduler=scheduler,
                           overwrite=True)
        return a.size * a.size / rep.seconds / 1e6

    best = {"threads": 0.0, "1 worker": 0.0, "2 workers": 0.0}
    clusters = {}
    try:
        for n in (1, 2):
            cl = LocalCluster(n_workers=n, threads_per_worker=max(1, cores // n), processes=True,
                              dashboard_address=None)
            clusters[n] = (cl, Client(cl))
        for _ in range(a.reps):
            best["threads"] = max(best["threads"], once(None))
            for n in (1, 2):
                key = "1 worker" if n == 1 else "2 workers"
                best[key] = max(best[key], once(clusters[n][1]))
    finally:
        for cl, client in clusters.values():
            client.close()
            cl.close()
    ratio = best["2 workers"] / best["1 worker"]
    if a.json:
        print(json.dumps({"cores": cores, "size": a.size, "mpx_s": best, "ratio_2_over_1": ratio}))
        return 0
    print(f"{a.size}² JPEG slide, demo model, {cores} cores, best of {a.reps}")
    for k, v in best.items():
        print(f"{k:<10}{v:>8.2f} Mpx/s")
    print(f"2 workers / 1 worker: {ratio:.3f}; 1 worker / threads: {best['1 worker'] / best['threads']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
