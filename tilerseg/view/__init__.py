"""``tilerseg view``: the image and its segmentation in a browser.

A thin web layer over what ``run`` wrote: an ASGI app (:mod:`.app`) serves
one bundled page (OpenSeadragon, canvas drawer), tiles cut from the pyramid
levels already in the files through :mod:`tilerseg.io`'s readers
(:mod:`.layers`), values under the cursor, and polygons per view from a
spatial index (:mod:`.vectors`). Nothing below this package imports it.
Every argument is checked here, before a server starts, and refused in one
line: a missing file, a TIFF that is not a segmentation, an output on
another grid than the image."""
from __future__ import annotations

import logging
import math
import os
import time

from ..errors import InputError
from .layers import RasterLayer, output_kind

VECTOR_EXT = (".geojson", ".json", ".gpkg")
log = logging.getLogger(__name__)


class View:
    """The image and the outputs over it, opened and checked."""

    def __init__(self, image: RasterLayer, layers: list):
        self.image, self.layers = image, layers
        self._to_wgs84 = None

    def info(self) -> dict:
        m = self.image.meta
        unit, size = scale_of(m)
        t = list(m.transform) if m.transform is not None and m.georeferenced else None
        from ..io.pyramid import PALETTE

        return {"image": self.image.info(), "layers": [layer.info() for layer in self.layers],
                "unit": unit, "pixelSize": size, "transform": t, "mpp": m.mpp, "crs": crs_of(m),
                "palette": ["#%02x%02x%02x" % tuple(int(v) for v in c) for c in PALETTE]}

    def lonlat(self, x: float, y: float) -> dict:
        """``{"lonlat": [lon, lat]}`` of map coordinate ``(x, y)`` of a
        georeferenced image whose CRS is not WGS 84 already, else ``{}``."""
        m = self.image.meta
        if not m.crs:
            return {}
        if self._to_wgs84 is None:
            from rasterio.crs import CRS

            crs = CRS.from_user_input(m.crs)
            self._to_wgs84 = (crs,) if not crs.is_geographic else ()
        if not self._to_wgs84:
            return {}
        from rasterio.warp import transform

        try:
            xs, ys = transform(self._to_wgs84[0], "EPSG:4326", [x], [y])
        except Exception:  # a CRS that PROJ cannot invert here: the map units alone
            return {}
        lon, lat = float(xs[0]), float(ys[0])
        return {"lonlat": [lon, lat]} if math.isfinite(lon) and math.isfinite(lat) else {}

    def close(self) -> None:
        for layer in [self.image, *self.layers]:
            layer.close()


def crs_of(meta) -> dict | None:
    """The image's CRS for the panel: its EPSG code where it has one, and its name."""
    if not meta.crs or not meta.georeferenced:
        return None
    try:
        from rasterio.crs import CRS

        crs = CRS.from_user_input(meta.crs)
        epsg = crs.to_epsg()
        name = crs.to_dict().get("proj") if epsg is None else None
        wkt = crs.to_wkt()
        title = wkt.split('"')[1] if '"' in wkt else (name or "custom")
        return {"epsg": epsg, "name": title}
    except Exception:  # a CRS PROJ cannot read here: say so, the rest of the panel stands
        return {"epsg": None, "name": "unreadable CRS"}


def scale_of(meta) -> tuple[str, float]:
    """The scale bar's unit and level-0 pixel size in it: µm from mpp, the
    CRS's metres, other map units, or pixels."""
    from ..io.pyramid import physical_pixel

    if meta.mpp:
        return "µm", float(meta.mpp)
    size, unit = physical_pixel(meta)
    if size is None:
        return "px", 1.0
    return ("m" if unit == "meter" else "map units"), float(size[1])


