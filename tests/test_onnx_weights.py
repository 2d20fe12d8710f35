"""Your own ONNX model as --weights: the same predictor, tiling and writer as torch models."""
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest
import tifffile

import tilerseg
from conftest import cli, reference, textured_tiff, tiny_unet

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.2, 0.3)


def export(model, path, *, metadata=None, static=None, nhwc=False, dtype=None):
    """Export ``model`` (3 bands) with the TorchScript exporter: batch and
    spatial axes dynamic, or all fixed at ``static`` px (batch 1);
    ``metadata`` values written as JSON strings."""
    import onnx
    import torch

    side = static or 64
    shape = (1, side, side, 3) if nhwc else (1, 3, side, side)
    x = torch.zeros(shape, dtype=dtype or torch.float32)
    spatial = (1, 2) if nhwc else (2, 3)
    axes = None if static else {n: {0: "batch", spatial[0]: "h", spatial[1]: "w"} for n in ("input", "logits")}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (x,), str(path), opset_version=17, dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes=axes)
    if metadata:
        m = onnx.load(str(path))
        for k, v in metadata.items():
            p = m.metadata_props.add()
            p.key, p.value = k, v if isinstance(v, str) else json.dumps(v)
        onnx.save(m, str(path))
    return str(path)


def session_reference(path, img, halo, stride, mean, std):
    """The oracle: the ONNX Runtime session run once on the whole image,
    mirror-padded by the halo (and to the stride), normalised by hand."""
    import onnxruntime as ort

    H, W = img.shape[:2]
    pb, pr = (-(H + 2 * halo)) % stride, (-(W + 2 * halo)) % stride
    pad = np.pad(img, ((halo, halo + pb), (halo, halo + pr), (0, 0)), mode="reflect").astype(np.float32) / 255
    x = ((pad - np.float32(mean)) / np.float32(std)).transpose(2, 0, 1)[None]
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    logits = s.run(None, {s.get_inputs()[0].name: np.ascontiguousarray(x, np.float32)})[0]
    return (1 / (1 + np.exp(-logits)))[0, :, halo:halo + H, halo:halo + W]


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.tif"
    return str(path), textured_tiff(path, (300, 420), seed=1, periods=(17.0, 23.0), noise=30)


@pytest.fixture(scope="module")
def models(tmp_path_factory, image):
    """The tiny seam-test U-Net (stride 8, radius 65) as an smp folder and as
    an ONNX file whose metadata carries its normalisation, names, stride and
    a threshold (the median probability on the test image, so that both
    labels occur), which is returned last."""
    d = tmp_path_factory.mktemp("models")
    net = tiny_unet(seed=3)
    net.save_pretrained(str(d / "torch"))
    probs = tilerseg.segment(image[1][:128, :128], net, mean=MEAN, std=STD, tile=256, halo=72).compute()
    threshold = round(float(np.median(probs)), 3)
    meta = {"mean": list(MEAN), "std": list(STD), "class_names": ["background", "cell"], "threshold": threshold,
            "stride": 8}
    return net, str(d / "torch"), export(net, d / "unet.onnx", metadata=meta), threshold


def test_the_metadata_is_read(models):
    from tilerseg.models import ModelSpec, describe

    info = describe(models[2], ModelSpec())
    assert (info.spec.arch, info.spec.in_channels, info.spec.classes) == ("onnx", 3, 1)
    assert info.normalization.mean == MEAN and info.normalization.std == STD
    assert info.class_names == ("background", "cell") and info.threshold == models[3]
    assert dict(info.spec.kwargs) == {"stride": 8, "output": "logits", "layout": "NCHW"}


