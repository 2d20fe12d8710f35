"""A procedural slide-like image, any size, generated tile by tile.

Pixels are a pure function of their position and the seed, so any tile can
be made alone and tiles always agree: a 20,000 px image is written without
ever holding it whole. Tissue is pink where a smooth random field is high,
glass elsewhere; nuclei are dark purple disks on a jittered grid inside the
tissue. The nuclei form the ground-truth mask."""
from __future__ import annotations

import numpy as np

CELL = 24  # one candidate nucleus per CELL x CELL px


def _field(yy: np.ndarray, xx: np.ndarray, seed: int, scale: float = 900.0) -> np.ndarray:
    """A smooth field in [-1, 1]: a few seeded sinusoids."""
    rng = np.random.default_rng(seed)
    acc = np.zeros(np.broadcast(yy, xx).shape, np.float32)
    for _ in range(6):
        fy, fx = rng.normal(0, 1, 2) / scale
        acc += np.sin(2 * np.pi * (fy * yy + fx * xx) + rng.uniform(0, 2 * np.pi)).astype(np.float32)
    return acc / 6 ** 0.5 / 1.5


def _hash(a: np.ndarray, b: np.ndarray, seed: int, salt: int) -> np.ndarray:
    """Deterministic uniform [0, 1) per integer cell, from a 32-bit mix."""
    h = (a.astype(np.uint64) * np.uint64(73856093)) ^ (b.astype(np.uint64) * np.uint64(19349663))
    h ^= np.uint64((seed * 83492791 + salt * 2654435761) & 0xFFFFFFFF)
    h = (h ^ (h >> np.uint64(13))) * np.uint64(0x5BD1E995) & np.uint64(0xFFFFFFFF)
    h ^= h >> np.uint64(15)
    return (h & np.uint64(0xFFFFFF)).astype(np.float64) / float(1 << 24)


def tissue(yy: np.ndarray, xx: np.ndarray, seed: int = 0, ellipse=None) -> np.ndarray:
    """Where the tissue is: the smooth field's high ground (about half the
    area, in ridges), or with ``ellipse = (cy, cx, ry, rx)`` one compact
    piece with a wavy edge, glass all around it, as on most slides (a
    tuple of such ellipses: several pieces)."""
    field = _field(yy, xx, seed)
    if ellipse is None:
        return field > 0.1
    pieces = ellipse if isinstance(ellipse[0], (tuple, list)) else (ellipse,)
    out = np.zeros(np.broadcast(yy, xx).shape, bool)
    for cy, cx, ry, rx in pieces:
        out |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 + 0.15 * field < 1
    return out


def glass_ellipse(shape: tuple[int, int], background: float, pieces: int = 1):
    """The ``ellipse`` that leaves about ``background`` of ``shape`` as
    glass; ``pieces=2``: two equal discs on the diagonal (a tuple of two)."""
    H, W = shape
    if pieces == 2:
        k = np.sqrt((1 - background) / (2 * np.pi))
        return ((0.28 * H, 0.28 * W, H * k, W * k), (0.72 * H, 0.72 * W, H * k, W * k))
    k = np.sqrt((1 - background) / np.pi)
    return H / 2, W / 2, H * k, W * k


def _candidates(y0: int, x0: int, h: int, w: int, seed: int, margin: int = 12):
    """The kept nuclei of the cells around a region: centres ``(py, px)``
    and radii, before the tissue decides which show."""
    cy0, cy1 = (y0 - margin) // CELL, (y0 + h + margin) // CELL + 1
    cx0, cx1 = (x0 - margin) // CELL, (x0 + w + margin) // CELL + 1
    cy, cx = np.mgrid[cy0:cy1, cx0:cx1]
    keep = _hash(cy, cx, seed, 1) < 0.55
    py = (cy + 0.2 + 0.6 * _hash(cy, cx, seed, 2)) * CELL
    px = (cx + 0.2 + 0.6 * _hash(cy, cx, seed, 3)) * CELL
    rad = 4 + 5 * _hash(cy, cx, seed, 4)
    return py[keep], px[keep], rad[keep]


