"""--tissue and nodata skipping: windows off tissue are not run, the output
on tissue is unchanged. The oracle is the synthetic slide's own tissue
field and a run without skipping."""
import numpy as np
import pytest

from conftest import cli, data
from tilerseg.synthetic import glass_ellipse, tissue, write_tiff
from tilerseg.tissue import tissue_from_rgb, window_boxes, window_has_tissue


@pytest.fixture(scope="module")
def glassy_slide(tmp_path_factory):
    path = tmp_path_factory.mktemp("slides") / "glassy.tif"
    write_tiff(path, (2048, 2048), levels=3, background=0.7, compression="zlib")
    yy, xx = np.mgrid[0:2048, 0:2048].astype(np.float32)
    return str(path), tissue(yy, xx, 0, glass_ellipse((2048, 2048), 0.7))


def test_window_has_tissue_matches_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((37, 53)) > 0.97
    H, W, crop = 1000, 1430, 96
    ny, nx = -(-H // crop), -(-W // crop)
    got = window_has_tissue(mask, (H, W), crop, (ny, nx))
    full = np.kron(mask, np.ones((64, 64), bool))  # nearest-up to a fine grid, then each window's footprint
    fy, fx = full.shape[0] / H, full.shape[1] / W
    for wy in range(ny):
        for wx in range(nx):
            r0, r1 = wy * crop, min((wy + 1) * crop, H)
            c0, c1 = wx * crop, min((wx + 1) * crop, W)
            want = full[int(r0 * fy):int(np.ceil(r1 * fy)), int(c0 * fx):int(np.ceil(c1 * fx))].any()
            assert got[wy, wx] == want, (wy, wx)


def test_window_boxes_hold_exactly_the_tissue_in_each_crop():
    """The box each window computes is the bounding box of the image pixels
    that the map's tissue pixels cover in its crop (brute force over random
    masks, image and crop sizes)."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        h, w = rng.integers(3, 30, 2)
        H, W = rng.integers(40, 700, 2)
        crop = int(rng.integers(16, 250))
        mask = rng.random((h, w)) < rng.choice([0.02, 0.1, 0.4])
        n = (-(-H // crop), -(-W // crop))
        got = window_boxes(mask, (H, W), crop, n)
        full = np.zeros((H, W), bool)
        for r, c in zip(*np.nonzero(mask)):
            full[int(r * H / h):int(np.ceil((r + 1) * H / h)), int(c * W / w):int(np.ceil((c + 1) * W / w))] = True
        for wy in range(n[0]):
            for wx in range(n[1]):
                sub = full[wy * crop:(wy + 1) * crop, wx * crop:(wx + 1) * crop]
                rows, cols = np.flatnonzero(sub.any(1)), np.flatnonzero(sub.any(0))
                want = [rows[0], rows[-1] + 1, cols[0], cols[-1] + 1] if rows.size else [0, 0, 0, 0]
                assert list(got[wy, wx]) == want, (wy, wx)


def test_otsu_on_saturation_finds_the_generators_tissue(glassy_slide):
    from tilerseg.preview import thumbnail

    path, truth = glassy_slide
    thumb = thumbnail(path, 512)
    found = tissue_from_rgb(thumb, margin=0)
    t = truth[:: truth.shape[0] // found.shape[0], :: truth.shape[1] // found.shape[1]][:found.shape[0], :found.shape[1]]
    iou = (found & t).sum() / (found | t).sum()
    assert iou > 0.95 and 0.25 < t.mean() < 0.35


def test_uniform_glass_has_no_tissue():
    assert not tissue_from_rgb(np.full((64, 64, 3), 240, np.uint8)).any()


@pytest.mark.slow
def test_tissue_auto_skips_glass_and_keeps_tissue_output(tmp_path, tiny_model_dir, glassy_slide):
    import zarr

    path, truth = glassy_slide
    outs = {}
    for name, extra in (("all", []), ("tissue", ["--tissue", "auto"])):
        out = tmp_path / f"{name}.zarr"
        r = cli("run", path, "--weights", tiny_model_dir, "--tile", "256", "--halo", "64", "-o", str(out), "--quiet",
                "--probabilities", *extra)
        assert r.returncode == 0, r.stderr
        outs[name] = (zarr.open_array(str(out / "0"), mode="r")[0], r.stdout)
    (full, _), (skip, text) = outs["all"], outs["tissue"]
    assert "skipped" in text and "no tissue" in text
    n_skipped, n_total = (int(v) for v in text.split("skipped ")[1].split(" windows")[0].split(" of "))
    assert n_total == 256 and n_skipped >= 0.55 * n_total  # 70% glass, less the windows on its edge
    # windows at the tissue's edge compute only their tissue (trimmed, the halo kept):
    # the same probabilities wherever there is tissue, to float rounding (a window of
    # another shape sums in another order; 3e-5 at most seen), elsewhere only background
    tol = 1e-4
    assert np.abs(skip[truth] - full[truth]).max() <= tol
    clear = truth & (np.abs(full - 0.5) > tol)
    assert ((skip[clear] > 0.5) == (full[clear] > 0.5)).all()  # the same mask
    assert (skip[np.abs(skip - full) > tol] == 0).all()


def test_tissue_mask_file_skips_outside_it(tmp_path, tiny_model_dir):
    import rasterio
    from PIL import Image

    src = data("isbi2012/image/0.png")
    keep = np.zeros((64, 64), np.uint8)
    keep[:16, :24] = 255  # 128 x 192 px of the 512 x 512 image
    Image.fromarray(keep).save(tmp_path / "t.png")
    out = tmp_path / "m.tif"
    r = cli("run", src, "--bands", "1,1,1", "--weights", tiny_model_dir, "--tile", "256", "--halo", "64",
            "--tissue", str(tmp_path / "t.png"), "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "skipped 14 of 16 windows" in r.stdout  # crop 128: 4x4 windows, (0, 0) and (0, 1) touch the mask
    with rasterio.open(out) as ds:
        m = ds.read(1)
    assert (m[128:, :] == 0).all() and (m[:, 256:] == 0).all() and (m[:128, :256] == 1).any()


def test_all_nodata_windows_are_skipped(tmp_path, tiny_model_dir):
    """RGB.byte.tif's corners are nodata: windows there are not run."""
    out = tmp_path / "m.zarr"
    r = cli("run", data("rasterio/RGB.byte.tif"), "--weights", tiny_model_dir, "--tile", "256", "--halo", "72",
            "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "skipped" in r.stdout and "all nodata" in r.stdout


def test_auto_tile_weighs_the_windows_that_run():
    """Issue 27: with a map of where windows run, --tile auto minimises the work of
    those windows (brute force over the candidates is the oracle), which on a
    mostly-glass slide is a smaller window than the largest that fits."""
    import math

    from tilerseg.tiling import auto_tile, trimmed_work, work
    from tilerseg.tissue import WindowMap

    shape, halo, stride = (6144, 6144), 96, 8
    yy, xx = np.mgrid[0:1536, 0:1536].astype(np.float32) * 4
    discs = tissue(yy, xx, 0, glass_ellipse(shape, 0.71, pieces=2))
    assert 0.27 < discs.mean() < 0.31
    wmap = WindowMap(shape, tissue=lambda side: discs)
    budget, per_px = 4 * 2 ** 30, 150.0
    (plain, _), _, _ = auto_tile(halo, stride, shape, per_px, budget, None)
    (tile, _), batch, note = auto_tile(halo, stride, shape, per_px, budget, None, skip=wmap)
    side = int(math.sqrt(budget / per_px))
    crops = range(stride, (side - 2 * halo) // stride * stride + 1, stride)
    best = min(trimmed_work(wmap.runs(c, stride), halo) for c in crops)
    assert trimmed_work(wmap.runs(tile - 2 * halo, stride), halo) == best
    # the bound auto_tile skips crops by never exceeds a crop's work (else it could skip the best)
    assert all(wmap.covered() * (1 + 2 * halo / c) ** 2 <= trimmed_work(wmap.runs(c, stride), halo) for c in crops)
    assert ("every window runs" in note or "run (the others have none)" in note) and \
        f"less work than {plain}-px windows" in note
    assert "off nodata and on tissue" in note
    full = math.prod(math.ceil(n / (plain - 2 * halo)) for n in shape)
    assert work(full, plain) / best > 2.0  # what skipping and trimming buy on this slide
    # deterministic: the same map gives the same choice (what --resume checks)
    again = WindowMap(shape, tissue=lambda side: discs)
    assert auto_tile(halo, stride, shape, per_px, budget, None, skip=again)[0] == (tile, tile)


def test_nodata_collar_counts_as_skipped_in_the_tile_choice():
    """A Landsat scene's nodata collar: the map's count of windows to run is
    never below the exact count (read at full resolution), and skips most of
    the collar."""
    import rasterio

    from tilerseg.tissue import WindowMap, valid_map

    path = data("rasterio/RGB.byte.tif")
    with rasterio.open(path) as ds:
        valid = ds.dataset_mask() > 0
    shape = valid.shape
    wmap = WindowMap(shape, valid=lambda side: valid_map(path, side))
    for crop in (64, 128, 256):
        n = (-(-shape[0] // crop), -(-shape[1] // crop))
        exact = window_has_tissue(valid, shape, crop, n).sum()
        got = len(wmap.runs(crop, 8))
        assert exact <= got <= exact + 0.1 * n[0] * n[1], (crop, exact, got)
        if crop == 64:
            assert got < 0.9 * n[0] * n[1]  # the collar's windows are counted out


@pytest.mark.parametrize("colours", [[(225, 150, 190)], [(128, 128, 128)], [(225, 150, 190), (95, 55, 140)],
                                     [(60, 60, 60), (150, 150, 150)]])
def test_an_image_of_tissue_without_glass_is_all_tissue(colours):
    """One stain, or two and no glass: nothing looks like glass (bright and
    grey), so nothing is skipped, whatever Otsu's split."""
    img = np.zeros((64, 64, 3), np.uint8)
    for k, c in enumerate(colours):
        img[:, k * 64 // len(colours):] = c
    assert tissue_from_rgb(img).all()


@pytest.mark.slow
def test_tissue_auto_on_an_image_all_tissue_equals_the_run_without_it(tmp_path, tiny_model_dir):
    import tifffile
    import zarr

    src = tmp_path / "pink.tif"
    tifffile.imwrite(src, np.full((400, 400, 3), (225, 150, 190), np.uint8), tile=(256, 256), photometric="rgb")
    outs = []
    for name, extra in (("all", []), ("tissue", ["--tissue", "auto"])):
        out = tmp_path / f"{name}.zarr"
        r = cli("run", str(src), "--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "-o", str(out),
                "--quiet", "--probabilities", *extra)
        assert r.returncode == 0, r.stderr
        outs.append(zarr.open_array(str(out / "0"), mode="r")[...])
    assert np.array_equal(outs[0], outs[1])


def test_a_nodata_trim_of_one_window_reads_plainly():
    """Issue 38: 'skipping: 100% of windows run, trimmed to 90% ...'
    then '1 windows': one window, cut to its valid pixels, said so."""
    from tilerseg.tiling import auto_tile
    from tilerseg.tissue import WindowMap

    valid = np.ones((90, 90), bool)
    valid[:, :20] = False  # a nodata collar on the left
    wmap = WindowMap((900, 900), valid=lambda side: valid)
    _, batch, note = auto_tile(64, 8, (900, 900), 150.0, 4 * 2 ** 30, None, skip=wmap)
    assert "auto: 1 window of" in note and "in a batch of 1" in note and "1 windows" not in note
    assert "only the pixels off nodata are computed: every window runs, cut to" in note and "of its pixels" in note
    assert "tissue" not in note and "100%" not in note
