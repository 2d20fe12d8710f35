"""Model registry and the three weights formats, against direct torch runs."""
import time

import numpy as np
import pytest
import torch

import tilerseg
from conftest import reference, tiny_unet
from tilerseg.errors import ModelError
from tilerseg.models import ModelInfo, ModelSpec, Normalization, canonical, describe, instantiate, save_checkpoint

IMG = np.random.default_rng(7).integers(0, 256, (120, 140, 3), dtype=np.uint8)
KW = dict(encoder_depth=3, decoder_channels=[16, 8, 4])


def test_aliases_and_unknown_names():
    assert canonical("UnetPP") == canonical("unet++") == "unetplusplus"
    with pytest.raises(ModelError, match="choose one of .*unet"):
        canonical("resunet")


@pytest.mark.parametrize("fmt", ["dir", "safetensors", "pt", "pt-nested"])
def test_weight_formats_load_the_same_model(tmp_path, tiny_model_dir, fmt):
    model = tiny_unet()
    if fmt == "dir":
        path = tiny_model_dir
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        path = str(tmp_path / "w.safetensors")
        save_file(model.state_dict(), path)
    else:
        path = str(tmp_path / "w.pt")
        sd = model.state_dict()
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}} if fmt == "pt-nested" else sd, path)
    if fmt == "dir":
        info = describe(path, ModelSpec())
    else:  # a bare state dict needs the architecture from the flags
        info = describe(path, ModelSpec(arch="unet", encoder="resnet18", kwargs=ModelSpec.freeze(KW)))
    assert info.trained and info.spec.in_channels == 3
    got = instantiate(info)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(got(x), model(x))


def test_checkpoint_carries_config_and_normalisation(tmp_path):
    model = tiny_unet(seed=9, classes=2, in_channels=1)
    norm = Normalization(mean=(0.3,), std=(0.1,), scale=255.0)
    info = ModelInfo(spec=ModelSpec(arch="unet", encoder="resnet18", classes=2, in_channels=1,
                                    kwargs=ModelSpec.freeze(KW)),
                     weights=None, normalization=norm, class_names=("bg", "cell"), tile=256, halo=72)
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, model, info)
    back = describe(path, ModelSpec(arch="fpn"))  # flags are ignored: the checkpoint knows
    assert back.spec.arch == "unet" and back.spec.classes == 2 and back.class_names == ("bg", "cell")
    gray = IMG[..., :1]
    got = tilerseg.segment(gray, path, tile=256, halo=72, device="cpu").compute()
    H, W = gray.shape[:2]
    pad = np.pad(gray, ((72, 72 + (-(H + 144)) % 8), (72, 72 + (-(W + 144)) % 8), (0, 0)), mode="reflect")
    x = (torch.from_numpy(pad).permute(2, 0, 1)[None].float() / 255 - 0.3) / 0.1
    with torch.no_grad():
        ref = torch.softmax(model(x), 1)[0, :, 72:72 + H, 72:72 + W].numpy()
    assert got.shape == (2, H, W) and np.abs(got - ref).max() <= 1e-4


def test_model_name_in_segment_uses_imagenet_normalisation():
    torch.manual_seed(0)
    got = tilerseg.segment(IMG, "unet", tile=256, halo=64, device="cpu").compute()
    assert got.shape == (1, 120, 140) and np.isfinite(got).all()


def test_imagenet_weights_offline_fail_fast_with_advice():
    from tilerseg.models import build

    build(ModelSpec(arch="unet", encoder="resnet18", encoder_weights=None))  # warm imports
    t0 = time.perf_counter()
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE=0.*--encoder-weights none"):
        build(ModelSpec(arch="unet", encoder="resnet18", encoder_weights="imagenet"))
    assert time.perf_counter() - t0 < 1.0


def test_wrong_architecture_for_weights_says_which_flags(tmp_path):
    path = str(tmp_path / "w.pt")
    torch.save(tiny_unet().state_dict(), path)
    info = describe(path, ModelSpec(arch="unet", encoder="resnet34"))
    with pytest.raises(ModelError, match="--model/--encoder/--classes"):
        instantiate(info)


def test_segment_reference_with_full_depth_model_and_large_halo():
    """A 5-level encoder (stride 32) is seam-exact too when the halo covers it."""
    import segmentation_models_pytorch as smp

    torch.manual_seed(1)
    model = smp.Unet("resnet18", encoder_weights=None, decoder_channels=(16, 16, 8, 8, 4)).eval()
    img = np.random.default_rng(3).integers(0, 256, (200, 230, 3), dtype=np.uint8)
    got = tilerseg.segment(img, model, tile=704, halo=288, device="cpu").compute()
    ref = reference(model, img, halo=288, stride=32)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.parametrize("arch,encoder,kwargs,local", [
    ("unet", "resnet18", {}, True),
    ("unetplusplus", "resnet18", {}, True),
    ("fpn", "resnet18", {}, False),  # its head upsamples with align_corners=True
    ("unet", "resnet18", {"decoder_attention_type": "scse"}, False),
    ("unet", "efficientnet-b0", {}, False),  # squeeze-excitation in the encoder
    ("pspnet", "resnet18", {}, False),
    ("deeplabv3plus", "resnet18", {}, False),
])
def test_global_context_is_found_on_the_built_module(arch, encoder, kwargs, local):
    from tilerseg.models import build, global_context

    m = build(ModelSpec(arch=arch, encoder=encoder, kwargs=ModelSpec.freeze(kwargs)))
    assert (global_context(m) == []) == local
