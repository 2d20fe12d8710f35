"""Reading vector label files: QuPath GeoJSON, GeoPackage, shapefile.

Every file goes through fiona (GDAL's OGR), which streams features; each
feature is checked, named and moved into the pixel grid of the image as it
is read for training, once, when the file is opened. :mod:`.labels` then
rasterises them window by window.

Coordinates. A file without a CRS is in pixels of level 0 (QuPath's
export; ``tilerseg run``'s GeoJSON marks this with a ``LOCAL_CS``). A
GeoJSON with no ``crs`` member is pixels for an image without
georeference, and WGS 84 longitude/latitude (RFC 7946, what ``tilerseg
run`` writes by default) for a georeferenced one. Any other CRS is
reprojected (by vertices, GDAL through rasterio) to the image's.

Class names. The class of a feature is QuPath's ``classification.name``,
or else a ``name`` or ``class`` attribute (``class_attribute`` picks
another); names match ``class_names`` regardless of case, integers are
class ids, and a feature without a class is class 1 when there are two."""
from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VectorOptions:
    """How vector files name classes and known areas (``data.*`` keys)."""

    class_names: tuple[str, ...] = ("background", "foreground")
    regions: str | None = None          # None, "image", or a vector file of regions
    region_classes: tuple[str, ...] = ("Region",)
    class_attribute: str | None = None  # default: QuPath's classification.name, else name, else class
    layer: str | None = None            # GeoPackage layer


def name_counts(names) -> str:
    """``Tumor (12), Stroma (3)``: what a file holds, for error lines."""
    return ", ".join(f"{n} ({c})" for n, c in Counter(names).most_common())


_UNCLASSIFIED = "(unclassified)"


@dataclass
class Labels:
    geoms: list = field(default_factory=list)      # polygons in the image's pixels (x = column, y = row)
    classes: list = field(default_factory=list)    # class id of each
    regions: list = field(default_factory=list)    # known-area polygons
    detections_only: bool = False                  # every labelled feature is a QuPath detection/cell


def read_labels(path: str, meta, options: VectorOptions, all_regions: bool = False) -> Labels:
    """Read ``path`` into :class:`Labels`; ``all_regions``: every polygon
    is a region (a ``regions`` file). Bad input raises one line naming the
    file, the feature and the fix."""
    import fiona.errors

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file: export the annotations again (QuPath: File > Export objects "
                         "as GeoJSON)")
    try:
        src = _File(path, options.layer)
        crs = _file_crs(path, src.crs, meta)
        out, raw = _features(path, src, options, all_regions)
    except (fiona.errors.FionaError, ValueError) as err:
        if isinstance(err, InputError):
            raise
        raise InputError(f"{path}: cannot be read as vector labels ({str(err).splitlines()[0]}): check it is "
                         "GeoJSON, a GeoPackage or a shapefile") from err
    if not raw:
        raise InputError(f"{path}: holds no features: draw or export annotations, or remove the file")
    move = _to_pixels(path, crs, meta)
    out.geoms, out.regions = move(out.geoms), move(out.regions)
    return out


_UNSTATED = "unstated"


class _File:
    """A vector file's CRS (WKT, None for none, :data:`_UNSTATED` for a
    GeoJSON without a ``crs`` member), attribute names (None: per feature)
    and its features ``(id, properties, geometry mapping)``, streamed.

    GeoJSON is parsed here, one feature at a time: fiona (GDAL) fails on a
    feature that lacks a nested attribute others have (QuPath's
    ``classification`` of an unclassified object)."""

    def __init__(self, path: str, layer: str | None):
        self.path = path
        if path.lower().endswith(".geojson"):
            self.layer, self.fields = None, None
            self.crs = _geojson_crs(path)
        else:
            import fiona

            self.layer = _layer(path, layer)
            with fiona.open(path, layer=self.layer) as src:
                wkt = src.crs_wkt or None
                self.fields = list(src.schema.get("properties", {}))
            self.crs = wkt

    def __iter__(self):
        if self.fields is None:
            for f in _geojson_features(self.path):
                props = f.get("properties") or {}
                yield props.get("id", f.get("id")), props, f.get("geometry")
            return
        import fiona

        with fiona.open(self.path, layer=self.layer) as src:
            for f in src:
                props = dict(f.properties or {})
                yield props.get("id", f.id), props, (f.geometry.__geo_interface__ if f.geometry else None)


