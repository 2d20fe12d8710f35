"""tilerseg view on a 100,000^2 slide: tile latency, server memory, polygons per view.

Usage: python scripts/bench_view.py [--size 100000] [--polygons 1000000] [--requests 3000]
                                    [--workdir DIR] [--keep]

Builds, cheaply and never in RAM, a synthetic pyramidal RGB TIFF of
``--size``^2 (256-px deflate tiles, levels halved down to 256 px, as
SubIFDs), a label mask on the same grid written the way ``tilerseg run``
writes a plain pyramidal TIFF (palette, the same levels, tilerseg's record
in the description), and a GeoJSON of ``--polygons`` octagons in level-0
pixels. Tiles are encoded once from 64 distinct synthetic pieces and
written as they are (tifffile takes encoded tiles), so the files are real
TIFFs of full size that take seconds, not hours, to make.

Then it starts ``tilerseg view SLIDE MASK OBJECTS --no-browser`` as its own
process and, with 6 connections at once (a browser's per-host limit), asks
for ``--requests`` tiles of the image and the mask at random places and
levels from full resolution to 1/256, as panning and zooming would, and
prints the latency percentiles, the server's peak RSS (sampled every 50 ms
through the whole run, start-up included), the start-up time, and what
polygon queries for whole-slide and field-of-view rectangles return and
cost. Targets (issue 22): p95 < 150 ms, RSS < 1 GB, polygons capped.
Tiles come from the page cache: the files were just written (the
figures are the server's, not the disk's)."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np

T = 256
PIECES = 64


def _pieces(label: bool) -> list[bytes]:
    """Deflate-encoded 256^2 tiles (RGB or labels) of the synthetic slide's
    tissue and nuclei, without its pixel noise (so they stay small)."""
    from tilerseg import synthetic

    out = []
    for k in range(PIECES):
        y, x = (k // 8) * 997 + 311, (k % 8) * 1013 + 177
        _, nuc = synthetic.tile(y, x, T, T, seed=0)
        yy, xx = np.mgrid[y:y + T, x:x + T].astype(np.float32)
        tis = synthetic.tissue(yy, xx, 0)
        if label:
            tile = np.where(nuc, 1, np.where(tis, 2, 0)).astype(np.uint8)
        else:
            tile = np.where(tis[..., None], [225, 150, 190], [238, 236, 240]).astype(np.uint8)
            tile[nuc] = (95, 55, 140)
        out.append(zlib.compress(np.ascontiguousarray(tile).tobytes(), 6))
    return out


def _levels(size: int) -> list[tuple[int, int]]:
    from tilerseg.io.pyramid import level_shapes

    return level_shapes((size, size))


def write_pyramid(path: str, size: int, label: bool, description: str = "") -> None:
    """A tiled pyramidal TIFF, levels as SubIFDs, from the pieces."""
    import tifffile

    pieces = _pieces(label)
    shapes = _levels(size)

    def tiles(h, w, salt):
        for r in range(-(-h // T)):
            for c in range(-(-w // T)):
                yield pieces[(r * 7 + c * 13 + salt) % PIECES]

    kw = dict(tile=(T, T), compression="zlib", dtype=np.uint8, metadata=None)
    if label:
        from tilerseg.io.tiffout import colormap

        kw.update(photometric="palette", colormap=colormap(3))
    else:
        kw.update(photometric="rgb")
    bands = () if label else (3,)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k, (h, w) in enumerate(shapes):
            extra = dict(subifds=len(shapes) - 1, description=description) if k == 0 else dict(subfiletype=1)
            tw.write(tiles(h, w, k), shape=(h, w, *bands), **kw, **extra)


def write_polygons(path: str, size: int, n: int, seed: int = 0) -> None:
    """``n`` octagons (radius 4-14 px) in level-0 pixels, as tilerseg writes a slide's GeoJSON."""
    from tilerseg.io.polygons import PIXEL_CRS

    rng = np.random.default_rng(seed)
    ang = np.linspace(0, 2 * np.pi, 9)[:-1]
    names = ["background", "nucleus", "tissue"]
    with open(path, "w") as f:
        f.write('{"type": "FeatureCollection", "crs": {"type": "name", "properties": {"name": %s}}, "features": [\n'
                % json.dumps(PIXEL_CRS))
        for start in range(0, n, 100000):
            m = min(100000, n - start)
            cx, cy = rng.uniform(20, size - 20, m), rng.uniform(20, size - 20, m)
            r = rng.uniform(4, 14, m)
            xs = np.round(cx[:, None] + r[:, None] * np.cos(ang), 1)
            ys = np.round(cy[:, None] + r[:, None] * np.sin(ang), 1)
            lines = []
            for i in range(m):
                k = start + i
                ring = [[float(a), float(b)] for a, b in zip(xs[i], ys[i])]
                ring.append(ring[0])
                cls = 1 + k % 2
                lines.append(json.dumps({"type": "Feature", "id": k, "geometry": {"type": "Polygon", "coordinates": [ring]},
                                         "properties": {"id": k, "class": cls, "name": names[cls], "objectType": "detection",
                                                        "classification": {"name": names[cls], "color": [0, 230, 60]}}}))
            f.write((",\n" if start else "") + ",\n".join(lines))
        f.write("\n]}\n")


