"""The one writer: locks, paths that must not be written, the preview, and
outputs that appear during a run."""
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import tilerseg
from conftest import cli, data
from tilerseg.errors import OutputError

FAST = ["--tile", "256", "--halo", "72", "--quiet"]


@pytest.fixture()
def png(tmp_path) -> str:
    path = tmp_path / "in.png"
    rng = np.random.default_rng(3)
    Image.fromarray(rng.integers(0, 256, (200, 230, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_no_output_may_be_an_input_even_with_overwrite(tmp_path, png, tiny_model_dir):
    before = open(png, "rb").read()
    for extra in (["-o", png, "--overwrite"], ["-o", str(tmp_path / "m.zarr"), "--preview", png, "--overwrite"]):
        r = cli("run", png, "--weights", tiny_model_dir, *FAST, *extra)
        assert r.returncode == 1 and "is an input of this run" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1
    # a symlink to the input is the input
    os.symlink(png, tmp_path / "alias.png")
    r = cli("run", png, "--weights", tiny_model_dir, *FAST, "-o", str(tmp_path / "alias.png"), "--overwrite")
    assert r.returncode == 1 and "is an input" in r.stderr
    # nor a manifest's output, nor the weights
    (tmp_path / "list.txt").write_text(f"{png}\n{data('rasterio/RGB.byte.tif')} {png}\n")
    r = cli("run", "--manifest", str(tmp_path / "list.txt"), "--weights", tiny_model_dir, *FAST, cwd=tmp_path)
    assert r.returncode == 1 and "is an input of this run" in r.stderr
    ckpt = tmp_path / "w.pt"
    ckpt.write_bytes(b"x")
    r = cli("run", png, "--weights", str(ckpt), *FAST, "-o", str(ckpt).replace(".pt", ".png"))
    assert open(png, "rb").read() == before and ckpt.read_bytes() == b"x"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".jsonl")) == \
        ["alias.png", "in.png", "list.txt", "w.pt"]


def test_png_mask_with_a_preview(tmp_path, png, tiny_model_dir):
    """`-o mask.png --preview p.png`: the preview is drawn from the result
    the writer holds, not by reading the palette PNG back."""
    out, prev = tmp_path / "m.png", tmp_path / "p.png"
    r = cli("run", png, "--weights", tiny_model_dir, *FAST, "-o", str(out), "--preview", str(prev))
    assert r.returncode == 0, r.stderr
    assert f"wrote {prev}" in r.stdout
    lab = np.asarray(Image.open(out))
    img = np.asarray(Image.open(png)).astype(float)
    got = np.asarray(Image.open(prev)).astype(float)
    on = lab == 1
    assert got.shape == img.shape and on.any() and (~on).any()
    blend = 0.45 * img + 0.55 * np.array([0, 230, 60])
    assert np.abs(got[on] - blend[on]).max() <= 1 and np.abs(got[~on] - img[~on]).max() <= 1


def test_preview_problems_are_found_before_any_work(tmp_path, png, tiny_model_dir):
    out = tmp_path / "m.zarr"
    r = cli("run", png, "--weights", tiny_model_dir, *FAST, "-o", str(out), "--preview", str(tmp_path / "no/p.png"))
    assert r.returncode == 1 and "does not exist" in r.stderr and r.stderr.count("\n") == 1
    assert not out.exists()
    (tmp_path / "p.png").write_bytes(b"keep")
    r = cli("run", png, "--weights", tiny_model_dir, *FAST, "-o", str(out), "--preview", str(tmp_path / "p.png"))
    assert r.returncode == 1 and "already exists; pass --overwrite" in r.stderr
    assert (tmp_path / "p.png").read_bytes() == b"keep" and not out.exists()
    r = cli("run", png, "--weights", tiny_model_dir, *FAST, "-o", str(out), "--preview", str(tmp_path / "p.jpg"))
    assert r.returncode == 1 and "name it .png" in r.stderr


def test_an_output_that_appears_during_the_run_is_left_alone(tmp_path, png, tiny_model_dir):
    out = tmp_path / "m.tif"

    def intruder(done, total):
        if not out.exists():
            out.write_bytes(b"someone else's")

    with pytest.raises(OutputError, match="appeared while this run was writing"):
        tilerseg.run(png, out, weights=tiny_model_dir, tile=256, halo=72, batch_size=1, progress=intruder)
    assert out.read_bytes() == b"someone else's"
    assert (tmp_path / ".m.tif.tilerseg" / "done").is_dir()  # the finished work is kept
    # --overwrite --resume reuses it
    rep = tilerseg.run(png, out, weights=tiny_model_dir, tile=256, halo=72, batch_size=1, overwrite=True,
                       resume=True)
    assert rep.windows_run == 0 and rep.windows_resumed == rep.windows and out.read_bytes()[:2] in (b"II", b"MM")


def test_a_held_lock_refuses_and_a_dead_ones_lock_is_taken_over(tmp_path, caplog):
    from tilerseg.io.lock import OutputLock

    target = str(tmp_path / "m.zarr")
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from tilerseg.io.lock import OutputLock\n"
        f"OutputLock({target!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(OutputError, match=f"another tilerseg run is writing it \\(process {holder.pid} on"):
            OutputLock(target).acquire()
    finally:
        holder.kill()
        holder.wait()
    # killed: its lock file stays, naming it, but nobody holds it
    lock = tmp_path / ".m.zarr.tilerseg.lock"
    assert json.loads(lock.read_text())["pid"] == holder.pid
    with caplog.at_level("WARNING", logger="tilerseg"):
        with OutputLock(target):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by process {holder.pid}" in caplog.text
    assert not lock.exists()


def test_config_unknown_option_names_the_nearest(tmp_path, png, tiny_model_dir):
    with pytest.raises(tilerseg.TilersegError, match="unknown option 'batchsize' \\(did you mean 'batch_size'"):
        tilerseg.run(png, tmp_path / "m.zarr", batchsize=2)
    with pytest.raises(tilerseg.TilersegError, match="did you mean 'reflect'"):
        tilerseg.run(png, tmp_path / "m.zarr", pad_mode="reflct")
    cfg = tmp_path / "run.yaml"
    cfg.write_text("tile: 256\nhallo: 72\n")
    r = cli("run", png, "--config", str(cfg), "-o", str(tmp_path / "m.zarr"))
    assert r.returncode == 1 and "unknown option 'hallo' (did you mean 'halo'" in r.stderr
    assert not (tmp_path / "m.zarr").exists()


def test_the_cli_the_yaml_and_the_api_build_the_same_config(tmp_path):
    from tilerseg.cli import build_parser, run_config
    from tilerseg.config import RunConfig, load_run_config

    (tmp_path / "r.yaml").write_text("tile: 256\nhalo: 72\nbatch-size: 2\nbands: [1, 1, 1]\nmodel_args:\n"
                                     "  encoder_depth: 3\nprecision: bf16\n")
    a = build_parser().parse_args(["run", "x.tif", "--tile", "256", "--halo", "72", "--batch-size", "2",
                                   "--bands", "1,1,1", "--model-arg", "encoder_depth=3", "--precision", "bf16"])
    api = RunConfig.from_options(tile=256, halo=72, batch_size=2, bands=[1, 1, 1], model_args={"encoder_depth": 3},
                                 precision="bf16")
    assert run_config(a) == api == RunConfig.from_options(**load_run_config(tmp_path / "r.yaml"))
    assert api.tiling.batch_size == 2 and api.model.model_args == (("encoder_depth", 3),)
    assert hash(api) == hash(run_config(a))  # frozen, hashable


@pytest.mark.slow
def test_lock_answers_at_once_for_a_second_command(tmp_path, png):
    """The refusal comes before any model is built (no torch import)."""
    from tilerseg.io.lock import OutputLock

    out = str(tmp_path / "m.zarr")
    with OutputLock(out):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "tilerseg.cli", "run", png, "-o", out], capture_output=True,
                           text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=60)
        took = time.perf_counter() - t0
    assert r.returncode == 1 and f"(process {os.getpid()} on" in r.stderr
    assert took < 3.0, took


