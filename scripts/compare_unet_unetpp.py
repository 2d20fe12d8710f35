"""Unet against Unet++ (resnet18 and resnet34 encoders) and TernausNet-11 on
the ISBI 2012 membranes, one budget and seed for all, as one table.

Usage: python scripts/compare_unet_unetpp.py [--epochs 6] [--minutes 20]
       [--data ../shared/data/isbi2012] [--models unet-resnet18,...] [--out runs/compare]

Every model trains from scratch (``encoder_weights: None``: no ImageNet
weights, nothing is downloaded) on slices 0-19 (``--val`` picks others) with the data, augmentation,
crop, batch, optimiser, schedule and seed of ``pipelines/em-membranes.yaml``,
for the same number of epochs (``--minutes`` is a safety stop that also ends
the slow ones early; the table says how far each got). Unet and Unet++ use
the Dice + BCE loss of the UNet++ paper and threshold 0.5; TernausNet-11 uses
its paper's BCE - log Jaccard and threshold 0.3. The best epoch of each
(pixel error on slices 20-24) is then scored on 20-24 with the recipe's d4
test-time augmentation: pixel error, the challenge's adapted Rand error and
warping error, IoU of the cell interiors, and the training minutes."""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "..", "pipelines", "em-membranes.yaml")
MODELS = {
    "unet-resnet18": {"model": "unet", "encoder": "resnet18"},
    "unet-resnet34": {"model": "unet", "encoder": "resnet34"},
    "unetpp-resnet18": {"model": "unetplusplus", "encoder": "resnet18"},
    "unetpp-resnet34": {"model": "unetplusplus", "encoder": "resnet34"},
    "ternausnet11": {"model": "ternausnet11", "loss": "jaccard_bce", "loss_args": {"jaccard": 1.0},
                     "threshold": 0.3},
}


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        name = platform.processor() or "unknown CPU"
    return f"{name}, {os.cpu_count()} core(s)"


def run_one(name: str, a) -> dict:
    """Train ``name`` with the shared budget; its scores on slices 20-24."""
    from tilerseg.train import evaluate, load_train_config, train

    over = {"images": os.path.join(a.data, "image"), "masks": os.path.join(a.data, "label"),
            "model_args": {}, "encoder_weights": None, "loss": "dice_bce", "loss_args": {"dice": 1.0, "bce": 0.8},
            "epochs": a.epochs, "max_minutes": a.minutes, "samples_per_epoch": a.samples_per_epoch,
            "seed": a.seed, "tta": "none", "sweep_threshold": False, "threshold": 0.5,
            "val_names": [v.strip() for v in a.val.split(",")]}
    over.update(MODELS[name])
    cfg = load_train_config(RECIPE, over)
    res = train(cfg, os.path.join(a.out, name), progress=False)
    val = [f"{v}.png" for v in cfg.val_names]
    ev, th = evaluate(res.best, [os.path.join(cfg.images, v) for v in val], [os.path.join(cfg.masks, v) for v in val],
                      tta=a.tta, threshold=cfg.threshold)
    f = ev.report(th)["overall"]
    return {"model": name, "epochs": res.epochs_run, "best_epoch": res.best_epoch, "minutes": res.seconds / 60,
            "threshold": th, "pixel_error": f["pixel_error"], "adapted_rand_error": f.get("adapted_rand_error"),
            "warping_error": f.get("warping_error"), "iou": f["iou"]}


def table(rows: list[dict]) -> str:
    head = f"| model | epochs | training min | threshold | pixel error | adapted Rand error | warping error | IoU |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        num = lambda v, fmt: "n/a" if v is None else format(v, fmt)
        lines.append(f"| {r['model']} | {r['epochs']} | {r['minutes']:.1f} | {r['threshold']:g} | "
                     f"{num(r['pixel_error'], '.4f')} | {num(r['adapted_rand_error'], '.4f')} | "
                     f"{num(r['warping_error'], '.6f')} | {num(r['iou'], '.4f')} |")
    return "\n".join(lines)


def main() -> int:
    from tilerseg.allocator import keep_heap

    keep_heap()  # as the tilerseg command does, before any thread: training runs as `tilerseg train` would
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "isbi2012"),
                   help="folder with image/ and label/ (ISBI slices 0-24)")
    p.add_argument("--models", default="unet-resnet18,unetpp-resnet18,unet-resnet34,unetpp-resnet34,ternausnet11",
                   help=f"comma-separated, of {', '.join(MODELS)}")
    p.add_argument("--epochs", type=int, default=6, help="epochs for every model")
    p.add_argument("--samples-per-epoch", type=int, default=400)
    p.add_argument("--minutes", type=float, default=30.0, help="safety stop per model (wall minutes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tta", default="d4", choices=("none", "flips", "d4"))
    p.add_argument("--val", default="20,21,22,23,24", help="validation slices (the rest train)")
    p.add_argument("--out", default=os.path.join("runs", "compare"), help="one run folder per model under here")
    a = p.parse_args()
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    bad = [n for n in names if n not in MODELS]
    if bad:
        print(f"unknown model(s) {', '.join(bad)}; valid: {', '.join(MODELS)}", file=sys.stderr)
        return 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    for n in names:
        rows.append(run_one(n, a))
        print(f"{n}: {json.dumps(rows[-1])}", file=sys.stderr, flush=True)
    print(f"ISBI 2012, validation slices {a.val}; {a.epochs} epochs x {a.samples_per_epoch} crops, "
          f"seed {a.seed}, tta {a.tta}, no pretrained encoder; {_cpu()}")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
