"""`tilerseg info` on an output lists each class's pixels, counted against the mask."""
import re

import numpy as np
import pytest

import tilerseg
from conftest import data
from tilerseg.info import describe_input
from tilerseg.io import open_reader


@pytest.mark.parametrize("src,name", [("rasterio/RGB.byte.tif", "m.tif"), ("openslide/boxes.tiff", "m.tif"),
                                      ("rasterio/RGB.byte.tif", "m.zarr")])
def test_info_counts_classes_of_outputs(tmp_path, tiny_model_dir, src, name):
    out = tmp_path / name
    tilerseg.run(data(src), out, weights=tiny_model_dir, tile=256, halo=72, device="cpu")
    with open_reader(str(out)) as r:
        mask = r.read((0, r.meta.shape[0]), (0, r.meta.shape[1]))[0][..., 0]
    text = describe_input(str(out))
    counts = {int(k): int(n) for k, n in re.findall(r"^\s+(\d+) \S+(?: \d+)?\s+(\d+) px", text, re.M)}
    expected = {int(k): int(n) for k, n in zip(*np.unique(mask, return_counts=True))}
    assert counts == expected and counts
    if "RGB" in src:
        assert 255 in counts and " km²" in text  # nodata listed; area from the transform (UTM), in readable units


def test_info_on_an_input_lists_no_classes():
    assert "classes:" not in describe_input(data("rasterio/RGB.byte.tif"))


def test_an_area_column_keeps_one_unit():
    """Issue 38: '2.22 mm²' beside '141,302 µm²' in one table."""
    from tilerseg.info import area_column

    col = area_column([2.22e6, 141302.0, 12.0], "µm²")
    assert col == ["2.22 mm²", "0.141 mm²", "0.000012 mm²"] and all(c.endswith(" mm²") for c in col)
    assert area_column([5.2e5, 30.0], "m²") == ["52 ha", "0.003 ha"]


def test_a_geotiff_shows_its_pixel_in_the_crs_units_and_its_origin_in_full():
    from conftest import cli, data

    r = cli("info", data("rasterio/RGB.byte.tif"))
    assert r.returncode == 0, r.stderr
    assert "pixel:      300.038 x 300.042 m (in EPSG:32618" in r.stdout and "mpp:        unknown" not in r.stdout
    assert "origin (101985, 2826915)" in r.stdout and "e+06" not in r.stdout