def open_view(paths: list[str]) -> View:
    """Open ``IMAGE [OUTPUT ...]`` or ``OUTPUT ...`` (the image found from
    the first output's record). Raises :class:`InputError` with one line."""
    if not paths:
        raise InputError("give an image and/or outputs: tilerseg view IMAGE [OUTPUT ...]")
    for p in paths:
        if not os.path.exists(p):
            raise InputError(f"{p}: no such file or directory; check the path")
    records = [None if _is_vector(p) else output_kind(p) for p in paths]
    for p, rec in zip(paths, records):
        if "spacing" in (rec or {}):
            raise InputError(f"{p}: a 3-D volume; tilerseg view shows 2-D images and their outputs")
    if _is_vector(paths[0]) or records[0]:
        image_path = _recorded_input(paths[0], records[0])
        outputs = list(zip(paths, records))
    else:
        image_path, outputs = paths[0], list(zip(paths[1:], records[1:]))
    image = RasterLayer(image_path, "image")
    layers = []
    try:
        for p, rec in outputs:
            if _is_vector(p):
                from .vectors import VectorLayer

                t0 = time.perf_counter()
                log.info("%s: reading its polygons", p)
                layers.append(VectorLayer(p, image.meta, image.shape))
                log.info("%s: %d polygons indexed in %.1f s", p, layers[-1].count, time.perf_counter() - t0)
                if layers[-1].skipped:
                    log.warning("%s: skipped %d features that are not drawable polygons (%s)", p,
                                sum(layers[-1].skipped.values()),
                                ", ".join(f"{n} {why}" for why, n in sorted(layers[-1].skipped.items())))
                continue
            if not rec:
                raise InputError(f"{p}: not a segmentation written by tilerseg (no tilerseg record in it); give the "
                                 "image first and its outputs after it: tilerseg view IMAGE OUTPUT ...")
            layer = RasterLayer(p, rec["kind"], rec)
            layers.append(layer)
            _check_source(image, p, rec)
            _check_grid(image, layer)
    except Exception:
        for layer in [image, *layers]:
            layer.close()
        raise
    return View(image, layers)


def _is_vector(path: str) -> bool:
    return path.lower().endswith(VECTOR_EXT)


def _recorded_input(path: str, record: dict | None) -> str:
    """The input an output records (as given to ``run``: tried from here,
    then next to the output), or a one-line refusal."""
    src = (record or {}).get("source")
    if not src:
        raise InputError(f"{path}: records no input image; give it first: tilerseg view IMAGE {path}")
    here = os.path.dirname(os.path.abspath(path))
    for cand in (src, os.path.join(here, src), os.path.join(here, os.path.basename(src))):
        if os.path.exists(cand):
            return cand
    raise InputError(f"{path}: its input {src} is not there any more; give it first: tilerseg view IMAGE {path}")


def _check_source(image: RasterLayer, path: str, record: dict) -> None:
    """Refuse an output whose record names another input than ``image``
    (:func:`tilerseg.info.other_source`); outputs written before records
    kept ``source_id`` are checked by their grid alone."""
    from ..info import other_source

    why = other_source(record.get("source_id"), image.path, image.meta)
    if why:
        raise InputError(f"{path}: {why}: give the image it was made from, or rerun: tilerseg run "
                         f"{image.path} ... -o {path}")


def _check_grid(image: RasterLayer, layer: RasterLayer) -> None:
    """An output lies on the image's grid, at full resolution or at one of
    its levels (``run --level``/``--mpp``): its size must be one of those."""
    H, W = image.shape
    h, w = layer.shape
    sizes = {tuple(s) for s in image.levels} | {(-(-H // 2 ** j), -(-W // 2 ** j)) for j in range(20)}
    ok = (h, w) in sizes
    mi, mo = image.meta, layer.meta
    if ok and mi.georeferenced and mo.transform is not None and mo.georeferenced:
        f = W / w
        ok = math.isclose(mi.transform[2], mo.transform[2], abs_tol=abs(mi.transform[0]) * f) and \
            math.isclose(mi.transform[5], mo.transform[5], abs_tol=abs(mi.transform[4]) * f)
    if not ok:
        raise InputError(f"{layer.path}: {w}x{h} px does not lie on the grid of {image.path} ({W}x{H} px, or a "
                         "level of it): it was made from another image")
