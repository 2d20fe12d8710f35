"""Out-of-core check: peak RSS of `tilerseg run` on a large vs a small image.

Usage: python scripts/bench_memory.py [--small 2000] [--large 12000] [--format zarr|tif] [--json]

Writes two synthetic RGB tiled TIFFs, runs the same command with the same
tiny model and flags on each, polls the resident memory of the whole
process tree, and prints both peaks and their ratio. Target: large/small
<= 1.3 (memory must not grow with the image)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(__file__))
from _common import run_with_peak_rss, tiny_model_dir  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", type=int, default=2000)
    p.add_argument("--large", type=int, default=12000)
    p.add_argument("--format", default="zarr", choices=["zarr", "tif"])
    p.add_argument("--workdir", default=None, help="keep inputs here between runs")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    from tilerseg import synthetic

    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-mem-")
    os.makedirs(work, exist_ok=True)
    model = tiny_model_dir(os.path.join(work, "model"))
    results = {}
    for name, side in (("small", a.small), ("large", a.large)):
        src = os.path.join(work, f"{name}-{side}.tif")
        if not os.path.exists(src):
            synthetic.write_tiff(src, (side, side), compression="zlib")
        out = os.path.join(work, f"{name}-out.{a.format}")
        cmd = [sys.executable, "-m", "tilerseg.cli", "run", src, "--weights", model, "--tile", "512",
               "--halo", "96", "--batch-size", "4", "-o", out, "--overwrite", "--quiet"]
        seconds, peak, rc = run_with_peak_rss(cmd)
        if rc:
            return rc
        results[name] = {"side": side, "peak_mib": round(peak, 1), "seconds": round(seconds, 1)}
    ratio = results["large"]["peak_mib"] / results["small"]["peak_mib"]
    results["ratio"] = round(ratio, 3)
    if a.json:
        print(json.dumps(results))
    else:
        for name in ("small", "large"):
            r = results[name]
            print(f"{name:5} {r['side']:>6}^2 px: peak RSS {r['peak_mib']:8.1f} MiB, {r['seconds']:6.1f} s")
        print(f"ratio large/small: {ratio:.3f} (target <= 1.3); pixels ratio {(a.large / a.small) ** 2:.0f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
