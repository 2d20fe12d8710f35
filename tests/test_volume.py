"""Volumes: TIFF stack / OME-TIFF with Z / zarr readers, 3-D overlap-tile
windows with mirror padding on every axis, zarr and TIFF-stack outputs.

The oracle for exactness is whole-volume inference on the mirror-padded
volume, as for 2-D."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch
import zarr

import os
import signal
import time

from conftest import cli, cli_process

from tilerseg.io.volume import VolumeReader, read_padded3


def _volume(shape=(20, 60, 70), seed=0):
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*[np.arange(n) for n in shape], indexing="ij")
    base = 100 + 60 * np.sin(z / 5.0) * np.cos(y / 9.0) + 40 * np.sin(x / 7.0)
    return np.clip(base + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)


def _unet3d(seed=0, features=4, classes=1):
    from tilerseg.models.unet import unet3d

    torch.manual_seed(seed)
    m = unet3d(classes=classes, in_channels=1, features=features, depth=3)
    # BatchNorm statistics from one batch of noise, so that activations keep
    # unit scale through the layers and the output depends on its context
    # (random BN buffers would leave an almost constant output)
    for mod in m.modules():
        if isinstance(mod, torch.nn.BatchNorm3d):
            mod.momentum = 1.0
    with torch.no_grad():
        m.train()(torch.randn(2, 1, 32, 64, 64, generator=torch.Generator().manual_seed(seed)))
    return m.eval()


@pytest.mark.parametrize("kind", ["stack", "ome", "ome-channels", "zarr", "zarr-cfirst"])
def test_volume_readers_read_windows_and_pad_like_numpy(tmp_path, kind):
    vol = _volume()
    if kind == "stack":
        path = tmp_path / "v.tif"
        tifffile.imwrite(path, vol)  # a plain multi-page TIFF
        want = vol[..., None]
    elif kind == "ome":
        path = tmp_path / "v.ome.tif"
        tifffile.imwrite(path, vol, ome=True, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeX": 0.5,
                                                        "PhysicalSizeY": 0.5})
        want = vol[..., None]
    elif kind == "ome-channels":
        path = tmp_path / "v.ome.tif"
        two = np.stack([vol, 255 - vol], axis=1)  # Z C Y X
        tifffile.imwrite(path, two, ome=True, metadata={"axes": "ZCYX"})
        want = np.moveaxis(two, 1, -1)
    elif kind == "zarr":
        path = tmp_path / "v.zarr"
        zarr.create_array(str(path), data=vol, chunks=(8, 32, 32))
        want = vol[..., None]
    else:
        path = tmp_path / "v.zarr"
        two = np.stack([vol, 255 - vol])  # C Z Y X
        zarr.create_array(str(path), data=two, chunks=(1, 8, 32, 32))
        want = np.moveaxis(two, 0, -1)
    r = VolumeReader(str(path))
    assert r.meta.shape == vol.shape and r.meta.bands == want.shape[-1]
    np.testing.assert_array_equal(r.read((2, 9), (3, 41), (10, 22)), want[2:9, 3:41, 10:22])
    pad = np.pad(want, ((8, 8), (8, 8), (8, 8), (0, 0)), mode="reflect")
    np.testing.assert_array_equal(read_padded3(r, ((-8, 28), (-8, 68), (-8, 78)), "reflect"), pad)
    if kind == "ome":
        assert r.meta.spacing == (2.0, 0.5, 0.5)
    r.close()


def _reference(model, vol: np.ndarray, halo: int, stride: int) -> np.ndarray:
    """Whole-volume inference on the mirror-padded volume, cropped."""
    pads = [(halo, halo + (-(n + 2 * halo)) % stride) for n in vol.shape]
    x = torch.from_numpy(np.pad(vol, pads, mode="reflect")).float()[None, None]
    x = (x / 255 - 0.449) / 0.226
    with torch.inference_mode():
        p = torch.sigmoid(model(x))[0, 0].numpy()
    Z, H, W = vol.shape
    return p[halo:halo + Z, halo:halo + H, halo:halo + W]


@pytest.mark.slow
def test_unet3d_tiles_are_seam_exact_at_the_measured_halo(tmp_path):
    """Small unet3d with random seeded weights in eval mode, a halo at
    least the receptive-field radius (from the module graph, cross-checked
    against the gradient probe): the tiled output equals whole-volume
    inference within 1e-4, with windows cutting every axis and the last
    ones overhanging the volume."""
    from tilerseg import run as run_volume
    from tilerseg.models import ModelInfo, ModelSpec, save_checkpoint
    from tilerseg.receptive import analytic_radius, recommend_halo

    model = _unet3d()
    radius = analytic_radius(model, in_channels=1, stride=8, dims=3)  # equals the probe: tests/test_halo.py
    h = recommend_halo(radius, 8)
    assert radius >= 40 and h >= radius and h % 8 == 0
    vol = _volume((24, 80, 90), seed=2)
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, vol, tile=(64, 64))
    ckpt = tmp_path / "u3.pt"
    spec = ModelSpec(arch="unet3d", encoder="-", classes=1, in_channels=1,
                     kwargs=ModelSpec.freeze({"features": 4, "depth": 3}))
    save_checkpoint(str(ckpt), model, ModelInfo(spec=spec))
    out = tmp_path / "probs.zarr"
    report = run_volume(str(src), str(out), weights=str(ckpt), tile=(2 * h + 16, 2 * h + 48, 2 * h + 48),
                        probabilities=True, workers=2)  # the halo: the receptive field, chosen by the run
    assert report.windows == 2 * 2 * 2 and report.halo == (h, h, h)
    tiled = zarr.open_group(str(out), mode="r")["0"][0]
    ref = _reference(model, vol, h, 8)
    assert ref.std() > 0.02  # the output varies, so a seam would show
    err = np.abs(tiled - ref).max()
    assert err < 1e-4, err
    # a halo below the radius is not exact: the oracle can tell
    low = tmp_path / "low.zarr"
    run_volume(str(src), str(low), weights=str(ckpt), tile=(2 * 8 + 16, 2 * 8 + 48, 2 * 8 + 48), halo=8,
               probabilities=True, workers=2)
    assert np.abs(zarr.open_group(str(low), mode="r")["0"][0] - ref).max() > 1e-2


def test_volume_cli_writes_zarr_and_tiff_stack(tmp_path):
    from tilerseg.models import ModelInfo, ModelSpec, save_checkpoint

    vol = _volume()
    src = tmp_path / "vol.ome.tif"
    tifffile.imwrite(src, vol, ome=True, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0, "PhysicalSizeX": 0.5,
                                                   "PhysicalSizeY": 0.5})
    model = _unet3d(features=2, classes=3)
    spec = ModelSpec(arch="unet3d", encoder="-", classes=3, in_channels=1,
                     kwargs=ModelSpec.freeze({"features": 2, "depth": 3}))
    ckpt = tmp_path / "u3.pt"
    save_checkpoint(str(ckpt), model, ModelInfo(spec=spec, class_names=("a", "b", "c"), halo=8, tile=40))
    r = cli("run", str(src), "--weights", str(ckpt), "-o", str(tmp_path / "p.zarr"), "--probabilities", "--quiet")
    assert r.returncode == 0, r.stderr
    g = zarr.open_group(str(tmp_path / "p.zarr"), mode="r")
    probs = g["0"][:]
    assert probs.shape == (3,) + vol.shape
    np.testing.assert_allclose(probs.sum(0), 1, atol=1e-5)
    scale = g.attrs["ome"]["multiscales"][0]["datasets"][0]["coordinateTransformations"][0]["scale"]
    assert scale == [1.0, 2.0, 0.5, 0.5]
    r = cli("run", str(src), "--weights", str(ckpt), "-o", str(tmp_path / "l.tif"), "--quiet")
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(tmp_path / "l.tif") as t:
        labels = t.series[0].asarray()
        assert len(t.pages) == vol.shape[0] and t.pages[0].is_tiled
    np.testing.assert_array_equal(labels, probs.argmax(0))
    # a 2-D model on a stack, a 3-D one on a 2-D image: one line each
    r = cli("run", str(tmp_path / "vol.ome.tif"), "--weights", str(ckpt), "-o", str(tmp_path / "x.png"))
    assert r.returncode == 1 and "volume is written as .zarr" in r.stderr
    img = tmp_path / "img.tif"
    tifffile.imwrite(img, vol[0])
    r = cli("run", str(img), "--weights", str(ckpt), "-o", str(tmp_path / "y.zarr"))
    assert r.returncode == 1 and "stack axis" in r.stderr and "Traceback" not in r.stderr


def test_unet3d_has_the_papers_parameter_count():
    from tilerseg.models.unet import unet2d, unet3d

    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(unet3d(classes=3, in_channels=3)) == 19_073_187  # the paper: 19,069,955 (about 19.07 M)
    assert n(unet2d(classes=2, in_channels=1, norm=False)) == 31_030_658  # the U-Net paper's 31.03 M


def _sparse_volumes(root, n=3, shape=(16, 48, 48), seed=0):
    """Bright balls in noisy volumes; labels only on every 4th slice (the rest
    255 = not annotated), as in the 3D U-Net paper's sparse annotation."""
    import os

    rng = np.random.default_rng(seed)
    os.makedirs(f"{root}/vol", exist_ok=True)
    os.makedirs(f"{root}/lab", exist_ok=True)
    z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    annotated = 0
    for i in range(n):
        m = np.zeros(shape, bool)
        for _ in range(5):
            c = rng.integers(0, shape, 3)
            m |= ((z - c[0]) * 2) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2 < int(rng.integers(6, 11)) ** 2
        img = np.clip(70 + 110 * m + rng.normal(0, 20, shape), 0, 255).astype(np.uint8)
        lab = np.full(shape, 255, np.uint8)
        lab[::4] = m[::4]
        annotated = int((lab != 255).sum())
        tifffile.imwrite(f"{root}/vol/v{i}.tif", img)
        tifffile.imwrite(f"{root}/lab/v{i}.tif", lab)
    return annotated


