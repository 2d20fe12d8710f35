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
@pytest.mark.parametrize("fmt", ["zarr", "ome.tif,cog,geojson"])
def test_peak_memory_flat_from_1000_to_4000_px(tmp_path, fmt):
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_memory.py"), "--small", "1000",
                        "--large", "4000", "--format", fmt, "--workdir", str(tmp_path), "--json"],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ratio"] <= 1.3, res  # 16x the pixels
