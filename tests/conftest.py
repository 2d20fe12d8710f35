"""Shared fixtures: real data by path, tiny seeded models, small images."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for the hub in tests

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("TILERSEG_TEST_DATA", ROOT.parent / "shared" / "data"))


def data(rel: str) -> str:
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"shared test data missing: {path}")
    return str(path)


def tiny_unet(seed: int = 0, classes: int = 1, in_channels: int = 3):
    """The seam-test model: smp Unet-resnet18, depth 3, stride 8,
    receptive-field radius 65 px (so seam-exact tests use halo >= 72)."""
    import segmentation_models_pytorch as smp
    import torch

    torch.manual_seed(seed)
    return smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4),
                    classes=classes, in_channels=in_channels).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "unet-r18-d3"
    tiny_unet().save_pretrained(str(path))
    return str(path)


def textured_tiff(path, shape: tuple[int, int], *, seed: int, periods: tuple[float, float], noise: float) -> np.ndarray:
    """Write an RGB tiled TIFF of ``shape``: a sin x cos pattern of the
    given ``periods`` plus seeded gaussian ``noise``; return its pixels."""
    import tifffile

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    base = (np.sin(yy / periods[0]) * np.cos(xx / periods[1]) * 90 + 128)[..., None]
    img = np.clip(base + rng.normal(0, noise, (*shape, 3)), 0, 255).astype(np.uint8)
    tifffile.imwrite(path, img, tile=(256, 256), photometric="rgb", compression="zlib")
    return img


@pytest.fixture(scope="session")
def rgb_tiff(tmp_path_factory) -> tuple[str, np.ndarray]:
    """A 1000x1300 RGB tiled TIFF with structure at several scales."""
    path = tmp_path_factory.mktemp("images") / "img.tif"
    img = textured_tiff(path, (1000, 1300), seed=1, periods=(37.0, 53.0), noise=30)
    return str(path), img


def reference(model, img: np.ndarray, halo: int, stride: int, mode: str = "reflect") -> np.ndarray:
    """Whole-image inference, the oracle: pad by the halo with numpy (and the
    bottom/right up to a multiple of the stride), run once, crop."""
    import torch

    H, W = img.shape[:2]
    pb, pr = (-(H + 2 * halo)) % stride, (-(W + 2 * halo)) % stride
    pad = np.pad(img, ((halo, halo + pb), (halo, halo + pr), (0, 0)), mode=mode)
    x = torch.from_numpy(pad).permute(2, 0, 1)[None].float() / 255
    C = img.shape[2]
    mean = torch.tensor((0.485, 0.456, 0.406) if C == 3 else (0.449,) * C).view(1, -1, 1, 1)
    std = torch.tensor((0.229, 0.224, 0.225) if C == 3 else (0.226,) * C).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model((x - mean) / std)
    probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)
    return probs[0, :, halo:halo + H, halo:halo + W].numpy()


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    """Run the command line in this process (``cli.main``), as a user would
    type it, capturing what it prints: no fresh interpreter re-importing
    torch per call. Tests that need a real process (signals, kills) start
    one with :func:`cli_process`."""
    import contextlib
    import io

    from tilerseg import cli as tcli

    out, err = io.StringIO(), io.StringIO()
    here = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = tcli.main([str(a) for a in args])
            except SystemExit as exc:  # argparse errors and --help
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    finally:
        os.chdir(here)
    return subprocess.CompletedProcess(["tilerseg", *args], code, out.getvalue(), err.getvalue())


def cli_process(*args: str, cwd=None, **kw) -> subprocess.Popen:
    """Start ``tilerseg ARGS`` as a real process (for signals and kills)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.Popen([sys.executable, "-m", "tilerseg.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=env, **kw)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real one-node SLURM for this session (tests/slurm.py), stopped after.
    Skips with the reason where it cannot start; with TILERSEG_REQUIRE_SLURM=1
    (CI) that is a failure instead."""
    import slurm as slurm_mod

    try:
        cluster = slurm_mod.start(str(tmp_path_factory.mktemp("slurm")))
    except slurm_mod.Unavailable as err:
        if os.environ.get("TILERSEG_REQUIRE_SLURM") == "1":
            pytest.fail(f"no SLURM, and TILERSEG_REQUIRE_SLURM=1: {err}", pytrace=False)
        pytest.skip(f"no SLURM here: {err}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.conf  # sbatch/squeue/scancel, also those dask-jobqueue calls
    try:
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old


LOST_GROUP = ("--dist loadgroup: this test lost its xdist_group, so the group is split across workers and each "
              "starts its own SLURM or browser; pytest {} with this pytest-xdist ignores the mark (pytest-xdist "
              "issue 1386): install pytest<9.2, as pyproject.toml pins")


def pytest_runtest_setup(item):
    """On an xdist worker under ``--dist loadgroup``: a test marked
    ``xdist_group`` must carry its group in its node id (xdist's own
    collection hook adds it), or the groups are split across workers and
    each starts its own SLURM / browser, the second waiting minutes for the
    first's lock. pytest 9.2 with xdist 3.8 drops the suffix (pytest-xdist
    issue 1386), hence the pin in pyproject.toml; such tests fail saying so."""
    if getattr(item.config.option, "loadgroup", False) and item.get_closest_marker("xdist_group") \
            and "@" not in item.nodeid:
        pytest.fail(LOST_GROUP.format(pytest.__version__), pytrace=False)


def pytest_sessionfinish(session, exitstatus):
    """Say how many SLURM tests ran; with TILERSEG_REQUIRE_SLURM=1 (CI), a
    run in which none passed, or one was skipped, fails."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller counts
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    count = {k: sum("test_slurm.py" in getattr(r, "nodeid", "") and getattr(r, "when", "call") in ("call", "setup")
                    and (k != "passed" or r.when == "call") for r in reporter.stats.get(k, []))
             for k in ("passed", "skipped", "failed", "error")}
    required = os.environ.get("TILERSEG_REQUIRE_SLURM") == "1"
    if any(count.values()) or required:
        reporter.write("\n")
        reporter.write_line("SLURM tests (real one-node SLURM): " + ", ".join(f"{v} {k}" for k, v in count.items()))
    if required and (count["skipped"] or not count["passed"]):
        reporter.write_line("TILERSEG_REQUIRE_SLURM=1: the SLURM tests must run here, not skip", red=True)
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """One line at the end of every session that skipped tests: how many,
    and why, grouped (the reasons show only with ``-rs`` otherwise, and a
    fresh clone without the shared data skips many)."""
    import collections

    skipped = terminalreporter.stats.get("skipped", [])
    if not skipped:
        return
    why = collections.Counter()
    for rep in skipped:
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        why["shared test data missing (docs/setup.md says where it comes from)"
            if reason.startswith("shared test data missing") else reason.split(":")[0][:80]] += 1
    terminalreporter.write_line(f"{len(skipped)} skipped: " + "; ".join(f"{n} {r}" for r, n in why.most_common()))
