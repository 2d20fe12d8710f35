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


@dataclass(frozen=True)
class Arch:
    """One architecture: where its builder lives, what else it is called,
    whether it is local (no global pooling or attention, so overlap-tile is
    seam-exact; else ``why`` not), and its spatial dimensions."""

    name: str
    cls: str
    builder: str                      # "smp" or "tilerseg.models.<module>:<function>"
    aliases: tuple[str, ...] = ()
    local: bool = True
    why: str = ""
    dims: int = 2

    @property
    def smp(self) -> bool:
        return self.builder == "smp"


def _smp(name, cls, why="", aliases=()):
    return Arch(name, cls, "smp", tuple(aliases), not why, why)


def _own(name, cls, target, why="", dims=2):
    return Arch(name, cls, target, (), not why, why, dims)


# The one table of architectures: the registry, `tilerseg models`, the
# tiling resolver and the receptive-field code all read it. smp's rows are
# listed here rather than read from smp so that naming a model needs no
# torch import; a test checks them against smp's own mapping.
ARCHITECTURES: dict[str, Arch] = {a.name: a for a in (
    _smp("unet", "Unet"),
    _smp("unetplusplus", "UnetPlusPlus", aliases=("unetpp", "unet++")),
    _smp("manet", "MAnet", "attention blocks with global pooling"),
    _smp("linknet", "Linknet"),
    _smp("fpn", "FPN", "align_corners=True upsampling in its head (depends on the window size)"),
    _smp("pspnet", "PSPNet", "pyramid pooling"),
    _smp("deeplabv3", "DeepLabV3", "ASPP image pooling"),
    _smp("deeplabv3plus", "DeepLabV3Plus", "ASPP image pooling", aliases=("deeplab",)),
    _smp("pan", "PAN", "global pooling in its pyramid attention"),
    _smp("upernet", "UPerNet", "pyramid pooling"),
    _smp("segformer", "Segformer", "self-attention in its MiT encoders"),
    _smp("dpt", "DPT", "a vision transformer"),
    _own("ternausnet11", "TernausNet", "ternausnet:ternausnet11"),
    _own("ternausnet16", "TernausNet", "ternausnet:ternausnet16"),
    _own("transunet", "TransUNet", "transunet:transunet", "a vision transformer on the 1/16 feature map"),
    _own("unet2d", "UNet", "unet:unet2d"),
    _own("unet3d", "UNet", "unet:unet3d", dims=3),
    # an ONNX file given as --weights: its graph is the architecture (built from the file, never here)
    _own("onnx", "OnnxModel", "onnx:not_buildable"),
    # a TorchScript or torch.export program given as --weights: likewise its own architecture
    _own("torchscript", "ProgramModel", "program:not_buildable"),
    _own("exported", "ProgramModel", "program:not_buildable"),
    _own("bioimageio", "PackageModel", "program:not_buildable"),
    _own("monai", "PackageModel", "program:not_buildable"),
)}
# the architectures that are a file given as --weights, never built here
FILE_ARCHS = ("onnx", "torchscript", "exported", "bioimageio", "monai")
ALIASES = {alias: a.name for a in ARCHITECTURES.values() for alias in a.aliases}

# the builder arguments a spec holds as fields (weights decide them: models.weights.describe)
IO_ARGS = ("in_channels", "classes")

_DEPTH_DECODERS = {"unet": (256, 128, 64, 32, 16), "unetplusplus": (256, 128, 64, 32, 16),
                   "manet": (256, 128, 64, 32, 16)}


def architectures() -> dict[str, str]:
    """Registry names -> class names."""
    return {name: a.cls for name, a in ARCHITECTURES.items()}


