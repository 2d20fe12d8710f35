"""``tilerseg demo``: the whole pipeline on a slide the project generates.

Writes a synthetic pyramidal slide, segments its nuclei with the small model
shipped in the package, and reports the Dice score against the generator's
truth, plus a preview PNG. Needs no download."""
from __future__ import annotations

import os
from . import synthetic
from .api import run
from .errors import InputError, OutputError
from .io import open_reader
from .models import demo_weights


MIN_SIZE, MAX_SIZE = 256, 65536


OUTPUTS = ("slide.tif", "mask.tif", "preview.png")


def demo(outdir, *, size: int = 3072, seed: int = 0, workers: int = 2, progress=None,
         overwrite: bool = False) -> dict:
    """Run the demo into ``outdir``; returns paths, Dice and the run report.
    Outputs of an earlier demo there are replaced only with ``overwrite``,
    as ``tilerseg run`` replaces an output."""
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise InputError(f"--size {size}: the demo slide's side must be {MIN_SIZE} to {MAX_SIZE} px")
    slide, mask, preview = (os.path.normpath(os.path.join(outdir, name)) for name in OUTPUTS)
    there = [p for p in (slide, mask, preview) if os.path.exists(p)]
    if there and not overwrite:
        raise OutputError(f"{there[0]}: already exists (an earlier demo); pass --overwrite to replace the demo's "
                          "outputs, or give another folder")
    os.makedirs(outdir, exist_ok=True)
    tmp = os.path.join(outdir, ".slide.tif.partial")
    synthetic.write_tiff(tmp, (size, size), seed=seed, levels=3, compression="zlib")
    os.replace(tmp, slide)  # a slide.tif is always complete
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
    return {"slide": slide, "mask": mask, "preview": preview, "dice": dice, "report": report,
            "nuclei": synthetic.nuclei((size, size), seed)}