def nuclei(shape: tuple[int, int], seed: int = 0, ellipse=None, step: int = 1024) -> int:
    """How many nuclei the generator drew in an image of ``shape``: those
    with at least one pixel inside the image and on tissue (the ground truth
    of a count; pixels as :func:`tile` draws them), counted once each by
    the tile that holds its centre."""
    H, W = shape
    n = 0
    for y0 in range(0, H, step):
        for x0 in range(0, W, step):
            h, w = min(step, H - y0), min(step, W - x0)
            py, px, rad = _candidates(y0, x0, h, w, seed)
            mine = (py >= y0) & (py < y0 + h) & (px >= x0) & (px < x0 + w)
            for y, x, r in zip(py[mine], px[mine], rad[mine]):
                ys = np.arange(max(0, int(y - r)), min(H, int(y + r) + 2))
                xs = np.arange(max(0, int(x - r)), min(W, int(x + r) + 2))
                yy, xx = np.meshgrid(ys.astype(np.float32), xs.astype(np.float32), indexing="ij")
                disc = (yy - y) ** 2 + (xx - x) ** 2 <= r * r
                n += bool((disc & tissue(yy, xx, seed, ellipse)).any())
    return n


def tile(y0: int, x0: int, h: int, w: int, seed: int = 0, ellipse=None) -> tuple[np.ndarray, np.ndarray]:
    """RGB uint8 pixels ``(h, w, 3)`` and nuclei mask ``(h, w)`` at ``(y0, x0)``
    (``ellipse``: see :func:`tissue`)."""
    yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w].astype(np.float32)
    tissue_here = tissue(yy, xx, seed, ellipse)
    nuc = np.zeros((h, w), bool)
    for y, x, r in zip(*_candidates(y0, x0, h, w, seed)):
        iy0, iy1 = max(0, int(y - r) - y0), min(h, int(y + r) + 2 - y0)
        ix0, ix1 = max(0, int(x - r) - x0), min(w, int(x + r) + 2 - x0)
        if iy0 < iy1 and ix0 < ix1:
            sub = (yy[iy0:iy1, ix0:ix1] - y) ** 2 + (xx[iy0:iy1, ix0:ix1] - x) ** 2 <= r * r
            nuc[iy0:iy1, ix0:ix1] |= sub
    nuc &= tissue_here
    noise = (_hash(yy.astype(np.int64), xx.astype(np.int64), seed, 5) - 0.5).astype(np.float32) * 24
    glass, stroma, nucleus = np.array([238, 236, 240]), np.array([225, 150, 190]), np.array([95, 55, 140])
    rgb = np.where(tissue_here[..., None], stroma, glass).astype(np.float32)
    rgb[nuc] = nucleus
    rgb += noise[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8), nuc


