"""`tilerseg models --describe WEIGHTS`: what a file or repository is, read
through the loader a run uses."""
import pytest

from conftest import cli, tiny_unet
from test_program_weights import Pooled, script


def rows(out: str) -> dict:
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def test_the_shipped_checkpoint():
    r = cli("models", "--describe", "demo")
    assert r.returncode == 0, r.stderr
    d = rows(r.stdout)
    assert d["format"] == "tilerseg checkpoint" and d["architecture"] == "unet/tu-resnet18"
    assert d["bands"] == "3" and d["classes"] == "1 (background, nucleus)" and d["pixel size"] == "0.5 µm/px"
    assert d["halo"] == "96 px (declared by the weights)" and d["seam-exact"] == "yes (crop merge)"
    assert d["preprocessing"].startswith("(pixels / 255 - mean 0.485, 0.456, 0.406)")


@pytest.mark.slow
def test_programs_local_and_pooled_and_a_hub_repo(tmp_path, monkeypatch):
    """A TorchScript file (named .bin) with its metadata: the measured
    receptive field; the same net with a global mean: not seam-exact; a
    Hub repository holding it: the format says where it came from."""
    net = tiny_unet(seed=1)
    local = script(net, tmp_path / "local.bin", {"stride": 8, "class_names": ["cell"], "mpp": 0.25,
                                                 "mean": [0.5], "std": [0.25], "scale": 255})
    d = rows(cli("models", "--describe", local).stdout)
    assert d["format"] == "TorchScript program" and d["architecture"] == "in the file"
    assert d["classes"] == "1 (background, cell)" and d["pixel size"] == "0.25 µm/px"
    assert d["halo"] == "receptive field 65 px, measured by input gradients" and d["output stride"] == "8"
    assert d["preprocessing"] == "(pixels / 255 - mean 0.5) / std 0.25" and d["seam-exact"] == "yes (crop merge)"
    pooled = script(Pooled(net), tmp_path / "pooled.pt", {"stride": 8})
    d = rows(cli("models", "--describe", pooled).stdout)
    assert d["seam-exact"] == "no: mean (gaussian merge)" and "not measured" in d["halo"]
    from test_hub_weights import REV, snapshot

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    folder = snapshot(tmp_path / "hf", "org/cells")
    (folder / "weights.pt").write_bytes(open(local, "rb").read())
    r = cli("models", "--describe", "hf://org/cells")
    assert r.returncode == 0, r.stderr
    d = rows(r.stdout)
    assert d["format"].startswith("TorchScript program (from hf://org/cells") and REV in d["format"]


def test_bad_weights_are_one_line(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00not weights" * 10)
    r = cli("models", "--describe", junk)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and str(junk) in r.stderr and "Traceback" not in r.stderr
