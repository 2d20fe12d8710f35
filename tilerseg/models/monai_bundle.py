"""MONAI bundles (``configs/metadata.json``, ``configs/inference.json``,
``models/model.ts``) as ``--weights``.

Only what the JSON declares is read, and no bundle code runs: bands,
classes and class names from ``network_data_format``; the intensity
preprocessing and the activation from ``inference.json``'s transforms,
mapped onto the operations :class:`~tilerseg.models.bioimageio.PackageModel`
applies per window (``ScaleIntensityRanged`` is a linear map and a clip,
``NormalizeIntensityd`` a zero-mean-unit-variance, fixed where it gives
``subtrahend``/``divisor``, else computed once over the whole image); the
network is the bundle's TorchScript ``models/model.ts``. A bundle with only
``model.pt`` would need its ``network_def`` built by MONAI: refused in one
line. The output stride is not declared in a bundle: 32 unless
``--model-arg stride=N``.
"""
from __future__ import annotations

import json
import os

from ..errors import ModelError
from .registry import ModelSpec

IGNORED = {"LoadImaged", "LoadImage", "EnsureChannelFirstd", "EnsureChannelFirst", "AsChannelFirstd", "EnsureTyped",
           "EnsureType", "ToTensord", "ToTensor", "CastToTyped", "CastToType", "Compose", "SqueezeDimd",
           "CopyItemsd", "Invertd", "SaveImaged", "SaveImage", "ToDeviced"}


def _json(path: str, name: str) -> dict:
    file = os.path.join(path, "configs", name)
    try:
        with open(file) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}
    except ValueError as err:
        raise ModelError(f"{file}: not JSON ({err}); fix the bundle") from None


def _transforms(cfg: dict, key: str) -> list[dict]:
    node = cfg.get(key) or {}
    items = node.get("transforms", []) if isinstance(node, dict) else node
    return [t for t in items if isinstance(t, dict)]


def _name(t: dict) -> str:
    return str(t.get("_target_", "")).rsplit(".", 1)[-1].lstrip("$@")


def preprocessing(path: str, cfg: dict) -> tuple:
    """The bundle's intensity transforms as PackageModel operations."""
    ops = []
    for t in _transforms(cfg, "preprocessing"):
        name = _name(t)
        if name in IGNORED:
            continue
        if name in ("ScaleIntensityRanged", "ScaleIntensityRange"):
            a0, a1, b0, b1 = (float(t.get(k, d)) for k, d in (("a_min", 0), ("a_max", 1), ("b_min", 0), ("b_max", 1)))
            gain = (b1 - b0) / (a1 - a0)
            ops.append(("scale_linear", (("gain", gain), ("offset", b0 - a0 * gain))))
            if t.get("clip"):
                ops.append(("clip", (("max", max(b0, b1)), ("min", min(b0, b1)))))
        elif name in ("NormalizeIntensityd", "NormalizeIntensity"):
            sub, div = t.get("subtrahend"), t.get("divisor")
            axes = ("y", "x") if t.get("channel_wise") else ("channel", "y", "x")
            if sub is not None and div is not None:
                fixed = (("eps", 0.0), ("mean", _tuple(sub)), ("std", _tuple(div)))
                ops.append(("fixed_zero_mean_unit_variance", fixed))
            else:
                ops.append(("zero_mean_unit_variance", (("axes", axes), ("eps", 1e-8))))
        else:
            raise ModelError(f"{path}: its preprocessing transform {name} is not one tilerseg maps (it reads "
                             "ScaleIntensityRanged and NormalizeIntensityd, and skips loading and typing ones); "
                             "give the bundle's model.ts as --weights with --mean/--std/--scale")
    return tuple(ops)


def _tuple(v):
    return tuple(float(x) for x in v) if isinstance(v, (list, tuple)) else float(v)


def postprocessing(cfg: dict) -> tuple[tuple, float | None]:
    """``(operations, threshold)`` from the bundle's Activations/AsDiscrete."""
    ops, threshold = [], None
    for t in _transforms(cfg, "postprocessing"):
        name = _name(t)
        if name.startswith("Activations"):
            ops += [("sigmoid", ())] if t.get("sigmoid") else [("softmax", ())] if t.get("softmax") else []
        elif name.startswith("AsDiscrete") and t.get("threshold") is not None:
            threshold = float(t["threshold"])
    return tuple(ops), threshold


def describe(path: str, spec: ModelSpec) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of a bundle folder."""
    meta, cfg = _json(path, "metadata.json"), _json(path, "inference.json")
    fmt = meta.get("network_data_format") or {}
    inp = next(iter((fmt.get("inputs") or {}).values()), {})
    out = next(iter((fmt.get("outputs") or {}).values()), {})
    ts = os.path.join(path, "models", "model.ts")
    if not os.path.exists(ts):
        net = (cfg.get("network_def") or {}).get("_target_", "not declared")
        raise ModelError(f"{path}: the bundle has no models/model.ts, and its network ({net}) cannot be built "
                         "without running MONAI's bundle code; export it once with `python -m monai.bundle "
                         "ckpt_export` and give the bundle again")
    from .torchscript import load

    module, _ = load(ts)
    from .program import first_channels

    bands = int(inp.get("num_channels") or first_channels(module) or 3)
    classes = int(out.get("num_channels") or 1)
    names = tuple(str(v) for _, v in sorted((out.get("channel_def") or {}).items(), key=lambda kv: int(kv[0])))
    post, threshold = postprocessing(cfg)
    stride = int(dict(spec.kwargs).get("stride", 32))
    settings = {"weights": ts, "runtime": "torchscript", "min": stride, "fixed": False,
                "preprocessing": preprocessing(path, cfg), "postprocessing": post,
                "name": str(meta.get("name") or os.path.basename(os.path.abspath(path))), "stride": stride}
    if classes == 1 and len(names) == 1:
        names = ("background",) + names
    return dict(spec=ModelSpec(arch="monai", encoder=settings["name"], classes=classes, in_channels=bands,
                               kwargs=ModelSpec.freeze(settings)),
                normalization=((0.0,), (1.0,), 1.0), class_names=names if len(names) == max(2, classes) else (),
                threshold=threshold)


def build(info):
    from .bioimageio import PackageModel

    return PackageModel(info).eval()
