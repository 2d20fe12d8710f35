"""``tilerseg info``: what a reader sees in a file, as text."""
from __future__ import annotations

import os
import warnings

import numpy as np

from .io import open_reader
from .io.base import LABEL_NODATA
from .io.remote import display


def _crs_name(wkt: str | None) -> str:
    if not wkt:
        return "none"
    try:
        from rasterio.crs import CRS

        crs = CRS.from_wkt(wkt)
        epsg = crs.to_epsg()
        return f"EPSG:{epsg}" if epsg else crs.to_string()
    except Exception:
        return wkt[:60] + "..."


def _pixel_line(m) -> str:
    """The pixel size of an image without mpp: in its CRS's units when
    georeferenced (``30 x 30 m``), else unknown and why."""
    if m.transform is not None and m.georeferenced:
        from .io.pyramid import physical_pixel

        a, b, _, d, e, _ = m.transform
        unit = {"meter": "m", "degree": "°"}.get(physical_pixel(m)[1], physical_pixel(m)[1] or "map units")
        sx, sy = float(np.hypot(a, d)), float(np.hypot(b, e))
        return f"pixel:      {sx:.6g} x {sy:.6g} {unit} (in {_crs_name(m.crs)}; no µm/px: a map, not a slide)"
    return "mpp:        unknown" + (f" ({m.unknown_mpp})" if m.unknown_mpp else "")


def describe_input(path, *, level=None, mpp=None, bands=None, reader: str = "auto",
                   force_resample: bool = False, missing_chunks: str = "refuse") -> str:
    """Size, levels, mpp, CRS, bands, dtype and nodata of ``path``."""
    with open_reader(path, level=level, mpp=mpp, bands=tuple(bands) if bands else None, reader=reader,
                     force_resample=force_resample, missing_chunks=missing_chunks) as r:
        m = r.meta
        H, W = m.shape
        lines = [f"file:       {display(os.fspath(path))}", f"format:     {m.format}",
                 f"size:       {W} x {H} px (width x height), level {m.level}",
                 f"bands:      {m.bands}" + (f" ({', '.join(m.band_names)})" if m.band_names else ""),
                 f"dtype:      {m.dtype}",
                 f"mpp:        {m.mpp:.4g} µm/px" if m.mpp else _pixel_line(m),
                 f"crs:        {_crs_name(m.crs)}"]
        if m.transform is not None and m.georeferenced:
            a, b, c, d, e, f = m.transform
            lines.append(f"transform:  pixel {a:g} x {e:g}, origin ({full(c)}, {full(f)})" + (", rotated" if b or d else ""))
        lines.append(f"nodata:     {m.nodata if m.nodata is not None else 'none'}")
        if len(m.levels) > 1:
            lines.append(f"levels:     {len(m.levels)}")
            for k, (h, w) in enumerate(m.levels):
                lm = m.level_mpp[k] if k < len(m.level_mpp) and m.level_mpp[k] else None
                lines.append(f"  {k}: {w} x {h}" + (f"  {lm:.4g} µm/px" if lm else ""))
        if m.note:
            lines.append(f"note:       {m.note}")
    lines += _class_area_lines(path)
    return "\n".join(lines)


def _label_output(path: str):
    """``(class_names, strips)`` when ``path`` is a tilerseg label mask (zarr
    attributes, GeoTIFF tag or TIFF description), else None; ``strips()``
    yields the mask in bands of rows."""
    import json
    import os

    from .io.arrays import is_zarr

    if is_zarr(path):
        from .io.arrays import open_output

        node, attrs = open_output(path)

        def strips():
            for y in range(0, node.shape[0], 1024):
                yield np.asarray(node[y:y + 1024])
    elif os.path.splitext(path)[1].lower() in (".tif", ".tiff"):
        import rasterio
        from rasterio.windows import Window

        with warnings.catch_warnings():  # a plain TIFF output has no georeference: expected
            warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
            with rasterio.open(path) as ds:
                tags = ds.tags()
        attrs = tiff_kind(tags.get("TILERSEG") or tags.get("TIFFTAG_IMAGEDESCRIPTION", ""))

        def strips():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
                ds = rasterio.open(path)
            with ds:
                for y in range(0, ds.height, 1024):
                    yield ds.read(1, window=Window(0, y, ds.width, min(1024, ds.height - y)))
    else:
        return None
    if attrs.get("kind") == "instances":
        return attrs, None
    if attrs.get("kind") != "labels":
        return None
    return attrs.get("class_names") or [], strips


