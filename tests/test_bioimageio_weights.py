"""bioimage.io packages as --weights, against bioimageio.core as the oracle.

Packages are built here (format 0.5, no github_user among the authors: its
validation would go online), with the seam-test U-Net as TorchScript."""
import os
import warnings

import numpy as np
import pytest
import tifffile

from conftest import cli, textured_tiff, tiny_unet

pytest.importorskip("bioimageio.core")
HALO = 72


def rdf(pre: str, post: str = "[{id: sigmoid}]", extra: str = "") -> str:
    axis = "{{type: space, id: {a}, size: {{min: 160, step: 8}}, unit: micrometer, scale: 0.5}}"
    out = "{{type: space, id: {a}, size: {{tensor_id: raw, axis_id: {a}}}, halo: %d, unit: micrometer, scale: 0.5}}"
    return f"""format_version: 0.5.4
type: model
name: tiny unet
description: the seam-test U-Net
authors: [{{name: Test Author}}]
cite: [{{text: a paper, doi: 10.1000/xyz}}]
license: MIT
documentation: README.md
inputs:
  - id: raw
    axes: [{{type: batch}}, {{type: channel, channel_names: [r, g, b]}}, {axis.format(a='y')}, {axis.format(a='x')}]
    test_tensor: {{source: test_input.npy}}
    data: {{type: float32}}
    preprocessing: {pre}
outputs:
  - id: prob
    axes: [{{type: batch}}, {{type: channel, channel_names: [cell]}}, {(out % HALO).format(a='y')},
           {(out % HALO).format(a='x')}]
    test_tensor: {{source: test_output.npy}}
    data: {{type: float32}}
    postprocessing: {post}
weights:
  torchscript: {{source: weights.pt, pytorch_version: "2.0"}}
{extra}"""


PER_SAMPLE = "[{id: scale_range, kwargs: {axes: [y, x], min_percentile: 1, max_percentile: 99}}]"
FIXED = ("[{id: scale_linear, kwargs: {axis: channel, gain: [0.01, 0.02, 0.015], offset: [-1, -2, -1.5]}}, "
         "{id: clip, kwargs: {min: -1.5, max: 1.5}}]")


def package(folder, pre):
    """A package folder: the U-Net traced, a 192-px test input of pixel
    values, a test output (any non-zero values pass validation)."""
    import torch

    folder.mkdir()
    net = tiny_unet(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(net, torch.zeros(1, 3, 64, 64)), str(folder / "weights.pt"))
    x = np.random.default_rng(0).integers(0, 255, (1, 3, 192, 192)).astype(np.float32)
    np.save(folder / "test_input.npy", x)
    np.save(folder / "test_output.npy", np.full((1, 1, 192, 192), 0.5, np.float32))
    (folder / "README.md").write_text("# tiny\n")
    (folder / "rdf.yaml").write_text(rdf(pre))
    return folder


def core(folder, x):
    """bioimageio.core's prediction of the package on ``x`` (1, C, H, W), whole."""
    from bioimageio.core import Sample, Tensor, create_prediction_pipeline
    from bioimageio.spec import load_model_description

    d = load_model_description(str(folder / "rdf.yaml"))
    sample = Sample(members={"raw": Tensor.from_numpy(x, dims=("batch", "channel", "y", "x"))}, stat={}, id="s")
    with create_prediction_pipeline(d) as pipeline:
        out = pipeline.predict_sample_without_blocking(sample)
    return out.members["prob"].data.values[0, 0]


def run(tmp_path, image, weights, *flags):
    out = tmp_path / f"p{len(os.listdir(tmp_path))}.tif"
    r = cli("run", image, "--weights", weights, "--probabilities", "-o", out, *flags)
    assert r.returncode == 0, r.stderr
    return tifffile.imread(out), r.stderr


def as_tiff(tmp_path, x):
    path = str(tmp_path / "test_input.tif")
    tifffile.imwrite(path, x[0].transpose(1, 2, 0), photometric="rgb")
    return path