@pytest.mark.slow
def test_unet3d_trains_on_sparse_annotation_and_runs(tmp_path):
    from tilerseg.train import evaluate

    per_volume = _sparse_volumes(tmp_path)
    cfg = tmp_path / "vol.yaml"
    cfg.write_text(f"""
images: {tmp_path}/vol
masks: {tmp_path}/lab
class_names: [background, ball]
mask_values: [0, 1]
ignore_value: 255
val_fraction: 0.34
crop: [16, 32, 32]
samples_per_epoch: 8
model: unet3d
model_args: {{features: 4, depth: 2}}
loss: ce_dice
augment: medium
lr: 0.01
epochs: 2
batch_size: 2
tile: 32
halo: 8
""")
    out = tmp_path / "run"
    r = cli("train", str(cfg), "-o", str(out), "--quiet")
    assert r.returncode == 0, r.stderr
    ev, _ = evaluate(str(out / "best.pt"), f"{tmp_path}/vol/v0.tif", f"{tmp_path}/lab/v0.tif")
    # only annotated voxels are scored
    assert ev.report()["overall"]["pixels"] == per_volume
    r = cli("run", f"{tmp_path}/vol/v0.tif", "--weights", str(out / "best.pt"), "-o", str(tmp_path / "m.tif"),
            "--quiet")
    assert r.returncode == 0, r.stderr
    with tifffile.TiffFile(tmp_path / "m.tif") as t:
        assert t.series[0].shape == (16, 48, 48)


