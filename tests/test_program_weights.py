"""TorchScript and torch.export programs as --weights: detected by content,
run through the same predictor, tiling and writer as every model."""
import json
import warnings

import numpy as np
import pytest
import tifffile

import tilerseg
from conftest import cli, reference, textured_tiff, tiny_unet

STRIDE = 8  # tiny_unet: depth 3, receptive-field radius 65 px, halo 72


def script(net, path, meta=None, trace=True):
    """``net`` saved with torch.jit.save (traced, or scripted), ``meta`` as its tilerseg.json."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.jit.trace(net, torch.zeros(1, 3, 64, 64)) if trace else torch.jit.script(net)
        torch.jit.save(prog, str(path), _extra_files={"tilerseg.json": json.dumps(meta or {})})
    return str(path)


def export(net, path, meta=None, static=None, max_side=4096):
    """``net`` saved with torch.export.save: batch and sides dynamic (sides
    multiples of the stride, at most ``max_side``), or all fixed at ``static``."""
    import torch

    Dim = torch.export.Dim
    x = torch.zeros(1 if static else 2, 3, static or 64, static or 64)
    shapes = None if static else ({0: Dim("n", min=1, max=64), 2: STRIDE * Dim("h", min=2, max=max_side // STRIDE),
                                   3: STRIDE * Dim("w", min=2, max=max_side // STRIDE)},)
    prog = torch.export.export(net, (x,), dynamic_shapes=shapes)
    torch.export.save(prog, str(path), extra_files={"tilerseg.json": json.dumps(meta or {})})
    return str(path)


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.tif"
    return str(path), textured_tiff(path, (200, 300), seed=1, periods=(17.0, 23.0), noise=30)


@pytest.fixture(scope="module")
def net():
    return tiny_unet(seed=3)


@pytest.fixture(scope="module")
def programs(tmp_path_factory, net):
    """The tiny U-Net as a TorchScript file named .pth and as an exported
    program named .bin: the names say nothing, the content decides."""
    d = tmp_path_factory.mktemp("programs")
    meta = {"stride": STRIDE, "class_names": ["cell"]}
    return {"torchscript": script(net, d / "model.pth", meta), "exported": export(net, d / "model.bin", meta)}


@pytest.mark.slow
def test_the_format_is_read_from_the_content(tmp_path, net, programs):
    import torch
    from safetensors.torch import save_file

    from tilerseg.models import detect

    torch.save(net.state_dict(), tmp_path / "state.ts")
    save_file(net.state_dict(), str(tmp_path / "state.pt"))
    net.save_pretrained(str(tmp_path / "folder"))
    assert detect(programs["torchscript"]) == "torchscript" and detect(programs["exported"]) == "exported"
    assert detect(tmp_path / "state.ts") == "torch" and detect(tmp_path / "state.pt") == "safetensors"
    assert detect(tmp_path / "folder") == "smp" and detect("hf://org/name") == "hub"
    (tmp_path / "junk.pt").write_bytes(b"\x00junk" * 20)
    assert detect(tmp_path / "junk.pt") is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_a_program_is_described_and_runs_seam_exact(tmp_path, image, net, programs, kind):
    """Through ``tilerseg run``: the program's probabilities equal the
    eager model's on the whole (mirror-padded) image, the halo is measured
    (input gradients flow through both formats), and the merge is the crop."""
    from tilerseg.models import ModelSpec, describe

    path, img = image
    weights = programs[kind]
    info = describe(weights, ModelSpec())
    assert (info.spec.arch, info.spec.in_channels, info.spec.classes) == (kind, 3, 1)
    assert info.class_names == ("background", "cell") and dict(info.spec.kwargs)["stride"] == STRIDE
    out = tmp_path / "p.tif"
    r = cli("run", path, "--weights", weights, "--tile", "256", "--probabilities", "-o", out)
    assert r.returncode == 0, r.stderr
    assert "halo 72 px (receptive field 65 px" in r.stderr and "crop merge; seam-exact" in r.stderr, r.stderr
    got = tifffile.imread(out)
    ref = reference(net, img, halo=72, stride=STRIDE)[0]  # the model's own forward on the whole image
    assert got.shape == ref.shape == (200, 300)
    assert np.abs(got - ref).max() <= 1e-4


@pytest.mark.slow
def test_a_window_the_program_refuses_is_one_line(tmp_path, image, net):
    path, _ = image
    small = export(net, tmp_path / "small.pt2", {"stride": STRIDE}, max_side=256)
    out = tmp_path / "mask.tif"
    r = cli("run", path, "--weights", small, "--tile", "512", "-o", out)
    assert r.returncode == 1 and r.stderr.count("error") == 1 and "Traceback" not in r.stderr, r.stderr
    assert "small.pt2: the exported program failed on a" in r.stderr and "x3x512x512 window" in r.stderr
    assert not out.exists()


@pytest.mark.slow
def test_a_fixed_size_export_fixes_the_tile(tmp_path, image, net):
    path, img = image
    fixed = export(net, tmp_path / "fixed.pt2", {"stride": STRIDE}, static=256)
    r = cli("run", path, "--weights", fixed, "--probabilities", "-o", tmp_path / "p.tif")
    assert r.returncode == 0, r.stderr
    assert "tile 256 px (fixed by the model's input shape)" in r.stderr
    ref = reference(net, img, halo=72, stride=STRIDE)[0]
    assert np.abs(tifffile.imread(tmp_path / "p.tif") - ref).max() <= 1e-4


class Pooled(__import__("torch").nn.Module):
    """A local net plus its global mean: tiled output cannot be exact."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        y = self.net(x)
        return y + y.mean(dim=(2, 3), keepdim=True)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["torchscript", "exported"])
