"""--weights hf://ORG/NAME[@REVISION]: resolved through huggingface_hub's
cache, which the tests build by hand under a temporary HF_HOME (the layout
hub/models--ORG--NAME/snapshots/<revision>/ and refs/main); never the network."""
import json
import warnings

import numpy as np
import pytest
import tifffile

from conftest import cli, reference, textured_tiff, tiny_unet

REV = "0123456789abcdef0123456789abcdef01234567"


def snapshot(home, repo, rev=REV, main=True):
    """The snapshot folder of ``repo`` in the cache under ``home``."""
    base = home / "hub" / f"models--{repo.replace('/', '--')}"
    folder = base / "snapshots" / rev
    folder.mkdir(parents=True)
    if main:
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(rev)
    return folder


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "img.tif"
    return str(path), textured_tiff(path, (120, 160), seed=2, periods=(13.0, 19.0), noise=30)


@pytest.mark.slow
def test_an_smp_repo_and_a_torchscript_repo_run_like_the_model(tmp_path, hub, image):
    """An smp ``save_pretrained`` snapshot (what ``from_pretrained`` reads)
    and a repo holding a TorchScript file give the model's own whole-image
    probabilities, by ``refs/main`` or by an explicit revision."""
    import torch

    path, img = image
    net = tiny_unet(seed=5)
    net.save_pretrained(str(snapshot(hub, "org/unet")))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.jit.trace(net, torch.zeros(1, 3, 64, 64))
        folder = snapshot(hub, "org/scripted", main=False)
        (folder / "README.md").write_text("a model")
        torch.jit.save(prog, str(folder / "model.pt"), _extra_files={"tilerseg.json": json.dumps({"stride": 8})})
    ref = reference(net, img, halo=72, stride=8)[0]
    for weights in ("hf://org/unet", f"hf://org/unet@{REV}", f"hf://org/scripted@{REV}"):
        out = tmp_path / f"{len(weights)}.tif"
        r = cli("run", path, "--weights", weights, "--tile", "256", "--probabilities", "-o", out)
        assert r.returncode == 0, r.stderr
        assert np.abs(tifffile.imread(out) - ref).max() <= 1e-4, weights


def test_uncached_offline_and_empty_repos_are_one_line(tmp_path, hub, image):
    path, _ = image
    (snapshot(hub, "org/empty") / "README.md").write_text("no weights here")
    cases = (("hf://org/missing", "not in the Hub cache", "HF_HUB_OFFLINE=0 tilerseg models --describe"),
             ("hf://org/empty", "holds no weights", "README.md"),
             ("hf://justaname", "hf://ORG/NAME", "REVISION"))
    for weights, what, hint in cases:
        out = tmp_path / "mask.tif"
        r = cli("run", path, "--weights", weights, "-o", out)
        assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr, r.stderr
        assert weights in r.stderr and what in r.stderr and hint in r.stderr, r.stderr
        assert not out.exists()