def _geojson_crs(path: str):
    import json
    import re

    with open(path, encoding="utf-8", errors="replace") as f:
        head = f.read(1 << 16)
    m = re.search(r'"crs"\s*:\s*', head.split('"features"')[0])
    if not m:
        return _UNSTATED
    member, _ = json.JSONDecoder().raw_decode(head, m.end())
    name = ((member or {}).get("properties") or {}).get("name")
    return None if not name or str(name).startswith(("LOCAL_CS", "ENGCRS")) else str(name)


def _geojson_features(path: str, chunk: int = 1 << 20):
    """The features of a FeatureCollection, a bare array of features or
    one Feature, decoded one at a time from a sliding buffer."""
    import json
    import re

    dec = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf = f.read(chunk)
        lead = buf.lstrip()[:1]
        m = None if lead == "[" else re.search(r'"features"\s*:\s*\[', buf)
        if lead != "[" and m is None:  # one Feature, or a collection whose features come late
            obj = json.loads(buf + f.read())
            yield from (obj.get("features") or []) if obj.get("type") == "FeatureCollection" else [obj]
            return
        pos = buf.index("[") + 1 if lead == "[" else m.end()
        while True:
            while True:
                while pos < len(buf) and buf[pos] in " \t\r\n,":
                    pos += 1
                if pos < len(buf):
                    break
                buf, pos = f.read(chunk), 0
                if not buf:
                    raise ValueError("the feature list is not closed: a truncated file")
            if buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                more = f.read(chunk) if err.pos > len(buf) - (1 << 16) else ""  # cut by the buffer, or broken
                if not more:
                    raise ValueError(f"not valid JSON near character {f.tell() - len(buf) + err.pos}: "
                                     f"{err.msg}") from None
                buf, pos = buf[pos:] + more, 0
                continue
            yield obj
            pos = end


def _layer(path: str, layer: str | None):
    import fiona

    if not path.lower().endswith(".gpkg"):
        return layer
    layers = fiona.listlayers(path)
    if layer is None:
        if len(layers) > 1:
            raise InputError(f"{path}: {len(layers)} layers ({', '.join(layers)}): choose one with label_layer")
        return layers[0] if layers else None
    if layer not in layers:
        raise InputError(f"{path}: no layer {layer!r}; its layers: {', '.join(layers)}")
    return layer


def _file_crs(path: str, crs, meta):
    """The CRS to reproject from (WKT or a name), or None for pixels."""
    if crs == _UNSTATED:  # no crs member: QuPath's pixels, or RFC 7946's WGS 84 on a georeferenced image
        return "EPSG:4326" if meta.georeferenced else None
    if not crs or crs.startswith(("LOCAL_CS", "ENGCRS")):
        return None
    if not meta.georeferenced:
        raise InputError(f"{path}: its coordinates are in a CRS ({_crs_name(crs)}), but the image has no "
                         "georeference to reproject them to: export the labels in pixel coordinates, or use "
                         "the georeferenced image")
    return crs


def _crs_name(wkt: str) -> str:
    from rasterio.crs import CRS

    try:
        c = CRS.from_wkt(wkt)
        return f"EPSG:{c.to_epsg()}" if c.to_epsg() else wkt[:60]
    except Exception:  # noqa: BLE001 - only for the message
        return wkt[:60]


