"""Tiled output equals whole-image inference (the seam check)."""
import numpy as np
import pytest
import tifffile

import tilerseg
from conftest import cli, reference, tiny_unet


def test_cli_probabilities_equal_whole_image_inference(tmp_path, rgb_tiff, tiny_model_dir):
    path, img = rgb_tiff
    out = tmp_path / "probs.tif"
    r = cli("run", path, "--model", "unet", "--weights", tiny_model_dir, "--tile", "512", "--halo", "96",
            "--probabilities", "-o", str(out))
    assert r.returncode == 0, r.stderr
    got = tifffile.imread(out)
    ref = reference(tiny_unet(), img, halo=96, stride=8)[0]
    assert got.shape == ref.shape == (1000, 1300)
    assert np.abs(got - ref).max() <= 1e-4
    # the borders are included: first/last rows and columns match too
    for edge in (got[0], got[-1], got[:, 0], got[:, -1]):
        assert np.isfinite(edge).all()


@pytest.mark.parametrize("mode", ["symmetric", "edge", "constant"])
def test_pad_modes_match_numpy_padding(mode):
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (150, 170, 3), dtype=np.uint8)
    model = tiny_unet(seed=3)
    got = tilerseg.segment(img, model, tile=256, halo=72, pad_mode=mode, device="cpu").compute()
    ref = reference(model, img, halo=72, stride=8, mode=mode)
    assert np.abs(got - ref).max() <= 1e-4


def test_multiclass_labels_are_argmax_and_batches_do_not_matter():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (300, 260, 3), dtype=np.uint8)
    model = tiny_unet(seed=5, classes=3)
    ref = reference(model, img, halo=72, stride=8)
    for batch in (1, 3, 4):
        labels = tilerseg.segment(img, model, tile=256, halo=72, batch_size=batch, probabilities=False,
                                  device="cpu").compute()
        assert labels.dtype == np.uint8 and labels.shape == (300, 260)
        agree = (labels == ref.argmax(0)).mean()
        assert agree > 0.9999  # ties within 1e-6 may flip a pixel


def test_segment_is_lazy_and_chunked():
    img = np.zeros((700, 900, 3), np.uint8)
    arr = tilerseg.segment(img, tiny_unet(), tile=256, halo=64, batch_size=4, device="cpu")
    assert arr.shape == (1, 700, 900)
    assert arr.chunks[1][0] == 2 * 128 and arr.chunks[2][0] == 2 * 128  # 2x2 windows of crop 128 per task
    assert arr.npartitions == len(arr.chunks[1]) * len(arr.chunks[2])


def test_nodata_becomes_nodata_not_class_zero():
    rng = np.random.default_rng(6)
    img = rng.integers(0, 256, (200, 200, 3), dtype=np.uint8)
    valid = np.ones((200, 200), bool)
    valid[:50, :80] = False
    model = tiny_unet()
    probs = tilerseg.segment(img, model, tile=128, halo=32, valid=valid, device="cpu").compute()
    labels = tilerseg.segment(img, model, tile=128, halo=32, valid=valid, probabilities=False,
                              device="cpu").compute()
    assert np.isnan(probs[0][~valid]).all() and np.isfinite(probs[0][valid]).all()
    # windows part nodata compute only their valid part (trimmed on the stride grid, the
    # halo kept): whole-image inference there, as a full window's crop gives
    exact = tilerseg.segment(img, model, tile=208, halo=72, valid=valid, device="cpu").compute()  # the full halo
    assert np.abs(exact[0][valid] - reference(model, img, halo=72, stride=8)[0][valid]).max() <= 1e-4
    assert (labels[~valid] == 255).all() and set(np.unique(labels[valid])) <= {0, 1}


def test_two_arrays_of_one_shape_stay_distinct_in_one_graph(tiny_model_dir):
    import dask

    rng = np.random.default_rng(8)
    a, b = (rng.integers(0, 256, (90, 100, 3), dtype=np.uint8) for _ in range(2))
    # a weights path: both calls share the cached predictor, so only the reader tells them apart
    pa, pb = (tilerseg.segment(x, tiny_model_dir, tile=256, halo=72, device="cpu") for x in (a, b))
    ra, rb = dask.compute(pa, pb)
    assert not np.array_equal(ra, rb)
    assert np.abs(rb - reference(tiny_unet(), b, halo=72, stride=8)).max() <= 1e-4
