"""The 3-class target of issue 26's ablation: cell / membrane / thin membrane between two cells.

ISBI's labels have two classes (0 membrane, 255 cell). ``labels`` writes a
third, 128, on the membrane pixels where two different cells are at most
``--width`` px apart (d1 + d2 <= width, d1 and d2 the distances to the
nearest and second-nearest cell, as the U-Net weight map measures them:
:func:`tilerseg.losses.nearest_two`): the thin membranes whose loss merges
two cells. Train on them with a multiclass loss, then ``score`` folds the
model's three probabilities back to P(cell) (thin membrane is membrane)
and gives the challenge's figures of the plain threshold and of the cells
(:func:`tilerseg.instances.label_array`, as ``eval --instances``):

    python scripts/em_three_class.py labels ISBI/label /tmp/em3/label        # images: link ISBI/image
    tilerseg train pipelines/em-membranes.yaml -o runs/em-3class --set images=ISBI/image \\
        --set masks=/tmp/em3/label --set "data.class_names=[membrane, cell, thin]" \\
        --set "data.mask_values=[0, 255, 128]" --set loss=ce_dice --set "loss_args={dice: 1.0, ce: 1.0}" \\
        --set train.monitor=iou --set infer.sweep_threshold=false
    python scripts/em_three_class.py score runs/em-3class/best.pt VAL/image VAL/label \\
        --object-threshold 0.2 --marker-threshold 0.9 --split-depth 9 --min-area 30 --join-below 0.3

Scores slices whole (one mirror-padded window each, the checkpoint's halo
and TTA), so it is for slices the size of ISBI's, not for slides."""
from __future__ import annotations

import argparse
import os

import numpy as np


def labels(src: str, out: str, width: float) -> None:
    from PIL import Image
    from scipy import ndimage

    from tilerseg.losses import nearest_two

    os.makedirs(out, exist_ok=True)
    shares = []
    for name in sorted(os.listdir(src)):
        lab = np.asarray(Image.open(os.path.join(src, name)))
        cells, _ = ndimage.label(lab == 255)
        d1, d2 = nearest_two(cells, int(np.ceil(width)) + 1)
        thin = (lab == 0) & (d1 + d2 <= width)
        three = np.where(lab == 255, 255, np.where(thin, 128, 0)).astype(np.uint8)
        Image.fromarray(three).save(os.path.join(out, name))
        shares.append(thin.sum() / max(1, (lab == 0).sum()))
    print(f"{len(shares)} label(s) in {out}: thin membrane (d1 + d2 <= {width:g} px) is {np.mean(shares):.0%} of "
          f"the membrane ({min(shares):.0%}-{max(shares):.0%})")


def score(a) -> None:
    from PIL import Image

    from tilerseg.api import PredictorRef, model_info
    from tilerseg.instances import InstanceOptions, label_array
    from tilerseg.train.challenge import segmentation_scores
    from tilerseg.train.data import find_pairs
    from tilerseg.train.metrics import confusion, scores

    info = model_info("unet", weights=a.weights, bands=1)
    predictor = PredictorRef(info, 1, np.dtype("uint8").str, "cpu", info.tta).get()
    halo = info.halo or 96
    cells = InstanceOptions(threshold=a.object_threshold, depth=a.split_depth, min_area=a.min_area,
                            markers=a.marker_threshold, join=a.join_below)
    rows = {"threshold only": [], "cells": []}
    for pair in find_pairs(a.images, a.masks):
        image = np.asarray(Image.open(pair.image))
        truth = np.asarray(Image.open(pair.mask)) == 255
        window = np.pad(image, halo, mode="reflect")[None, ..., None]
        p_cell = predictor(window)[0][1, halo:-halo, halo:-halo]  # softmax: membrane + thin + cell = 1
        for name, t, on in (("threshold only", 0.5, p_cell > 0.5),
                            ("cells", a.object_threshold, label_array(p_cell[None], cells) > 0)):
            rows[name].append((segmentation_scores(truth, on, p_cell, t),
                               confusion(truth.astype(np.uint8), on.astype(np.uint8), 2)))
    for name, got in rows.items():
        s = [g[0] for g in got]
        print(f"{name:<15} pixel error {scores(sum(g[1] for g in got))['pixel_error']:.4f}  adapted Rand "
              f"{np.mean([x['adapted_rand_error'] for x in s]):.4f}  warping "
              f"{np.mean([x['warping_error'] for x in s]):.6f}  splits {sum(x['splits'] for x in s)}  mergers "
              f"{sum(x['mergers'] for x in s)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    lab = sub.add_parser("labels", help="write 3-class labels (0 membrane, 128 thin membrane, 255 cell)")
    lab.add_argument("src")
    lab.add_argument("out")
    lab.add_argument("--width", type=float, default=6.0, help="d1 + d2 at most this: thin membrane (default 6 px)")
    sc = sub.add_parser("score", help="the challenge's figures of a 3-class model, folded to P(cell)")
    sc.add_argument("weights")
    sc.add_argument("images")
    sc.add_argument("masks")
    sc.add_argument("--object-threshold", type=float, default=0.2)
    sc.add_argument("--marker-threshold", type=float, default=0.9)
    sc.add_argument("--split-depth", type=float, default=9)
    sc.add_argument("--min-area", type=int, default=30)
    sc.add_argument("--join-below", type=float, default=0.3)
    a = ap.parse_args()
    if a.cmd == "labels":
        labels(a.src, a.out, a.width)
    else:
        score(a)


if __name__ == "__main__":
    main()
