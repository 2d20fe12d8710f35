"""--tissue auto on a slide that is mostly glass: time with and without, same output on tissue.

Usage: python scripts/bench_tissue.py [--side 8192] [--background 0.7] [--json]

Writes a synthetic pyramidal slide with one piece of tissue and
``--background`` of glass, runs the shipped demo model on it twice
(interleaved: without, with, without, with; best of each), and prints the
speed-up and whether the two masks agree wherever the generator put tissue.
Target: >= 2.5x at 70% background, identical on tissue."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import run_with_peak_rss  # noqa: E402


def _run(src: str, out: str, extra: list[str]) -> float:
    cmd = [sys.executable, "-m", "tilerseg.cli", "run", src, "--weights", "demo", "-o", out, "--overwrite",
           "--quiet", *extra]
    seconds, _, rc = run_with_peak_rss(cmd)  # the shared runner: offline env, stderr shown on failure
    if rc:
        sys.exit(rc)
    return seconds


def _agree_on_tissue(a: str, b: str, shape, ellipse) -> tuple[int, float]:
    """Pixels that differ on tissue, and the share of glass, counted in strips."""
    import zarr

    from tilerseg.synthetic import tissue

    za, zb = zarr.open_array(a + "/0", mode="r"), zarr.open_array(b + "/0", mode="r")
    diff, glass = 0, 0
    for y in range(0, shape[0], 1024):
        yy, xx = np.mgrid[y:min(y + 1024, shape[0]), 0:shape[1]].astype(np.float32)
        t = tissue(yy, xx, 0, ellipse)
        diff += int((za[y:y + 1024][t] != zb[y:y + 1024][t]).sum())
        glass += int((~t).sum())
    return diff, glass / (shape[0] * shape[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--side", type=int, default=8192)
    p.add_argument("--background", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from tilerseg.synthetic import glass_ellipse, write_tiff

    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-tissue-")
    os.makedirs(work, exist_ok=True)
    shape = (a.side, a.side)
    src = os.path.join(work, f"glassy-{a.side}-{a.background}.tif")
    if not os.path.exists(src):
        write_tiff(src, shape, levels=5, background=a.background)
    full, skip = os.path.join(work, "full.zarr"), os.path.join(work, "tissue.zarr")
    times = {"full": [], "tissue": []}
    for _ in range(a.repeats):
        times["full"].append(_run(src, full, []))
        times["tissue"].append(_run(src, skip, ["--tissue", "auto"]))
    diff, glass = _agree_on_tissue(full, skip, shape, glass_ellipse(shape, a.background))
    res = {"side": a.side, "glass": round(glass, 3), "full_s": round(min(times["full"]), 1),
           "tissue_s": round(min(times["tissue"]), 1), "differing_tissue_pixels": diff}
    res["speedup"] = round(res["full_s"] / res["tissue_s"], 2)
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{a.side}^2 px, {glass:.1%} glass: without --tissue {res['full_s']} s, with --tissue auto "
              f"{res['tissue_s']} s -> {res['speedup']}x (target >= 2.5); pixels differing on tissue: {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
