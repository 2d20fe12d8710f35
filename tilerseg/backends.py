"""Runtimes that run the model's forward pass: torch, ONNX Runtime, OpenVINO.

The :class:`~tilerseg.infer.Predictor` keeps normalisation, batching, TTA
and the sigmoid/softmax in torch and hands only the forward pass to a
runner chosen here, so every backend sees the same windows and a backend
cannot change the tiling (tiled output still equals whole-image
inference through it).

ONNX Runtime and OpenVINO ran the same convolutional nets 1.45x and 1.25x
faster than eager channels-last torch on a 2-core EPYC (AVX2, no bf16) while
glibc returned torch's activations to the system after every layer; with
tilerseg's allocator settings (:mod:`tilerseg.allocator`) the three are
within 5% of each other there (see the README), and ``auto`` keeps torch
unless another is clearly faster. Both run an ONNX export of the model, made once
with the TorchScript exporter (``opset 17``, batch and spatial axes
dynamic) and cached beside the checkpoint under a name keyed by the
weights' content, the shape policy and the library versions; where that
folder is not writable, in the user cache folder. A model that does not
export, or whose export disagrees with torch by more than
:data:`TOLERANCE` on probabilities, runs on torch with one line saying why.

A model that is an ONNX file already (``--weights model.onnx``) is not
exported: its own graph runs on ONNX Runtime whatever the backend
(:func:`graph_runner`), or on OpenVINO when asked for and it agrees.

The runtimes are an optional extra (``pip install tilerseg[cpu-fast]``),
imported only when asked for."""
from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import time
import warnings

import numpy as np

from .errors import InputError

log = logging.getLogger(__name__)

BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
OPSET = 17
TOLERANCE = 1e-4                      # largest probability difference an export may show against torch
SHAPE_POLICY = "dynamic-batch-spatial-fp32"
PROBE_SIDE = 512  # auto's probe window: at 256 px per-call overhead is a third of the time and decides the pick
MARGIN = 0.05     # auto leaves torch only for a runtime this much faster on the probe
PROBE_CALLS = 2   # a run's probe: a warm-up and a timed batch per runtime
INSTALL = "pip install tilerseg[cpu-fast]"


class TorchRunner:
    """The model itself (maybe compiled): tensor in, logits out."""

    name = "torch"

    def __init__(self, net):
        self.net = net

    def __call__(self, x):
        return self.net(x)


class GraphRunner:
    """A model that is an ONNX file already (:class:`tilerseg.models.onnx.OnnxModel`):
    it runs its graph on its own runtime, with nothing to export."""

    def __init__(self, model):
        self.model = model

    @property
    def name(self) -> str:
        return self.model.runtime

    def __call__(self, x):
        return self.model(x)


class OnnxRuntimeRunner:
    """An ONNX Runtime session on the exported model (or a user's ONNX
    file); one session is shared by the predictor's threads (``run`` is
    thread-safe). Windows are handed over in the element type the graph's
    input declares."""

    name = "onnxruntime"

    def __init__(self, path: str, device: str, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        providers = ["CPUExecutionProvider"]
        if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, "CUDAExecutionProvider")
        self.session = ort.InferenceSession(path, opts, providers=providers)
        first = self.session.get_inputs()[0]
        self.input, self.dtype = first.name, ORT_TYPES.get(first.type, np.float32)

    def __call__(self, x):
        import torch

        out = self.session.run(None, {self.input: _numpy(x, self.dtype)})[0]
        return torch.from_numpy(out).to(x.device)


class OpenVinoRunner:
    """An OpenVINO model compiled for the CPU from the same export; one
    infer request per call, so threads do not share request state."""

    name = "openvino"

    def __init__(self, path: str, device: str, threads: int):
        import openvino as ov

        core = ov.Core()
        self.compiled = core.compile_model(core.read_model(path), "CPU",
                                           {"INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"})
        try:
            self.dtype = np.dtype(self.compiled.inputs[0].element_type.to_dtype())
        except (AttributeError, TypeError, RuntimeError):
            self.dtype = np.dtype(np.float32)

    def __call__(self, x):
        import torch

        out = self.compiled.create_infer_request().infer([_numpy(x, self.dtype)])
        return torch.from_numpy(np.asarray(next(iter(out.values())))).to(x.device)


RUNNERS = {"onnxruntime": OnnxRuntimeRunner, "openvino": OpenVinoRunner}
MODULES = {"onnxruntime": "onnxruntime", "openvino": "openvino"}
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
             "tensor(uint8)": np.uint8, "tensor(int8)": np.int8, "tensor(uint16)": np.uint16,
             "tensor(int16)": np.int16}


