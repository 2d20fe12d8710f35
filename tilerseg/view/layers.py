"""Raster layers of the viewer: the image and the masks and probabilities
``tilerseg run`` wrote, served as 256-px Deep Zoom tiles.

Tiles come from the pyramid levels already in each file, read through the
same readers as ``tilerseg run`` (:func:`tilerseg.io.open_reader`, one per
level, opened on first use). Deep Zoom level ``L`` of an image of side ``S``
is the image reduced ``2^(M - L)`` times (``M = ceil(log2 S)``), sized
``ceil(S / 2^(M - L))``: exactly the sizes of an output's levels (halved,
rounding up, :func:`tilerseg.io.pyramid.level_shapes`). So output level
``k`` is Deep Zoom level ``M - k``, tile for tile, and a mask tile is the
file's pixels under the colour map. Levels coarser than the file's coarsest
(at most 256 px, one tile) are reduced from it the way the writer reduces
(:func:`tilerseg.io.pyramid.reduce2`). Image levels that are not exact
halvings (a slide's 4x levels) are read from the nearest finer level and
resized with a box filter: the image is for looking at, the masks are exact."""
from __future__ import annotations

import io
import json
import math
import os
import threading
import warnings
from array import array

import numpy as np

from ..io import open_reader
from ..io.base import LABEL_NODATA, PROBABILITY_SCALE, probability_bytes
from ..info import output_kind  # noqa: F401 (the view reads records as info does)
from ..io.pyramid import palette, reduce2

TILE = 256
MAX_REDUCE = 16  # an image level is read at most this many times finer than shown (fewer levels: fewer zooms out)


def max_level(shape: tuple[int, int]) -> int:
    """The Deep Zoom level of full resolution: ``ceil(log2(longest side))``."""
    return max(0, math.ceil(math.log2(max(shape))))


def ramp() -> np.ndarray:
    """(256, 3) uint8: the probability colour ramp (viridis), index ``round(p * 255)``."""
    from matplotlib import colormaps

    return (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)


