"""The demo: shipped model on the procedural slide, scored against its truth."""
import os

import numpy as np

from conftest import cli
from tilerseg import synthetic


def test_demo_segments_nuclei_of_an_unseen_synthetic_slide(tmp_path):
    r = cli("demo", str(tmp_path), "--size", "800", "--seed", "7", "--quiet")
    assert r.returncode == 0, r.stderr
    dice = float(next(ln for ln in r.stdout.splitlines() if ln.startswith("Dice")).split()[-1])
    assert dice >= 0.95
    drawn = next(ln for ln in r.stdout.splitlines() if ln.startswith("nuclei the generator drew"))
    assert f"{synthetic.nuclei((800, 800), 7):,};" in drawn and "--instances" in drawn
    for f in ("slide.tif", "mask.tif", "preview.png"):
        assert os.path.exists(tmp_path / f)
    assert os.path.getsize(os.path.join(os.path.dirname(synthetic.__file__), "data", "demo_unet.pt")) < 5e6


def test_synthetic_tiles_agree_wherever_cut():
    whole, truth = synthetic.tile(100, 200, 300, 300, seed=3)
    part, ptruth = synthetic.tile(180, 260, 90, 120, seed=3)
    assert np.array_equal(part, whole[80:170, 60:180]) and np.array_equal(ptruth, truth[80:170, 60:180])
    assert 0.01 < truth.mean() < 0.5


def test_weights_demo_shadowed_by_a_folder_says_so_and_how_to_name_either(tmp_path):
    """`tilerseg demo demo` leaves a folder named demo: `--weights demo`
    there means that folder (a path that exists wins), and its error says it
    is not the shipped model and how to name either; `tilerseg:demo` is the
    shipped model wherever it runs (the same bytes as its file)."""
    import tifffile
    import zarr

    from tilerseg.models import demo_weights

    (tmp_path / "demo").mkdir()
    img, truth = synthetic.tile(1000, 1000, 192, 192, seed=4)  # 12% nuclei
    tifffile.imwrite(tmp_path / "img.tif", img)
    r = cli("run", "img.tif", "--weights", "demo", "-o", "a.zarr", cwd=tmp_path)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr == (f"tilerseg: error: demo: a folder without config.json; expected one written by smp's "
                        f"save_pretrained (`demo` here is the folder {tmp_path / 'demo'}, not the shipped demo "
                        "model: name the shipped model --weights tilerseg:demo, this folder --weights ./demo)\n")
    r = cli("run", "img.tif", "--weights", "./demo", "-o", "a.zarr", cwd=tmp_path)
    assert r.returncode == 1 and "shipped" not in r.stderr and "./demo: a folder without config.json" in r.stderr
    for name, weights in (("b.zarr", "tilerseg:demo"), ("c.zarr", demo_weights())):
        r = cli("run", "img.tif", "--weights", weights, "-o", name, "--quiet", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
    b, c = (zarr.open_array(str(tmp_path / n / "0"), mode="r")[...] for n in ("b.zarr", "c.zarr"))
    assert np.array_equal(b, c) and b.any() and truth.any()
    import tilerseg

    here = os.getcwd()
    os.chdir(tmp_path)  # the folder named demo is here: the Python API spells the shipped model alike
    try:
        labels = tilerseg.segment(img, "tilerseg:demo", probabilities=False, device="cpu").compute()
    finally:
        os.chdir(here)
    assert np.array_equal(labels, b)
