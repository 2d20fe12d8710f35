"""--merge gaussian: the blend equals a brute-force numpy blend of whole
windows; it beats the crop merge on a non-local model; auto picks it."""
import numpy as np
import pytest
import torch

from conftest import cli, data, tiny_unet
import tilerseg
from tilerseg.engine import gaussian_map

KW = dict(mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu")


def _brute_blend(model, img, tile, halo, stride):
    """Pad once as the engine does, run every window whole, weight by the
    gaussian map, normalise, crop: the definition, all in memory."""
    H, W = img.shape[:2]
    c = tile - 2 * halo
    ny, nx = -(-H // c), -(-W // c)
    pad = np.pad(img, ((halo, halo + ny * c - H), (halo, halo + nx * c - W), (0, 0)), mode="reflect")
    g = gaussian_map(tile)
    num = np.zeros((1, *pad.shape[:2]))
    den = np.zeros(pad.shape[:2])
    with torch.no_grad():
        for wy in range(ny):
            for wx in range(nx):
                win = pad[wy * c:wy * c + tile, wx * c:wx * c + tile]
                x = (torch.from_numpy(win).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
                p = torch.sigmoid(model(x))[0].numpy()
                num[:, wy * c:wy * c + tile, wx * c:wx * c + tile] += p * g
                den[wy * c:wy * c + tile, wx * c:wx * c + tile] += g
    return (num / den)[:, halo:halo + H, halo:halo + W]


def test_gaussian_blend_equals_brute_force(rgb_tiff):
    _, img = rgb_tiff
    img = img[:430, :610]  # windows overhang the right and bottom borders
    model = tiny_unet()
    got = tilerseg.segment(img, model, tile=256, halo=64, batch_size=3, merge="gaussian", **KW).compute()
    want = _brute_blend(model, img, 256, 64, 8)
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5


def test_gaussian_map_is_nnunets():
    g = gaussian_map(64)
    assert g.max() == pytest.approx(1.0, abs=1e-3) and g.min() > 0
    assert np.allclose(g, g.T) and np.allclose(g, g[::-1])
    centre = g[32]  # sigma = 64 / 8 = 8 px
    assert centre[32 + 8] / centre[32] == pytest.approx(np.exp(-((8.5 ** 2 - 0.5 ** 2) / (2 * 64))), rel=1e-3)


def test_gaussian_beats_crop_on_a_non_local_model(rgb_tiff):
    """scSE attention pools over the whole window: tiles disagree. At equal
    overlap the blend is closer to whole-image inference than hard crops."""
    import segmentation_models_pytorch as smp

    _, img = rgb_tiff
    img = img[:512, :640]
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(64, 32, 16),
                     decoder_attention_type="scse").eval()  # scSE squeezes channels by 16: at least 16 each
    ref = _normalised_reference(model, img, 64, 8)
    err = {}
    for merge in ("crop", "gaussian"):
        out = tilerseg.segment(img, model, tile=256, halo=64, merge=merge, **KW).compute()
        err[merge] = np.abs(out - ref).mean()
    assert err["gaussian"] < err["crop"], err


def _normalised_reference(model, img, halo, stride):
    """Whole-image inference with the same (0.5, 0.25) normalisation."""
    H, W = img.shape[:2]
    pb, pr = (-(H + 2 * halo)) % stride, (-(W + 2 * halo)) % stride
    pad = np.pad(img, ((halo, halo + pb), (halo, halo + pr), (0, 0)), mode="reflect")
    x = (torch.from_numpy(pad).permute(2, 0, 1)[None].float() / 255 - 0.5) / 0.25
    with torch.no_grad():
        p = torch.sigmoid(model(x))[0].numpy()
    return p[:, halo:halo + H, halo:halo + W]


def test_non_local_model_defaults_to_gaussian_and_says_so(tmp_path):
    r = cli("run", data("rasterio/byte.tif"), "--model", "pspnet", "--encoder", "resnet18", "--bands", "1,1,1",
            "--tile", "320", "-o", str(tmp_path / "p.zarr"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "global context" in r.stderr and "gaussian merge with halo 80" in r.stderr  # a quarter of 320
    r = cli("run", data("rasterio/byte.tif"), "--model", "pspnet", "--encoder", "resnet18", "--bands", "1,1,1",
            "--tile", "320", "--merge", "crop", "-o", str(tmp_path / "c.zarr"), "--quiet")
    assert r.returncode == 0 and "crop merge with halo 64" in r.stderr
