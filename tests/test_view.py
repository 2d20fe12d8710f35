"""tilerseg view without a browser: tiles against the files as tifffile, zarr
and rasterio read them, pixel for pixel at every level; cache headers; URLs
that try to leave the given files; refusals before the server starts."""
import io
import json
import os
import socket

import numpy as np
import pytest

from conftest import cli, cli_process, data

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

import viewdata  # noqa: E402
from tilerseg.view import open_view  # noqa: E402
from tilerseg.view.app import create_app  # noqa: E402

pytestmark = pytest.mark.xdist_group("view")  # the module's files are made once, on one worker


PORT = 8765  # the port the in-process app takes itself to serve (Host: 127.0.0.1:PORT)


def _client(view) -> TestClient:
    return TestClient(create_app(view, port=PORT), base_url=f"http://127.0.0.1:{PORT}")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    return viewdata.slide_set(tmp_path_factory.mktemp("view"))


@pytest.fixture(scope="module")
def client(slide):
    view = open_view([slide["image"], slide["ome"], slide["zarr"], slide["pzarr"], slide["p8"], slide["geojson"]])
    with _client(view) as c:
        yield c, view
    view.close()


def _level(c, layer: int, dz: int, shape, query: str = "") -> np.ndarray:
    """Deep Zoom level ``dz`` of ``layer`` put together from its tiles (RGBA)."""
    from PIL import Image

    h, w = shape  # the level's size as Deep Zoom counts it (halved, rounding up)
    out = np.zeros((h, w, 4), np.uint8)
    for row in range(-(-h // 256)):
        for col in range(-(-w // 256)):
            r = c.get(f"/tiles/{layer}/{dz}/{col}_{row}{query}")
            assert r.status_code == 200, (layer, dz, col, row, r.text)
            assert r.headers["content-type"] == "image/png"
            t = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))
            out[row * 256:row * 256 + t.shape[0], col * 256:col * 256 + t.shape[1]] = t
    return out


def _file_levels(path: str) -> list[np.ndarray]:
    """Every level as the reference reader of the format reads it."""
    if path.endswith(".zarr"):
        import zarr

        g = zarr.open_group(path, mode="r")
        return [np.asarray(g[d["path"]][:]) for d in g.attrs["ome"]["multiscales"][0]["datasets"]]
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [lvl.asarray() for lvl in tif.series[0].levels]


def _file_colours(path: str) -> np.ndarray:
    """(256, 3) the colour of each label value as the file states it."""
    lut = np.zeros((256, 3), np.uint8)
    if path.endswith(".zarr"):
        import zarr

        for c in zarr.open_group(path, mode="r").attrs["ome"]["image-label"]["colors"]:
            lut[c["label-value"]] = c["rgba"][:3]
        return lut
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return (tif.pages[0].colormap >> 8).T.astype(np.uint8)


@pytest.mark.parametrize("which, layer", [("ome", 1), ("zarr", 2)])
def test_label_tiles_are_the_files_pixels_under_its_colour_map_at_every_level(client, slide, which, layer):
    c, view = client
    levels, lut = _file_levels(slide[which]), _file_colours(slide[which])
    assert len(levels) == 4 and levels[0].shape == viewdata.SHAPE
    top = view.layers[layer - 1].max_level
    for dz in range(top, -1, -1):
        k = top - dz
        want = levels[k] if k < len(levels) else levels[-1][::2 ** (k - 3), ::2 ** (k - 3)]  # below the file: nearest
        got = _level(c, layer, dz, want.shape, "?hide=0")
        assert np.array_equal(got[..., :3], lut[want]), (which, dz)
        assert np.array_equal(got[..., 3] == 255, (want != 0) & (want != 255)), (which, dz)


def test_probability_tiles_are_the_files_values_on_the_ramp(client, slide):
    from matplotlib import colormaps

    c, view = client
    ramp = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    top = view.layers[2].max_level
    for k, p in enumerate(_file_levels(slide["pzarr"])):  # float32 (1, H, W), NaN = nodata
        p = p[0]
        got = _level(c, 3, top - k, p.shape)
        ok = np.isfinite(p)
        assert np.array_equal(got[..., 3] == 255, ok)
        assert np.array_equal(got[ok][:, :3], ramp[np.rint(np.clip(p[ok], 0, 1) * 255).astype(int)]), k
    for k, v in enumerate(_file_levels(slide["p8"])):  # uint8 round(p x 254), 255 = nodata
        v = v.reshape(v.shape[-2:])
        got = _level(c, 4, top - k, v.shape)
        ok = v != 255
        assert np.array_equal(got[..., 3] == 255, ok)
        assert np.array_equal(got[ok][:, :3], ramp[np.rint(v[ok] * (255 / 254)).astype(int)]), k


def test_each_band_of_multiclass_probabilities_is_its_own_ramp(slide, tmp_path):
    import zarr
    from matplotlib import colormaps

    lab = slide["labels"]
    p = np.stack([(lab == k).astype(np.float32) * 0.8 + 0.1 for k in range(3)])
    out = viewdata.write(tmp_path / "p3.zarr", p, slide["meta"], probabilities=True, classes=3, source=slide["image"])
    view = open_view([out])
    ramp = (colormaps["viridis"](np.linspace(0, 1, 256))[:, :3] * 255).round().astype(np.uint8)
    stored = zarr.open_group(out, mode="r")["1"][:]
    with _client(view) as c:
        assert c.get("/api/info").json()["layers"][0]["bands"] == list(viewdata.NAMES)
        for band in (0, 2):
            got = _level(c, 1, view.layers[0].max_level - 1, stored.shape[1:], f"?band={band}")
            assert np.array_equal(got[..., :3], ramp[np.rint(np.clip(stored[band], 0, 1) * 255).astype(int)])
    view.close()


def test_cog_label_tiles_and_polygons_of_a_geotiff(tmp_path):
    """A GeoTIFF with its COG mask and WGS 84 GeoJSON: tiles are the COG's
    pixels (rasterio, every overview), the scale is in metres, and the
    polygons come back on the mask's pixel corners, each over its class."""
    import rasterio

    geo = viewdata.geo_set(tmp_path, data("rasterio/RGB.byte.tif"))
    view = open_view([geo["image"], geo["cog"], geo["geojson"], geo["gpkg"]])
    assert view.info()["unit"] == "m"
    with rasterio.open(geo["cog"]) as ds:
        lut = np.zeros((256, 3), np.uint8)
        for k, rgba in ds.colormap(1).items():
            lut[k] = rgba[:3]
        levels = [ds.read(1)] + [rasterio.open(geo["cog"], overview_level=i).read(1) for i in range(len(ds.overviews(1)))]
    top = view.layers[0].max_level
    with _client(view) as c:
        for k, want in enumerate(levels):
            h, w = want.shape  # GDAL rounds an overview's size down (791 -> 395): Deep Zoom's is rounded up
            got = _level(c, 1, top - k, (-(-718 // 2 ** k), -(-791 // 2 ** k)), "?hide=")
            assert np.array_equal(got[:h, :w, :3], lut[want]), k
            assert (got[:h, :w, 3] == 255).all() and not got[h:, :, 3].any() and not got[:, w:, 3].any()
        r = c.get("/api/features/2", params={"x0": 0, "y0": 0, "x1": 791, "y1": 718, "limit": 100000}).json()
        feats = {f[0]: f for f in r["features"]}
        assert r["total"] == view.layers[1].count > 0 and len(feats) == min(r["total"], 5000)  # capped per view
        pt = c.get("/api/point", params={"x": 400.5, "y": 300.5}).json()
        # the GeoPackage (the scene's CRS) lands on the same pixels as the GeoJSON (WGS 84)
        r2 = c.get("/api/features/3", params={"x0": 0, "y0": 0, "x1": 791, "y1": 718, "limit": 100000}).json()
        assert r2["total"] == r["total"]
        for fid, cls, rings, _ in r2["features"][:50]:
            other = feats[fid]
            assert cls == other[1] and np.allclose(rings[0], other[2][0], atol=1e-3)
    with rasterio.open(geo["image"]) as ds:  # the map coordinate of the pixel's centre, by rasterio
        assert pt["map"] == pytest.approx(list(ds.xy(300, 400)), abs=1e-6)
    import shapely

    lab = geo["labels"]
    for fid, cls, rings, _ in list(feats.values())[:50]:
        xy = np.asarray(rings[0]).reshape(-1, 2)
        assert np.abs(xy - np.round(xy)).max() < 1e-3  # reprojected back onto pixel corners
        poly = shapely.Polygon(xy, [np.asarray(r).reshape(-1, 2) for r in rings[1:]])
        p = poly.representative_point()
        assert lab[int(p.y), int(p.x)] == cls
    view.close()


def test_tiles_carry_cache_headers_and_answer_304(client):
    c, view = client
    r = c.get("/tiles/1/11/0_0?hide=0")
    assert r.status_code == 200 and "max-age" in r.headers["cache-control"] and r.headers["etag"]
    again = c.get("/tiles/1/11/0_0?hide=0", headers={"If-None-Match": r.headers["etag"]})
    assert again.status_code == 304 and not again.content
    other = c.get("/tiles/1/11/0_0?hide=0,2")
    assert other.headers["etag"] != r.headers["etag"]


def test_point_readout_is_the_files_values(client, slide):
    c, _ = client
    import zarr

    lab, p = slide["labels"], zarr.open_group(slide["pzarr"], mode="r")["0"]
    for x, y in ((10, 5), (700, 600), (1299, 1099)):
        d = c.get("/api/point", params={"x": x + 0.3, "y": y + 0.7}).json()
        assert (d["col"], d["row"]) == (x, y) and d["um"] == [(x + 0.5) * 0.5, (y + 0.5) * 0.5]
        by = {v["layer"]: v for v in d["layers"]}
        want = "nodata" if lab[y, x] == 255 else viewdata.NAMES[lab[y, x]]
        assert by[1]["name"] == by[2]["name"] == want
        prob = float(p[0, y, x])
        assert by[3]["probabilities"] == (None if np.isnan(prob) else [round(prob, 4)])
    assert c.get("/api/point", params={"x": -1, "y": 3}).json() == {"inside": False}


def test_polygons_per_view_are_capped_and_found_by_the_index(client, slide):
    import fiona
    import shapely

    c, view = client
    assert view.layers[4].count > 100
    with fiona.open(slide["geojson"]) as fc:
        geoms = [shapely.geometry.shape(f.geometry) for f in fc]
        props = [dict(f.properties) for f in fc]
    box = (100, 150, 1000, 900)
    want = {i for i, g in enumerate(geoms) if g.intersects(shapely.box(*box))}
    r = c.get("/api/features/5", params=dict(zip(("x0", "y0", "x1", "y1"), box), limit=100000)).json()
    # the index tests bounding boxes: every polygon that meets the view, and only those whose box does
    got = {f[0] for f in r["features"]}
    assert want <= got and all(shapely.box(*geoms[i].bounds).intersects(shapely.box(*box)) for i in got)
    capped = c.get("/api/features/5", params=dict(zip(("x0", "y0", "x1", "y1"), box), limit=7)).json()
    assert capped["total"] == len(got) > 7 and len(capped["features"]) == 7
    areas = {i: shapely.box(*geoms[i].bounds).area for i in got}
    assert min(areas[f[0]] for f in capped["features"]) >= sorted(areas.values())[-7]  # the largest
    i = sorted(got)[0]
    assert c.get(f"/api/properties/5/{i}").json() == props[i]


@pytest.mark.parametrize("url", ["/static/..%2F__init__.py", "/static/%2e%2e%2fapp.py", "/static/%2Fetc%2Fpasswd",
                                 "/static//etc/passwd", "/tiles/0/..%2F..%2Fetc/passwd", "/etc/passwd",
                                 "/static/..%5Capp.py", "/tiles/7/0/0_0", "/tiles/5/0/0_0", "/tiles/-1/0/0_0",
                                 "/api/properties/5/-1", "/api/properties/5/99999999", "/static/index.html",
                                 "/tiles/1/12/0_0", "/tiles/1/11/99_0"])
def test_urls_cannot_leave_the_given_files(client, url):
    c, _ = client
    assert c.get(url).status_code == 404


def test_a_symlinked_asset_that_leads_out_is_not_served(tmp_path, monkeypatch, client):
    from tilerseg.view import app as app_mod

    static = tmp_path / "static"
    static.mkdir()
    (static / "index.html").write_text("<html></html>")
    (static / "viewer.css").write_text("body {}")
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    os.symlink(secret, static / "viewer.js")
    monkeypatch.setattr(app_mod, "STATIC", str(static))
    with TestClient(app_mod.create_app(client[1], port=PORT), base_url=f"http://127.0.0.1:{PORT}") as c:
        assert c.get("/static/viewer.css").status_code == 200
        assert c.get("/static/viewer.js").status_code == 404


def _refusal(*args):
    r = cli("view", *args, "--no-browser")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    return r.stderr


def test_bad_input_is_refused_in_one_line_before_serving(slide, tmp_path):
    assert "no such file" in _refusal(slide["image"], str(tmp_path / "missing.tif"))
    assert "not a segmentation" in _refusal(slide["image"], slide["image"])
    other = viewdata.write(tmp_path / "other.ome.tif", slide["labels"][:600, :700], slide["meta"].__class__(
        shape=(600, 700), bands=1, dtype=np.dtype("uint8"), format="TIFF", mpp=0.5))
    assert "does not lie on the grid" in _refusal(slide["image"], other)
    assert "records no input" in _refusal(slide["geojson"])


def test_a_volume_is_refused_in_one_line(slide, tmp_path):
    from tilerseg.io.volume import VolumeMeta

    vol = (np.arange(6 * 40 * 50).reshape(6, 40, 50) % 3).astype(np.uint8)
    out = viewdata.write(tmp_path / "vol.zarr", vol, VolumeMeta(shape=vol.shape, bands=1, dtype=vol.dtype))
    assert "3-D volume" in _refusal(slide["image"], out)


def test_a_busy_port_is_refused_in_one_line(slide):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        assert "is busy" in _refusal(slide["image"], slide["ome"], "--port", str(s.getsockname()[1]))


def test_an_output_alone_finds_its_image_from_its_record(slide, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # mask.ome.tif records "slide.tif", relative: found next to the output
    view = open_view([slide["ome"]])
    assert os.path.samefile(view.image.path, slide["image"]) and view.layers[0].kind == "labels"
    view.close()


def test_serving_on_every_address_warns_and_prints_one_url(slide):
    p = cli_process("view", slide["image"], slide["ome"], "--host", "0.0.0.0", "--no-browser")
    try:
        line = p.stdout.readline()
        assert line.startswith("tilerseg view: http://127.0.0.1:") and line.rstrip().endswith("(Ctrl-C to stop)")
        assert "every machine" in p.stderr.readline()
        import urllib.request

        url = line.split()[2]
        with urllib.request.urlopen(url + "api/info", timeout=10) as r:
            assert json.load(r)["layers"][0]["kind"] == "labels"
    finally:
        p.terminate()
        p.wait(timeout=20)


def test_class_areas_are_the_masks_counts_exact_or_from_a_coarser_level(slide):
    from tilerseg.view.layers import RasterLayer

    lab = slide["labels"]
    for budget, exact, tol in ((2 ** 24, True, 0), (400 * 400, False, 0.05)):
        layer = RasterLayer(slide["ome"], "labels", viewdata_record(slide["ome"]))
        try:
            got = layer.class_areas(budget)
            assert got["exact"] is exact
            for k in (0, 1, 2):
                assert got["px"][str(k)] == pytest.approx(float((lab == k).sum()), rel=tol, abs=0 if exact else 50)
            assert str(255) not in got["px"]  # nodata is no class
        finally:
            layer.close()


def viewdata_record(path):
    from tilerseg.view.layers import output_kind

    return output_kind(path)


def test_a_mask_of_another_slide_is_refused_even_at_one_of_its_level_sizes(tmp_path, tiny_model_dir):
    """Issue 38 item 20: a 512² mask made from slide B matches level 1 of the
    1024² slide A, so the grid alone accepted it over A; the record's input
    identity (level-0 size and bytes) refuses it, and B still opens."""
    from tilerseg import synthetic
    from tilerseg.view import open_view

    a, b = str(tmp_path / "a.tif"), str(tmp_path / "b.tif")
    synthetic.write_tiff(a, (1024, 1024), seed=1, levels=2, compression="zlib")
    synthetic.write_tiff(b, (512, 512), seed=2, levels=1, compression="zlib")
    mask = str(tmp_path / "b-mask.ome.tif")
    r = cli("run", b, "--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "-o", mask)
    assert r.returncode == 0, r.stderr
    from tilerseg.errors import InputError

    with pytest.raises(InputError, match=r"made from a 512x512 px, [0-9,]+ bytes image"):  # open_view: not a server
        open_view([a, mask])
    view = open_view([b, mask])
    assert [layer.path for layer in view.layers] == [mask]
    for layer in [view.image, *view.layers]:
        layer.close()
