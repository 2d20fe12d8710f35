"""Outputs read the same way in every tool: GeoJSON as RFC 7946 says
(WGS 84 lon/lat) with the GeoPackage keeping the scene's CRS, slides'
polygons in pixels that GDAL does not take for degrees, probabilities named
after the class they hold, 8-bit probabilities that openslide reads, and
OME-Zarr coordinates that, with the georeference kept beside them, give
rasterio's pixel centres."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli, data

SCENE = "rasterio/RGB.byte.tif"  # Landsat, UTM zone 18N, 791 x 718 px of 300 m


@pytest.fixture(scope="module")
def scene_vectors(tmp_path_factory):
    """The demo model's objects on the scene, as GeoJSON (default and native) and GPKG."""
    tmp = tmp_path_factory.mktemp("vectors")
    src = data(SCENE)
    zarr_out = tmp / "scene.zarr"
    assert cli("run", src, "--weights", "demo", "--ignore-pixel-size", "-o", str(zarr_out), "--quiet").returncode == 0
    out = {}
    for name, extra in (("wgs84.geojson", ()), ("native.geojson", ("--vector-crs", "native")), ("objects.gpkg", ())):
        r = cli("run", src, "--weights", "demo", "--ignore-pixel-size", "-o", str(tmp / name), "--quiet", *extra)
        assert r.returncode == 0, r.stderr
        out[name] = tmp / name
    return out


def _features(path):
    import fiona

    with fiona.open(path) as f:
        return f.crs, [(dict(ft.properties)["id"], ft.geometry.__geo_interface__) for ft in f]


def test_geojson_is_wgs84_lon_lat_within_the_scene(scene_vectors):
    import rasterio
    from rasterio.warp import transform_bounds

    with rasterio.open(data(SCENE)) as src:
        west, south, east, north = transform_bounds(src.crs, "EPSG:4326", *src.bounds)
    doc = json.loads(scene_vectors["wgs84.geojson"].read_text())
    assert "crs" not in doc  # RFC 7946: WGS 84 is implied, the member is obsolete
    coords = np.concatenate([np.asarray(ring) for f in doc["features"] for ring in f["geometry"]["coordinates"]])
    assert len(doc["features"]) > 0
    eps = 1e-6
    assert (coords[:, 0] >= west - eps).all() and (coords[:, 0] <= east + eps).all()
    assert (coords[:, 1] >= south - eps).all() and (coords[:, 1] <= north + eps).all()
    crs, _ = _features(scene_vectors["wgs84.geojson"])
    assert crs.to_epsg() == 4326


def test_geojson_objects_are_the_gpkg_objects_reprojected(scene_vectors):
    from rasterio.warp import transform_geom
    from shapely.geometry import shape

    gcrs, gpkg = _features(scene_vectors["objects.gpkg"])
    assert gcrs.to_epsg() == 32618  # the GeoPackage keeps the scene's CRS
    _, lonlat = _features(scene_vectors["wgs84.geojson"])
    ncrs, native = _features(scene_vectors["native.geojson"])
    assert ncrs.to_epsg() == 32618
    assert [i for i, _ in gpkg] == [i for i, _ in lonlat] == [i for i, _ in native]
    for (_, g), (_, ll), (_, nat) in zip(gpkg, lonlat, native):
        assert shape(nat).equals_exact(shape(g), 1e-6)
        expect = shape(transform_geom("EPSG:32618", "EPSG:4326", g))
        assert shape(ll).equals_exact(expect, 1e-9)
        assert shape(ll).is_valid