def _numpy(x, dtype=np.float32) -> np.ndarray:
    """A C-contiguous array of a torch tensor (NCHW, NCDHW, or as given), in
    ``dtype`` (integer types get values the caller has rounded and clipped)."""
    a = np.ascontiguousarray(x.detach().float().cpu().contiguous().numpy())
    return a if a.dtype == dtype else a.astype(dtype)


def available(name: str) -> bool:
    """Whether the runtime ``name`` (and the ONNX exporter's dependency) imports."""
    import importlib.util

    return name == "torch" or (importlib.util.find_spec(MODULES[name]) is not None
                               and importlib.util.find_spec("onnx") is not None)


def weights_key(model, in_channels: int, dims: int) -> str:
    """A hash of what decides the export: the weights' bytes and names,
    the module's class, the input's channels and dimensions, the shape
    policy and the versions of torch and the exporter's opset."""
    import torch

    h = hashlib.sha256()
    h.update(f"{type(model).__module__}.{type(model).__qualname__}|{in_channels}|{dims}|{SHAPE_POLICY}|"
             f"opset{OPSET}|torch{torch.__version__}".encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:20]


def cache_dirs(weights: str | None) -> list[str]:
    """Where exports are kept, in order of preference: beside the
    checkpoint (in ``.tilerseg-cache``), then the user cache folder (also
    for the demo model shipped inside the package)."""
    user = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "tilerseg", "exports")
    package = os.path.dirname(os.path.abspath(__file__))
    if weights and os.path.exists(weights) and not os.path.abspath(weights).startswith(package + os.sep):
        base = weights if os.path.isdir(weights) else os.path.dirname(os.path.abspath(weights))
        return [os.path.join(base, ".tilerseg-cache"), user]
    return [user]


def export_onnx(model, *, in_channels: int, dims: int, stride: int, weights: str | None) -> str:
    """The path of the model's ONNX export, made once and cached (see the
    module docstring); written under a temporary name and renamed, so a
    crash never leaves a half-written export to be reused."""
    key = weights_key(model, in_channels, dims)
    stem = os.path.splitext(os.path.basename(weights.rstrip("/")))[0] if weights else type(model).__name__.lower()
    name = f"{stem}-{key}.onnx"
    dirs = cache_dirs(weights)
    for d in dirs:
        if os.path.exists(os.path.join(d, name)):
            return os.path.join(d, name)
    for d in dirs:
        try:
            os.makedirs(d, exist_ok=True)
            fd, tmp = tempfile.mkstemp(suffix=".onnx.part", dir=d)
            os.close(fd)
        except OSError:
            continue
        try:
            _export(model, tmp, in_channels=in_channels, dims=dims, stride=stride)
            os.replace(tmp, os.path.join(d, name))
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return os.path.join(d, name)
    raise OSError(f"no writable cache folder for the export (tried {', '.join(dirs)})")


def _export(model, path: str, *, in_channels: int, dims: int, stride: int) -> None:
    import torch

    device = next(iter(model.parameters()), torch.zeros(())).device
    model = getattr(model, "onnx_target", None) or model  # a TorchScript program exports itself, not its wrapper
    x = torch.zeros((1, in_channels) + (2 * stride,) * dims, device=device)
    axes = {0: "batch", **{2 + i: f"d{i}" for i in range(dims)}}
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), path, opset_version=OPSET, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": axes, "logits": axes})


