"""Instances: the label image and its object table do not depend on the blocks.

The oracle is the same procedure run on the whole image as one block (its
components are then whole by construction), and a synthetic image whose
objects are known: discs, some touching in pairs, some straddling the
corner where four blocks meet."""
import numpy as np
import pytest
import zarr

from tilerseg.errors import InputError
from tilerseg.instances import InstanceOptions, label


def discs(shape, centres, radii, soft: float = 2.0) -> np.ndarray:
    """P(foreground) (1, H, W): a soft edge around each disc."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]].astype(np.float32)
    p = np.zeros(shape, np.float32)
    for (y, x), r in zip(centres, radii):
        d = np.sqrt((yy - y) ** 2 + (xx - x) ** 2)
        p = np.maximum(p, 1 / (1 + np.exp(np.clip((d - r) / soft * 4, -50, 50))))
    return p[None]


def scene(shape=(700, 900), seed=0):
    """Separate discs, touching pairs (a narrow neck between two round
    nuclei) and two pairs on the corner where four 256-px blocks meet."""
    rng = np.random.default_rng(seed)
    centres, radii, truth = [], [], 0
    corners = ((256, 256), (512, 512))
    for y in range(40, shape[0] - 40, 75):
        for x in range(40, shape[1] - 40, 75):
            r = rng.uniform(9, 14)
            if min(max(abs(y - cy), abs(x - cx)) for cy, cx in corners) < 60:
                continue
            if rng.random() < 0.4:  # a touching pair: centres 1.7 radii apart
                a = rng.uniform(0, np.pi)
                dy, dx = 0.85 * r * np.sin(a), 0.85 * r * np.cos(a)
                centres += [(y - dy, x - dx), (y + dy, x + dx)]
                radii += [r, r]
                truth += 2
            else:
                centres.append((y + rng.uniform(-5, 5), x + rng.uniform(-5, 5)))
                radii.append(r)
                truth += 1
    for y, x in corners:  # straddling the corners of 256-px blocks
        centres += [(y - 9, x - 9), (y + 9, x + 9)]
        radii += [12, 12]
        truth += 2
    return discs(shape, centres, radii), truth


def run(p: np.ndarray, chunk, opts=InstanceOptions()):
    store = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=p.shape, chunks=(p.shape[0], chunk, chunk),
                            dtype=np.float32)
    store[:] = p
    out = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=p.shape[1:], chunks=(chunk, chunk),
                          dtype=np.uint32, fill_value=0)
    table = label(store, out, opts)
    return out[:], table


@pytest.fixture(scope="module")
def whole():
    p, truth = scene()
    return p, truth, run(p, max(p.shape))


@pytest.mark.parametrize("chunk", [256, 300, 512])
def test_labels_and_table_equal_the_whole_image_run(whole, chunk):
    p, _, (ref, ref_table) = whole
    got, table = run(p, chunk)
    assert got.dtype == np.uint32 and np.array_equal(got, ref)  # ids included
    for k in ("id", "area", "row", "col", "probability", "class"):
        assert np.array_equal(table[k], ref_table[k]), k


def test_objects_are_counted_split_and_numbered_in_raster_order(whole):
    from scipy import ndimage

    p, truth, (lab, table) = whole
    n = int(lab.max())
    assert n == truth == len(table["id"])  # touching pairs split, none split twice
    # ids in raster order of each object's first pixel
    values, first = np.unique(lab.ravel(), return_index=True)
    assert np.array_equal(values[1:], np.arange(1, n + 1)) and np.all(np.diff(first[1:]) > 0)
    # every object one 4-connected piece, areas and centroids as numpy counts them
    assert all(ndimage.label(lab == i)[1] == 1 for i in (1, n // 2, n))
    assert np.array_equal(np.bincount(lab.ravel())[1:], table["area"])
    cy = ndimage.center_of_mass(np.ones_like(lab), lab, np.arange(1, n + 1))
    assert np.allclose(np.array(cy), np.stack([table["row"], table["col"]], 1))


def test_seam_corner_objects_are_neither_duplicated_nor_cut(whole):
    """Objects on the corner where four 256-px blocks meet: each is one id, as
    in the whole-image run (no duplicate, no piece left at a seam)."""
    p, _, (ref, _) = whole
    got, _ = run(p, 256)
    for y, x in ((256, 256), (512, 512)):
        window = got[y - 25:y + 25, x - 25:x + 25]
        ids = np.unique(window[window > 0])
        assert len(ids) == 2 and np.array_equal(window, ref[y - 25:y + 25, x - 25:x + 25])


def test_a_component_larger_than_the_bound_is_refused_naming_where():
    p = np.zeros((1, 300, 300), np.float32)
    p[0, 20:250, 30:40] = 1  # a 230-px tall sliver
    with pytest.raises(InputError, match=r"10x230 px \(rows 20:250, cols 30:40\).*--max-object 100 px a side"):
        run(p, 128, InstanceOptions(max_side=100))


def test_boundary_class_separates_touching_cells():
    """A 3-class model (background, interior, boundary): touching cells
    separated by a line of boundary pixels are two objects, as the U-Net
    paper separates them; the boundary pixels join their nearer cell."""
    p = np.zeros((3, 64, 96), np.float32)
    p[0] = 1
    p[:, 10:50, 10:80] = np.array([0, 1, 0], np.float32)[:, None, None]
    p[:, 10:50, 44:46] = np.array([0, 0, 1], np.float32)[:, None, None]  # the wall between two cells
    lab, table = run(p, 32, InstanceOptions(boundary_class=2))
    assert lab.max() == 2 and np.array_equal(table["class"], [1, 1])
    assert (lab[10:50, 10:44] == 1).all() and (lab[10:50, 46:80] == 2).all()
    assert np.array_equal(lab, run(p, 96, InstanceOptions(boundary_class=2))[0])


@pytest.fixture(scope="module")
def small_tiff(tmp_path_factory) -> str:
    """560x480 RGB: a few hundred objects of the tiny model at threshold 0.6."""
    from conftest import textured_tiff

    path = tmp_path_factory.mktemp("instances") / "small.tif"
    textured_tiff(path, (480, 560), seed=1, periods=(37.0, 53.0), noise=30)
    return str(path)


def _instance_run(tmp_path, src, model, name, tile, halo, ext=".zarr", *extra):
    from conftest import cli

    out = tmp_path / f"{name}{ext}"
    r = cli("run", src, "--weights", model, "--instances", "--threshold", "0.6", "--tile", str(tile), "--halo",
            str(halo), "--batch-size", "1", "-o", str(out), *extra)
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def _zarr_labels(path) -> np.ndarray:
    return zarr.open_group(str(path), mode="r")["0"][:]


def test_run_equals_the_whole_image_run_at_any_tile_and_not_with_a_halo_one_short(tmp_path, small_tiff,
                                                                                tiny_model_dir):
    """End to end through the model (receptive radius 65 px): labels and the
    object table (centroids, mean probabilities) of tiled runs equal one
    window over the whole image; a halo of 64 px changes the table."""
    path = small_tiff
    whole, said = _instance_run(tmp_path, path, tiny_model_dir, "whole", 704, 72)
    ref, table = _zarr_labels(whole), (tmp_path / "whole.csv").read_bytes()
    assert ref.dtype == np.uint32 and ref.max() > 50 and f"objects: {ref.max():,}" in said
    for crop in (256, 304, 512):
        out, _ = _instance_run(tmp_path, path, tiny_model_dir, f"crop{crop}", crop + 144, 72)
        assert np.array_equal(_zarr_labels(out), ref), crop
        assert (tmp_path / f"crop{crop}.csv").read_bytes() == table, crop
    short, _ = _instance_run(tmp_path, path, tiny_model_dir, "short", 384, 64)
    assert (tmp_path / "short.csv").read_bytes() != table


@pytest.mark.slow
def test_instances_in_every_output_format(tmp_path, small_tiff, tiny_model_dir):
    """The same objects in an OME-TIFF (uint32, read by tifffile), GeoJSON
    (one feature per object, id = label, area and centroid = the table's)
    and, for a georeferenced input, a COG with its CRS (rasterio)."""
    import csv
    import json

    import rasterio
    import tifffile
    from shapely.geometry import shape

    from conftest import cli, data

    path = small_tiff
    ref = _zarr_labels(_instance_run(tmp_path, path, tiny_model_dir, "ref", 400, 72)[0])
    tif, _ = _instance_run(tmp_path, path, tiny_model_dir, "m", 400, 72, ".ome.tif")
    with tifffile.TiffFile(tif) as f:
        assert f.series[0].dtype == np.uint32 and np.array_equal(f.series[0].asarray(), ref)
        assert len(f.series[0].levels) > 1
    info = cli("info", str(tif))
    assert info.returncode == 0 and f"objects:    {ref.max():,}" in info.stdout and "median" in info.stdout
    gj, _ = _instance_run(tmp_path, path, tiny_model_dir, "p", 400, 72, ".geojson")
    features = json.loads(gj.read_text())["features"]
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert len(features) == len(rows) == ref.max()
    for f in features[:: max(1, len(features) // 25)]:
        i = f["id"]
        assert f["properties"]["area_px"] == int(rows[i - 1]["area_px"]) == int((ref == i).sum())
        assert shape(f["geometry"]).area == f["properties"]["area_px"]  # pixel corners: area = pixels
        assert abs(shape(f["geometry"]).centroid.x - f["properties"]["centroid_x_px"]) <= 5e-4 + 1e-9  # 3 decimals
    geo = data("rasterio/RGB.byte.tif")
    cog, _ = _instance_run(tmp_path, geo, tiny_model_dir, "geo", 400, 72, ".tif")
    with rasterio.open(cog) as ds, rasterio.open(geo) as src:
        assert ds.dtypes[0] == "uint32" and ds.crs == src.crs and ds.transform == src.transform
        lab = ds.read(1)
    rows = list(csv.DictReader(open(tmp_path / "geo.csv")))
    assert lab.max() == len(rows) and np.array_equal(np.bincount(lab.ravel())[1:], [int(r["area_px"]) for r in rows])
    assert float(rows[0]["area_m2"]) == pytest.approx(int(rows[0]["area_px"]) * 300.0 * 300.0, rel=1e-3)


def test_more_objects_than_ids_is_refused_not_wrapped(whole, monkeypatch):
    """uint32 ids run out at 2^32 - 1 objects: the count is checked before any
    id is given (here with the ceiling lowered to the scene's count minus one)."""
    import tilerseg.instances as inst

    p, truth, _ = whole
    monkeypatch.setattr(inst, "MAX_ID", truth - 1)
    with pytest.raises(InputError, match=f"{truth:,} objects do not fit uint32 labels"):
        run(p, 256)


def test_segment_api_gives_the_runs_labels(tmp_path, small_tiff, tiny_model_dir):
    """tilerseg.segment(..., instances=True) on an array: the labels the
    command line writes for the same image, model, halo and threshold."""
    import tifffile

    import tilerseg

    img = tifffile.imread(small_tiff)
    got = tilerseg.segment(img, tiny_model_dir, tile=400, halo=72, threshold=0.6, instances=True,
                           device="cpu", workdir=str(tmp_path / "work.zarr")).compute()
    ref = _zarr_labels(_instance_run(tmp_path, small_tiff, tiny_model_dir, "cli", 704, 72)[0])
    assert got.dtype == np.uint32 and np.array_equal(got, ref)


def test_object_scores_count_matches_merges_and_splits_by_hand():
    """The scorer on labels whose scores are known: one object right, one
    merged pair, one true object cut in two."""
    from tilerseg.train.metrics import object_scores

    truth = np.zeros((20, 40), np.int32)
    truth[2:8, 2:8], truth[10:16, 2:8], truth[10:16, 8:14], truth[2:8, 20:32] = 1, 2, 3, 4
    pred = np.zeros_like(truth)
    pred[2:8, 2:8] = 7  # right
    pred[10:16, 2:15] = 3  # 2 and 3 merged (IoU 36/78 with each: no match)
    pred[2:8, 20:26], pred[2:8, 26:32] = 1, 2  # 4 split in halves (IoU 0.5 each: one matches)
    s = object_scores(truth, pred)
    assert (s["true"], s["predicted"], s["merges"], s["splits"]) == (4, 4, 1, 1)
    assert s["matched"] == 2 and s["f1"] == 2 * 2 / 8 and s["count_error"] == 0.0
    assert object_scores(truth, truth)["f1"] == 1.0


@pytest.fixture(scope="module")
def dense():
    """768^2 of dense, touching, overlapping nuclei (radii 6-30 px) with their
    true instances, and P(foreground) = the true foreground."""
    from tilerseg.synthetic import dense_nuclei

    _, truth = dense_nuclei((768, 768), seed=1)
    return (truth > 0).astype(np.float32)[None], truth


def test_dense_touching_nuclei_are_split_as_the_targets_ask(dense):
    """F1 at IoU 0.5 >= 0.90 and the count within 5% of the truth, where the
    fixed h-maxima depth of 1.5 px (the split before) scores F1 0.76 (it
    merges some and splits others)."""
    from tilerseg.train.metrics import object_scores

    p, truth = dense
    got = object_scores(truth, run(p, 768)[0])
    assert got["f1"] >= 0.90 and abs(got["count_error"]) <= 0.05, got
    before = object_scores(truth, run(p, 768, InstanceOptions(depth=1.5))[0])
    assert before["f1"] < 0.80, before


@pytest.mark.parametrize("chunk", [128, 256, 300])
def test_dense_nuclei_labels_and_table_equal_the_whole_image_run(dense, chunk):
    """Clusters straddle the corners of 256-px blocks: the labels and the
    table are the whole-image run's at other tilings too (each crossing
    component split once, painted into every block it touches)."""
    p, _ = dense
    ref, ref_table = run(p, 768)
    got, table = run(p, chunk)
    assert np.array_equal(got, ref)
    for k in ("id", "area", "row", "col", "probability", "top", "bottom"):
        assert np.array_equal(table[k], ref_table[k]), k


@pytest.mark.slow
def test_geojson_is_the_same_bytes_at_every_tiling(tmp_path, small_tiff, tiny_model_dir):
    """Features in id order, each ring from a canonical vertex: the GeoJSON
    of tiled runs is byte for byte the whole-image run's, as the labels and
    the CSV are."""
    import json

    whole, _ = _instance_run(tmp_path, small_tiff, tiny_model_dir, "whole", 704, 72, ".geojson")
    ref = whole.read_bytes()
    ids = [f["id"] for f in json.loads(ref)["features"]]
    assert len(ids) > 50 and ids == list(range(1, len(ids) + 1))
    for crop in (256, 304):
        out, _ = _instance_run(tmp_path, small_tiff, tiny_model_dir, f"crop{crop}", crop + 144, 72, ".geojson")
        assert out.read_bytes() == ref, crop