def test_an_onnx_run_equals_the_torch_run(tmp_path, image, models):
    path, _ = image
    _, torch_dir, onnx_file, _ = models
    flags = ["--mean", ",".join(map(str, MEAN)), "--std", ",".join(map(str, STD))]
    r = cli("run", path, "--weights", onnx_file, "--probabilities", "-o", tmp_path / "onnx.tif")
    assert r.returncode == 0, r.stderr
    assert "backend: onnxruntime (the model is an ONNX file)" in r.stderr
    assert "halo 72 px (receptive field 65 px, measured by perturbation)" in r.stderr
    r = cli("run", path, "--weights", torch_dir, *flags, "--probabilities", "-o", tmp_path / "torch.tif")
    assert r.returncode == 0, r.stderr
    p_onnx, p_torch = tifffile.imread(tmp_path / "onnx.tif"), tifffile.imread(tmp_path / "torch.tif")
    assert p_onnx.shape == p_torch.shape == (300, 420)
    assert np.abs(p_onnx - p_torch).max() <= 1e-4
    # labels: at the metadata's threshold, as the torch run's --threshold
    th = models[3]
    assert cli("run", path, "--weights", onnx_file, "-o", tmp_path / "onnx-labels.tif").returncode == 0
    assert cli("run", path, "--weights", torch_dir, *flags, "--threshold", th,
               "-o", tmp_path / "torch-labels.tif").returncode == 0
    a, b = tifffile.imread(tmp_path / "onnx-labels.tif"), tifffile.imread(tmp_path / "torch-labels.tif")
    clear = np.abs(p_torch - th) > 1e-4
    assert 0.05 < (b == 1).mean() < 0.95 and np.array_equal(a[clear], b[clear])
    assert not os.path.exists(os.path.join(os.path.dirname(onnx_file), ".tilerseg-cache"))  # nothing exported


def test_tiles_through_onnx_equal_one_whole_image_session(image, models):
    _, img = image
    got = tilerseg.segment(img, models[2], tile=256, device="cpu").compute()  # halo: measured (72)
    ref = session_reference(models[2], img, halo=72, stride=8, mean=MEAN, std=STD)
    assert got.shape == ref.shape == (1, 300, 420)
    assert np.abs(got - ref).max() <= 1e-4


def test_the_perturbation_halo_equals_the_gradient_halo(models):
    from tilerseg.models import ModelSpec, describe, instantiate
    from tilerseg.receptive import measure_halo

    net, _, onnx_file, _ = models
    graph = instantiate(describe(onnx_file, ModelSpec()))
    by_perturbation = measure_halo(graph, in_channels=3, stride=8)
    by_gradients = measure_halo(net, in_channels=3, stride=8)
    assert by_perturbation.how == "measured by perturbation"
    assert (by_perturbation.radius, by_perturbation.halo) == (by_gradients.radius, by_gradients.halo) == (65, 72)
    r = cli("halo", "--weights", onnx_file)
    assert r.returncode == 0 and "radius 65 px (measured by perturbation; output stride 8)" in r.stdout


def test_a_fixed_size_graph_takes_its_own_tile_only(tmp_path, image, models):
    path, img = image
    static = export(models[0], tmp_path / "static.onnx", static=256)  # 1x3x256x256; no metadata: stride 32
    r = cli("run", path, "--weights", static, "--probabilities", "-o", tmp_path / "p.tif")
    assert r.returncode == 0, r.stderr
    assert "tile 256 px (fixed by the model's input shape)" in r.stderr and "windows of 256 px" in r.stdout
    ref = reference(models[0], img, halo=96, stride=32)[0]  # whole-image torch inference, ImageNet normalisation
    assert np.abs(tifffile.imread(tmp_path / "p.tif") - ref).max() <= 1e-4
    r = cli("run", path, "--weights", static, "--tile", "512", "-o", tmp_path / "q.tif")
    assert r.returncode == 1 and r.stderr.count("error") == 1 and "Traceback" not in r.stderr, r.stderr
    error = r.stderr.strip().splitlines()[-1]
    assert "--tile 512" in error and "static.onnx takes fixed 256x256 windows" in error and "drop --tile" in error
    assert not (tmp_path / "q.tif").exists()


def test_a_file_that_is_not_onnx_is_one_line(tmp_path, image):
    path, _ = image
    bad = tmp_path / "model.onnx"
    bad.write_bytes(b"\x00\x01 this is not a protobuf \xff\xfe" * 8)
    for weights, what in ((bad, "not a readable ONNX model"), (_flat_graph(tmp_path), "no 4-D image input")):
        out = tmp_path / "mask.zarr"
        r = cli("run", path, "--weights", weights, "-o", out)
        assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr
        assert str(weights) in r.stderr and what in r.stderr and "Traceback" not in r.stderr
        assert not out.exists()


def _flat_graph(tmp_path) -> str:
    """A valid ONNX graph whose input is (batch, 8): not an image model."""
    import torch

    x = torch.zeros(1, 8)
    path = str(tmp_path / "flat.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.nn.Linear(8, 2).eval(), (x,), path, opset_version=17, dynamo=False)
    return path


def small_net(classes: int = 2, seed: int = 0):
    """A small local net of stride 2: conv, pool, conv, upsample, conv."""
    import torch

    torch.manual_seed(seed)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3, padding=1),
                         nn.ReLU(), nn.Upsample(scale_factor=2), nn.Conv2d(4, classes, 3, padding=1)).eval()


