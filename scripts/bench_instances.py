"""--instances at scale: count, memory and the merge's share, against dask-image's label.

Usage: python scripts/bench_instances.py [--sides 5000 20000] [--workdir DIR] [--json]
       python scripts/bench_instances.py --fixtures [--side 3000]

``--fixtures`` (issue 37): are the objects right? Dense nuclei fixtures
(tilerseg.synthetic.dense_nuclei: "dense", centres at least 0.8 x the sum
of the radii apart, and "crowded", 0.62) drawn in the demo slide's colours,
segmented by the shipped demo model; on the same probabilities, the splits
are scored against the true instances (tilerseg.train.metrics.object_scores:
F1 at IoU >= 0.5, merges, splits, count): tilerseg's default, its former
default (h-maxima depth 1.5), the textbook split (distance transform +
skimage peak_local_max(min_distance=5) + watershed) on the whole image and
per 256-px block (what tiled tools do), and connected components. Then the
instance pass timed on the whole image in one block and at 256-px blocks,
side by side, and the count on the demo slide against the generator's.

For each side, writes a synthetic slide (tilerseg.synthetic: nuclei on
tissue, half the area; about 0.4 nuclei per 24x24 px cell of tissue), runs
``tilerseg run SLIDE --weights demo --instances -o objects.zarr`` in a fresh
process and records its wall time, peak RSS (the whole process tree) and the
instance pass's phases as the run logs them. Then labels the same
foreground (the run's objects > 0) with dask-image's ``ndmeasure.label``
(the peer: exact connected components across chunks, no splitting) in
another process, with its time and peak RSS. Prints, per side: the
generator's true count, tilerseg's count and error, dask-image's count,
the objects that cross blocks, times and memory.

Targets (issue 23): peak RSS at 20,000^2 within 1.3x of 5,000^2; the merge
(union-find over block faces and the global numbering) < 15% of the run's
wall time. StarDist's ``predict_instances_big`` and Cellpose need their
pretrained weights from the internet at run time, so here the peer is
dask-image (``pip install dask-image``; the bench extra)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

PEER = r"""
import sys, time, zarr, dask.array as da
from dask_image.ndmeasure import label
z = zarr.open_group(sys.argv[1], mode="r")["0"]
t0 = time.perf_counter()
fg = da.from_zarr(z) > 0
lab, n = label(fg)
n = int(n.compute())
print(n, time.perf_counter() - t0)
"""


def measure(side: int, work: str, workers: int) -> dict:
    from tilerseg.synthetic import nuclei, write_tiff

    src = os.path.join(work, f"slide-{side}.tif")
    if not os.path.exists(src):
        write_tiff(src, (side, side), levels=4, compression="jpeg", workers=workers)
    out = os.path.join(work, f"objects-{side}.zarr")
    cmd = [sys.executable, "-m", "tilerseg.cli", "run", src, "--weights", "demo", "--instances", "-o", out,
           "--overwrite", "--workers", str(workers)]
    seconds, peak, rc, text = _timed(cmd)
    m = re.search(r"instances: (\d+) components \((\d+) crossing blocks\), (\d+) objects; ([\d.]+) s: pieces "
                  r"([\d.]+), merge \(union-find and numbering\) ([\d.]+), split ([\d.]+), paint ([\d.]+)", text)
    if rc or not m:
        sys.exit(text)
    comps, crossing, objects, post, pieces, merge, split, paint = m.groups()
    peer_s, peer_peak, peer_rc, peer_out = _timed([sys.executable, "-c", PEER, out])
    if peer_rc:
        sys.exit(peer_out)
    peer_n, peer_label_s = peer_out.split()[-2:]
    truth = nuclei((side, side))
    return {"side": side, "truth": truth, "objects": int(objects), "error": (int(objects) - truth) / truth,
            "components": int(comps), "crossing_blocks": int(crossing), "wall_s": seconds, "peak_mib": peak,
            "instance_pass_s": float(post), "merge_s": float(merge), "merge_share": float(merge) / seconds,
            "split_s": float(split), "pieces_s": float(pieces), "paint_s": float(paint),
            "dask_image_count": int(peer_n), "dask_image_s": float(peer_label_s), "dask_image_peak_mib": peer_peak}


def _timed(cmd) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MiB) of the process tree, exit code, and what it printed."""
    import threading
    import time

    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), [0]

    def poll():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [root] + root.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    return time.perf_counter() - t0, peak[0] / 2 ** 20, proc.returncode, out


