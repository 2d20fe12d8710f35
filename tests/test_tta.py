"""--tta: the output equals the mean of the flipped runs, done by hand."""
import numpy as np
import pytest
import torch

from conftest import cli, tiny_unet
import tilerseg
from tilerseg.infer import Predictor


def _predictor(tta, classes=1):
    return Predictor(tiny_unet(classes=classes), mean=(0.5,) * 3, std=(0.25,) * 3, scale=255.0, tta=tta)


@pytest.mark.parametrize("tta,views", [("flips", 4), ("d4", 8)])
def test_predictor_averages_the_views_mapped_back(tta, views):
    rng = np.random.default_rng(0)
    w = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    plain = _predictor("none", classes=3)
    by_hand = []
    for t in (False, True):
        for k in range(4):
            for flip in ((), (1,), (2,), (1, 2)):
                if (tta == "flips" and (t or k)) or (tta == "d4" and flip):
                    continue
                x = np.swapaxes(w, 1, 2) if t else w
                x = np.flip(np.rot90(x, k, axes=(1, 2)), flip) if flip else np.rot90(x, k, axes=(1, 2))
                p = torch.from_numpy(plain(x.copy()))
                p = torch.flip(p, [d + 1 for d in flip]) if flip else p
                p = torch.rot90(p, -k, dims=(2, 3))
                by_hand.append((p.transpose(2, 3) if t else p).numpy())
    assert len(by_hand) == views
    got = _predictor(tta, classes=3)(w)
    assert np.abs(got - np.mean(by_hand, axis=0)).max() < 1e-5
    assert np.abs(got - plain(w)).max() > 1e-3  # the views do differ: TTA changed something


def test_tiled_tta_flips_equals_mean_of_four_flipped_runs():
    """Through the tiled engine. The image is a whole
    number of crops, so the flipped image's windows are the flipped windows."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (224, 336, 3), dtype=np.uint8)  # crop 112: 2 x 3 windows
    model = tiny_unet()
    kw = dict(tile=256, halo=72, mean=(0.5,) * 3, std=(0.25,) * 3, device="cpu")
    got = tilerseg.segment(img, model, tta="flips", **kw).compute()
    runs = []
    for axes in ((), (0,), (1,), (0, 1)):
        flipped = np.flip(img, axes).copy() if axes else img
        p = tilerseg.segment(flipped, model, **kw).compute()
        runs.append(np.flip(p, [a + 1 for a in axes]) if axes else p)
    assert np.abs(got - np.mean(runs, axis=0)).max() < 1e-5


@pytest.mark.slow
def test_cli_tta_choices(tmp_path, tiny_model_dir):
    from conftest import data

    r = cli("run", data("isbi2012/image/0.png"), "--bands", "1,1,1", "--weights", tiny_model_dir, "--tta", "rot",
            "-o", str(tmp_path / "m.png"))
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = cli("run", data("isbi2012/image/0.png"), "--bands", "1,1,1", "--weights", tiny_model_dir, "--tta", "d4",
            "--tile", "256", "--halo", "64", "-o", str(tmp_path / "m.png"), "--quiet")
    assert r.returncode == 0, r.stderr
