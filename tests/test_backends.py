"""Other runtimes for the forward pass: same probabilities as torch, same seams."""
import os

import numpy as np
import pytest
import tifffile

import tilerseg
from conftest import cli, reference, tiny_unet
from tilerseg.backends import choose, export_onnx
from tilerseg.infer import Predictor

pytest.importorskip("onnx")
IMNET = dict(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), scale=255.0, device="cpu")


@pytest.fixture(autouse=True)
def user_cache(tmp_path, monkeypatch):
    """Exports of models without a weights file go to the user cache: a temporary one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(autouse=True)
def onnxruntime_installed(request):
    if "openvino" not in request.node.name:
        pytest.importorskip("onnxruntime")


@pytest.mark.parametrize("backend,classes", [("onnxruntime", 1), ("onnxruntime", 3), ("openvino", 2)])
def test_runtime_probabilities_equal_torch(backend, classes):
    pytest.importorskip(backend)
    model = tiny_unet(seed=7, classes=classes)
    x = np.random.default_rng(0).integers(0, 256, (3, 192, 256, 3), dtype=np.uint8)
    ref = Predictor(model, **IMNET)(x)
    run = Predictor(model, **IMNET, backend=backend)
    assert run.backend == backend, run.backend_note
    got = run(x)
    assert got.shape == ref.shape == (3, classes, 192, 256)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
def test_seams_stay_exact_through_onnxruntime():
    """Tiled through ONNX Runtime equals whole-image inference in torch."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (300, 420, 3), dtype=np.uint8)
    model = tiny_unet(seed=4)
    got = tilerseg.segment(img, model, tile=256, halo=72, device="cpu", backend="onnxruntime").compute()
    ref = reference(model, img, halo=72, stride=8)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
