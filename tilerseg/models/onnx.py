"""Your own model as an ONNX file, run through the same path as torch models.

:func:`read_graph` reads what the file says: its image input (shape,
element type, layout), its first output, its metadata and the operators
that see the whole input. :func:`describe_onnx` turns that into a
:class:`~tilerseg.models.ModelInfo` (flags override the metadata), and
:class:`OnnxModel` is a torch module whose forward runs the graph on ONNX
Runtime (or OpenVINO), so the predictor (normalisation, batching, TTA,
sigmoid/softmax), the tiling decision and the writer are the ones every
model goes through. Nothing is exported again.

Metadata (``metadata_props``, each value a JSON string; comma-separated
numbers work too), all optional:

``mean``, ``std``, ``scale``
    the normalisation ``(pixel / scale - mean) / std`` as ``--mean/--std/--scale``
``class_names``
    one name per output channel (a one-channel model: background and
    foreground, or the foreground's alone)
``threshold``, ``tile``, ``halo``, ``mpp``
    as a tilerseg checkpoint records them
``output``
    ``logits`` or ``probabilities`` (default: ``probabilities`` when the
    graph ends in Sigmoid or Softmax, else ``logits``)
``stride``
    the output stride: windows are placed on its grid (default 32, right
    for any model whose stride divides it)
``layout``
    ``NCHW`` or ``NHWC`` (default: guessed from the input shape)

``output``, ``stride`` and ``layout`` are also ``--model-arg KEY=VALUE``.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
from dataclasses import dataclass, replace

import numpy as np
import torch

from ..errors import ModelError
from .batches import in_fixed_batches
from .registry import ModelSpec

log = logging.getLogger(__name__)

SETTINGS = ("output", "stride", "layout")     # metadata keys that --model-arg also takes
OUTPUTS = ("logits", "probabilities")
LAYOUTS = ("NCHW", "NHWC")
DEFAULT_STRIDE = 32
GLOBAL_OPS = {"GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool", "Attention", "MultiHeadAttention",
              "GroupQueryAttention"}
REDUCE_OPS = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare"}
PASS_THROUGH = {"Identity", "Transpose", "Cast", "Reshape", "Squeeze", "Unsqueeze"}
EXPORT_HINT = "export it with dynamic axes, e.g. torch.onnx.export(..., dynamic_axes={...})"


@dataclass(frozen=True)
class Graph:
    """What an ONNX file says about itself. Shapes hold None where an axis
    is dynamic; ``reductions`` are ``(op, axes or None)`` of the operators
    that may pool over space, ``resize_modes`` the coordinate modes of its
    Resize nodes, ``last_op`` the operator that makes the first output
    (through reshapes and casts)."""

    path: str
    input_name: str
    input_shape: tuple[int | None, ...]
    input_dtype: str
    output_shape: tuple[int | None, ...]
    output_dtype: str
    metadata: tuple[tuple[str, str], ...]
    ops: tuple[str, ...]
    reductions: tuple[tuple[str, tuple[int, ...] | None], ...]
    resize_modes: tuple[str, ...]
    last_op: str
    attention: bool = False  # a Softmax that feeds a MatMul: weights over positions

    def meta(self) -> dict[str, str]:
        return dict(self.metadata)


def require_runtime(path: str) -> None:
    from ..backends import INSTALL, available

    if not available("onnxruntime"):
        raise ModelError(f"{path}: an ONNX model runs on ONNX Runtime, which is not installed (with onnx): "
                         f"{INSTALL}")


def read_graph(path: str) -> Graph:
    """The :class:`Graph` of ``path``, read once per process while the file
    is unchanged; a file that is not an ONNX model, or one without a 4-D
    image input and a 4-D output, is one :class:`ModelError` line."""
    require_runtime(path)
    st = os.stat(path)
    return _cached_graph(os.path.abspath(path), st.st_size, st.st_mtime_ns, path)


@functools.lru_cache(maxsize=4)
def _cached_graph(abspath: str, size: int, mtime: int, shown: str) -> Graph:
    import onnx
    from onnx import helper, numpy_helper

    path = shown
    try:
        model = onnx.load(abspath, load_external_data=False)
    except Exception as err:  # protobuf's DecodeError, onnx's own, OSError...: any means it is not readable
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise ModelError(f"{path}: not a readable ONNX model ({type(err).__name__}: {text}); give an .onnx file "
                         "written by an ONNX exporter (torch.onnx.export, tf2onnx...)") from None
    g = model.graph
    consts = {t.name for t in g.initializer}
    inputs = [i for i in g.input if i.name not in consts]
    if not inputs or not g.output:
        raise ModelError(f"{path}: not an ONNX model (no graph inputs or outputs in it); give an .onnx file "
                         "written by an ONNX exporter (torch.onnx.export, tf2onnx...)")

    def shape(v):
        t = v.type.tensor_type
        if not t.HasField("shape"):
            return None
        return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim)

    def dtype(v):
        try:
            return np.dtype(helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)).name
        except Exception:
            return "unknown"

    found = ", ".join(f"{i.name} {_shape_text(shape(i))}" for i in inputs)
    if len(inputs) > 1:
        raise ModelError(f"{path}: the graph takes {len(inputs)} inputs ({found}); tilerseg feeds it one image "
                         "batch: export a model with a single (batch, channels, height, width) input")
    image = inputs[0]
    in_shape = shape(image)
    if in_shape is None or len(in_shape) != 4:
        raise ModelError(f"{path}: the graph has no 4-D image input (found {found}); tilerseg runs 2-D "
                         "segmentation models taking (batch, channels, height, width) windows")
    out = g.output[0]
    out_shape = shape(out)
    if out_shape is not None and len(out_shape) != 4:
        raise ModelError(f"{path}: its first output {out.name} is {_shape_text(out_shape)}; tilerseg needs "
                         "per-class scores (batch, classes, height, width) the size of the input")
    in_dtype, out_dtype = dtype(image), dtype(out)
    if in_dtype not in ("float32", "float16", "float64", "uint8", "int8", "uint16", "int16"):
        raise ModelError(f"{path}: its input {image.name} is {in_dtype}; tilerseg feeds float or 8/16-bit "
                         "integer pixels")
    if not out_dtype.startswith("float"):
        raise ModelError(f"{path}: its first output {out.name} is {out_dtype} (labels?); tilerseg needs float "
                         "per-class scores (logits or probabilities) to merge windows and threshold them")

    values = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    values[n.output[0]] = a.t

    def axes(n) -> tuple[int, ...] | None:
        for a in n.attribute:
            if a.name == "axes":
                return tuple(a.ints)
        if len(n.input) > 1 and n.input[1] in values:
            return tuple(int(v) for v in numpy_helper.to_array(values[n.input[1]]).ravel())
        if len(n.input) > 1 and n.input[1]:
            return None  # computed at run time
        return ()        # no axes: all of them

    reductions = tuple((n.op_type, axes(n)) for n in g.node if n.op_type in REDUCE_OPS)
    modes = tuple(next((a.s.decode() for a in n.attribute if a.name == "coordinate_transformation_mode"),
                       "half_pixel") for n in g.node if n.op_type == "Resize")
    softmaxed = {o for n in g.node if n.op_type == "Softmax" for o in n.output}
    attention = any(n.op_type == "MatMul" and softmaxed & set(n.input) for n in g.node)
    last, name = "", out.name
    while name in producer:
        node = producer[name]
        last = node.op_type
        if last not in PASS_THROUGH or not node.input:
            break
        name = node.input[0]
    return Graph(path=path, input_name=image.name, input_shape=in_shape, input_dtype=in_dtype,
                 output_shape=out_shape or (None,) * 4, output_dtype=out_dtype,
                 metadata=tuple((p.key, p.value) for p in model.metadata_props),
                 ops=tuple(sorted({n.op_type for n in g.node})), reductions=reductions, resize_modes=modes,
                 last_op=last, attention=attention)


def _shape_text(shape) -> str:
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")" if shape is not None else "(no shape)"


def _parse(text: str):
    """A metadata value: JSON, else comma-separated numbers, else the text."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    parts = [p.strip() for p in text.strip().strip("[]()").split(",")]
    try:
        nums = [float(p) for p in parts]
        return nums if len(nums) > 1 else nums[0]
    except ValueError:
        return parts if len(parts) > 1 else text.strip()


