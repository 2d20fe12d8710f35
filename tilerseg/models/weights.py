"""Loading weights: smp ``save_pretrained`` folders, bare state dicts
(``.safetensors``/``.pt``) and self-describing tilerseg checkpoints here;
ONNX files (:mod:`tilerseg.models.onnx`), TorchScript
(:mod:`tilerseg.models.torchscript`) and ``torch.export`` programs
(:mod:`tilerseg.models.exported`) and Hub repositories
(:mod:`tilerseg.models.hub`) in their own modules. Which one a path is,
is decided by its content (:func:`tilerseg.models.detect.detect`); after
:func:`describe`, nothing downstream knows the format."""
from __future__ import annotations

import functools
import json
import logging
import os
from dataclasses import dataclass, replace
from typing import Any

from ..errors import ModelError
from .detect import HUB_PREFIX, detect
from .registry import FILE_ARCHS, IO_ARGS, ModelSpec, build, canonical

log = logging.getLogger(__name__)
CHECKPOINT_KEY = "tilerseg_checkpoint"


# names the shipped model whatever the working folder holds; plain `demo` does unless a path `demo` exists
SHIPPED_DEMO = "tilerseg:demo"


def demo_weights() -> str:
    """The small nuclei model shipped in the package (``--weights demo``)."""
    from importlib import resources

    return str(resources.files("tilerseg") / "data" / "demo_unet.pt")


def resolve_weights(weights):
    """The file ``weights`` names: ``tilerseg:demo`` is the shipped model,
    and so is ``demo`` unless a path of that name exists here (a path that
    exists wins; errors about it then say how to name either)."""
    if weights is None:
        return None
    w = os.fspath(weights)
    return demo_weights() if w == SHIPPED_DEMO or (w == "demo" and not os.path.exists(w)) else weights


def _shadow_hint(weights) -> str:
    """For an error about weights given as ``demo`` that named a local path:
    that it is not the shipped model, and how to name either."""
    if weights is None or os.fspath(weights) != "demo" or not os.path.exists("demo"):
        return ""
    kind = "folder" if os.path.isdir("demo") else "file"
    return (f" (`demo` here is the {kind} {os.path.abspath('demo')}, not the shipped demo model: name the "
            f"shipped model --weights {SHIPPED_DEMO}, this {kind} --weights ./demo)")


@dataclass(frozen=True)
class Normalization:
    """``(pixel / scale - mean) / std`` per band; ``scale`` None means the
    dtype's maximum (255 for uint8, 65535 for uint16, 1 for floats)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None


def dtype_scale(dtype) -> float:
    """What ``Normalization.scale`` None means: the integer dtype's maximum
    (255 for uint8, 65535 for uint16), 1 for floats."""
    import numpy as np

    dt = np.dtype(dtype)
    return float(np.iinfo(dt).max) if dt.kind in "ui" else 1.0


@dataclass(frozen=True)
class ModelInfo:
    """A model's rebuildable description plus what a checkpoint tells about it."""

    spec: ModelSpec
    weights: str | None = None
    normalization: Normalization = Normalization()
    class_names: tuple[str, ...] = ()
    mpp: float | None = None
    tile: int | None = None
    halo: int | None = None
    threshold: float | None = None   # the binary threshold chosen on validation
    tta: str = "none"                # the test-time augmentation it was validated with
    mask_values: tuple[int, ...] | None = None  # how training read masks: the value of each class
    ignore_value: int | None = None             # and the value of unannotated pixels
    input_dtype: str | None = None              # the dtype of the images it was trained on (numpy name)
    input_range: tuple[float, float] | None = None  # and the value range its normalisation maps to 0..1
    # --instances options chosen on validation ((name, value) pairs, flag names): a run's defaults, flags override
    postprocess: tuple[tuple[str, Any], ...] = ()

    @property
    def postprocess_options(self) -> dict[str, Any]:
        """The recorded ``--instances`` options by flag name (``split_depth``...)."""
        return dict(self.postprocess)

    @property
    def trained(self) -> bool:
        return self.weights is not None

    def binary_threshold(self, given: float | None = None) -> float:
        """The threshold a run uses: ``given`` (a flag), else the recorded one, else 0.5."""
        if given is not None:
            return given
        return self.threshold if self.threshold is not None else 0.5


def is_onnx(weights: str | None, spec: ModelSpec | None = None) -> bool:
    """Whether ``weights`` is an ONNX file: named ``.onnx``, or any file
    given with ``--model onnx``."""
    if weights is None or os.path.isdir(weights):
        return False
    return os.fspath(weights).lower().endswith(".onnx") or (spec is not None and spec.arch.lower() == "onnx")


