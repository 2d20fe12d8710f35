"""``tilerseg demo``: the whole pipeline on a slide the project generates.

Writes a synthetic pyramidal slide, segments its nuclei with the small model
shipped in the package, and reports the Dice score against the generator's
truth, plus a preview PNG. Needs no download."""
from __future__ import annotations

import os
from importlib import resources

import numpy as np

from . import synthetic
from .api import run
from .io import open_reader


def demo_weights() -> str:
    return str(resources.files("tilerseg") / "data" / "demo_unet.pt")


def demo(outdir, *, size: int = 3072, seed: int = 0, workers: int = 2, progress=None) -> dict:
    """Run the demo into ``outdir``; returns paths, Dice and the run report."""
    os.makedirs(outdir, exist_ok=True)
    slide = os.path.join(outdir, "slide.tif")
    mask = os.path.join(outdir, "mask.tif")
    synthetic.write_tiff(slide, (size, size), seed=seed, levels=3, compression="zlib")
    report = run(slide, mask, weights=demo_weights(), workers=workers, overwrite=True, progress=progress)
    inter = total = 0
    step = 1024
    with open_reader(mask) as m:
        for y in range(0, size, step):
            for x in range(0, size, step):
                h, w = min(step, size - y), min(step, size - x)
                pred = m.read((y, y + h), (x, x + w))[0][..., 0] == 1
                truth = synthetic.tile(y, x, h, w, seed)[1]
                inter += int((pred & truth).sum())
                total += int(pred.sum() + truth.sum())
    dice = 2 * inter / total if total else 1.0
    preview = os.path.join(outdir, "preview.png")
    _preview(slide, mask, preview)
    return {"slide": slide, "mask": mask, "preview": preview, "dice": dice, "report": report}


def _preview(slide: str, mask: str, path: str, side: int = 1024) -> None:
    """A thumbnail with the mask in green over the slide's smallest level."""
    from PIL import Image

    with open_reader(slide, level=2) as r:
        img = r.read((0, r.meta.shape[0]), (0, r.meta.shape[1]))[0]
    with open_reader(mask) as m:
        H, W = m.meta.shape
        f = max(1, -(-max(H, W) // side))
        rows = [m.read((y, min(y + f * 64, H)), (0, W))[0][::f, ::f, 0] for y in range(0, H, f * 64)]
        lab = np.concatenate(rows, axis=0)
    thumb = np.asarray(Image.fromarray(img).resize((lab.shape[1], lab.shape[0]), Image.Resampling.BOX)).astype(float)
    hit = lab == 1
    thumb[hit] = 0.45 * thumb[hit] + 0.55 * np.array([0, 230, 60])
    Image.fromarray(thumb.astype(np.uint8)).save(path)