@pytest.mark.parametrize("preset", ["light", "medium", "heavy"])
def test_volume_crops_augment_every_slice_alike(tmp_path, preset):
    from tilerseg.train.augment import build_augment
    from tilerseg.train.data import CropDataset, LabelMap, Pair, VolumeSource

    _sparse_volumes(tmp_path, n=1)
    lab = tifffile.imread(f"{tmp_path}/lab/v0.tif")
    full = np.where(lab == 255, 0, lab)
    tifffile.imwrite(tmp_path / "full.tif", np.repeat(full[::4], 4, axis=0))  # every slice annotated
    src = VolumeSource(Pair(f"{tmp_path}/vol/v0.tif", str(tmp_path / "full.tif")), LabelMap(2, [0, 1]))
    ds = CropDataset([src], crop=[8, 32, 32], length=6, seed=1, scale=255, mean=(0.5,), std=(0.2,),
                     augment=build_augment(preset, 32))
    for i in range(6):
        x, y = ds[i]
        assert tuple(x.shape) == (1, 8, 32, 32) and tuple(y.shape) == (8, 32, 32)
        img, lab_ = x[0].numpy(), y.numpy()
        if (lab_ == 1).sum() > 50 and (lab_ == 0).sum() > 50:
            assert np.median(img[lab_ == 1]) > np.median(img[lab_ == 0])
    src.close()


