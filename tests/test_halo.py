"""Receptive-field measurement: the figure DESIGN.md gives, and it is tight:
seam-exact at the recommended halo, not below the radius."""
import json

import numpy as np
import pytest

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
    assert "halo 72 px (--halo auto: receptive field 65 px, computed from the module graph)" in r.stderr
    assert "halo 72" in r.stdout


def _small_models():
    from tilerseg.models import ModelSpec, build

    yield "unet-r18-d3", tiny_unet(), 3, 2
    yield "unet2d", build(ModelSpec("unet2d", "-", in_channels=1, kwargs=(("depth", 3), ("features", 4)))), 1, 2
    yield "ternausnet11", build(ModelSpec("ternausnet11", "-", kwargs=(("num_filters", 4),))), 3, 2
    yield "linknet-r18", build(ModelSpec("linknet", "resnet18", kwargs=(("encoder_depth", 3),))), 3, 2
    yield "unet3d", build(ModelSpec("unet3d", "-", in_channels=1, kwargs=(("features", 2), ("depth", 2)))), 1, 3


@pytest.mark.slow
def test_analytic_receptive_field_equals_the_gradient_probe():
    """The module-graph figure is exact: it equals the input-gradient
    support (the probe stays as the cross-check and the fallback)."""
    import time

    from tilerseg.infer import output_stride
    from tilerseg.receptive import analytic_radius, gradient_radius

    for name, model, bands, dims in _small_models():
        s = output_stride(model)
        t0 = time.perf_counter()
        a = analytic_radius(model, in_channels=bands, stride=s, dims=dims)
        took = time.perf_counter() - t0
        g, _ = gradient_radius(model, in_channels=bands, stride=s, size=64 if dims == 3 else 256)
        assert a == g, (name, a, g)
        assert took < 2.0, (name, took)  # 0.01-0.2 s unloaded; the probe takes seconds to minutes


def test_analytic_receptive_field_refuses_what_is_not_a_window():
    from tilerseg.models import ModelSpec, build
    from tilerseg.receptive import analytic_radius

    fpn = build(ModelSpec("fpn", "resnet18"))  # align_corners=True upsampling: depends on the input size
    assert analytic_radius(fpn, in_channels=3, stride=32) is None
    psp = build(ModelSpec("pspnet", "resnet18"))  # global pooling
    assert analytic_radius(psp, in_channels=3, stride=8) is None


def test_halo_defaults_to_the_receptive_field_and_the_run_says_why(tmp_path, tiny_model_dir):
    out = tmp_path / "o.zarr"
    r = cli("run", data("rasterio/byte.tif"), "--weights", tiny_model_dir, "--bands", "1,1,1", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "halo 72 px (receptive field 65 px, computed from the module graph)" in r.stderr
    r = cli("run", data("rasterio/byte.tif"), "--weights", tiny_model_dir, "--bands", "1,1,1", "--tile", "128",
            "-o", str(tmp_path / "small.zarr"))
    assert r.returncode == 1 and "--tile 128 is too small for the halo 72" in r.stderr
