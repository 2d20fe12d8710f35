"""Segmentation metrics from confusion matrices: IoU, Dice and pixel error
per class, pooled over pixels (so a score over many images or blocks is the
sum of their matrices, never an average of averages).

"Pixel error" is the ISBI 2012 challenge's, the one the U-Net paper reports
(0.0611): for two classes, 1 - the F-score of class 1 (the label's non-zero
pixels; the cell interior in ``pipelines/em-membranes.yaml``), pooled over
the images, at the threshold used (the challenge took the best of a sweep of
thresholds; a threshold chosen on validation data does that here), as in
``PixelError`` of Fiji's Trainable Segmentation, which scored the challenge.
The fraction of pixels classified wrongly, which some call pixel error, is
``misclassified``; with more than two classes there is no F-score to take,
and ``pixel_error`` is that fraction.

Rows of a confusion matrix are the truth, columns the prediction; pixels
whose truth is the ignore label are not counted."""
from __future__ import annotations

import numpy as np

IGNORE = 255  # the label value training and evaluation leave out (nodata, unannotated)


def confusion(truth: np.ndarray, pred: np.ndarray, classes: int) -> np.ndarray:
    """``(classes, classes)`` int64 counts of (truth, prediction) pairs."""
    truth = np.asarray(truth).ravel()
    pred = np.asarray(pred).ravel()
    keep = truth < classes
    idx = truth[keep].astype(np.int64) * classes + np.minimum(pred[keep], classes - 1).astype(np.int64)
    return np.bincount(idx, minlength=classes * classes).reshape(classes, classes)


def scores(cm: np.ndarray, class_names=None) -> dict:
    """Per-class IoU and Dice, pixel error (see above), the fraction
    ``misclassified``, and the headline ``iou``/``dice``: the foreground
    class's for two classes, the mean over the classes other than 0
    otherwise. A class absent from both truth and prediction scores
    NaN (and is left out of the means)."""
    cm = np.asarray(cm, np.float64)
    k = cm.shape[0]
    tp = np.diag(cm)
    fn = cm.sum(1) - tp
    fp = cm.sum(0) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = tp / (tp + fp + fn)
        dice = 2 * tp / (2 * tp + fp + fn)
    total = cm.sum()
    names = list(class_names) if class_names and len(class_names) == k else [str(i) for i in range(k)]
    fg = slice(1, None) if k > 1 else slice(0, None)
    wrong = float(1 - tp.sum() / total) if total else float("nan")
    return {
        "iou": _mean(iou[fg]), "dice": _mean(dice[fg]),
        "pixel_error": float(1 - dice[1]) if k == 2 and total else wrong,
        "misclassified": wrong,
        "pixels": int(total),
        "per_class": {n: {"iou": _num(i), "dice": _num(d)} for n, i, d in zip(names, iou, dice)},
    }


def _mean(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _num(v) -> float:
    return float(v)


def object_scores(truth: np.ndarray, pred: np.ndarray, iou: float = 0.5) -> dict:
    """Instance scores of labels ``pred`` against ``truth`` (0 = none).

    A true and a predicted object match when their IoU is at least ``iou``
    (pairs taken by falling IoU, each object once: above 0.5 a match is
    unique anyway). ``f1`` = 2 matched / (true + predicted objects).
    ``merges``: predicted objects holding most (over half the pixels) of
    two or more true objects; ``splits``: true objects holding most of two
    or more predicted objects (each counted once). The scores of
    ``scripts/bench_instances.py`` and the instance tests."""
    t, p = truth.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    nt, np_ = int(np.unique(t[t > 0]).size), int(np.unique(p[p > 0]).size)
    at, ap = np.bincount(t), np.bincount(p)
    both = (t > 0) & (p > 0)
    pairs, inter = np.unique(t[both] * (int(p.max()) + 1) + p[both], return_counts=True)
    ti, pi = np.divmod(pairs, int(p.max()) + 1)
    union = at[ti] + ap[pi] - inter
    ratio = inter / union
    order = np.lexsort((pi, ti, -ratio))
    used_t, used_p, matched = set(), set(), 0
    for k in order[ratio[order] >= iou]:
        if ti[k] not in used_t and pi[k] not in used_p:
            used_t.add(ti[k])
            used_p.add(pi[k])
            matched += 1
    most_t = 2 * inter > at[ti]  # the pair holds most of the true object
    most_p = 2 * inter > ap[pi]
    merges = int((np.bincount(pi[most_t], minlength=ap.size) >= 2).sum())
    splits = int((np.bincount(ti[most_p], minlength=at.size) >= 2).sum())
    total = nt + np_
    return {"true": nt, "predicted": np_, "matched": matched, "f1": 2 * matched / total if total else 1.0,
            "merges": merges, "splits": splits, "count_error": (np_ - nt) / nt if nt else 0.0}
