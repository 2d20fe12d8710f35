"""The model's pixel size against the image's (issue 33, item 5), with the
shipped demo model (trained at 0.5 µm/px)."""
import numpy as np
import pytest
import tifffile

from conftest import cli

LANDSAT = "/work/shared/data/rasterio/RGB.byte.tif"


def kind(path):
    from tilerseg.view.layers import output_kind

    return output_kind(str(path))


def slide(tmp_path, um_per_px=None):
    """A small RGB TIFF, with a resolution tag of ``um_per_px`` where given."""
    path = tmp_path / f"slide-{um_per_px}.tif"
    img = np.random.default_rng(0).integers(0, 255, (96, 96, 3), dtype=np.uint8)
    extra = {} if um_per_px is None else dict(resolution=(1e4 / um_per_px,) * 2, resolutionunit="CENTIMETER")
    tifffile.imwrite(path, img, photometric="rgb", **extra)
    return str(path)


def test_metres_against_microns_are_refused_in_one_line(tmp_path):
    out = tmp_path / "mask.tif"
    r = cli("run", LANDSAT, "--weights", "demo", "-o", out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "its pixels are 300 m" in r.stderr and "0.5 µm/px" in r.stderr and "--ignore-pixel-size" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_the_override_runs_and_is_recorded(tmp_path):
    out = tmp_path / "mask.tif"
    r = cli("run", LANDSAT, "--weights", "demo", "--ignore-pixel-size", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "pixel size not checked (--ignore-pixel-size" in r.stderr
    rec = kind(out)["pixel_size"]
    assert rec["image_unit"] == "metre" and rec["model_mpp"] == 0.5 and rec["image_pixel"] == pytest.approx(300, 0.01)


def test_a_ratio_beyond_one_and_a_half_is_warned_and_recorded(tmp_path):
    out = tmp_path / "mask.tif"
    r = cli("run", slide(tmp_path, 1.0), "--weights", "demo", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "trained at 0.5 µm/px (2.00x)" in r.stderr and "--mpp 0.5" in r.stderr and "--level" in r.stderr
    assert "pixel size 1 µm/px, 2.00x the model's 0.5 (warned)" in r.stderr
    assert kind(out)["pixel_size"] == {"model_mpp": 0.5, "image_mpp": 1.0, "ratio": 2.0}


def test_close_and_missing_pixel_sizes(tmp_path):
    """Within 1.5x: checked, said, nothing recorded; no pixel size: runs, unchecked."""
    for um, said in ((0.6, "pixel size 0.6 µm/px checked against the model's 0.5"),
                     (None, "pixel size unchecked (the image has none)")):
        out = tmp_path / f"mask-{um}.tif"
        r = cli("run", slide(tmp_path, um), "--weights", "demo", "-o", out)
        assert r.returncode == 0 and said in r.stderr, r.stderr
        assert "pixel_size" not in kind(out)
