"""Training labels, raster or vector, read one window at a time.

Both kinds answer the same question, :meth:`window`: the class of every
pixel of a window of the image as it is read for training (its level or
resolution), :data:`IGNORE` where nothing is known. A raster mask is
sampled nearest-neighbour onto the image's grid (it may be stored at any
resolution of its image). A vector file (QuPath's GeoJSON, a GeoPackage,
a shapefile) is rasterised per window: a spatial index (shapely's STRtree)
finds the polygons that meet the window, and ``rasterio.features``
burns them with the window's transform. The full-size mask never exists,
so memory grows with the number of polygons, never with the image's area.

Sparse labels: pixels are known inside *regions* (polygons of a class in
``region_classes``, QuPath's ``Region`` by default, or the polygons of a
``regions`` file), and background inside a region is class 0. Without
regions the labelled polygons themselves are the known area (area classes,
QuPath annotations), except for a file of detections only (QuPath's cells,
``tilerseg run``'s own GeoJSON), which labels the whole image.
``regions: image`` says so for any file."""
from __future__ import annotations

import logging
import os

import numpy as np

from ..errors import InputError
from ..geometry import pad_index
from .metrics import IGNORE
from .vectors import VectorOptions, read_labels

__all__ = ["VectorOptions", "RasterLabels", "VectorLabels", "open_labels", "is_vector"]

log = logging.getLogger(__name__)
VECTOR_EXT = (".geojson", ".gpkg", ".shp")
SIDECAR_EXT = (".shx", ".dbf", ".prj", ".cpg", ".qix", ".sbn", ".sbx", ".qmd")


def is_vector(path) -> bool:
    return os.fspath(path).lower().endswith(VECTOR_EXT)


def _mirrored(start: int, n: int, size: int) -> np.ndarray:
    return pad_index(np.arange(start, start + n), size, "reflect")[0]