def _class_field(path: str, fields, chosen: str | None, props: dict):
    """The attribute naming a feature's class: ``chosen``, else QuPath's
    ``classification``, else ``name`` or ``class`` (for a QuPath object,
    whose ``name`` is its own, only ``classification``)."""
    if chosen:
        if fields is not None and chosen not in fields:
            raise InputError(f"{path}: no attribute {chosen!r} (class_attribute); its attributes: "
                             f"{', '.join(fields) or 'none'}")
        return chosen
    keys = fields if fields is not None else list(props)
    if "classification" in keys or "objectType" in props:
        return "classification"
    return next((k for k in ("name", "class") if k in keys), None)


def _features(path: str, src: _File, options: VectorOptions, all_regions: bool, batch: int = 8192):
    """Check, name and sort every feature (labels or regions); geometries
    are built a batch at a time (:func:`_geometries`)."""
    out, raw, repaired, unknown = Labels(), 0, [], []
    wanted = {str(n).lower(): k for k, n in enumerate(options.class_names)}
    region = {str(n).lower() for n in options.region_classes}
    kinds, pending = set(), []

    def flush():
        for (i, fid, k, _), g in zip(pending, _geometries(path, pending, repaired)):
            (out.regions if k is None else out.geoms).append(g)
            if k is not None:
                out.classes.append(k)
        pending.clear()

    for i, (fid, props, geom) in enumerate(src):
        raw += 1
        if not geom:
            continue
        attr = _class_field(path, src.fields, options.class_attribute, props)
        name = _name(props.get(attr) if attr else None)
        if all_regions or (isinstance(name, str) and name.lower() in region):
            k = None
        else:
            k = _class_id(name, wanted, len(options.class_names))
            if k is None:
                unknown.append((i, fid, name))
                k = 0
            kinds.add(str(props.get("objectType") or "").lower())
        pending.append((i, fid, k, geom))
        if len(pending) >= batch:
            flush()
    flush()
    if unknown:
        i, fid, name = unknown[0]
        found = [_UNCLASSIFIED if c is None else str(c) for c in _names_in(path, src, options)]
        raise InputError(f"{path}: feature {i}{_fid(fid)} has class {(name if name is not None else _UNCLASSIFIED)!r}, "
                         f"not in class_names {list(options.class_names)} ({len(unknown)} such feature(s)); the file "
                         f"holds: {name_counts(found)}: add the names to class_names (or region_classes), or "
                         "rename them in QuPath")
    if repaired:
        log.warning("%s: %d self-intersecting polygon(s) repaired with make_valid (first: feature %d%s)", path,
                    len(repaired), repaired[0][0], _fid(repaired[0][1]))
    out.detections_only = bool(out.geoms) and kinds <= {"detection", "cell", "tile"}
    return out, raw


def _names_in(path: str, src: _File, options: VectorOptions):
    """Every feature's class name (a second pass, only for the error line)."""
    for _, props, _ in src:
        attr = _class_field(path, src.fields, options.class_attribute, props)
        yield _name(props.get(attr) if attr else None)


def _fid(fid) -> str:
    return f" (id {fid})" if fid not in (None, "") else ""


def _name(value):
    if isinstance(value, dict):
        value = value.get("name")
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)) or (isinstance(value, float) and value.is_integer()):
        return int(value)
    return None if value in (None, "") else str(value)


def _class_id(name, wanted: dict, classes: int):
    if name is None:
        return 1 if classes == 2 else None
    if isinstance(name, int):
        return name if 0 <= name < classes else None
    return wanted.get(name.lower())


def _geometries(path: str, pending: list, repaired: list) -> list:
    """Shapely geometries of ``pending`` ``(index, id, class, GeoJSON-like
    geometry)``, checked by :func:`_polygonal`. Plain polygons (nearly all
    of them: QuPath's cells, traced masks) are built together from one
    coordinate array, about 3x faster than one ``shape()`` each."""
    import shapely
    from shapely.geometry import shape

    simple = [n for n, p in enumerate(pending) if p[3].get("type") == "Polygon" and p[3].get("coordinates")
              and all(len(r) >= 4 for r in p[3]["coordinates"])]
    built = [None] * len(pending)
    if simple:
        flat, ring_len, ring_poly = [], [], []
        for j, n in enumerate(simple):
            for ring in pending[n][3]["coordinates"]:
                flat.extend(ring)
                ring_len.append(len(ring))
                ring_poly.append(j)
        try:
            xy = np.asarray(flat, np.float64)
        except ValueError:  # rings mixing 2-D and 3-D vertices: one by one below
            xy = None
        if xy is not None and xy.ndim == 2 and xy.shape[1] >= 2:
            rings = shapely.linearrings(xy[:, :2], indices=np.repeat(np.arange(len(ring_len)), ring_len))
            for n, g in zip(simple, shapely.polygons(rings, indices=np.asarray(ring_poly))):
                built[n] = g
    return [_polygonal(g if g is not None else shape(p[3]), path, p[0], p[1], repaired)
            for g, p in zip(built, pending)]


