"""Inputs are checked for what they claim: resolution tags that are not a
microscope scale, resampling far beyond any plausible use, a dtype the
weights never saw, zarr chunks that are gone, headers that claim more than
a run could read, and files that are not what they say. Each gets one line,
exit 1 and nothing at the output path."""
from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pytest

from conftest import cli, data, tiny_unet


def _one_error(r, *words):
    assert r.returncode == 1, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("tilerseg: error:")]
    assert len(errors) == 1, r.stderr
    assert "Traceback" not in r.stderr and "internal error" not in r.stderr, r.stderr
    for w in words:
        assert w in errors[0], errors[0]
    return errors[0]


# --- resolution tags -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("reader", ["auto", "openslide"])
def test_a_72_dpi_tag_is_not_a_microscope_scale(reader):
    """openslide's boxes.tiff says 28.35 px/cm: 72 dpi, what image editors
    write. Read as a scale it made 352.8 µm/px, and --mpp 0.5 a 211,667 px job."""
    r = cli("info", data("openslide/boxes.tiff"), "--reader", reader)
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.startswith("mpp:"))
    assert line.split(None, 1)[1].startswith("unknown (resolution tag: 72 dpi"), line
    assert "µm/px" not in r.stdout


def test_resolution_tags_that_are_scales_stay_scales():
    from tilerseg.io.base import resolution_mpp

    assert resolution_mpp(20000.0, 3)[0] == pytest.approx(0.5)           # 0.5 µm/px in px per centimetre
    assert resolution_mpp(50800.0, "inch")[0] == pytest.approx(0.5)      # the same in inches
    assert resolution_mpp(72.0, 2) == (None, resolution_mpp(72.0, 2)[1]) and "72 dpi" in resolution_mpp(72.0, 2)[1]
    for dpi in (72, 96, 150, 300, 600):
        assert resolution_mpp(float(dpi), 2)[0] is None
        assert resolution_mpp(dpi / 2.54, "centimeter")[0] is None
    assert resolution_mpp(0.0, 3) == (None, "")
    assert r"0.499" in cli("info", data("openslide/small.svs")).stdout  # an Aperio scale is kept


def _scaled_tiff(path, mpp: float, shape=(600, 500)):
    import tifffile

    img = (np.random.default_rng(0).random((*shape, 3)) * 255).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", resolution=(1e4 / mpp, 1e4 / mpp),
                     resolutionunit="CENTIMETER")
    return str(path)


def test_resampling_beyond_8x_is_refused_with_the_size_and_the_flag(tmp_path):
    src = _scaled_tiff(tmp_path / "fine.tif", 0.25)
    out = tmp_path / "out.zarr"
    line = _one_error(cli("run", src, "--weights", "demo", "--mpp", "4", "-o", str(out)),
                      "16x down", "31x38 px", "--force-resample")
    assert "megapixels" in line and not out.exists()
    up = _one_error(cli("info", src, "--mpp", "0.02"), "12.5x up", "6250x7500 px", "--force-resample")
    assert "gigapixels" not in up
    r = cli("info", src, "--mpp", "4", "--force-resample")
    assert r.returncode == 0, r.stderr
    assert "size:       31 x 38 px" in r.stdout


# --- dtype -----------------------------------------------------------------------------------------------------

