"""The post-pass after the zarr stage: pyramid levels and the OME-TIFF, serial vs threads, streamed vs after the run.

Usage: python scripts/bench_postpass.py [--size 12000] [--workers 2] [--mpx-per-s R] [--stream-rate R] [--json]

A label mask of ``--size``^2 (blobs of two classes, as a segmentation
gives) is stored as zarr level 0 in 1024-px chunks; then the writer's
post-pass runs twice, interleaved: reduced levels (``build_levels``) and
the pyramidal OME-TIFF (``write_pyramid_tiff``), first serially, then on
``--workers`` threads (:func:`tilerseg.engine.thread_map`). With
``--mpx-per-s`` (the run's segmentation rate, e.g. from bench_peers.py)
it prints the post-pass share of the end-to-end time.

Then the whole writer (``Writer.write`` to ``.ome.tif``) runs twice more,
interleaved, with a segmentation stage that stores the blocks at
``--stream-rate`` Mpx/s and sleeps in between, leaving the cores free as a
GPU run does: once with the TIFF written after the run, once streamed as
blocks finish (:mod:`tilerseg.io.stream`). It prints the tail, the seconds
from the last block to the finished file, of each."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=12000)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    p.add_argument("--mpx-per-s", type=float, help="segmentation rate of the run, for the share")
    p.add_argument("--stream-rate", type=float, default=20.0,
                   help="Mpx/s at which the emulated segmentation stores blocks (default 20, a GPU's order)")
    p.add_argument("--workdir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import zarr

    from tilerseg.engine import thread_map
    from tilerseg.io.base import ImageMeta
    from tilerseg.io.pyramid import build_levels, serial
    from tilerseg.io.tiffout import write_pyramid_tiff

    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-post-")
    os.makedirs(work, exist_ok=True)
    n, chunk = a.size, 1024
    kind = {"kind": "labels", "classes": 3, "class_names": ("background", "a", "b")}
    meta = ImageMeta(shape=(n, n), bands=3, dtype=np.dtype("uint8"), format="bench", mpp=0.5)
    times = {"serial": float("inf"), "threads": float("inf")}
    for mode in ("serial", "threads", "serial", "threads"):
        root = os.path.join(work, f"{mode}.zarr")
        shutil.rmtree(root, ignore_errors=True)
        g = zarr.open_group(root, mode="w")
        z = g.create_array("0", shape=(n, n), chunks=(chunk, chunk), dtype="uint8", fill_value=255)
        for r in range(0, n, chunk):  # not timed: the segmentation stage writes these
            yy, xx = np.mgrid[r:min(r + chunk, n), 0:n]
            lab = ((np.sin(yy / 97.0) * np.cos(xx / 61.0)) > 0.3).astype(np.uint8)
            lab[(np.sin(yy / 41.0 + xx / 73.0) > 0.8) & (lab == 0)] = 2
            z[r:r + chunk] = lab
        parallel = serial if mode == "serial" else thread_map(a.workers)
        t0 = time.perf_counter()
        levels = build_levels(g, False, parallel=parallel)
        write_pyramid_tiff(levels, os.path.join(work, f"{mode}.ome.tif"), meta, kind, ome=True, uid="bench",
                           imap=getattr(parallel, "imap", map))
        times[mode] = min(times[mode], time.perf_counter() - t0)
    tails = streamed_vs_after(work, z, meta, kind, a.stream_rate, a.workers)
    res = {"size": n, "workers": a.workers, "load": os.getloadavg()[0],
           "seconds": {k: round(v, 2) for k, v in times.items()}, "speedup": round(times["serial"] / times["threads"], 2),
           "stream_rate": a.stream_rate, "tail_seconds": {k: round(v, 2) for k, v in tails.items()}}
    if a.mpx_per_s:
        seg = n * n / 1e6 / a.mpx_per_s
        res["segmentation_seconds"] = round(seg, 1)
        res["share"] = {k: round(v / (seg + v), 4) for k, v in times.items()}
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{n}^2 label mask, post-pass (levels + OME-TIFF), load {res['load']:.1f}")
    for k, v in times.items():
        share = f", {res['share'][k]:.1%} of end to end" if a.mpx_per_s else ""
        print(f"  {k:<8} {v:7.2f} s{share}")
    print(f"  threads ({a.workers}) / serial: {res['speedup']:.2f}x faster")
    seg = n * n / 1e6 / a.stream_rate
    print(f"whole writer, blocks stored at {a.stream_rate:g} Mpx/s ({seg:.1f} s): seconds from the last block to the file")
    for k, v in tails.items():
        print(f"  {k:<8} {v:7.2f} s, {v / (seg + v):.1%} of end to end")
    print(f"  streamed / after: {tails['streamed'] / tails['after']:.2f}x")
    return 0


def streamed_vs_after(work: str, z, meta, kind: dict, rate: float, workers: int) -> dict:
    """Best tail of two interleaved runs of each mode (see the module doc)."""
    from types import SimpleNamespace

    from tilerseg.engine import thread_map
    from tilerseg.io.writers import OutputInfo, Writer
    from tilerseg.plan import Blocks

    mask = z[...]
    n, chunk = mask.shape[0], z.chunks[-1]
    sizes = tuple(min(chunk, n - r) for r in range(0, n, chunk))

    def region(b):
        return slice(b[0] * chunk, b[0] * chunk + sizes[b[0]]), slice(b[1] * chunk, b[1] * chunk + sizes[b[1]])

    blocks = Blocks((len(sizes), len(sizes)), region)
    info = OutputInfo(meta=meta, probabilities=False, classes=3, class_names=kind["class_names"])
    tails = {"after": float("inf"), "streamed": float("inf")}
    for mode in ("after", "streamed", "after", "streamed"):
        # without ``blocks`` the writer cannot tell which region is finished: it writes the TIFF after the run
        source = SimpleNamespace(shape=mask.shape, chunks=(sizes, sizes), dtype=mask.dtype,
                                 **({"blocks": blocks} if mode == "streamed" else {}))
        last = []

        def compute(src, target, marks):
            due = time.perf_counter()
            for b in blocks:
                target[blocks[b]] = mask[blocks[b]]
                marks.mark(b)
                due += sizes[b[0]] * sizes[b[1]] / 1e6 / rate
                time.sleep(max(0.0, due - time.perf_counter()))
            last.append(time.perf_counter())

        with Writer(os.path.join(work, f"{mode}-writer.ome.tif"), overwrite=True, parallel=thread_map(workers)) as w:
            w.write(source, compute, info, {"fingerprint": "bench"})
        tails[mode] = min(tails[mode], time.perf_counter() - last[0])
    return tails


if __name__ == "__main__":
    sys.exit(main())
