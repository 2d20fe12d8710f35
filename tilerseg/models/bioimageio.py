"""bioimage.io model packages (a ``.zip``, a folder or an ``rdf.yaml``) as ``--weights``.

Read with ``bioimageio.spec`` (format 0.5, and 0.4 where it converts it),
never by hand: a package that fails validation is one line quoting its
first error. What the package declares becomes the same
:class:`~tilerseg.models.ModelInfo` as any model: bands and classes from
its channel axes, class names from the output's channel names, the pixel
size from the space axes' unit and scale, the halo from the output's
``halo``, the stride from the input's size step. Its weights (TorchScript,
else ONNX) run in :class:`PackageModel`, which applies the declared
preprocessing per window, exactly as the spec defines each operation, and
the postprocessing (``sigmoid``); ``binarize`` sets the threshold.

A per-sample statistic (``scale_range``'s percentiles,
``zero_mean_unit_variance`` without fixed values) over one window would
make the output depend on the tiling, so it is computed once over the
whole image (:func:`fix_statistics`, every n-th pixel of a large one)
before the windows run, and the operation then runs with those fixed
values; the tiling line says so.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile

import numpy as np
import torch

from ..errors import ModelError
from .registry import ModelSpec

log = logging.getLogger(__name__)

INSTALL = "pip install tilerseg[bioimageio]"
UM = {"micrometer": 1.0, "nanometer": 1e-3, "millimeter": 1e3, "angstrom": 1e-4, "meter": 1e6}
PER_SAMPLE = ("scale_range", "zero_mean_unit_variance")
SAMPLE_PIXELS = 4_000_000  # statistics from at most about this many pixels (every n-th row and column)


def _load(path: str):
    try:
        from bioimageio.spec import load_model_description
    except ImportError:
        raise ModelError(f"{path}: a bioimage.io package needs bioimageio.spec, which is not installed: "
                         f"{INSTALL}") from None
    try:
        return load_model_description(path)
    except ValueError as err:
        text = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        first = text[1] if len(text) > 1 else (text[0] if text else type(err).__name__)
        raise ModelError(f"{path}: not a valid bioimage.io model (bioimageio.spec: {first}); fix the rdf.yaml") \
            from None
    except Exception as err:  # a corrupt zip, an unreadable file
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise ModelError(f"{path}: cannot read the bioimage.io package ({type(err).__name__}: {text})") from None


def _frozen(v):
    if isinstance(v, (list, tuple)):
        return tuple(_frozen(x) for x in v)
    return v.item() if hasattr(v, "item") else v


def _ops(descrs) -> tuple:
    """``(id, ((key, value), ...))`` of each declared operation."""
    out = []
    for d in descrs:
        kw = getattr(d, "kwargs", None)
        items = kw.model_dump() if kw is not None else {}
        out.append((str(d.id), tuple(sorted((k, _frozen(v)) for k, v in items.items()))))
    return tuple(out)


def _weights(path: str, descr) -> tuple[str, str]:
    """``(kind, local file)`` of the package's weights: TorchScript, else ONNX,
    copied once into a cache folder named by content (a zip's members have
    no path of their own)."""
    from bioimageio.spec.utils import download

    w = descr.weights
    for kind, entry in (("torchscript", w.torchscript), ("onnx", w.onnx)):
        if entry is None:
            continue
        data = download(entry.source).read()
        digest = hashlib.sha256(data).hexdigest()[:16]
        folder = os.path.join(tempfile.gettempdir(), "tilerseg-bioimageio")
        os.makedirs(folder, exist_ok=True)
        local = os.path.join(folder, f"{digest}.{'pt' if kind == 'torchscript' else 'onnx'}")
        if not os.path.exists(local):
            with open(f"{local}.tmp", "wb") as f:
                f.write(data)
            os.replace(f"{local}.tmp", local)
        return kind, local
    have = ", ".join(k for k, v in w.model_dump().items() if v) or "none"
    raise ModelError(f"{path}: the package holds {have} weights; tilerseg runs its torchscript or onnx weights: "
                     "add one of them to the package")


def describe(path: str, spec: ModelSpec) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of a package."""
    d = _load(path)
    if len(d.inputs) != 1:
        raise ModelError(f"{path}: the model takes {len(d.inputs)} inputs; tilerseg feeds it one image")
    inp, out = d.inputs[0], d.outputs[0]
    ids = [str(a.id) for a in inp.axes]
    if [i for i in ids if i != "batch"] != ["channel", "y", "x"] or [str(a.id) for a in out.axes if str(a.id) !=
                                                                       "batch"] != ["channel", "y", "x"]:
        raise ModelError(f"{path}: axes {ids}: tilerseg runs 2-D models with (batch,) channel, y, x axes")
    ch_in = next(a for a in inp.axes if str(a.id) == "channel")
    ch_out = next(a for a in out.axes if str(a.id) == "channel")
    y = next(a for a in inp.axes if str(a.id) == "y")
    size = y.size
    fixed = size if isinstance(size, int) else None
    step = getattr(size, "step", None) or 1
    minimum = fixed or getattr(size, "min", None) or step
    halo = max(int(getattr(a, "halo", 0) or 0) for a in out.axes)
    unit = str(getattr(y, "unit", "") or "")
    mpp = float(y.scale) * UM[unit] if unit in UM else None
    kind, weights = _weights(path, d)
    post = _ops(out.postprocessing)
    threshold = next((dict(kw).get("threshold") for op, kw in post if op == "binarize"), None)
    settings = {"weights": weights, "runtime": kind, "min": int(minimum), "fixed": fixed is not None,
                "preprocessing": _ops(inp.preprocessing), "postprocessing": post, "name": str(d.name)}
    classes = len(ch_out.channel_names)
    names = tuple(str(n) for n in ch_out.channel_names)
    return dict(spec=ModelSpec(arch="bioimageio", encoder=os.path.basename(os.path.abspath(path)), classes=classes,
                               in_channels=len(ch_in.channel_names), kwargs=ModelSpec.freeze({**settings,
                                                                                              "stride": step})),
                normalization=((0.0,), (1.0,), 1.0), class_names=(("background",) + names if classes == 1 else names),
                mpp=mpp, tile=fixed, halo=halo, threshold=float(threshold) if threshold is not None else None)


