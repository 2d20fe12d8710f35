"""tilerseg train / eval: data, augmentation, the loop, checkpoints, scores.

Oracles: numpy slices of the whole image, a hand-computed confusion matrix
over ``tilerseg run``'s own output, and an uninterrupted run for resume."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tifffile
from PIL import Image

from conftest import cli

from tilerseg.errors import InputError
from tilerseg.train.challenge import rand_and_vi
from tilerseg.train.data import CropDataset, LabelMap, Pair, Source, find_pairs, split
from tilerseg.train.metrics import IGNORE, confusion, scores


def _discs(root, n=6, size=96, seed=0, bands=3):
    """Bright discs on a noisy dark background, with their 0/255 masks."""
    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/images", exist_ok=True)
    os.makedirs(f"{root}/masks", exist_ok=True)
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        m = np.zeros((size, size), bool)
        for _ in range(6):
            cy, cx = rng.integers(0, size, 2)
            m |= (yy - cy) ** 2 + (xx - cx) ** 2 < int(rng.integers(5, 12)) ** 2
        img = np.clip(60 + 120 * m[..., None] + rng.normal(0, 20, (size, size, bands)), 0, 255).astype(np.uint8)
        Image.fromarray(img[..., 0] if bands == 1 else img).save(f"{root}/images/s{i}.png")
        Image.fromarray((m * 255).astype(np.uint8)).save(f"{root}/masks/s{i}.png")
    return str(root)


CONFIG = """
data:
  images: {root}/images
  masks: {root}/masks
  class_names: [background, disc]
  mask_values: [0, 255]
  crop: 64
  samples_per_epoch: 16
model:
  model: unet
  encoder: resnet18
  model_args: {{encoder_depth: 3, decoder_channels: [16, 8, 4]}}