class GraphMeta:
    """Typed reads of a graph's metadata, each failure one line naming the key."""

    def __init__(self, graph: Graph):
        self.path, self.raw = graph.path, graph.meta()

    def get(self, key: str, kind: str, flag: str = ""):
        if key not in self.raw:
            return None
        text = self.raw[key]
        v = _parse(text)
        try:
            if kind == "floats":
                v = [float(x) for x in (v if isinstance(v, list) else [v])]
                if not v:
                    raise ValueError
                return tuple(v)
            if kind == "names":
                v = v.split(",") if isinstance(v, str) else v
                if not isinstance(v, list):
                    raise ValueError
                return tuple(str(x).strip() for x in v)
            if kind == "int":
                if isinstance(v, bool) or float(v) != int(float(v)) or int(float(v)) < 0:
                    raise ValueError
                return int(float(v))
            if kind == "float":
                return float(v)
            return str(v)
        except (TypeError, ValueError):
            what = {"floats": "a number or a list of numbers", "names": "a list of names",
                    "int": "a whole number", "float": "a number"}.get(kind, "text")
            raise ModelError(f"{self.path}: its metadata {key}={text!r} is not {what}; fix the model's "
                             "metadata_props" + (f" or pass {flag}" if flag else "")) from None


def settings(graph: Graph, flags: dict) -> dict:
    """``output``, ``stride`` and ``layout``: ``--model-arg`` over the
    metadata over what the graph shows."""
    unknown = sorted(set(flags) - set(SETTINGS))
    if unknown:
        raise ModelError(f"--model-arg {unknown[0]}: an ONNX model takes {', '.join(f'{k}=...' for k in SETTINGS)} "
                         "(its architecture is in the file)")
    meta = GraphMeta(graph)
    out = {}
    for key, kind in (("output", "str"), ("stride", "int"), ("layout", "str")):
        v = flags[key] if key in flags else meta.get(key, kind, f"--model-arg {key}=...")
        out[key] = v
    layout = out["layout"]
    if layout is None:
        _, a, _, c = graph.input_shape
        layout = "NHWC" if (a is None or a > 4) and c is not None and c <= 4 else "NCHW"
    layout = str(layout).upper()
    if layout not in LAYOUTS:
        raise ModelError(f"{graph.path}: layout {out['layout']!r}: use NCHW or NHWC (metadata or --model-arg layout=)")
    output = out["output"]
    if output is None:
        output = "probabilities" if graph.last_op in ("Sigmoid", "Softmax") else "logits"
    output = str(output).lower()
    if output not in OUTPUTS:
        raise ModelError(f"{graph.path}: output {out['output']!r}: use logits or probabilities (metadata or "
                         "--model-arg output=)")
    stride = out["stride"]
    try:
        stride = DEFAULT_STRIDE if stride is None else int(stride)
        if stride < 1:
            raise ValueError
    except (TypeError, ValueError):
        raise ModelError(f"{graph.path}: stride {out['stride']!r}: give a positive whole number (metadata or "
                         "--model-arg stride=)") from None
    return {"output": output, "stride": stride, "layout": layout}