def needs_statistics(info) -> bool:
    """Whether the package's preprocessing has a per-sample statistic."""
    return info.spec.arch in ("bioimageio", "monai") and any(op in PER_SAMPLE and _mode(kw) for op, kw in
                                                 dict(info.spec.kwargs)["preprocessing"])


def _mode(kw) -> bool:
    """A per-sample op (True), or one given fixed values (False)."""
    kw = dict(kw)
    return not (kw.get("mean") is not None and kw.get("std") is not None) and kw.get("reference_tensor") is None


def fix_statistics(info, reader) -> tuple:
    """``(info, note)``: ``info`` with every per-sample statistic of its
    preprocessing computed once over the whole image ``reader`` serves
    (every n-th row and column where it exceeds :data:`SAMPLE_PIXELS`),
    so that no window computes its own."""
    from dataclasses import replace

    H, W = reader.meta.shape
    n = max(1, math.ceil(math.sqrt(H * W / SAMPLE_PIXELS)))
    rows, strip = [], max(n, 1024 // n * n)  # strips of whole sampling periods: every n-th row overall
    for r0 in range(0, H, strip):
        block, _ = reader.read((r0, min(H, r0 + strip)), (0, W))
        rows.append(np.asarray(block[::n, ::n], np.float32))
    img = np.concatenate(rows)[None].transpose(0, 3, 1, 2)  # 1, C, h, w
    ops = []
    for op, kw in dict(info.spec.kwargs)["preprocessing"]:
        x = torch.from_numpy(img)  # the statistics of each op are of its own input, as the spec chains them
        if op in PER_SAMPLE and _mode(kw):
            kw = dict(kw)
            axes = tuple(kw.get("axes") or ("channel", "y", "x"))
            dims = tuple({"batch": 0, "channel": 1, "y": 2, "x": 3}[a] for a in axes)
            v = x.numpy().astype(np.float64)
            if op == "scale_range":
                lo = np.percentile(v, kw["min_percentile"], axis=dims, keepdims=True).ravel()
                hi = np.percentile(v, kw["max_percentile"], axis=dims, keepdims=True).ravel()
                fixed = {"lo": tuple(lo.tolist()), "hi": tuple(hi.tolist()), "eps": kw["eps"]}
            else:
                fixed = {"mean": tuple(v.mean(axis=dims).ravel().tolist()),
                         "std": tuple(v.std(axis=dims).ravel().tolist()), "eps": kw["eps"]}
            kw = tuple(sorted(fixed.items()))
            op = f"{op}:fixed"
        img = _apply(img, op, kw)
        ops.append((op, kw))
    settings = {**dict(info.spec.kwargs), "preprocessing": tuple(ops)}
    spec = replace(info.spec, kwargs=ModelSpec.freeze(settings))
    where = "every pixel" if n == 1 else f"every {n}th row and column"
    return replace(info, spec=spec), f"per-sample statistics computed once over the whole image ({where})"


def _apply(img: np.ndarray, op: str, kw) -> np.ndarray:
    """One op on a numpy image (for the statistics of the ops after it)."""
    with torch.no_grad():
        return PackageModel.step(torch.from_numpy(np.ascontiguousarray(img)), op, dict(kw)).numpy()


class PackageModel(torch.nn.Module):
    """The package's weights with its pre- and postprocessing around them:
    raw pixels ``(N, C, H, W)`` in, the package's output (probabilities
    after its ``sigmoid``) out."""

    spatial_dims = 2

    def __init__(self, info):
        super().__init__()
        s = dict(info.spec.kwargs)
        self.path, self.settings = info.weights, s
        self.output_stride = int(s["stride"])
        self.minimum = int(s["min"])
        self.input_size = (self.minimum,) * 2 if s["fixed"] else None
        if s["runtime"] == "torchscript":
            from .program import ProgramModel
            from .torchscript import load

            self.net = ProgramModel(s["weights"], load(s["weights"])[0], kind="bioimage.io torchscript",
                                    stride=self.output_stride, in_channels=info.spec.in_channels, inspect=False)
        else:
            from .onnx import OnnxModel

            self.net = OnnxModel(s["weights"], stride=self.output_stride)
            self.runs_outside_torch = True
        self.returns_probabilities = any(op in ("sigmoid", "softmax") for op, _ in s["postprocessing"])
        side = max(self.minimum, 2 * self.output_stride)
        self.global_parts = () if s["runtime"] != "torchscript" else __import__(
            "tilerseg.models.program", fromlist=["global_ops"]).global_ops(self.net.run_ops(side))

    def train(self, mode: bool = True):
        self.training = bool(mode)
        return self

    def forward(self, x):
        H, W = x.shape[-2:]
        if min(H, W) < self.minimum or (H - self.minimum) % self.output_stride:
            raise ModelError(f"{self.settings['name']}: the package takes windows of {self.minimum} px plus "
                             f"multiples of {self.output_stride}, got {H}x{W}; give such a --tile")
        for op, kw in self.settings["preprocessing"]:
            x = self.step(x, op, dict(kw))
        y = self.net(x)
        for op, kw in self.settings["postprocessing"]:
            if op != "binarize":  # the threshold: the run's labels, from the probabilities
                y = self.step(y, op, dict(kw))
        return y.float()

    @staticmethod
    def step(x, op: str, kw: dict):
        """One operation of the spec on ``x`` (N, C, H, W), with fixed values."""
        def per_channel(v):
            t = torch.as_tensor(np.asarray(v, np.float32), device=x.device)
            return t.view(1, -1, 1, 1) if t.dim() == 1 and t.numel() > 1 else t.reshape(())

        if op == "ensure_dtype":
            dt = np.dtype(kw["dtype"])
            return x if dt.kind == "f" else x.to(getattr(torch, dt.name)).float()
        if op == "scale_linear":
            return x * per_channel(kw.get("gain", 1.0)) + per_channel(kw.get("offset", 0.0))
        if op == "clip":
            return x.clamp(kw.get("min"), kw.get("max"))
        if op == "sigmoid":
            return torch.sigmoid(x)
        if op == "softmax":
            return torch.softmax(x, dim=1)
        if op == "fixed_zero_mean_unit_variance" or (op == "zero_mean_unit_variance" and not _mode(kw)):
            return (x - per_channel(kw["mean"])) / (per_channel(kw["std"]) + kw.get("eps", 1e-6))
        if op == "zero_mean_unit_variance:fixed":
            return (x - per_channel(kw["mean"])) / (per_channel(kw["std"]) + kw["eps"])
        if op == "scale_range:fixed":
            lo, hi = per_channel(kw["lo"]), per_channel(kw["hi"])
            return (x - lo) / (hi - lo + kw["eps"])
        if op in PER_SAMPLE:
            raise ModelError(f"{op}: a per-sample statistic must be computed over the whole image first "
                             "(tilerseg run does; tilerseg.segment on an array computes it over that array)")
        raise ModelError(f"bioimage.io operation {op!r} is not supported by tilerseg; supported: ensure_dtype, "
                         "scale_linear, clip, zero_mean_unit_variance, scale_range, sigmoid, binarize")


def build(info) -> PackageModel:
    return PackageModel(info).eval()