def arch(name: str) -> Arch:
    """The table row of ``name`` (aliases and case resolved); an unknown
    name lists the valid ones and suggests the nearest."""
    import difflib

    key = ALIASES.get(name.lower(), name.lower())
    if key not in ARCHITECTURES:
        names = sorted(ARCHITECTURES) + sorted(ALIASES)
        near = difflib.get_close_matches(key, names, n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ModelError(f"unknown model {name!r}: {hint}choose one of {', '.join(names)} (see `tilerseg models`)")
    return ARCHITECTURES[key]


def canonical(name: str) -> str:
    """Resolve aliases and case; an unknown name lists the valid ones."""
    return arch(name).name


def is_volumetric(name: str) -> bool:
    return arch(name).dims == 3


def is_local(name: str) -> bool:
    return arch(name).local


_GLOBAL_NAME = re.compile(r"Squeeze|Excit|^SE[A-Z_]|^SE$|SCSE|Attention|Attn|PyramidPool|^PSP|ASPPPool")


def global_context(model) -> list[str]:
    """Names of the module types in ``model`` that see the whole input
    (global pooling, squeeze-excitation, attention) or resample by a
    size-dependent rule (``align_corners=True``): any of them makes the
    tiled output differ from whole-image inference. Checked on the built
    module, so encoders with SE blocks (EfficientNet, SE-ResNet...) and
    ``decoder_attention_type="scse"`` are caught too; wrappers holding only
    ``nn.Identity`` (smp's disabled attention) are not. A module that runs
    an ONNX graph lists the graph's operators in ``global_parts``."""
    import torch.nn as nn

    found = set(getattr(model, "global_parts", ()))  # a model that runs outside torch names them itself
    for m in model.modules():
        name = type(m).__name__
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MultiheadAttention)):
            found.add(name)
        elif isinstance(m, nn.Upsample) and m.align_corners:  # resampling that depends on the input size
            found.add(f"{name}(align_corners=True)")
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

    row = arch(spec.arch)
    arch_name, kwargs = row.name, dict(spec.kwargs)
    for key in IO_ARGS:  # also given as a --model-arg (or a train config's model_args): it must agree
        if key in kwargs and str(kwargs.pop(key)) != str(getattr(spec, key)):
            raise ModelError(f"model argument {key}={dict(spec.kwargs)[key]} disagrees with the model's "
                             f"{getattr(spec, key)} ({'the input bands' if key == 'in_channels' else 'classes'}): "
                             "drop it")
    if not row.smp:
        return _build_extra(row, spec, kwargs)
    if "encoder_depth" in kwargs and "decoder_channels" not in kwargs and arch_name in _DEPTH_DECODERS:
        # smp wants one decoder width per level: keep its defaults' first ones
        kwargs["decoder_channels"] = _DEPTH_DECODERS[arch_name][:kwargs["encoder_depth"]]
    try:
        return smp.create_model(arch_name, encoder_name=spec.encoder, encoder_weights=spec.encoder_weights,
                                in_channels=spec.in_channels, classes=spec.classes, **kwargs)
    except (OSError, ConnectionError) as err:  # the hub: offline, or not cached
        raise ModelError(
            f"encoder weights {spec.encoder_weights!r} for {spec.encoder} are not in the local cache and "
            "tilerseg does not download at run time: download them once with HF_HUB_OFFLINE=0 on a machine "
            "with internet (then copy ~/.cache/huggingface), pass trained --weights, or use "
            "--encoder-weights none") from err
    except KeyError as err:
        import difflib

        near = difflib.get_close_matches(spec.encoder, smp.encoders.get_encoder_names(), n=1)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ModelError(f"encoder {spec.encoder!r} is not known to segmentation-models-pytorch: {hint}"
                         "see `python -c 'import segmentation_models_pytorch as s; print(s.encoders.get_encoder_names())'`") from err
    except (TypeError, ValueError, AssertionError, RuntimeError) as err:
        raise ModelError(f"cannot build {arch_name} with encoder {spec.encoder}: {err}") from err


def _build_extra(row: Arch, spec: ModelSpec, kwargs: dict):
    """Build one of tilerseg's own architectures. Their encoders are fixed
    (``--encoder`` is ignored); pretrained weights come from a local file
    (``vgg_weights``), never from the network."""
    import importlib

    arch = row.name
    if spec.encoder_weights and arch == "transunet":
        raise ModelError(f"{arch}: pretrained encoder weights are not supported; train it, or pass --weights")
    if spec.encoder_weights and not kwargs.get("vgg_weights"):
        raise ModelError(f"{arch}: encoder weights {spec.encoder_weights!r} are not downloaded at run time; "
                         "pass the torchvision VGG file as vgg_weights=PATH (e.g. vgg11-8a719046.pth), "
                         "or trained --weights")
    module, func = row.builder.split(":")
    builder = getattr(importlib.import_module(f"{__package__}.{module}"), func)
    try:
        return builder(classes=spec.classes, in_channels=spec.in_channels, **kwargs)
    except (TypeError, ValueError, OSError, RuntimeError) as err:
        raise ModelError(f"cannot build {arch}: {err}") from err
