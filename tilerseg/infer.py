"""Numpy windows in, probabilities out: normalisation, batching, device.

The only module besides ``models`` that touches torch. One
:class:`Predictor` per model and device per process; dask tasks share it,
and a lock lets one batch run at a time so that reading and writing in
other threads overlap the model instead of competing with it for cores."""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
import threading

import numpy as np

from .errors import InputError, ModelError
from .models import ModelInfo, Normalization, dtype_scale, instantiate

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = 0.449, 0.226  # ImageNet's, averaged over RGB


def resolve_normalization(norm: Normalization, bands: int, dtype) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-band mean, std and the divisor that maps pixels to [0, 1].

    Defaults: ImageNet mean/std for 3 bands, their average for any other
    band count; the divisor is the integer dtype's maximum, 1 for floats."""
    dtype = np.dtype(dtype)
    scale = norm.scale if norm.scale else dtype_scale(dtype)
    mean = norm.mean or (IMAGENET_MEAN if bands == 3 else (GRAY_MEAN,) * bands)
    std = norm.std or (IMAGENET_STD if bands == 3 else (GRAY_STD,) * bands)
    if len(mean) == 1:
        mean = tuple(mean) * bands
    if len(std) == 1:
        std = tuple(std) * bands
    if len(mean) != bands or len(std) != bands:
        raise ModelError(f"normalisation has {len(mean)} mean / {len(std)} std values for a {bands}-band "
                         "image: give one value or one per band")
    return np.asarray(mean, np.float32), np.asarray(std, np.float32), float(scale)


def pick_device(device: str = "auto") -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    return device


def _dask_worker():
    """The dask worker running this task, or None outside one."""
    if "distributed" not in sys.modules:  # a worker's process has it; importing it here would cost 0.4 s
        return None
    try:
        from distributed import get_worker

        return get_worker()
    except (ImportError, ValueError):
        return None


def worker_device(device: str) -> str:
    """The GPU of this process: ``cuda`` on a dask worker that shares its
    machine's GPUs with other workers becomes ``cuda:k``, k from the
    worker's position in its job (the ``-k`` that ``dask worker --nworkers``
    and dask-jobqueue append to the name), so each worker holds one GPU.
    Anything else is returned unchanged."""
    import torch

    worker = _dask_worker()
    if device != "cuda" or worker is None or torch.cuda.device_count() < 2:
        return device
    tail = str(worker.name).rsplit("-", 1)[-1]
    return f"cuda:{int(tail) % torch.cuda.device_count()}" if tail.isdigit() else device


def _worker_threads() -> None:
    """On a dask worker, let torch use the worker's threads: the nanny sets
    OMP_NUM_THREADS=1, which would leave a CPU worker's model on one core."""
    import torch

    worker = _dask_worker()
    n = getattr(getattr(worker, "state", None), "nthreads", None)
    if n and torch.get_num_threads() != n:
        torch.set_num_threads(n)


def output_stride(model) -> int:
    """The model's total down-sampling factor: window sides must be multiples."""
    enc = getattr(model, "encoder", None)
    return int(getattr(enc, "output_stride", None) or getattr(model, "output_stride", None) or 32)


TTA_MODES = ("none", "flips", "d4")
PRECISIONS = {"fp32": None, "fp16": "float16", "bf16": "bfloat16"}


def _tta_views(mode: str) -> list[tuple[bool, int, tuple[int, ...]]]:
    """``(transpose, quarter turns, flip dims)`` of each view: the identity
    and the flips (4 views), or the dihedral group D4 (8 views)."""
    if mode == "none":
        return [(False, 0, ())]
    if mode == "flips":
        return [(False, 0, ()), (False, 0, (3,)), (False, 0, (2,)), (False, 0, (2, 3))]
    if mode == "d4":
        return [(t, k, ()) for t in (False, True) for k in range(4)]
    raise ModelError(f"unknown --tta {mode!r}: use one of {', '.join(TTA_MODES)}")


def _view(x, view, inverse: bool = False):
    import torch

    t, k, dims = view
    if not inverse:
        x = x.transpose(2, 3) if t else x
        x = torch.rot90(x, k, dims=(2, 3)) if k else x
        return torch.flip(x, dims) if dims else x
    x = torch.flip(x, dims) if dims else x
    x = torch.rot90(x, -k, dims=(2, 3)) if k else x
    return x.transpose(2, 3) if t else x


