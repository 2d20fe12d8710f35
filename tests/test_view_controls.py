"""The viewer page's controls in real Chromium (Playwright, Debian's
chromium, as tests/test_view_browser.py): each layer and the image shown or
hidden, labelled sliders, zoom buttons and the navigator, the panel's facts
against the files, the polygon style against the mask under it (screenshot
pixels), lon/lat against rasterio, instance outputs as objects, a damaged
file's tiles counted. Oracles: the files as tifffile, zarr, fiona, rasterio
and csv read them."""
import csv
import io
import json

import numpy as np
import pytest

import viewdata
from test_view_browser import _canvas, _inner, _open, _settled, files, server, browser  # noqa: F401

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser")]
CENTRE = (1080.0, 980.0)


def _url(server, **state):
    x, y = CENTRE
    return server + f"#x={x}&y={y}&s=4&" + "&".join(f"{k}={v}" for k, v in state.items())


def _screen(page, x, y):
    """Screen position of image pixel (x, y)'s centre."""
    return page.evaluate("([x, y]) => { const t = tilerseg.toScreen(); return [x * t.s + t.ox, y * t.s + t.oy]; }",
                         [x + 0.5, y + 0.5])


def _shot(page) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB")).astype(int)


def test_the_image_and_each_layer_can_be_hidden_and_the_url_keeps_it(browser, server, files):  # noqa: F811
    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        x, y = _inner(files, 0)[0]  # background is off in the mask: the slide shows
        assert _canvas(page, x, y) != (0, 0, 0)
        page.locator('.layer[data-layer="0"] input.visible').uncheck()
        assert _settled(page, x, y, lambda c: c == (0, 0, 0)) == (0, 0, 0)  # nothing drawn there any more
        x1, y1 = _inner(files, 1)[0]
        assert _canvas(page, x1, y1) == tuple(files["lut"][1])  # the mask stays over the hidden image
        page.locator('.layer[data-layer="1"] input.visible').uncheck()
        assert _settled(page, x1, y1, lambda c: c == (0, 0, 0)) == (0, 0, 0)
        assert "v0=0" in page.url and "v1=0" in page.url
        again = _open(browser, page.url)
        try:
            assert not again.locator('.layer[data-layer="0"] input.visible').is_checked()
            assert _canvas(again, x1, y1) == (0, 0, 0)
        finally:
            again.close()
        page.locator('.layer[data-layer="0"] input.visible').check()
        assert _settled(page, x, y, lambda c: c != (0, 0, 0)) != (0, 0, 0)
    finally:
        page.close()


def test_sliders_are_labelled_and_say_their_value(browser, server):  # noqa: F811
    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        for k, name in ((1, "mask.ome.tif"), (2, "prob.zarr"), (3, "objects.geojson")):
            slider = page.get_by_label(f"opacity of {name}")
            assert slider.count() == 1
            slider.fill("0.35")
            out = page.locator(f'.layer[data-layer="{k}"] .opacity-label output')
            assert out.inner_text() == "35%"
            assert "opacity" in page.locator(f'.layer[data-layer="{k}"] .opacity-label').inner_text()
        assert page.locator('.layer[data-layer="0"] .opacity-label').count() == 1
    finally:
        page.close()


def test_zoom_buttons_and_the_navigator(browser, server):  # noqa: F811
    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        s0 = page.evaluate("tilerseg.toScreen().s")
        page.click("#zoomin")
        page.wait_for_function(f"Math.abs(tilerseg.toScreen().s / {s0} - 2) < 1e-3")
        page.click("#zoomout")
        page.click("#zoomout")
        page.wait_for_function(f"Math.abs(tilerseg.toScreen().s / {s0} - 0.5) < 1e-3")
        page.click("#home")  # the whole image fits the view
        page.wait_for_function("(() => { const t = tilerseg.toScreen(), r = tilerseg.viewer.element.getBoundingClientRect();"
                               " return t.s * 1300 <= r.width + 1 && t.s * 1100 <= r.height + 1 &&"
                               " (Math.abs(t.s * 1300 - r.width) < 2 || Math.abs(t.s * 1100 - r.height) < 2); })()")
        nav = page.locator(".navigator")
        assert nav.count() == 1 and nav.is_visible()
        box = nav.bounding_box()
        assert box["width"] > 40 and box["height"] > 30
    finally:
        page.close()


