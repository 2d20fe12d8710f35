"""Readers: real files, window reads equal full reads, levels, masks, ingest."""
import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import cli, data
from tilerseg.errors import FormatError, InputError
from tilerseg.io import open_reader, read_padded
from tilerseg.io.base import ResampledReader, pick_level


def test_geotiff_window_equals_full_read_and_keeps_georeference():
    import rasterio

    path = data("rasterio/RGB.byte.tif")
    r = open_reader(path)
    with rasterio.open(path) as ds:
        full, mask = np.moveaxis(ds.read(), 0, -1), ds.dataset_mask() > 0
        assert r.meta.crs == ds.crs.to_wkt() and r.meta.transform == tuple(ds.transform)[:6]
    win, valid = r.read((100, 300), (250, 700))
    assert np.array_equal(win, full[100:300, 250:700])
    assert np.array_equal(valid, mask[100:300, 250:700])
    assert r.meta.shape == (718, 791) and r.meta.bands == 3 and r.meta.nodata == 0


def test_cog_internal_mask_and_overview_level():
    r = open_reader(data("rasterio/cogeo.tif"))
    assert r.meta.levels[0] == (1024, 1024) and len(r.meta.levels) == 7
    import rasterio

    _, valid = r.read((0, 1024), (0, 1024))
    with rasterio.open(data("rasterio/cogeo.tif")) as ds:
        assert np.array_equal(valid, ds.dataset_mask() > 0)  # the COG's internal mask
    r1 = open_reader(data("rasterio/cogeo.tif"), level=1)
    assert r1.meta.shape == (512, 512)
    assert r1.meta.transform[0] == pytest.approx(2 * r.meta.transform[0])


def test_rgba_alpha_is_mask_not_a_band():
    r = open_reader(data("rasterio/RGBA.byte.tif"))
    assert r.meta.bands == 3
    _, valid = r.read((0, 718), (0, 791))
    assert valid is not None and not valid.all()


def test_nan_pixels_are_invalid():
    r = open_reader(data("rasterio/float_nan.tif"))
    pix, valid = r.read((0, 2), (0, 3))
    assert np.isfinite(pix).all() and valid is not None and not valid.all()


def test_slide_levels_and_mpp():
    r = open_reader(data("openslide/small.svs"))
    assert r.meta.shape == (16, 16) and r.meta.mpp == pytest.approx(0.499)
    assert r.read((0, 16), (0, 16))[0].shape == (16, 16, 3)


def test_tiff_pyramid_levels_window_equals_tifffile():
    path = data("openslide/boxes.tiff")
    with tifffile.TiffFile(path) as tif:
        level2 = tif.series[0].levels[2].asarray()
    r = open_reader(path, level=2)
    assert r.meta.shape == level2.shape[:2] and len(r.meta.levels) == 4
    assert np.array_equal(r.read((10, 40), (5, 60))[0], level2[10:40, 5:60])


def test_mpp_picks_level_or_resamples(tmp_path):
    assert pick_level((0.25, 0.5, 1.0, 2.0), 0.51) == (1, 1.0)
    lvl, scale = pick_level((0.25, 0.5, 1.0, 2.0), 0.75)
    assert lvl == 1 and scale == pytest.approx(1.5)
    with pytest.raises(InputError, match="--level"):
        pick_level((None,), 0.5)
    from tilerseg import synthetic

    slide = tmp_path / "slide.tif"
    synthetic.write_tiff(slide, (400, 500), levels=3, mpp=0.5, compression="zlib")  # 0.5, 1 and 2 µm/px
    r = open_reader(slide, mpp=1.5)  # between levels 1 and 2: level 1 resampled by 1.5
    assert isinstance(r, ResampledReader) and "resampled" in r.meta.note and r.meta.shape == (133, 167)


def test_resampled_windows_are_seamless(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (200, 240, 3), dtype=np.uint8)
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, img, tile=(64, 64), photometric="rgb")
    r = ResampledReader(open_reader(str(path)), 1.7)
    whole = r.read((0, r.meta.shape[0]), (0, r.meta.shape[1]))[0]
    part = r.read((30, 90), (41, 100))[0]
    assert np.array_equal(part, whole[30:90, 41:100])


@pytest.mark.parametrize("mode,bits,bands", [("L", 8, 1), ("RGB", 8, 3), ("I;16", 16, 1)])
def test_png_gray_rgb_16bit(tmp_path, mode, bits, bands):
    rng = np.random.default_rng(0)
    dtype = np.uint16 if bits == 16 else np.uint8
    arr = rng.integers(0, 2**bits, (40, 50) if bands == 1 else (40, 50, 3), dtype=dtype)
    path = tmp_path / "x.png"
    Image.fromarray(arr).save(path)
    r = open_reader(str(path))
    assert r.meta.bands == bands and r.meta.dtype == dtype
    got = r.read((5, 30), (7, 45))[0]
    assert np.array_equal(got.reshape(arr[5:30, 7:45].shape), arr[5:30, 7:45])


