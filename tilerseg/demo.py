"""``tilerseg demo``: the whole pipeline on a slide the project generates.

Writes a synthetic pyramidal slide, segments its nuclei with the small model
shipped in the package, and reports the Dice score against the generator's
truth, plus a preview PNG. Needs no download."""
from __future__ import annotations

import os
from . import synthetic
from .api import run
from .io import open_reader
from .models import demo_weights


def demo(outdir, *, size: int = 3072, seed: int = 0, workers: int = 2, progress=None) -> dict:
    """Run the demo into ``outdir``; returns paths, Dice and the run report."""
    os.makedirs(outdir, exist_ok=True)
    slide = os.path.join(outdir, "slide.tif")
    mask = os.path.join(outdir, "mask.tif")
    preview = os.path.join(outdir, "preview.png")
    synthetic.write_tiff(slide, (size, size), seed=seed, levels=3, compression="zlib")
    report = run(slide, mask, weights=demo_weights(), workers=workers, overwrite=True, preview=preview,
                 progress=progress)
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
    return {"slide": slide, "mask": mask, "preview": preview, "dice": dice, "report": report}
