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


def test_demo_paths_read_as_typed_and_a_rerun_refuses_like_run(tmp_path, monkeypatch):
    """`demo demo-out/`: no doubled slash, paths relative as run prints
    them, a hint whose output the README's steps do not take, and a rerun
    that keeps the earlier outputs unless --overwrite (run's rule)."""
    monkeypatch.chdir(tmp_path)
    r = cli("demo", "out/", "--size", "256", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "//" not in r.stdout and "wrote out/mask.tif" in r.stdout and str(tmp_path) not in r.stdout
    hint = next(ln for ln in r.stdout.splitlines() if ln.startswith("nuclei the generator drew"))
    target = hint.split(" -o ")[1].strip()
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    assert target == "out/objects.geojson" and "demo-out/objects.geojson" not in readme
    before = (tmp_path / "out" / "mask.tif").read_bytes()
    r = cli("demo", "out", "--size", "256", "--seed", "3", "--quiet")
    assert r.returncode == 1 and "already exists" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (tmp_path / "out" / "mask.tif").read_bytes() == before
    r = cli("demo", "out", "--size", "256", "--seed", "3", "--quiet", "--overwrite")
    assert r.returncode == 0 and (tmp_path / "out" / "mask.tif").read_bytes() != before
    # run prints its output the same way
    r = cli("run", "out/slide.tif", "--weights", "demo", "-o", "out/n.geojson", "--quiet")
    assert r.returncode == 0, r.stderr
    assert "wrote out/n.geojson:" in r.stdout and "touching objects are one polygon; --instances" in r.stdout
