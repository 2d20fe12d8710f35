"""Read path for a GPU: tilerseg's readers against the raw decoders, per core and with threads.

Usage: python scripts/bench_read.py [--size 8192] [--window 1024] [--threads 1,2] [--json]

On a synthetic JPEG pyramidal slide (scripts/make_slide.py, 512-px tiles),
level 0 is read whole, once per reader, and the decode rate is reported in
megapixels per second:
- tifffile raw: every tile's JPEG bytes decoded (``TiffPage.segments``),
  nothing else: the floor of decoding;
- openslide raw: ``read_region`` on every 512-px tile;
- tilerseg: ``Reader.read`` of the engine's windows (``--window`` px, as a
  run reads them), through the tifffile and the openslide reader.
Rows with ``--threads N`` read disjoint windows on N threads (scaling).
A GPU that runs R windows of 512^2 a second needs R * 0.26 Mpx/s of decode:
divide by the per-core rate for the cores that feed it."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def _rate(fn, items, threads: int, pixels: int) -> float:
    t0 = time.perf_counter()
    if threads == 1:
        for it in items:
            fn(it)
    else:
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(fn, items))
    return pixels / 1e6 / (time.perf_counter() - t0)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--window", type=int, default=1024)
    p.add_argument("--threads", default="1,2")
    p.add_argument("--workdir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    import openslide
    import tifffile

    sys.path.insert(0, os.path.dirname(__file__))
    from make_slide import make_slide

    from tilerseg.io import open_reader

    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-read-")
    os.makedirs(work, exist_ok=True)
    path = os.path.join(work, f"slide-{a.size}.tif")
    if not os.path.exists(path):
        make_slide(path, a.size, levels=3, tile=512, background=0.3, workers=2)
    px = a.size * a.size
    tiles = [(y, x) for y in range(0, a.size, 512) for x in range(0, a.size, 512)]
    wins = [(y, x) for y in range(0, a.size, a.window) for x in range(0, a.size, a.window)]
    res = {}
    for threads in [int(t) for t in a.threads.split(",")]:
        with tifffile.TiffFile(path) as tif:
            page = tif.pages.first
            # segments() decodes on its own threads (maxworkers); the tile loop is what we time
            res[f"tifffile raw, {threads} thread(s)"] = _rate(
                lambda _: sum(1 for _ in page.segments(maxworkers=threads)), [0], 1, px)
        slide = openslide.OpenSlide(path)
        res[f"openslide raw read_region, {threads} thread(s)"] = _rate(
            lambda yx: slide.read_region((yx[1], yx[0]), 0, (512, 512)), tiles, threads, px)
        slide.close()
        for reader in ("tifffile", "openslide"):
            with open_reader(path, reader=reader) as r:
                res[f"tilerseg {reader} reader, {a.window}-px windows, {threads} thread(s)"] = _rate(
                    lambda yx: r.read((yx[0], min(yx[0] + a.window, a.size)),
                                      (yx[1], min(yx[1] + a.window, a.size))), wins, threads, px)
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{a.size}^2 JPEG slide (512-px tiles), {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for k, v in res.items():
        print(f"  {k:<60} {v:7.1f} Mpx/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