def _object_lines(kind: dict) -> list[str]:
    """An instance output's objects per class and median area, from the
    summary its metadata carries (written with the object table)."""
    summary = kind.get("objects") or {}
    lines = [f"objects:    {summary.get('count', 0):,} (uint32 ids, 0 = none; the table: the .csv beside it)"]
    items = summary.get("per_class", [])
    unit = next((u for u in ("um2", "m2") if items and all(f"median_area_{u}" in i for i in items)), None)
    areas = area_column([i[f"median_area_{unit}"] for i in items], "µm²" if unit == "um2" else "m²") if unit \
        else [None] * len(items)
    for item, area in zip(items, areas):
        lines.append(f"  {item['class']:>3} {item['name']:<14} {item['count']:>10,d} objects, median "
                     f"{item['median_area_px']:g} px" + (f", median {area}" if area else ""))
    return lines


def tiff_kind(text: str) -> dict:
    """tilerseg's JSON from a GDAL tag, a TIFF description, or the
    description of an OME-XML image."""
    import json

    text = text.strip()
    if text.startswith("<"):
        try:
            import tifffile

            image = tifffile.xml2dict(text)["OME"]["Image"]
            text = (image[0] if isinstance(image, list) else image).get("Description", "")
        except Exception:
            return {}
    try:
        attrs = json.loads(text) if text.startswith("{") else {}
    except ValueError:
        return {}
    return attrs.get("tilerseg", attrs)


_AREA_UNITS = {"µm²": ((1e8, "cm²"), (1e6, "mm²"), (1, "µm²")),
               "m²": ((1e6, "km²"), (1e4, "ha"), (1, "m²"))}


def area_column(values, unit: str) -> list[str]:
    """``values`` (in ``unit``) as one table column: every row in the unit
    :func:`readable_area` picks for the largest, so a column never mixes
    ``2.22 mm²`` and ``141,302 µm²``."""
    values = [float(v) for v in values]
    top = max(values, default=0.0)
    factor, name = next(((f, n) for f, n in _AREA_UNITS.get(unit, ((1, unit),)) if top >= f or f == 1),
                        (1, unit))
    def text(x: float) -> str:  # three significant figures, never in e-notation
        return f"{x:,.0f}" if x >= 1000 else np.format_float_positional(x, precision=3, unique=False,
                                                                         fractional=False, trim="-")
    return [f"{text(v / factor)} {name}" for v in values]


def full(value: float) -> str:
    """A coordinate in full (``101985``, ``2826915``), never ``2.82692e+06``."""
    return np.format_float_positional(float(value), trim="-")


def readable_area(value: float, unit: str) -> str:
    """``value`` (in ``unit``: µm² or m²) in the largest unit that keeps it at
    least 1, with three significant figures: ``3.22 mm²``, ``41.7 ha``."""
    for factor, name in _AREA_UNITS.get(unit, ((1, unit),)):
        if value >= factor or factor == 1:
            return f"{value / factor:,.3g} {name}" if value / factor < 1000 else f"{value / factor:,.0f} {name}"
    return f"{value:.3g} {unit}"


