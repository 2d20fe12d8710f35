"""A compiled torch program (TorchScript or ``torch.export``) as a model.

Both formats hold a graph of aten operators and its weights, no Python
class to rebuild: :class:`ProgramModel` wraps the loaded program as a torch
module, so the predictor, the receptive-field measurement (input gradients
flow through both), the tiling decision and the writer are the ones every
model goes through. What the program cannot say about itself (its
normalisation, class names, stride) comes from a ``tilerseg.json`` extra
file inside it, with the keys an ONNX file's metadata takes
(:mod:`tilerseg.models.onnx`), or from ``--model-arg``.

Whether tiled output can equal whole-image inference is read from the
operators (:func:`global_ops`): global pooling, attention, reductions over
height or width and ``align_corners`` resampling make a program non-local,
and the run then uses the gaussian merge and says why.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from typing import Callable

import torch

from ..errors import ModelError
from .batches import in_fixed_batches
from .registry import ModelSpec

log = logging.getLogger(__name__)

META_FILE = "tilerseg.json"
SETTINGS = ("output", "stride")
DEFAULT_STRIDE = 32
GLOBAL = ("adaptive_avg_pool", "adaptive_max_pool", "scaled_dot_product", "multi_head_attention",
          "native_multi_head_attention")
REDUCE = ("mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "logsumexp")
UPSAMPLE = ("upsample_bilinear2d", "upsample_bicubic2d", "upsample_linear1d", "upsample_trilinear3d")


def global_ops(ops) -> tuple[str, ...]:
    """Which of ``ops`` (``(name, args)`` with ``name`` an aten operator
    without namespace, overload or leading underscore, ``args`` its
    arguments, tensors as ``"tensor"``; see :meth:`ProgramModel.run_ops`)
    see the whole input or resample by a size-dependent rule. A reduction
    counts when it reduces over height or width (axes 2, 3, -1, -2) or over
    everything; ``max``/``min`` of two tensors is elementwise, not one."""
    found, softmax, matmul = set(), False, False
    for name, args in ops:
        if any(name.startswith(g) for g in GLOBAL):
            found.add(name)
        elif name in REDUCE and not (len(args) > 1 and args[1] == "tensor"):
            dims = args[1] if len(args) > 1 else None
            dims = [dims] if isinstance(dims, int) else dims
            if dims is None or not list(dims) or {2, 3, -1, -2} & set(dims):
                found.add(name)
        elif name in UPSAMPLE and True in args[2:3]:
            found.add(f"{name}(align_corners)")
        softmax |= name == "softmax"
        matmul |= name in ("matmul", "bmm", "baddbmm")
    if softmax and matmul:
        found.add("softmax->matmul (attention)")
    return tuple(sorted(found))


def settings(path: str, meta: dict, flags: dict) -> dict:
    """``output`` and ``stride``: ``--model-arg`` over the program's
    ``tilerseg.json``; each bad value one line naming where it came from."""
    unknown = sorted(set(flags) - set(SETTINGS))
    if unknown:
        raise ModelError(f"--model-arg {unknown[0]}: a TorchScript or exported program takes "
                         f"{', '.join(f'{k}=...' for k in SETTINGS)} (its architecture is in the file)")
    output = str(flags.get("output", meta.get("output", "logits"))).lower()
    if output not in ("logits", "probabilities"):
        raise ModelError(f"{path}: output {output!r}: use logits or probabilities ({META_FILE} or --model-arg output=)")
    stride = flags.get("stride", meta.get("stride", DEFAULT_STRIDE))
    try:
        stride = int(stride)
        if stride < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ModelError(f"{path}: stride {stride!r}: give a positive whole number ({META_FILE} or "
                         "--model-arg stride=)") from None
    return {"output": output, "stride": stride}


def load_program(path: str, read: Callable, what: str, writer: str):
    """``(read(abspath, extra_files), metadata)`` of a program file, read
    once per process while the file is unchanged (its size and mtime key
    the cache). A file ``read`` cannot load is one line: not a loadable
    ``what``, give a file written by ``writer``."""
    st = os.stat(path)
    return _load(os.path.abspath(path), st.st_size, st.st_mtime_ns, path, read, what, writer)


@functools.lru_cache(maxsize=4)
def _load(abspath: str, size: int, mtime: int, shown: str, read: Callable, what: str, writer: str):
    extra = {META_FILE: ""}
    try:
        loaded = read(abspath, extra)
    except Exception as err:
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise ModelError(f"{shown}: not a loadable {what} ({type(err).__name__}: {text}); give a file written by "
                         f"{writer}") from None
    return loaded, read_meta(shown, extra[META_FILE])


def read_meta(path: str, text: str | bytes | None) -> dict:
    """The program's ``tilerseg.json`` as a dict (empty when absent)."""
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except ValueError as err:
        raise ModelError(f"{path}: its {META_FILE} is not JSON ({err}); fix it or save the program without it") \
            from None
    if not isinstance(meta, dict):
        raise ModelError(f"{path}: its {META_FILE} is not a JSON object; fix it or save the program without it")
    return meta