class HostStaging:
    """Page-locked host buffers, one per thread and reused, and one copy
    stream per thread, for windows going to a CUDA device.

    ``tensor.pin_memory()`` allocates a fresh page-locked buffer for every
    batch (``cudaHostAlloc``: milliseconds per megabyte, holding the GIL
    meanwhile) and copies into it. Here each thread keeps one buffer, grown
    when a batch is larger, and fills it with one numpy copy (which leaves
    the GIL); the copy to the device is issued on the thread's own stream
    without blocking, the compute stream waits for it, and the next fill
    of the buffer waits for that copy to end (an event), never earlier.
    ``pin=False`` (tests without a GPU): ordinary host memory."""

    def __init__(self, pin: bool = True):
        self.pin = pin
        self._local = threading.local()

    def host(self, windows: np.ndarray):
        """A host tensor of ``windows``' shape and values, in this thread's buffer."""
        import torch

        loc = self._local
        dtype = torch.from_numpy(windows[:0].copy()).dtype
        buf = getattr(loc, "buf", None)
        if buf is None or buf.dtype != dtype or buf.numel() < windows.size:
            buf = loc.buf = torch.empty(windows.size, dtype=dtype, pin_memory=self.pin)
        event = getattr(loc, "event", None)
        if event is not None:  # the last copy out of this buffer must be over before it is refilled
            event.synchronize()
        host = buf[:windows.size].view(windows.shape)
        np.copyto(host.numpy(), windows)
        return host

    def to_device(self, windows: np.ndarray, device: str):
        """``windows`` on ``device``, copied without blocking the host."""
        import torch

        host = self.host(windows)
        loc = self._local
        if getattr(loc, "stream", None) is None:
            loc.stream = torch.cuda.Stream(device=device)
        compute = torch.cuda.current_stream(device)
        loc.stream.wait_stream(compute)  # the device memory it copies into may have been freed by compute work
        with torch.cuda.stream(loc.stream):
            x = host.to(device, non_blocking=True)
            loc.event = torch.cuda.Event()
            loc.event.record(loc.stream)
        compute.wait_stream(loc.stream)
        x.record_stream(compute)  # its memory is used by the compute stream: not reused before that is done
        return x