def _class_area_lines(path) -> list[str]:
    """Per-class pixel counts and areas of a label mask, counted in strips."""
    found = _label_output(str(path))
    if found is None:
        return []
    names, strips = found
    if strips is None:
        return _object_lines(names)
    counts = np.zeros(256, np.int64)
    for strip in strips():
        counts += np.bincount(strip.ravel(), minlength=256)
    with open_reader(path) as r:
        m = r.meta
    unit, per_px = None, None
    if m.mpp:
        unit, per_px = "µm²", m.mpp ** 2
    elif m.transform is not None and m.georeferenced:
        a, b, _, d, e, _ = m.transform
        from .io.pyramid import physical_pixel

        unit = "m²" if physical_pixel(m)[1] == "meter" else "map units²"
        per_px = abs(a * e - b * d)
    valid = counts[:LABEL_NODATA].sum()
    lines = ["classes:"]
    present = np.flatnonzero(counts)
    areas = area_column(counts[present] * per_px, unit) if per_px else [""] * len(present)
    for k, area in zip(present, areas):
        label = "nodata" if k == LABEL_NODATA else (names[k] if k < len(names) else f"class {k}")
        share = f"{counts[k] / valid:7.2%} of valid" if k != LABEL_NODATA and valid else ""
        lines.append(f"  {k:>3} {label:<14} {counts[k]:>12d} px  {share}" + (f"  {area}" if area else ""))
    return lines


def output_kind(path: str) -> dict:
    """tilerseg's record of what an output holds (``kind``, classes, names,
    source...), or ``{}`` when ``path`` is not one."""
    from .io.arrays import is_zarr

    if is_zarr(path):
        import zarr

        try:
            return dict(zarr.open(path, mode="r").attrs.get("tilerseg", {}))
        except Exception:
            return {}
    if os.path.splitext(path)[1].lower() not in (".tif", ".tiff"):
        return {}
    import rasterio


    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with rasterio.open(path) as ds:
                tags = ds.tags()
    except Exception:
        return {}
    kind = tiff_kind(tags.get("TILERSEG") or tags.get("TIFFTAG_IMAGEDESCRIPTION", ""))
    return kind if kind.get("kind") in ("labels", "probabilities", "instances") else {}


def input_identity(path, meta) -> dict | None:
    """Which image an output is made from, as its record keeps it
    (``source_id``): the input's level-0 rows and columns, its bytes and a
    hash of its first 64 KiB (a URL: the server's size and ETag). A viewer
    or a training refuses to lay the output on another image, even one a
    level of which has the output's size; a path alone would not tell
    (files move). The key is not ``shape``: tifffile takes an image
    description holding ``"shape":`` for its own shaped-series JSON."""
    import hashlib

    from .io.remote import fingerprint, is_url

    if not isinstance(path, (str, os.PathLike)):
        return None
    path = os.fspath(path)
    out = {"rows_cols": [int(v) for v in (meta.levels[0] if meta.levels else meta.shape[:2])]}
    if is_url(path):
        _, out["bytes"], out["etag"] = fingerprint(path)
    elif os.path.isfile(path):
        with open(path, "rb") as f:
            out["head"] = hashlib.sha256(f.read(1 << 16)).hexdigest()[:16]
        out["bytes"] = os.path.getsize(path)
    return out


def other_source(recorded: dict | None, path, meta) -> str | None:
    """How the image at ``path`` differs from the input an output records
    (``"1024x1024 px, 5,012 bytes; this image is 2048x2048 px, ..."``), or
    None when it is that input (or the record keeps no identity)."""
    if not recorded:
        return None
    here = input_identity(path, meta) or {}
    keys = [k for k in ("rows_cols", "bytes", "head", "etag") if recorded.get(k) is not None
            and here.get(k) is not None]
    if all(recorded[k] == here[k] for k in keys):
        return None

    def said(d):
        h, w = d["rows_cols"]
        return f"{w}x{h} px" + (f", {d['bytes']:,} bytes" if d.get("bytes") is not None else "")
    return f"made from a {said(recorded)} image; {display(os.fspath(path))} is {said(here)}"
