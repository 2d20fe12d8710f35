"""Training losses of the seeds, on top of segmentation-models-pytorch.

* :func:`unet_weight_map`: the U-Net paper's boundary weights, from
  distance transforms (milliseconds instead of the seed's half hour).
* :class:`DiceBCELoss`: ``1.0 * Dice + 0.8 * BCE`` (UNet++ seed).
* :class:`JaccardBCELoss`: ``BCE - log(soft Jaccard)`` (TernausNet).
* :class:`DiceCELoss`: multiclass cross-entropy plus Dice.
* :class:`WeightedCELoss`: cross-entropy weighted per pixel by a weight map.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def unet_weight_map(instances: np.ndarray, w0: float = 10.0, sigma: float = 5.0,
                    class_weights: Sequence[float] | None = None, eps: float = 1e-7) -> np.ndarray:
    """``w(x) = w_c(x) + w0 * exp(-(d1(x) + d2(x))**2 / (2 sigma**2))``.

    ``instances`` is a 2-D integer label image (0 = background). For a
    background pixel, ``d1``/``d2`` are the Euclidean distances to the
    nearest and second-nearest object; object pixels get ``w_c`` only.
    ``class_weights`` is ``(background, foreground)``; None means 1.

    Each object's distance transform is computed only within ``R`` px of it,
    where ``R`` is the distance beyond which the border term falls below
    ``eps`` (28 px for the defaults): pixels farther than ``R`` from their
    second object get a border term < ``eps``, counted as 0."""
    from scipy import ndimage

    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be a 2-D label image, got shape {inst.shape}")
    fg = inst > 0
    wc = np.ones(inst.shape, np.float32)
    if class_weights is not None:
        wc = np.where(fg, class_weights[1], class_weights[0]).astype(np.float32)
    radius = sigma * math.sqrt(2 * math.log(max(w0, eps) / eps)) if w0 > 0 else 0.0
    r = int(math.ceil(radius)) + 1
    d1 = np.full(inst.shape, np.inf, np.float32)
    d2 = np.full(inst.shape, np.inf, np.float32)
    H, W = inst.shape
    for label, box in enumerate(ndimage.find_objects(inst.astype(np.int64)), start=1):
        if box is None:
            continue
        win = (slice(max(0, box[0].start - r), min(H, box[0].stop + r)),
               slice(max(0, box[1].start - r), min(W, box[1].stop + r)))
        d = ndimage.distance_transform_edt(inst[win] != label).astype(np.float32)
        a, b = d1[win], d2[win]
        closer = d < a
        b[...] = np.where(closer, a, np.minimum(b, d))
        a[...] = np.where(closer, d, a)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))
    border[fg | ~np.isfinite(border)] = 0
    return (wc + border).astype(np.float32)


def _torch():
    import torch
    return torch


class DiceBCELoss:
    """``dice * Dice + bce * BCE`` on logits, binary (the UNet++ seed: 1.0 and 0.8)."""

    def __init__(self, dice: float = 1.0, bce: float = 0.8):
        import segmentation_models_pytorch as smp

        torch = _torch()
        self.w_dice, self.w_bce = dice, bce
        self._dice = smp.losses.DiceLoss("binary", from_logits=True)
        self._bce = torch.nn.BCEWithLogitsLoss()

    def __call__(self, logits, target):
        target = target.float()
        return self.w_dice * self._dice(logits, target) + self.w_bce * self._bce(logits, target)


class JaccardBCELoss:
    """``BCE - log(soft Jaccard)`` on logits, binary (TernausNet)."""

    def __init__(self, jaccard: float = 1.0):
        import segmentation_models_pytorch as smp

        torch = _torch()
        self.w = jaccard
        self._jac = smp.losses.JaccardLoss("binary", from_logits=True, log_loss=True)
        self._bce = torch.nn.BCEWithLogitsLoss()

    def __call__(self, logits, target):
        target = target.float()
        return self._bce(logits, target) + self.w * self._jac(logits, target)


class DiceCELoss:
    """Multiclass cross-entropy plus Dice, on logits ``(N, C, H, W)`` and
    integer targets ``(N, H, W)``; ``ignore_index`` pixels count in neither."""

    def __init__(self, dice: float = 1.0, ce: float = 1.0, ignore_index: int = 255):
        import segmentation_models_pytorch as smp

        torch = _torch()
        self.w_dice, self.w_ce = dice, ce
        self._dice = smp.losses.DiceLoss("multiclass", from_logits=True, ignore_index=ignore_index)
        self._ce = torch.nn.CrossEntropyLoss(ignore_index=ignore_index)

    def __call__(self, logits, target):
        target = target.long()
        return self.w_dice * self._dice(logits, target) + self.w_ce * self._ce(logits, target)


class WeightedCELoss:
    """Cross-entropy weighted per pixel (e.g. by :func:`unet_weight_map`):
    ``sum(w * ce) / sum(w)``."""

    def __call__(self, logits, target, weights):
        torch = _torch()
        ce = torch.nn.functional.cross_entropy(logits, target.long(), reduction="none")
        weights = weights.to(ce.dtype)
        return (weights * ce).sum() / weights.sum().clamp_min(1e-12)