def test_slide_geojson_is_pixels_that_gdal_does_not_read_as_degrees(tmp_path):
    import fiona

    from tilerseg import synthetic

    slide = tmp_path / "slide.tif"
    synthetic.write_tiff(slide, (768, 768), seed=0, levels=2, compression="zlib")  # nuclei at 0.5 µm/px
    out = tmp_path / "nuclei.geojson"
    r = cli("run", str(slide), "--weights", "demo", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert "LOCAL_CS" in doc["crs"]["properties"]["name"]
    assert doc["features"] and doc["features"][0]["properties"]["objectType"] == "detection"  # QuPath's form
    with fiona.open(out) as f:
        assert f.crs.to_epsg() is None and "pixel" in f.crs_wkt and "GEOGCS" not in f.crs_wkt


def test_binary_probability_band_is_named_after_the_foreground(tmp_path):
    import rasterio

    out = tmp_path / "p.tif"
    r = cli("run", data("rasterio/rgb-byte-tenth.tif"), "--weights", "demo", "--ignore-pixel-size", "--probabilities", "-o", str(out),
            "--quiet")
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as f:
        assert f.descriptions == ("nucleus",)
    ome = tmp_path / "p.ome.tif"
    assert cli("run", data("rasterio/rgb-byte-tenth.tif"), "--weights", "demo", "--ignore-pixel-size", "--probabilities", "-o",
               str(ome), "--quiet").returncode == 0
    import tifffile

    with tifffile.TiffFile(ome) as t:
        channel = tifffile.xml2dict(t.ome_metadata)["OME"]["Image"]["Pixels"]["Channel"]
    assert channel["Name"] == "nucleus"


@pytest.mark.slow
def test_uint8_probabilities_read_in_openslide_and_equal_the_float_ones(tmp_path, rgb_tiff):
    import openslide
    import tifffile

    src, _ = rgb_tiff
    f32, u8 = tmp_path / "f.ome.tif", tmp_path / "u.ome.tif"
    for out, kind in ((f32, "float32"), (u8, "uint8")):
        r = cli("run", src, "--weights", "demo", "--probabilities", kind, "--tile", "512", "-o", str(out),
                "--quiet")
        assert r.returncode == 0, r.stderr
    p = tifffile.imread(f32)
    b = tifffile.imread(u8)
    assert b.dtype == np.uint8 and b.shape == p.shape
    np.testing.assert_array_equal(b, np.rint(np.clip(p, 0, 1) * 254).astype(np.uint8))
    slide = openslide.OpenSlide(str(u8))
    region = np.asarray(slide.read_region((0, 0), 0, (300, 200)))
    assert region.shape == (200, 300, 4)
    np.testing.assert_array_equal(region[..., 0], b[:200, :300])  # gray: R = G = B = the byte
    assert slide.level_count > 1
    r = cli("run", src, "--weights", "demo", "--probabilities", "uint8", "-o", str(tmp_path / "u.zarr"))
    assert r.returncode == 1 and "float32" in r.stderr


@pytest.mark.parametrize("probabilities", [False, True])
def test_ome_zarr_coordinates_give_rasterios_pixel_centres_on_every_level(tmp_path, probabilities):
    """NGFF 0.5 takes no negative (north-up) scale: the multiscales hold the
    pixel size in metres and no geographic translation (level 0's pixel
    (0, 0) centre at 0), and the group's ``tilerseg`` attribute the CRS and
    the affine transform. Together they put every level's pixel where
    rasterio puts the pixel its value stands for, ``transform * (col + 0.5,
    row + 0.5)``: for a labels level the level-0 pixel it samples, for a
    mean level the centre of the block it averages (both checked on the
    values); ome-zarr-models validates the group."""
    import rasterio
    import zarr

    out = tmp_path / "m.zarr"
    args = ("--probabilities",) if probabilities else ()
    assert cli("run", data(SCENE), "--weights", "demo", "--ignore-pixel-size", "-o", str(out), "--quiet", *args).returncode == 0
    with rasterio.open(data(SCENE)) as f:
        t, crs = f.transform, f.crs
    group = zarr.open_group(str(out), mode="r")
    attrs = dict(group.attrs)
    ms = attrs["ome"]["multiscales"][0]
    assert ms["axes"][-1]["unit"] == ms["axes"][-2]["unit"] == "meter"
    geo = attrs["tilerseg"]
    assert rasterio.crs.CRS.from_wkt(geo["crs"]) == crs
    transform = rasterio.Affine(*geo["transform"])
    assert transform == t
    (sy0, sx0) = ms["datasets"][0]["coordinateTransformations"][0]["scale"][-2:]
    assert (sy0, sx0) == pytest.approx((-t.e, t.a))  # the pixel size, positive
    assert len(ms["datasets"]) == 3
    level0 = group["0"][...]
    for k, ds in enumerate(ms["datasets"]):
        (scale,), (shift,) = ([c[key] for c in ds["coordinateTransformations"] if c["type"] == key]
                              for key in ("scale", "translation"))
        level = group[ds["path"]][...]
        h, w = level.shape[-2:]
        rows, cols = np.meshgrid([0, 1, h // 2, h - 1], [0, 1, w // 2, w - 1], indexing="ij")
        n = 2 ** k  # the level-0 pixels under a level-k pixel, per side
        # the level-0 (fractional) index each level-k value stands for, checked on the values themselves
        r0, c0 = (rows * n + (n - 1) / 2, cols * n + (n - 1) / 2) if probabilities else (rows * n, cols * n)
        for r, c in zip(rows.ravel(), cols.ravel()):
            block = level0[..., r * n:(r + 1) * n, c * n:(c + 1) * n]
            if probabilities and not np.isnan(block).all():
                assert level[..., r, c] == pytest.approx(np.nanmean(block, axis=(-2, -1)), abs=1e-5)
            elif not probabilities:
                assert level[r, c] == level0[r * n, c * n]
        y, x = shift[-2] + scale[-2] * rows, shift[-1] + scale[-1] * cols  # the metadata's coordinates
        got = transform @ (x / sx0 + 0.5, y / sy0 + 0.5)                  # README: where they are on the map
        want = t @ (c0 + 0.5, r0 + 0.5)
        assert np.allclose(got, want, rtol=0, atol=1e-6), k
        if k == 0:  # the last row is about 2,611,785 m north, as rasterio.transform.xy says
            y717 = shift[-2] + scale[-2] * 717
            assert (transform @ (0.5, y717 / sy0 + 0.5))[1] == pytest.approx(rasterio.transform.xy(t, 717, 0)[1])
    from ome_zarr_models.v05.image import Image
    from ome_zarr_models.v05.image_label import ImageLabel

    (Image if probabilities else ImageLabel).from_zarr(group)


def test_georeferenced_ome_tiff_has_the_pixel_size_in_metres(tmp_path):
    """A UTM scene's .ome.tif carries PhysicalSizeX/Y in m, as rasterio
    reads the pixel size (the .zarr of the same run records it too)."""
    import rasterio
    import tifffile

    src = data("rasterio/rgb-byte-tenth.tif")  # 3004.2 x 3034.2 m pixels
    out = tmp_path / "m.ome.tif"
    assert cli("run", src, "--weights", "demo", "--ignore-pixel-size", "-o", str(out), "--quiet").returncode == 0
    with tifffile.TiffFile(out) as t:
        pixels = tifffile.xml2dict(t.ome_metadata)["OME"]["Image"]["Pixels"]
    with rasterio.open(src) as f:
        xres, yres = f.res
    assert (pixels["PhysicalSizeXUnit"], pixels["PhysicalSizeYUnit"]) == ("m", "m")
    assert (pixels["PhysicalSizeX"], pixels["PhysicalSizeY"]) == pytest.approx((xres, yres))
