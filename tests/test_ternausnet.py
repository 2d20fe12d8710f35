"""TernausNet through the registry: the paper's layer widths (parameter
count from the layer list), VGG weights from a local file, seam-exact
tiling, and a run on a real GeoTIFF."""
import time

import numpy as np
import pytest
import torch

from conftest import cli, data
import tilerseg
from tilerseg.errors import ModelError
from tilerseg.models.registry import ModelSpec, build, global_context


def _spec(arch, **kw):
    return ModelSpec(arch=arch, encoder="vgg", classes=1, in_channels=3, kwargs=ModelSpec.freeze(kw))


def _conv(i, o, k):
    return i * o * k * k + o


def test_ternausnet11_has_the_papers_layers():
    """VGG11's 8 convolutions, then per decoder block a 3x3 conv and a 3x3
    transposed conv: center 512-512-256, dec5 768-512-256, dec4 768-512-128,
    dec3 384-256-64, dec2 192-128-32, dec1 96-32, final 32-1."""
    vgg11 = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512), (512, 512)]
    dec = [(512, 512, 256), (768, 512, 256), (768, 512, 128), (384, 256, 64), (192, 128, 32)]
    want = sum(_conv(i, o, 3) for i, o in vgg11)
    want += sum(_conv(i, m, 3) + _conv(m, o, 3) for i, m, o in dec) + _conv(96, 32, 3) + _conv(32, 1, 1)
    model = build(_spec("ternausnet11"))
    assert sum(p.numel() for p in model.parameters()) == want == 22_927_393
    assert not global_context(model)  # local: seam-exact under tiling
    names = set(model.state_dict())  # the authors' attribute names, so their checkpoints load
    assert {"conv1.weight", "conv3s.weight", "conv5.weight", "center.block.1.weight", "dec1.conv.weight"} <= names


def test_ternausnet16_and_num_filters_and_bilinear():
    m16 = build(_spec("ternausnet16"))
    assert sum(p.numel() for p in m16.encoder.parameters()) == 14_714_688  # VGG16 features
    assert m16.dec5.block[1].kernel_size == (4, 4)
    small = build(_spec("ternausnet11", num_filters=8, decoder="bilinear"))
    assert small.final.in_channels == 8 and isinstance(small.center.block[0], torch.nn.Upsample)
    assert small(torch.zeros(1, 3, 64, 96)).shape == (1, 1, 64, 96)


def test_vgg_weights_load_from_a_local_file_and_imagenet_fails_fast(tmp_path):
    import torchvision

    torch.manual_seed(1)
    vgg = torchvision.models.vgg11(weights=None)
    path = tmp_path / "vgg11.pth"
    torch.save(vgg.state_dict(), path)
    model = build(_spec("ternausnet11", vgg_weights=str(path)))
    assert torch.equal(model.conv5.weight, vgg.features[18].weight)
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="vgg_weights=PATH"):
        build(ModelSpec(arch="ternausnet11", encoder="vgg", encoder_weights="imagenet"))
    assert time.perf_counter() - t0 < 1


@pytest.mark.slow
def test_ternausnet_tiles_seam_exact_at_the_measured_halo(rgb_tiff):
    from tilerseg.receptive import analytic_radius, recommend_halo

    _, img = rgb_tiff
    img = img[:400, :450]
    torch.manual_seed(0)
    model = build(_spec("ternausnet11", num_filters=4)).eval()
    # 155 px radius -> 160 (equal to the gradient probe's: tests/test_halo.py)
    halo = recommend_halo(analytic_radius(model, in_channels=3, stride=32), 32)
    got = tilerseg.segment(img, model, tile=512, halo=halo, mean=(0.5,) * 3, std=(0.25,) * 3,
                           device="cpu").compute()
    H, W = img.shape[:2]
    pb, pr = (-(H + 2 * halo)) % 32, (-(W + 2 * halo)) % 32
    pad = np.pad(img, ((halo, halo + pb), (halo, halo + pr), (0, 0)), mode="reflect")
    with torch.no_grad():
        x = (torch.from_numpy(pad).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
        ref = torch.sigmoid(model(x))[0, :, halo:halo + H, halo:halo + W].numpy()
    assert np.abs(got - ref).max() < 1e-4


@pytest.mark.slow
def test_ternausnet11_runs_on_a_real_geotiff(tmp_path):
    import rasterio

    out = tmp_path / "t.tif"
    r = cli("run", data("rasterio/cogeo.tif"), "--model", "ternausnet11", "--model-arg", "num_filters=8",
            "--level", "1", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    with rasterio.open(out) as ds:
        assert ds.shape == (512, 512) and ds.crs is not None
