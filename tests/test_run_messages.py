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


def test_eval_of_a_missing_isbi_folder_says_which_command_makes_it(tmp_path, tiny_model_dir):
    r = cli("eval", "--weights", tiny_model_dir, str(tmp_path / "data/isbi2012/held-out/image"),
            str(tmp_path / "data/isbi2012/held-out/label"))
    assert r.returncode == 1 and "python scripts/fetch_isbi2012.py data/isbi2012" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_instance_table_coordinates_are_rounded_to_what_a_pixel_means(tmp_path):
    """0.5 µm/px: centroids and areas to 0.01 µm (µm²), not 16 digits,
    and within that of the exact values."""
    import csv

    from tilerseg import synthetic

    src = tmp_path / "s.tif"
    synthetic.write_tiff(src, (512, 512), levels=1, compression="zlib", mpp=0.5)
    r = cli("run", str(src), "--weights", "demo", "--instances", "-o", str(tmp_path / "o.geojson"), "--quiet")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "o.csv") as f:
        text = f.read()
        rows = list(csv.DictReader(text.splitlines()))
    assert len(rows) > 10
    for row in rows:
        for key in ("centroid_x_um", "centroid_y_um", "area_um2"):
            assert len(row[key].partition(".")[2]) <= 2, (key, row[key])
        assert abs(float(row["centroid_x_um"]) - float(row["centroid_x_px"]) * 0.5) <= 0.0051
        assert abs(float(row["area_um2"]) - int(row["area_px"]) * 0.25) <= 0.0051
