"""A membrane map's cells (``InstanceOptions(markers=...)``, ``eval --instances``).

The oracle is a hand-drawn membrane map whose cells are known: four cells
parted by membranes, one gap in a membrane that the threshold alone lets
through (it merges two cells), and a speck of "cell" inside a thick
membrane. Numpy says what each pixel must be; the blocks must not change it."""
import json

import numpy as np
import pytest
from PIL import Image

from conftest import cli, data

from tilerseg.instances import InstanceOptions, label_array
from tilerseg.train.challenge import challenge_scores, decided, objects

H, W = 40, 60
GAP_ROWS, GAP_COLS = slice(4, 8), slice(29, 32)


def membrane_map() -> np.ndarray:
    """P(cell) (1, H, W): cells 0.95, membranes 0.05 (a vertical one at
    columns 29-31, a thick horizontal one at rows 17-23), a gap of the
    vertical membrane at rows 4-7 whose middle column is the most
    membrane-like (0.6, 0.55, 0.6: all above the threshold 0.5, none above
    the marker threshold 0.9), and a 2x2 speck at 0.7 inside the thick
    membrane."""
    p = np.full((H, W), 0.95, np.float32)
    p[:, 29:32] = 0.05
    p[17:24] = 0.05
    p[GAP_ROWS, GAP_COLS] = [0.6, 0.55, 0.6]
    p[19:21, 10:12] = 0.7
    return p[None]


OPTS = InstanceOptions(threshold=0.5, markers=0.9, min_area=10)


def expected() -> np.ndarray:
    """The cells' pixels (numpy, by hand): the threshold's, without the
    speck, with the gap closed by a one-pixel line down the gap. The line
    runs where the flood from the left meets the flood from the right, at
    the middle column (0.55) or its left neighbour, so both are allowed in
    the gap; everything else is exact."""
    want = membrane_map()[0] >= 0.5
    want[19:21, 10:12] = False
    return want


def test_markers_watershed_close_the_gap_and_drop_the_speck():
    p = membrane_map()
    plain = objects(p[0] >= 0.5)
    assert plain.max() == 4  # the gap merges the top two cells; the speck is one more object
    labels = label_array(p, OPTS)
    cells = labels > 0
    want = expected()
    outside = np.ones((H, W), bool)
    outside[GAP_ROWS, GAP_COLS] = False
    assert np.array_equal(cells[outside], want[outside])
    gap = cells[GAP_ROWS, GAP_COLS]
    assert ((~gap).sum(1) == 1).all() and not (~gap)[:, 2].any()  # one pixel a row, col 29 or 30
    assert labels.max() == 4 and objects(cells).max() == 4  # four cells, each 4-separate from the others
    top = labels[0]
    assert top[0] != top[-1] and labels[-1, 0] != labels[-1, -1]
    # the objects are the same whatever the blocks: 8-px chunks cut the cells and the gap
    assert np.array_equal(label_array(p, OPTS, chunk=8), labels)
    # the distance split (no markers) splits the neck too, but leaves the two objects touching: the
    # challenge, which reads a boundary map, would still see one cell
    distance = label_array(p, InstanceOptions(threshold=0.5, min_area=10))
    assert distance.max() == 4 and objects(distance > 0).max() == 3


def test_join_below_joins_a_cell_cut_by_a_dim_band_and_nothing_else():
    """A band of P 0.75 across the lower left cell (above the threshold,
    below the markers) cuts its sure interior in two, so the markers make
    two objects of it; their shared boundary has a mean membrane
    probability of 0.25, the gap's 0.425, the membranes' 0.95."""
    p = membrane_map()
    p[0, 30:33, :29] = 0.75
    split = label_array(p, OPTS)
    assert split.max() == 5  # the band's cell is two objects
    joined = label_array(p, InstanceOptions(threshold=0.5, markers=0.9, min_area=10, join=0.3))
    assert joined.max() == 4 and objects(joined > 0).max() == 4
    outside = np.ones((H, W), bool)
    outside[GAP_ROWS, GAP_COLS] = False
    assert np.array_equal((joined > 0)[outside], expected()[outside])  # the band's parting line is gone
    assert np.array_equal(label_array(p, InstanceOptions(threshold=0.5, markers=0.9, min_area=10, join=0.3),
                                      chunk=8), joined)
    # above the gap's 0.425, the two top cells are one: the threshold is what decides
    assert label_array(p, InstanceOptions(threshold=0.5, markers=0.9, min_area=10, join=0.5)).max() == 3