def _checkpoint(tmp_path, features=2, depth=2, classes=1, **extra):
    from tilerseg.models import ModelInfo, ModelSpec, save_checkpoint

    torch.manual_seed(0)
    from tilerseg.models.unet import unet3d

    model = unet3d(classes=classes, in_channels=1, features=features, depth=depth).eval()
    spec = ModelSpec(arch="unet3d", encoder="-", classes=classes, in_channels=1,
                     kwargs=ModelSpec.freeze({"features": features, "depth": depth}))
    ckpt = tmp_path / "u3.pt"
    save_checkpoint(str(ckpt), model, ModelInfo(spec=spec, **extra))
    return str(ckpt)


@pytest.mark.slow
def test_a_killed_volume_run_resumes_to_identical_bytes(tmp_path):
    """Volumes go through the same engine and writer as images: marks,
    --resume, the OME UUID from the fingerprint."""
    vol = _volume((16, 64, 64), seed=4)
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, vol)
    ckpt = _checkpoint(tmp_path)
    args = [str(src), "--weights", ckpt, "--tile", "24,24,24", "--halo", "8", "--quiet"]  # 2x8x8 windows
    ref = tmp_path / "ref.ome.tif"
    r = cli("run", *args, "-o", str(ref))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "out.ome.tif"
    marks = tmp_path / ".out.ome.tif.tilerseg" / "done"
    proc = cli_process("run", *args, "-o", str(out))
    t0 = time.time()
    while (not marks.is_dir() or len(os.listdir(marks)) < 20) and time.time() - t0 < 300:
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(os.listdir(marks))
    assert not out.exists() and 0 < done < 2 * 8 * 8
    r = cli("run", *args, "-o", str(out), "--resume")
    assert r.returncode == 0, r.stderr
    assert f"computed {2 * 8 * 8 - done}" in r.stdout
    assert out.read_bytes() == ref.read_bytes()


