"""tilerseg view in a real browser: headless Chromium through Playwright, one
server and one browser for the module. The oracle is the files: canvas
pixels against the mask's colour map and pixels as tifffile reads them,
the readout against the zarr probabilities, a clicked polygon's properties
against fiona. ``TILERSEG_UPDATE_SCREENSHOT=1`` writes the page's picture to
docs/viewer.png (the README shows it)."""
import json
import os
import time

import numpy as np
import pytest

from conftest import ROOT

import browser as browser_mod
import viewdata

pytestmark = [pytest.mark.slow,  # a browser start-up (~7 s) each worker
              pytest.mark.xdist_group("browser")]  # one server and one browser serve them all (--dist loadgroup)
W_PAGE, H_PAGE = 1000, 620
CENTRE, SCALE = (1080.0, 980.0), 4.0  # the view the tests open: 4 screen px per image px


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import tifffile
    import zarr

    s = viewdata.slide_set(tmp_path_factory.mktemp("viewb"))
    with tifffile.TiffFile(s["ome"]) as tif:
        s["mask"], s["lut"] = tif.series[0].levels[0].asarray(), (tif.pages[0].colormap >> 8).T.astype(int)
    s["rgb"] = tifffile.imread(s["image"])
    s["p"] = zarr.open_group(s["pzarr"], mode="r")["0"][0]
    return s


def _serve(paths):
    yield from viewdata.serve(paths)


@pytest.fixture(scope="module")
def server(files):
    yield from _serve([files["image"], files["ome"], files["pzarr"], files["geojson"]])


@pytest.fixture(scope="module")
def browser():
    try:
        pw, b = browser_mod.launch()
    except browser_mod.Unavailable as err:
        if os.environ.get("TILERSEG_REQUIRE_BROWSER") == "1":
            pytest.fail(f"no browser, and TILERSEG_REQUIRE_BROWSER=1: {err}", pytrace=False)
        pytest.skip(f"no browser here: {err}")
    yield b
    browser_mod.close(pw, b)


def _open(browser, url):
    page = browser.new_page(viewport={"width": W_PAGE, "height": H_PAGE})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url)
    page.wait_for_function("window.tilerseg && tilerseg.loaded()", timeout=20000)
    assert not errors, errors
    return page


def _view_url(server, **layers):
    x, y = CENTRE
    return server + f"#x={x}&y={y}&s={SCALE}&" + "&".join(f"{k}={v}" for k, v in layers.items())


@pytest.fixture
def page(browser, server):
    page = _open(browser, _view_url(server, o1=1, h1=0, o2=0, o3=1))
    yield page
    page.close()


def _canvas(page, x, y):
    """The canvas colour (r, g, b) at the centre of image pixel (x, y)."""
    return tuple(page.evaluate("""([x, y]) => {
        const t = tilerseg.toScreen(), r = window.devicePixelRatio || 1;
        const d = tilerseg.viewer.drawer.canvas.getContext('2d')
            .getImageData(Math.floor(((x + 0.5) * t.s + t.ox) * r), Math.floor(((y + 0.5) * t.s + t.oy) * r), 1, 1).data;
        return [d[0], d[1], d[2]]; }""", [x, y]))


def _settled(page, x, y, until, timeout=10.0):
    """The canvas colour at (x, y) once ``until(colour)`` holds (the page redraws on its own frame)."""
    end = time.monotonic() + timeout
    while True:
        page.wait_for_function("tilerseg.loaded()", timeout=10000)
        c = _canvas(page, x, y)
        if until(c) or time.monotonic() > end:
            return c
        page.wait_for_timeout(50)


def _inner(files, cls):
    """Pixels of class ``cls`` in the view, 5x5 of one class around them, a few."""
    from scipy import ndimage

    m = files["mask"]
    same = ndimage.minimum_filter(m == cls, size=7)
    x0, y0 = CENTRE
    ys, xs = np.nonzero(same[int(y0) - 60:int(y0) + 60, int(x0) - 80:int(x0) + 80])
    assert len(ys), f"no class {cls} in the view"
    pick = np.linspace(0, len(ys) - 1, 3).astype(int)
    return [(int(xs[i] + x0 - 80), int(ys[i] + y0 - 60)) for i in pick]


