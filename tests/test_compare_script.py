"""scripts/compare_unet_unetpp.py runs end to end and prints its table (at a
tiny budget: the figures in the README come from a real budget)."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import data

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_compare_script_prints_one_row_per_model(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "scripts", "compare_unet_unetpp.py"),
                        "--data", data("isbi2012"), "--models", "unet-resnet18,ternausnet11", "--epochs", "1",
                        "--samples-per-epoch", "8", "--tta", "none", "--val", "24", "--out", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stderr
    rows = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| model |") and len(rows) == 3
    assert rows[1].startswith("| unet-resnet18 | 1 |") and rows[2].startswith("| ternausnet11 | 1 |")
    assert "| 0.3 |" in rows[2]  # TernausNet's threshold
    assert all(" n/a " not in row for row in rows)  # pixel, Rand and warping errors and IoU all present