def _nchw(shape, layout: str):
    n, a, b, c = shape
    return (n, c, a, b) if layout == "NHWC" else (n, a, b, c)


def describe_onnx(path: str, spec: ModelSpec) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of an ONNX file
    (``normalization`` as ``(mean, std, scale)``): channels and classes
    from the graph's shapes, normalisation, class names, threshold, tile,
    halo and mpp from its metadata; ``spec.kwargs`` (``--model-arg``)
    override the settings. A graph taking integer pixels gets them as they
    are (no normalisation) unless its metadata says otherwise."""
    graph = read_graph(path)
    s = settings(graph, dict(spec.kwargs))
    meta = GraphMeta(graph)
    _, channels, _, _ = _nchw(graph.input_shape, s["layout"])
    _, classes, _, _ = _nchw(graph.output_shape, s["layout"])
    mean, std, scale = meta.get("mean", "floats"), meta.get("std", "floats"), meta.get("scale", "float")
    if not graph.input_dtype.startswith("float") and mean is None and std is None and scale is None:
        mean, std, scale = (0.0,), (1.0,), 1.0  # the graph takes pixels: hand them over unchanged
    spec = ModelSpec(arch="onnx", encoder=os.path.basename(path), classes=classes or 1,
                     in_channels=channels or spec.in_channels, kwargs=ModelSpec.freeze(s))
    if classes is None:  # a dynamic class axis: ask the graph
        model = OnnxModel(path, **s)
        side = (model.input_size or (2 * s["stride"],))[0]
        with torch.no_grad():
            classes = int(model(torch.zeros(1, spec.in_channels, side, side)).shape[1])
        spec = replace(spec, classes=classes)
    names = meta.get("class_names", "names")
    if names is not None and spec.classes == 1 and len(names) == 1:
        names = ("background", names[0])  # a binary model's one channel: P(that class)
    if names is not None and len(names) != (2 if spec.classes == 1 else spec.classes):
        raise ModelError(f"{path}: its metadata class_names has {len(names)} name(s) for {spec.classes} output "
                         "channel(s); give one per channel (a one-channel model: background and foreground)")
    threshold = meta.get("threshold", "float")
    if threshold is not None and not 0 <= threshold <= 1:
        raise ModelError(f"{path}: its metadata threshold={threshold:g} is not between 0 and 1; fix the model's "
                         "metadata_props")
    return dict(spec=spec, normalization=(mean, std, scale), class_names=names or (),
                mpp=meta.get("mpp", "float"), tile=meta.get("tile", "int"), halo=meta.get("halo", "int"),
                threshold=threshold)


def not_buildable(**_):
    raise ModelError("onnx: an ONNX model is a file, not an architecture to build or train: run it with "
                     "--weights model.onnx")


class OnnxModel(torch.nn.Module):
    """A torch module whose forward runs an ONNX graph: NCHW float
    windows in, logits (or probabilities, see
    ``returns_probabilities``) out, as a torch tensor on the input's
    device. A graph with a fixed batch runs the batch in pieces of that
    size; one with fixed height and width takes only windows of that
    size (``input_size``; the tiling uses it). There are no parameters
    and no gradients: ``runs_outside_torch`` tells the receptive-field
    code to measure by perturbation."""

    runs_outside_torch = True
    spatial_dims = 2

    def __init__(self, path: str, *, output: str = "logits", stride: int = DEFAULT_STRIDE,
                 layout: str = "NCHW", runtime: str = "onnxruntime"):
        super().__init__()
        graph = read_graph(path)
        self.onnx_path, self.graph = path, graph
        self.output_stride, self.layout = int(stride), layout
        self.returns_probabilities = output == "probabilities"
        n, c, h, w = _nchw(graph.input_shape, layout)
        self.batch, self.in_channels = n, c
        if (h is None) != (w is None):
            raise ModelError(f"{path}: the graph fixes one side of its input {_shape_text(graph.input_shape)} "
                             f"but not the other; {EXPORT_HINT} or fix both")
        self.input_size = (h, w) if h is not None else None
        if self.input_size is not None:
            if h != w:
                raise ModelError(f"{path}: the graph takes fixed {h}x{w} windows, but tilerseg's windows are "
                                 f"square; {EXPORT_HINT} or with a square input")
            if h % self.output_stride:
                raise ModelError(f"{path}: its fixed {h}-px input is not a multiple of the stride "
                                 f"{self.output_stride}; give the model's stride (metadata stride, or "
                                 "--model-arg stride=N)")
        dt = np.dtype(graph.input_dtype)
        self.input_range = (float(np.iinfo(dt).min), float(np.iinfo(dt).max)) if dt.kind in "ui" else None
        self.global_parts = global_parts(graph, layout)
        self.runtime = runtime
        self._runners: dict = {}
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        return f"{self.onnx_path!r}, stride={self.output_stride}, layout={self.layout}"

    def use(self, runtime: str) -> None:
        """Run the graph on ``runtime`` (onnxruntime or openvino) from now on."""
        self.runtime = runtime

    def runner(self, device: str):
        """The session of the current runtime on ``device`` (made once)."""
        from ..backends import RUNNERS

        key = (self.runtime, device)
        with self._lock:
            if key not in self._runners:
                try:
                    self._runners[key] = RUNNERS[self.runtime](self.onnx_path, device, torch.get_num_threads())
                except Exception as err:  # the runtimes raise their own types for a graph they cannot run
                    text = " ".join(str(err).split())[:200] or type(err).__name__
                    raise ModelError(f"{self.onnx_path}: {self.runtime} cannot load the graph "
                                     f"({type(err).__name__}: {text})") from None
            return self._runners[key]

    def forward(self, x):
        N, C, H, W = x.shape
        if self.in_channels is not None and C != self.in_channels:
            raise ModelError(f"{self.onnx_path}: the graph takes {self.in_channels} input band(s), got {C}")
        if self.input_size is not None and (H, W) != self.input_size:
            h, w = self.input_size
            raise ModelError(f"{self.onnx_path}: the graph takes fixed {h}x{w} windows, got {H}x{W}; use "
                             f"--tile {h}, or {EXPORT_HINT}")
        if self.input_range is not None:
            x = x.round().clamp(*self.input_range)
        if self.layout == "NHWC":
            x = x.permute(0, 2, 3, 1)
        run = self.runner(str(x.device))
        try:
            out = in_fixed_batches(run, x, self.batch or N)
        except ModelError:
            raise
        except Exception as err:  # a runtime error on a window (shapes, operators): one line
            text = " ".join(str(err).split())[:240] or type(err).__name__
            raise ModelError(f"{self.onnx_path}: {self.runtime} failed on a {H}x{W} window "
                             f"({type(err).__name__}: {text})") from None
        if out.dim() != 4:
            raise ModelError(f"{self.onnx_path}: the graph returned a {out.dim()}-D output; tilerseg needs "
                             "(batch, classes, height, width)")
        if self.layout == "NHWC":
            out = out.permute(0, 3, 1, 2)
        if tuple(out.shape[-2:]) != (H, W):
            raise ModelError(f"{self.onnx_path}: the graph returns {out.shape[-2]}x{out.shape[-1]} for a "
                             f"{H}x{W} window; tilerseg needs output the size of the input (upsample "
                             "inside the model)")
        return out.float()

    def tensor_bytes_per_pixel(self, side: int) -> float | None:
        """Bytes of every tensor the graph computes on one ``side`` px
        window (its own size if fixed), per input pixel, from the shapes
        onnx infers; None where they cannot be inferred. The counterpart of
        summing every module's output of a torch model."""
        side = (self.input_size or (side,))[0]
        total = _tensor_bytes(self.onnx_path, self.graph, self.layout, self.in_channels or 3, side)
        return total / side ** 2 if total else None


