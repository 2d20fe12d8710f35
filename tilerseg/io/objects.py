"""The object table of an instance run (``--instances``): one row per object.

The rows come from :func:`tilerseg.instances.label` (numpy columns in id
order); this module gives them units and writes them: the ``.csv`` beside
the output, the properties of each polygon, and the per-class summary that
the output's own metadata carries (``tilerseg info`` prints it)."""
from __future__ import annotations

import csv

import numpy as np

from .base import ImageMeta


def area_unit(meta: ImageMeta) -> tuple[str | None, float | None]:
    """The area unit of one pixel and its size in it: ``µm²`` from mpp,
    ``m²`` from a CRS in metres (else the CRS's own units), or none."""
    from .pyramid import physical_pixel

    if meta.mpp:
        return "um2", meta.mpp ** 2
    if meta.transform is not None and meta.georeferenced:
        a, b, _, d, e, _ = meta.transform
        unit = physical_pixel(meta)[1]
        return ("m2" if unit == "meter" else "map_units2"), abs(a * e - b * d)
    return None, None


def centres(meta: ImageMeta, row: np.ndarray, col: np.ndarray):
    """Physical ``(x, y, unit)`` of pixel-index centroids: µm from the image
    origin (mpp), or the CRS's coordinates (``transform * (col + 0.5, row + 0.5)``,
    as rasterio gives a pixel's centre); None where neither is known."""
    if meta.mpp:
        return (col + 0.5) * meta.mpp, (row + 0.5) * meta.mpp, "um"
    if meta.transform is not None and meta.georeferenced:
        a, b, c, d, e, f = (float(v) for v in meta.transform[:6])
        x, y = col + 0.5, row + 0.5
        return a * x + b * y + c, d * x + e * y + f, "crs"
    return None


def class_name(k: int, class_names) -> str:
    return str(class_names[k]) if k < len(class_names) else f"class {k}"


def decimals(size: float | None) -> int:
    """Decimals that keep a tenth of ``size`` (a pixel's side or area in
    its unit): what a pixel means, not float noise (0.5 µm/px: 0.01 µm)."""
    import math

    if not size or not math.isfinite(size):
        return 6
    return max(0, math.ceil(-math.log10(abs(size) / 10)))


def rows(table: dict, class_names, meta: ImageMeta):
    """One dict per object, in id order: id, class, name, area (px and the
    physical unit), centroid (px and physical), mean probability."""
    unit, per_px = area_unit(meta)
    phys = centres(meta, table["row"], table["col"])
    side = meta.mpp or (abs(float(meta.transform[0])) if meta.transform is not None else None)
    at, aa = decimals(side), decimals(per_px)
    for i in range(len(table["id"])):
        k = int(table["class"][i])
        row = {"id": int(table["id"][i]), "class": k, "name": class_name(k, class_names),
               "area_px": int(table["area"][i])}
        if unit:
            row[f"area_{unit}"] = round(float(table["area"][i] * per_px), aa)
        row["centroid_x_px"] = round(float(table["col"][i]) + 0.5, 3)  # pixel-corner coordinates, as polygons
        row["centroid_y_px"] = round(float(table["row"][i]) + 0.5, 3)
        if phys is not None:
            row[f"centroid_x_{phys[2]}"] = round(float(phys[0][i]), at)
            row[f"centroid_y_{phys[2]}"] = round(float(phys[1][i]), at)
        row["mean_probability"] = round(float(table["probability"][i]), 6)
        yield row


def write_csv(table: dict, path: str, class_names, meta: ImageMeta) -> int:
    """The object table as CSV (what spreadsheets, pandas and QGIS read)."""
    n = 0
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = None
        for n, row in enumerate(rows(table, class_names, meta), 1):
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
        if writer is None:
            f.write("id,class,name,area_px,centroid_x_px,centroid_y_px,mean_probability\n")
    return n


def summary(table: dict, class_names, meta: ImageMeta) -> dict:
    """Objects per class and their median area, for the output's metadata."""
    unit, per_px = area_unit(meta)
    out = []
    for k in np.unique(table["class"]):
        area = table["area"][table["class"] == k]
        item = {"class": int(k), "name": class_name(int(k), class_names), "count": int(len(area)),
                "median_area_px": float(np.median(area))}
        if unit:
            item[f"median_area_{unit}"] = float(np.median(area) * per_px)
        out.append(item)
    return {"count": int(len(table["id"])), "per_class": out}