def describe(weights: str | None, spec: ModelSpec) -> ModelInfo:
    """Resolve the model config: from the weights where they carry it
    (smp folder, tilerseg checkpoint, ONNX file, a plain state dict's first
    and last layers), else from ``spec`` (the flags). ``in_channels`` or
    ``classes`` among ``spec.kwargs`` (``--model-arg``) must agree with the
    file; without weights they set the spec's. ``weights`` may name the
    shipped model (:func:`resolve_weights`)."""
    path = resolve_weights(weights)
    try:
        info = _describe(path, _lift_io_args(spec))
    except ModelError as err:
        raise ModelError(f"{err}{_shadow_hint(path)}") from err
    for key, value in _io_args(spec).items():
        if getattr(info.spec, key) != value:
            held = f"{info.spec.in_channels} input band(s) and {info.spec.classes} class(es)"
            raise ModelError(f"{weights}: --model-arg {key}={value} disagrees with the weights, which hold a model "
                             f"of {held}{_where(weights, info.spec)}: drop the --model-arg (the file decides)")
    return info


def _io_args(spec: ModelSpec) -> dict[str, int]:
    """``in_channels`` and ``classes`` given among ``spec.kwargs``, as ints."""
    out = {}
    for key, value in spec.kwargs:
        if key in IO_ARGS:
            try:
                out[key] = int(value)
            except (TypeError, ValueError):
                raise ModelError(f"--model-arg {key}={value!r}: give a whole number") from None
    return out


def _lift_io_args(spec: ModelSpec) -> ModelSpec:
    """``spec`` with ``--model-arg in_channels/classes`` moved into its fields."""
    given = _io_args(spec)
    rest = tuple((k, v) for k, v in spec.kwargs if k not in IO_ARGS)
    return replace(spec, kwargs=rest, **given) if given else spec


def _where(weights: str | None, spec: ModelSpec) -> str:
    """Which layers of a plain state dict said so (empty for other files)."""
    if weights is None or os.path.isdir(weights) or detect(weights) not in ("torch", "safetensors"):
        return ""
    ends = _io_layers(load_state(weights), spec)
    if ends is None:
        return ""
    (first, shape1, _), (last, shape2, _) = ends
    return f" (first layer {first} {shape1}, last layer {last} {shape2})"


def _describe(weights: str | None, spec: ModelSpec) -> ModelInfo:
    if weights is None:
        if canonical(spec.arch) == "onnx":
            raise ModelError("--model onnx runs an ONNX file: give it as --weights model.onnx")
        return ModelInfo(spec=spec)
    weights = os.fspath(weights)
    if weights.startswith(HUB_PREFIX):
        from .hub import resolve

        weights = resolve(weights)
    if not os.path.exists(weights):
        import difflib

        near = " (did you mean 'demo', the shipped model?)" if difflib.get_close_matches(weights, ["demo"]) else ""
        raise ModelError(f"{weights}: weights not found{near}; check the --weights path")
    fmt = "onnx" if is_onnx(weights, spec) else detect(weights)
    fmt = "monai_bundle" if fmt == "monai" else fmt
    if fmt in FILE_ARCHS or fmt == "monai_bundle":
        fields = _file_module(fmt).describe(weights, spec)
        mean, std, scale = fields.pop("normalization")
        return ModelInfo(weights=weights, normalization=Normalization(mean=mean, std=std, scale=scale), **fields)
    if fmt is None and weights.lower().endswith(".zip"):
        raise ModelError(f"{weights}: not a readable zip archive (corrupt or truncated?); give a bioimage.io "
                         "package .zip, its folder or its rdf.yaml")
    if os.path.isdir(weights):
        cfg_path = os.path.join(weights, "config.json")
        if not os.path.exists(cfg_path):
            raise ModelError(f"{weights}: a folder without config.json; expected one written by smp's save_pretrained")
        with open(cfg_path) as f:
            cfg = json.load(f)
        cls = cfg.pop("_model_class", None) or spec.arch
        known = {"encoder_name", "encoder_weights", "in_channels", "classes"}
        extra = {k: v for k, v in cfg.items() if k not in known and not k.startswith("_")}
        spec = ModelSpec(arch=canonical(cls), encoder=cfg.get("encoder_name", spec.encoder),
                         classes=int(cfg.get("classes", spec.classes)), in_channels=int(cfg.get("in_channels", 3)),
                         kwargs=ModelSpec.freeze(extra))
        return ModelInfo(spec=spec, weights=weights)
    state = load_file(weights)
    if isinstance(state, dict) and CHECKPOINT_KEY in state:
        m = state.get("model")
        missing = [k for k in ("arch", "encoder", "classes", "in_channels") if not isinstance(m, dict) or k not in m]
        if missing:
            raise ModelError(f"{weights}: a tilerseg checkpoint whose model record lacks {', '.join(missing)}; "
                             "it was not written by tilerseg train (or was edited): give the state dict alone "
                             "with --model/--encoder/--classes")
        n = state.get("normalization") or {}
        spec = ModelSpec(arch=canonical(m["arch"]), encoder=m["encoder"], classes=int(m["classes"]),
                         in_channels=int(m["in_channels"]), kwargs=ModelSpec.freeze(m.get("kwargs", {})))
        labels = state.get("labels") or {}
        norm = Normalization(mean=_tuple(n.get("mean")), std=_tuple(n.get("std")), scale=n.get("scale"))
        return ModelInfo(spec=spec, weights=weights, normalization=norm,
                         class_names=tuple(state.get("class_names") or ()), mpp=state.get("mpp"),
                         tile=state.get("tile"), halo=state.get("halo"), threshold=state.get("threshold"),
                         tta=state.get("tta") or "none", mask_values=_ints(labels.get("values")),
                         ignore_value=labels.get("ignore"), input_dtype=(state.get("input") or {}).get("dtype"),
                         input_range=_tuple((state.get("input") or {}).get("range")),
                         postprocess=postprocess_record(state.get("postprocess"), weights))
    io = _io_channels(_state_dict(state, weights), spec)
    if io is not None:
        spec = replace(spec, in_channels=io[0], classes=io[1])
    return ModelInfo(spec=spec, weights=weights)


