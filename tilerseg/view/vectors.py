"""Polygons of a GeoJSON/GPKG output, held compactly and served per view.

A million polygons as shapely objects take about 1 GB; here they are flat
float32 vertex arrays in the image's level-0 pixels (x = column, y = row)
with ring and feature offsets, and a spatial index: features sorted into a
grid of cells by the lower corner of their bounding box. A view's query
visits the cells whose corner can reach it (the largest box's size back),
one contiguous slice per grid row, tests the boxes exactly and returns at
most ``limit`` features, the largest first, with the count it left out."""
from __future__ import annotations

import json
import os
import warnings
from array import array

import numpy as np

from ..errors import InputError

GRID = 1024  # cells per side of the index


class VectorLayer:
    """The polygons of ``path`` in the pixels of an image with ``meta``."""

    def __init__(self, path: str, meta, image_shape: tuple[int, int]):
        self.path = path
        self.kind = "polygons"
        coords, rings, feats, self.props, self.ids, self.skipped = _load(path, meta)
        self.coords, self.ring_off, self.feat_off = coords, rings, feats
        n = len(feats) - 1
        self.count = n
        first = rings[feats[:-1]]  # every feature kept has a ring of 3 vertices or more (see _rings)
        # bounding boxes from the vertices of each feature (reduceat over its vertex range)
        if n:
            self.x0 = np.minimum.reduceat(coords[:, 0], first)
            self.y0 = np.minimum.reduceat(coords[:, 1], first)
            self.x1 = np.maximum.reduceat(coords[:, 0], first)
            self.y1 = np.maximum.reduceat(coords[:, 1], first)
        else:
            self.x0 = self.y0 = self.x1 = self.y1 = np.zeros(0, np.float32)
        self._index(image_shape)
        self._check_extent(image_shape)

    def _index(self, shape) -> None:
        H, W = shape
        self.cell = max(H, W) / GRID
        cx = np.clip(np.nan_to_num(self.x0, nan=0) // self.cell, 0, GRID - 1).astype(np.int64)
        cy = np.clip(np.nan_to_num(self.y0, nan=0) // self.cell, 0, GRID - 1).astype(np.int64)
        key = cy * GRID + cx
        self.order = np.argsort(key, kind="stable").astype(np.int32)
        self.starts = np.searchsorted(key[self.order], np.arange(GRID * GRID + 1)).astype(np.int64)
        ok = np.isfinite(self.x0)
        self.reach = (float(np.max(self.x1[ok] - self.x0[ok], initial=0)), float(np.max(self.y1[ok] - self.y0[ok],
                                                                                     initial=0)))

    def _check_extent(self, shape) -> None:
        ok = np.isfinite(self.x0)
        if not ok.any():
            return
        H, W = shape
        bx0, by0, bx1, by1 = (float(np.min(self.x0[ok])), float(np.min(self.y0[ok])),
                              float(np.max(self.x1[ok])), float(np.max(self.y1[ok])))
        tol = 0.01 * max(H, W) + 1
        if bx1 < -tol or by1 < -tol or bx0 > W + tol or by0 > H + tol or bx0 < -tol or by0 < -tol or \
                bx1 > W + tol or by1 > H + tol:
            raise InputError(f"{self.path}: its polygons span x {bx0:.0f}..{bx1:.0f}, y {by0:.0f}..{by1:.0f} px, "
                             f"outside the image's {W}x{H} px: they were made from another image")

    def query(self, x0: float, y0: float, x1: float, y1: float, limit: int) -> tuple[np.ndarray, int]:
        """Ids of up to ``limit`` features whose box meets the rectangle
        (largest first when there are more), and how many meet it."""
        rx, ry = self.reach
        c0 = int(np.clip((x0 - rx) // self.cell, 0, GRID - 1))
        c1 = int(np.clip(x1 // self.cell, 0, GRID - 1))
        r0 = int(np.clip((y0 - ry) // self.cell, 0, GRID - 1))
        r1 = int(np.clip(y1 // self.cell, 0, GRID - 1))
        if x1 < 0 or y1 < 0 or not self.count:
            return np.zeros(0, np.int64), 0
        parts = [self.order[self.starts[r * GRID + c0]:self.starts[r * GRID + c1 + 1]] for r in range(r0, r1 + 1)]
        ids = np.concatenate(parts) if parts else np.zeros(0, np.int32)
        hit = (self.x0[ids] <= x1) & (self.x1[ids] >= x0) & (self.y0[ids] <= y1) & (self.y1[ids] >= y0)
        ids = ids[hit]
        total = len(ids)
        if total > limit:
            area = (self.x1[ids] - self.x0[ids]) * (self.y1[ids] - self.y0[ids])
            ids = ids[np.argpartition(-area, limit - 1)[:limit]]
        return np.sort(ids), total

    def features(self, ids) -> list:
        """``[position, class, [ring as flat x, y, ...], own id]`` for each
        position (the handle of :meth:`properties`), vertices to 0.01 px."""
        out = []
        cls, own = self.props.column("class"), self.ids.column("id")
        for i in ids:
            i = int(i)
            rings = [np.round(self.coords[self.ring_off[r]:self.ring_off[r + 1]], 2).ravel().tolist()
                     for r in range(self.feat_off[i], self.feat_off[i + 1])]
            out.append([i, cls(i), rings, own(i)])
        return out

    def info(self) -> dict:
        return {"kind": "polygons", "name": os.path.basename(self.path), "count": self.count,
                "skipped": dict(sorted(self.skipped.items())), "perClass": self.per_class()}

    def per_class(self) -> list:
        """``[{"class", "count", "area_px"}]``: polygons and their area per
        class (the shoelace sum of each feature's rings, holes wound the
        other way as GeoJSON and GeoPackage writers wind them)."""
        if not self.count:
            return []
        x, y = self.coords[:, 0].astype(np.float64), self.coords[:, 1].astype(np.float64)
        nxt = np.arange(1, len(x) + 1)
        nxt[self.ring_off[1:] - 1] = self.ring_off[:-1]  # each ring's last vertex closes onto its first
        cross = x * y[nxt] - x[nxt] * y
        ring_area = np.add.reduceat(cross, self.ring_off[:-1]) / 2
        area = np.abs(np.add.reduceat(ring_area, self.feat_off[:-1]))
        cls = self.props.column("class")
        classes = np.array([c if isinstance(c, int) else -1 for c in map(cls, range(self.count))])
        out = []
        for k in np.unique(classes):
            sel = classes == k
            out.append({"class": int(k) if k >= 0 else None, "count": int(sel.sum()),
                        "area_px": float(area[sel].sum())})
        return out

    def find(self, own: str) -> int | None:
        """The position of the feature whose own id is ``own`` (as text, as
        a URL carries it), or None: a search of the id column, once per
        link followed."""
        if "id" in self.ids.ints:
            try:
                want = int(own)
            except ValueError:
                return None
            ids = np.frombuffer(self.ids.ints["id"], np.int64)
            hit = np.flatnonzero(ids == want)
        else:
            codes, values = self.ids.codes["id"], self.ids.values["id"]
            code = next((c for c, v in enumerate(values) if str(v) == own), None)
            hit = np.flatnonzero(np.frombuffer(codes, np.int32) == code) if code is not None else []
        return int(hit[0]) if len(hit) else None

    def own_id(self, i: int):
        """The feature's own id (what the file calls it) at position ``i``."""
        return self.ids.column("id")(i)

    def close(self) -> None:
        pass


class Columns:
    """Feature properties by column, encoded as they stream in: integers
    in an int64 array, anything else dictionary-encoded (a code per
    feature and the distinct values), so a million features with a few
    repeated names and classifications cost a few bytes each. ``keys``
    are the file's fields (fiona gives every feature all of them)."""

    def __init__(self, keys):
        self.keys = list(keys)
        self.ints = {k: array("q") for k in self.keys}
        self.codes: dict[str, array] = {}
        self.values: dict[str, list] = {}
        self._lookup: dict[str, dict] = {}

    def add(self, props: dict) -> None:
        for k in self.keys:
            v = props.get(k)
            if k in self.ints:
                if type(v) is int and -2 ** 63 <= v < 2 ** 63:
                    self.ints[k].append(v)
                    continue
                self._to_codes(k)
            self.codes[k].append(self._code(k, v))

    def _to_codes(self, k: str) -> None:
        ints = self.ints.pop(k)
        self.codes[k], self.values[k], self._lookup[k] = array("i"), [], {}
        for v in ints:
            self.codes[k].append(self._code(k, v))

    def _code(self, k: str, v) -> int:
        key = json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else (type(v).__name__, v)
        table = self._lookup[k]
        c = table.get(key)
        if c is None:
            c = table[key] = len(self.values[k])
            self.values[k].append(v)
        return c

    def freeze(self) -> "Columns":
        self._lookup = {}
        return self

    def get(self, i: int) -> dict:
        return {k: self.column(k)(i) for k in self.keys}

    def column(self, key: str):
        """``i -> value`` of one column (None where the file has no such field)."""
        if key in self.ints:
            data = self.ints[key]
            return lambda i: int(data[i])
        if key in self.codes:
            codes, values = self.codes[key], self.values[key]
            return lambda i: values[codes[i]]
        return lambda i: None


def _load(path: str, meta):
    """Vertices (float32, image level-0 pixels), ring offsets, feature
    offsets and properties of every polygon in ``path``, gathered in
    batches so that memory holds little more than the arrays."""
    import fiona

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            src = fiona.open(path)
    except Exception as err:
        raise InputError(f"{path}: not a readable GeoJSON/GeoPackage ({' '.join(str(err).split())[:200]})") from err
    to_pixels = _to_pixels(path, src, meta)
    done, batch, ring_len, feat_rings, skipped = [], [], array("q"), array("q"), {}
    props = Columns((src.schema or {}).get("properties", {}))
    ids = Columns(["id"])

    def flush():
        if batch:
            done.append(to_pixels(np.concatenate(batch)).astype(np.float32))
            batch.clear()

    with src:
        for n_read, f in enumerate(_features(path, src)):
            rings, why = _rings(f.geometry)
            if why:
                skipped[why] = skipped.get(why, 0) + 1
                continue
            for a in rings:
                batch.append(a)
                ring_len.append(len(a))
            feat_rings.append(len(rings))
            props.add(dict(f.properties))
            ids.add({"id": _own_id(f.id, n_read)})
            if len(batch) >= 20000:
                flush()
    flush()
    coords = np.concatenate(done) if done else np.zeros((0, 2), np.float32)
    rings = np.concatenate([[0], np.cumsum(np.frombuffer(ring_len, np.int64))]).astype(np.int64)
    feats = np.concatenate([[0], np.cumsum(np.frombuffer(feat_rings, np.int64))]).astype(np.int64)
    return coords, rings, feats, props.freeze(), ids.freeze(), skipped


def _features(path: str, src):
    """The file's features; a feature GDAL cannot read ends the load in one line."""
    n = 0
    try:
        for f in src:
            yield f
            n += 1
    except Exception as err:
        raise InputError(f"{path}: feature {n + 1} cannot be read ({' '.join(str(err).split())[:200]}); "
                         "fix or drop it") from err


LIMIT = 1e15  # |coordinate| beyond any image's pixels or any CRS's units: a broken vertex (1e308 overflows float32)


def _rings(g) -> tuple[list, str | None]:
    """The rings of a (Multi)Polygon (those inside a GeometryCollection
    too) as ``(n, 2)`` float64 arrays, or ``([], why)`` for what is not a
    polygon or cannot be drawn: another geometry type (named), no rings,
    a ring of fewer than 3 vertices, a vertex not finite or absurdly far."""
    if g is None:
        return [], "no geometry"
    parts = [g] if g.type != "GeometryCollection" else list(getattr(g, "geometries", None) or [])
    polys = []
    for part in parts:
        if part.type == "Polygon":
            polys.append(part.coordinates)
        elif part.type == "MultiPolygon":
            polys.extend(part.coordinates)
    if not polys:
        return [], g.type if g.type != "GeometryCollection" else "GeometryCollection without polygons"
    rings = []
    try:
        for poly in polys:
            for ring in poly:
                a = np.asarray(ring, np.float64)
                if a.ndim != 2 or a.shape[1] < 2 or len(a) < 3:
                    return [], "a ring of fewer than 3 vertices"
                rings.append(np.ascontiguousarray(a[:, :2]))
    except (TypeError, ValueError):
        return [], "malformed coordinates"
    if not rings:
        return [], "a polygon without rings"
    if not all(np.isfinite(a).all() and np.abs(a).max() <= LIMIT for a in rings):
        return [], "coordinates not finite or beyond 1e15"
    return rings, None


def _own_id(fid, position: int):
    """A feature's own ``id`` (GeoJSON's, a GeoPackage's fid) as a number
    when it is one, else as written; its position when it has none."""
    if fid is None:
        return position
    try:
        return int(fid)
    except (TypeError, ValueError):
        return str(fid)


def _to_pixels(path: str, src, meta):
    """``(n, 2) -> (n, 2)``: the file's coordinates to the image's level-0
    pixels. Pixel files (a slide's outputs, no CRS or tilerseg's local
    pixel CRS) are taken as they are; map coordinates are reprojected to
    the image's CRS (GeoJSON without a CRS is WGS 84, as RFC 7946 says)
    and put through the inverse of its transform."""
    crs = src.crs_wkt or ""
    pixel_crs = "image pixels" in crs or not meta.georeferenced
    if pixel_crs:
        if meta.georeferenced and "image pixels" in crs:
            raise InputError(f"{path}: polygons in pixels, but the image is georeferenced: it is another image")
        return lambda xy: xy  # level-0 pixels already
    if not crs:
        crs = "EPSG:4326"
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform

    src_crs, dst_crs = CRS.from_user_input(crs), CRS.from_wkt(meta.crs) if meta.crs else None
    inv = ~Affine(*meta.transform[:6])

    def to_pixels(xy):
        x, y = xy[:, 0], xy[:, 1]
        if dst_crs is not None and src_crs != dst_crs:
            x, y = (np.asarray(v) for v in transform(src_crs, dst_crs, x, y))
        a, b, c, d, e, f = inv[:6]
        return np.stack([a * x + b * y + c, d * x + e * y + f], axis=1)

    return to_pixels