def test_the_scores_of_the_objects_are_the_challenges_of_their_map():
    """``decided`` turns the objects into a map whose threshold is exactly
    them, and the closed gap is worth a merger less than the threshold."""
    p = membrane_map()[0]
    truth = np.ones((H, W), bool)
    truth[:, 29:32] = False
    truth[17:24] = False
    cells = label_array(p[None], OPTS) > 0
    score = decided(cells, p, 0.5)
    assert np.array_equal(score >= np.float32(0.5), cells)
    plain, post = challenge_scores(truth, p), challenge_scores(truth, score)
    assert plain["mergers"] == 1 and post["mergers"] == 0
    assert post["adapted_rand_error"] < plain["adapted_rand_error"]
    assert post["warping_error"] < plain["warping_error"]


@pytest.fixture(scope="module")
def tiny_em(tmp_path_factory):
    """Two ISBI slices cropped to 96 px, and 8 steps of training on them (enough for some cells)."""
    root = tmp_path_factory.mktemp("em")
    for sub in ("image", "label"):
        (root / sub).mkdir()
        for i in (0, 1):
            a = np.array(Image.open(data(f"isbi2012/{sub}/{i}.png")))[:96, :96]
            Image.fromarray(a).save(root / sub / f"{i}.png")
    cfg = root / "em.yaml"
    cfg.write_text(f"""
data:
  images: {root}/image
  masks: {root}/label
  class_names: [membrane, cell]
  mask_values: [0, 255]
  val_names: [1]
  crop: 64
  samples_per_epoch: 16
model:
  model: unet2d
  model_args: {{features: 4, depth: 2}}
optim: {{lr: 0.02}}
train: {{epochs: 2, batch_size: 4, precision: fp32}}
infer: {{tile: 96, halo: 16}}
""")
    r = cli("train", str(cfg), "-o", str(root / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    return root


def test_eval_instances_prints_both_rows_and_scores_runs_objects(tiny_em, tmp_path):
    root = tiny_em
    ckpt = str(root / "run" / "best.pt")
    args = ("eval", "--weights", ckpt, str(root / "image"), str(root / "label"), "--instances",
            "--marker-threshold", "0.7", "--object-threshold", "0.4", "--min-area", "5")
    r = cli(*args)
    assert r.returncode == 0, r.stderr
    rows = {line.split("  ")[0]: line for line in r.stdout.splitlines()}
    assert any(k.startswith("threshold") for k in rows) and any(k.startswith("objects (--instances)") for k in rows)
    header = next(line for line in r.stdout.splitlines() if "warping error" in line and "objects" in line)
    assert "pixel error" in header and "Rand error" in header
    rep = json.loads(cli(*args, "--json").stdout)
    post = rep["instances"]
    assert {d["image"] for d in post["images"]} == {"0", "1"}
    for key in ("pixel_error", "adapted_rand_error", "warping_error"):
        assert 0 <= post["overall"][key] <= 1
    assert post["overall"]["objects"] > 0 and post["overall"]["threshold"] == 0.4 != rep["threshold"]
    # the objects scored are those tilerseg run --instances writes, from the same code
    out = tmp_path / "0.zarr"
    r = cli("run", str(root / "image" / "0.png"), "--weights", ckpt, "--instances", "--marker-threshold", "0.7",
            "--object-threshold", "0.4", "--min-area", "5", "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    import zarr

    written = np.asarray(zarr.open_group(str(out), mode="r")["0"])
    truth = np.array(Image.open(root / "label" / "0.png")) == 255
    tp, fp, fn = (written > 0)[truth].sum(), ((written > 0) & ~truth).sum(), (~(written > 0) & truth).sum()
    mine = next(d for d in post["images"] if d["image"] == "0")
    assert mine["pixel_error"] == pytest.approx(1 - 2 * tp / (2 * tp + fp + fn))
    assert mine["objects"] == int(written.max())


def test_bad_post_process_options_are_one_line(tiny_em):
    root = tiny_em
    ckpt = str(root / "run" / "best.pt")
    r = cli("eval", "--weights", ckpt, str(root / "image"), str(root / "label"), "--instances",
            "--marker-threshold", "1.5")
    assert r.returncode != 0 and "--marker-threshold 1.5" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("eval", "--weights", ckpt, str(root / "image"), str(root / "label"), "--min-area", "5")
    assert r.returncode != 0 and "add --instances" in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("options, message", [
    ({"join_below": 0.3}, "--join-below joins a membrane map's cells: give --marker-threshold too"),
    ({"join_below": float("nan"), "marker_threshold": 0.9}, "--join-below nan: give a probability"),
])
def test_join_below_is_refused_in_one_line_where_it_means_nothing(options, message):
    from tilerseg.config import RunConfig
    from tilerseg.errors import InputError

    with pytest.raises(InputError, match=message):
        RunConfig.from_options(instances=True, **options)


CELL_FLAGS = ("--object-threshold", "0.4", "--marker-threshold", "0.7", "--split-depth", "2", "--min-area", "5",
              "--join-below", "0.3")


def test_a_checkpoints_recorded_cell_options_are_the_defaults_and_flags_override(tiny_em, tmp_path):
    """The post-process options recorded in a checkpoint (as
    scripts/tune_em_instances.py --write does) are what eval and run
    --instances use without flags: the same figures and bytes as with the
    flags typed out; a flag still overrides its own option."""
    import shutil

    from tilerseg.models import ModelSpec, describe
    from tilerseg.models.weights import record_postprocess

    root = tiny_em
    plain = str(root / "run" / "best.pt")
    ckpt = str(tmp_path / "cells.pt")
    shutil.copy(plain, ckpt)
    record_postprocess(ckpt, {"object_threshold": 0.4, "marker_threshold": 0.7, "split_depth": 2, "min_area": 5,
                              "join_below": 0.3})
    assert describe(ckpt, ModelSpec()).postprocess_options == {
        "object_threshold": 0.4, "marker_threshold": 0.7, "split_depth": 2, "min_area": 5, "join_below": 0.3}
    card = cli("models", "--describe", ckpt)  # issue 38 item 22: `models --describe` shows them
    assert card.returncode == 0, card.stderr
    assert "postprocess" in card.stdout and "marker_threshold=0.7" in card.stdout and "join_below=0.3" in card.stdout

    def ev(weights, *flags):
        r = cli("eval", "--weights", weights, str(root / "image"), str(root / "label"), "--instances", "--json", *flags)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)["instances"]["overall"]

    typed, recorded = ev(plain, *CELL_FLAGS), ev(ckpt)
    assert recorded == typed and recorded != ev(plain, "--marker-threshold", "0.7")
    assert ev(ckpt, "--min-area", "0") == ev(plain, *CELL_FLAGS[:6], "--min-area", "0", *CELL_FLAGS[8:])
    src = str(root / "image" / "0.png")
    for name, weights, flags in (("typed", plain, CELL_FLAGS), ("recorded", ckpt, ())):
        r = cli("run", src, "--weights", weights, "--instances", *flags, "-o", str(tmp_path / f"{name}.ome.tif"),
                "--quiet")
        assert r.returncode == 0, r.stderr
    assert (tmp_path / "typed.csv").read_text() == (tmp_path / "recorded.csv").read_text()


def test_training_records_the_configs_postprocess_and_refuses_a_bad_one(tiny_em, tmp_path):
    root = tiny_em
    cfg = (root / "em.yaml").read_text().replace("train: {epochs: 2,", "train: {epochs: 1,")
    good = tmp_path / "good.yaml"
    good.write_text(cfg.replace("infer: {tile: 96, halo: 16}",
                                "infer: {tile: 96, halo: 16, postprocess: {marker_threshold: 0.8, min_area: 7}}"))
    r = cli("train", str(good), "-o", str(tmp_path / "run"), "--quiet")
    assert r.returncode == 0, r.stderr
    from tilerseg.models import ModelSpec, describe

    assert describe(str(tmp_path / "run" / "best.pt"), ModelSpec()).postprocess_options == \
        {"marker_threshold": 0.8, "min_area": 7}
    bad = tmp_path / "bad.yaml"
    bad.write_text(cfg.replace("infer: {tile: 96, halo: 16}", "infer: {tile: 96, halo: 16, postprocess: {depth: 3}}"))
    r = cli("train", str(bad), "-o", str(tmp_path / "run2"), "--quiet")
    assert r.returncode == 1 and "postprocess depth" in r.stderr and len(r.stderr.strip().splitlines()) == 1