def instantiate(info: ModelInfo):
    """Build the module of ``info`` and load its weights, in eval mode (an
    ONNX file: the module that runs its graph)."""
    if info.spec.arch in FILE_ARCHS:
        return _file_module(info.spec.arch).build(info)
    spec = info.spec if info.weights is None else replace(info.spec, encoder_weights=None)
    model = build(spec)
    try:
        _load_weights(model, info)
    except ModelError as err:
        raise ModelError(f"{err}{_shadow_hint(info.weights)}") from err
    return model.eval()


def _file_module(fmt: str):
    """The module of a format that is its own architecture (FILE_ARCHS):
    each has ``describe(path, spec)`` and ``build(info)``."""
    import importlib

    return importlib.import_module(f".{'monai_bundle' if fmt == 'monai' else fmt}", __package__)


def _load_weights(model, info: ModelInfo) -> None:
    """Load ``info.weights`` into ``model``, strictly; a mismatch names its first layer."""
    if info.weights is None:
        return
    path, spec = info.weights, info.spec
    if os.path.isdir(path):
        st = os.path.join(path, "model.safetensors")
        state = load_file(st if os.path.exists(st) else os.path.join(path, "pytorch_model.bin"))
    else:
        state = load_file(path)
    state = _state_dict(state, path)
    mismatch = _first_mismatch(model.state_dict(), state)
    if mismatch:
        raise ModelError(f"{path}: weights do not fit {spec.arch}/{spec.encoder} with {spec.classes} "
                         f"class(es): {mismatch}; pass the --model/--encoder/--classes/--model-arg "
                         "they were trained with")
    model.load_state_dict(state, strict=True)


