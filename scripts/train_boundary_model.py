"""Train a 3-class nuclei model (background / interior / boundary) on dense synthetic nuclei.

Usage: python scripts/train_boundary_model.py [--steps 300] [--out demo_boundary.pt]

The demo model's architecture (smp Unet, timm ResNet-18 cut at depth 3,
3 MB), three classes, trained on crops of tilerseg.synthetic.dense_nuclei
with the U-Net paper's weight map (tilerseg.losses.unet_weight_map of the
true instances: heavy weights in the gaps between touching nuclei). The
boundary class is each object's pixels that touch another object or the
background; the checkpoint names it ``boundary``, so ``--instances``
splits by it (tilerseg.api.instance_options). Issue 37's experiment."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def targets(labels: np.ndarray) -> np.ndarray:
    """0 background, 1 interior, 2 boundary: an object's pixels with a
    4-neighbour of another label (another object or the background)."""
    pad = np.pad(labels, 1, mode="edge")
    edge = np.zeros(labels.shape, bool)
    for dy, dx in ((0, 1), (2, 1), (1, 0), (1, 2)):
        edge |= pad[dy:dy + labels.shape[0], dx:dx + labels.shape[1]] != labels
    out = (labels > 0).astype(np.int64)
    out[(labels > 0) & edge] = 2
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_boundary.pt")
    a = p.parse_args()
    import torch

    from tilerseg.infer import IMAGENET_MEAN, IMAGENET_STD
    from tilerseg.losses import WeightedCELoss, unet_weight_map
    from tilerseg.models import ModelInfo, ModelSpec, Normalization, instantiate, save_checkpoint
    from tilerseg.synthetic import dense_nuclei

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    kwargs = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    spec = ModelSpec(arch="unet", encoder="tu-resnet18", classes=3, in_channels=3, kwargs=ModelSpec.freeze(kwargs))
    model = instantiate(ModelInfo(spec=spec)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=a.steps)
    loss_fn = WeightedCELoss()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    side = 4 * a.crop  # crops of 512^2 fixtures (seeds 100+: the benchmarks use 0)
    pool = [dense_nuclei((side, side), seed=100 + s) for s in range(12)]

    def batch():
        xs, ys, ws = [], [], []
        for _ in range(a.batch):
            rgb, lab = pool[int(rng.integers(len(pool)))]
            y0, x0 = rng.integers(0, side - a.crop, 2)
            lab = lab[y0:y0 + a.crop, x0:x0 + a.crop].astype(np.int32)
            xs.append(rgb[y0:y0 + a.crop, x0:x0 + a.crop])
            ys.append(targets(lab))
            ws.append(unet_weight_map(lab).astype(np.float32))
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
        return (x - mean) / std, torch.from_numpy(np.stack(ys)), torch.from_numpy(np.stack(ws))

    t0 = time.time()
    for step in range(a.steps):
        x, y, w = batch()
        loss = loss_fn(model(x), y, w)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 25 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    info = ModelInfo(spec=spec, normalization=Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=255.0),
                     class_names=("background", "nucleus", "boundary"), mpp=0.5, tile=512, halo=96,
                     input_dtype="uint8", input_range=(0.0, 255.0))
    save_checkpoint(os.path.abspath(a.out), model, info)
    print(f"wrote {a.out} ({os.path.getsize(a.out) / 1e6:.1f} MB) in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
