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