def test_a_dtype_the_weights_never_saw_is_refused_with_the_flag(tmp_path):
    import tifffile

    img = (np.random.default_rng(1).random((300, 280, 3)) * 60000).astype(np.uint16)
    src = tmp_path / "u16.tif"
    tifffile.imwrite(src, img, photometric="rgb")
    out = tmp_path / "u16.zarr"
    _one_error(cli("run", str(src), "--weights", "demo", "-o", str(out)), "uint16", "trained on uint8",
               "--scale 65535")
    assert not out.exists()
    r = cli("run", str(src), "--weights", "demo", "--scale", "65535", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert out.exists()


def test_the_checkpoint_records_dtype_and_range(tmp_path):
    from tilerseg.models import demo_weights, describe
    from tilerseg.models.registry import ModelSpec

    info = describe(demo_weights(), ModelSpec())
    assert info.input_dtype == "uint8" and info.input_range == (0.0, 255.0)


def test_a_bare_state_dict_warns_on_another_dtype(tmp_path):
    import tifffile
    import torch

    weights = tmp_path / "sd.pt"
    torch.save(tiny_unet().state_dict(), weights)
    src = tmp_path / "f32.tif"
    tifffile.imwrite(src, np.random.default_rng(2).random((200, 200, 3)).astype(np.float32), photometric="rgb")
    r = cli("run", str(src), "--weights", str(weights), "--encoder", "resnet18", "--model-arg", "encoder_depth=3",
            "--model-arg", "decoder_channels=[16,8,4]", "-o", str(tmp_path / "f.zarr"), "--quiet")
    assert r.returncode == 0, r.stderr
    warning = next(x for x in r.stderr.splitlines() if "do not record the pixel values" in x)
    assert "float32" in warning and "--scale" in warning


# --- zarr chunks -----------------------------------------------------------------------------------------------

def test_missing_zarr_chunks_are_refused_or_masked(tmp_path):
    import shutil

    src = tmp_path / "in.zarr"
    assert cli("ingest", data("rasterio/RGB.byte.tif"), str(src), "--chunk", "128").returncode == 0
    gone = src / "image" / "c" / "2" / "3" / "0"  # rows 256:384, cols 384:512
    assert gone.exists()
    gone.unlink()
    out = tmp_path / "out.tif"
    _one_error(cli("run", str(src), "--weights", "demo", "--ignore-pixel-size", "-o", str(out)), "1 of 42 chunks", "rows 256:384",
               "--missing-chunks nodata")
    assert not out.exists()
    _one_error(cli("info", str(src)), "missing")
    r = cli("run", str(src), "--weights", "demo", "--ignore-pixel-size", "--missing-chunks", "nodata", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    import rasterio

    with rasterio.open(data("rasterio/RGB.byte.tif")) as f:
        nodata_in = (f.read() == 0).all(axis=0)  # the scene's own nodata (0 in every band)
    with rasterio.open(out) as f:
        mask = f.read(1)
    missing = np.zeros_like(nodata_in)
    missing[256:384, 384:512] = True
    np.testing.assert_array_equal(mask == 255, nodata_in | missing)
    shutil.rmtree(src)


# --- sizes ------------------------------------------------------------------------------------------------------

def test_a_header_claiming_a_million_px_square_in_strips_is_refused_up_front(tmp_path):
    """One strip per row of a 1,000,000-px-wide image: every 512-row read
    would decode 1.4 GiB. The file is 12 MB of header (sparse)."""
    import tifffile

    path = tmp_path / "huge.tif"
    try:
        tifffile.imwrite(path, shape=(1_000_000, 1_000_000, 3), dtype="uint8", rowsperstrip=1, bigtiff=True)
    except OSError as err:  # a filesystem without sparse files
        pytest.skip(f"cannot write a sparse 3 TB file here: {err}")
    out = tmp_path / "huge.zarr"
    _one_error(cli("run", str(path), "--weights", "demo", "-o", str(out)), "1000000x1000000 px",
               "1e+03 gigapixels", "tiled TIFF")
    assert not out.exists()


def test_planning_does_not_grow_with_the_image():
    """A plan holds no per-block state: a million-px-square grid plans in
    the memory of one wave of tasks, like a small one."""
    from tilerseg.engine import Output, TileSpec, segment_plan
    from tilerseg.geometry import Grid, block_layout
    from tilerseg.io.base import ImageMeta, Reader

    class Claimed(Reader):
        def __init__(self, n):
            self.path, self.meta = "claimed", ImageMeta(shape=(n, n), bands=3, dtype=np.dtype("u1"), format="-")

        def _read(self, rows, cols):
            raise AssertionError("planning must not read")

    peaks = {}
    for n in (20_000, 1_000_000):
        tracemalloc.start()
        grid = Grid((n, n), 512, 96, 32, block_layout(4))
        plan = segment_plan(Claimed(n), object(), grid, TileSpec(512, 96, 4), Output(), 1)
        wave = next(plan.waves())
        dsk, keys = plan.graph(wave)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert plan.total_windows == grid.n_windows[0] * grid.n_windows[1]
        assert len(wave) <= 4096 and len(keys) == len(wave)
    assert peaks[1_000_000] < 50e6, peaks
    assert len(plan.blocks) == 1563 ** 2 and (1562, 1562) in plan.blocks and (1563, 0) not in plan.blocks


# --- files that are not what they say ---------------------------------------------------------------------------

def test_an_image_too_large_to_decode_whole_is_one_line(tmp_path, monkeypatch):
    from PIL import Image

    png = tmp_path / "big.png"
    Image.new("1", (400, 300)).save(png)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # Pillow's own bomb check, as for a 30000² PNG
    _one_error(cli("run", str(png), "-o", str(tmp_path / "b.zarr")), "big.png", "tiled TIFF")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    from tilerseg.io import image

    monkeypatch.setattr(image, "MAX_PIXELS", 100_000)
    _one_error(cli("run", str(png), "-o", str(tmp_path / "b.zarr")), "400x300 px", "tiled TIFF")
    assert not (tmp_path / "b.zarr").exists()


def test_weights_that_do_not_fit_name_the_layer_and_both_shapes(tmp_path):
    import torch

    two = tmp_path / "two.pt"
    torch.save(tiny_unet(classes=2).state_dict(), two)  # bands and classes are read from it: other widths differ
    args = ("--encoder", "resnet18", "--model-arg", "encoder_depth=3", "--model-arg", "decoder_channels=[16,8,8]")
    _one_error(cli("run", data("rasterio/rgb-byte-tenth.tif"), "--weights", str(two), *args, "-o",
                   str(tmp_path / "o.zarr")), "decoder.blocks.2.conv1.0.weight", "(4, 8, 3, 3)", "(8, 8, 3, 3)")
    nomodel = tmp_path / "nomodel.pt"
    torch.save({"tilerseg_checkpoint": 1, "state_dict": tiny_unet().state_dict()}, nomodel)
    _one_error(cli("run", data("rasterio/rgb-byte-tenth.tif"), "--weights", str(nomodel), "-o",
                   str(tmp_path / "o.zarr")), "lacks arch, encoder")
    assert not (tmp_path / "o.zarr").exists()


def test_bad_values_are_one_line(tmp_path):
    src = data("rasterio/rgb-byte-tenth.tif")
    _one_error(cli("run", src, "--tile", "0", "-o", str(tmp_path / "a.zarr")), "--tile 0")
    _one_error(cli("run", src, "--threshold", "nan", "-o", str(tmp_path / "a.zarr")), "--threshold nan")
    r = cli("run", src, "--model-arg", "a=[1,", "-o", str(tmp_path / "a.zarr"))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "read as YAML" in r.stderr.splitlines()[-1]
    r = cli("demo", str(tmp_path / "d"), "--size", "0")
    _one_error(r, "--size 0")
    assert not (tmp_path / "d" / "slide.tif").exists()


def test_an_unloadable_last_pt_is_one_line(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "last.pt").write_bytes(b"not a checkpoint")
    isbi = data("isbi2012")
    r = cli("train", str(ROOT_PIPELINE), "-o", str(run), "--resume", "--set", f"images={isbi}/image",
            "--set", f"masks={isbi}/label")
    _one_error(r, "last.pt", "cannot be loaded to resume")


ROOT_PIPELINE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "pipelines", "em-membranes.yaml")
