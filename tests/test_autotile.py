"""--tile auto: the largest stride-aligned window whose batch fits the memory budget."""
import math

import numpy as np
import pytest

import tilerseg
from conftest import cli, reference, tiny_unet
from tilerseg.config import RunConfig, TilingOptions
from tilerseg.errors import InputError
from tilerseg.models import ModelInfo, ModelSpec
from tilerseg.tiling import MAX_AUTO_TILE, activation_bytes, auto_tile, resolve

GiB = 2 ** 30


def work(tile, halo, shape):
    crop = tile - 2 * halo
    return math.prod(math.ceil(n / crop) for n in shape) * tile ** 2


def test_the_batch_fits_the_budget_and_larger_budgets_give_larger_windows():
    shape, halo, stride, per_px = (20000, 20000), 96, 8, 600.0
    last = 0
    for budget in (GiB // 4, GiB, 4 * GiB):
        (tile, _), batch, note = auto_tile(halo, stride, shape, per_px, budget, None)
        assert tile % stride == 0 and (tile - 2 * halo) % stride == 0 and tile - 2 * halo > 0
        assert batch * tile * tile * per_px <= budget and 1 <= batch <= 4
        assert tile >= last and "auto:" in note
        last = tile
    assert last <= MAX_AUTO_TILE
    # the same budget held by a given batch of 4: each window gets a quarter of it
    (t4, _), b4, _ = auto_tile(halo, stride, shape, per_px, GiB, 4)
    (t1, _), _, _ = auto_tile(halo, stride, shape, per_px, GiB // 4, 1)
    assert b4 == 4 and t4 == t1


def test_fewer_pixels_are_computed_than_with_512_windows():
    shape, halo = (4096, 4096), 96
    (tile, _), _, _ = auto_tile(halo, 8, shape, 600.0, 4 * GiB, None)
    assert work(tile, halo, shape) < 0.75 * work(512, halo, shape)


def test_tiny_images_keep_a_window_of_image_plus_halo():
    (tile, _), batch, _ = auto_tile(72, 8, (100, 60), 600.0, 4 * GiB, None)
    assert tile == 2 * 72 + 104 and batch == 1  # 100 rounded up to the stride, plus the halo


def test_resolve_defaults_to_auto_and_stays_seam_exact():
    model = tiny_unet(seed=2)
    info = ModelInfo(spec=ModelSpec(in_channels=3))
    t = resolve(TilingOptions(halo=72, memory_budget=64 * 2 ** 20), model=model, info=info, stride=8, dims=2,
                bands=3, shape=(600, 700))
    assert "auto" in t.why and "64 MiB" in t.why
    assert t.batch_size * t.tile[0] ** 2 * activation_bytes(model, 3, 8) <= 64 * 2 ** 20
    rng = np.random.default_rng(5)
    img = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    got = tilerseg.segment(img, model, halo=72, device="cpu").compute()  # no tile: auto
    assert np.abs(got - reference(model, img, halo=72, stride=8)).max() <= 1e-4


def test_activation_bytes_grow_with_the_network():
    import segmentation_models_pytorch as smp

    small = activation_bytes(tiny_unet(), 3, 8)
    big = activation_bytes(smp.Unet("resnet18", encoder_weights=None).eval(), 3, 32)
    assert 50 < small < big < 4000  # bytes per input pixel


def test_memory_budget_option(tmp_path, rgb_tiff, tiny_model_dir):
    assert RunConfig.from_options(memory_budget="1.5G").tiling.memory_budget == int(1.5 * GiB)
    assert RunConfig.from_options(memory_budget="512MiB").tiling.memory_budget == 512 * 2 ** 20
    with pytest.raises(InputError, match="give a size such as 2G"):
        RunConfig.from_options(memory_budget="lots")
    with pytest.raises(InputError, match="give a side in px"):
        RunConfig.from_options(tile="big")
    path, _ = rgb_tiff
    r = cli("run", path, "--weights", tiny_model_dir, "--halo", "72", "--memory-budget", "256M", "-o",
            str(tmp_path / "m.tif"))
    assert r.returncode == 0, r.stderr
    assert "tiling: tile" in r.stderr and "(auto:" in r.stderr and "budget --memory-budget 256 MiB" in r.stderr


def test_a_budget_that_holds_no_worthwhile_window_is_refused_with_one_that_does(tmp_path, rgb_tiff,
                                                                                  tiny_model_dir):
    """Issue 25: --memory-budget 1MB picked 4,096 windows of 200 px (an 8-px core for a
    96-px halo) and ran for minutes. It is refused, naming a budget that works."""
    import re

    from tilerseg.config import parse_size
    from tilerseg.errors import TileError

    shape, halo, stride, per_px = (512, 512), 96, 8, 600.0
    with pytest.raises(TileError) as err:
        auto_tile(halo, stride, shape, per_px, 2 ** 20, None)
    text = str(err.value)
    assert "\n" not in text and "holds no window worth running" in text
    budget = parse_size(re.search(r"give --memory-budget (\S+)", text).group(1))
    (tile, _), batch, _ = auto_tile(halo, stride, shape, per_px, budget, None)  # the suggestion works
    assert tile - 2 * halo >= halo and batch * tile ** 2 * per_px <= budget
    # a budget whose best window costs WORST_WORK x the best window's is refused too
    from tilerseg.tiling import WORST_WORK, work

    def cost(c):
        return work(math.prod(math.ceil(n / c) for n in (8192, 8192)), c + 2 * halo)

    best = min(range(8, 4000, 8), key=cost)
    small = next(c for c in range(halo // 8 * 8, best, 8) if cost(c) <= WORST_WORK * cost(best)) - 8
    with pytest.raises(TileError, match="computes"):
        auto_tile(halo, stride, (8192, 8192), per_px, int((small + 2 * halo) ** 2 * per_px) + 1, None)
    # through the command line: one line, no output left
    r = cli("run", rgb_tiff[0], "--weights", tiny_model_dir, "--halo", "96", "--memory-budget", "1MB",
            "-o", str(tmp_path / "m.zarr"))
    assert r.returncode == 1 and "holds no window worth running" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "m.zarr").exists()


def test_a_cheap_model_gets_windows_that_stream_and_an_expensive_one_keeps_its_choice():
    """Issue 34: a 1x1 convolution (12 bytes of activations per pixel) got four 4096-px
    windows over 8192^2 px, so nothing overlapped its reads and writes (peak RSS 7.4 GiB).
    Counting the pipeline's own bytes (the first read and the last write are not hidden
    by the model) gives it small windows; a U-Net's choice does not move."""
    from tilerseg.tiling import IN_FLIGHT, pipeline_bytes

    io = pipeline_bytes(3, 1)
    (blind, _), _, _ = auto_tile(0, 32, (8192, 8192), 12.0, 4 * GiB, None)
    (tile, _), batch, _ = auto_tile(0, 32, (8192, 8192), 12.0, 4 * GiB, None, io_bytes=io)
    assert blind == 4096 and tile <= 1024
    assert batch * tile ** 2 * (12.0 + IN_FLIGHT * io) <= 4 * GiB
    for shape in ((20000, 20000), (4096, 4096)):
        assert auto_tile(96, 8, shape, 600.0, 4 * GiB, None, io_bytes=io)[:2] == \
            auto_tile(96, 8, shape, 600.0, 4 * GiB, None)[:2]
