"""Pipelines YAML: options load, flags override, typos fail; shipped files are valid."""
import glob
import os

import pytest

from conftest import ROOT, cli, data
from tilerseg.config import load_run_config
from tilerseg.errors import InputError


@pytest.mark.parametrize("path", sorted(glob.glob(str(ROOT / "pipelines" / "*.yaml"))))
def test_shipped_pipelines_are_valid(path):
    import yaml

    raw = yaml.safe_load(open(path))
    if "data" in raw or "images" in raw:  # a training configuration
        from tilerseg.train import load_train_config

        cfg = load_train_config(path)
        assert cfg.images and cfg.masks and cfg.classes >= 2, path
    elif "cluster" in raw:  # a dask-jobqueue cluster: its job script must come out
        from tilerseg.cluster import cluster_script

        assert cluster_script(path).startswith("#!/usr/bin/env bash"), path
    else:
        cfg = load_run_config(path)
        assert cfg, path


def test_unknown_key_lists_valid_ones(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tile: 256\nhallo: 64\n")
    with pytest.raises(InputError, match="unknown option 'hallo'.*halo"):
        load_run_config(p)


def test_config_sets_options_and_flags_override(tmp_path, tiny_model_dir):
    import zarr

    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"weights: {tiny_model_dir}\nbands: [1, 1, 1]\ntile: 256\nhalo: 72\nprobabilities: true\n")
    out = tmp_path / "o.zarr"
    r = cli("run", data("isbi2012/image/1.png"), "--config", str(cfg), "--tile", "320", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert "windows of 320 px (halo 72" in r.stdout  # tile from the flag, halo from the file
    z = zarr.open_array(str(out / "0"), mode="r")
    assert z.dtype == "float32" and z.shape == (1, 512, 512)


def test_non_local_model_is_announced(tmp_path):
    out = tmp_path / "o.png"
    r = cli("run", data("rasterio/byte.tif"), "--model", "unet", "--encoder", "resnet18", "--bands", "1,1,1",
            "--tile", "64", "--halo", "0", "-o", str(out), "--quiet")
    assert r.returncode == 0 and "global context" not in r.stderr
    r = cli("run", data("rasterio/byte.tif"), "--model", "pspnet", "--encoder", "resnet18", "--bands", "1,1,1",
            "--tile", "64", "--halo", "0", "-o", str(tmp_path / "p.png"), "--quiet")
    assert r.returncode == 0, r.stderr
    assert "global context" in r.stderr and os.path.exists(tmp_path / "p.png")