def test_a_program_with_global_pooling_gets_the_gaussian_merge(tmp_path, image, net, kind):
    from tilerseg.api import NonLocalModelWarning
    from tilerseg.models import ModelSpec, describe, global_context, instantiate

    make = script if kind == "torchscript" else export
    path = make(Pooled(net), tmp_path / "pooled.pt", {"stride": STRIDE})
    assert global_context(instantiate(describe(path, ModelSpec()))) == ["mean"]
    with pytest.warns(NonLocalModelWarning, match="pooled.pt has global context .mean.*gaussian merge"):
        got = tilerseg.segment(image[1][:96, :128], path, device="cpu", merge="auto").compute()
    assert got.shape == (1, 96, 128) and np.isfinite(got).all()


def test_a_scripted_program_and_a_broken_file(tmp_path, image, net):
    """``torch.jit.script`` (control flow kept) runs like a traced one; a
    zip that is no program is one line naming the file."""
    path, img = image
    scripted = script(net, tmp_path / "scripted.ts", {"stride": STRIDE}, trace=False)
    got = tilerseg.segment(img[:96, :128], scripted, tile=256, device="cpu").compute()
    ref = reference(net, img[:96, :128], halo=72, stride=STRIDE)
    assert np.abs(got - ref).max() <= 1e-4
    broken = tmp_path / "broken.pt"
    data = open(scripted, "rb").read()
    broken.write_bytes(data[: len(data) // 2])
    r = cli("run", path, "--weights", broken, "-o", tmp_path / "m.tif")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "broken.pt" in r.stderr, r.stderr
    assert not (tmp_path / "m.tif").exists()


@pytest.mark.slow
def test_the_backend_flag_with_a_program(tmp_path, image, programs):
    """``--backend onnxruntime`` exports the program as it exports any torch
    module, checked against torch, or says why it stays on torch."""
    pytest.importorskip("onnxruntime")
    path, _ = image
    r = cli("run", path, "--weights", programs["torchscript"], "--backend", "onnxruntime", "--tile", "256",
            "--probabilities", "-o", tmp_path / "a.tif")
    assert r.returncode == 0, r.stderr
    assert "backend: onnxruntime (export checked against torch" in r.stderr, r.stderr
