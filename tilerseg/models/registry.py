"""Model registry: a name -> builder map over segmentation-models-pytorch.

Every smp architecture is available under its lower-case name, plus the
aliases below. The registry also records which architectures are *local*
(no global pooling or attention): only those give tiled output equal to
whole-image inference (DESIGN.md)."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

# tilerseg never downloads at run time unless the user opts in with
# HF_HUB_OFFLINE=0: on a cluster node without internet, huggingface_hub would
# otherwise retry for half a minute before failing. Must precede its import.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ..errors import ModelError  # noqa: E402

ALIASES = {"unetpp": "unetplusplus", "unet++": "unetplusplus", "deeplab": "deeplabv3plus"}
# Architectures beyond smp's catalogue: name -> (module in tilerseg.models, builder, class name).
EXTRA = {"ternausnet11": ("ternausnet", "ternausnet11", "TernausNet"),
         "ternausnet16": ("ternausnet", "ternausnet16", "TernausNet"),
         "transunet": ("transunet", "transunet", "TransUNet"),
         "unet2d": ("unet", "unet2d", "UNet"),
         "unet3d": ("unet", "unet3d", "UNet")}
# Architectures without global context: seam-exact under overlap-tile.
LOCAL = {"unet", "unetplusplus", "linknet", "fpn", "ternausnet11", "ternausnet16", "unet2d", "unet3d"}
NON_LOCAL_WHY = {
    "manet": "attention blocks with global pooling", "pan": "global pooling in its pyramid attention",
    "pspnet": "pyramid pooling", "deeplabv3": "ASPP image pooling", "deeplabv3plus": "ASPP image pooling",
    "upernet": "pyramid pooling", "segformer": "self-attention in its MiT encoders", "dpt": "a vision transformer",
    "transunet": "a vision transformer on the 1/16 feature map",
}


_DEPTH_DECODERS = {"unet": (256, 128, 64, 32, 16), "unetplusplus": (256, 128, 64, 32, 16),
                   "manet": (256, 128, 64, 32, 16)}


def architectures() -> dict[str, str]:
    """Registry names -> class names (smp's, then tilerseg's own)."""
    import segmentation_models_pytorch as smp

    names = {name: cls.__name__ for name, cls in smp.MODEL_ARCHITECTURES_MAPPING.items()}
    names.update({name: cls for name, (_, _, cls) in EXTRA.items()})
    return names


def canonical(name: str) -> str:
    """Resolve aliases and case; an unknown name lists the valid ones."""
    key = ALIASES.get(name.lower(), name.lower())
    names = architectures()
    if key not in names:
        valid = ", ".join(sorted(names) + sorted(ALIASES))
        raise ModelError(f"unknown model {name!r}: choose one of {valid} (see `tilerseg models`)")
    return key


VOLUMETRIC = {"unet3d"}  # models that take (z, y, x) windows: run on volumes by the 3-D engine


def is_volumetric(name: str) -> bool:
    return canonical(name) in VOLUMETRIC


def is_local(name: str) -> bool:
    return canonical(name) in LOCAL


_GLOBAL_NAME = re.compile(r"Squeeze|Excit|^SE[A-Z_]|^SE$|SCSE|Attention|Attn|PyramidPool|^PSP|ASPPPool")


def global_context(model) -> list[str]:
    """Names of the module types in ``model`` that see the whole input
    (global pooling, squeeze-excitation, attention): any of them makes the
    tiled output differ from whole-image inference. Checked on the built
    module, so encoders with SE blocks (EfficientNet, SE-ResNet...) and
    ``decoder_attention_type="scse"`` are caught too; wrappers holding only
    ``nn.Identity`` (smp's disabled attention) are not."""
    import torch.nn as nn

    found = set()
    for m in model.modules():
        name = type(m).__name__
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MultiheadAttention)):
            found.add(name)
        elif _GLOBAL_NAME.search(name):
            children = list(m.children())
            if not (children and all(isinstance(c, nn.Identity) for c in children)):
                found.add(name)
    return sorted(found)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model; hashable so workers cache it.

    ``kwargs`` holds extra smp arguments as sorted (key, value) pairs with
    lists turned into tuples (``decoder_channels``...)."""

    arch: str = "unet"
    encoder: str = "resnet34"
    classes: int = 1
    in_channels: int = 3
    encoder_weights: str | None = None
    kwargs: tuple[tuple[str, Any], ...] = field(default=())

    @staticmethod
    def freeze(kwargs: dict[str, Any]) -> tuple[tuple[str, Any], ...]:
        return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in kwargs.items()))


def build(spec: ModelSpec):
    """Build an untrained (or ImageNet-encoder) model from ``spec``."""
    import segmentation_models_pytorch as smp

    arch = canonical(spec.arch)
    kwargs = dict(spec.kwargs)
    if arch in EXTRA:
        return _build_extra(arch, spec, kwargs)
    if "encoder_depth" in kwargs and "decoder_channels" not in kwargs and arch in _DEPTH_DECODERS:
        # smp wants one decoder width per level: keep its defaults' first ones
        kwargs["decoder_channels"] = _DEPTH_DECODERS[arch][:kwargs["encoder_depth"]]
    try:
        return smp.create_model(arch, encoder_name=spec.encoder, encoder_weights=spec.encoder_weights,
                                in_channels=spec.in_channels, classes=spec.classes, **kwargs)
    except (OSError, ConnectionError) as err:  # the hub: offline, or not cached
        raise ModelError(
            f"encoder weights {spec.encoder_weights!r} for {spec.encoder} are not in the local cache and "
            "tilerseg does not download at run time: download them once with HF_HUB_OFFLINE=0 on a machine "
            "with internet (then copy ~/.cache/huggingface), pass trained --weights, or use "
            "--encoder-weights none") from err
    except KeyError as err:
        raise ModelError(f"encoder {spec.encoder!r} is not known to segmentation-models-pytorch: "
                         "see `python -c 'import segmentation_models_pytorch as s; print(s.encoders.get_encoder_names())'`") from err
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ModelError(f"cannot build {arch} with encoder {spec.encoder}: {err}") from err


def _build_extra(arch: str, spec: ModelSpec, kwargs: dict):
    """Build one of tilerseg's own architectures. Their encoders are fixed
    (``--encoder`` is ignored); pretrained weights come from a local file
    (``vgg_weights``), never from the network."""
    import importlib

    if spec.encoder_weights and arch == "transunet":
        raise ModelError(f"{arch}: pretrained encoder weights are not supported; train it, or pass --weights")
    if spec.encoder_weights and not kwargs.get("vgg_weights"):
        raise ModelError(f"{arch}: encoder weights {spec.encoder_weights!r} are not downloaded at run time; "
                         "pass the torchvision VGG file as vgg_weights=PATH (e.g. vgg11-8a719046.pth), "
                         "or trained --weights")
    module, func, _ = EXTRA[arch]
    builder = getattr(importlib.import_module(f"{__package__}.{module}"), func)
    try:
        return builder(classes=spec.classes, in_channels=spec.in_channels, **kwargs)
    except (TypeError, ValueError, OSError, RuntimeError) as err:
        raise ModelError(f"cannot build {arch}: {err}") from err
