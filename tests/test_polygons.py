"""Vector output of a label mask, traced block by block, checked against
scipy's labelling of the whole mask: one valid Polygon per 4-connected
object, rasterizing back to the mask pixel for pixel, whatever the block
size, seams included."""
from __future__ import annotations

import json
import time
import tracemalloc

import numpy as np
import pytest
from scipy import ndimage

from tilerseg.errors import OutputError
from tilerseg.io.polygons import iter_objects, write_vector

UTM = (30.0, 0.0, 500000.0, 0.0, -30.0, 4500000.0)  # 30 m pixels, north up


def _spiral(m, r, c, turns, k):
    """A 2-px wide rectangular spiral (arms 3 px apart): it leaves and
    re-enters blocks, so its pieces merge only through later block rows."""
    length = 5
    for i in range(turns):
        dr, dc = [(0, 1), (1, 0), (0, -1), (-1, 0)][i % 4]
        for _ in range(length):
            m[r:r + 2, c:c + 2] = k
            r, c = r + dr, c + dc
        length += 5 * (i % 2)


def _mask(H=300, W=340, seed=0) -> np.ndarray:
    """Nested noise bands (holes, objects in holes, touching classes) plus
    hand-made cases straddling the borders of 32/48/37x53-px blocks."""
    rng = np.random.default_rng(seed)
    noise = ndimage.gaussian_filter(rng.random((H, W)), 5)
    m = np.array([0, 1, 2, 3, 1], np.uint8)[np.digitize(noise, np.quantile(noise, [0.45, 0.6, 0.75, 0.88]))]
    m[5:115, 5:115] = 0
    _spiral(m, 60, 60, 20, 2)
    m[5:115, 130:240] = 0  # a comb: teeth in block row 0 joined only by the bar in block row 3
    m[97:101, 135:231] = 1
    for c in range(135, 231, 12):
        m[8:97, c:c + 3] = 1
    m[120:190, 250:335] = 0  # a ring over block corners, a square in its hole, a dot in the square's hole
    m[125:186, 255:326] = 1
    m[129:182, 259:322] = 0
    m[140:171, 270:311] = 3
    m[150:161, 285:296] = 2
    m[246:270, 246:270] = 0  # checkerboard: diagonal neighbours only, so every pixel is an object
    yy, xx = np.mgrid[248:268, 248:268]
    m[248:268, 248:268] = np.where((yy + xx) % 2 == 0, 3, 0)
    m[280:300, 100:140], m[280:300, 140:180] = 1, 2  # different classes side by side
    m[200:230, 20:90] = 255  # nodata cuts objects
    m[np.arange(150, 250), np.arange(100, 200)] = 255
    return m


def _oracle(m) -> tuple[np.ndarray, int]:
    """Whole-mask labels, every class's components numbered apart."""
    lab, n = np.zeros(m.shape, np.int64), 0
    for k in np.unique(m):
        if k not in (0, 255):
            lk, nk = ndimage.label(m == k)
            lab[lk > 0] = lk[lk > 0] + n
            n += nk
    return lab, n


def _check(objects, m, transform=None):
    """Objects <-> scipy components one to one, valid Polygons, areas equal
    pixel counts, and rasterizing them back gives the mask."""
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    tr = Affine(*transform) if transform else Affine.identity()
    oracle, n = _oracle(m)
    assert len(objects) == n
    assert all(g.geom_type == "Polygon" and g.is_valid for _, g in objects)
    idx = rasterize(((g, i) for i, (_, g) in enumerate(objects, 1)), out_shape=m.shape, transform=tr,
                    fill=0, dtype="int32")
    classes = np.array([0] + [k for k, _ in objects])
    np.testing.assert_array_equal(classes[idx], np.where(m == 255, 0, m))
    on = idx > 0
    pairs = np.unique(np.stack([idx[on], oracle[on]]), axis=1)
    assert pairs.shape[1] == n == len(np.unique(pairs[0])) == len(np.unique(pairs[1]))
    pixels = np.bincount(idx.ravel(), minlength=n + 1)[1:]
    np.testing.assert_allclose([g.area for _, g in objects], pixels * abs(tr.determinant))


def _zarr(tmp_path, m, chunks):
    import zarr

    z = zarr.create_array(store=str(tmp_path / "m.zarr"), shape=m.shape, chunks=chunks, dtype="uint8")
    z[:] = m
    return zarr.open_array(str(tmp_path / "m.zarr"), mode="r")


@pytest.mark.parametrize("chunks", [(32, 32), (48, 48), (37, 53)])
def test_zarr_blocks_match_scipy(tmp_path, chunks):
    m = _mask()
    _check(list(iter_objects(_zarr(tmp_path, m, chunks))), m)


@pytest.mark.parametrize("chunk", [45, 1000])
def test_numpy_blocks_match_scipy(chunk):
    m = _mask(seed=1)
    _check(list(iter_objects(m, chunk=chunk)), m)


def test_same_objects_in_same_order_from_zarr_and_numpy(tmp_path):
    m = _mask()
    a = [(k, g.wkb) for k, g in iter_objects(_zarr(tmp_path, m, (32, 32)))]
    b = [(k, g.wkb) for k, g in iter_objects(m, chunk=32)]
    assert a == b


def test_spiral_and_comb_are_one_object_each():
    m = np.zeros((300, 340), np.uint8)
    _spiral(m, 60, 60, 20, 2)
    m[97:101, 135:231] = 1
    for c in range(135, 231, 12):
        m[8:97, c:c + 3] = 1
    objects = list(iter_objects(m, chunk=16))
    assert sorted(k for k, _ in objects) == [1, 2]
    _check(objects, m)