def global_parts(graph: Graph, layout: str) -> tuple[str, ...]:
    """The graph's operators that see the whole input (global pooling,
    attention, reductions over height or width) or resample by a
    size-dependent rule (``align_corners``): tiled output of such a graph
    cannot equal whole-image inference."""
    found = set(graph.ops) & GLOBAL_OPS
    if graph.attention:
        found.add("Softmax->MatMul (attention)")
    spatial = {2, 3, -1, -2} if layout == "NCHW" else {1, 2, -2, -3}
    for op, axes in graph.reductions:
        if axes is None or not axes or spatial & set(axes):
            found.add(op)
    if "align_corners" in graph.resize_modes:
        found.add("Resize(align_corners)")
    return tuple(sorted(found))


def _tensor_bytes(path: str, graph: Graph, layout: str, channels: int, side: int) -> float | None:
    import onnx

    try:
        model = onnx.load(path, load_external_data=False)
        inp = next(i for i in model.graph.input if i.name == graph.input_name)
        shape = (1, side, side, channels) if layout == "NHWC" else (1, channels, side, side)
        for d, v in zip(inp.type.tensor_type.shape.dim, shape):
            d.ClearField("dim_param")
            d.dim_value = v
        model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception as err:
        log.debug("%s: no shape inference (%s)", path, err)
        return None
    total = 0
    for v in list(model.graph.value_info) + list(model.graph.output):
        t = v.type.tensor_type
        dims = [d.dim_value for d in t.shape.dim] if t.HasField("shape") else []
        if not dims or any(d <= 0 for d in dims):
            continue
        try:
            size = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)).itemsize
        except Exception:
            size = 4
        total += math.prod(dims) * size
    return float(total) if total else None


def build_onnx(info) -> "OnnxModel":
    """The module of an ONNX :class:`ModelInfo` (see :func:`describe_onnx`)."""
    return OnnxModel(info.weights, **dict(info.spec.kwargs)).eval()


describe, build = describe_onnx, build_onnx  # the names every format module has (models.weights dispatches on them)
