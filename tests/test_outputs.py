"""Outputs opened by users' tools: openslide and tifffile for (OME-)TIFF
pyramids, the ome-zarr reader for OME-Zarr, fiona/rasterio for polygons.
The oracle is the label mask itself (numpy), reduced or rasterized back."""
import json

import numpy as np
import pytest

from conftest import cli, data
from tilerseg.engine import compute_into
from tilerseg.io.base import ImageMeta
from tilerseg.io.writers import OutputInfo, Writer


def _labels(H: int, W: int) -> np.ndarray:
    """Blobs of classes 1..2 on background, a nodata band at the top."""
    yy, xx = np.mgrid[0:H, 0:W]
    lab = ((np.sin(yy / 97.0) * np.cos(xx / 61.0)) > 0.3).astype(np.uint8)
    lab[(np.sin(yy / 41.0 + xx / 73.0) > 0.8) & (lab == 0)] = 2
    lab[: H // 50] = 255
    return lab


def _write(path, arr, meta, *, probabilities=False, classes=3, names=("background", "tissue", "tumour")):
    import dask.array as da

    a = da.from_array(arr, chunks=(arr.shape[0], 1024, 1024) if arr.ndim == 3 else (1024, 1024))
    info = OutputInfo(meta=meta, probabilities=probabilities, classes=classes, class_names=names)
    with Writer(str(path), probabilities=probabilities) as w:
        w.write(a, lambda x, z, marks: compute_into(x, z, workers=2), info)


@pytest.mark.slow
def test_ome_tiff_opens_in_openslide_with_levels_and_mpp(tmp_path):
    """A 10,000 x 8,000 result as .ome.tif."""
    import openslide
    import tifffile

    lab = _labels(8000, 10000)
    out = tmp_path / "mask.ome.tif"
    _write(out, lab, ImageMeta(shape=lab.shape, bands=3, dtype=np.dtype("uint8"), format="test", mpp=0.2527))
    slide = openslide.OpenSlide(str(out))
    assert slide.level_count >= 4 and slide.dimensions == (10000, 8000)
    assert slide.level_dimensions[:4] == ((10000, 8000), (5000, 4000), (2500, 2000), (1250, 1000))
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.2527, rel=1e-6)
    region = np.asarray(slide.read_region((0, 0), 3, (1250, 1000)))[..., :3]  # palette -> class colours
    coarse = lab[::8, ::8]
    assert (region[coarse == 1] == (0, 230, 60)).all() and (region[coarse == 2] == (255, 60, 40)).all()
    with tifffile.TiffFile(str(out)) as tif:
        assert tif.is_ome and len(tif.series) == 1
        series = tif.series[0]
        assert len(series.levels) == slide.level_count
        pixels = tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]
        assert pixels["PhysicalSizeX"] == pytest.approx(0.2527)
        for k, level in enumerate(series.levels[:4]):
            assert np.array_equal(level.asarray(), lab[::2 ** k, ::2 ** k])  # nearest for labels
        described = json.loads(tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Description"])
        assert described["tilerseg"]["class_names"] == ["background", "tissue", "tumour"]


def test_probability_levels_are_nan_aware_means(tmp_path):
    import tifffile

    rng = np.random.default_rng(0)
    p = rng.random((2, 700, 900)).astype(np.float32)
    p[:, :40] = np.nan  # nodata rows
    p[:, 41, 1] = np.nan  # one NaN in a 2x2 block: the mean of the other three
    out = tmp_path / "p.ome.tif"
    _write(out, p, ImageMeta(shape=(700, 900), bands=3, dtype=np.dtype("uint8"), format="test", mpp=0.5),
           probabilities=True, classes=2, names=("a", "b"))
    with tifffile.TiffFile(str(out)) as tif:
        levels = tif.series[0].levels
        assert len(levels) == 3 and levels[1].shape == (2, 350, 450) and levels[2].shape == (2, 175, 225)
        got = levels[1].asarray()
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want = np.nanmean(p.reshape(2, 350, 2, 450, 2), axis=(2, 4))
    assert np.allclose(got, want, equal_nan=True)
    assert np.isnan(got[:, :20]).all() and not np.isnan(got[:, 20]).any()


@pytest.mark.parametrize("shape", [(2, 64, 96), (3, 61, 47)])
def test_probability_reduction_has_nanmeans_bits(shape):
    """reduce2 replaces np.nanmean (3x slower) and must give its bits:
    blocks without NaN, with some, all NaN, and odd edges."""
    import warnings

    from tilerseg.io.pyramid import reduce2

    rng = np.random.default_rng(2)
    p = rng.random(shape).astype(np.float32)
    p[:, :6] = np.nan  # whole blocks of nodata
    p[:, 9, 3] = p[:, 20, 21] = p[:, 21, 20] = np.nan  # one and two NaN in a block
    h, w = shape[-2:]
    padded = np.pad(p, [(0, 0), (0, h % 2), (0, w % 2)], constant_values=np.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmean(padded.reshape(shape[0], padded.shape[1] // 2, 2, padded.shape[2] // 2, 2), axis=(2, 4))
    got = reduce2(p, True)
    assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True)
    clean = np.nan_to_num(p)  # no NaN: the fast path, for even shapes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        want = np.nanmean(np.pad(clean, [(0, 0), (0, h % 2), (0, w % 2)], constant_values=np.nan).reshape(
            shape[0], (h + 1) // 2, 2, (w + 1) // 2, 2), axis=(2, 4))
    assert np.array_equal(reduce2(clean, True), want)


def test_probability_zarr_levels_share_level_0s_fast_codec_and_read_back_exactly(tmp_path):
    """Float probabilities are stored with Blosc lz4 + shuffle (zarr's zstd
    cost a tenth of a run, see writers.compressors) on every level, and read
    back bit for bit, NaN nodata included; labels keep zstd."""
    import zarr

    rng = np.random.default_rng(1)
    p = rng.random((2, 700, 900)).astype(np.float32)
    p[:, :40] = np.nan
    meta = ImageMeta(shape=(700, 900), bands=3, dtype=np.dtype("uint8"), format="test", mpp=0.5)
    _write(tmp_path / "p.zarr", p, meta, probabilities=True, classes=2, names=("a", "b"))
    _write(tmp_path / "l.zarr", _labels(700, 900), meta)
    prob, lab = zarr.open_group(str(tmp_path / "p.zarr"), mode="r"), zarr.open_group(str(tmp_path / "l.zarr"), mode="r")
    assert len(list(prob.array_keys())) >= 3
    for k in prob.array_keys():
        assert [type(c).__name__ for c in prob[k].compressors] == ["BloscCodec"], k
        assert prob[k].compressors[0].cname.value == "lz4" and prob[k].compressors[0].shuffle.value == "shuffle"
    assert np.array_equal(prob["0"][...], p, equal_nan=True)
    assert [type(c).__name__ for c in lab["0"].compressors] == ["ZstdCodec"]


def test_ome_zarr_read_by_the_reference_reader_with_scale(tmp_path):
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    lab = _labels(1100, 1500)
    out = tmp_path / "mask.ome.zarr"
    _write(out, lab, ImageMeta(shape=lab.shape, bands=3, dtype=np.dtype("uint8"), format="test", mpp=0.5))
    nodes = list(Reader(parse_url(str(out)))())
    node = nodes[0]
    assert node.load(__import__("ome_zarr.reader", fromlist=["Label"]).Label)  # an image-label
    assert len(node.data) == 4 and tuple(node.data[0].shape) == lab.shape
    assert np.array_equal(np.asarray(node.data[0]), lab)
    assert np.array_equal(np.asarray(node.data[2]), lab[::4, ::4])
    scales = [t[0]["scale"] for t in node.metadata["coordinateTransformations"]]
    assert scales[0] == [0.5, 0.5] and scales[3] == [4.0, 4.0]
    assert [a["unit"] for a in node.metadata["axes"]] == ["micrometer", "micrometer"]
    # and tilerseg reads its own output back at any level
    from tilerseg.io import open_reader

    with open_reader(str(out), level=1) as r:
        assert r.meta.shape == (550, 750) and r.meta.mpp == 1.0 and len(r.meta.levels) == 4
        assert np.array_equal(r.read((0, 550), (0, 750))[0][..., 0], lab[::2, ::2])


def test_cli_geojson_polygons_rasterize_back_to_the_geotiff_mask(tmp_path, tiny_model_dir):
    """Georeferenced input: polygons in the input's CRS reproduce the mask."""
    import fiona
    import rasterio
    from rasterio.features import rasterize

    src = data("rasterio/RGB.byte.tif")
    tif, gj = tmp_path / "m.tif", tmp_path / "m.geojson"
    for out in (tif, gj):  # GeoJSON in the input's CRS (the default is RFC 7946 lon/lat)
        r = cli("run", src, "--weights", tiny_model_dir, "--tile", "256", "--halo", "72", "-o", str(out), "--quiet",
                "--vector-crs", "native")
        assert r.returncode == 0, r.stderr
    with rasterio.open(tif) as ds:
        mask, transform, crs = ds.read(1), ds.transform, ds.crs
    with fiona.open(gj) as fc:
        assert fc.crs == crs
        shapes = [(f.geometry, f.properties["class"]) for f in fc]
    assert shapes, "the random model found no object"
    back = rasterize(shapes, out_shape=mask.shape, transform=transform, fill=0, dtype="uint8")
    obj = mask == 1
    iou = (obj & (back == 1)).sum() / (obj | (back == 1)).sum()
    assert iou >= 0.999
    from scipy import ndimage

    assert len(shapes) == ndimage.label(obj)[1]


def test_cli_slide_polygons_in_level0_pixels_when_run_on_a_coarser_level(tmp_path, tiny_model_dir):
    """A slide processed at level 1: polygons still in level-0 pixels."""
    import openslide
    from rasterio.features import rasterize
    from shapely.affinity import scale
    from shapely.geometry import shape

    src = data("openslide/boxes.tiff")
    z, gj = tmp_path / "m.zarr", tmp_path / "m.geojson"
    for out in (z, gj):
        r = cli("run", src, "--level", "1", "--weights", tiny_model_dir, "--tile", "128", "--halo", "32",
                "-o", str(out), "--quiet")
        assert r.returncode == 0, r.stderr
    import zarr

    mask = zarr.open_array(str(z / "0"), mode="r")[...]
    W0, H0 = openslide.OpenSlide(src).dimensions
    feats = json.load(open(gj))["features"]
    assert feats and feats[0]["properties"]["classification"]["name"]
    geoms = [shape(f["geometry"]) for f in feats]
    xmax = max(g.bounds[2] for g in geoms)
    assert mask.shape[1] < xmax <= W0  # level-0 coordinates
    fx, fy = mask.shape[1] / W0, mask.shape[0] / H0
    back = rasterize([(scale(g, fx, fy, origin=(0, 0)), 1) for g in geoms], out_shape=mask.shape)
    assert ((back == 1) == (mask == 1)).mean() >= 0.999


def test_cli_ome_tiff_and_info_on_it(tmp_path, tiny_model_dir):
    import tifffile

    out = tmp_path / "m.ome.tif"
    r = cli("run", data("openslide/small.svs"), "--weights", tiny_model_dir, "--tile", "128", "--halo", "32",
            "-o", str(out))
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(str(out)) as tif:  # a 16 x 16 px slide: one level, the input's mpp
        assert tif.is_ome and tif.series[0].shape == (16, 16)
        assert tifffile.xml2dict(tif.ome_metadata)["OME"]["Image"]["Pixels"]["PhysicalSizeX"] == pytest.approx(0.499)
    r = cli("info", str(out))
    assert r.returncode == 0, r.stderr
    assert "classes:" in r.stdout and "µm²" in r.stdout  # 256 px of 0.499 µm: 63.7 µm², in readable units


def test_probabilities_refused_for_polygons(tmp_path, tiny_model_dir):
    out = tmp_path / "p.geojson"
    r = cli("run", data("isbi2012/image/0.png"), "--bands", "1,1,1", "--weights", tiny_model_dir,
            "--probabilities", "-o", str(out))
    assert r.returncode == 1 and "label masks only" in r.stderr and not out.exists()


def test_mpp_output_scale_and_output_level_0(tmp_path, tiny_model_dir):
    """--mpp 1.0 on a 0.5 µm/px slide: the mask is written at 1.0 µm/px;
    --output-level 0 brings it back to the slide's grid (nearest)."""
    import tifffile

    from tilerseg.synthetic import write_tiff

    slide = tmp_path / "s.tif"
    write_tiff(slide, (1200, 1000), levels=3, mpp=0.5, compression="zlib")
    coarse, full = tmp_path / "c.ome.tif", tmp_path / "f.ome.tif"
    common = ["--weights", tiny_model_dir, "--mpp", "1.0", "--tile", "256", "--halo", "72", "--quiet"]
    assert cli("run", str(slide), "-o", str(coarse), *common).returncode == 0
    r = cli("run", str(slide), "-o", str(full), "--output-level", "0", *common)
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(str(coarse)) as a, tifffile.TiffFile(str(full)) as b:
        lab, up = a.series[0].asarray(), b.series[0].asarray()
        mpp = [tifffile.xml2dict(t.ome_metadata)["OME"]["Image"]["Pixels"]["PhysicalSizeX"] for t in (a, b)]
    assert lab.shape == (600, 500) and up.shape == (1200, 1000) and mpp == [1.0, 0.5]
    assert np.array_equal(up, np.repeat(np.repeat(lab, 2, 0), 2, 1))


def test_cog_from_an_overview_level_keeps_the_extent(tmp_path, tiny_model_dir):
    """cogeo.tif run on its first overview: the COG's transform is that
    level's; with --output-level 0 it is the input's own."""
    import rasterio

    src = data("rasterio/cogeo.tif")
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    common = ["--weights", tiny_model_dir, "--level", "1", "--tile", "256", "--halo", "72", "--quiet"]
    assert cli("run", src, "-o", str(a), *common).returncode == 0
    assert cli("run", src, "-o", str(b), "--output-level", "0", *common).returncode == 0
    with rasterio.open(src) as s, rasterio.open(a) as ra, rasterio.open(b) as rb:
        assert (rb.shape, rb.transform, rb.crs) == (s.shape, s.transform, s.crs)
        assert ra.crs == s.crs and ra.bounds == pytest.approx(s.bounds, abs=abs(s.transform.a) * 2)
        assert ra.width < s.width and rb.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"


@pytest.mark.parametrize("probabilities", [False, True])
def test_tiff_tiles_compressed_in_parallel_are_the_bytes_tifffile_writes(tmp_path, probabilities):
    """The pyramid TIFF's tiles are read and compressed on the engine's
    threads and written in order: the file is byte for byte the one
    tifffile writes when it compresses the same tiles itself, serially."""
    import tifffile
    import zarr

    from tilerseg.engine import thread_map
    from tilerseg.io.tiffout import TILE, write_pyramid_tiff

    lab = _labels(700, 900)
    arr = np.stack([lab / 2.0, 1 - lab / 2.0]).astype(np.float32) if probabilities else lab
    z = zarr.open_group(str(tmp_path / "g.zarr"), mode="w").create_array(
        "0", shape=arr.shape, chunks=arr.shape[:-2] + (512, 512), dtype=arr.dtype)
    z[...] = arr
    meta = ImageMeta(shape=(700, 900), bands=1, dtype="uint8", format="test", mpp=0.5)
    kind = {"kind": "probabilities" if probabilities else "labels", "classes": 2, "class_names": ("a", "b")}
    serial, threaded = tmp_path / "serial.tif", tmp_path / "threaded.tif"
    write_pyramid_tiff([z], str(serial), meta, kind, ome=False, uid="x")
    write_pyramid_tiff([z], str(threaded), meta, kind, ome=False, uid="x", imap=thread_map(3).imap)
    assert serial.read_bytes() == threaded.read_bytes()
    np.testing.assert_array_equal(tifffile.imread(threaded), arr)
    # the oracle: tifffile compressing the padded tiles itself
    fill = np.nan if probabilities else 255
    planes = arr if probabilities else arr[None]
    tiles = []
    for plane in planes:
        for r in range(0, 700, TILE):
            for c in range(0, 900, TILE):
                t = np.full((TILE, TILE), fill, arr.dtype)
                part = plane[r:r + TILE, c:c + TILE]
                t[:part.shape[0], :part.shape[1]] = part
                tiles.append(t)
    with tifffile.TiffWriter(tmp_path / "ref.tif") as tw:
        tw.write(iter(tiles), shape=arr.shape, dtype=arr.dtype, tile=(TILE, TILE), compression="zlib",
                 maxworkers=1, photometric="minisblack", planarconfig="separate" if probabilities else None)

    def segments(path):
        with tifffile.TiffFile(path) as t:
            page, fh = t.pages.first, t.filehandle
            out = []
            for offset, n in zip(page.dataoffsets, page.databytecounts):
                fh.seek(offset)
                out.append(fh.read(n))
            return out

    assert segments(threaded) == segments(tmp_path / "ref.tif")
