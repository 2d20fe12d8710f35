"""The demo: shipped model on the procedural slide, scored against its truth."""
import os

import numpy as np

from conftest import cli
from tilerseg import synthetic


def test_demo_segments_nuclei_of_an_unseen_synthetic_slide(tmp_path):
    r = cli("demo", str(tmp_path), "--size", "800", "--seed", "7", "--quiet")
    assert r.returncode == 0, r.stderr
    dice = float(r.stdout.strip().splitlines()[-1].split()[-1])
    assert dice >= 0.95
    for f in ("slide.tif", "mask.tif", "preview.png"):
        assert os.path.exists(tmp_path / f)
    assert os.path.getsize(os.path.join(os.path.dirname(synthetic.__file__), "data", "demo_unet.pt")) < 5e6


def test_synthetic_tiles_agree_wherever_cut():
    whole, truth = synthetic.tile(100, 200, 300, 300, seed=3)
    part, ptruth = synthetic.tile(180, 260, 90, 120, seed=3)
    assert np.array_equal(part, whole[80:170, 60:180]) and np.array_equal(ptruth, truth[80:170, 60:180])
    assert 0.01 < truth.mean() < 0.5
