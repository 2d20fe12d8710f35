"""Train the small demo model shipped in tilerseg/data/demo_unet.pt.

Usage: python scripts/train_demo_model.py [--steps 400] [--out tilerseg/data/demo_unet.pt]

smp Unet with a timm ResNet-18 encoder cut at depth 3 (0.77 M parameters,
3 MB, output stride 8, no global pooling: seam-exact), trained on random
crops of the procedural slide generator (tilerseg.synthetic) to find nuclei,
with Dice + BCE. Takes a couple of minutes on 2 CPU cores. The checkpoint
records the architecture, normalisation, class names, mpp and a recommended
tile and halo, so `tilerseg run --weights demo_unet.pt` needs no other flag."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "tilerseg", "data", "demo_unet.pt"))
    a = p.parse_args()
    import segmentation_models_pytorch as smp
    import torch

    from tilerseg import synthetic
    from tilerseg.infer import IMAGENET_MEAN, IMAGENET_STD
    from tilerseg.models import ModelInfo, ModelSpec, Normalization, instantiate, save_checkpoint

    torch.manual_seed(a.seed)
    rng = np.random.default_rng(a.seed)
    kwargs = {"encoder_depth": 3, "decoder_channels": [32, 16, 8]}
    spec = ModelSpec(arch="unet", encoder="tu-resnet18", classes=1, in_channels=3, kwargs=ModelSpec.freeze(kwargs))
    model = instantiate(ModelInfo(spec=spec)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=a.steps)
    dice = smp.losses.DiceLoss("binary", from_logits=True)
    bce = torch.nn.BCEWithLogitsLoss()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    seeds = (1, 2, 3, 4)  # training images; the demo uses seed 0, never seen here

    def batch():
        xs, ys = [], []
        for _ in range(a.batch):
            y0, x0 = rng.integers(0, 20000, 2)
            img, mask = synthetic.tile(int(y0), int(x0), a.crop, a.crop, int(rng.choice(seeds)))
            xs.append(img)
            ys.append(mask)
        x = torch.from_numpy(np.stack(xs)).permute(0, 3, 1, 2).float() / 255
        return (x - mean) / std, torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))

    t0 = time.time()
    for step in range(a.steps):
        x, y = batch()
        logits = model(x)
        loss = dice(logits, y) + 0.8 * bce(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == a.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  {time.time() - t0:.0f} s", flush=True)
    model.eval()
    info = ModelInfo(spec=spec, normalization=Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=255.0),
                     class_names=("background", "nucleus"), mpp=0.5, tile=512, halo=96, input_dtype="uint8",
                     input_range=(0.0, 255.0))
    out = os.path.abspath(a.out)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    save_checkpoint(out, model, info)
    print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
