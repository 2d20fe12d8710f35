"""MONAI bundles as --weights: what the JSON declares, the bundle's TorchScript
network, no bundle code run. The oracle is the network on the whole
mirror-padded image, preprocessed by MONAI's formulas written in numpy."""
import json
import warnings

import numpy as np
import pytest
import tifffile

from conftest import cli, textured_tiff, tiny_unet

HALO, STRIDE = 72, 8
SUB, DIV = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]


def bundle(folder, *, fixed=True, script=True):
    import torch

    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    net = tiny_unet(seed=6, classes=2)
    if script:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 64, 64)), str(folder / "models" / "model.ts"))
    else:
        torch.save(net.state_dict(), folder / "models" / "model.pt")
    meta = {"name": "tiny", "network_data_format": {
        "inputs": {"image": {"num_channels": 3, "type": "image"}},
        "outputs": {"pred": {"num_channels": 2, "channel_def": {"0": "background", "1": "nuclei"}}}}}
    norm = {"_target_": "NormalizeIntensityd", "keys": "image", "channel_wise": True}
    if fixed:
        norm.update(subtrahend=SUB, divisor=DIV)
    inference = {"network_def": {"_target_": "UNet", "spatial_dims": 2},
                 "preprocessing": {"_target_": "Compose", "transforms": [
                     {"_target_": "LoadImaged", "keys": "image"}, {"_target_": "EnsureChannelFirstd", "keys": "image"},
                     {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 255, "b_min": 0,
                      "b_max": 1, "clip": True}, norm]},
                 "postprocessing": {"_target_": "Compose", "transforms": [
                     {"_target_": "Activationsd", "keys": "pred", "softmax": True}]}}
    (folder / "configs" / "metadata.json").write_text(json.dumps(meta))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    return str(folder), net


def oracle(net, img, mean=None, std=None):
    """MONAI's ScaleIntensityRange (clip) then NormalizeIntensity (channel-wise)
    in numpy, over the whole image; the net on it mirror-padded; softmax."""
    import torch

    x = np.clip(img.astype(np.float64) / 255, 0, 1)
    if mean is None:
        mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
    x = (x - np.asarray(mean)) / np.asarray(std)
    H, W = img.shape[:2]
    pb, pr = (-(H + 2 * HALO)) % STRIDE, (-(W + 2 * HALO)) % STRIDE
    x = np.pad(x, ((HALO, HALO + pb), (HALO, HALO + pr), (0, 0)), mode="reflect")
    with torch.no_grad():
        y = torch.softmax(net(torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))), dim=1)
    return y.numpy()[0, :, HALO:HALO + H, HALO:HALO + W]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.tif"
    return str(path), textured_tiff(path, (200, 260), seed=3, periods=(17.0, 23.0), noise=30)


@pytest.mark.slow
@pytest.mark.parametrize("fixed", [True, False])
def test_a_bundle_runs_as_its_network_on_the_whole_image(tmp_path, image, fixed):
    """Fixed normalisation, or per-sample (computed once over the whole
    image): equal to the oracle; tiled (256) equals one window (576)."""
    from tilerseg.models import ModelSpec, describe

    path, img = image
    folder, net = bundle(tmp_path / "b", fixed=fixed)
    info = describe(folder, ModelSpec(kwargs=(("stride", "8"),)))
    assert (info.spec.arch, info.spec.in_channels, info.spec.classes) == ("monai", 3, 2)
    assert info.class_names == ("background", "nuclei")
    out = {}
    for tile in ("256", "576"):
        o = tmp_path / f"{tile}.tif"
        r = cli("run", path, "--weights", folder, "--model-arg", "stride=8", "--tile", tile, "--probabilities",
                "-o", o)
        assert r.returncode == 0, r.stderr
        assert ("per-sample statistics computed once" in r.stderr) != fixed
        out[tile] = tifffile.imread(o)
    ref = oracle(net, img, *((SUB, DIV) if fixed else ()))
    got = out["256"] if out["256"].shape[0] == 2 else np.moveaxis(out["256"], -1, 0)
    whole = out["576"] if out["576"].shape[0] == 2 else np.moveaxis(out["576"], -1, 0)
    assert got.shape == ref.shape == (2, 200, 260)
    assert np.abs(got - ref).max() <= 1e-4 and np.abs(got - whole).max() <= 1e-5


def test_a_bundle_without_torchscript_is_one_line(tmp_path, image):
    folder, _ = bundle(tmp_path / "b", script=False)
    out = tmp_path / "m.tif"
    r = cli("run", image[0], "--weights", folder, "-o", out)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "no models/model.ts" in r.stderr and "UNet" in r.stderr and not out.exists()


def test_a_softmax_output_has_the_same_measured_radius():
    """The sum of a softmax's outputs is 1: the input-gradient probe weights
    the classes unequally, or it would find no receptive field at all."""
    import torch

    from tilerseg.receptive import gradient_radius

    net = tiny_unet(seed=6, classes=2)
    soft = torch.nn.Sequential(net, torch.nn.Softmax(dim=1)).eval()
    assert gradient_radius(soft, in_channels=3, stride=STRIDE)[0] == gradient_radius(net, in_channels=3,
                                                                                    stride=STRIDE)[0] == 65
