"""Out of core: peak memory of the whole process tree does not grow with the image.

Runs scripts/bench_memory.py (the issue's benchmark) at sizes that fit the
suite's time; the closing figures at 2,000 vs 12,000 px come from the script
run by hand."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_peak_memory_flat_from_600_to_1800_px(tmp_path):
    """Every raster and vector writer, all in one process per size (the
    peak is the worst writer's): 9x the pixels, the same peak."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--small", "600",
                        "--large", "1800", "--format", "zarr,ome.tif,cog,geojson", "--together", "--workdir",
                        str(tmp_path), "--json"], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ratio"] <= 1.3, res  # 9x the pixels