def test_empty_and_nodata_only_masks_have_no_objects(tmp_path):
    assert list(iter_objects(np.zeros((50, 70), np.uint8), chunk=16)) == []
    assert write_vector(np.full((50, 70), 255, np.uint8), str(tmp_path / "e.geojson"), chunk=16) == 0
    assert json.loads((tmp_path / "e.geojson").read_text())["features"] == []


def test_geojson_with_transform_and_crs(tmp_path):
    import fiona
    from rasterio.crs import CRS
    from shapely.geometry import shape

    m, path = _mask(), tmp_path / "o.geojson"
    n = write_vector(m, str(path), class_names=("bg", "tumour", "stroma"), transform=UTM,
                     crs=CRS.from_epsg(32618).to_wkt(), chunk=48, vector_crs="native")
    doc = json.loads(path.read_text())
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32618"
    feats = doc["features"]
    assert n == len(feats) and [f["id"] for f in feats] == list(range(1, n + 1))
    f = next(f for f in feats if f["properties"]["class"] == 1)
    assert f["properties"]["name"] == f["properties"]["classification"]["name"] == "tumour"
    assert f["properties"]["objectType"] == "detection" and f["properties"]["classification"]["color"] == [0, 230, 60]
    assert next(f for f in feats if f["properties"]["class"] == 3)["properties"]["name"] == "class 3"
    got = [(f["properties"]["class"], shape(f["geometry"])) for f in feats]
    _check(got, m, UTM)
    for (_, g), (_, p) in zip(got, iter_objects(m, chunk=48)):  # bounds = affine of the pixel bounds
        x0, y0, x1, y1 = p.bounds
        np.testing.assert_allclose(g.bounds, (500000 + 30 * x0, 4500000 - 30 * y1, 500000 + 30 * x1, 4500000 - 30 * y0))
    with fiona.open(path) as src:
        assert len(src) == n and src.crs.to_epsg() == 32618


def test_geojson_pixel_coordinates_are_integers_without_crs(tmp_path):
    m = np.zeros((10, 10), np.uint8)
    m[2:5, 3:7] = 4
    assert write_vector(m, str(tmp_path / "p.geojson"), chunk=4) == 1
    doc = json.loads((tmp_path / "p.geojson").read_text())
    assert "LOCAL_CS" in doc["crs"]["properties"]["name"]  # pixels, so that GDAL does not read degrees
    ring = doc["features"][0]["geometry"]["coordinates"][0]
    assert all(isinstance(v, int) for xy in ring for v in xy)
    assert sorted(map(tuple, ring[:-1])) == [(3, 2), (3, 5), (7, 2), (7, 5)]


def test_gpkg_reads_back(tmp_path):
    import fiona
    from shapely.geometry import shape

    m, path = _mask(), str(tmp_path / "o.gpkg")
    n = write_vector(_zarr(tmp_path, m, (37, 53)), path, class_names=("bg", "a", "b"))
    assert write_vector(m, path, chunk=64) == n  # an existing file is replaced, not appended to
    assert fiona.listlayers(path) == ["objects"]
    with fiona.open(path, layer="objects") as src:
        assert len(src) == n and not src.crs
        assert src.schema["geometry"] == "Polygon"
        assert dict(src.schema["properties"]).keys() == {"id", "class", "name"}
        rows = [(f.properties["id"], f.properties["class"], f.properties["name"], shape(f.geometry)) for f in src]
    assert [r[0] for r in rows] == list(range(1, n + 1))
    assert {(r[1], r[2]) for r in rows} == {(1, "class 1"), (2, "class 2"), (3, "class 3")}
    _check([(k, g) for _, k, _, g in rows], m)


def test_gpkg_keeps_crs(tmp_path):
    import fiona
    from rasterio.crs import CRS

    m = np.zeros((20, 20), np.uint8)
    m[3:9, 4:12] = 1
    path = str(tmp_path / "c.gpkg")
    assert write_vector(m, path, transform=UTM, crs=CRS.from_epsg(32618).to_wkt(), chunk=8) == 1
    with fiona.open(path, layer="objects") as src:
        assert src.crs.to_epsg() == 32618
        assert src.bounds == pytest.approx((500120, 4500000 - 270, 500360, 4500000 - 90))


def test_unsupported_extension_raises_output_error(tmp_path):
    with pytest.raises(OutputError, match=r"o\.shp: unsupported"):
        write_vector(np.zeros((4, 4), np.uint8), str(tmp_path / "o.shp"))
    with pytest.raises(OutputError, match="cannot write"):
        write_vector(np.ones((4, 4), np.uint8), str(tmp_path / "missing" / "o.geojson"))


def test_large_zarr_mask_fast_and_bounded(tmp_path):
    """2000 x 2000, ~2000 objects, 256-px chunks: quick, and Python's peak
    allocation stays far below one int32 label image of the whole mask."""
    rng = np.random.default_rng(0)
    small = ndimage.gaussian_filter(rng.random((100, 100)), 1.0)
    m = np.array([0, 1, 2, 3, 0], np.uint8)[np.digitize(small, np.quantile(small, [0.5, 0.62, 0.74, 0.86]))]
    m = np.repeat(np.repeat(m, 20, 0), 20, 1)
    m[500:700, 100:900] = 255
    _, n = _oracle(m)
    z = _zarr(tmp_path, m, (256, 256))
    tracemalloc.start()
    try:
        t = time.perf_counter()
        count = write_vector(z, str(tmp_path / "big.geojson"))
        seconds = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == n > 1500
    assert peak < m.size  # < 4 MB: a quarter of the whole mask's int32 labels
    assert seconds < 30
