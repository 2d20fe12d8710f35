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
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from .labels import VectorOptions, name_counts

log = logging.getLogger(__name__)
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
    import fiona
    import fiona.errors

    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise InputError(f"{path}: empty file: export the annotations again (QuPath: File > Export objects "
                         "as GeoJSON)")
    try:
        layer = _layer(path, options.layer)
        with fiona.open(path, layer=layer) as src:
            crs = _file_crs(path, src, meta)
            attr = _class_field(path, src, options.class_attribute)
            out, raw = _features(path, src, attr, options, all_regions)
    except fiona.errors.FionaError as err:
        raise InputError(f"{path}: cannot be read as vector labels ({str(err).splitlines()[0]}): check it is "
                         "GeoJSON, a GeoPackage or a shapefile") from err
    if not raw:
        raise InputError(f"{path}: holds no features: draw or export annotations, or remove the file")
    move = _to_pixels(path, crs, meta)
    out.geoms, out.regions = move(out.geoms), move(out.regions)
    return out


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


def _file_crs(path: str, src, meta):
    """The file's CRS (WKT), or None for pixel coordinates."""
    wkt = src.crs_wkt or ""
    if not wkt or wkt.startswith("LOCAL_CS") or wkt.startswith("ENGCRS"):
        return None
    if path.lower().endswith(".geojson"):
        with open(path, "rb") as f:
            head = f.read(1 << 16)
        if b'"crs"' not in head.split(b'"features"')[0]:  # no crs member: QuPath's pixels, or RFC 7946's WGS 84
            return "EPSG:4326" if meta.georeferenced else None
    if not meta.georeferenced:
        raise InputError(f"{path}: its coordinates are in a CRS ({_crs_name(wkt)}), but the image has no "
                         "georeference to reproject them to: export the labels in pixel coordinates, or use "
                         "the georeferenced image")
    return wkt


def _crs_name(wkt: str) -> str:
    from rasterio.crs import CRS

    try:
        c = CRS.from_wkt(wkt)
        return f"EPSG:{c.to_epsg()}" if c.to_epsg() else wkt[:60]
    except Exception:  # noqa: BLE001 - only for the message
        return wkt[:60]


def _class_field(path: str, src, chosen: str | None) -> str | None:
    props = list(src.schema.get("properties", {}))
    if chosen:
        if chosen not in props:
            raise InputError(f"{path}: no attribute {chosen!r} (class_attribute); its attributes: "
                             f"{', '.join(props) or 'none'}")
        return chosen
    return next((k for k in ("classification", "name", "class") if k in props), None)


def _features(path: str, src, attr, options: VectorOptions, all_regions: bool):
    """Check, name and sort every feature (labels or regions)."""
    from shapely.geometry import shape

    out, raw, repaired, unknown = Labels(), 0, [], []
    wanted = {str(n).lower(): k for k, n in enumerate(options.class_names)}
    region = {str(n).lower() for n in options.region_classes}
    kinds = set()
    for i, f in enumerate(src):
        raw += 1
        props = dict(f.properties or {})
        fid = props.get("id", f.id)
        if f.geometry is None:
            continue
        g = _polygonal(shape(f.geometry), path, i, fid, repaired)
        name = _name(props.get(attr) if attr else None)
        if all_regions or (isinstance(name, str) and name.lower() in region):
            out.regions.append(g)
            continue
        k = _class_id(name, wanted, len(options.class_names))
        if k is None:
            unknown.append((i, fid, name))
        kinds.add(str(props.get("objectType") or "").lower())
        out.geoms.append(g)
        out.classes.append(k)
    if unknown:
        i, fid, name = unknown[0]
        found = [str(_name(c)) for c in _names_in(path, attr, options)]
        raise InputError(f"{path}: feature {i}{_fid(fid)} has class {(name if name is not None else _UNCLASSIFIED)!r}, "
                         f"not in class_names {list(options.class_names)} ({len(unknown)} such feature(s)); the file "
                         f"holds: {name_counts(found)}: add the names to class_names (or region_classes), or "
                         "rename them in QuPath")
    if repaired:
        log.warning("%s: %d self-intersecting polygon(s) repaired with make_valid (first: feature %d%s)", path,
                    len(repaired), repaired[0][0], _fid(repaired[0][1]))
    out.detections_only = bool(out.geoms) and kinds <= {"detection", "cell", "tile"}
    return out, raw


def _names_in(path: str, attr, options: VectorOptions):
    """Every feature's class name (a second pass, only for the error line)."""
    import fiona

    with fiona.open(path, layer=_layer(path, options.layer)) as src:
        for f in src:
            c = _name((f.properties or {}).get(attr) if attr else None)
            yield _UNCLASSIFIED if c is None else c


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