def _polygonal(g, path: str, i: int, fid, repaired: list):
    """``g`` as a (Multi)Polygon: points and lines refused, self-intersections
    repaired with ``make_valid`` (counted), refused when nothing is left."""
    import shapely

    parts = shapely.get_parts(g) if g.geom_type in ("GeometryCollection", "MultiPolygon") else [g]
    odd = sorted({p.geom_type for p in parts} - {"Polygon", "MultiPolygon"})
    if odd:
        raise InputError(f"{path}: feature {i}{_fid(fid)} is a {g.geom_type}"
                         f"{' holding ' + ', '.join(odd) if g.geom_type != odd[0] else ''}: classes are areas, "
                         "so labels must be polygons; buffer points and lines into polygons, or remove them")
    xy = shapely.get_coordinates(g)
    if len(xy) and not (np.isfinite(xy).all() and np.abs(xy).max() <= 1e15):  # GEOS fails on them, deep inside
        raise InputError(f"{path}: feature {i}{_fid(fid)} has a vertex that is no coordinate (NaN, infinity or "
                         "beyond 1e15): fix or remove that feature")
    if g.is_valid:
        return g
    fixed = shapely.make_valid(g)
    polys = [p for p in shapely.get_parts(fixed) if p.geom_type in ("Polygon", "MultiPolygon") and p.area > 0]
    if not polys:
        raise InputError(f"{path}: feature {i}{_fid(fid)} is an invalid polygon ({shapely.is_valid_reason(g)}) "
                         "that make_valid cannot repair into an area: redraw it")
    repaired.append((i, fid))
    return shapely.union_all(polys)


def _to_pixels(path: str, crs, meta):
    """``list -> list`` of geometries in the pixels of the image as read."""
    from shapely import affinity

    H, W = meta.shape
    if crs is None:
        H0, W0 = meta.levels[0] if meta.levels else (H, W)
        sx, sy = W / W0, H / H0
        if sx == sy == 1:
            return lambda gs: gs
        return lambda gs: [affinity.scale(g, sx, sy, origin=(0, 0)) for g in gs]
    from affine import Affine
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape

    inv = ~Affine(*meta.transform[:6])

    def move(gs):
        if not gs:
            return gs
        try:
            same = CRS.from_user_input(crs) == CRS.from_user_input(meta.crs)
            moved = gs if same else [shape(m) for m in transform_geom(CRS.from_user_input(crs), meta.crs,
                                                                      [mapping(g) for g in gs])]
        except Exception as err:  # noqa: BLE001 - GDAL/PROJ say it many ways
            raise InputError(f"{path}: cannot reproject its coordinates from {_crs_name(crs)} to the image's CRS "
                             f"({str(err).splitlines()[0] if str(err) else type(err).__name__}): export the labels "
                             "in the image's CRS") from err
        bad = next((i for i, g in enumerate(moved) if not np.isfinite(g.bounds).all()), None)
        if bad is not None:
            raise InputError(f"{path}: feature {bad} does not reproject from {_crs_name(crs)} to the image's CRS "
                             "(infinite coordinates): export the labels in the image's CRS")
        return [affinity.affine_transform(g, [inv.a, inv.b, inv.d, inv.e, inv.c, inv.f]) for g in moved]

    return move
