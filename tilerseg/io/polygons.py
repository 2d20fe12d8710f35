"""Vector output: one polygon per object of a label mask, built block by block.

A mask of a whole slide or scene does not fit in memory, and neither does
a label image of it, so objects are traced one block at a time. An object
(a 4-connected component of one class value; 0 = background and
255 = nodata are never objects) may cross block borders, possibly leaving a
block and coming back further down, so it is assembled in two passes:

1. label every block, give each block-local component a global id and
   record which ids touch across the shared block edges (only one row of
   ids, the bottom of the previous block row, and one column are kept);
   connected components of that graph are the objects;
2. label every block again (identically), trace it with GDAL's polygonize
   and emit objects that lie in one block at once; pieces of the others
   wait until the last block row the object touches, then are unioned.

Memory is one block, one image-wide row of ids, a few numbers per
block-local component and the pieces of objects still open; the mask and
its labels are never held whole.
"""
from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator

import numpy as np

from ..config import VECTOR_CRS
from ..errors import InputError, OutputError
from .base import LABEL_NODATA

_DEFAULT_BLOCK = 1024


def _block_shape(z, chunk: int | None) -> tuple[int, int]:
    """Block size: ``chunk`` when given, else the array's chunks (zarr, or
    dask's first chunk), else a default; reads stay chunk-aligned by default."""
    if getattr(z, "ndim", len(z.shape)) != 2:
        raise InputError(f"expected a 2-D label mask, got shape {tuple(z.shape)}")
    if chunk:
        return int(chunk), int(chunk)
    ch = getattr(z, "chunks", None)
    if not ch:
        return _DEFAULT_BLOCK, _DEFAULT_BLOCK
    return tuple(int(c[0]) if isinstance(c, tuple) else int(c) for c in ch[:2])


def _blocks(shape, bshape) -> Iterator[tuple[int, int, int, int, int, int]]:
    """``(block_row, block_col, r0, r1, c0, c1)`` in row-major order."""
    (H, W), (bh, bw) = shape, bshape
    for br, r0 in enumerate(range(0, H, bh)):
        for bc, c0 in enumerate(range(0, W, bw)):
            yield br, bc, r0, min(r0 + bh, H), c0, min(c0 + bw, W)


