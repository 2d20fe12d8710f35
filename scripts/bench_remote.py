"""Reading by URL against reading the local file: Mpx/s and bytes fetched.

Usage: python scripts/bench_remote.py [--size 8192] [--window 1024] [--threads 2] [--json]

Writes two synthetic inputs of ``--size``^2 RGB px: a COG (rasterio,
512-px tiles, deflate, overviews) and a tiled OME-TIFF (tifffile, 512-px
tiles, zlib); serves them from the test suite's HTTP range server and from
moto's standalone S3 server (tests/servers.py, both on 127.0.0.1), and reads
level 0 whole through tilerseg's readers in ``--window`` px windows on
``--threads`` threads, as a run reads them. One row per file and transport:
seconds, Mpx/s, bytes fetched (tilerseg's count: fsspec's and GDAL's) over
the file's size. Loopback servers measure the client's overhead per
request and byte, not a network: a real link adds its latency and bandwidth."""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))


def _texture(size: int, rows: tuple[int, int]) -> np.ndarray:
    yy, xx = np.mgrid[rows[0]:rows[1], 0:size]
    base = (np.sin(yy / 37.0) * np.cos(xx / 53.0) * 90 + 128)[..., None]
    noise = np.random.default_rng(rows[0]).normal(0, 12, (rows[1] - rows[0], size, 3))
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def make_cog(path: str, size: int) -> None:
    import rasterio
    import rasterio.shutil
    from rasterio.transform import from_origin

    tmp = path + ".plain.tif"
    profile = dict(driver="GTiff", width=size, height=size, count=3, dtype="uint8", tiled=True, blockxsize=512,
                   blockysize=512, compress="deflate", crs="EPSG:32618", transform=from_origin(500000, 4600000, 1, 1))
    with rasterio.open(tmp, "w", **profile) as ds:
        for y in range(0, size, 1024):
            ds.write(np.moveaxis(_texture(size, (y, min(size, y + 1024))), -1, 0),
                     window=rasterio.windows.Window(0, y, size, min(1024, size - y)))
    with rasterio.open(tmp) as src:
        rasterio.shutil.copy(src, path, driver="COG", compress="DEFLATE", blocksize=512)
    os.remove(tmp)


def make_ome(path: str, size: int) -> None:
    import tifffile

    def tiles():
        for y in range(0, size, 512):
            band = _texture(size, (y, min(size, y + 512)))
            for x in range(0, size, 512):
                yield band[:, x:x + 512]

    with tifffile.TiffWriter(path, bigtiff=True, ome=True) as tif:
        tif.write(tiles(), shape=(size, size, 3), dtype=np.uint8, tile=(512, 512), photometric="rgb",
                  compression="zlib", metadata={"PhysicalSizeX": 0.5, "PhysicalSizeXUnit": "µm"})


def read_all(url: str, window: int, threads: int) -> tuple[float, int, int]:
    """(seconds, pixels, bytes fetched) of reading level 0 whole."""
    from tilerseg.io import remote
    from tilerseg.io.base import _OPENED
    from tilerseg.io.open import open_reader

    _OPENED.clear()
    before = remote.bytes_read()
    t0 = time.perf_counter()
    r = open_reader(url)
    H, W = r.meta.shape
    wins = [((y, min(H, y + window)), (x, min(W, x + window))) for y in range(0, H, window) for x in range(0, W, window)]
    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(lambda w: r.read(*w), wins):
            pass
    seconds = time.perf_counter() - t0
    r.close()
    return seconds, H * W, remote.bytes_read() - before


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=8192)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--keep", help="folder for the inputs (reused when there)")
    a = ap.parse_args(argv)
    from servers import MotoServer, RangeServer

    root = a.keep or tempfile.mkdtemp(prefix="bench-remote-")
    os.makedirs(root, exist_ok=True)
    names = {"cog": f"cog-{a.size}.tif", "ome-tiff": f"tiled-{a.size}.ome.tif"}
    for kind, name in names.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            (make_cog if kind == "cog" else make_ome)(path, a.size)
    http, moto = RangeServer(root), MotoServer()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=moto.endpoint)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir("bench")
    rows = []
    try:
        for kind, name in names.items():
            fs.put_file(os.path.join(root, name), f"bench/{name}")
            size = os.path.getsize(os.path.join(root, name))
            for where, url in (("local", os.path.join(root, name)), ("http", f"{http.url}/{name}"),
                               ("s3", f"s3://bench/{name}")):
                s, px, got = read_all(url, a.window, a.threads)
                rows.append(dict(file=kind, transport=where, seconds=round(s, 2), mpx_s=round(px / 1e6 / s, 1),
                                 fetched_mb=round(got / 1e6, 1), size_mb=round(size / 1e6, 1)))
    finally:
        http.stop()
        moto.stop()
        if not a.keep:
            shutil.rmtree(root, ignore_errors=True)
    if a.json:
        print(json.dumps(rows))
        return 0
    print(f"{a.size}x{a.size} RGB, {a.window}-px windows on {a.threads} threads")
    print(f"{'file':<10}{'transport':<11}{'seconds':>9}{'Mpx/s':>8}{'fetched':>12}{'of file':>10}")
    for r in rows:
        print(f"{r['file']:<10}{r['transport']:<11}{r['seconds']:>9.2f}{r['mpx_s']:>8.1f}{r['fetched_mb']:>9.1f} MB"
              f"{r['size_mb']:>7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