def _near(a, b, tol):
    return max(abs(int(u) - int(v)) for u, v in zip(a, b)) <= tol


JPEG = 40  # image tiles are JPEG: a pixel of the noisy synthetic slide may move this much


def test_the_page_shows_the_masks_colours_where_the_mask_has_them(page, files, server, browser):
    for cls in (1, 2):
        for x, y in _inner(files, cls):
            assert _canvas(page, x, y) == tuple(files["lut"][cls]), (cls, x, y)
    for x, y in _inner(files, 0):  # background is off by default: the slide shows through
        c = _canvas(page, x, y)
        assert _near(c, files["rgb"][y, x], JPEG) and c != tuple(files["lut"][0]), (x, y, c)
    assert page.locator("#scaletext").inner_text().endswith("µm")
    shot = _open(browser, server + "#o2=0")  # the whole slide, for the README
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), "tilerseg-viewer.png")
    shot.screenshot(path=path)
    shot.close()
    if os.environ.get("TILERSEG_UPDATE_SCREENSHOT") == "1":
        from PIL import Image

        os.makedirs(ROOT / "docs", exist_ok=True)
        Image.open(path).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE) \
            .save(ROOT / "docs" / "viewer.png", optimize=True)  # 256 colours, no dither: 0.18 MB, the ramp intact


