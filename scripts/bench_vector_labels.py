"""Vector training labels (issue 35): accuracy, memory and speed beside raster masks.

Usage: python scripts/bench_vector_labels.py [--parts dice,rss,speed] [--dice-size 1024]
       [--small 5000] [--large 20000] [--polygons 150000] [--crops 300] [--workdir DIR] [--json]

- dice: one recipe (tiny U-Net, CPU, about a minute a training) trained on
  synthetic slide A twice: from QuPath-style GeoJSON nuclei drawn in its
  top-left quarter only (a ``Region`` annotation marks it, the rest is
  unlabelled), and from the full raster mask; both scored on slide B (raster
  truth) by ``tilerseg eval``'s code. Target: vector/raster >= 0.95.
- rss: peak RSS of ``tilerseg train`` (one short epoch, its own process) on a
  ``--large``² slide with ``--polygons`` nuclei polygons, and on a
  ``--small``² slide with the same density of polygons. The slides are tiled
  JPEG TIFFs of a few repeated synthetic tiles (their content does not
  matter for memory; making 20,000² with the generator takes many minutes
  on 2 cores). Target: large/small <= 1.2.
- speed: raw training crops per second (image read + labels, no
  augmentation) from the ``--small`` slide, with its GeoJSON and with a
  raster mask of the same polygons. Target: vector/raster >= 0.8.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import run_with_peak_rss  # noqa: E402

RECIPE = """
data:
  images: {image}
  masks: {masks}
  val_images: {val}
  val_masks: {val_mask}
  class_names: [background, Nucleus]
  crop: 128
  samples_per_epoch: {samples}
model:
  model: unet
  encoder: resnet18
  model_args: {{encoder_depth: 3, decoder_channels: [16, 8, 4]}}
