"""``tilerseg info``: what a reader sees in a file, as text."""
from __future__ import annotations

from .io import open_reader


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


def describe_input(path, *, level=None, mpp=None, bands=None, reader: str = "auto") -> str:
    """Size, levels, mpp, CRS, bands, dtype and nodata of ``path``."""
    with open_reader(path, level=level, mpp=mpp, bands=tuple(bands) if bands else None, reader=reader) as r:
        m = r.meta
        H, W = m.shape
        lines = [f"file:       {path}", f"format:     {m.format}",
                 f"size:       {W} x {H} px (width x height), level {m.level}",
                 f"bands:      {m.bands}" + (f" ({', '.join(m.band_names)})" if m.band_names else ""),
                 f"dtype:      {m.dtype}",
                 f"mpp:        {m.mpp:.4g} µm/px" if m.mpp else "mpp:        unknown",
                 f"crs:        {_crs_name(m.crs)}"]
        if m.transform is not None and m.georeferenced:
            a, b, c, d, e, f = m.transform
            lines.append(f"transform:  pixel {a:g} x {e:g}, origin ({c:g}, {f:g})" + (", rotated" if b or d else ""))
        lines.append(f"nodata:     {m.nodata if m.nodata is not None else 'none'}")
        if len(m.levels) > 1:
            lines.append(f"levels:     {len(m.levels)}")
            for k, (h, w) in enumerate(m.levels):
                lm = m.level_mpp[k] if k < len(m.level_mpp) and m.level_mpp[k] else None
                lines.append(f"  {k}: {w} x {h}" + (f"  {lm:.4g} µm/px" if lm else ""))
        if m.note:
            lines.append(f"note:       {m.note}")
    return "\n".join(lines)
