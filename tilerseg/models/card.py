"""``tilerseg models --describe WEIGHTS``: what a weights file or repository is.

One record per model, whatever its format, read through the same
:func:`~tilerseg.models.describe` and :func:`~tilerseg.models.instantiate`
a run uses, so what it says is what a run does: the format (by content),
the architecture, bands, classes and their names, pixel size, the halo
(declared, or the receptive field measured as a run measures it), the
preprocessing, whether tiling is seam-exact, and a ``postprocess`` mapping
where the model declares one.
"""
from __future__ import annotations

import os

from .detect import HUB_PREFIX, detect
from .registry import FILE_ARCHS, ModelSpec, arch, global_context
from .weights import CHECKPOINT_KEY, load_file, describe, instantiate, resolve_weights

FORMAT_NAMES = {"bioimageio": "bioimage.io package", "monai": "MONAI bundle", "torch": "torch.save state dict",
                "safetensors": "safetensors state dict", "smp": "smp save_pretrained folder", "onnx": "ONNX", "torchscript": "TorchScript program",
                "exported": "torch.export program"}


def card(weights: str, spec: ModelSpec | None = None) -> list[tuple[str, str]]:
    """``(field, text)`` rows describing ``weights`` (a path or ``hf://``)."""
    from ..infer import output_stride
    from ..tiling import receptive_radius

    spec = spec or ModelSpec()
    info = describe(weights, spec)
    path = resolve_weights(weights)
    fmt = detect(info.weights) if info.spec.arch not in FILE_ARCHS else info.spec.arch
    fmt = FORMAT_NAMES.get(fmt or "torch", fmt)
    if fmt == FORMAT_NAMES["torch"] and CHECKPOINT_KEY in (load_file(info.weights) or {}):
        fmt = "tilerseg checkpoint"
    if os.fspath(path).startswith(HUB_PREFIX):
        fmt = f"{fmt} (from {path}: {info.weights})"
    s = info.spec
    model = instantiate(info)
    stride = output_stride(model)
    parts = global_context(model)
    if info.halo is not None:
        halo = f"{info.halo} px (declared by the weights)"
    elif parts:
        halo = "not measured: a model with global context has no finite receptive field"
    else:
        _, halo = receptive_radius(model, s.in_channels, stride, arch(s.arch).dims)
    names = ", ".join(info.class_names) if info.class_names else "names not declared"
    rows = [("format", fmt),
            ("architecture", f"{s.arch}/{s.encoder}" if arch(s.arch).smp else
             "in the file" if s.arch in FILE_ARCHS else s.arch),
            ("bands", str(s.in_channels)),
            ("classes", f"{s.classes} ({names})"),
            ("pixel size", f"{info.mpp:g} µm/px" if info.mpp else "not declared (not checked against images)"),
            ("halo", halo),
            ("output stride", str(stride)),
            ("preprocessing", _preprocessing(info)),
            ("seam-exact", "no: " + ", ".join(parts[:4]) + " (gaussian merge)" if parts else "yes (crop merge)")]
    post = getattr(info, "postprocess", None)
    if post:
        rows.append(("postprocess", ", ".join(f"{k}={v}" for k, v in dict(post).items())))
    return rows


def _preprocessing(info) -> str:
    if info.spec.arch == "bioimageio":  # the package's own operations, run per window on raw pixels
        ops = dict(info.spec.kwargs)["preprocessing"]
        said = ", ".join(op + ("(per-sample: computed once over the whole image)" if op in
                               ("scale_range", "zero_mean_unit_variance") and dict(kw).get("mean") is None else "")
                         for op, kw in ops if op != "ensure_dtype")
        return said or "none"
    n = info.normalization
    scale = f"pixels / {n.scale:g}" if n.scale else "pixels / the dtype's maximum"
    mean = ", ".join(f"{v:g}" for v in n.mean) if n.mean else "ImageNet's"
    std = ", ".join(f"{v:g}" for v in n.std) if n.std else "ImageNet's"
    dtype = f"; trained on {info.input_dtype}" if info.input_dtype else ""
    return f"({scale} - mean {mean}) / std {std}{dtype}"
