"""What `run`, `info` and `demo` say: one line that fits the case, in
units and numbers a reader can use (issue 38's messages)."""
import numpy as np
import pytest

from conftest import cli, textured_tiff, tiny_unet


@pytest.fixture(scope="module")
def small_tif(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("msg") / "img.tif"
    textured_tiff(path, (200, 200), seed=2, periods=(17.0, 23.0), noise=20)
    return str(path)


@pytest.fixture(scope="module")
def three_class(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("models") / "three"
    tiny_unet(classes=3).save_pretrained(str(path))
    return str(path)


@pytest.mark.parametrize("value", ["5", "1"])
def test_boundary_class_on_a_binary_model_says_it_has_none(tmp_path, small_tif, tiny_model_dir, value):
    r = cli("run", small_tif, "--weights", tiny_model_dir, "--instances", "--boundary-class", value,
            "-o", str(tmp_path / "o.zarr"), "--tile", "256", "--halo", "72")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "one output (background and foreground)" in r.stderr and "0..0" not in r.stderr


def test_boundary_class_out_of_range_names_the_classes(tmp_path, small_tif, three_class):
    r = cli("run", small_tif, "--weights", three_class, "--classes", "3", "--instances", "--boundary-class", "5",
            "-o", str(tmp_path / "o.zarr"), "--tile", "256", "--halo", "72")
    assert r.returncode == 1 and "classes 1 to 2 besides background" in r.stderr, r.stderr
