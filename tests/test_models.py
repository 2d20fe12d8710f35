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


# one tiny configuration per registry architecture (a test checks the list is complete)
TINY = {
    "unet": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=[8, 8, 8])),
    "unetplusplus": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=[8, 8, 8])),
    "manet": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=[8, 8, 8])),
    "linknet": ("tu-resnet10t", dict(encoder_depth=3)),
    "fpn": ("tu-resnet10t", dict(encoder_depth=3, decoder_pyramid_channels=32, decoder_segmentation_channels=32)),
    "pspnet": ("tu-resnet10t", dict(encoder_depth=3, psp_out_channels=8)),
    "deeplabv3": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=8)),
    "deeplabv3plus": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=8)),
    "pan": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=8)),
    "upernet": ("tu-resnet10t", dict(encoder_depth=3, decoder_channels=8)),
    "segformer": ("tu-resnet10t", dict(encoder_depth=3, decoder_segmentation_channels=8)),
    "dpt": ("tu-vit_tiny_patch16_224", dict(encoder_depth=1, decoder_intermediate_channels=[8],
                                           decoder_fusion_channels=8, embed_dim=16, num_heads=1,
                                           decoder_readout="ignore")),
    "ternausnet11": ("vgg", dict(num_filters=2)),
    "ternausnet16": ("vgg", dict(num_filters=2)),
    "transunet": ("resnet", dict(backbone="resnet18", layers=[1, 1, 1, 1], hidden=16, depth=1, heads=2,
                                 decoder_channels=[8, 8, 8, 8], head_channels=8)),
    "unet2d": ("", dict(features=2, depth=2)),
    "unet3d": ("", dict(features=2, depth=1)),
}


def test_every_architecture_reads_bands_and_classes_from_a_plain_state_dict(tmp_path):
    """A bare state dict (1 or 3 bands; .pt, or .safetensors whose keys are
    sorted) tells its bands and classes; the spec described from it (flags
    with neither) takes the file strictly, and a --model-arg that disagrees
    is one line naming what the file holds."""
    from safetensors.torch import save_file

    from tilerseg.models import build
    from tilerseg.models.registry import ARCHITECTURES, FILE_ARCHS

    assert set(TINY) == set(ARCHITECTURES) - set(FILE_ARCHS)  # files that describe themselves
    for name, (encoder, kw) in TINY.items():
        for bands, classes, ext in ((1, 2, "safetensors"), (3, 3, "pt")):
            made = ModelSpec(arch=name, encoder=encoder, classes=classes, in_channels=bands,
                             kwargs=ModelSpec.freeze(kw))
            with torch.device("meta"):  # the weights' values do not matter here, only their shapes
                shapes = {k: v.shape for k, v in build(made).state_dict().items()}
            state = {k: torch.zeros(()).expand(s) for k, s in shapes.items()}  # one float on disk
            if ext == "safetensors" and not name.startswith("ternausnet"):  # not its 10-15 M VGG weights: slow
                state = {k: v.contiguous() for k, v in state.items()}
                save_file(state, path := str(tmp_path / f"{name}-{bands}.safetensors"))
            else:
                torch.save(state, path := str(tmp_path / f"{name}-{bands}.pt"))
            flags = ModelSpec(arch=name, encoder=encoder, kwargs=ModelSpec.freeze(kw))  # 3 bands, 1 class
            info = describe(path, flags)
            assert (info.spec.in_channels, info.spec.classes) == (bands, classes), name
            with torch.device("meta"):
                build(info.spec).load_state_dict(state, strict=True, assign=True)  # every shape fits
            if name in ("unet", "ternausnet11", "unet2d", "unet3d") and bands == 1:
                same = ModelSpec(arch=name, encoder=encoder, kwargs=ModelSpec.freeze({**kw, "in_channels": 1}))
                assert describe(path, same).spec == info.spec
                other = ModelSpec(arch=name, encoder=encoder, kwargs=ModelSpec.freeze({**kw, "in_channels": 3}))
                with pytest.raises(ModelError, match=r"--model-arg in_channels=3 disagrees .* hold a model of 1 "
                                                     r"input band\(s\) and 2 class\(es\) \(first layer .*, last "
                                                     r"layer .*\): drop the --model-arg"):
                    describe(path, other)