def _probabilities(logits):
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def _probe_input(in_channels: int, dims: int, stride: int, side: int, device: str):
    import torch

    side = max(stride, side // stride * stride)
    g = torch.Generator().manual_seed(0)
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d  # as the predictor hands windows over
    return torch.randn((1, in_channels) + (side,) * dims, generator=g).to(device).contiguous(memory_format=fmt)


def build_runner(name: str, model, *, device: str, in_channels: int, dims: int, stride: int,
                 weights: str | None, threads: int):
    """A runner for ``name`` checked against torch on a small seeded input,
    or the reason it cannot be used (then the caller uses torch)."""
    import torch

    if not available(name):
        return None, f"{name} is not installed ({INSTALL})"
    try:
        path = export_onnx(model, in_channels=in_channels, dims=dims, stride=stride, weights=weights)
        runner = RUNNERS[name](path, device, threads)
        x = _probe_input(in_channels, dims, stride, 4 * stride, device)
        with torch.inference_mode():
            diff = float((_probabilities(runner(x)) - _probabilities(model(x))).abs().max())
    except Exception as err:  # exporters and runtimes raise many types; any of them means: use torch
        text = " ".join(str(err).split())[:200] or type(err).__name__
        return None, f"the model does not export cleanly to {name} ({type(err).__name__}: {text})"
    if not diff <= TOLERANCE:
        return None, f"{name} differs from torch by {diff:.1e} on probabilities (more than {TOLERANCE:g})"
    return runner, f"{name} (export checked against torch: max difference {diff:.1e})"


def _timed(runner, x, repeats: int = 2) -> float:
    import torch

    with torch.inference_mode():
        runner(x)  # warm-up: first calls allocate and pick kernels
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            runner(x)
            times.append(time.perf_counter() - t0)
    return min(times)


def choose(backend: str, net, model, *, device: str, in_channels: int, dims: int, stride: int,
           weights: str | None, precision: str = "fp32", compile: bool = False):
    """The runner for ``backend`` and one line saying what runs and why.

    ``auto``: torch on a GPU (not measured there yet), with fp16/bf16 or
    ``--compile``; on a CPU, the fastest of the installed runtimes after a
    short timed probe on one :data:`PROBE_SIDE`-px window, when it beats
    torch by :data:`MARGIN` (:func:`pick`). An explicit runtime that cannot
    be used falls back to torch with the reason."""
    import torch

    if backend not in BACKENDS:
        raise InputError(f"unknown --backend {backend!r}: use one of {', '.join(BACKENDS)}")
    if getattr(model, "onnx_path", None):
        return graph_runner(backend, model, device=device, in_channels=in_channels, stride=stride,
                            precision=precision)
    torch_runner = TorchRunner(net)
    if backend == "torch":
        return torch_runner, "torch"
    stay = _torch_only(backend, device, precision, compile)
    if stay:
        return torch_runner, stay
    kw = dict(device=device, in_channels=in_channels, dims=dims, stride=stride, weights=weights,
              threads=torch.get_num_threads())
    if backend != "auto":
        runner, note = build_runner(backend, model, **kw)
        return (runner, note) if runner else (torch_runner, f"torch: {note}")
    runners, notes = [torch_runner], []
    for name in ("onnxruntime", "openvino"):
        if available(name):
            runner, note = build_runner(name, model, **kw)
            runners += [runner] if runner else []
            notes += [] if runner else [note]
    if len(runners) == 1:
        return torch_runner, "torch (auto: " + ("; ".join(notes) or f"no other runtime installed; {INSTALL}") + ")"
    x = _probe_input(in_channels, dims, stride, PROBE_SIDE if dims == 2 else 64, device)
    times = {r.name: _timed(r, x) for r in runners}
    best = next(r for r in runners if r.name == pick(times))
    probe = ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in times.items())
    why = "fastest" if best is not torch_runner or min(times.values()) == times["torch"] else \
        f"no runtime {MARGIN:.0%} faster than torch"
    return best, f"{best.name} (auto: {why} on a {x.shape[-1]}-px probe window: {probe})"


def _torch_only(backend: str, device: str, precision: str, compile: bool) -> str | None:
    """Why ``backend`` must run on torch (``None``: it need not): other
    runtimes run fp32 exports, uncompiled, and ``auto`` measures on CPUs only."""
    if precision != "fp32" or compile:
        what = f"--precision {precision}" if precision != "fp32" else "--compile"
        if backend != "auto":
            raise InputError(f"--backend {backend} runs fp32 exports: drop {what}, or use --backend torch")
        return f"torch ({what} runs on torch)"
    if backend == "auto" and device != "cpu":
        return "torch (auto: the other runtimes are measured on CPUs only)"
    return None