def test_cli_backend_writes_the_same_probabilities(tmp_path, rgb_tiff, tiny_model_dir):
    path, img = rgb_tiff
    out = tmp_path / "probs.tif"
    r = cli("run", path, "--weights", tiny_model_dir, "--tile", "512", "--halo", "96", "--probabilities",
            "--backend", "onnxruntime", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "backend: onnxruntime" in r.stderr
    ref = reference(tiny_unet(), img, halo=96, stride=8)[0]
    assert np.abs(tifffile.imread(out) - ref).max() <= 1e-4
    # the export is cached beside the weights, once
    cached = os.listdir(os.path.join(tiny_model_dir, ".tilerseg-cache"))
    assert len([f for f in cached if f.endswith(".onnx")]) == 1


def test_export_is_cached_by_content():
    model = tiny_unet(seed=1)
    kw = dict(in_channels=3, dims=2, stride=8, weights=None)
    first = export_onnx(model, **kw)
    stamp = os.stat(first).st_mtime_ns
    assert export_onnx(model, **kw) == first and os.stat(first).st_mtime_ns == stamp  # reused, not rewritten
    other = export_onnx(tiny_unet(seed=2), **kw)  # other weights: another export
    assert other != first and os.path.exists(other)
    assert os.path.dirname(first).endswith(os.path.join("tilerseg", "exports"))  # no weights file: user cache


class Cummax(__import__("torch").nn.Module):
    """A local model with an operator ONNX opset 17 lacks (cummax)."""

    def __init__(self):
        import torch

        super().__init__()
        self.conv = torch.nn.Conv2d(3, 1, 3, padding=1)

    def forward(self, x):
        import torch

        return torch.cummax(self.conv(x), dim=2)[0]


def test_a_model_that_does_not_export_runs_on_torch_and_says_why():
    model = Cummax().eval()
    p = Predictor(model, **IMNET, backend="onnxruntime")
    assert p.backend == "torch"
    assert "does not export cleanly to onnxruntime" in p.backend_note and "cummax" in p.backend_note
    assert "\n" not in p.backend_note
    x = np.zeros((1, 32, 32, 3), np.uint8)
    assert p(x).shape == (1, 1, 32, 32)


@pytest.mark.slow
def test_auto_picks_a_runtime_after_a_probe_and_torch_elsewhere():
    model = tiny_unet(seed=5)
    p = Predictor(model, **IMNET, backend="auto")
    assert p.backend in ("torch", "onnxruntime", "openvino")
    assert "probe" in p.backend_note and "onnxruntime" in p.backend_note
    runner, note = choose("auto", model, model, device="cpu", in_channels=3, dims=2, stride=8, weights=None,
                          precision="bf16")
    assert runner.name == "torch" and "bf16" in note


def test_auto_leaves_torch_only_for_a_runtime_clearly_faster():
    from tilerseg.backends import MARGIN, pick

    assert pick({"torch": 1.0, "onnxruntime": 1.0 - MARGIN / 2, "openvino": 1.1}) == "torch"  # within the noise
    assert pick({"torch": 1.0, "onnxruntime": 0.97, "openvino": 0.80}) == "openvino"
    assert pick({"torch": 0.9, "onnxruntime": 1.0}) == "torch"


def test_unknown_backend_and_fp16_with_a_runtime_are_one_line(tmp_path, rgb_tiff, tiny_model_dir):
    path, _ = rgb_tiff
    r = cli("run", path, "--weights", tiny_model_dir, "--backend", "onnx", "-o", str(tmp_path / "a.tif"))
    assert r.returncode != 0 and "onnxruntime" in r.stderr
    r = cli("run", path, "--weights", tiny_model_dir, "--backend", "onnxruntime", "--precision", "fp16",
            "-o", str(tmp_path / "b.tif"))
    assert r.returncode == 1 and "--backend onnxruntime runs fp32 exports" in r.stderr
    assert not (tmp_path / "b.tif").exists()


def test_auto_probes_the_runs_own_window_and_batch_and_counts_the_export():
    """The probe runs what the run will run (its window, its batch), weighs the
    whole run plus an export not cached yet, and says its figures."""
    from tilerseg.backends import PROBE_CALLS, decide, exported

    model = tiny_unet(seed=3).eval()
    kw = dict(device="cpu", in_channels=3, dims=2, stride=8, weights=None, window=(96, 96), batch=2)
    assert not exported(model, in_channels=3, dims=2, weights=None)
    name, note = decide(model, batches=10_000, **kw)
    assert "a batch of 2 x 96x96 px" in note and "torch " in note and "onnxruntime " in note
    assert "+ export" in note  # the first probe exported: its time counts against the runtime
    assert exported(model, in_channels=3, dims=2, weights=None)
    assert name in ("torch", "onnxruntime", "openvino") and note.startswith(name)
    _, again = decide(model, batches=10_000, **kw)
    assert "+ export" not in again  # cached now: no export to pay
    # a run too short to repay the probe is not probed: auto costs what the default costs
    name, note = decide(model, batches=PROBE_CALLS * 2, **kw)
    assert name == "torch" and "too few to repay a probe" in note
    assert decide(model, batches=10_000, **dict(kw, precision="bf16"))[0] == "torch"


def test_run_with_auto_decides_after_the_tiling_and_says_so(tmp_path, rgb_tiff, tiny_model_dir, capsys):
    import glob

    path, _ = rgb_tiff
    from tilerseg import cli as tcli

    exports = set(glob.glob(os.path.join(tiny_model_dir, "**", "*.onnx"), recursive=True))
    assert tcli.main(["run", path, "--weights", tiny_model_dir, "--backend", "auto", "--halo", "24",
                      "-o", str(tmp_path / "a.zarr")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("backend: "))
    assert "torch (auto:" in line and "too few to repay a probe" in line  # one window: no probe
    assert not any((tmp_path / "cache").rglob("*.onnx"))  # and nothing was exported for it
    assert set(glob.glob(os.path.join(tiny_model_dir, "**", "*.onnx"), recursive=True)) == exports
