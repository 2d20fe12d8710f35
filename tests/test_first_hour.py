"""A new user's first hour: names that suggest what was meant, the demo
model everywhere, help with examples, progress that knows its total,
readable areas, output names that keep the input's, and the ISBI fetch
script's real download code."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, cli, data


def test_default_output_names_keep_inner_dots():
    from tilerseg.batch import default_output

    assert default_output("/x/RGB.byte.tif") == "RGB.byte.mask.zarr"
    assert default_output("slide.ome.tif", "out", "ome.tif") == os.path.join("out", "slide.mask.ome.tif")
    assert default_output("scan.v2.svs") == "scan.v2.mask.zarr"
    assert default_output("store.zarr/") == "store.mask.zarr"
    assert default_output("notes.unknown") == "notes.mask.zarr"


def test_misspelt_names_suggest_the_nearest():
    r = cli("run", data("rasterio/byte.tif"), "--model", "unte", "-o", "x.zarr")
    assert "did you mean 'unet'?" in r.stderr
    r = cli("run", data("rasterio/byte.tif"), "--weights", "dmeo", "-o", "x.zarr")
    assert "did you mean 'demo'" in r.stderr
    r = cli("run", data("rasterio/byte.tif"), "--pad-mode", "reflet")
    assert r.returncode == 2 and "did you mean 'reflect'?" in r.stderr
    r = cli("rnu")
    assert "did you mean 'run'?" in r.stderr
    r = cli("run", data("rasterio/byte.tif"), "--encoder", "resnt34", "-o", "x.zarr")
    assert "did you mean 'resnet34'?" in r.stderr


def test_run_help_ends_with_three_examples():
    r = cli("run", "--help")
    tail = r.stdout.strip().splitlines()[-4:]
    assert tail[0] == "examples:"
    assert [line.split()[2].rsplit(".", 1)[1] for line in tail[1:]] == ["svs", "tif", "png"]


def test_demo_is_a_first_class_model(tmp_path):
    import tilerseg

    assert "demo" in cli("models").stdout.split("trained weights shipped")[1]
    rng = np.random.default_rng(0)
    gray = (rng.random((200, 260)) * 255).astype(np.uint8)
    with pytest.raises(tilerseg.errors.ModelError, match=r"bands=\(1, 1, 1\)"):
        tilerseg.segment(gray, "demo")
    a = tilerseg.segment(gray, "demo", bands=(1, 1, 1), device="cpu").compute()
    b = tilerseg.segment(np.repeat(gray[..., None], 3, axis=2), "demo", device="cpu").compute()
    assert a.shape == (1, 200, 260)
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_progress_knows_its_total_from_the_first_call(tmp_path, tiny_model_dir, rgb_tiff):
    import tilerseg

    calls = []
    tilerseg.run(rgb_tiff[0], tmp_path / "m.zarr", weights=tiny_model_dir, tile=256, halo=72,
                 progress=lambda done, total: calls.append((done, total)))
    assert calls[0][0] == 0 and calls[0][1] == calls[-1][0] == calls[-1][1] > 0
    assert all(t == calls[0][1] for _, t in calls)


def test_class_areas_are_readable():
    from tilerseg.info import readable_area

    assert readable_area(3.21726e10, "m²") == "32,173 km²"
    assert readable_area(5.2e5, "m²") == "52 ha"
    assert readable_area(12.5, "m²") == "12.5 m²"
    assert readable_area(3.2e6, "µm²") == "3.2 mm²"
    assert readable_area(300.0, "µm²") == "300 µm²"


def test_fetch_isbi_downloads_from_a_local_copy_and_fails_offline_in_one_line(tmp_path):
    """The fetch script's real download code, pointed at a local copy of
    the public slices (file:// URLs), then at an address that cannot answer."""
    src = data("isbi2012")
    script = str(ROOT / "scripts" / "fetch_isbi2012.py")
    out = tmp_path / "isbi2012"
    args = [sys.executable, script, str(out), "--base-url", f"file://{src}", "--slices", "0-24", "--held-out", "20-24"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    for kind in ("image", "label"):
        names = sorted(os.listdir(out / kind))
        assert len(names) == 20 and names[0] == "0.png"
        assert (out / "held-out" / kind / "20.png").read_bytes() == open(f"{src}/{kind}/20.png", "rb").read()
    again = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "already there" in again.stdout
    r = subprocess.run([sys.executable, script, str(tmp_path / "x"), "--base-url", "http://127.0.0.1:9/isbi",
                        "--timeout", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert not (tmp_path / "x" / "image").exists()