def test_moving_the_opacity_slider_changes_the_pixels(page, files):
    x, y = _inner(files, 1)[0]
    green, under = tuple(files["lut"][1]), files["rgb"][y, x]
    slider = page.locator('.layer[data-layer="1"] input.opacity')
    slider.fill("0.5")
    half = _settled(page, x, y, lambda c: c != green)
    assert _near(half, (green + under.astype(int)) / 2, JPEG // 2 + 2), (half, green, under)
    slider.fill("0")
    assert _near(_settled(page, x, y, lambda c: _near(c, under, JPEG)), under, JPEG)


def test_a_class_toggled_off_shows_the_image_under_it(page, files):
    x, y = _inner(files, 2)[1]
    page.locator('.layer[data-layer="1"] input[data-class="2"]').uncheck()
    c = _settled(page, x, y, lambda c: c != tuple(files["lut"][2]))
    assert _near(c, files["rgb"][y, x], JPEG), c
    x1, y1 = _inner(files, 1)[1]
    assert _canvas(page, x1, y1) == tuple(files["lut"][1])  # the other class stays


def test_the_cursor_readout_names_the_pixel_its_class_and_probability(page, files):
    lab, p = files["mask"], files["p"]
    for x, y in (_inner(files, 1)[2], _inner(files, 2)[0]):
        sx, sy = page.evaluate("([x, y]) => { const t = tilerseg.toScreen(); return [(x + 0.5) * t.s + t.ox,"
                               " (y + 0.5) * t.s + t.oy]; }", [x, y])
        page.mouse.move(sx, sy)
        page.wait_for_function(f"document.getElementById('readout').textContent.startsWith('x {x}, y {y} px')")
        text = page.locator("#readout").inner_text()
        assert f"{(x + 0.5) * 0.5:.2f}, {(y + 0.5) * 0.5:.2f} µm" in text
        assert f"mask.ome.tif: {viewdata.NAMES[lab[y, x]]}" in text
        assert f"prob.zarr: nucleus {p[y, x]:.3f}" in text


def test_clicking_a_polygon_shows_its_properties(page, files):
    import fiona
    import shapely

    x0, y0 = CENTRE
    view = shapely.box(x0 - 80, y0 - 60, x0 + 80, y0 + 60)
    with fiona.open(files["geojson"]) as fc:
        found = [(shapely.geometry.shape(f.geometry), dict(f.properties)) for f in fc
                 if f.properties["class"] == 1 and view.contains(shapely.geometry.shape(f.geometry))]
    geom, props = found[0]
    pt = geom.representative_point()
    sx, sy = page.evaluate("([x, y]) => { const t = tilerseg.toScreen(); return [x * t.s + t.ox, y * t.s + t.oy]; }",
                           [pt.x, pt.y])
    page.mouse.click(sx, sy)
    page.wait_for_selector("#props:not([hidden])")
    text = page.locator("#props").inner_text()
    with open(files["geojson"]) as f:  # the feature's own "id", not its position in the file (one less)
        own = [g["id"] for g in json.load(f)["features"] if g["properties"] == props]
    assert len(own) == 1 and text.split("\n", 1)[0] == f"objects.geojson #{own[0]}", (text[:40], own)
    assert json.loads(text.split("\n", 1)[1]) == props


def test_reloading_the_copied_url_gives_the_same_view(page, browser):
    page.locator('.layer[data-layer="1"] input.opacity').fill("0.35")
    page.locator('.layer[data-layer="1"] input[data-class="1"]').uncheck()
    page.evaluate("tilerseg.viewer.viewport.zoomBy(1.7); tilerseg.viewer.viewport.panBy(new OpenSeadragon.Point(0.01, -0.02))")
    page.wait_for_function("""() => {  // the animation has ended and the hash says where it ended
        const vp = tilerseg.viewer.viewport, W = tilerseg.info.image.width, c = vp.getCenter(true);
        const p = new URLSearchParams(location.hash.slice(1));
        return vp.getZoom(true) === vp.getZoom(false) && c.equals(vp.getCenter(false)) && p.get('o1') === '0.35'
            && Math.abs(+p.get('x') - c.x * W) < 0.1 && Math.abs(+p.get('y') - c.y * W) < 0.1
            && Math.abs(+p.get('s') / (vp.getZoom(true) * vp.getContainerSize().x / W) - 1) < 1e-5; }""")
    before = page.evaluate("tilerseg.toScreen()")
    url = page.url
    again = _open(browser, url)
    try:
        after = again.evaluate("tilerseg.toScreen()")
        assert after["s"] == pytest.approx(before["s"], rel=1e-3)
        assert after["ox"] == pytest.approx(before["ox"], abs=1) and after["oy"] == pytest.approx(before["oy"], abs=1)
        assert again.locator('.layer[data-layer="1"] input.opacity').input_value() == "0.35"
        assert not again.locator('.layer[data-layer="1"] input[data-class="1"]').is_checked()
        assert again.locator('.layer[data-layer="1"] input[data-class="2"]').is_checked()
    finally:
        again.close()


def test_a_geotiff_with_its_cog_and_geojson_has_a_scale_in_metres(browser, tmp_path_factory):
    """The GeoTIFF case: the COG over the scene, the WGS 84 polygons back on
    its pixels, the scale bar in metres, map coordinates under the cursor."""
    import rasterio

    from conftest import data

    geo = viewdata.geo_set(tmp_path_factory.mktemp("viewgeo"), data("rasterio/RGB.byte.tif"))
    for url in _serve([geo["image"], geo["cog"], geo["geojson"]]):
        page = _open(browser, url + "#x=400&y=350&s=2&o1=1&h1=0")
        try:
            assert page.locator("#scaletext").inner_text().endswith((" m", " km"))
            assert "polygons;" in page.locator('.layer[data-layer="2"] .count').inner_text()
            lab = geo["labels"]
            x, y = 376, 344
            sx, sy = page.evaluate("([x, y]) => { const t = tilerseg.toScreen(); return [(x + 0.5) * t.s + t.ox,"
                                   " (y + 0.5) * t.s + t.oy]; }", [x, y])
            page.mouse.move(sx, sy)
            page.wait_for_function(f"document.getElementById('readout').textContent.startsWith('x {x}, y {y} px')")
            with rasterio.open(geo["image"]) as ds:
                mx, my = ds.xy(y, x)
            text = page.locator("#readout").inner_text()
            assert f"{mx:.1f}, {my:.1f} m" in text and f"geo.tif: {viewdata.NAMES[lab[y, x]]}" in text
            with rasterio.open(geo["cog"]) as ds:
                cmap = ds.colormap(1)
            shown = [(u, v) for u in range(344, 440, 16) for v in range(312, 392, 16) if lab[v, u]]  # block centres
            assert shown
            for u, v in shown:
                assert _canvas(page, u, v) == tuple(cmap[lab[v, u]][:3]), (u, v)
        finally:
            page.close()