def first_channels(module) -> int | None:
    """Input bands: the second axis of the program's first 4-D weight (a
    convolution's ``out x in x kh x kw``), in parameter order, which is the
    module order a program keeps."""
    for p in module.parameters():
        if p.dim() == 4:
            return int(p.shape[1])
    return None


def describe_program(path: str, module, spec: ModelSpec, *, kind: str, meta: dict, input_shape=None) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of a loaded program
    (``normalization`` as ``(mean, std, scale)``): bands from its first
    convolution or its input shape, classes from one forward pass on a
    zero window, the rest from ``meta`` (see :mod:`tilerseg.models.onnx`
    for the keys)."""
    from .onnx import GraphMeta

    s = settings(path, meta, dict(spec.kwargs))
    raw = {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}
    m = GraphMeta.__new__(GraphMeta)
    m.path, m.raw = path, raw
    channels = (input_shape[1] if input_shape and input_shape[1] else None) or first_channels(module) \
        or spec.in_channels
    model = ProgramModel(path, module, kind=kind, input_shape=input_shape, in_channels=channels, inspect=False, **s)
    side = (model.input_size or (2 * s["stride"],))[0]
    with torch.no_grad():
        classes = int(model(torch.zeros(1, channels, side, side)).shape[1])
    names = m.get("class_names", "names")
    if names is not None and classes == 1 and len(names) == 1:
        names = ("background", names[0])
    if names is not None and len(names) != (2 if classes == 1 else classes):
        raise ModelError(f"{path}: its {META_FILE} class_names has {len(names)} name(s) for {classes} output "
                         "channel(s); give one per channel (a one-channel model: background and foreground)")
    import os

    return dict(spec=ModelSpec(arch=kind, encoder=os.path.basename(path), classes=classes, in_channels=channels,
                               kwargs=ModelSpec.freeze(s)),
                normalization=(m.get("mean", "floats"), m.get("std", "floats"), m.get("scale", "float")),
                class_names=names or (), mpp=m.get("mpp", "float"), tile=m.get("tile", "int"),
                halo=m.get("halo", "int"), threshold=m.get("threshold", "float"))


class ProgramModel(torch.nn.Module):
    """A torch module whose forward runs a TorchScript or exported program:
    NCHW float windows in, logits (or probabilities, where the program's
    metadata says ``output: probabilities``) out. A program whose batch is
    fixed (an export traced with one window) runs the batch one piece at a
    time; one with fixed height and width takes only windows of that size
    (``input_size``, which the tiling obeys). A program that fails on a
    window is one line naming the window's shape."""

    spatial_dims = 2

    def __init__(self, path: str, module, *, kind: str, input_shape=None, output: str = "logits",
                 stride: int = DEFAULT_STRIDE, in_channels: int | None = None, inspect: bool = True):
        super().__init__()
        self.in_channels = in_channels or first_channels(module)
        self.program, self.program_path, self.kind = module, path, kind
        self.output_stride = int(stride)
        self.returns_probabilities = output == "probabilities"
        # what --backend exports: a TorchScript program itself (the tracer cannot enter it from a wrapper)
        self.onnx_target = module if kind == "torchscript" else None
        n, _, h, w = input_shape or (None,) * 4
        self.batch = n
        self.input_size = (h, w) if h and w else None
        if self.input_size and h != w:
            raise ModelError(f"{path}: the program takes fixed {h}x{w} windows, but tilerseg's windows are square; "
                             "export it with dynamic height and width")
        self.global_parts = global_ops(self.run_ops()) if inspect else ()

    def train(self, mode: bool = True):
        """A program is frozen in the mode it was saved in (an exported
        one refuses ``train()``): only this wrapper's flag moves."""
        self.training = bool(mode)
        return self

    def extra_repr(self) -> str:
        return f"{self.kind} {self.program_path!r}, stride={self.output_stride}"

    def forward(self, x):
        N, C, H, W = x.shape
        def run(part):
            out = self.program(part.contiguous())
            return out[0] if isinstance(out, (tuple, list)) else out

        try:
            out = in_fixed_batches(run, x, self.batch or N)
        except Exception as err:  # the program's own checks (shapes, guards) raise many types: one line
            if type(err).__module__.startswith("tilerseg"):  # ours (or the receptive-field tracer's): as is
                raise
            text = " ".join(str(err).split())[:240] or type(err).__name__
            raise ModelError(f"{self.program_path}: the {self.kind} program failed on a {N}x{C}x{H}x{W} window "
                             f"({type(err).__name__}: {text}); give --tile/--halo that make windows it takes, "
                             "or export it with dynamic height and width") from None
        if not isinstance(out, torch.Tensor) or out.dim() != 4 or tuple(out.shape[-2:]) != (H, W):
            shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ModelError(f"{self.program_path}: the program returns {shape} for a {N}x{C}x{H}x{W} window; "
                             "tilerseg needs per-class scores (batch, classes, height, width) the size of the input")
        return out.float()

    def run_ops(self, side: int | None = None) -> list[tuple[str, list]]:
        """``(aten name, arguments)`` of every operator the program runs on
        one zero window (its own size if fixed, else ``side`` or two
        strides), in order: what it does, not what its code could do in
        branches it does not take (scripted ``F.interpolate`` holds an
        adaptive pooling it never runs)."""
        from torch.utils._python_dispatch import TorchDispatchMode

        seen = []

        class Record(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = func.__name__.split(".")[0].lstrip("_")
                seen.append((name, [a if isinstance(a, (int, float, bool, list, tuple)) or a is None else "tensor"
                                    for a in args]))
                return func(*args, **(kwargs or {}))

        side = (self.input_size or (side or 2 * self.output_stride,))[0]
        p = next(iter(self.parameters()), None)
        x = torch.zeros(self.batch or 1, self.in_channels or 3, side, side, device=p.device if p is not None else "cpu")
        with torch.inference_mode(), Record():
            self(x)
        return seen

    def tensor_bytes_per_pixel(self, side: int) -> float | None:
        """Bytes of every tensor the program computes on one ``side`` px
        window, per input pixel, counted op by op as it runs (a program's
        submodules take no forward hooks)."""
        from torch.utils._python_dispatch import TorchDispatchMode

        total = [0]

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, torch.Tensor):
                        total[0] += t.numel() * t.element_size()
                return out

        side = (self.input_size or (side,))[0]
        p = next(iter(self.parameters()), None)
        x = torch.zeros(1, self.in_channels or 3, side, side, device=p.device if p is not None else "cpu")
        try:
            with torch.inference_mode(), Count():
                self(x)
        except Exception as err:
            log.debug("%s: no tensor sizes (%s)", self.program_path, err)
            return None
        return total[0] / side ** 2 or None


def not_buildable(**_):
    raise ModelError("a TorchScript or exported program is a file, not an architecture to build or train: run it "
                     "with --weights model.pt")
