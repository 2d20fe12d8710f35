"""Out-of-core check: peak RSS of `tilerseg run` on a large vs a small image, per output format.

Usage: python scripts/bench_memory.py [--small 2000] [--large 12000]
                                      [--format zarr,ome.tif,cog,tif,geojson,gpkg] [--json]

Writes synthetic RGB tiled TIFFs (a georeferenced one for the COG), runs
the same command with the same model and flags on each, polls the resident
memory of the whole process tree, and prints both peaks and their ratio per
format. ``--together`` runs every format in one process per size (through
``tilerseg.cli.main``), so a quick check pays the start-up twice, not twice
per format: the peak is then the worst writer's. Target: large/small <= 1.3 (memory must not grow with the image).
The model is the shipped demo nuclei model, so polygon outputs hold real
objects (tens of thousands at 12,000 px), not a random model's noise."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _common import run_with_peak_rss  # noqa: E402

EXT = {"zarr": ".zarr", "ome.tif": ".ome.tif", "cog": ".tif", "tif": ".tif", "geojson": ".geojson", "gpkg": ".gpkg"}


def geotiff_tags(pixel: float = 0.5, origin=(500000.0, 4500000.0), epsg: int = 32618):
    """GeoTIFF keys for tifffile: UTM zone 18N, ``pixel`` metres, north up."""
    keys = [1, 1, 0, 3, 1024, 0, 1, 1, 1025, 0, 1, 1, 3072, 0, 1, epsg]
    return [(33550, "d", 3, (pixel, pixel, 0.0), True), (33922, "d", 6, (0, 0, 0, *origin, 0.0), True),
            (34735, "H", len(keys), keys, True)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=12000)
    p.add_argument("--format", default="zarr,ome.tif,cog,geojson",
                   help=f"comma-separated, of {', '.join(EXT)} (default zarr,ome.tif,cog,geojson)")
    p.add_argument("--workdir", default=None, help="keep inputs here between runs")
    p.add_argument("--weights", default="demo", help="model weights (default: the shipped demo model)")
    p.add_argument("--halo", default="96", help="halo (default 96, the demo model's receptive field)")
    p.add_argument("--together", action="store_true", help="all formats in one process per size")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from tilerseg import synthetic

    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-mem-")
    os.makedirs(work, exist_ok=True)
    results = {}
    groups = [a.format] if a.together else a.format.split(",")
    for group in groups:
        res = {}
        for name, side in (("small", a.small), ("large", a.large)):
            runs = []
            for fmt in group.split(","):
                geo = fmt == "cog"
                src = os.path.join(work, f"{name}-{side}{'-geo' if geo else ''}.tif")
                if not os.path.exists(src):
                    synthetic.write_tiff(src, (side, side), compression="zlib",
                                         extratags=geotiff_tags() if geo else ())
                out = os.path.join(work, f"{name}-out{EXT[fmt]}")
                runs.append(["run", src, "--weights", a.weights, "--tile", "512", "--halo", a.halo,
                             "--batch-size", "4", "-o", out, "--overwrite", "--quiet"])
            if len(runs) == 1:
                cmd = [sys.executable, "-m", "tilerseg.cli", *runs[0]]
            else:
                code = ("import sys; from tilerseg import cli\n"
                        f"for argv in {runs!r}:\n    rc = cli.main(argv)\n    rc and sys.exit(rc)")
                cmd = [sys.executable, "-c", code]
            seconds, peak, rc = run_with_peak_rss(cmd)
            if rc:
                return rc
            res[name] = {"side": side, "peak_mib": round(peak, 1), "seconds": round(seconds, 1)}
        res["ratio"] = round(res["large"]["peak_mib"] / res["small"]["peak_mib"], 3)
        results[group] = res
        if not a.json:
            s, l = res["small"], res["large"]
            print(f"{group:8} {s['side']:>6}^2: {s['peak_mib']:7.1f} MiB {s['seconds']:6.1f} s | "
                  f"{l['side']:>6}^2: {l['peak_mib']:7.1f} MiB {l['seconds']:6.1f} s | ratio {res['ratio']:.3f}",
                  flush=True)
    results["ratio"] = max(r["ratio"] for r in results.values())
    if a.json:
        print(json.dumps(results))
    else:
        print(f"worst ratio large/small: {results['ratio']:.3f} (target <= 1.3); "
              f"pixels ratio {(a.large / a.small) ** 2:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