def save_checkpoint(path: str, model, info: ModelInfo, **extra: Any) -> None:
    """Write a self-describing checkpoint that ``tilerseg run --weights``
    loads with no other model flag. ``extra`` entries (training state,
    metrics) are stored beside it; the file is written under a temporary
    name and renamed, so a crash never leaves a truncated checkpoint."""
    import torch

    s, n = info.spec, info.normalization
    torch.save({
        CHECKPOINT_KEY: 1,
        "model": {"arch": s.arch, "encoder": s.encoder, "classes": s.classes, "in_channels": s.in_channels,
                  "kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in s.kwargs}},
        "normalization": {"mean": list(n.mean) if n.mean else None, "std": list(n.std) if n.std else None,
                          "scale": n.scale},
        "class_names": list(info.class_names), "mpp": info.mpp, "tile": info.tile, "halo": info.halo,
        "threshold": float(info.threshold) if info.threshold is not None else None, "tta": info.tta,
        "labels": {"values": list(info.mask_values) if info.mask_values is not None else None,
                   "ignore": info.ignore_value},
        "input": {"dtype": info.input_dtype, "range": list(info.input_range) if info.input_range else None},
        "postprocess": dict(info.postprocess) or None,
        "state_dict": model.state_dict(), **extra,
    }, tmp := f"{path}.tmp")
    os.replace(tmp, path)


def postprocess_record(raw, where: str = "") -> tuple[tuple[str, Any], ...]:
    """The checked ``(name, value)`` pairs of a checkpoint's (or a training
    config's) ``postprocess`` record: the ``--instances`` options of
    :data:`tilerseg.config.CHECKPOINT_POSTPROCESS`, valid as flags are."""
    from ..config import CHECKPOINT_POSTPROCESS, RunConfig
    from ..errors import InputError

    if not raw:
        return ()
    if not isinstance(raw, dict):
        raise ModelError(f"{where}: postprocess must be a mapping of --instances options, got {raw!r}")
    out = {str(k).replace("-", "_"): v for k, v in raw.items() if v is not None}
    unknown = sorted(set(out) - set(CHECKPOINT_POSTPROCESS))
    if unknown:
        raise ModelError(f"{where}: postprocess {', '.join(unknown)}: not an option a checkpoint records; use "
                         f"{', '.join(CHECKPOINT_POSTPROCESS)}")
    try:
        RunConfig.from_options(instances=True, **out)
    except InputError as err:
        raise ModelError(f"{where}: postprocess: {err}") from None
    return tuple(sorted(out.items()))


def record_postprocess(path: str, options: dict) -> None:
    """Write ``options`` (flag names) as the ``--instances`` defaults of
    the checkpoint at ``path`` (``scripts/tune_em_instances.py --write``),
    under a temporary name and renamed, as :func:`save_checkpoint` does."""
    import torch

    state = load_file(path)
    if not (isinstance(state, dict) and CHECKPOINT_KEY in state):
        raise ModelError(f"{path}: not a tilerseg checkpoint; only those record --instances options")
    state["postprocess"] = dict(postprocess_record(options, path)) or None
    torch.save(state, tmp := f"{path}.tmp")
    os.replace(tmp, path)


def load_state(path: str) -> dict:
    """The state dict in a weights file (a checkpoint's, or a bare one)."""
    return _state_dict(load_file(path), path)


def load_file(path: str) -> Any:
    """The file's contents, read once per process while it is unchanged:
    describing a checkpoint and building its model share one read."""
    try:
        st = os.stat(path)
    except OSError:
        return _read_file(path)
    return _cached_file(path, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=2)
def _cached_file(path: str, size: int, mtime: int) -> Any:
    return _read_file(path)


def _read_file(path: str) -> Any:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            return load_file(path)
        import torch
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelError(f"{path}: cannot read weights ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
                         "expected a .safetensors/.pt state dict, a tilerseg checkpoint or an smp save_pretrained folder") from err


def _state_dict(state: Any, path: str) -> dict:
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not state:
        raise ModelError(f"{path}: holds no state dict")
    for prefix in ("module.", "model."):
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _first_mismatch(expected: dict, given: dict) -> str | None:
    """The first difference between the model's state dict and the file's,
    in words: a layer with another shape, or layers missing or unexpected."""
    for key, value in expected.items():
        if key in given and tuple(given[key].shape) != tuple(value.shape):
            return (f"layer {key} has shape {tuple(given[key].shape)} in the file but "
                    f"{tuple(value.shape)} in the model")
    missing = [k for k in expected if k not in given]
    extra = [k for k in given if k not in expected]
    if missing or extra:
        parts = ([f"{len(missing)} layer(s) missing from the file (first: {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} unexpected in it (first: {extra[0]})"] if extra else [])
        return ", ".join(parts)
    return None


def _io_layers(state: dict, spec: ModelSpec):
    """The first and last convolutions of ``spec``'s architecture, as
    ``(key, shape in the file, transposed)``, or None where the file lacks
    them. The layers are found on the module built on the meta device (no
    memory, no initialisation), in module order: a file's key order says
    nothing (safetensors sorts its keys)."""
    import torch
    import torch.nn as nn

    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
    with torch.device("meta"):
        model = build(replace(spec, encoder_weights=None))
    convs = [(name, m) for name, m in model.named_modules() if isinstance(m, kinds)]
    if not convs:
        return None
    ends = [(f"{name}.weight", m) for name, m in (convs[0], convs[-1])]
    if any(key not in state or getattr(state[key], "ndim", 0) != m.weight.ndim for key, m in ends):
        return None
    return tuple((key, tuple(state[key].shape), bool(m.transposed)) for key, m in ends)


def _io_channels(state: dict, spec: ModelSpec) -> tuple[int, int] | None:
    """Input bands and classes of a plain state dict: its first and last
    convolutions' weights (out x in, or in x out for a transposed one)."""
    ends = _io_layers(state, spec)
    if ends is None:
        return None
    (_, first, t1), (_, last, t2) = ends
    return int(first[0] if t1 else first[1]), int(last[1] if t2 else last[0])


def _ints(v):
    return tuple(int(x) for x in v) if v is not None else None


def _tuple(v):
    return tuple(float(x) for x in v) if v is not None else None