class RasterLayer:
    """One raster (the image, labels or probabilities) served as tiles.

    ``kind`` is ``image``, ``labels`` or ``probabilities``; ``record`` is the
    output's own description (:func:`output_kind`)."""

    def __init__(self, path: str, kind: str = "image", record: dict | None = None):
        self.path, self.kind, self.record = path, kind, record or {}
        self._readers: dict[int, object] = {}
        self._lock = threading.Lock()
        r = self.reader(0)
        self.meta = r.meta
        self.levels = [tuple(x) for x in (self.meta.levels or [self.meta.shape])]
        if kind != "image":  # the shapes as read (GDAL rounds some overview sizes down, not up)
            self.levels = [tuple(self.reader(k).meta.shape) for k in range(len(self.levels))]
        self.shape = tuple(self.levels[0])
        self.max_level = max_level(self.shape)
        st = os.stat(path)
        self.version = f"{st.st_mtime_ns:x}{st.st_size:x}"[-12:]
        self.classes = int(self.record.get("classes") or 0)
        self.uint8 = False
        names = list(self.record.get("class_names") or [])
        if kind == "labels":
            n = max(self.classes, 2)
            self.class_names = [names[k] if k < len(names) else f"class {k}" for k in range(n)]
            self.colours = palette(self.classes)
        elif kind == "instances":
            self.class_names, self.colours = list(self.record.get("class_names") or []), None
            self.table = ObjectTable(self.path)
        elif kind == "probabilities":
            self.class_names = list(self.record.get("band_names") or [f"band {k}" for k in range(self.meta.bands)])
            self.colours = ramp()
            self.uint8 = self.meta.dtype == np.uint8
        else:
            self.class_names, self.colours = [], None
            self._stretch = self._display_range()
        coarse = self.levels[0][1] / self.levels[-1][1]
        self.min_level = 0 if kind != "image" else max(0, self.max_level - int(math.log2(max(coarse, 1))) -
                                                      int(math.log2(MAX_REDUCE)))

    def reader(self, k: int):
        """The reader of file level ``k`` (opened once, shared by threads)."""
        with self._lock:
            r = self._readers.get(k)
            if r is None:
                r = self._readers[k] = open_reader(self.path, level=k or None)
            return r

    def close(self) -> None:
        for r in self._readers.values():
            r.close()

    def info(self) -> dict:
        d = {"kind": self.kind, "name": os.path.basename(self.path.rstrip("/")), "width": self.shape[1],
             "height": self.shape[0], "maxLevel": self.max_level, "minLevel": self.min_level,
             "version": self.version}
        if self.kind == "labels":
            d["classes"] = [{"value": k, "name": n, "colour": "#%02x%02x%02x" % tuple(self.colours[k])}
                            for k, n in enumerate(self.class_names)]
            d["areas"] = self.class_areas()
        elif self.kind == "instances":
            d["objects"] = self.record.get("objects") or {}
            d["table"] = os.path.basename(self.table.path) if self.table.exists else None
        elif self.kind == "probabilities":
            d["bands"] = self.class_names
            d["ramp"] = ["#%02x%02x%02x" % tuple(c) for c in self.colours[::32]] + \
                ["#%02x%02x%02x" % tuple(self.colours[-1])]
        return d

    def class_areas(self, budget: int = 16 * 2 ** 20) -> dict:
        """Pixels of each class in level-0 pixels: counted on the finest
        level of at most ``budget`` pixels (exact when that is level 0,
        else each pixel counts for the 4^k it stands for: ``exact`` False)."""
        if getattr(self, "_areas", None) is None:
            k = next((i for i, (h, w) in enumerate(self.levels) if h * w <= budget), len(self.levels) - 1)
            h, w = self.reader(k).meta.shape
            counts = np.zeros(256, np.int64)
            for r in range(0, h, 1024):
                data, valid = self.reader(k).read((r, min(h, r + 1024)), (0, w))
                lab = data[..., 0] if valid is None else data[..., 0][valid]
                counts += np.bincount(lab.ravel(), minlength=256)[:256]
            f = (self.shape[0] * self.shape[1]) / (h * w)
            self._areas = {"exact": k == 0, "px": {str(c): float(counts[c] * f) for c in np.flatnonzero(counts)
                                                   if c != LABEL_NODATA}}
        return self._areas

    # -- tiles ---------------------------------------------------------------

    def level_shape(self, dz: int) -> tuple[int, int]:
        f = 2 ** (self.max_level - dz)
        return -(-self.shape[0] // f), -(-self.shape[1] // f)

    def read_level(self, dz: int, rows: tuple[int, int], cols: tuple[int, int]):
        """``(pixels (h, w, bands), valid or None)`` of Deep Zoom level ``dz``."""
        exact = self._level_of(dz)
        if exact is not None:
            return self.read_clipped(exact, rows, cols)
        k = len(self.levels) - 1  # coarser than the coarsest level: reduce it as the writer does
        n = self.max_level - dz - k
        H, W = self.levels[k]
        f = 2 ** n
        data, valid = self.reader(k).read((rows[0] * f, min(H, rows[1] * f)), (cols[0] * f, min(W, cols[1] * f)))
        x = np.moveaxis(data, -1, 0)
        if self.kind in ("labels", "instances"):  # ids and classes: every other pixel, as the writer reduces
            for _ in range(n):
                x = reduce2(x, False)
            return np.moveaxis(x, 0, -1), None
        x = x.astype(np.float32)  # probabilities: NaN-aware means, as the writer reduces them
        if self.uint8:
            x = np.where(x == LABEL_NODATA, np.nan, x / PROBABILITY_SCALE)
        elif valid is not None:
            x = np.where(valid[None], x, np.nan)
        for _ in range(n):
            x = reduce2(x, True)
        x = np.moveaxis(x, 0, -1)
        if self.uint8:
            return probability_bytes(x), None
        return np.nan_to_num(x), np.isfinite(x).all(axis=-1)

    def _resized(self, dz: int, rows, cols):
        """An image window at a level the file lacks: read from the nearest
        finer level, box-filtered to size."""
        from PIL import Image

        H0, W0 = self.shape
        f = 2 ** (self.max_level - dz)
        k = max(i for i, (h, w) in enumerate(self.levels) if W0 / w <= f * 1.001)
        h, w = self.reader(k).meta.shape
        sy, sx = H0 / h / f, W0 / w / f  # level-k pixels per output pixel
        r0, r1 = int(rows[0] * sy), min(h, math.ceil(rows[1] * sy))
        c0, c1 = int(cols[0] * sx), min(w, math.ceil(cols[1] * sx))
        data, valid = self.reader(k).read((r0, r1), (c0, c1))
        rgba = self._rgba_image(data, valid)
        size = (cols[1] - cols[0], rows[1] - rows[0])
        return np.asarray(Image.fromarray(rgba).resize(size, Image.Resampling.BOX))

    def tile(self, dz: int, col: int, row: int, hide=(), band: int = 0) -> tuple[bytes, str] | None:
        """The encoded tile and its media type, or None when outside."""
        if not self.min_level <= dz <= self.max_level:
            return None
        h, w = self.level_shape(dz)
        r0, c0 = row * TILE, col * TILE
        if r0 >= h or c0 >= w or row < 0 or col < 0:
            return None
        rows, cols = (r0, min(h, r0 + TILE)), (c0, min(w, c0 + TILE))
        if self.kind == "image":
            k = self._level_of(dz)
            data = self._resized(dz, rows, cols) if k is None else self._rgba_image(*self.read_clipped(k, rows, cols))
            return encode(data)
        data, valid = self.read_level(dz, rows, cols)
        return encode(self.colourize(data, valid, hide, band), png=True)

    def _level_of(self, dz: int) -> int | None:
        """The file level that is Deep Zoom level ``dz`` exactly, if any."""
        want = self.level_shape(dz)
        return next((k for k, s in enumerate(self.levels) if abs(s[0] - want[0]) <= 1 and abs(s[1] - want[1]) <= 1),
                    None)

    def read_clipped(self, k: int, rows, cols):
        """A window of file level ``k`` that may reach a pixel past its edge
        (a level one pixel short of the halved size): that part is invalid."""
        r = self.reader(k)
        h, w = r.meta.shape
        rr, cc = (rows[0], min(rows[1], h)), (cols[0], min(cols[1], w))
        if rr == rows and cc == cols:
            return r.read(rows, cols)
        out = np.zeros((rows[1] - rows[0], cols[1] - cols[0], r.meta.bands), r.meta.dtype)
        ok = np.zeros(out.shape[:2], bool)
        if rr[0] < rr[1] and cc[0] < cc[1]:
            data, valid = r.read(rr, cc)
            out[:rr[1] - rr[0], :cc[1] - cc[0]] = data
            ok[:rr[1] - rr[0], :cc[1] - cc[0]] = True if valid is None else valid
        return out, ok

    def colourize(self, data, valid, hide=(), band: int = 0) -> np.ndarray:
        """RGBA of mask pixels: a class's colour from the file's colour map
        (transparent for nodata and hidden classes), or a probability on the
        ramp (transparent for nodata), or an object's colour of its id
        (:func:`id_colours`; transparent where there is none)."""
        if self.kind == "instances":
            ids = data[..., 0]
            uniq, inv = np.unique(ids, return_inverse=True)
            rgba = np.zeros((*ids.shape, 4), np.uint8)
            rgba[..., :3] = id_colours(uniq)[inv.reshape(ids.shape)]
            rgba[..., 3] = np.where(ids == 0, 0, 255)
            if valid is not None:
                rgba[~valid, 3] = 0
            return rgba
        if self.kind == "labels":
            lab = data[..., 0]
            lut = np.zeros((256, 4), np.uint8)
            lut[:, :3] = self.colours
            lut[:LABEL_NODATA, 3] = 255
            for k in hide:
                if 0 <= k < 256:
                    lut[k, 3] = 0
            rgba = lut[lab]
            if valid is not None:
                rgba[~valid, 3] = 0
            return rgba
        p = data[..., min(max(band, 0), data.shape[-1] - 1)]
        if self.uint8:
            ok = p != LABEL_NODATA
            idx = np.rint(p.astype(np.float32) * (255 / PROBABILITY_SCALE))
        else:
            ok = np.ones(p.shape, bool) if valid is None else valid
            idx = np.rint(np.clip(p, 0, 1) * 255)
        idx = np.clip(np.where(ok, idx, 0), 0, 255).astype(np.uint8)
        return np.dstack([self.colours[idx], np.where(ok, 255, 0).astype(np.uint8)])

    # -- the image's display -------------------------------------------------

    def _display_range(self):
        """(low, high) mapped to 0..255 for images that are not 8-bit:
        the 1st and 99th percentiles of the coarsest level's valid pixels."""
        if self.meta.dtype == np.uint8:
            return None
        k = len(self.levels) - 1
        h, w = self.levels[k]
        step = max(1, max(h, w) // 1024)
        r = self.reader(k)
        data, valid = r.read((0, h), (0, w)) if h * w <= 4096 ** 2 else r.read((0, min(h, 4096)), (0, min(w, 4096)))
        vals = data[::step, ::step][valid[::step, ::step]] if valid is not None else data[::step, ::step]
        vals = vals.astype(np.float64).ravel()
        if not vals.size:
            return 0.0, 1.0
        lo, hi = np.percentile(vals, [1, 99])
        return float(lo), float(hi if hi > lo else lo + 1)

    def _rgba_image(self, data, valid) -> np.ndarray:
        if self._stretch is not None:
            lo, hi = self._stretch
            data = np.clip((data.astype(np.float32) - lo) * (255 / (hi - lo)), 0, 255).astype(np.uint8)
        rgb = data[..., :3] if data.shape[-1] >= 3 else np.repeat(data[..., :1], 3, axis=-1)
        alpha = np.full(rgb.shape[:2], 255, np.uint8) if valid is None else np.where(valid, 255, 0).astype(np.uint8)
        return np.dstack([rgb, alpha])

    # -- values under the cursor ---------------------------------------------

    def value(self, x: float, y: float, image_shape: tuple[int, int]) -> dict | None:
        """What this layer holds at image level-0 pixel ``(x, y)``."""
        H, W = self.shape
        col, row = int(x * W / image_shape[1]), int(y * H / image_shape[0])
        if not (0 <= col < W and 0 <= row < H):
            return None
        data, valid = self.reader(0).read((row, row + 1), (col, col + 1))
        v = data[0, 0]
        ok = valid is None or bool(valid[0, 0])
        if self.kind == "labels":
            k = int(v[0])
            return {"value": k, "name": "nodata" if k == LABEL_NODATA else
                    (self.class_names[k] if k < len(self.class_names) else f"class {k}")}
        if self.kind == "instances":
            return {"object": int(v[0]) if ok else 0}
        if self.kind == "probabilities":
            if self.uint8:
                ok = bool((v != LABEL_NODATA).all())
                v = v.astype(np.float64) / PROBABILITY_SCALE
            return {"probabilities": [round(float(p), 4) for p in v] if ok else None, "bands": self.class_names}
        return {"value": [float(p) for p in v] if ok else None}


def id_colours(ids: np.ndarray) -> np.ndarray:
    """(n, 3) uint8: the colour of each object id, the same in every tile
    and level. Hues step by the golden ratio (neighbouring ids, which touch
    often, lie far apart on the wheel), saturation and value by two other
    irrational steps, so that ids a whole number of turns apart still differ."""
    from matplotlib.colors import hsv_to_rgb

    k = np.asarray(ids, np.float64)
    hsv = np.stack([(k * 0.6180339887498949) % 1, 0.55 + 0.4 * ((k * 0.7548776662466927) % 1),
                    0.7 + 0.3 * ((k * 0.5698402909980532) % 1)], axis=-1)
    return np.rint(hsv_to_rgb(hsv) * 255).astype(np.uint8).reshape(-1, 3)


class ObjectTable:
    """The object table (``.csv``) beside an instance output, one row per
    id in id order: rows are found by a line index built on first use
    (8 bytes an object), not held in memory."""

    def __init__(self, output: str):
        from ..io.writers import table_path

        self.path = table_path(output)
        self.exists = os.path.isfile(self.path)
        self._starts = None
        self._lock = threading.Lock()

    def _index(self):
        with self._lock:
            if self._starts is None:
                starts, pos = array("q"), 0
                with open(self.path, "rb") as f:
                    for line in f:
                        starts.append(pos)
                        pos += len(line)
                starts.append(pos)
                self._starts = np.frombuffer(starts, np.int64)
            return self._starts

    def row(self, oid: int) -> dict | None:
        """Object ``oid``'s row (the CSV's header as keys), or None."""
        import csv

        if not self.exists or oid < 1:
            return None
        starts = self._index()
        if oid + 1 >= len(starts):
            return None
        with open(self.path, "rb") as f:
            header = f.readline().decode("utf-8")
            f.seek(int(starts[oid]))
            line = f.read(int(starts[oid + 1] - starts[oid])).decode("utf-8")
        keys, values = next(csv.reader([header])), next(csv.reader([line]), [])
        row = {k: _typed(v) for k, v in zip(keys, values)}
        return row if row.get("id") == oid else None


def _typed(text: str):
    """A CSV cell as the number it writes, else the text."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def encode(rgba: np.ndarray, png: bool = False) -> tuple[bytes, str]:
    """PNG for masks (exact) and images with transparency; JPEG otherwise."""
    from PIL import Image

    buf = io.BytesIO()
    if png or rgba.shape[-1] == 4 and rgba[..., 3].min() < 255:
        Image.fromarray(rgba if rgba.shape[-1] == 4 else rgba[..., :3]).save(buf, "PNG", compress_level=1)
        return buf.getvalue(), "image/png"
    Image.fromarray(np.ascontiguousarray(rgba[..., :3])).save(buf, "JPEG", quality=88)
    return buf.getvalue(), "image/jpeg"


def dumps(obj) -> str:
    """Compact JSON (polygons are sent by the thousand), valid for a
    browser: NaN and infinities (a GPKG's REAL field may hold them) as null."""
    try:
        return json.dumps(obj, separators=(",", ":"), allow_nan=False)
    except ValueError:
        return json.dumps(_finite(obj), separators=(",", ":"), allow_nan=False)


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
