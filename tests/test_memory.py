"""Out of core: peak memory of the whole process tree does not grow with the image.

Runs scripts/bench_memory.py (the memory benchmark) at sizes that fit the
suite's time; the closing figures at 2,000 vs 12,000 px come from the script
run by hand."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.slow
def test_peak_memory_flat_from_500_to_1500_px(tmp_path, tiny_model_dir):
    """Every raster and vector writer, all in one process per size (the
    peak is the worst writer's), with the tests' tiny model: 9x the
    pixels, the same peak."""
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--small", "500",
                        "--large", "1500", "--format", "zarr,ome.tif,cog,geojson", "--together", "--weights",
                        tiny_model_dir, "--halo", "72", "--workdir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ratio"] <= 1.3, res  # 9x the pixels