optim: {{lr: 0.01}}
train: {{epochs: {epochs}, batch_size: 8, seed: 0}}
infer: {{tile: 256, halo: 72}}
"""


def _synthetic(root: str, name: str, size: int, seed: int) -> tuple[str, str]:
    """A synthetic slide and its raster nuclei mask (whole, small sizes only)."""
    import tifffile

    from tilerseg.synthetic import tile

    img, nuc = tile(0, 0, size, size, seed)
    tifffile.imwrite(f"{root}/{name}.tif", img, photometric="rgb", tile=(256, 256), compression="jpeg")
    tifffile.imwrite(f"{root}/{name}_mask.tif", nuc.astype(np.uint8), tile=(256, 256), compression="zlib")
    return f"{root}/{name}.tif", f"{root}/{name}_mask.tif"


def _train_and_score(root, tag, image, masks, val, val_mask, test, test_mask, epochs, samples) -> dict:
    from tilerseg.train import evaluate, load_train_config, train

    cfg_path = f"{root}/{tag}.yaml"
    with open(cfg_path, "w") as f:
        f.write(RECIPE.format(image=image, masks=masks, val=val, val_mask=val_mask, epochs=epochs, samples=samples))
    shutil.rmtree(f"{root}/run-{tag}", ignore_errors=True)  # a rerun in the same --workdir
    t0 = time.perf_counter()
    res = train(load_train_config(cfg_path), f"{root}/run-{tag}", progress=False)
    ev, th = evaluate(res.best, test, test_mask, device="cpu")
    o = ev.report(th)["overall"]
    return {"dice": o["dice"], "iou": o["iou"], "best_epoch": res.best_epoch,
            "seconds": round(time.perf_counter() - t0, 1)}


def bench_dice(root: str, size: int, epochs: int, samples: int) -> dict:
    from tilerseg.synthetic import write_nuclei_geojson

    a, a_mask = _synthetic(root, "A", size, 0)
    b, b_mask = _synthetic(root, "B", size, 1)
    c, c_mask = _synthetic(root, "C", size // 2, 2)  # validation (model selection), not the test slide
    q = size // 2
    n = write_nuclei_geojson(f"{root}/A.geojson", (size, size), seed=0, region=(0, 0, q, q))
    vec = _train_and_score(root, "vector", a, f"{root}/A.geojson", c, c_mask, b, b_mask, epochs, samples)
    ras = _train_and_score(root, "raster", a, a_mask, c, c_mask, b, b_mask, epochs, samples)
    return {"slide": size, "nuclei_in_quarter": n, "vector_quarter": vec, "raster_full": ras,
            "ratio": vec["dice"] / ras["dice"]}


def _repeated_slide(path: str, size: int, seed: int = 0) -> None:
    """A ``size``² tiled JPEG TIFF cycling through 16 synthetic tiles."""
    import tifffile

    from tilerseg.synthetic import tile

    t = 512
    tiles = [tile(i * t, 0, t, t, seed)[0] for i in range(16)]
    n = -(-size // t)
    gen = (tiles[(r * 7 + c) % 16] for r in range(n) for c in range(n))
    tifffile.imwrite(path, gen, shape=(size, size, 3), dtype=np.uint8, tile=(t, t), photometric="rgb",
                     compression="jpeg", bigtiff=True)


def _disc_geojson(path: str, size: int, count: int, seed: int = 0) -> np.ndarray:
    """``count`` nucleus-sized polygons (16-gons of radius 4-9 px) spread over
    ``size``², QuPath-style detections; returns their (x, y, r)."""
    rng = np.random.default_rng(seed)
    xyr = np.c_[rng.uniform(10, size - 10, (count, 2)), rng.uniform(4, 9, count)]
    ang = np.linspace(0, 2 * np.pi, 17)
    with open(path, "w") as f:
        f.write('{"type": "FeatureCollection", "features": [\n')
        for i, (x, y, r) in enumerate(xyr):
            ring = np.round(np.c_[x + r * np.cos(ang), y + r * np.sin(ang)], 2)
            ring[-1] = ring[0]
            f.write((",\n" if i else "") + json.dumps({
                "type": "Feature", "id": f"n{i}", "geometry": {"type": "Polygon", "coordinates": [ring.tolist()]},
                "properties": {"objectType": "detection", "classification": {"name": "Nucleus"}}}))
        f.write("\n]}\n")
    return xyr


def _raster_of(path_geojson: str, mask_path: str, size: int) -> None:
    """The same polygons burnt into a tiled raster mask, block by block."""
    import tifffile
    from rasterio.features import rasterize
    from rasterio.transform import Affine
    from shapely import STRtree, box
    from shapely.geometry import shape

    geoms = [shape(f["geometry"]) for f in json.load(open(path_geojson))["features"]]
    tree, t = STRtree(geoms), 512
    n = -(-size // t)

    def blocks():
        for r in range(n):
            for c in range(n):
                hit = tree.query(box(c * t, r * t, c * t + t, r * t + t))
                out = np.zeros((t, t), np.uint8)
                if len(hit):
                    rasterize(((geoms[i], 1) for i in hit), out=out, transform=Affine.translation(c * t, r * t))
                yield out

    tifffile.imwrite(mask_path, blocks(), shape=(size, size), dtype=np.uint8, tile=(t, t), compression="zlib",
                     bigtiff=True)


def bench_rss(root: str, small: int, large: int, polygons: int) -> dict:
    val, val_mask = _synthetic(root, "val", 512, 3)
    out = {}
    for tag, size in (("small", small), ("large", large)):
        count = int(round(polygons * (size / large) ** 2))
        img, geo = f"{root}/rss-{tag}.tif", f"{root}/rss-{tag}.geojson"
        _repeated_slide(img, size)
        _disc_geojson(geo, size, count)
        cfg = f"{root}/rss-{tag}.yaml"
        with open(cfg, "w") as f:
            f.write(RECIPE.format(image=img, masks=geo, val=val, val_mask=val_mask, epochs=1, samples=32))
        shutil.rmtree(f"{root}/run-rss-{tag}", ignore_errors=True)
        secs, peak, rc = run_with_peak_rss([sys.executable, "-m", "tilerseg.cli", "train", cfg, "-o",
                                            f"{root}/run-rss-{tag}", "--quiet", "--device", "cpu"])
        if rc:
            raise SystemExit(f"training on the {tag} slide failed ({rc})")
        out[tag] = {"side": size, "polygons": count, "peak_rss_mib": round(peak, 1), "seconds": round(secs, 1)}
    out["ratio"] = out["large"]["peak_rss_mib"] / out["small"]["peak_rss_mib"]
    return out


def bench_speed(root: str, size: int, polygons_at: int, large: int, crops: int) -> dict:
    from tilerseg.train.data import CropDataset, LabelMap, Pair, Source
    from tilerseg.train.labels import VectorOptions

    img, geo, mask = f"{root}/rss-small.tif", f"{root}/rss-small.geojson", f"{root}/speed-mask.tif"
    if not os.path.exists(geo):
        _repeated_slide(img, size)
        _disc_geojson(geo, size, int(round(polygons_at * (size / large) ** 2)))
    _raster_of(geo, mask, size)
    opts = VectorOptions(class_names=("background", "Nucleus"), regions="image")
    sources = {tag: Source(Pair(img, m), LabelMap(2), vector=opts) for tag, m in (("raster", mask), ("vector", geo))}
    best = {tag: {"crops": np.inf, "labels": np.inf} for tag in sources}
    for _ in range(3):  # alternate, best of three: the machine is shared
        for tag, src in sources.items():
            ds = CropDataset([src], crop=256, length=crops, seed=0, scale=255, mean=[0.5] * 3, std=[0.2] * 3)
            ds.sample(0)  # warm the caches
            t0 = time.perf_counter()
            for i in range(crops):
                ds.sample(i)
            best[tag]["crops"] = min(best[tag]["crops"], time.perf_counter() - t0)
            rng = np.random.default_rng(0)
            t0 = time.perf_counter()
            for _ in range(crops):
                y, x = rng.integers(0, size - 256, 2)
                src.mask.window(int(y), int(x), 256, 256)
            best[tag]["labels"] = min(best[tag]["labels"], time.perf_counter() - t0)
    res = {tag: {"crops_per_s": round(crops / b["crops"], 1), "labels_ms_per_crop": round(1e3 * b["labels"] / crops, 2)}
           for tag, b in best.items()}
    for src in sources.values():
        src.close()
    res["ratio"] = res["vector"]["crops_per_s"] / res["raster"]["crops_per_s"]
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="dice,rss,speed")
    p.add_argument("--dice-size", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--samples", type=int, default=96, help="crops per epoch in the Dice recipe")
    p.add_argument("--small", type=int, default=5000)
    p.add_argument("--large", type=int, default=20000)
    p.add_argument("--polygons", type=int, default=150000, help="polygons on the large slide")
    p.add_argument("--crops", type=int, default=300)
    p.add_argument("--workdir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = a.workdir or tempfile.mkdtemp(prefix="bench-vector-")
    os.makedirs(root, exist_ok=True)
    parts, out = a.parts.split(","), {}
    if "dice" in parts:
        out["dice"] = d = bench_dice(root, a.dice_size, a.epochs, a.samples)
        print(f"Dice on slide B: vector labels (a quarter of A) {d['vector_quarter']['dice']:.4f}, raster mask "
              f"(all of A) {d['raster_full']['dice']:.4f}: ratio {d['ratio']:.3f} (target >= 0.95)", flush=True)
    if "rss" in parts:
        out["rss"] = r = bench_rss(root, a.small, a.large, a.polygons)
        print(f"peak RSS of training: {r['large']['side']}² with {r['large']['polygons']:,} polygons "
              f"{r['large']['peak_rss_mib']:.0f} MiB, {r['small']['side']}² with {r['small']['polygons']:,} "
              f"{r['small']['peak_rss_mib']:.0f} MiB: ratio {r['ratio']:.3f} (target <= 1.2)", flush=True)
    if "speed" in parts:
        out["speed"] = s = bench_speed(root, a.small, a.polygons, a.large, a.crops)
        print(f"crops/s (256², read + labels): vector {s['vector']['crops_per_s']:.1f}, raster "
              f"{s['raster']['crops_per_s']:.1f}: ratio {s['ratio']:.3f} (target >= 0.8); labels alone "
              f"{s['vector']['labels_ms_per_crop']:.2f} vs {s['raster']['labels_ms_per_crop']:.2f} ms/crop", flush=True)
    if a.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
