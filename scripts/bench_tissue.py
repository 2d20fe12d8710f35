"""--tissue auto on a slide that is mostly glass: full run, tissue with the largest tile, tissue with the tile chosen for it.

Usage: python scripts/bench_tissue.py [--side 6144] [--background 0.71] [--pieces 2] [--isa avx2] [--before] [--json]

Writes a synthetic pyramidal slide with ``--pieces`` pieces of tissue and
``--background`` of glass, and runs the shipped demo model on it three
ways, interleaved (best of ``--repeats``): the full run (``--tile auto``),
``--tissue auto`` with the tile the full run chose (the largest that fits
the memory budget: how ``--tile auto`` chose before it weighed skipping),
and ``--tissue auto`` with the default tiling, which now counts the windows
each candidate tile would run. Prints each time, the speed-ups, the ideal
speed-up from the work of the windows run (the pixels each computes,
trimmed to its tissue, plus a fixed cost per window, as
:func:`tilerseg.tiling.trimmed_work` counts it),
and whether the masks agree wherever the generator put tissue.
Also prints the ceiling: the speed-up the tissue run would reach if its
windows took exactly the ideal share of the full run's windows time, with
the full run's fixed cost (process start, imports, model build, writing)
unchanged; no tiling can beat it end to end. ``--isa avx2`` runs every
command with oneDNN and ATen limited to AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``,
``ATEN_CPU_CAPABILITY=avx2``), the kernels an AVX2-only CPU runs, on a CPU
that has more. ``--before`` adds the full and tissue runs with 512-px
windows, ``--tile auto``'s default before it weighed memory: the baseline of
the 2.0x that issue 27 asks for.
Targets (issue 27): >= 2.0x the full run and >= 70% of the ideal, identical on tissue."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np



ISA = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def _run(src: str, out: str, extra: list[str], isa: str = "native") -> tuple[float, dict]:
    """Seconds of one run, and what it said of its windows and tiling."""
    cmd = [sys.executable, "-m", "tilerseg.cli", "run", src, "--weights", "demo", "-o", out, "--overwrite", *extra]
    env = dict(os.environ, HF_HUB_OFFLINE="1", **ISA[isa])
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode:
        sys.stderr.write(p.stderr)
        sys.exit(p.returncode)
    text = p.stdout + p.stderr
    said = {"tile": int(re.search(r"windows of (\d+) px", text).group(1)),
            "windows": int(re.search(r"(\d+) windows of", text).group(1))}
    skipped = re.search(r"skipped (\d+) of", text)
    said["run"] = said["windows"] - (int(skipped.group(1)) if skipped else 0)
    said["tiling"] = next((ln.split("tiling: ", 1)[1] for ln in text.splitlines() if "tiling: " in ln), "")
    said["windows_s"] = float(re.search(r"stride \d+\) in ([\d.]+) s", text).group(1))  # the run's own clock
    said["halo"] = int(re.search(r"halo (\d+) px", said["tiling"]).group(1))
    said["stride"] = int(re.search(r"stride (\d+)", said["tiling"]).group(1))
    return seconds, said


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
    p.add_argument("--side", type=int, default=6144)
    p.add_argument("--background", type=float, default=0.71)
    p.add_argument("--pieces", type=int, default=2, choices=(1, 2))
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--workdir")
    p.add_argument("--isa", choices=sorted(ISA), default="native",
                   help="avx2: limit torch's kernels to AVX2, as on an AVX2-only CPU")
    p.add_argument("--before", action="store_true",
                   help="also the full and tissue runs with --tile 512, the windows before --tile auto")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from tilerseg.synthetic import glass_ellipse, write_tiff
    from tilerseg.tiling import DEFAULT_TILE, trimmed_work, work
    from tilerseg.tissue import WindowMap, detect

    work_dir = a.workdir or tempfile.mkdtemp(prefix="tilerseg-tissue-")
    os.makedirs(work_dir, exist_ok=True)
    shape = (a.side, a.side)
    src = os.path.join(work_dir, f"glassy-{a.side}-{a.background}-{a.pieces}.tif")
    if not os.path.exists(src):
        write_tiff(src, shape, levels=5, background=a.background, pieces=a.pieces)
    # each run, its flags, and the full run it is compared with; "was": 512-px windows, as --tile auto's
    # default was before (its full run was slower, so skipping bought a larger ratio of a longer time)
    runs = {"full": ([], None), "largest": (None, "full"), "chosen": (["--tissue", "auto"], "full")}
    if a.before:
        runs.update({"was_full": (["--tile", str(DEFAULT_TILE)], None),
                     "was_tissue": (["--tile", str(DEFAULT_TILE), "--tissue", "auto"], "was_full")})
    out = {k: os.path.join(work_dir, f"{k}.zarr") for k in runs}
    times = {k: [] for k in out}
    said = {}  # per run, what the repeat with the best seconds said (its windows time with it)
    for _ in range(a.repeats):
        for k, (extra, _) in runs.items():  # largest: --tissue auto with the tile the full run chose
            extra = extra if extra is not None else ["--tissue", "auto", "--tile", str(said["full"]["tile"])]
            t, told = _run(src, out[k], extra, a.isa)
            if not times[k] or t < min(times[k]):
                said[k] = told
            times[k].append(t)
    ell = glass_ellipse(shape, a.background, a.pieces)
    skipping = [k for k, (_, base) in runs.items() if base]
    diffs = {k: _agree_on_tissue(out[runs[k][1]], out[k], shape, ell) for k in skipping}
    glass = diffs["chosen"][1]
    best = {k: min(v) for k, v in times.items()}
    phase = {k: s["windows_s"] for k, s in said.items()}  # the best repeat's: the windows, read to written
    # the work of the windows each run computes: the tissue runs' trimmed to the tissue in them, from
    # the same map the runs detect (tilerseg.tissue.detect at the side WindowMap asks for)
    wmap = WindowMap(shape, tissue=lambda side: detect(src, side=side))
    cost = {k: work(s["windows"], s["tile"]) if not runs[k][1] else
            trimmed_work(wmap.runs(s["tile"] - 2 * s["halo"], s["stride"]), s["halo"]) for k, s in said.items()}
    res = {"side": a.side, "glass": round(glass, 3), "seconds": {k: round(v, 1) for k, v in best.items()},
           "tiles": {k: s["tile"] for k, s in said.items()},
           "windows_run": {k: f"{s['run']}/{s['windows']}" for k, s in said.items()},
           "speedup": {k: round(best[runs[k][1]] / best[k], 2) for k in skipping},
           "windows_seconds": phase,
           "windows_speedup": {k: round(phase[runs[k][1]] / phase[k], 2) for k in skipping},
           "ideal": {k: round(cost[runs[k][1]] / cost[k], 2) for k in skipping},
           "differing_tissue_pixels": {k: d for k, (d, _) in diffs.items()}, "tiling": said["chosen"]["tiling"]}
    res["of_ideal"] = {k: round(res["speedup"][k] / res["ideal"][k], 2) for k in skipping}
    # the ceiling: the run's windows at exactly the ideal share of its full run's windows time, the full
    # run's time outside its windows (process start, imports, model build, writing) unchanged
    fixed = {k: best[k] - phase[k] for k in runs if not runs[k][1]}
    res["ceiling"] = {k: round(best[runs[k][1]] / (fixed[runs[k][1]] + phase[runs[k][1]] / res["ideal"][k]), 2)
                      for k in skipping}
    res["isa"] = a.isa
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{a.side}^2 px, {a.pieces} piece(s) of tissue, {glass:.1%} glass, demo model, best of {a.repeats}, "
          f"kernels: {a.isa}")
    print(f"{'run':<40}{'tile':>6}{'windows run':>14}{'seconds':>9}{'speed-up':>10}{'ideal':>7}{'of ideal':>10}"
          f"{'windows s':>11}{'speed-up':>10}{'ceiling':>9}")
    rows = {"full": "full run (--tile auto)", "largest": "--tissue auto, largest tile (old)",
            "chosen": "--tissue auto, tile chosen (new)",
            "was_full": f"full run, --tile {DEFAULT_TILE} (before auto)",
            "was_tissue": f"--tissue auto, --tile {DEFAULT_TILE} (before)"}
    for k in runs:
        extra = f"{'':>10}{'':>7}{'':>10}" if k not in skipping else \
            f"{res['speedup'][k]:>9}x{res['ideal'][k]:>6}x{res['of_ideal'][k]:>10.0%}"
        then = f"{res['windows_speedup'][k]:>9}x{res['ceiling'][k]:>8}x" if k in skipping else ""
        print(f"{rows[k]:<40}{res['tiles'][k]:>6}{res['windows_run'][k]:>14}{res['seconds'][k]:>9}{extra}"
              f"{phase[k]:>11}{then}")
    print(f"tiling: {res['tiling']}")
    print("speed-up, ideal, windows speed-up: against the full run above it (--tile auto, or --tile "
          f"{DEFAULT_TILE}); ideal: from the work of the windows run; ceiling: the speed-up if the windows took "
          "exactly the ideal share of the full run's windows time, its time outside them "
          f"({', '.join(f'{v:.1f} s' for v in fixed.values())}) unchanged: no tiling beats it end to end")
    if a.before:
        print(f"--tissue auto today against before --tile auto: {best['was_tissue'] / best['chosen']:.2f}x faster")
    print("seconds: the whole command, best of the repeats (a process start imports torch, smp and timm: about "
          "4-5 s in every row); windows s: that repeat's own clock from the first read to the last block written")
    print("pixels differing from its full run on tissue: "
          f"{', '.join(f'{k} {d}' for k, (d, _) in diffs.items())} (target 0); "
          "targets: chosen >= 2.0x and >= 70% of ideal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