def fits(mask: tuple[int, int], image: tuple[int, int]) -> bool:
    """Whether a mask of shape ``mask`` is an image of shape ``image`` at
    an integer factor (a pyramid level's rounding either way)."""
    (h, w), (H, W) = mask, image
    big, small = ((H, W), (h, w)) if H >= h else ((h, w), (H, W))
    k = max(1, round(big[0] / max(small[0], 1)))
    return all(s in (b // k, -(-b // k)) for b, s in zip(big, small))


def _same_source(path: str, meta, image_path: str) -> None:
    """A mask that tilerseg wrote (``run``, then corrected) records the
    input it was made from: refuse it over another image, even one a level
    of which has the mask's size (:func:`tilerseg.info.other_source`)."""
    from ..info import other_source, output_kind

    why = other_source(output_kind(path).get("source_id"), image_path, meta) if image_path else None
    if why:
        raise InputError(f"{path}: {why} (a mask tilerseg wrote for another image): give the mask made for "
                         "this image")


class RasterLabels:
    """A raster mask through a :class:`~tilerseg.train.data.LabelMap`."""

    def __init__(self, path: str, meta, labelmap, image_path: str = ""):
        from ..io import open_reader

        self.path, self.shape, self.labelmap = path, tuple(meta.shape[:2]), labelmap
        self.reader = open_reader(path)
        (H, W), (h, w) = self.shape, self.reader.meta.shape[:2]
        self.fy, self.fx = h / H, w / W
        try:
            if abs(self.fy / self.fx - 1) > 0.02:
                raise InputError(f"{path}: mask is {w}x{h} px, image {image_path} is {W}x{H}: their aspect "
                                 "ratios differ, so the mask does not belong to this image (or to this level)")
            _same_source(path, meta, image_path)
            shapes = [(H, W), *(tuple(s) for s in (meta.levels or ()))]
            if not any(fits((h, w), s) for s in shapes):
                raise InputError(f"{path}: mask is {w}x{h} px, image {image_path} is {W}x{H}: a mask is the "
                                 "image's size or that of one of its levels (an integer factor smaller or larger), "
                                 "so this one would be stretched; give the mask made for this image")
        except InputError:
            self.reader.close()
            raise
        self.known_area = float(H * W)

    def position(self, rng, size):
        return None  # labels everywhere: any position

    def window(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        (H, W), (mh, mw) = self.shape, self.reader.meta.shape
        ri = np.minimum(((_mirrored(y, h, H) + 0.5) * self.fy).astype(np.int64), mh - 1)
        ci = np.minimum(((_mirrored(x, w, W) + 0.5) * self.fx).astype(np.int64), mw - 1)
        r0, r1, c0, c1 = int(ri.min()), int(ri.max()) + 1, int(ci.min()), int(ci.max()) + 1
        more = int(self.labelmap.instance_ids)  # ids: a row and column more, for the partings at the block's edge
        m, mvalid = self.reader.read((r0, min(r1 + more, mh)), (c0, min(c1 + more, mw)))
        lab = self.labelmap(m[..., 0] if m.ndim == 3 else m)[:r1 - r0, :c1 - c0]  # a mask's first band
        mvalid = None if mvalid is None else mvalid[:r1 - r0, :c1 - c0]
        if mvalid is not None:
            lab[~mvalid] = IGNORE
        return lab[ri - r0][:, ci - c0]

    def close(self) -> None:
        self.reader.close()


class VectorLabels:
    """Polygons in the image's pixel grid, rasterised per window."""

    def __init__(self, path: str, meta, options: VectorOptions, regions_path: str | None = None):
        from shapely import STRtree, area, box, intersects, union_all

        self.path, self.shape = path, tuple(meta.shape)
        H, W = self.shape
        lab = read_labels(path, meta, options)
        geoms, classes, regions = lab.geoms, lab.classes, lab.regions
        if regions_path:
            regions = regions + read_labels(regions_path, meta, options, all_regions=True).regions
        frame = box(0, 0, W, H)
        if not intersects(np.asarray(list(geoms) + list(regions), object), frame).any():
            raise InputError(f"{path}: all {len(geoms) + len(regions)} feature(s) lie outside the image "
                             f"({W}x{H} px{' at this level' if meta.level else ''}): the file belongs to another "
                             "image, or its coordinates are not this image's pixels (export them from QuPath for this "
                             "image, or give the file its CRS)")
        self.geoms, self.values = np.asarray(geoms, object), np.asarray(classes, np.uint8)
        self.tree = STRtree(self.geoms) if len(self.geoms) else None
        if options.regions == "image" or (not regions and lab.detections_only):
            self.mode, self.regions = "image", None
            why = "the whole image (" + ("regions: image" if options.regions == "image" else
                                         "detections only, no regions") + ")"
        elif regions:
            self.mode, self.regions, why = "regions", union_all(regions), f"{len(regions)} region(s)"
        else:
            self.mode, self.regions, why = "polygons", None, "the annotated polygons (no regions)"
        known = [self.regions] if self.mode == "regions" else list(self.geoms) if self.mode == "polygons" else []
        self.known = [g for g in known for g in getattr(g, "geoms", [g]) if not g.is_empty]
        areas = area(np.asarray(self.known, object)) if self.known else np.zeros(0)
        self.known_area = float(H * W) if self.mode == "image" else float(areas.sum())
        self.cum = np.cumsum(areas) if self.known else None
        if self.mode == "regions":
            from shapely import prepare

            prepare(self.regions)
        log.info("%s: %d polygon(s) in %d class(es), known area %s (%.1f%% of the image)", path, len(self.geoms),
                 len(set(self.values.tolist())), why, 100 * min(1.0, self.known_area / (H * W)))

    def position(self, rng, size):
        """A crop origin whose centre lies in the known area (None: anywhere)."""
        if self.cum is None:
            return None
        from shapely import contains_xy

        g = self.known[int(np.searchsorted(self.cum, rng.random() * self.cum[-1], side="right").clip(
            0, len(self.known) - 1))]
        x0, y0, x1, y1 = g.bounds
        for _ in range(10):
            px, py = rng.uniform(x0, x1), rng.uniform(y0, y1)
            if contains_xy(g, px, py):
                break
        else:
            p = g.representative_point()
            px, py = p.x, p.y
        return [int(np.clip(round(py - size[0] / 2), 0, max(self.shape[0] - size[0], 0))),
                int(np.clip(round(px - size[1] / 2), 0, max(self.shape[1] - size[1], 0)))]

    def window(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        H, W = self.shape
        ri, ci = _mirrored(y, h, H), _mirrored(x, w, W)
        r0, r1, c0, c1 = int(ri.min()), int(ri.max()) + 1, int(ci.min()), int(ci.max()) + 1
        lab = self._rasterise(r0, c0, r1 - r0, c1 - c0)
        if r0 == y and c0 == x and (r1 - r0, c1 - c0) == (h, w):
            return lab
        return lab[ri - r0][:, ci - c0]

    def _rasterise(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        from rasterio.features import rasterize
        from rasterio.transform import Affine
        from shapely import box, contains

        tr, win = Affine.translation(x, y), box(x, y, x + w, y + h)
        geoms, values = np.empty(0, object), np.empty(0, np.uint8)
        if self.mode == "image" or (self.mode == "regions" and contains(self.regions, win)):
            out = np.zeros((h, w), np.uint8)
        else:
            out = np.full((h, w), IGNORE, np.uint8)
            if self.mode == "regions":  # background 0 inside the regions, drawn first
                geoms, values = np.asarray([self.regions], object), np.zeros(1, np.uint8)
        if self.tree is not None:
            hit = np.sort(self.tree.query(win))  # by bounding box; file order: a later polygon is drawn on top
            geoms, values = np.concatenate([geoms, self.geoms[hit]]), np.concatenate([values, self.values[hit]])
        if len(geoms):  # one call: each costs rasterio's environment and checks
            rasterize(_shapes(geoms, values), out=out, transform=tr)
        return out

    def close(self) -> None:
        pass


def _shapes(geoms, values):
    """``(GeoJSON-like polygon, value)`` pairs built from numpy coordinate
    arrays: rasterio would otherwise ask each shapely geometry for its
    ``__geo_interface__``, which builds Python tuples vertex by vertex (it
    was 90% of a crop's labelling time)."""
    import shapely

    polys, owner = shapely.get_parts(geoms, return_index=True)
    rings, ring_poly = shapely.get_rings(polys, return_index=True)
    coords, ring_of = shapely.get_coordinates(rings, return_index=True)
    cuts = np.flatnonzero(np.diff(ring_of)) + 1
    per_ring = np.split(coords, cuts)
    starts = np.flatnonzero(np.r_[True, np.diff(ring_poly) != 0])
    for p, (a, b) in enumerate(zip(starts, [*starts[1:], len(per_ring)])):
        yield {"type": "Polygon", "coordinates": [r.tolist() for r in per_ring[a:b]]}, int(values[owner[p]])


def open_labels(mask: str, meta, labelmap, options: VectorOptions | None, image_path: str = "",
                regions_path: str | None = None):
    """The one entry for a training image's labels: vector or raster by the
    mask's extension."""
    if is_vector(mask):
        return VectorLabels(mask, meta, options or VectorOptions(), regions_path)
    if regions_path:
        raise InputError(f"{regions_path}: regions go with vector labels; for a raster mask mark unlabelled "
                         "pixels with ignore_value")
    return RasterLabels(mask, meta, labelmap, image_path)