def _rss_sampler(pid: int, peak: list, stop: threading.Event) -> None:
    import psutil

    p = psutil.Process(pid)
    while not stop.is_set():
        try:
            peak[0] = max(peak[0], p.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.05)


def _get(url: str) -> tuple[float, int, int]:
    import urllib.request

    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as r:
        body = r.read()
        code = r.status
    return time.perf_counter() - t0, code, len(body)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=100000)
    ap.add_argument("--polygons", type=int, default=1000000)
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--workdir")
    ap.add_argument("--keep", action="store_true", help="keep the files (reused by a later run in --workdir)")
    a = ap.parse_args(argv)
    work = a.workdir or tempfile.mkdtemp(prefix="bench_view-")
    os.makedirs(work, exist_ok=True)
    slide, mask, objects = (os.path.join(work, n) for n in ("slide.tif", "mask.tif", "objects.geojson"))
    t0 = time.perf_counter()
    if not os.path.exists(slide):
        write_pyramid(slide, a.size, label=False)
    record = json.dumps({"tilerseg": {"kind": "labels", "classes": 3, "class_names": ["background", "nucleus", "tissue"],
                                      "nodata": 255, "source": slide}})
    if not os.path.exists(mask):
        write_pyramid(mask, a.size, label=True, description=record)
    if not os.path.exists(objects):
        write_polygons(objects, a.size, a.polygons)
    made = time.perf_counter() - t0
    sizes = {n: os.path.getsize(p) / 2 ** 30 for n, p in (("slide", slide), ("mask", mask), ("objects", objects))}
    print(f"files: {a.size}x{a.size} px, {len(_levels(a.size))} levels; slide {sizes['slide']:.2f} GiB, mask "
          f"{sizes['mask']:.2f} GiB, {a.polygons:,} polygons {sizes['objects']:.2f} GiB; made in {made:.0f} s")

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "tilerseg.cli", "view", slide, mask, objects, "--no-browser"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, stop = [0], threading.Event()
    threading.Thread(target=_rss_sampler, args=(proc.pid, peak, stop), daemon=True).start()
    try:
        line = proc.stdout.readline()
        if not line.startswith("tilerseg view: http"):
            print(line + proc.stderr.read(), file=sys.stderr)
            return 1
        url = line.split()[2]
        started = time.perf_counter() - t0
        info = json.loads(urllib.request.urlopen(url + "api/info").read())
        start_rss = peak[0]
        print(f"server started in {started:.1f} s (polygons loaded and indexed), RSS {start_rss / 2 ** 20:.0f} MiB")
        top = info["image"]["maxLevel"]
        rng = random.Random(0)
        reqs = []
        for _ in range(a.requests):
            layer = rng.choice((0, 1))
            lvl = rng.randint(max(top - 8, info["layers"][0]["minLevel"] if layer else info["image"]["minLevel"]), top)
            n = -(-(-(-a.size // 2 ** (top - lvl))) // T)  # tiles per side at that level
            reqs.append(f"{url}tiles/{layer}/{lvl}/{rng.randrange(n)}_{rng.randrange(n)}" + ("?hide=0" if layer else ""))
        t1 = time.perf_counter()
        with ThreadPoolExecutor(6) as pool:
            got = list(pool.map(_get, reqs))
        wall = time.perf_counter() - t1
        lat = np.array([g[0] for g in got]) * 1000
        bad = sum(g[1] != 200 for g in got)
        print(f"tiles: {len(got)} requests, 6 at a time, {len(got) / wall:.0f} tiles/s; latency p50 {np.percentile(lat, 50):.1f} ms, "
              f"p95 {np.percentile(lat, 95):.1f} ms, p99 {np.percentile(lat, 99):.1f} ms, max {lat.max():.0f} ms; "
              f"{bad} not 200; mean {np.mean([g[2] for g in got]) / 1024:.1f} KiB")
        q = []
        for box in [(0, 0, a.size, a.size)] + [(x, y, x + 2000, y + 1200) for x, y in
                                                  ((rng.uniform(0, a.size - 2000), rng.uniform(0, a.size - 1200))
                                                   for _ in range(20))]:
            t2 = time.perf_counter()
            body = urllib.request.urlopen(
                f"{url}api/features/2?x0={box[0]}&y0={box[1]}&x1={box[2]}&y1={box[3]}").read()
            d = json.loads(body)
            q.append((time.perf_counter() - t2, d["total"], len(d["features"]), len(body)))
        whole, views = q[0], q[1:]
        print(f"polygons, whole slide in view: {whole[1]:,} match, {whole[2]:,} sent ({whole[3] / 2 ** 20:.1f} MiB JSON) "
              f"in {whole[0] * 1000:.0f} ms; a 2000x1200 px field: {np.mean([v[1] for v in views]):.0f} match, all sent, "
              f"{np.median([v[0] for v in views]) * 1000:.1f} ms median")
        print(f"server peak RSS {peak[0] / 2 ** 20:.0f} MiB (start-up included)")
        p95 = np.percentile(lat, 95)
        ok = p95 < 150 and peak[0] < 2 ** 30 and whole[2] < whole[1] and bad == 0
        print(f"targets (p95 < 150 ms, RSS < 1 GiB, polygons capped): {'met' if ok else 'NOT met'}")
        return 0 if ok else 1
    finally:
        stop.set()
        proc.terminate()
        proc.wait(timeout=30)
        if not a.keep and not a.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