def _tile_rgb(args) -> np.ndarray:
    """One ``t`` x ``t`` tile of the level reduced ``step`` times, sampled
    from full-resolution pieces of at most 1024² px (memory stays small)."""
    y, x, t, step, seed, ell = args
    if step == 1:
        return tile(y, x, t, t, seed, ell)[0]
    out = np.empty((t, t, 3), np.uint8)
    b = max(1, min(t, 1024 // step))
    for r in range(0, t, b):
        for c in range(0, t, b):
            out[r:r + b, c:c + b] = tile((y + r) * step, (x + c) * step, b * step, b * step, seed, ell)[0][::step, ::step]
    return out


def write_tiff(path, shape: tuple[int, int], *, seed: int = 0, tile_size: int = 256, levels: int = 1,
               compression: str = "jpeg", mpp: float = 0.5, background: float | None = None,
               extratags=(), workers: int = 1, pieces: int = 1) -> None:
    """Write a tiled (pyramidal when ``levels`` > 1) RGB TIFF of ``shape``,
    tile by tile. Reduced levels sample the generator at their resolution.
    ``background``: the share of glass around one piece of tissue (or
    ``pieces`` pieces: 1 or 2);
    ``extratags``: tifffile extra tags for the first page (e.g. GeoTIFF keys);
    ``workers``: processes generating tiles (in order, a few ahead)."""
    import contextlib
    import multiprocessing

    import tifffile

    H, W = shape
    t = tile_size
    ell = glass_ellipse(shape, background, pieces) if background is not None else None
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 1 else None

    def tiles(step: int):
        jobs = ((y, x, t, step, seed, ell) for y in range(0, -(-H // step), t) for x in range(0, -(-W // step), t))
        return pool.imap(_tile_rgb, jobs, chunksize=4) if pool else map(_tile_rgb, jobs)

    kw = dict(tile=(t, t), photometric="rgb", compression=compression,
              resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER")
    with pool or contextlib.nullcontext(), tifffile.TiffWriter(path, bigtiff=H * W * 3 > 2**31) as tw:
        tw.write(tiles(1), shape=(H, W, 3), dtype=np.uint8, subifds=levels - 1, extratags=extratags, **kw)
        for k in range(1, levels):
            s = 2 ** k
            tw.write(tiles(s), shape=(-(-H // s), -(-W // s), 3), dtype=np.uint8, subfiletype=1, **kw)


class NucleiMask:
    """The generator's nuclei mask as a lazy 2-D array (uint8, 1 = nucleus)
    that computes only the window asked for; ``region = (y0, x0, y1, x1)``
    keeps nuclei inside it (zero elsewhere). :func:`tilerseg.io.polygons.
    write_vector` traces it block by block."""

    ndim, dtype = 2, np.dtype(np.uint8)

    def __init__(self, shape, seed: int = 0, ellipse=None, region=None, chunk: int = 1024):
        self.shape, self.seed, self.ellipse = tuple(shape), seed, ellipse
        self.region, self.chunks = region or (0, 0, *self.shape), (chunk, chunk)

    def __getitem__(self, key):
        rows, cols = key
        r0, r1, c0, c1 = rows.start or 0, rows.stop, cols.start or 0, cols.stop
        out = tile(r0, c0, r1 - r0, c1 - c0, self.seed, self.ellipse)[1].astype(np.uint8)
        y0, x0, y1, x1 = self.region
        yy, xx = np.arange(r0, r1)[:, None], np.arange(c0, c1)[None]
        out[~((yy >= y0) & (yy < y1) & (xx >= x0) & (xx < x1))] = 0
        return out


def write_nuclei_geojson(path, shape, *, seed: int = 0, ellipse=None, region=None, name: str = "Nucleus") -> int:
    """Write the nuclei of a synthetic slide as QuPath exports them
    (a FeatureCollection of ``detection`` polygons in level-0 pixels with
    ``classification.name``), and with ``region = (y0, x0, y1, x1)`` only
    those inside it, plus one ``Region`` annotation marking it: sparse
    labels. Streams; returns the number of nuclei."""
    import json
    import os
    import tempfile

    from .io.polygons import write_vector

    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(suffix=".geojson", dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        n = write_vector(NucleiMask(shape, seed, ellipse, region), tmp, class_names=("background", name))
        with open(tmp, encoding="utf-8") as src, open(path, "w", encoding="utf-8") as dst:
            head = src.readline()  # '{"type": "FeatureCollection", "crs": ..., "features": ['
            dst.write(head)
            if region is not None:
                y0, x0, y1, x1 = region
                ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
                dst.write(json.dumps({"type": "Feature", "id": "region-1", "geometry": {
                    "type": "Polygon", "coordinates": [ring]}, "properties": {
                    "objectType": "annotation", "classification": {"name": "Region", "color": [0, 200, 0]}}}))
                first = src.readline()
                if first.strip() != "]}":
                    dst.write(",\n" + first.lstrip(",\n") if first.strip() else first)
                else:
                    dst.write("\n" + first)
            for line in src:
                dst.write(line)
    finally:
        os.remove(tmp)
    return n


def dense_nuclei(shape: tuple[int, int], seed: int = 0, *, radii: tuple[float, float] = (6.0, 30.0),
                 corners: int = 256, overlap: float = 0.8, touching: float = 0.6, tries: float = 1000.0):
    """Dense nuclei with their true instances: ``(rgb uint8 (H, W, 3), labels uint32 (H, W))``.

    The fixture the instance split is scored on (:mod:`tilerseg.instances`,
    ``scripts/bench_instances.py``): touching and overlapping ellipses,
    radii log-uniform in ``radii`` (px), axis ratio up to 1.6, any angle,
    drawn in the demo slide's colours so the shipped model finds them.
    ``tries`` centres a megapixel are thrown at random (a share
    ``touching`` of them beside a kept one); one is kept when, for every
    kept neighbour, the centres are at least ``overlap`` x the sum of their
    mean radii apart (below 1 the two overlap). Clusters of three or four
    go first, on every other point where four ``corners``-px blocks meet,
    so that objects straddle the seams. Where ellipses overlap, a pixel
    belongs to the one whose normalised radius there is smallest (a
    dividing line between their centres, as a pathologist draws it)."""
    H, W = shape
    rng = np.random.default_rng(seed)
    lo, hi = np.log(radii[0]), np.log(radii[1])
    objs: list = []  # (cy, cx, ry, rx, angle)
    cell = int(2 * radii[1]) + 1
    grid: dict = {}

    def fits(cy, cx, r):
        gy, gx = int(cy // cell), int(cx // cell)
        for y in range(gy - 2, gy + 3):
            for x in range(gx - 2, gx + 3):
                for i in grid.get((y, x), ()):
                    oy, ox, ory, orx, _ = objs[i]
                    if np.hypot(cy - oy, cx - ox) < overlap * (r + (ory + orx) / 2):
                        return False
        return True

    def add(cy, cx, r):
        ratio = rng.uniform(1.0, 1.6)
        ry, rx = r * ratio ** 0.5, r / ratio ** 0.5
        if 0 <= cy < H and 0 <= cx < W and fits(cy, cx, r):
            grid.setdefault((int(cy // cell), int(cx // cell)), []).append(len(objs))
            objs.append((cy, cx, ry, rx, rng.uniform(0, np.pi)))

    for i, y in enumerate(range(corners, H, corners)):
        for j, x in enumerate(range(corners, W, corners)):
            if (i + j) % 2 == 0:
                for _ in range(int(rng.integers(3, 5))):
                    r = float(np.exp(rng.uniform(lo, hi)))
                    a = rng.uniform(0, 2 * np.pi)
                    add(y + 0.6 * r * np.sin(a), x + 0.6 * r * np.cos(a), r)
    for _ in range(int(tries * H * W / 1e6)):
        r = float(np.exp(rng.uniform(lo, hi)))
        if objs and rng.random() < touching:  # beside a kept one: clusters of touching nuclei
            oy, ox, ory, orx, _ = objs[int(rng.integers(len(objs)))]
            d, a = rng.uniform(overlap, 1.0) * (r + (ory + orx) / 2), rng.uniform(0, 2 * np.pi)
            add(oy + d * np.sin(a), ox + d * np.cos(a), r)
        else:
            add(rng.uniform(0, H), rng.uniform(0, W), r)
    labels = np.zeros((H, W), np.uint32)
    best = np.full((H, W), np.inf, np.float32)
    shade = np.zeros((H, W), np.float32)
    for k, (cy, cx, ry, rx, ang) in enumerate(objs, 1):
        e = max(ry, rx) + 1
        y0, y1, x0, x1 = max(0, int(cy - e)), min(H, int(cy + e) + 2), max(0, int(cx - e)), min(W, int(cx + e) + 2)
        yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
        u = (yy - cy) * np.cos(ang) + (xx - cx) * np.sin(ang)
        v = -(yy - cy) * np.sin(ang) + (xx - cx) * np.cos(ang)
        q = (u / ry) ** 2 + (v / rx) ** 2
        win = (q <= 1) & (q < best[y0:y1, x0:x1])
        labels[y0:y1, x0:x1][win] = k
        best[y0:y1, x0:x1][win] = q[win]
        shade[y0:y1, x0:x1][win] = rng.uniform(-12, 12)
    yy, xx = np.mgrid[0:H, 0:W]
    noise = (_hash(yy, xx, seed, 5) - 0.5).astype(np.float32) * 24
    stroma, nucleus = np.array([225, 150, 190], np.float32), np.array([95, 55, 140], np.float32)
    rgb = np.where((labels > 0)[..., None], nucleus + shade[..., None], stroma) + noise[..., None]
    return np.clip(rgb, 0, 255).astype(np.uint8), labels