class Wrapped(__import__("torch").nn.Module):
    """``net`` as other tools export it: channels last, uint8 pixels in
    (normalised inside), softmax at the end, or global pooling."""

    def __init__(self, net, *, nhwc=False, pixels=False, softmax=False, pooled=False):
        super().__init__()
        self.net, self.nhwc, self.pixels, self.softmax, self.pooled = net, nhwc, pixels, softmax, pooled

    def forward(self, x):
        import torch

        x = x.permute(0, 3, 1, 2) if self.nhwc else x
        if self.pixels:
            mean = torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)
            std = torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
            x = (x.float() / 255 - mean) / std
        y = self.net(x)
        y = y + y.mean(dim=(2, 3), keepdim=True) if self.pooled else y
        y = torch.softmax(y, dim=1) if self.softmax else y
        return y.permute(0, 2, 3, 1) if self.nhwc else y


@pytest.mark.parametrize("kind", ["nhwc-softmax", "uint8-pixels"])
def test_graphs_as_other_tools_export_them(tmp_path, image, kind):
    """Channels-last with a softmax at the end, or uint8 pixels normalised
    inside the graph: read from the graph, run to the torch model's
    probabilities (the activation is not applied twice, pixels not
    normalised twice)."""
    import torch

    from tilerseg.models import ModelSpec, describe

    _, img = image
    img = img[:160, :200]
    net = small_net()
    if kind == "nhwc-softmax":
        path = export(Wrapped(net, nhwc=True, softmax=True), tmp_path / "m.onnx", nhwc=True, metadata={"stride": 2})
    else:
        path = export(Wrapped(net, pixels=True), tmp_path / "m.onnx", dtype=torch.uint8, metadata={"stride": 2})
    info = describe(path, ModelSpec())
    assert info.spec.classes == 2 and info.spec.in_channels == 3
    settings = dict(info.spec.kwargs)
    if kind == "nhwc-softmax":
        assert settings["layout"] == "NHWC" and settings["output"] == "probabilities"
    else:
        assert settings["output"] == "logits" and info.normalization.scale == 1.0
    got = tilerseg.segment(img, path, tile=64, device="cpu").compute()  # stride 2: halo 6
    ref = tilerseg.segment(img, net, tile=128, device="cpu").compute()  # ImageNet normalisation, softmax
    assert got.shape == ref.shape == (2, 160, 200)
    assert np.abs(got - ref).max() <= 1e-4


def test_a_graph_with_global_pooling_gets_the_gaussian_merge(tmp_path, image):
    from tilerseg.api import NonLocalModelWarning
    from tilerseg.models import ModelSpec, describe, global_context, instantiate

    path = export(Wrapped(small_net(), pooled=True), tmp_path / "pooled.onnx")
    assert global_context(instantiate(describe(path, ModelSpec()))) == ["ReduceMean"]
    with pytest.warns(NonLocalModelWarning, match="pooled.onnx has global context .ReduceMean.*gaussian merge"):
        got = tilerseg.segment(image[1][:96, :128], path, device="cpu", merge="auto").compute()
    assert got.shape == (2, 96, 128) and np.isfinite(got).all()


def test_engine_flags_with_an_onnx_file(tmp_path, image):
    path, _ = image
    model = export(small_net(), tmp_path / "small.onnx", metadata={"stride": 2})
    r = cli("run", path, "--weights", model, "--precision", "fp16", "-o", tmp_path / "a.tif")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "--precision fp16" in r.stderr
    r = cli("run", path, "--weights", model, "--compile", "--probabilities", "-o", tmp_path / "b.tif")
    assert r.returncode == 0 and "--compile does not apply" in r.stderr, r.stderr
    if importlib.util.find_spec("openvino"):
        r = cli("run", path, "--weights", model, "--backend", "openvino", "--probabilities", "-o", tmp_path / "c.tif")
        assert r.returncode == 0 and "backend: openvino (on the ONNX file" in r.stderr, r.stderr
        assert np.abs(tifffile.imread(tmp_path / "c.tif") - tifffile.imread(tmp_path / "b.tif")).max() <= 1e-4
