"""Training losses of the seeds, on top of segmentation-models-pytorch.

* :func:`unet_weight_map`: the U-Net paper's boundary weights, from
  distance transforms (milliseconds instead of the seed's half hour).
* :class:`DiceBCELoss`: ``1.0 * Dice + 0.8 * BCE`` (UNet++ seed).
* :class:`JaccardBCELoss`: ``BCE - log(soft Jaccard)`` (TernausNet).
* :class:`DiceCELoss`: multiclass cross-entropy plus Dice.
* :class:`WeightedCELoss`: cross-entropy weighted per pixel by a weight map
  (``unet_weighted`` in training, with :func:`instance_weights`).
* :class:`CELoss`: plain multiclass cross-entropy.

Every loss leaves out pixels labelled ``ignore_index`` (255): nodata and
unannotated pixels of sparse annotations.
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
    inst = np.asarray(instances)
    if inst.ndim != 2:
        raise ValueError(f"instances must be a 2-D label image, got shape {inst.shape}")
    fg = inst > 0
    wc = np.ones(inst.shape, np.float32)
    if class_weights is not None:
        wc = np.where(fg, class_weights[1], class_weights[0]).astype(np.float32)
    radius = sigma * math.sqrt(2 * math.log(max(w0, eps) / eps)) if w0 > 0 else 0.0
    d1, d2 = nearest_two(inst, int(math.ceil(radius)) + 1)
    border = w0 * np.exp(-((d1 + d2) ** 2) / (2 * sigma ** 2))
    border[fg | ~np.isfinite(border)] = 0
    return (wc + border).astype(np.float32)


def nearest_two(instances: np.ndarray, reach: int) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel of a 2-D label image (0 = background), the Euclidean
    distances to the nearest and the second-nearest object, each object's
    distance transform taken within ``reach`` px of its box only (``inf``
    beyond: an object farther than ``reach`` is not counted)."""
    from scipy import ndimage

    inst = np.asarray(instances)
    d1 = np.full(inst.shape, np.inf, np.float32)
    d2 = np.full(inst.shape, np.inf, np.float32)
    H, W = inst.shape
    for label, box in enumerate(ndimage.find_objects(inst.astype(np.int64)), start=1):
        if box is None:
            continue
        win = (slice(max(0, box[0].start - reach), min(H, box[0].stop + reach)),
               slice(max(0, box[1].start - reach), min(W, box[1].stop + reach)))
        d = ndimage.distance_transform_edt(inst[win] != label).astype(np.float32)
        a, b = d1[win], d2[win]
        closer = d < a
        b[...] = np.where(closer, a, np.minimum(b, d))
        a[...] = np.where(closer, d, a)
    return d1, d2


def _torch():
    import torch
    return torch


def _binary(logits, target, ignore_index):
    """Binary targets as ``(N, 1, H, W)`` floats, and the mask of counted pixels."""
    if target.dim() == logits.dim() - 1:
        target = target.unsqueeze(1)
    keep = target != ignore_index if ignore_index is not None else None
    target = target.float() if keep is None else target.float() * keep
    return target, keep


def _masked_bce(logits, target, keep):
    torch = _torch()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    if keep is None:
        return bce.mean()
    return (bce * keep).sum() / keep.sum().clamp_min(1)


class DiceBCELoss:
    """``dice * Dice + bce * BCE`` on logits, binary (the UNet++ seed: 1.0
    and 0.8). Targets are 0/1, ``(N, H, W)`` or ``(N, 1, H, W)``;
    ``ignore_index`` pixels count in neither term."""

    def __init__(self, dice: float = 1.0, bce: float = 0.8, ignore_index: int | None = 255):
        import segmentation_models_pytorch as smp

        self.w_dice, self.w_bce, self.ignore = dice, bce, ignore_index
        self._dice = smp.losses.DiceLoss("binary", from_logits=True, ignore_index=ignore_index)

    def __call__(self, logits, target):
        raw = target.unsqueeze(1) if target.dim() == logits.dim() - 1 else target
        target, keep = _binary(logits, target, self.ignore)
        return self.w_dice * self._dice(logits, raw) + self.w_bce * _masked_bce(logits, target, keep)


class JaccardBCELoss:
    """``BCE - jaccard * log(soft Jaccard)`` on logits, binary (TernausNet);
    ``ignore_index`` pixels count in neither term."""

    def __init__(self, jaccard: float = 1.0, ignore_index: int | None = 255):
        self.w, self.ignore = jaccard, ignore_index

    def __call__(self, logits, target):
        torch = _torch()
        target, keep = _binary(logits, target, self.ignore)
        p = torch.sigmoid(logits.float())
        if keep is not None:
            p = p * keep
        inter = (p * target).sum()
        union = p.sum() + target.sum() - inter
        jaccard = (inter + 1e-7) / (union + 1e-7)
        return _masked_bce(logits, target, keep) - self.w * torch.log(jaccard)


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
    ``sum(w * ce) / sum(w)``; ``ignore_index`` pixels get no weight."""

    def __init__(self, ignore_index: int = 255):
        self.ignore = ignore_index

    def __call__(self, logits, target, weights):
        torch = _torch()
        target = target.long()
        weights = weights * (target != self.ignore)
        ce = torch.nn.functional.cross_entropy(logits.float(), target.clamp_max(logits.shape[1] - 1),
                                               reduction="none")
        weights = weights.to(ce.dtype)
        return (weights * ce).sum() / weights.sum().clamp_min(1e-12)


class CELoss:
    """Plain multiclass cross-entropy; ``ignore_index`` pixels do not count."""

    def __init__(self, ignore_index: int = 255):
        self._ce = _torch().nn.CrossEntropyLoss(ignore_index=ignore_index)

    def __call__(self, logits, target):
        return self._ce(logits.float(), target.long())


def instance_weights(labels: np.ndarray, w0: float = 10.0, sigma: float = 5.0, class_weights=None,
                     ignore_index: int = 255) -> np.ndarray:
    """:func:`unet_weight_map` for a class-label crop: the objects are the
    4-connected components of every class but 0 (and the ignore label)."""
    from scipy import ndimage

    lab = np.asarray(labels)
    inst = np.zeros(lab.shape, np.int32)
    n = 0
    for k in np.unique(lab):
        if k == 0 or k == ignore_index:
            continue
        comp, m = ndimage.label(lab == k)
        inst[comp > 0] = comp[comp > 0] + n
        n += m
    return unet_weight_map(inst, w0=w0, sigma=sigma, class_weights=class_weights)


LOSSES = {"dice_bce": DiceBCELoss, "jaccard_bce": JaccardBCELoss, "ce_dice": DiceCELoss, "ce": CELoss,
          "unet_weighted": WeightedCELoss}


def make_loss(name: str, **kwargs):
    """The loss called ``name`` (see :data:`LOSSES`); ``unet_weighted``
    takes its weight map as a third argument (see :func:`instance_weights`)."""
    if name == "unet_weighted":
        return WeightedCELoss(**{k: v for k, v in kwargs.items() if k == "ignore_index"})
    return LOSSES[name](**kwargs)