def textbook(mask):
    """Distance transform + peak_local_max(min_distance=5) + watershed (skimage's example)."""
    import numpy as np
    from scipy import ndimage
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    dist = ndimage.distance_transform_edt(mask)
    peaks = peak_local_max(dist, min_distance=5, labels=ndimage.label(mask)[0])
    markers = np.zeros(mask.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    return watershed(-dist, markers, mask=mask)


def per_block(mask, block: int = 256):
    """:func:`textbook` on each block alone, ids offset: a tiled tool's objects."""
    import numpy as np

    out, top = np.zeros(mask.shape, np.int64), 0
    for r in range(0, mask.shape[0], block):
        for c in range(0, mask.shape[1], block):
            lab = textbook(mask[r:r + block, c:c + block])
            out[r:r + block, c:c + block] = np.where(lab > 0, lab + top, 0)
            top += int(lab.max())
    return out


def score_fixture(name: str, side: int, overlap: float) -> list:
    """One fixture: the model's probabilities, each split's scores and seconds."""
    import time

    import numpy as np
    from scipy import ndimage

    import tilerseg
    from tilerseg.instances import InstanceOptions, label_array
    from tilerseg.synthetic import dense_nuclei
    from tilerseg.train.metrics import object_scores

    rgb, truth = dense_nuclei((side, side), overlap=overlap)
    p = tilerseg.segment(rgb, "demo", device="cpu").compute()
    mask = p[0] >= 0.5
    splits = {"tilerseg default (radius rule, reach 1.15)": lambda: label_array(p, InstanceOptions(), chunk=side),
              "tilerseg --split-depth 1.5 (the former default)":
                  lambda: label_array(p, InstanceOptions(depth=1.5), chunk=side),
              "textbook, whole image": lambda: textbook(mask), "textbook per 256-px block": lambda: per_block(mask),
              "connected components only": lambda: ndimage.label(mask)[0]}
    truth_fg = truth > 0
    dice = 2 * (mask & truth_fg).sum() / (mask.sum() + truth_fg.sum())
    rows = []
    for split, fn in splits.items():
        t0 = time.perf_counter()
        lab = fn()
        rows.append({"fixture": name, "dice": float(dice), "split": split, "seconds": time.perf_counter() - t0,
                     **object_scores(truth, lab)})
    return rows, p


def timing(p, side: int) -> dict:
    """The instance pass on the whole image in one block against 256-px
    blocks, alternated twice, best of each; labels checked equal."""
    import time

    import numpy as np

    from tilerseg.instances import InstanceOptions, label_array

    best, ref = {}, None
    for chunk in (side, 256, side, 256):
        t0 = time.perf_counter()
        lab = label_array(p, InstanceOptions(), chunk=chunk)
        best[chunk] = min(best.get(chunk, 1e9), time.perf_counter() - t0)
        ref = lab if ref is None else ref
        assert np.array_equal(lab, ref), "labels differ between tilings"
    return {"whole_s": best[side], "tile256_s": best[256], "ratio": best[256] / best[side]}


def demo_count(work: str, size: int = 3072) -> dict:
    """``tilerseg demo``'s slide (seed 0): the generator's count, the objects found."""
    import numpy as np
    import tifffile

    import tilerseg
    from tilerseg.instances import InstanceOptions, label_array
    from tilerseg.synthetic import nuclei, write_tiff

    path = os.path.join(work, "demo-slide.tif")
    write_tiff(path, (size, size), levels=1, compression="zlib")
    p = tilerseg.segment(tifffile.imread(path), "demo", device="cpu").compute()
    found = int(label_array(p, InstanceOptions(), chunk=1024).max())
    truth = nuclei((size, size))
    return {"truth": truth, "found": found, "error": (found - truth) / truth}


def fixtures(side: int, work: str) -> int:
    """``--fixtures``: the table of docs/outputs.md."""
    import platform
    import subprocess

    cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True)
                .stdout.splitlines() if ln.startswith("Model name")), platform.processor())
    print(f"CPU {cpu}; load {os.getloadavg()[0]:.1f} at the start")
    print(f"| fixture | split | objects (truth) | count | matched | merges | splits | F1 |\n|---|---|---|---|---|---|---|---|")
    probs = None
    for name, overlap in (("dense", 0.8), ("crowded", 0.62)):
        rows, p = score_fixture(name, side, overlap)
        probs = p if probs is None else probs
        for r in rows:
            print(f"| {name} (Dice {r['dice']:.3f}) | {r['split']} | {r['predicted']:,} ({r['true']:,}) | "
                  f"{r['count_error']:+.1%} | {r['matched'] / r['true']:.0%} | {r['merges']:,} | {r['splits']:,} | "
                  f"{r['f1']:.3f} |", flush=True)
    t = timing(probs, side)
    print(f"instance pass on the dense fixture: whole image {t['whole_s']:.1f} s, 256-px blocks {t['tile256_s']:.1f} s "
          f"({t['ratio']:.2f}x); labels equal")
    d = demo_count(work)
    print(f"demo slide 3072^2: the generator drew {d['truth']:,}, --instances found {d['found']:,} ({d['error']:+.2%})")
    print(f"load {os.getloadavg()[0]:.1f} at the end")
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fixtures", action="store_true", help="score the splits on dense nuclei (issue 37)")
    p.add_argument("--side", type=int, default=3000, help="--fixtures: the fixtures' side (px)")
    p.add_argument("--sides", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--workdir")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-instances-")
    os.makedirs(work, exist_ok=True)
    if a.fixtures:
        return fixtures(a.side, work)
    rows = [measure(side, work, a.workers) for side in a.sides]
    if a.json:
        print(json.dumps(rows))
        return 0
    print(f"{'side':>7}{'truth':>9}{'tilerseg':>10}{'error':>8}{'crossing':>10}{'wall s':>8}{'peak MiB':>10}"
          f"{'merge s':>9}{'merge %':>9}{'split s':>9}{'dask-image':>12}{'its s':>7}{'its MiB':>9}")
    for r in rows:
        print(f"{r['side']:>7}{r['truth']:>9}{r['objects']:>10}{r['error']:>+8.2%}{r['crossing_blocks']:>10}"
              f"{r['wall_s']:>8.1f}{r['peak_mib']:>10.0f}{r['merge_s']:>9.2f}{r['merge_share']:>9.2%}"
              f"{r['split_s']:>9.1f}{r['dask_image_count']:>12}{r['dask_image_s']:>7.1f}"
              f"{r['dask_image_peak_mib']:>9.0f}")
    if len(rows) > 1:
        print(f"peak RSS {rows[-1]['side']}^2 / {rows[0]['side']}^2: {rows[-1]['peak_mib'] / rows[0]['peak_mib']:.2f} "
              "(target <= 1.3); merge share target < 15%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
