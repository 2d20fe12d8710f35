"""TransUNet through the registry: the paper's size, any tile that is a
multiple of 16, and on a real GeoTIFF the gaussian merge's seam error is
below the crop merge's at equal overlap."""
import numpy as np
import pytest
import torch

from conftest import cli, data
import tilerseg
from tilerseg.models.registry import ModelSpec, build, global_context

SMALL = dict(backbone="resnet18", layers=[1, 1, 1, 1], hidden=64, depth=2, heads=2,
             decoder_channels=[32, 16, 8, 8], head_channels=64)


def _small(seed=0):
    torch.manual_seed(seed)
    return build(ModelSpec(arch="transunet", encoder="-", classes=1, kwargs=ModelSpec.freeze(SMALL))).eval()


def test_r50_vit_b16_has_the_papers_parameter_count():
    model = build(ModelSpec(arch="transunet", encoder="-", classes=9))  # Synapse's 9 classes
    n = sum(p.numel() for p in model.parameters())
    assert round(n / 1e6, 2) == 105.28  # the paper's table
    assert len(model.blocks) == 12 and model.blocks[0].attn.num_heads == 12
    assert "Attention" in global_context(model)  # known non-local


@pytest.mark.parametrize("shape", [(224, 224), (256, 320), (96, 160)])
def test_any_multiple_of_16_by_resampled_position_embeddings(shape):
    with torch.no_grad():
        assert _small()(torch.zeros(1, 3, *shape)).shape == (1, 1, *shape)


def test_sides_not_multiple_of_16_fail_clearly():
    with pytest.raises(ValueError, match="multiples of 16"):
        _small()(torch.zeros(1, 3, 100, 96))


def test_gaussian_seam_error_below_crop_on_cogeo():
    from tilerseg.io import open_reader

    with open_reader(data("rasterio/cogeo.tif"), level=1) as r:  # 512 x 512
        img = r.read((0, r.meta.shape[0]), (0, r.meta.shape[1]))[0][:, :, :3]
    model = _small()
    H, W = img.shape[:2]
    halo = 64
    pad = np.pad(img, ((halo, halo), (halo, halo), (0, 0)), mode="reflect")  # 640: a multiple of 16
    x = (torch.from_numpy(pad).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
    # calibrate BatchNorm on the image: untouched running stats leave a random
    # network's output flat (std 1e-3), where seams could not show
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        ref = torch.sigmoid(model(x))[0, :, halo:halo + H, halo:halo + W].numpy()
    assert ref.std() > 0.05
    err = {}
    for merge in ("crop", "gaussian"):
        out = tilerseg.segment(img, model, tile=256, halo=halo, merge=merge, mean=(0.5,) * 3, std=(0.25,) * 3,
                               device="cpu").compute()
        err[merge] = float(np.abs(out - ref).mean())
    assert err["gaussian"] < err["crop"], err  # 0.0241 vs 0.0250 when written


@pytest.mark.slow
def test_transunet_runs_on_cogeo_with_the_gaussian_merge(tmp_path):
    import rasterio

    out = tmp_path / "t.tif"
    args = [a for k, v in SMALL.items() for a in ("--model-arg", f"{k}={v}".replace(" ", ""))]
    r = cli("run", data("rasterio/cogeo.tif"), "--model", "transunet", *args, "--level", "1", "--tile", "256",
            "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "gaussian merge" in r.stderr
    with rasterio.open(out) as ds:
        assert ds.shape == (512, 512)