def test_manifest_and_config_files_are_inputs_too(tmp_path, png, tiny_model_dir):
    manifest = tmp_path / "list.txt"
    manifest.write_text(f"{png} {manifest}\n")
    r = cli("run", "--manifest", str(manifest), "--weights", tiny_model_dir, *FAST)
    assert r.returncode == 1 and "is an input of this run" in r.stderr
    assert manifest.read_text() == f"{png} {manifest}\n"
    cfg = tmp_path / "run.zarr"  # a config file named like an output
    cfg.write_text("tile: 256\n")
    r = cli("run", png, "--config", str(cfg), "-o", str(cfg), "--overwrite", "--weights", tiny_model_dir)
    assert r.returncode == 1 and "this run's --config" in r.stderr and cfg.read_text() == "tile: 256\n"


def test_a_second_training_into_the_same_folder_is_refused(tmp_path):
    from tilerseg.io.lock import OutputLock

    run_dir = tmp_path / "run"
    cfg = tmp_path / "t.yaml"
    cfg.write_text(f"images: {tmp_path}\nmasks: {tmp_path}\n")
    with OutputLock(str(run_dir)):
        r = cli("train", str(cfg), "-o", str(run_dir))
    assert r.returncode == 1 and "another tilerseg run is writing it" in r.stderr, r.stderr


def test_training_into_a_folder_whose_parent_does_not_exist_yet(tmp_path):
    """`tilerseg train CONFIG` defaults to runs/<name>: runs/ need not exist."""
    from tilerseg.io.lock import OutputLock
    from tilerseg.train.loop import train

    run_dir = tmp_path / "runs" / "em"
    try:
        train(object(), run_dir)  # the lock is taken, then the (bogus) config fails
    except AttributeError:
        pass
    assert (tmp_path / "runs").is_dir() and not (tmp_path / "runs" / ".em.tilerseg.lock").exists()
    with OutputLock(str(run_dir)):
        pass