def test_the_panel_names_the_images_size_and_scale_and_counts_per_class(browser, server, files):  # noqa: F811
    import fiona
    import shapely

    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        facts = page.locator('.layer[data-layer="0"] .facts').inner_text()
        assert facts == "1,300 × 1,100 px · 0.5 µm/px", facts
        per = {}
        with fiona.open(files["geojson"]) as fc:
            for f in fc:
                n, a = per.get(f.properties["class"], (0, 0.0))
                per[f.properties["class"]] = (n + 1, a + shapely.geometry.shape(f.geometry).area)
        rows = page.locator('.layer[data-layer="3"] table.stats tr').all_inner_texts()[1:]
        assert len(rows) == len(per)
        for row in rows:
            name, count, area = row.split("\t")
            k = viewdata.NAMES.index(name)
            assert int(count.replace(",", "")) == per[k][0]
            um2 = per[k][1] * 0.25
            shown = float(area.split()[0]) * (1e6 if area.endswith("mm²") else 1)
            assert shown == pytest.approx(um2, rel=5e-3), (row, um2)
    finally:
        page.close()


def test_polygon_outlines_are_seen_over_a_mask_of_their_own_colour(browser, server, files):  # noqa: F811
    """The screenshot: along a nucleus polygon's edge over the green mask
    the outline is dark, not the mask's green (it was the same green)."""
    import fiona
    import shapely

    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        x0, y0 = CENTRE
        view = shapely.box(x0 - 80, y0 - 60, x0 + 80, y0 + 60)
        with fiona.open(files["geojson"]) as fc:
            polys = [shapely.geometry.shape(f.geometry) for f in fc
                     if f.properties["class"] == 1 and view.contains(shapely.geometry.shape(f.geometry))]
        page.wait_for_timeout(300)
        img = _shot(page)
        dark = 0
        tested = 0
        for poly in polys[:5]:
            ring = np.asarray(poly.exterior.coords)
            for (ax, ay), (bx, by) in zip(ring[:-1], ring[1:]):
                mx, my = (ax + bx) / 2, (ay + by) / 2  # the middle of an edge, on the outline
                sx, sy = page.evaluate("([x, y]) => { const t = tilerseg.toScreen(); return [x * t.s + t.ox,"
                                       " y * t.s + t.oy]; }", [mx, my])
                r, c = int(round(sy)), int(round(sx))
                near = img[r - 2:r + 3, c - 2:c + 3].reshape(-1, 3)  # the line is 3.5 px wide, antialiased
                tested += 1
                dark += int(near.sum(axis=1).min() < 120)
        assert tested > 10 and dark >= 0.8 * tested, (dark, tested)
    finally:
        page.close()


def test_a_geotiff_names_its_epsg_and_the_readout_gives_lon_lat(browser, tmp_path_factory):  # noqa: F811
    import rasterio
    from rasterio.warp import transform

    from conftest import data

    geo = viewdata.geo_set(tmp_path_factory.mktemp("viewctl"), data("rasterio/RGB.byte.tif"))
    for url in viewdata.serve([geo["image"], geo["cog"]]):
        page = _open(browser, url + "#x=400&y=350&s=2&o1=1&h1=0")
        try:
            facts = page.locator('.layer[data-layer="0"] .facts').inner_text()
            assert "EPSG:32618" in facts and "UTM zone 18N" in facts and "300 m/px" in facts, facts
            x, y = 376, 344
            page.mouse.move(*_screen(page, x, y))
            page.wait_for_function(f"document.getElementById('readout').textContent.startsWith('x {x}, y {y} px')")
            text = page.locator("#readout").inner_text()
            with rasterio.open(geo["image"]) as ds:
                mx, my = ds.xy(y, x)
                (lon,), (lat,) = transform(ds.crs, "EPSG:4326", [mx], [my])
            assert f"{abs(lat):.5f}° {'N' if lat >= 0 else 'S'}, {abs(lon):.5f}° {'W' if lon < 0 else 'E'}" in text, text
        finally:
            page.close()


@pytest.fixture(scope="module")
def instances(files, tmp_path_factory):  # noqa: F811
    s = dict(files)
    s["prob"] = viewdata.probability(s["labels"])
    return viewdata.instance_set(tmp_path_factory.mktemp("viewctlinst"), s)


