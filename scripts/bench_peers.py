"""tilerseg against MONAI's sliding window at equal accuracy, in one process, interleaved.

Usage: python scripts/bench_peers.py [--size 4096] [--reps 2] [--model demo|unet-r18] [--json]
Needs MONAI and ONNX Runtime: pip install -e ".[bench]".

On the same RGB image (synthetic tissue, the demo model's domain) and the
same network, each run is timed ``--reps`` times, interleaved, best kept:
- tilerseg default: ``tilerseg.run`` TIFF -> zarr probabilities with
  ``--tile auto`` (its default memory budget, taken once for both tilerseg
  runs) and the default halo (the checkpoint's, else the receptive field),
  torch;
- tilerseg ``--backend auto``: the same, forward pass on the fastest runtime;
- MONAI: ``sliding_window_inference`` as usually called (roi 512, overlap
  0.25, gaussian blending, sw_batch_size 4, NCHW) on the image read into
  memory and normalised (both included in its time).
The seam error of each is measured against whole-image inference (one
forward pass over the whole image) on interior pixels, at least 256 px
from the border (so the border treatment, which differs, does not count):
mean and max absolute difference of probabilities.

``--model demo`` (default) is the trained demo checkpoint (smp Unet with a
timm resnet18 encoder, depth 3, halo 96); ``unet-r18`` is a full-depth smp
Unet-resnet18 with random weights (receptive field about 281 px), whose
seam errors say less than a trained model's."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

BORDER = 256


def _model(name: str, work: str):
    """(weights argument for tilerseg, torch module, normalisation)."""
    import segmentation_models_pytorch as smp
    import torch

    from tilerseg.models import demo_weights, describe, instantiate
    from tilerseg.models.registry import ModelSpec

    if name == "demo":
        path = demo_weights()
        info = describe(path, ModelSpec())
        n = info.normalization
        return path, instantiate(info), (n.mean, n.std, n.scale or 255.0)
    torch.manual_seed(0)
    model = smp.Unet("resnet18", encoder_weights=None).eval()
    path = os.path.join(work, "unet-r18")
    model.save_pretrained(path)
    return path, model, ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 255.0)


def _normalised(img: np.ndarray, norm):
    import torch

    mean, std, scale = norm
    x = torch.from_numpy(img).permute(2, 0, 1)[None].float().div_(scale)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _probs(logits):
    import torch

    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def whole_image(model, img, norm) -> np.ndarray:
    """The oracle: one forward pass over the whole image (padded at the
    bottom/right to the model's stride; the interior is unaffected)."""
    import torch

    x = _normalised(img, norm)
    H, W = img.shape[:2]
    s = 32
    x = torch.nn.functional.pad(x, (0, -W % s, 0, -H % s), mode="reflect")
    with torch.inference_mode():
        return _probs(model(x))[0, :, :H, :W].numpy()


def seam_error(got: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    d = np.abs(got[..., BORDER:-BORDER, BORDER:-BORDER] - ref[..., BORDER:-BORDER, BORDER:-BORDER])
    return float(d.mean()), float(d.max())


def main() -> int:
    from tilerseg.allocator import keep_heap

    keep_heap()  # as the tilerseg command does, first: every run here, MONAI's too, has the same allocator
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--model", choices=("demo", "unet-r18"), default="demo")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import logging
    import warnings

    import tifffile
    import torch
    import zarr
    from monai.inferers import sliding_window_inference

    import tilerseg
    from tilerseg import synthetic

    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("tilerseg").setLevel(logging.INFO)  # the tiling and backend choices, once each
    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-peers-")
    os.makedirs(work, exist_ok=True)
    src = os.path.join(work, f"image-{a.size}.tif")
    if not os.path.exists(src):
        synthetic.write_tiff(src, (a.size, a.size), compression="zlib")
    weights, model, norm = _model(a.model, work)
    # --tile auto's default budget, decided once: free RAM changes as runs load runtimes, and both
    # tilerseg runs must get the same tiling for their times to compare
    from tilerseg.tiling import memory_budget

    budget, why = memory_budget(model, None)
    outs = {"tilerseg": os.path.join(work, "torch.zarr"), "tilerseg_backend": os.path.join(work, "backend.zarr")}
    result = {}

    def run_tilerseg(name, **kw):
        rep = tilerseg.run(src, outs[name], weights=weights, device="cpu", probabilities=True, overwrite=True,
                           memory_budget=budget, **kw)
        result[name] = rep.tiling

    def run_monai():
        img = tifffile.imread(src)
        x = _normalised(img, norm)
        with torch.inference_mode():
            out = _probs(sliding_window_inference(x, roi_size=(512, 512), sw_batch_size=4, predictor=model,
                                                  overlap=0.25, mode="gaussian"))
        result["monai_probs"] = out[0].numpy()

    runs = {"tilerseg": lambda: run_tilerseg("tilerseg"),
            "tilerseg_backend": lambda: run_tilerseg("tilerseg_backend", backend="auto"),
            "monai": run_monai}
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import best_of

    best = best_of(runs, a.reps)
    img = tifffile.imread(src)
    ref = whole_image(model, img, norm)
    probs = {k: zarr.open_array(v + "/0", mode="r")[...] for k, v in outs.items()}
    probs["monai"] = result.pop("monai_probs")
    errors = {k: seam_error(v, ref) for k, v in probs.items()}
    res = {"size": a.size, "model": a.model, "threads": torch.get_num_threads(),
           "seconds": {k: round(v, 2) for k, v in best.items()},
           "over_monai": {k: round(best[k] / best["monai"], 3) for k in best},
           "seam_mean": {k: v[0] for k, v in errors.items()}, "seam_max": {k: v[1] for k, v in errors.items()},
           "backend_vs_torch_max": float(np.abs(probs["tilerseg_backend"] - probs["tilerseg"]).max()),
           "tiling": result}
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{a.size}x{a.size} px, model {a.model}, torch threads {res['threads']}, best of {a.reps}")
    for k, v in res["tiling"].items():
        print(f"  {k}: {v}")
    print(f"  {'run':<18}{'seconds':>9}{'x MONAI':>9}{'seam mean':>12}{'seam max':>11}")
    for k in best:
        print(f"  {k:<18}{best[k]:9.2f}{res['over_monai'][k]:9.3f}{errors[k][0]:12.2e}{errors[k][1]:11.2e}")
    print(f"backend vs torch, max |p| difference: {res['backend_vs_torch_max']:.1e} (target <= 1e-4)")
    print(f"targets: tilerseg <= 0.80x MONAI ({res['over_monai']['tilerseg']:.3f}), fastest backend <= 0.60x "
          f"({res['over_monai']['tilerseg_backend']:.3f}), at equal or lower seam error")
    return 0


if __name__ == "__main__":
    sys.exit(main())
