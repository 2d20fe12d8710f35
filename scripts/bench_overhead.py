"""tilerseg's overhead over the model alone, and over MONAI, in one run.

Usage: python scripts/bench_overhead.py [--size 4096] [--reps 2] [--json]
Needs MONAI for the comparison: pip install -e ".[bench]".

Setup: a 4096x4096 RGB tiled TIFF, smp Unet-resnet18 (random
weights, eval), tile 512, halo 64, batch 4, on this machine's CPU.
- model-only: the same forward passes (same batch sizes) on ready tensors,
  the physical floor, in channels-last memory as tilerseg uses (the NCHW
  figure is printed too: channels-last is faster on CPU);
- tilerseg: `tilerseg.run` from the TIFF to a zarr mask, end to end;
- MONAI: `sliding_window_inference` on the whole image as one tensor (read
  and normalised first, included), roi 512, overlap 0.25 (the same 121 windows).
Each is timed `--reps` times, interleaved; the best of each is reported."""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import segmentation_models_pytorch as smp
    import tifffile
    import torch

    import tilerseg
    from tilerseg import synthetic
    from tilerseg.engine import TileSpec

    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-overhead-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, f"image-{a.size}.tif")
    if not os.path.exists(src):
        synthetic.write_tiff(src, (a.size, a.size), compression="zlib")
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    mdir = os.path.join(work, "unet-r18")
    model.save_pretrained(mdir)
    tiles = TileSpec(tile=512, halo=64, batch_size=4)
    grid = tiles.grid((a.size, a.size), 32)
    batches = [len(r.windows[i:i + 4]) for r in grid.regions() for i in range(0, len(r.windows), 4)]
    ready = {b: torch.randn(b, 3, 512, 512) for b in set(batches)}
    ready_cl = {b: t.contiguous(memory_format=torch.channels_last) for b, t in ready.items()}
    model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def model_only():  # tilerseg runs channels-last (faster on CPU): the floor uses it too
        with torch.inference_mode():
            for b in batches:
                model_cl(ready_cl[b])

    def model_only_nchw():
        with torch.inference_mode():
            for b in batches:
                model(ready[b])

    def run_tilerseg():
        tilerseg.run(src, os.path.join(work, "mask.zarr"), weights=mdir, tile=512, halo=64, batch_size=4,
                     device="cpu", overwrite=True)

    def run_monai(net=model, channels_last=False):
        from monai.inferers import sliding_window_inference

        img = tifffile.imread(src)
        x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div_(255)
        mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
        std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
        x = (x - mean) / std
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = sliding_window_inference(x, roi_size=(512, 512), sw_batch_size=4, predictor=net,
                                           overlap=0.25, mode="constant")
            torch.sigmoid(out)

    try:
        import monai  # noqa: F401
        runs = {"model_only": model_only, "model_nchw": model_only_nchw, "tilerseg": run_tilerseg,
                "monai": run_monai, "monai_cl": lambda: run_monai(model_cl, True)}
    except ImportError:
        print("MONAI not installed (pip install -e '.[bench]'): comparing with model-only only", file=sys.stderr)
        runs = {"model_only": model_only, "model_nchw": model_only_nchw, "tilerseg": run_tilerseg}
    import warnings

    warnings.simplefilter("ignore")
    with torch.inference_mode():  # warm-up: allocator, kernels, imports
        model(ready[4])
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import best_of

    best = best_of(runs, a.reps)
    res = {"size": a.size, "windows": grid.total_windows, "forward_passes": len(batches),
           "seconds": {k: round(v, 2) for k, v in best.items()},
           "tilerseg_over_model": round(best["tilerseg"] / best["model_only"], 3)}
    if "monai" in best:
        fastest_monai = min(best["monai"], best["monai_cl"])
        res["monai_over_model"] = round(fastest_monai / best["model_only"], 3)
        res["tilerseg_over_monai"] = round(best["tilerseg"] / fastest_monai, 3)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{a.size}x{a.size} px, {res['windows']} windows, {res['forward_passes']} forward passes, "
              f"torch threads {torch.get_num_threads()}")
        for k, v in best.items():
            print(f"  {k:<11} {v:7.2f} s   {v / best['model_only']:.3f}x model-only")
        print(f"tilerseg / model-only: {res['tilerseg_over_model']:.3f} (target <= 1.15)")
        if "monai" in best:
            print(f"tilerseg / MONAI:      {res['tilerseg_over_monai']:.3f} (target <= 1.05; MONAI at its faster "
                  "memory format)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