def test_volume_outputs_use_nodata_255_and_refuse_what_they_cannot_honour(tmp_path):
    vol = _volume((10, 40, 40))
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, vol)
    ckpt = _checkpoint(tmp_path)
    r = cli("run", str(src), "--weights", ckpt, "-o", str(tmp_path / "l.zarr"), "--quiet")
    assert r.returncode == 0, r.stderr
    z = zarr.open_group(str(tmp_path / "l.zarr"), mode="r")["0"]
    assert z.fill_value == 255 and z.metadata.dimension_names == ("z", "y", "x")
    assert "halo 24 px (receptive field 22 px, computed from the module graph)" in r.stderr
    for flags, why in ((["--batch-size", "4"], "one window per forward pass"),
                       (["--merge", "gaussian"], "merged by crop"),
                       (["--tta", "flips"], "2-D models only"),
                       (["--preview", str(tmp_path / "p.png")], "--preview draws 2-D images")):
        r = cli("run", str(src), "--weights", ckpt, "-o", str(tmp_path / "x.zarr"), *flags)
        assert r.returncode == 1 and why in r.stderr and r.stderr.count("\n") == 1, (flags, r.stderr)
    r = cli("run", str(src), "--weights", ckpt, "-o", str(tmp_path / "l.zarr"))
    assert r.returncode == 1 and "already exists" in r.stderr


def test_default_unet3d_tiling_covers_a_small_volume_in_few_windows(tmp_path):
    """Where a 20-minute run's time went: a gradient probe on 128^3-256^3
    cubes of the full-size unet3d, then 2*halo + 32 windows (a 32^3 crop of
    every 128^3 window: 98 windows on 40x200x210). Now the receptive field
    comes from the module graph at once and windows grow to the volume."""
    from tilerseg.config import TilingOptions
    from tilerseg.models import ModelInfo, ModelSpec, build
    from tilerseg.tiling import resolve

    model = build(ModelSpec("unet3d", "-", in_channels=1))
    t0 = time.perf_counter()
    t = resolve(TilingOptions(), model=model, info=ModelInfo(spec=ModelSpec("unet3d")), stride=8, dims=3, bands=1,
                shape=(40, 200, 210))
    assert time.perf_counter() - t0 < 2
    grid = t.grid((40, 200, 210))
    assert t.halo == (48, 48, 48)  # radius 46 on the stride-8 grid
    assert grid.total_windows <= 9 and np.prod(t.tile) <= 160 ** 3


def test_a_plain_unet3d_state_dict_takes_its_bands_and_classes_from_the_file(tmp_path):
    """A bare state dict of a 1-band, 2-class unet3d runs on a 1-band volume
    with the flags of its architecture only (the file's first and last
    layers tell bands and classes), equal to whole-volume inference; a
    --model-arg in_channels that disagrees is one line saying what the file
    holds."""
    from tilerseg.models.unet import unet3d

    vol = _volume((8, 24, 28), seed=3)
    src = tmp_path / "vol.tif"
    tifffile.imwrite(src, vol)
    torch.manual_seed(0)
    model = unet3d(classes=2, in_channels=1, features=2, depth=1).eval()
    torch.save(model.state_dict(), weights := tmp_path / "u3.pt")
    flags = ["--model", "unet3d", "--model-arg", "features=2", "--model-arg", "depth=1", "--weights", weights]
    r = cli("run", src, *flags, "--model-arg", "in_channels=1", "-o", out := tmp_path / "v.zarr",
            "--probabilities", "--quiet")
    assert r.returncode == 0, r.stderr
    got = zarr.open_group(str(out), mode="r")["0"][:]
    pads = [(16, 16 + (-(n + 32)) % 2) for n in vol.shape]
    x = (torch.from_numpy(np.pad(vol, pads, mode="reflect")).float()[None, None] / 255 - 0.449) / 0.226
    with torch.inference_mode():
        ref = torch.softmax(model(x), 1)[0, :, 16:24, 16:40, 16:44].numpy()
    assert got.shape == ref.shape and np.abs(got - ref).max() < 1e-4
    r = cli("run", src, *flags, "--model-arg", "in_channels=3", "-o", tmp_path / "w.zarr")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "--model-arg in_channels=3 disagrees with the weights, which hold a model of 1 input band(s) and " \
           "2 class(es) (first layer down.0.0.weight (2, 1, 3, 3, 3), last layer head.weight (2, 4, 1, 1, 1))" \
           in r.stderr, r.stderr