class Predictor:
    """Run ``model`` on batches of windows ``(N, T, T, bands)`` of raw pixels
    and return float32 probabilities ``(N, classes, T, T)``: sigmoid for one
    class, softmax over classes otherwise.

    ``tta`` averages the probabilities over flipped (``flips``: 4 views) or
    flipped and rotated (``d4``: 8 views) copies of each window, each mapped
    back before averaging; all views go through the model in one batch.

    ``precision`` ``fp16``/``bf16`` runs the model under autocast (output
    probabilities stay float32); ``compile`` wraps it in ``torch.compile``.
    ``backend`` runs the forward pass on torch, ONNX Runtime or OpenVINO, or
    picks the fastest (``auto``; see :mod:`tilerseg.backends`); the export
    is cached beside ``weights``. A model that is an ONNX file runs its
    graph on ONNX Runtime (or OpenVINO), through the same normalisation,
    batching and TTA; one whose graph ends in a sigmoid/softmax
    (``returns_probabilities``) is not activated twice.
    On a GPU, windows are copied from pinned memory without blocking, and
    a batch that runs out of GPU memory is split in halves and retried,
    once said, and later batches keep to the size that fitted."""

    def __init__(self, model, *, mean, std, scale: float, device: str = "cpu", tta: str = "none",
                 precision: str = "fp32", compile: bool = False, backend: str = "torch",
                 weights: str | None = None):
        import torch

        from .backends import choose

        if precision not in PRECISIONS:
            raise ModelError(f"unknown --precision {precision!r}: use one of {', '.join(PRECISIONS)}")
        self.precision = precision

        self._views = _tta_views(tta)
        self.dims = int(getattr(model, "spatial_dims", 2))  # 3 for volumetric models (N, D, H, W, C windows)
        if self.dims == 3 and len(self._views) > 1:
            raise InputError("--tta works on 2-D models only")
        self._format = torch.channels_last if self.dims == 2 else torch.channels_last_3d

        self.device = pick_device(device)
        # channels-last: NHWC windows need no transpose, and convolutions run
        # faster in it on CPU (oneDNN) and on tensor-core GPUs
        self.model = model.eval().to(self.device, memory_format=self._format)
        self.stride = output_stride(model)
        if compile and getattr(model, "runs_outside_torch", False):
            log.info("--compile does not apply to %s: its graph runs on ONNX Runtime; ignored",
                     getattr(model, "onnx_path", "this model"))
            compile = False
        net = torch.compile(self.model) if compile else self.model
        # the forward pass only: normalisation, TTA and probabilities stay here, whatever runs it
        self._net, self.backend_note = choose(backend, net, self.model, device=self.device,
                                              in_channels=len(np.atleast_1d(mean)), dims=self.dims,
                                              stride=self.stride, weights=weights, precision=precision,
                                              compile=compile)
        self.backend = self._net.name
        # a runtime outside torch takes C-contiguous NCHW arrays: normalise into that layout at once (a uint8
        # transpose first, 3 bytes a pixel), not into channels-last memory it would copy again (12 bytes a pixel)
        self._layout = self._format if self.backend == "torch" else torch.contiguous_format
        if backend != "torch" or self.backend != "torch":
            log.info("backend: %s", self.backend_note)
        # a model that ends in its own sigmoid/softmax (an ONNX file may) gives probabilities already
        self._activate = not getattr(model, "returns_probabilities", False)
        self.max_batch: int | None = None  # lowered when a batch runs out of GPU memory
        self._mean = torch.as_tensor(np.asarray(mean, np.float32), device=self.device).view(1, -1, 1, 1)
        self._std = torch.as_tensor(np.asarray(std, np.float32), device=self.device).view(1, -1, 1, 1)
        self._scale = float(scale)
        self._lock = threading.Lock()
        self._staging = HostStaging() if str(self.device).startswith("cuda") else None

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        n = len(windows)
        step = min(n, self.max_batch or n)
        if step < n:
            return np.concatenate([self(windows[i:i + step]) for i in range(0, n, step)])
        import torch

        try:
            return self._run(windows)
        except torch.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if n == 1:
                raise ModelError(f"out of GPU memory on a single {'x'.join(map(str, windows.shape[1:-1]))} window: "
                                 "use a smaller --tile, --precision fp16/bf16, or a GPU with more memory") from None
            half = (n + 1) // 2
            log.warning("out of GPU memory on a batch of %d windows; retrying in batches of %d (a smaller "
                        "--batch-size avoids the retries)", n, half)
            self.max_batch = half
            return self(windows)

    def _run(self, windows: np.ndarray) -> np.ndarray:
        import torch

        if self._staging is not None:  # reused pinned buffers, copies on a side stream (see HostStaging)
            x = self._staging.to_device(windows, self.device)
        else:
            x = torch.from_numpy(np.ascontiguousarray(windows))
            if self.device != "cpu":
                x = x.to(self.device)
        # a (N, C, H, W) view of NHWC memory: channels-last, no copy
        x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1)).contiguous(memory_format=self._layout).float()
        mean, std = (self._mean, self._std) if self.dims == 2 else (self._mean[..., None], self._std[..., None])
        x = x.div_(self._scale).sub_(mean).div_(std).contiguous(memory_format=self._layout)
        n = x.shape[0]
        if len(self._views) > 1:
            x = torch.cat([_view(x, v) for v in self._views]).contiguous(memory_format=torch.channels_last)
        dtype = PRECISIONS[self.precision]
        amp = torch.autocast(self.device.split(":")[0], dtype=getattr(torch, dtype)) if dtype else \
            contextlib.nullcontext()
        with self._lock, torch.inference_mode(), amp:
            logits = self._net(x).float()
            if not self._activate:
                probs = logits
            else:
                probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
            if len(self._views) > 1:
                probs = sum(_view(probs[i * n:(i + 1) * n], v, inverse=True) for i, v in enumerate(self._views))
                probs = probs / len(self._views)
            return probs.float().cpu().numpy()


@functools.lru_cache(maxsize=4)
def cached_predictor(info: ModelInfo, bands: int, dtype: str, device: str, tta: str = "none",
                     precision: str = "fp32", compile: bool = False, backend: str = "torch") -> Predictor:
    """One predictor per model, band count, device, TTA mode and precision
    in each process (worker): the model is built once per worker."""
    from .allocator import keep_heap

    keep_heap()  # on a worker: undo the nanny's 64 KiB trim threshold (see tilerseg.allocator)
    _worker_threads()
    device = worker_device(device)
    model = instantiate(info)
    mean, std, scale = resolve_normalization(info.normalization, bands, dtype)
    log.debug("built %s/%s on %s", info.spec.arch, info.spec.encoder, device)
    return Predictor(model, mean=mean, std=std, scale=scale, device=device, tta=tta, precision=precision,
                     compile=compile, backend=backend, weights=info.weights)