optim: {{lr: 0.01}}
train: {{epochs: 2, batch_size: 4}}
infer: {{tile: 128, halo: 72, sweep_threshold: true, tta: flips}}
"""


@pytest.fixture(scope="module")
def discs(tmp_path_factory):
    root = _discs(tmp_path_factory.mktemp("discs"))
    cfg = os.path.join(root, "train.yaml")
    with open(cfg, "w") as f:
        f.write(CONFIG.format(root=root))
    return root, cfg


@pytest.fixture(scope="module")
def trained(discs, tmp_path_factory):
    """One short training run through the command line."""
    root, cfg = discs
    out = str(tmp_path_factory.mktemp("run") / "run")
    r = cli("train", cfg, "-o", out, "--quiet")
    assert r.returncode == 0, r.stderr
    return out, r


def test_pairs_match_by_name_and_split_by_image(tmp_path):
    root = _discs(tmp_path, n=5)
    pairs = find_pairs(f"{root}/images", f"{root}/masks")
    assert [p.name for p in pairs] == [f"s{i}" for i in range(5)]
    assert all(os.path.basename(p.image) == os.path.basename(p.mask) for p in pairs)
    tr, va = split(pairs, 0.4, seed=3)
    assert len(va) == 2 and len(tr) == 3 and not {p.name for p in tr} & {p.name for p in va}
    assert split(pairs, 0.4, seed=3) == (tr, va)  # the seed fixes it
    os.remove(f"{root}/masks/s2.png")
    with pytest.raises(InputError, match="no mask for 1 image.*s2.png"):
        find_pairs(f"{root}/images", f"{root}/masks")


def test_label_map_values_ignore_and_default():
    m = np.array([[0, 255, 7], [128, 255, 0]], np.uint8)
    assert LabelMap(2, [0, 255])(m).tolist() == [[0, 1, IGNORE], [IGNORE, 1, 0]]
    assert LabelMap(2)(m).tolist() == [[0, 1, 1], [1, 1, 0]]          # binary: non-zero is 1
    assert LabelMap(3, ignore=255)(np.array([[0, 1, 2, 255, 9]])).tolist() == [[0, 1, 2, IGNORE, IGNORE]]
    with pytest.raises(InputError, match="one mask value per class"):
        LabelMap(3, [0, 255])


def test_crops_read_only_their_window_and_mask_at_any_scale(tmp_path):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 255, (600, 500, 3), np.uint8)
    mask = rng.integers(0, 3, (300, 250), np.uint8)  # stored at half resolution
    tifffile.imwrite(tmp_path / "a.tif", img, tile=(128, 128), photometric="rgb")
    tifffile.imwrite(tmp_path / "m.tif", mask, tile=(64, 64))
    src = Source(Pair(str(tmp_path / "a.tif"), str(tmp_path / "m.tif")), LabelMap(3))
    reads = []
    orig = src.image.read
    src.image.read = lambda rows, cols: (reads.append((rows, cols)), orig(rows, cols))[1]
    data, labels = src.read(123, 77, 64, 80)
    assert reads == [((123, 187), (77, 157))]
    np.testing.assert_array_equal(data, img[123:187, 77:157])
    rows, cols = (np.arange(123, 187) + 0.5) * 0.5, (np.arange(77, 157) + 0.5) * 0.5
    np.testing.assert_array_equal(labels, mask[rows.astype(int)][:, cols.astype(int)])
    # past the border: mirrored like the tiler pads
    data, labels = src.read(580, 480, 40, 40)
    np.testing.assert_array_equal(data, np.pad(img, ((0, 20), (0, 20), (0, 0)), mode="reflect")[580:620, 480:520])
    src.close()


def test_crop_dataset_is_reproducible_and_finds_foreground(discs):
    root, _ = discs
    pairs = find_pairs(f"{root}/images", f"{root}/masks")
    srcs = [Source(p, LabelMap(2, [0, 255])) for p in pairs]
    from tilerseg.train.augment import build_augment

    def ds(fg=0.0):
        return CropDataset(srcs, crop=32, length=40, seed=5, scale=255, mean=(0.5,) * 3, std=(0.2,) * 3,
                           augment=build_augment("heavy", 32), foreground=fg)

    a, b = ds(), ds()
    for i in (0, 7, 39):
        xa, ya = a[i]
        xb, yb = b[i]
        assert xa.shape == (3, 32, 32) and ya.shape == (32, 32)
        assert np.array_equal(xa.numpy(), xb.numpy()) and np.array_equal(ya.numpy(), yb.numpy())
    b.set_epoch(1)
    assert not np.array_equal(a[0][0].numpy(), b[0][0].numpy())
    with_fg = sum(bool((ds(1.0).sample(i)[1] == 1).any()) for i in range(40))
    assert with_fg == 40
    for s in srcs:
        s.close()


@pytest.mark.parametrize("preset", ["light", "elastic", "medium", "heavy"])
def test_augment_keeps_image_and_mask_aligned(preset):
    from tilerseg.train.augment import build_augment

    rng = np.random.default_rng(1)
    lab = np.zeros((64, 64), np.uint8)
    lab[10:30, 5:50] = 1
    lab[40:60, 20:35] = 1
    bands = 3 if preset == "elastic" else 4  # albumentations deforms grey or RGB only
    img = np.repeat((0.2 + 0.6 * lab)[..., None], bands, axis=2).astype(np.float32)
    t = build_augment(preset, 64)
    for seed in range(10):
        t.set_random_seed(seed)
        out = t(image=img, mask=lab)
        im, m = out["image"], out["mask"]
        assert im.shape == (64, 64, bands) and im.dtype == np.float32 and m.shape == (64, 64)
        # wherever the mask says object the image is brighter (dropout holes aside)
        obj, bg = im[..., 0][m == 1], im[..., 0][m == 0]
        assert np.median(obj) > np.median(bg) + 0.2
        assert set(np.unique(m)) <= {0, 1}
        if preset == "elastic":  # moved together: the deformed mask is the deformed image's bright part
            assert ((im[..., 0] > 0.5) == (m == 1)).mean() > 0.97


def test_metrics_from_confusion():
    truth = np.array([[0, 1, 1, IGNORE], [1, 0, 0, 1]])
    pred = np.array([[0, 1, 0, 1], [1, 1, 0, 1]])
    cm = confusion(truth, pred, 2)
    assert cm.tolist() == [[2, 1], [1, 3]]
    s = scores(cm, ["bg", "fg"])
    assert s["iou"] == pytest.approx(3 / 5) and s["dice"] == pytest.approx(6 / 8)
    assert s["misclassified"] == pytest.approx(2 / 7)
    # the ISBI challenge's pixel error: 1 - F-score of class 1 (3 true, 1 false positive, 1 missed)
    assert s["pixel_error"] == pytest.approx(1 - 2 * 3 / (2 * 3 + 1 + 1))
    assert s["per_class"]["bg"]["iou"] == pytest.approx(2 / 4)
    three = scores(confusion(np.array([0, 1, 2, 2]), np.array([0, 2, 2, 2]), 3))
    assert three["pixel_error"] == three["misclassified"] == pytest.approx(1 / 4)  # no F-score beyond 2 classes


def test_train_writes_run_folder_and_self_describing_checkpoint(trained):
    out, r = trained
    for f in ("best.pt", "last.pt", "history.csv", "history.json", "curves.png", "train.log"):
        assert os.path.exists(os.path.join(out, f)), f
    hist = json.load(open(os.path.join(out, "history.json")))
    assert [h["epoch"] for h in hist] == [1, 2]
    assert all(0 <= h["pixel_error"] <= 1 and "disc" in h["per_class"] for h in hist)
    assert "best epoch" in r.stdout
    from tilerseg.models import describe, ModelSpec

    info = describe(os.path.join(out, "best.pt"), ModelSpec())
    assert info.spec.arch == "unet" and info.spec.encoder == "resnet18" and info.spec.in_channels == 3
    assert info.class_names == ("background", "disc") and info.mask_values == (0, 255)
    assert info.tile == 208 and info.halo == 72  # 128 leaves no crop with halo 72: grown on the stride grid
    assert len(info.normalization.mean) == 3 and info.normalization.scale == 255
    assert info.tta == "flips" and 0.05 <= info.threshold <= 0.95  # the sweep's pick, loadable weights-only
    summary = json.load(open(os.path.join(out, "summary.json")))
    assert summary["final"]["threshold"] == info.threshold and summary["final"]["tta"] == "flips"


def test_checkpoint_runs_with_no_model_flag_and_eval_matches_numpy(trained, discs, tmp_path):
    out, _ = trained
    root, _ = discs
    ckpt = os.path.join(out, "best.pt")
    inter = union = wrong = total = tp = fp = fn = 0
    per_image, per_image_f, rand = {}, {}, {}
    for i in range(6):
        mask_out = str(tmp_path / f"s{i}.png")
        r = cli("run", f"{root}/images/s{i}.png", "--weights", ckpt, "-o", mask_out, "--quiet")
        assert r.returncode == 0, r.stderr
        pred = np.array(Image.open(mask_out)) == 1
        truth = np.array(Image.open(f"{root}/masks/s{i}.png")) == 255
        per_image[f"s{i}"] = (pred != truth).mean()
        per_image_f[f"s{i}"] = 1 - 2 * (pred & truth).sum() / (2 * (pred & truth).sum() + (pred != truth).sum())
        tp, fp, fn = tp + (pred & truth).sum(), fp + (pred & ~truth).sum(), fn + (~pred & truth).sum()
        rand[f"s{i}"] = rand_and_vi(truth, pred)["adapted_rand_error"]
        inter += (pred & truth).sum()
        union += (pred | truth).sum()
        wrong += (pred != truth).sum()
        total += truth.size
    r = cli("eval", "--weights", ckpt, f"{root}/images", f"{root}/masks", "--json")
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert rep["overall"]["iou"] == pytest.approx(inter / union)
    assert rep["overall"]["misclassified"] == pytest.approx(wrong / total)
    assert {d["image"]: d["misclassified"] for d in rep["images"]} == pytest.approx(per_image)
    # pixel error as the challenge (and the U-Net paper) counts it: 1 - F-score, pooled over the images
    assert rep["overall"]["pixel_error"] == pytest.approx(1 - 2 * tp / (2 * tp + fp + fn))
    assert {d["image"]: d["pixel_error"] for d in rep["images"]} == pytest.approx(per_image_f)
    # the challenge's scores, per image and overall (the mean over images, as the challenge averaged slices)
    assert {d["image"]: d["adapted_rand_error"] for d in rep["images"]} == pytest.approx(rand)
    assert rep["overall"]["adapted_rand_error"] == pytest.approx(np.mean(list(rand.values())))
    for d in rep["images"] + [rep["overall"]]:
        assert 0 <= d["warping_error"] <= d["misclassified"] and d["vi_split"] >= 0 and d["vi_merge"] >= 0
    # the sweep reports the threshold with the best overall IoU among those it scored
    r = cli("eval", "--weights", ckpt, f"{root}/images", f"{root}/masks", "--json", "--sweep-threshold")
    swept = json.loads(r.stdout)
    assert swept["overall"]["iou"] >= rep["overall"]["iou"] - 1e-12
    assert 0.05 <= swept["threshold"] <= 0.95


@pytest.mark.slow
def test_resume_after_an_interruption_equals_an_uninterrupted_run(discs, tmp_path):
    import torch

    from tilerseg.train import load_train_config, train

    _, cfg_path = discs
    full = train(load_train_config(cfg_path), tmp_path / "full", progress=False)
    cut = load_train_config(cfg_path, {"max_minutes": 1e-9})  # stops after epoch 1, like a kill
    first = train(cut, tmp_path / "cut", progress=False)
    assert first.epochs_run == 1
    with pytest.raises(InputError, match="--resume"):
        train(load_train_config(cfg_path), tmp_path / "cut", progress=False)
    resumed = train(load_train_config(cfg_path), tmp_path / "cut", resume=True, progress=False)
    assert resumed.epochs_run == 1
    a = torch.load(full.last, weights_only=True)["state_dict"]
    b = torch.load(resumed.last, weights_only=True)["state_dict"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    ha = json.load(open(tmp_path / "full" / "history.json"))
    hb = json.load(open(tmp_path / "cut" / "history.json"))
    assert [h["train_loss"] for h in ha] == pytest.approx([h["train_loss"] for h in hb], rel=1e-5)


def test_run_refuses_wrong_bands_and_mpp(trained, tmp_path):
    out, _ = trained
    ckpt = os.path.join(out, "best.pt")
    gray = tmp_path / "gray.png"
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(gray)
    r = cli("run", str(gray), "--weights", ckpt, "-o", str(tmp_path / "o.png"))
    assert r.returncode == 1 and "take 3 input band(s), the image has 1" in r.stderr
    assert "Traceback" not in r.stderr
    # a checkpoint trained at 0.5 µm/px warns on a slide read at 2 µm/px (issue 33: beyond 1.5x, warned)
    import torch

    state = torch.load(ckpt, weights_only=True)
    state["mpp"] = 0.5
    torch.save(state, tmp_path / "mpp.pt")
    slide = tmp_path / "slide.tif"
    tifffile.imwrite(slide, np.zeros((64, 64, 3), np.uint8), photometric="rgb", resolution=(5000, 5000),
                     resolutionunit="CENTIMETER")  # 2 µm/px
    r = cli("run", str(slide), "--weights", str(tmp_path / "mpp.pt"), "-o", str(tmp_path / "o.zarr"))
    assert r.returncode == 0 and "trained at 0.5 µm/px" in r.stderr and "--mpp 0.5" in r.stderr, r.stderr


def test_train_config_errors_are_one_line(discs, tmp_path):
    root, cfg = discs
    bad = tmp_path / "bad.yaml"
    bad.write_text(open(cfg).read().replace("crop: 64", "crpo: 64"))
    r = cli("train", str(bad), "-o", str(tmp_path / "x"))
    assert r.returncode == 1 and "unknown training option 'crpo'" in r.stderr and "Traceback" not in r.stderr
    r = cli("train", cfg, "-o", str(tmp_path / "y"), "--set", "loss=dice_bce", "--set", "class_names=[a, b, c]")
    assert r.returncode == 1 and "binary" in r.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch,args", [
    ("transunet", "{backbone: resnet18, layers: [1, 1, 1, 1], hidden: 64, depth: 2, heads: 2, "
                  "decoder_channels: [32, 16, 8, 8], head_channels: 64}"),
    ("ternausnet11", "{num_filters: 8}"),
    ("unet2d", "{features: 8, depth: 3}"),
])
def test_other_architectures_train_a_few_steps(discs, tmp_path, arch, args):
    _, cfg = discs
    out = tmp_path / arch
    r = cli("train", cfg, "-o", str(out), "--quiet", "--epochs", "1", "--samples-per-epoch", "8",
            "--set", f"model={arch}", "--set", f"model_args={args}", "--set", "halo=32", "--set", "tile=128")
    assert r.returncode == 0, r.stderr
    from tilerseg.models import ModelSpec, describe

    info = describe(str(out / "best.pt"), ModelSpec())
    assert info.spec.arch == arch
    img = os.path.join(os.path.dirname(cfg), "images", "s0.png")
    r = cli("run", img, "--weights", str(out / "best.pt"), "-o", str(tmp_path / "m.png"), "--quiet")
    assert r.returncode == 0, r.stderr
