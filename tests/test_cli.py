"""End to end through the command line: real files, and bad input that
must end in one line, a non-zero exit and nothing at the output path."""
import os

import numpy as np
import pytest
import tifffile

from conftest import cli, data


def _leftovers(folder) -> list[str]:
    return [f for f in os.listdir(folder) if "partial" in f]


def test_geotiff_output_is_a_cog_with_crs_transform_nodata_and_colours(tmp_path, tiny_model_dir):
    import rasterio

    src = data("rasterio/RGB.byte.tif")
    out = tmp_path / "mask.tif"
    r = cli("run", src, "--weights", tiny_model_dir, "--halo", "72", "--tile", "256", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "windows 56/56 (100%)" in r.stderr  # progress, logged when not on a terminal
    with rasterio.open(src) as a, rasterio.open(out) as b:
        assert (b.crs, b.transform, b.shape) == (a.crs, a.transform, a.shape)
        assert b.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert b.overviews(1) == [2] and b.block_shapes[0] == (512, 512)  # 791 x 718 px: one overview fits 512
        assert b.nodata == 255  # not the input's 0: that is a class here; the masked pixels are the same
        nodata = a.dataset_mask() == 0
        assert ((b.dataset_mask() == 0) == nodata).all()
        mask = b.read(1)
        assert b.colormap(1)[1][:3] == (0, 230, 60) and b.colormap(1)[255][:3] == (0, 0, 0)
        assert '"kind": "labels"' in b.tags()["TILERSEG"]
    assert nodata.any() and (mask[nodata] == 255).all()
    assert set(np.unique(mask[~nodata])) <= {0, 1}
    assert _leftovers(tmp_path) == []


def test_geotiff_probabilities_nan_where_masked(tmp_path, tiny_model_dir):
    import rasterio

    out = tmp_path / "p.tif"
    r = cli("run", data("rasterio/RGB.byte.tif"), "--weights", tiny_model_dir, "--probabilities", "-o", str(out))
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as b, rasterio.open(data("rasterio/RGB.byte.tif")) as a:
        p = b.read(1)
        assert b.dtypes[0] == "float32" and np.isnan(b.nodata)
        assert np.isnan(p[a.dataset_mask() == 0]).all()


def test_a_plain_state_dict_with_model_arg_in_channels_runs_or_says_what_the_file_holds(tmp_path):
    """A bare 1-band, 2-class state dict on the real 1-band ISBI image: an
    agreeing --model-arg in_channels=1 runs (it crashed on a duplicate
    keyword) and equals whole-image inference; a disagreeing one is one line."""
    import torch
    import zarr
    from PIL import Image

    from conftest import reference, tiny_unet

    src = data("isbi2012/image/0.png")
    model = tiny_unet(seed=3, classes=2, in_channels=1)
    torch.save(model.state_dict(), weights := tmp_path / "w.pt")
    flags = ["--model", "unet", "--encoder", "resnet18", "--model-arg", "encoder_depth=3",
             "--model-arg", "decoder_channels=[16, 8, 4]", "--weights", weights, "--halo", "72"]
    r = cli("run", src, *flags, "--model-arg", "in_channels=1", "-o", out := tmp_path / "p.zarr", "--probabilities")
    assert r.returncode == 0, r.stderr
    img = np.asarray(Image.open(src))[..., None]
    got = zarr.open_array(str(out / "0"), mode="r")[...]
    assert np.abs(got - reference(model, img, halo=72, stride=8)).max() <= 1e-4
    r = cli("run", src, *flags, "--model-arg", "in_channels=3", "-o", tmp_path / "q.zarr")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "--model-arg in_channels=3 disagrees with the weights, which hold a model of 1 input band(s) and 2 " \
           "class(es) (first layer encoder.conv1.weight (64, 1, 7, 7), last layer segmentation_head.0.weight " \
           "(2, 4, 3, 3)): drop the --model-arg (the file decides)" in r.stderr, r.stderr


@pytest.mark.parametrize("rel,extra", [
    ("openslide/small.svs", ["--tile", "128", "--halo", "32"]),
    ("openslide/boxes.tiff", ["--tile", "256", "--halo", "64"]),
    ("rasterio/cogeo.tif", []),
    ("isbi2012/image/0.png", ["--bands", "1,1,1"]),
])
def test_real_files_run_end_to_end(tmp_path, tiny_model_dir, rel, extra):
    import zarr

    out = tmp_path / "out.zarr"
    r = cli("run", data(rel), "--weights", tiny_model_dir, "-o", str(out), *extra)
    assert r.returncode == 0, r.stderr
    z = zarr.open_array(str(out / "0"), mode="r")  # level 0 of the OME-Zarr multiscale
    from tilerseg.io import open_reader

    assert z.shape == open_reader(data(rel)).meta.shape and z.dtype == np.uint8
    assert set(np.unique(z[...])) <= {0, 1, 255}
    assert "wrote" in r.stdout


def test_png_output_and_untrained_warning(tmp_path):
    out = tmp_path / "m.png"
    r = cli("run", data("isbi2012/image/0.png"), "--encoder", "resnet18", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr
    from PIL import Image

    assert np.asarray(Image.open(out)).shape == (512, 512)


def _corrupt_one_tile(path, tmp_path):
    img = np.random.default_rng(0).integers(0, 256, (600, 600, 3), dtype=np.uint8)
    bad = tmp_path / "bad.tif"
    tifffile.imwrite(bad, img, tile=(128, 128), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(bad) as tif:
        offset = tif.pages[0].dataoffsets[12]
    with open(bad, "r+b") as f:  # overwrite tile 12's deflate stream with garbage
        f.seek(offset)
        f.write(b"\xff" * 64)
    return str(bad)


def _fails_cleanly(r, out, *words):
    """One error line; anything else on stderr is tilerseg's own progress or warnings."""
    lines = r.stderr.strip().splitlines()
    errors = [ln for ln in lines if ln.startswith("tilerseg: error:")]
    assert r.returncode != 0
    assert len(errors) == 1 and all(ln.startswith("tilerseg: ") for ln in lines), r.stderr
    assert "Traceback" not in r.stderr
    lines = errors
    for w in words:
        assert w in lines[0], lines[0]
    assert not os.path.exists(out)
    assert _leftovers(os.path.dirname(out)) == []


@pytest.mark.parametrize("rel", ["openslide/unopenable.tiff", "openslide/unreadable.svs", "rasterio/corrupt.tif"])
def test_corrupt_inputs_one_line_no_output(tmp_path, tiny_model_dir, rel):
    out = str(tmp_path / "out.tif")
    r = cli("run", data(rel), "--weights", tiny_model_dir, "-o", out)
    _fails_cleanly(r, out, os.path.basename(rel))


def test_window_that_fails_to_decode(tmp_path, tiny_model_dir):
    bad = _corrupt_one_tile(None, tmp_path)
    out = str(tmp_path / "out.zarr")
    r = cli("run", bad, "--weights", tiny_model_dir, "--tile", "256", "--halo", "64", "-o", out)
    _fails_cleanly(r, out, "bad.tif", "could not decode rows")


def test_missing_file_band_mismatch_unwritable_output(tmp_path, tiny_model_dir):
    out = str(tmp_path / "o.zarr")
    _fails_cleanly(cli("run", str(tmp_path / "nope.svs"), "-o", out), out, "nope.svs", "no such file")
    _fails_cleanly(cli("run", data("isbi2012/image/0.png"), "--weights", tiny_model_dir, "-o", out), out,
                   "3 input band(s), the image has 1", "--bands 1,1,1")
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        target = str(locked / "o.tif")
        r = cli("run", data("rasterio/byte.tif"), "-o", target)
        if os.access(locked, os.W_OK):  # root ignores permissions: use a missing folder instead
            target = str(tmp_path / "missing" / "o.tif")
            r = cli("run", data("rasterio/byte.tif"), "-o", target)
        assert r.returncode != 0 and "tilerseg: error:" in r.stderr and "Traceback" not in r.stderr
        assert not os.path.exists(target)
    finally:
        os.chmod(locked, 0o700)


def _can_create(folder: str) -> bool:
    try:
        os.close(os.open(probe := os.path.join(folder, ".tilerseg-probe"), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except OSError:
        return False
    os.remove(probe)
    return True


def test_read_only_output_folder_and_labels_only_formats_say_one_line(tmp_path):
    """A folder that cannot be written: the refusal alone, not a second line
    about the ledger beside it; probabilities to PNG: one line, in English."""
    locked = tmp_path / "locked"
    locked.mkdir()
    os.chmod(locked, 0o500)
    try:
        folder = str(locked)
        if _can_create(folder):  # root ignores permissions: a folder this system keeps read-only
            folder = next((p for p in ("/sys", "/proc") if os.path.isdir(p) and not _can_create(p)), None)
            if folder is None:
                pytest.skip("no read-only folder here (root, and /sys and /proc writable)")
        for name, extra in (("o.tif", []), ("o.zarr", []), ("o.png", ["--probabilities"])):
            r = cli("run", data("rasterio/byte.tif"), "-o", os.path.join(folder, name), *extra)
            assert r.returncode == 1 and r.stderr.count("\n") == 1 and "ledger" not in r.stderr, r.stderr
            assert r.stderr.startswith("tilerseg: error:") and "choose another -o" in r.stderr or \
                "PNG holds label masks only" in r.stderr, r.stderr
    finally:
        os.chmod(locked, 0o700)
    r = cli("run", data("rasterio/byte.tif"), "-o", tmp_path / "p.png", "--probabilities")
    assert r.returncode == 1 and r.stderr == f"tilerseg: error: {tmp_path / 'p.png'}: PNG holds label masks only; " \
        "write probabilities to .tif or .zarr, or drop --probabilities\n", r.stderr


def test_bad_tile_names_valid_values_and_unknown_model(tmp_path, tiny_model_dir):
    out = str(tmp_path / "o.zarr")
    _fails_cleanly(cli("run", data("rasterio/byte.tif"), "--weights", tiny_model_dir, "--bands", "1,1,1",
                       "--tile", "500", "-o", out), out, "--tile 496 or 504")
    _fails_cleanly(cli("run", data("rasterio/byte.tif"), "--model", "unetx", "-o", out), out,
                   "unknown model", "unetplusplus")


def test_existing_output_is_kept_unless_overwrite(tmp_path, tiny_model_dir):
    out = tmp_path / "o.png"
    out.write_bytes(b"keep")
    args = ["run", data("rasterio/byte.tif"), "--weights", tiny_model_dir, "--bands", "1,1,1", "-o", str(out)]
    r = cli(*args)
    assert r.returncode != 0 and "--overwrite" in r.stderr and out.read_bytes() == b"keep"
    r = cli(*args, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"\x89PNG"


def test_models_lists_registry():
    r = cli("models")
    assert r.returncode == 0
    for name in ("unet", "unetplusplus", "unetpp", "fpn", "segformer", "deeplabv3plus"):
        assert name in r.stdout


@pytest.fixture
def tiny_disk(tmp_path):
    """A 96 KiB tmpfs: a real full disk (needs root; skipped otherwise)."""
    import subprocess

    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (not root)")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


@pytest.mark.parametrize("name", ["probs.zarr", "probs.tif"])
def test_full_disk_one_line_no_output(tiny_disk, tiny_model_dir, name):
    out = str(tiny_disk / name)
    r = cli("run", data("rasterio/RGB.byte.tif"), "--weights", tiny_model_dir, "--probabilities", "-o", out)
    _fails_cleanly(r, out, "disk full", "--resume")
    # nothing that looks like an output: at most the hidden state of finished blocks, kept for --resume
    assert all(n == f".{name}.tilerseg" or n == "tilerseg-ledger.jsonl" for n in os.listdir(tiny_disk))


def test_failed_window_waits_for_tasks_in_flight(tmp_path, tiny_model_dir):
    """A failing task must not let the run close the reader under tasks still
    reading (that segfaulted in GDAL at exit): repeat with many threads."""
    import tilerseg
    from tilerseg.errors import ReadError

    for i in range(4):
        out = tmp_path / f"o{i}.zarr"
        with pytest.raises(ReadError, match="TIFFReadEncodedTile"):
            tilerseg.run(data("rasterio/corrupt.tif"), out, weights=tiny_model_dir, tile=256, halo=64, workers=6)
        assert not out.exists() and _leftovers(tmp_path) == []