def _label_block(block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class-aware 4-connected labels of one block, numbered 1..n class by
    class (deterministic, so pass 2 reproduces pass 1), and the class of
    each label (index 0 = no object)."""
    from scipy import ndimage

    lab = np.zeros(block.shape, np.int32)
    classes = [0]
    for k in np.unique(block):
        if k == 0 or k == LABEL_NODATA:
            continue
        lk, n = ndimage.label(block == k)
        on = lk > 0
        lab[on] = lk[on] + (len(classes) - 1)
        classes.extend([int(k)] * n)
    return lab, np.asarray(classes, np.int64)


def _edge_pairs(ids_a, cls_a, ids_b, cls_b) -> np.ndarray:
    """Global id pairs that touch across an edge: both objects, same class."""
    m = (ids_a > 0) & (ids_b > 0) & (cls_a == cls_b)
    return np.stack([ids_a[m], ids_b[m]], axis=1)


def _link_blocks(z, bshape):
    """Pass 1: each block's id base (global id = base + block-local label)
    and, per global id, its object (a connected component of the graph of
    ids touching across block edges); per object, its number of pieces and
    the last block row it touches. Node count = block-local components."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    H, W = z.shape
    nby, nbx = -(-H // bshape[0]), -(-W // bshape[1])
    bases, row_first = np.zeros((nby, nbx), np.int64), np.zeros(nby, np.int64)
    above_ids, above_cls = np.zeros(W, np.int64), np.zeros(W, np.int64)
    pairs, next_id = [np.zeros((0, 2), np.int64)], 1
    left_ids = left_cls = None
    for br, bc, r0, r1, c0, c1 in _blocks((H, W), bshape):
        block = np.asarray(z[r0:r1, c0:c1])
        lab, classes = _label_block(block)
        base = bases[br, bc] = next_id - 1
        next_id += len(classes) - 1
        if bc == 0:
            row_first[br] = base + 1
            left_ids = left_cls = None
        gid = np.where(lab > 0, lab + base, 0)
        pairs.append(_edge_pairs(above_ids[c0:c1], above_cls[c0:c1], gid[0], block[0]))
        if left_ids is not None:
            pairs.append(_edge_pairs(left_ids, left_cls, gid[:, 0], block[:, 0]))
        above_ids[c0:c1], above_cls[c0:c1] = gid[-1], block[-1]
        left_ids, left_cls = gid[:, -1], block[:, -1]
    edges = np.unique(np.concatenate(pairs), axis=0)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(next_id, next_id))
    _, obj = connected_components(graph, directed=False)
    pieces = np.bincount(obj)
    last_row = np.zeros(len(pieces), np.int64)
    np.maximum.at(last_row, obj, np.searchsorted(row_first, np.arange(next_id), side="right") - 1)
    return bases, obj, pieces, last_row


def iter_objects(z, *, chunk: int | None = None) -> Iterator[tuple[int, "shapely.Polygon"]]:  # noqa: F821
    """Yield ``(class_value, polygon)`` per object, block by block.

    Polygons are in pixel-corner coordinates (x = column, y = row; pixel
    (r, c) covers [c, c+1] x [r, r+1]), holes as interior rings. Objects
    inside one block come out as soon as that block is traced; objects
    crossing blocks come out after the last block row they touch, in
    order of their id, so the order is fixed for a given block size.
    """
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import Affine
    from shapely.geometry import shape

    bshape = _block_shape(z, chunk)
    bases, obj, pieces, last_row = _link_blocks(z, bshape)
    open_objects: dict[int, tuple[int, list]] = {}
    nbx = bases.shape[1]
    for br, bc, r0, r1, c0, c1 in _blocks(z.shape, bshape):
        lab, classes = _label_block(np.asarray(z[r0:r1, c0:c1]))
        tr = Affine.translation(c0, r0)
        for geom, value in shapes(lab, mask=lab > 0, connectivity=4, transform=tr):
            local = int(value)
            o = int(obj[bases[br, bc] + local])
            if pieces[o] == 1:
                yield int(classes[local]), shape(geom)
            else:
                open_objects.setdefault(o, (int(classes[local]), []))[1].append(shape(geom))
        if bc < nbx - 1:
            continue
        for o in sorted(o for o in open_objects if last_row[o] == br):
            k, parts = open_objects.pop(o)
            merged = shapely.union_all(parts)
            if merged.geom_type != "Polygon":  # pieces share pixel edges: anything else is a bug
                raise AssertionError(f"object of class {k} merged into a {merged.geom_type}")
            yield k, shapely.simplify(merged, 0.0)  # drops the collinear vertices left on seams
    assert not open_objects, "objects left open after the last block row"


def iter_instances(z, bottom: np.ndarray, *, chunk: int | None = None) -> Iterator[tuple[int, "shapely.Polygon"]]:  # noqa: F821
    """Yield ``(id, polygon)`` per object of an instance label image
    (uint32 ids, 0 = none), in id order, the same polygons whatever the
    blocks: the file of polygons is then the same bytes at every tiling, as
    the labels and the table are. ``bottom[id - 1]`` is an object's last
    row, after whose block row its pieces are joined (an id is its own
    object, one 4-connected region, so no linking pass is needed).

    Every polygon is put in one form (:func:`_canonical`), since GDAL's
    trace of a whole object and the union of its traced pieces differ in
    where rings start, in collinear vertices and in the order of holes.
    Objects wait for the lower ids (their first pixel is earlier in raster
    order) to be finished: in memory, the polygons of the rows that the
    tallest unfinished object spans (at most ``--max-object`` px)."""
    import heapq

    done, next_id = [], 1
    for i, g in _instances_by_block(z, bottom, chunk):
        heapq.heappush(done, (i, _canonical(g)))
        while done and done[0][0] == next_id:
            yield heapq.heappop(done)
            next_id += 1
    assert not done, "objects left with ids missing before them"


def _canonical(g):
    """A polygon in one form: collinear vertices dropped, rings in
    shapely's normal form (each starting at its least vertex, holes
    sorted)."""
    import shapely

    return shapely.normalize(shapely.simplify(g, 0.0))


def _instances_by_block(z, bottom: np.ndarray, chunk: int | None):
    """:func:`iter_instances`'s polygons as the blocks finish them."""
    import shapely
    from rasterio.features import shapes
    from rasterio.transform import Affine
    from shapely.geometry import shape

    bshape = _block_shape(z, chunk)
    if len(bottom) >= 2 ** 31:
        raise OutputError("more than 2^31 objects: polygons are traced with int32 ids; write a raster output")
    last = np.asarray(bottom, np.int64) // bshape[0]
    nbx = -(-z.shape[1] // bshape[1])
    open_objects: dict[int, list] = {}
    for br, bc, r0, r1, c0, c1 in _blocks(z.shape, bshape):
        lab = np.asarray(z[r0:r1, c0:c1]).astype(np.int32)
        faces = [lab[0]] if r0 > 0 else []  # an object on a face with a neighbour may go on there
        faces += ([lab[:, 0]] if bc > 0 else []) + ([lab[:, -1]] if bc < nbx - 1 else [])
        leaving = set(np.unique(np.concatenate(faces)).tolist()) if faces else set()
        for geom, value in shapes(lab, mask=lab > 0, connectivity=4, transform=Affine.translation(c0, r0)):
            i = int(value)
            if last[i - 1] == br and i not in open_objects and i not in leaving:
                yield i, shape(geom)
            else:
                open_objects.setdefault(i, []).append(shape(geom))
        if bc < nbx - 1:
            continue
        for i in sorted(i for i in open_objects if last[i - 1] == br):
            merged = shapely.union_all(open_objects.pop(i))
            if merged.geom_type != "Polygon":
                raise AssertionError(f"object {i} merged into a {merged.geom_type}")
            yield i, merged
    assert not open_objects, "objects left open after the last block row"


def _transformer(transform):
    """``geom -> geom`` in output coordinates (exterior counter-clockwise
    there, as RFC 7946 asks); ``transform`` in rasterio/GDAL Affine order."""
    from shapely.affinity import affine_transform
    from shapely.geometry.polygon import orient

    if transform is None:
        return lambda g: orient(g, 1.0)
    a, b, c, d, e, f = (float(v) for v in tuple(transform)[:6])
    return lambda g: orient(affine_transform(g, [a, b, d, e, c, f]), 1.0)


@functools.lru_cache(maxsize=512)
def _class_style(k: int, class_names: tuple[str, ...]) -> tuple[str, tuple[int, ...]]:
    """The name and RGB colour of class ``k``, as the preview shows it."""
    from .pyramid import colour

    name = class_names[k] if k < len(class_names) else f"class {k}"
    return str(name), colour(k)


# An engineering CRS in pixels, y down: GDAL/OGR (QGIS, fiona, ogrinfo) read it
# from the legacy ``crs`` member instead of assuming degrees; QuPath ignores it.
PIXEL_CRS = ('LOCAL_CS["image pixels (x = column, y = row, level 0)",LOCAL_DATUM["image",0],UNIT["pixel",1],'
             'AXIS["x",EAST],AXIS["y",SOUTH]]')


def _crs_member(crs: str | None) -> dict | None:
    """The legacy GeoJSON ``crs`` member (QGIS and GDAL read it): omitted
    for WGS 84, which RFC 7946 assumes; an EPSG URN where there is a code,
    else the WKT (GDAL reads either); for pixel coordinates, ``PIXEL_CRS``."""
    if not crs:
        return {"type": "name", "properties": {"name": PIXEL_CRS}}
    from rasterio.crs import CRS

    c = CRS.from_user_input(crs)
    epsg = c.to_epsg()
    if epsg == 4326:
        return None
    return {"type": "name", "properties": {"name": f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else c.to_wkt()}}


def _to_wgs84(crs: str):
    """``geom -> geom`` reprojected from ``crs`` to WGS 84 longitude/latitude
    (GDAL through rasterio; vertices are reprojected, edges stay straight)."""
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.geometry import mapping, shape
    from shapely.geometry.polygon import orient

    src = CRS.from_user_input(crs)
    return lambda g: orient(shape(transform_geom(src, "EPSG:4326", mapping(g))), 1.0)


def _geojson_polygon(geom) -> dict:
    """GeoJSON of a Polygon; integer coordinates (pixel corners, or a
    transform onto whole units) are written without a trailing ``.0``."""
    import shapely

    coords = [shapely.get_coordinates(r) for r in (geom.exterior, *geom.interiors)]
    as_int = all(np.array_equal(c, np.round(c)) and np.abs(c).max(initial=0) < 2**53 for c in coords)
    return {"type": "Polygon", "coordinates": [(c.astype(np.int64) if as_int else c).tolist() for c in coords]}


def _write_geojson(objects, path: str, class_names, crs) -> int:
    """Stream a FeatureCollection, one feature at a time, with the
    properties QuPath's GeoJSON import reads (objectType, classification).
    Coordinates keep full float precision (``repr``). ``crs`` is the CRS of
    the coordinates as written (None: pixels)."""
    member = _crs_member(crs)
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"type": "FeatureCollection", ')
        if member:
            f.write(f'"crs": {json.dumps(member)}, ')
        f.write('"features": [')
        for n, (k, geom, *extra) in enumerate(objects, 1):
            name, color = _class_style(k, class_names)
            props = {"id": n, "class": k, "name": name, "objectType": "detection",
                     "classification": {"name": name, "color": color}}
            props.update(extra[0] if extra else {})  # an instance's id, area, centroid, mean probability
            f.write(",\n" if n > 1 else "\n")
            f.write(json.dumps({"type": "Feature", "id": props["id"], "geometry": _geojson_polygon(geom),
                                "properties": props}))
        f.write("\n]}\n")
    return n


def _write_gpkg(objects, path: str, class_names, crs, batch: int = 1000) -> int:
    """Stream features into the GeoPackage layer ``objects`` in batches."""
    import fiona
    import fiona.errors
    from rasterio.crs import CRS
    from shapely.geometry import mapping

    objects = iter(objects)
    head = next(objects, None)
    fields = {"id": "int", "class": "int", "name": "str"}
    if head is not None and len(head) > 2:  # instances: their properties, typed from the first object's
        fields.update({k: ("int" if isinstance(v, int) else "float" if isinstance(v, float) else "str")
                       for k, v in head[2].items() if k not in fields})
    schema = {"geometry": "Polygon", "properties": fields}
    kw = {"crs_wkt": CRS.from_user_input(crs).to_wkt()} if crs else {}
    if os.path.isfile(path):  # "w" on an existing GeoPackage would add to it, not replace it
        os.remove(path)
    n, records = 0, []
    try:
        with fiona.open(path, "w", driver="GPKG", layer="objects", schema=schema, **kw) as dst:
            for n, (k, geom, *extra) in enumerate(([] if head is None else [head]) + [o for o in objects], 1):
                props = {"id": n, "class": k, "name": _class_style(k, class_names)[0]}
                props.update({key: v for key, v in (extra[0] if extra else {}).items() if key in fields})
                records.append(fiona.Feature.from_dict(geometry=mapping(geom), properties=props))
                if len(records) >= batch:
                    dst.writerecords(records)
                    records = []
            if records:
                dst.writerecords(records)
    except fiona.errors.FionaError as err:
        raise OutputError(f"{path}: cannot write the GeoPackage ({err})") from err
    return n


_WRITERS = {".geojson": _write_geojson, ".gpkg": _write_gpkg}


def write_vector(z, path: str, *, class_names=(), transform=None, crs: str | None = None,
                 chunk: int | None = None, vector_crs: str = "wgs84", instances=None) -> int:
    """Write ``path`` (.geojson or .gpkg, by extension) with one feature per
    object of the label mask ``z``; return the number of features.

    ``transform`` is a 6-tuple (a, b, c, d, e, f) (rasterio/GDAL Affine
    order, an ``Affine`` works too) mapping pixel corners (x = column,
    y = row) to X = a*x + b*y + c, Y = d*x + e*y + f; None keeps pixel
    coordinates. ``crs`` is a WKT string (or anything rasterio's
    ``CRS.from_user_input`` reads). Feature ids are 1..N in emission order.

    GeoJSON follows RFC 7946: coordinates in ``crs`` are reprojected to
    WGS 84 longitude/latitude, unless ``vector_crs="native"`` keeps them
    (with the legacy ``crs`` member). A GeoPackage always keeps ``crs``.
    Without a CRS the coordinates are pixels, marked by :data:`PIXEL_CRS`.

    ``instances``: ``z`` is an instance label image, and this is
    ``(bottom, props)``: each object's last row and ``props(id) -> (class,
    properties)``; its feature's id is its label.
    """
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    writer = _WRITERS.get(ext)
    if writer is None:
        raise OutputError(f"{path}: unsupported vector format; use a .geojson or .gpkg path")
    if vector_crs not in VECTOR_CRS:
        raise OutputError(f"--vector-crs {vector_crs!r}: use one of {', '.join(VECTOR_CRS)}")
    to_output = _transformer(transform)
    if crs and ext == ".geojson" and vector_crs == "wgs84":
        to_crs, to_output, crs = _to_wgs84(crs), (lambda g, f=to_output: to_crs(f(g))), "EPSG:4326"
    if instances is not None:
        bottom, props = instances
        objects = ((*props(i)[:1], to_output(g), props(i)[1]) for i, g in iter_instances(z, bottom, chunk=chunk))
    else:
        objects = ((k, to_output(g)) for k, g in iter_objects(z, chunk=chunk))
    try:
        return writer(objects, path, tuple(class_names), crs)
    except OutputError:
        raise
    except OSError as err:
        raise OutputError(f"{path}: cannot write ({err.strerror or err})") from err