def decide(model, *, device: str, in_channels: int, dims: int, stride: int, weights: str | None,
           window: tuple[int, ...], batch: int, batches: int, precision: str = "fp32",
           compile: bool = False) -> tuple[str, str]:
    """``--backend auto`` for a run: the runtime to use, and one line with
    the probe's figures.

    The probe runs what the run will run: ``batch`` windows of ``window``
    px (a warm-up and a timed call per runtime), and the decision weighs the
    whole run, ``batches`` batches, plus the export's time where the export
    was not cached yet: a runtime wins when that total beats torch's by
    :data:`MARGIN`. A run too short to repay the probe (it costs about
    :data:`PROBE_CALLS` batches a runtime) stays on torch unmeasured, so
    ``auto`` costs no more than the default beyond the probe's share."""
    import torch

    stay = _torch_only("auto", device, precision, compile)
    if stay or getattr(model, "onnx_path", None):
        return "torch", stay or "onnxruntime (the model is an ONNX file)"
    names = [n for n in ("onnxruntime", "openvino") if available(n)]
    if not names:
        return "torch", f"torch (auto: no other runtime installed; {INSTALL})"
    calls = PROBE_CALLS * (1 + len(names))
    shape = "x".join(map(str, window))
    if MARGIN * batches < calls:
        return "torch", (f"torch (auto: {batches} batch(es) of {batch} x {shape} px are too few to repay a probe "
                         f"of about {calls} batches; --backend {names[0]} runs it without one)")
    kw = dict(device=device, in_channels=in_channels, dims=dims, stride=stride, weights=weights,
              threads=torch.get_num_threads())
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d  # as the predictor hands windows over
    x = torch.randn((batch, in_channels, *window), generator=torch.Generator().manual_seed(0))
    x = x.to(device).contiguous(memory_format=fmt)
    times, export, notes = {"torch": _timed(TorchRunner(model), x, repeats=1)}, {}, []
    for name in names:
        cached = exported(model, in_channels=in_channels, dims=dims, weights=weights)
        t0 = time.perf_counter()
        runner, note = build_runner(name, model, **kw)
        if runner is None:
            notes.append(note)
            continue
        export[name] = 0.0 if cached else time.perf_counter() - t0
        times[name] = _timed(runner, x, repeats=1)
    total = {k: batches * t + export.get(k, 0.0) for k, t in times.items()}
    best = pick(total)
    figures = ", ".join(f"{k} {t:.3g} s" + (f" + export {export[k]:.1f} s" if export.get(k) else "")
                        for k, t in times.items())
    why = "fastest over the run" if best != "torch" or min(total.values()) == total["torch"] else \
        f"no runtime {MARGIN:.0%} faster than torch over the run"
    text = "; ".join([f"auto: {why}; a batch of {batch} x {shape} px: {figures}; {batches} batches"] + notes)
    return best, f"{best} ({text})"


def exported(model, *, in_channels: int, dims: int, weights: str | None) -> bool:
    """Whether the model's ONNX export is cached already (see :func:`export_onnx`)."""
    key = weights_key(model, in_channels, dims)
    return any(f.endswith(f"-{key}.onnx") for d in cache_dirs(weights) if os.path.isdir(d) for f in os.listdir(d))


def pick(times: dict) -> str:
    """The runtime ``auto`` takes from probe ``times`` (name -> seconds):
    the fastest, if it beats torch by :data:`MARGIN`; else torch, the
    reference path, which equals whole-image inference bit for bit and
    needs no export (differences below the margin are the probe's noise)."""
    fastest = min(times, key=times.get)
    return fastest if times[fastest] < (1 - MARGIN) * times["torch"] else "torch"


def graph_runner(backend: str, model, *, device: str, in_channels: int, stride: int, precision: str = "fp32"):
    """The runner of a model that is an ONNX file, and one line saying what
    runs: its ONNX Runtime session for ``torch``, ``onnxruntime`` and
    ``auto`` (there is no torch module to run, and nothing is exported);
    OpenVINO on the same file for ``openvino`` when it is installed and
    agrees with ONNX Runtime within :data:`TOLERANCE` on probabilities on a
    seeded window, else ONNX Runtime with the reason."""
    import torch

    path = model.onnx_path
    if precision != "fp32":
        raise InputError(f"--precision {precision}: {path} is an ONNX graph and runs in the precision it was "
                         "exported in; drop --precision")
    model.use("onnxruntime")
    runner = GraphRunner(model)
    if backend != "openvino":
        return runner, "onnxruntime (the model is an ONNX file)"
    if not available("openvino"):
        return runner, f"onnxruntime: openvino is not installed ({INSTALL})"
    side = (getattr(model, "input_size", None) or (4 * stride,))[0]
    x = _probe_input(in_channels, 2, stride, side, device)

    def probs(t):
        return t.float() if model.returns_probabilities else _probabilities(t)

    try:
        with torch.inference_mode():
            ref = probs(model(x))
            model.use("openvino")
            diff = float((probs(model(x)) - ref).abs().max())
    except Exception as err:  # the runtimes raise many types; any of them means: stay on ONNX Runtime
        model.use("onnxruntime")
        text = " ".join(str(err).split())[:200] or type(err).__name__
        return runner, f"onnxruntime: openvino cannot run {path} ({type(err).__name__}: {text})"
    if not diff <= TOLERANCE:
        model.use("onnxruntime")
        return runner, f"onnxruntime: openvino differs from it by {diff:.1e} on probabilities (more than {TOLERANCE:g})"
    return runner, f"openvino (on the ONNX file, checked against onnxruntime: max difference {diff:.1e})"