def test_read_padded_equals_numpy_pad(tmp_path):
    img = np.arange(30 * 20 * 2, dtype=np.uint16).reshape(30, 20, 2)
    path = tmp_path / "x.tif"
    tifffile.imwrite(path, img, tile=(16, 16), photometric="minisblack", planarconfig="contig")
    r = open_reader(str(path))
    for mode in ("reflect", "symmetric", "edge"):
        got, _ = read_padded(r, (-25, 40), (-7, 45), mode)
        ref = np.pad(img, ((25, 10), (7, 25), (0, 0)), mode=mode)
        assert np.array_equal(got, ref)


def test_ingest_roundtrip_keeps_pixels_mask_and_georeference(tmp_path):
    import zarr

    src = data("rasterio/RGB.byte.tif")
    out = tmp_path / "rgb.zarr"
    r = cli("ingest", src, str(out), "--chunk", "256")
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(out), mode="r")
    assert g["image"].chunks == (256, 256, 3)
    back, orig = open_reader(str(out)), open_reader(src)
    assert back.meta.crs == orig.meta.crs and back.meta.transform == orig.meta.transform
    a, va = back.read((0, 718), (0, 791))
    b, vb = orig.read((0, 718), (0, 791))
    assert np.array_equal(a, b) and np.array_equal(va, vb)


@pytest.mark.parametrize("rel", ["openslide/unopenable.tiff", "openslide/unreadable.svs"])
def test_broken_files_fail_on_open(rel):
    with pytest.raises(FormatError, match="corrupt"):
        open_reader(data(rel))


def test_info_prints_size_levels_crs_bands_dtype():
    r = cli("info", data("rasterio/cogeo.tif"))
    assert r.returncode == 0, r.stderr
    for text in ("1024 x 1024", "EPSG:3857", "bands:      3", "uint8", "levels:     7"):
        assert text in r.stdout
    r = cli("info", data("openslide/small.svs"))
    assert "0.499 µm/px" in r.stdout and "aperio" in r.stdout


def test_ome_tiff_pyramid_mpp_and_levels(tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (512, 640, 3), dtype=np.uint8)
    path = tmp_path / "x.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        tw.write(img, subifds=2, tile=(128, 128), photometric="rgb",
                 metadata={"axes": "YXS", "PhysicalSizeX": 0.25, "PhysicalSizeY": 0.25})
        for k in (2, 4):
            tw.write(img[::k, ::k], subfiletype=1, tile=(128, 128), photometric="rgb")
    r = open_reader(str(path))
    assert r.meta.format == "OME-TIFF" and r.meta.mpp == pytest.approx(0.25)
    assert r.meta.levels == ((512, 640), (256, 320), (128, 160))
    r2 = open_reader(str(path), mpp=1.0)  # level 2 matches exactly: no resampling
    assert r2.meta.level == 2 and np.array_equal(r2.read((0, 128), (0, 160))[0], img[::4, ::4])


def test_unpickled_readers_are_shared_per_process_until_the_file_changes(tmp_path):
    """Dask workers unpickle a reader per task: they share one open file
    instead of reopening (and re-parsing) it for every block."""
    import os
    import pickle
    import shutil

    import numpy as np

    from tilerseg.io import open_reader

    path = tmp_path / "img.tif"
    shutil.copy(data("rasterio/RGB.byte.tif"), path)
    r = open_reader(str(path))
    a, b = (pickle.loads(pickle.dumps(r)) for _ in range(2))
    assert a is b and a is not r
    assert np.array_equal(a.read((0, 64), (0, 64))[0], r.read((0, 64), (0, 64))[0])
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a new version of the file
    assert pickle.loads(pickle.dumps(r)) is not a


@pytest.mark.parametrize("case", ["jpeg-pyramid", "zlib-gray-odd", "svs"])
def test_tiled_tiff_read_tile_by_tile_equals_tifffile(tmp_path, case):
    """Tiled levels are decoded tile by tile (the fast path): every window,
    edges and odd sizes included, equals tifffile's whole-level read."""
    from tilerseg import synthetic
    from tilerseg.io.tiff import TiffReader

    if case == "jpeg-pyramid":
        path = str(tmp_path / "slide.tif")
        synthetic.write_tiff(path, (1000, 1300), tile_size=256, levels=3, compression="jpeg")
    elif case == "zlib-gray-odd":
        path = str(tmp_path / "gray.tif")
        img = np.random.default_rng(0).integers(0, 65535, (517, 389), dtype=np.uint16)
        tifffile.imwrite(path, img, tile=(64, 128), compression="zlib")
    else:
        path = data("openslide/small.svs")
    series = tifffile.TiffFile(path).series[0]
    for level in range(len(series.levels)):
        full = series.levels[level].asarray()
        full = full.reshape(full.shape[0], full.shape[1], -1)
        with TiffReader(path, level=level) as r:
            assert r._page is not None  # the tile-by-tile path is the one tested
            H, W = r.meta.shape
            windows = [((0, H), (0, W)), ((0, 1), (W - 1, W)), ((max(0, H - 70), H), (max(0, W - 300), W))]
            if H > 20 and W > 20:
                windows.append(((H // 3, H - 7), (5, W // 2 + 3)))
            for rows, cols in windows:
                got, _ = r.read(rows, cols)
                np.testing.assert_array_equal(got, full[rows[0]:rows[1], cols[0]:cols[1]])
