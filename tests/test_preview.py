"""--preview: the input with the mask blended in, checked pixel by pixel."""
import numpy as np
import pytest
from PIL import Image

from conftest import cli, data


@pytest.mark.parametrize("out_name,extra", [("m.tif", []), ("p.zarr", ["--probabilities"])])
def test_preview_blends_mask_over_input(tmp_path, tiny_model_dir, out_name, extra):
    import rasterio

    src = data("rasterio/RGB.byte.tif")
    out, prev = tmp_path / out_name, tmp_path / "prev.png"
    r = cli("run", src, "--weights", tiny_model_dir, "-o", str(out), "--preview", str(prev), "--quiet", *extra)
    assert r.returncode == 0, r.stderr
    got = np.asarray(Image.open(prev)).astype(float)
    with rasterio.open(src) as ds:
        img = np.moveaxis(ds.read(), 0, -1).astype(float)
    if extra:
        import zarr

        p = zarr.open_array(str(out / "0"), mode="r")[0]
        lab = np.where(np.isnan(p), 255, np.nan_to_num(p) >= 0.5)
    else:
        with rasterio.open(out) as m:
            lab = m.read(1)
    assert got.shape == img.shape  # 791 px wide: shown at full size
    on = lab == 1
    assert on.any() and (~on).any()
    blend = 0.45 * img + 0.55 * np.array([0, 230, 60])
    assert np.abs(got[on] - blend[on]).max() <= 1
    assert np.abs(got[~on] - img[~on]).max() <= 1


def test_preview_of_polygons_matches_preview_of_the_raster(tmp_path, tiny_model_dir):
    src = data("rasterio/RGB.byte.tif")
    previews = []
    for out in ("m.tif", "m.geojson"):
        prev = tmp_path / f"{out}.png"
        r = cli("run", src, "--weights", tiny_model_dir, "-o", str(tmp_path / out), "--preview", str(prev), "--quiet")
        assert r.returncode == 0, r.stderr
        previews.append(np.asarray(Image.open(prev)).astype(int))
    a, b = previews
    assert a.shape == b.shape
    assert (np.abs(a - b).max(-1) <= 1).mean() >= 0.999  # polygons rasterized back on the thumbnail grid
