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
