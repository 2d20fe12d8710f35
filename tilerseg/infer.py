"""Numpy windows in, probabilities out: normalisation, batching, device.

The only module besides ``models`` that touches torch. One
:class:`Predictor` per model and device per process; dask tasks share it,
and a lock lets one batch run at a time so that reading and writing in
other threads overlap the model instead of competing with it for cores."""
from __future__ import annotations

import functools
import logging
import threading

import numpy as np

from .errors import InputError, ModelError
from .models import ModelInfo, Normalization, instantiate

log = logging.getLogger(__name__)

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MEAN, GRAY_STD = 0.449, 0.226  # ImageNet's, averaged over RGB


def resolve_normalization(norm: Normalization, bands: int, dtype) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-band mean, std and the divisor that maps pixels to [0, 1].

    Defaults: ImageNet mean/std for 3 bands, their average for any other
    band count; the divisor is the integer dtype's maximum, 1 for floats."""
    dtype = np.dtype(dtype)
    scale = norm.scale if norm.scale else (float(np.iinfo(dtype).max) if dtype.kind in "ui" else 1.0)
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


def output_stride(model) -> int:
    """The model's total down-sampling factor: window sides must be multiples."""
    enc = getattr(model, "encoder", None)
    return int(getattr(enc, "output_stride", None) or getattr(model, "output_stride", None) or 32)


TTA_MODES = ("none", "flips", "d4")


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


class Predictor:
    """Run ``model`` on batches of windows ``(N, T, T, bands)`` of raw pixels
    and return float32 probabilities ``(N, classes, T, T)``: sigmoid for one
    class, softmax over classes otherwise.

    ``tta`` averages the probabilities over flipped (``flips``: 4 views) or
    flipped and rotated (``d4``: 8 views) copies of each window, each mapped
    back before averaging; all views go through the model in one batch."""

    def __init__(self, model, *, mean, std, scale: float, device: str = "cpu", tta: str = "none"):
        import torch

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
        self._mean = torch.as_tensor(np.asarray(mean, np.float32), device=self.device).view(1, -1, 1, 1)
        self._std = torch.as_tensor(np.asarray(std, np.float32), device=self.device).view(1, -1, 1, 1)
        self._scale = float(scale)
        self._lock = threading.Lock()

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(windows)).to(self.device)
        # a (N, C, H, W) view of NHWC memory: channels-last, no copy
        x = x.permute(0, x.dim() - 1, *range(1, x.dim() - 1)).float()
        mean, std = (self._mean, self._std) if self.dims == 2 else (self._mean[..., None], self._std[..., None])
        x = x.div_(self._scale).sub_(mean).div_(std).contiguous(memory_format=self._format)
        n = x.shape[0]
        if len(self._views) > 1:
            x = torch.cat([_view(x, v) for v in self._views]).contiguous(memory_format=torch.channels_last)
        with self._lock, torch.inference_mode():
            logits = self.model(x)
            probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)
            if len(self._views) > 1:
                probs = sum(_view(probs[i * n:(i + 1) * n], v, inverse=True) for i, v in enumerate(self._views))
                probs = probs / len(self._views)
            return probs.float().cpu().numpy()


@functools.lru_cache(maxsize=4)
def cached_predictor(info: ModelInfo, bands: int, dtype: str, device: str, tta: str = "none") -> Predictor:
    """One predictor per model, band count, device and TTA mode in each process (worker)."""
    model = instantiate(info)
    mean, std, scale = resolve_normalization(info.normalization, bands, dtype)
    log.debug("built %s/%s on %s", info.spec.arch, info.spec.encoder, device)
    return Predictor(model, mean=mean, std=std, scale=scale, device=device, tta=tta)
