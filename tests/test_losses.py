"""Losses against their formulas; the U-Net weight map against brute force."""
import math

import numpy as np
import pytest
import torch

from tilerseg.losses import DiceBCELoss, DiceCELoss, JaccardBCELoss, WeightedCELoss, unet_weight_map


def _brute_weight_map(inst, w0=10.0, sigma=5.0, class_weights=None):
    H, W = inst.shape
    labels = [k for k in np.unique(inst) if k]
    pts = {k: np.argwhere(inst == k) for k in labels}
    out = np.zeros((H, W))
    for y in range(H):
        for x in range(W):
            wc = 1.0 if class_weights is None else class_weights[int(inst[y, x] > 0)]
            if inst[y, x] or len(labels) < 2:
                out[y, x] = wc
                continue
            d = sorted(np.sqrt(((pts[k] - (y, x)) ** 2).sum(1)).min() for k in labels)
            out[y, x] = wc + w0 * math.exp(-((d[0] + d[1]) ** 2) / (2 * sigma ** 2))
    return out


def _blobs(shape, n, seed):
    rng = np.random.default_rng(seed)
    inst = np.zeros(shape, np.int32)
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(0, shape[0]), rng.integers(0, shape[1]), rng.integers(2, 5)
        inst[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (inst == 0)] = k
    return inst


@pytest.mark.parametrize("seed", [0, 1])
def test_weight_map_equals_brute_force(seed):
    inst = _blobs((48, 56), 7, seed)
    got = unet_weight_map(inst)
    ref = _brute_weight_map(inst)
    assert np.abs(got - ref).max() < 1e-5
    assert got.max() > 2  # objects close enough to weigh their gap


def test_weight_map_class_weights_and_degenerate_masks():
    inst = _blobs((30, 30), 4, 3)
    got = unet_weight_map(inst, class_weights=(0.5, 2.0), w0=5, sigma=3)
    assert np.abs(got - _brute_weight_map(inst, 5, 3, (0.5, 2.0))).max() < 1e-5
    assert (unet_weight_map(np.zeros((8, 8), int)) == 1).all()
    one = np.zeros((8, 8), int)
    one[2:4, 2:4] = 1
    assert (unet_weight_map(one) == 1).all()  # no second object: no border term


def test_binary_losses_match_formulas():
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16)
    target = (torch.rand(2, 1, 16, 16) > 0.6).float()
    p = torch.sigmoid(logits)
    bce = torch.nn.functional.binary_cross_entropy(p, target)
    inter, total = (p * target).sum(), p.sum() + target.sum()
    dice = 1 - (2 * inter) / total
    jac = inter / (total - inter)
    assert DiceBCELoss()(logits, target).item() == pytest.approx((dice + 0.8 * bce).item(), rel=1e-4)
    assert JaccardBCELoss()(logits, target).item() == pytest.approx((bce - torch.log(jac)).item(), rel=1e-4)


def test_multiclass_and_weighted_ce():
    torch.manual_seed(1)
    logits = torch.randn(2, 3, 8, 8)
    target = torch.randint(0, 3, (2, 8, 8))
    ce = torch.nn.functional.cross_entropy(logits, target)
    assert DiceCELoss(dice=0.0)(logits, target).item() == pytest.approx(ce.item(), rel=1e-5)
    assert DiceCELoss()(logits, target).item() > ce.item()
    w = torch.ones(2, 8, 8)
    assert WeightedCELoss()(logits, target, w).item() == pytest.approx(ce.item(), rel=1e-5)
    w[0] = 0
    only1 = torch.nn.functional.cross_entropy(logits[1:], target[1:])
    assert WeightedCELoss()(logits, target, w).item() == pytest.approx(only1.item(), rel=1e-5)