@pytest.mark.slow
def test_fixed_preprocessing_equals_bioimageio_core(tmp_path):
    """scale_linear per channel and clip: the package's own test input gives
    core's prediction on the mirror-padded input (tilerseg's border rule),
    over the whole image; the zip of the same package too."""
    from bioimageio.spec import load_model_description, save_bioimageio_package

    folder = package(tmp_path / "fixed", FIXED)
    x = np.load(folder / "test_input.npy")
    got, err = run(tmp_path, as_tiff(tmp_path, x), str(folder / "rdf.yaml"), "--tile", "352")
    assert "halo 72 px" in err and "crop merge" in err
    padded = np.pad(x, ((0, 0), (0, 0), (HALO, HALO + 8), (HALO, HALO + 8)), mode="reflect")  # to min + k*step
    ref = core(folder, padded)[HALO:HALO + 192, HALO:HALO + 192]
    assert got.shape == ref.shape == (192, 192) and np.abs(got - ref).max() <= 1e-4
    zipped = save_bioimageio_package(load_model_description(str(folder / "rdf.yaml")),
                                     output_path=tmp_path / "fixed.zip")
    again, _ = run(tmp_path, as_tiff(tmp_path, x), str(zipped), "--tile", "352")
    assert np.array_equal(again, got)


@pytest.mark.slow
def test_per_sample_statistics_are_the_whole_images(tmp_path):
    """scale_range's percentiles per channel: computed once over the whole
    image (the tiling line says so), so the test input gives core's
    prediction (core zero-pads the border: compared inside the halo), and a
    larger image tiled in 256-px windows equals one window over all of it."""
    folder = package(tmp_path / "ranged", PER_SAMPLE)
    x = np.load(folder / "test_input.npy")
    got, err = run(tmp_path, as_tiff(tmp_path, x), str(folder), "--tile", "352")
    assert "per-sample statistics computed once over the whole image (every pixel)" in err
    ref = core(folder, x)
    inner = (slice(HALO, -HALO),) * 2
    assert np.abs(got[inner] - ref[inner]).max() <= 1e-4
    big = str(tmp_path / "big.tif")
    textured_tiff(big, (300, 420), seed=4, periods=(17.0, 23.0), noise=30)
    tiled, err = run(tmp_path, big, str(folder), "--tile", "256")
    whole, _ = run(tmp_path, big, str(folder), "--tile", "576")
    assert "windows" in err and tiled.shape == whole.shape == (300, 420)
    assert np.abs(tiled - whole).max() <= 1e-5
    import tilerseg

    arr = tifffile.imread(big)
    in_process = tilerseg.segment(arr, str(folder), tile=256, device="cpu").compute()[0]
    assert np.abs(in_process - tiled).max() <= 1e-6


def test_what_a_package_declares_is_read(tmp_path):
    from tilerseg.models import ModelSpec, describe

    info = describe(str(package(tmp_path / "p", FIXED) / "rdf.yaml"), ModelSpec())
    assert (info.spec.arch, info.spec.in_channels, info.spec.classes) == ("bioimageio", 3, 1)
    assert info.class_names == ("background", "cell") and info.mpp == 0.5 and info.halo == HALO
    assert dict(info.spec.kwargs)["stride"] == 8 and dict(info.spec.kwargs)["min"] == 160


def test_bad_packages_are_one_line(tmp_path):
    folder = package(tmp_path / "p", FIXED)
    image = as_tiff(tmp_path, np.load(folder / "test_input.npy"))
    (folder / "rdf.yaml").write_text(rdf(FIXED).replace("license: MIT\n", "license: not-a-licence\n"))
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"PK\x03\x04" + b"\x00" * 40)
    for weights, what in ((folder / "rdf.yaml", "not a valid bioimage.io model (bioimageio.spec: "),
                          (broken, "not a readable zip archive")):
        out = tmp_path / "m.tif"
        r = cli("run", image, "--weights", weights, "-o", out)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert str(weights) in r.stderr and what in r.stderr and not out.exists()
