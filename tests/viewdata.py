"""Small images and the outputs the viewer shows over them, written by the
real writer (no model): a synthetic slide with nuclei (class 1) on tissue
(class 2), labels as OME-TIFF, zarr and plain TIFF, probabilities as float
zarr and uint8 OME-TIFF, polygons as GeoJSON; and a GeoTIFF with its COG
mask and WGS 84 GeoJSON. The label arrays are returned as the oracle's
source, but tests compare tiles with what tifffile/zarr/rasterio read."""
from __future__ import annotations

import os

import numpy as np

NAMES = ("background", "nucleus", "tissue")
SHAPE = (1100, 1300)  # odd level sizes: 550x650, 275x325, then 138x163 (coarser than the file's levels)


def slide_labels(shape, seed: int = 0) -> np.ndarray:
    from tilerseg import synthetic

    H, W = shape
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    lab = np.where(synthetic.tissue(yy, xx, seed), 2, 0).astype(np.uint8)
    lab[synthetic.tile(0, 0, H, W, seed)[1]] = 1
    lab[:20, :300] = 255  # a nodata band
    return lab


def probability(lab: np.ndarray) -> np.ndarray:
    """P(nucleus): a smooth field, high on nuclei, NaN where the labels are nodata."""
    H, W = lab.shape
    yy, xx = np.mgrid[0:H, 0:W]
    p = 0.1 + 0.3 * (0.5 + 0.5 * np.sin(yy / 53.0) * np.cos(xx / 41.0)) + 0.55 * (lab == 1)
    p = p.astype(np.float32)
    p[lab == 255] = np.nan
    return p[None]


def write(path, arr, meta, *, probabilities=False, classes=3, names=NAMES, source="", dtype="float32",
          target=None):
    import dask.array as da

    from tilerseg.engine import compute_into
    from tilerseg.io.writers import OutputInfo, Writer

    a = da.from_array(arr, chunks=(arr.shape[0], 512, 512) if arr.ndim == 3 else (512, 512))
    info = OutputInfo(meta=meta, probabilities=probabilities, classes=classes, class_names=names, source=source,
                      probability_dtype=dtype, target=target)
    with Writer(str(path), probabilities=dtype if probabilities and dtype == "uint8" else probabilities) as w:
        w.write(a, lambda x, z, marks: compute_into(x, z, workers=2), info)
    return str(path)


def slide_set(root) -> dict:
    """The slide and its outputs in folder ``root``."""
    from tilerseg import synthetic
    from tilerseg.io import open_reader

    root = str(root)
    img = os.path.join(root, "slide.tif")
    synthetic.write_tiff(img, SHAPE, levels=3, compression="zlib", mpp=0.5)
    with open_reader(img) as r:
        meta = r.meta
    lab = slide_labels(SHAPE)
    p = probability(lab)
    out = {"image": img, "labels": lab, "prob": p, "meta": meta}
    out["ome"] = write(os.path.join(root, "mask.ome.tif"), lab, meta, source="slide.tif")
    out["zarr"] = write(os.path.join(root, "mask.zarr"), lab, meta, source=img)
    out["pzarr"] = write(os.path.join(root, "prob.zarr"), p, meta, probabilities=True, classes=1,
                         names=("background", "nucleus"), source=img)
    out["p8"] = write(os.path.join(root, "prob8.ome.tif"), p, meta, probabilities=True, classes=1,
                      names=("background", "nucleus"), source=img, dtype="uint8")
    out["geojson"] = write(os.path.join(root, "objects.geojson"), lab, meta, source=img)
    return out


def geo_set(root, src: str) -> dict:
    """A GeoTIFF (``src``), its COG mask and its GeoJSON (WGS 84)."""
    from tilerseg.io import open_reader

    with open_reader(src) as r:
        meta = r.meta
        img = r.read((0, meta.shape[0]), (0, meta.shape[1]))[0]
    coarse = img[::16, ::16].astype(np.float32)  # blocks of 16 px: a few hundred polygons, not thousands of specks
    lab = ((coarse.mean(axis=-1) > 60).astype(np.uint8) + (coarse[..., 0] > 120)).repeat(16, 0).repeat(16, 1)
    lab = np.ascontiguousarray(lab[:meta.shape[0], :meta.shape[1]])
    root = str(root)
    return {"image": src, "labels": lab, "meta": meta,
            "cog": write(os.path.join(root, "geo.tif"), lab, meta, source=src),
            "geojson": write(os.path.join(root, "geo.geojson"), lab, meta, source=src),
            "gpkg": write(os.path.join(root, "geo.gpkg"), lab, meta, source=src)}


def serve(paths, host: str = "127.0.0.1"):
    """Serve ``tilerseg view PATHS`` on a free port of ``host`` in a thread
    (the real uvicorn server ``tilerseg view`` runs); yields the URL."""
    import threading
    import time

    import uvicorn

    from tilerseg.view import open_view
    from tilerseg.view.app import create_app
    from tilerseg.view.server import bind, url_of

    view = open_view(paths)
    sock = bind(host, 0)
    app = create_app(view, host=host, port=sock.getsockname()[1])
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    t = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield url_of(sock, host)
    finally:
        srv.should_exit = True
        t.join(10)
        sock.close()
        view.close()


def instance_set(root, s: dict) -> dict:
    """Instance outputs of slide set ``s`` (objects of its P(nucleus), by
    tilerseg's own instance pass and writer): OME-TIFF, zarr and plain TIFF,
    each with its object table (.csv) beside it."""
    import dask.array as da

    from tilerseg.engine import compute_into
    from tilerseg.instances import InstanceOptions, label
    from tilerseg.io.writers import OutputInfo, Writer

    out = {}
    for key, name in (("ome", "objs_a.ome.tif"), ("zarr", "objs_b.zarr"), ("tif", "objs_c.tif")):
        path = os.path.join(str(root), name)
        info = OutputInfo(meta=s["meta"], probabilities=True, classes=1, class_names=("background", "nucleus"),
                          source=s["image"], instances=True)
        with Writer(path, probabilities=True, instances=True) as w:
            w.write(da.from_array(s["prob"], chunks=(1, 512, 512)), lambda x, z, marks: compute_into(x, z, workers=2),
                    info, post=lambda p, lab, imap: label(p, lab, InstanceOptions(), imap=imap))
        out[key] = path
    return out
