"""Receptive-field measurement: the figure DESIGN.md gives, and it is tight:
seam-exact at the recommended halo, not below the radius."""
import json

import numpy as np

import tilerseg
from conftest import cli, data, reference, tiny_unet


def test_halo_command_depth3_resnet18():
    r = cli("halo", "--model", "unet", "--encoder", "resnet18", "--encoder-depth", "3", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert abs(res["radius"] - 65) <= 2 and res["stride"] == 8
    assert res["halo"] % 8 == 0 and res["halo"] >= res["radius"]


def test_measured_halo_is_tight(tmp_path, tiny_model_dir):
    from tilerseg.api import halo

    rep = halo(weights=tiny_model_dir)
    img = np.random.default_rng(11).integers(0, 256, (260, 300, 3), dtype=np.uint8)
    model = tiny_unet()

    def err(h):
        got = tilerseg.segment(img, model, tile=rep.halo * 2 + 64, halo=h, device="cpu").compute()
        return np.abs(got - reference(model, img, halo=h, stride=8)).max()

    assert err(rep.halo) <= 1e-4
    assert err(rep.halo - 24) > 1e-3  # 24 px short of it: seams


def test_run_halo_auto(tmp_path, tiny_model_dir):
    out = tmp_path / "o.zarr"
    r = cli("run", data("rasterio/byte.tif"), "--weights", tiny_model_dir, "--bands", "1,1,1",
            "--halo", "auto", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "radius 65 px, using halo 72" in r.stderr and "halo 72" in r.stdout