def test_an_instance_output_shows_objects_their_id_and_their_row(browser, files, instances):  # noqa: F811
    import tifffile

    with tifffile.TiffFile(instances["ome"]) as tif:
        ids = tif.series[0].levels[0].asarray()
    with open(instances["ome"][:-len(".ome.tif")] + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for url in viewdata.serve([files["image"], instances["ome"]]):
        page = _open(browser, url + f"#x={CENTRE[0]}&y={CENTRE[1]}&s=4&o1=1")
        try:
            assert page.locator('.layer[data-layer="1"] .objects').inner_text().startswith(f"{len(rows):,} objects")
            x0, y0 = int(CENTRE[0]), int(CENTRE[1])
            win = ids[y0 - 50:y0 + 50, x0 - 70:x0 + 70]
            ys, xs = np.nonzero(win)
            seen = {}
            for j in np.linspace(0, len(ys) - 1, 25).astype(int):  # one colour per id on the canvas
                x, y = int(xs[j] + x0 - 70), int(ys[j] + y0 - 50)
                seen.setdefault(int(ids[y, x]), set()).add(_canvas(page, x, y))
            assert all(len(c) == 1 for c in seen.values()) and len({next(iter(c)) for c in seen.values()}) == len(seen)
            x, y = int(xs[0] + x0 - 70), int(ys[0] + y0 - 50)
            page.mouse.move(*_screen(page, x, y))
            page.wait_for_function(f"document.getElementById('readout').textContent.startsWith('x {x}, y {y} px')")
            assert f"objs_a.ome.tif: object {ids[y, x]}" in page.locator("#readout").inner_text()
            page.mouse.click(*_screen(page, x, y))
            page.wait_for_selector("#props:not([hidden])")
            head, body = page.locator("#props").inner_text().split("\n", 1)
            assert head == f"objs_a.ome.tif object #{ids[y, x]}"
            got, want = json.loads(body), rows[int(ids[y, x]) - 1]
            assert list(got) == list(want)
            for k, v in want.items():
                assert (got[k] == v) if k == "name" else float(got[k]) == pytest.approx(float(v)), k
        finally:
            page.close()


def test_a_damaged_images_failed_tiles_are_counted_in_its_block(browser):  # noqa: F811
    from conftest import data

    for url in viewdata.serve([data("rasterio/corrupt.tif")]):
        page = browser.new_page(viewport={"width": 1000, "height": 620})
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        try:
            page.goto(url + "#x=512&y=512&s=0.6")
            page.wait_for_selector('.layer[data-layer="0"] .failed:not([hidden])', timeout=20000)
            assert "could not be read: the file is damaged there" in \
                page.locator('.layer[data-layer="0"] .failed').inner_text()
            # the readout over a damaged place: the reader's line (rows 768:1024, cols 768:1024 fail to decode)
            page.mouse.move(*page.evaluate("() => { const t = tilerseg.toScreen(); return [900 * t.s + t.ox,"
                                           " 900 * t.s + t.oy]; }"))
            page.wait_for_function("document.getElementById('readout').textContent.includes('could not decode')")
            assert not errors, errors
        finally:
            page.close()


def test_a_clicked_polygon_is_in_the_url_by_its_own_id_and_comes_back(browser, server, files):  # noqa: F811
    import shapely

    x0, y0 = CENTRE
    view = shapely.box(x0 - 80, y0 - 60, x0 + 80, y0 + 60)
    with open(files["geojson"]) as f:
        feats = [g for g in json.load(f)["features"] if g["properties"]["class"] == 1 and
                 view.contains(shapely.geometry.shape(g["geometry"]))]
    g = feats[0]
    pt = shapely.geometry.shape(g["geometry"]).representative_point()
    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        page.mouse.click(*page.evaluate("([x, y]) => { const t = tilerseg.toScreen(); return [x * t.s + t.ox,"
                                        " y * t.s + t.oy]; }", [pt.x, pt.y]))
        page.wait_for_selector("#props:not([hidden])")
        page.wait_for_function(f"location.hash.includes('sid={g['id']}')")
        assert "sel=3" in page.url
        again = _open(browser, page.url)
        try:
            again.wait_for_selector("#props:not([hidden])")
            assert again.locator("#props").inner_text().split("\n", 1)[0] == f"objects.geojson #{g['id']}"
        finally:
            again.close()
    finally:
        page.close()


def test_the_panel_gives_each_classs_area_from_the_mask(browser, server, files):  # noqa: F811
    page = _open(browser, _url(server, o1=1, h1=0, o2=0, o3=1))
    try:
        rows = page.locator('.layer[data-layer="1"] table.areas tr').all_inner_texts()[1:]
        mask = files["mask"]
        want = {viewdata.NAMES[k]: int((mask == k).sum()) * 0.25 for k in range(3) if (mask == k).any()}
        assert len(rows) == len(want)
        for row in rows:
            name, area = row.split("\t")
            shown = float(area.split()[0]) * (1e6 if area.endswith("mm²") else 1)
            assert shown == pytest.approx(want[name], rel=5e-3), (row, want[name])
    finally:
        page.close()
