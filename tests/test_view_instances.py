"""tilerseg view of ``run --instances`` outputs (OME-TIFF, zarr, plain TIFF
of uint32 object ids): every object in one colour of its own at every level,
touching objects told apart, nothing where there is none, its id under the
cursor and its row of the object table on request. The oracle: the ids as
tifffile/zarr read them and the .csv as the csv module reads it."""
import csv
import io

import numpy as np
import pytest

pytest.importorskip("starlette")
from starlette.testclient import TestClient  # noqa: E402

import viewdata  # noqa: E402
from tilerseg.view import open_view  # noqa: E402
from tilerseg.view.app import create_app  # noqa: E402

pytestmark = pytest.mark.xdist_group("view")
PORT = 8766


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("viewinst")
    s = viewdata.slide_set(root)
    return s, viewdata.instance_set(root, s)


def _ids(path) -> list[np.ndarray]:
    if path.endswith(".zarr"):
        import zarr

        g = zarr.open_group(path, mode="r")
        return [np.asarray(g[d["path"]][:]) for d in g.attrs["ome"]["multiscales"][0]["datasets"]]
    import tifffile

    with tifffile.TiffFile(path) as tif:
        return [lvl.asarray() for lvl in tif.series[0].levels]


def _level(c, layer, dz, shape):
    from PIL import Image

    h, w = shape
    out = np.zeros((h, w, 4), np.uint8)
    for row in range(-(-h // 256)):
        for col in range(-(-w // 256)):
            r = c.get(f"/tiles/{layer}/{dz}/{col}_{row}")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", r.text
            t = np.asarray(Image.open(io.BytesIO(r.content)).convert("RGBA"))
            out[row * 256:row * 256 + t.shape[0], col * 256:col * 256 + t.shape[1]] = t
    return out


@pytest.mark.parametrize("which", ["ome", "zarr", "tif"])
def test_instance_labels_are_objects_a_colour_per_id_at_every_level(files, which):
    s, inst = files
    view = open_view([s["image"], inst[which]])  # a .tif/.ome.tif of ids was refused as "not a segmentation"
    levels = _ids(inst[which])
    assert levels[0].dtype == np.uint32 and levels[0].max() > 100
    colour_of = {}
    with TestClient(create_app(view, port=PORT), base_url=f"http://127.0.0.1:{PORT}") as c:
        info = c.get("/api/info").json()["layers"][0]
        assert info["kind"] == "instances" and info["objects"]["count"] == levels[0].max()
        top = view.layers[0].max_level
        for k, ids in enumerate(levels):
            # the file's own levels: every other id (a mean of uint32 ids in uint32 was 0: blank when zoomed out)
            assert np.array_equal(ids, levels[0][::2 ** k, ::2 ** k]), k
            got = _level(c, 1, top - k, ids.shape)
            assert np.array_equal(got[..., 3] == 255, ids != 0), k  # nothing drawn where there is no object
            fg = ids != 0
            rgb = got[..., :3][fg].astype(np.int64)
            code = rgb[:, 0] << 16 | rgb[:, 1] << 8 | rgb[:, 2]
            for oid, col in zip(ids[fg][::7], code[::7]):  # one colour per id, the same in every tile and level
                assert colour_of.setdefault(int(oid), int(col)) == int(col), (k, oid)
            if k == 0:  # touching objects are told apart
                a, b = ids[:, :-1], ids[:, 1:]
                edge = (a != b) & (a != 0) & (b != 0)
                assert edge.any()
                ca, cb = got[:, :-1, :3][edge].astype(int), got[:, 1:, :3][edge].astype(int)
                assert (np.abs(ca - cb).max(axis=1) >= 20).all()
    assert len(set(colour_of.values())) >= 0.95 * len(colour_of)
    view.close()


def test_the_id_under_the_cursor_and_the_objects_row_of_the_table(files):
    s, inst = files
    view = open_view([s["image"], inst["ome"], inst["zarr"]])
    ids = _ids(inst["ome"])[0]
    with open(inst["ome"][:-len(".ome.tif")] + ".csv", newline="") as f:
        rows = list(csv.DictReader(f))
    with TestClient(create_app(view, port=PORT), base_url=f"http://127.0.0.1:{PORT}") as c:
        ys, xs = np.nonzero(ids)
        for j in np.linspace(0, len(ys) - 1, 12).astype(int):
            x, y = int(xs[j]), int(ys[j])
            d = c.get("/api/point", params={"x": x + 0.5, "y": y + 0.5}).json()
            by = {v["layer"]: v for v in d["layers"]}
            assert by[1]["object"] == by[2]["object"] == int(ids[y, x])
            row = c.get(f"/api/object/1/{ids[y, x]}").json()
            want = rows[int(ids[y, x]) - 1]
            assert {k: str(v) for k, v in row.items()} == want or \
                all(float(row[k]) == pytest.approx(float(v)) if k not in ("name",) else row[k] == v
                    for k, v in want.items())
        y0, x0 = np.argwhere(ids == 0)[0]
        d = c.get("/api/point", params={"x": x0 + 0.5, "y": y0 + 0.5}).json()
        assert d["layers"][1]["object"] == 0
        assert c.get(f"/api/object/1/{len(rows) + 1}").status_code == 404
        assert c.get("/api/object/1/0").status_code == 404
        assert c.get("/api/object/0/1").status_code == 404  # the image has no objects
    view.close()


def test_an_instance_zarr_that_declares_a_channel_axis_it_lacks_still_opens(files, tmp_path):
    """Instance zarrs written before the fix name axes (c, y, x) over 2-D
    arrays: they opened with an IndexError; their level 0 is served."""
    import shutil

    import zarr

    s, inst = files
    old = str(tmp_path / "old.zarr")
    shutil.copytree(inst["zarr"], old)
    g = zarr.open_group(old, mode="r+")
    ome = dict(g.attrs["ome"])
    ms = dict(ome["multiscales"][0])
    ms["axes"] = [{"name": "c", "type": "channel"}] + [a for a in ms["axes"] if a["name"] != "c"]
    ome["multiscales"] = [ms]
    g.attrs.update(ome=ome)
    view = open_view([s["image"], old])
    try:
        ids = _ids(inst["zarr"])[0]
        with TestClient(create_app(view, port=PORT), base_url=f"http://127.0.0.1:{PORT}") as c:
            got = _level(c, 1, view.layers[0].max_level, ids.shape)
            assert np.array_equal(got[..., 3] == 255, ids != 0)
    finally:
        view.close()
