"""GeoTIFF and COG through rasterio: CRS, transform, nodata, masks and bands."""
from __future__ import annotations

import threading

import numpy as np

from ..errors import FormatError, InputError
from .remote import apply_gdal_options, display, fail, gdal_path, is_url
from .base import ImageMeta, Reader, reopen


class GeoReader(Reader):
    """A georeferenced raster; reads windows and the dataset mask.

    The validity mask combines nodata values, internal masks and alpha
    bands (GDAL's dataset mask). Alpha bands are not fed to the model.
    ``bands`` picks bands by 1-based index, as GDAL numbers them.
    rasterio datasets are not thread-safe, so reads are serialised."""

    def __init__(self, path: str, level: int = 0, bands: tuple[int, ...] | None = None):
        import rasterio
        from rasterio.enums import ColorInterp, MaskFlags

        self._src, self.level = str(path), int(level)
        self.path = display(self._src)
        url = is_url(self._src)
        where = gdal_path(self._src) if url else self._src
        if url:
            apply_gdal_options()
        try:
            kwargs = {"overview_level": self.level - 1} if self.level else {}
            self._ds = rasterio.open(where, **kwargs)
        except Exception as err:
            if url:
                raise fail(self._src, err, "GDAL cannot open it") from None
            raise FormatError(f"{self.path}: GDAL cannot open it ({err}); it is corrupt or not a raster "
                              "(or --level is beyond its overviews)") from err
        ds = self._ds
        if bands:
            bad = [b for b in bands if not 1 <= b <= ds.count]
            if bad:
                raise InputError(f"{self.path}: has bands 1..{ds.count}; --bands {bad} do not exist")
            self._bands = tuple(int(b) for b in bands)
        else:
            self._bands = tuple(i + 1 for i, ci in enumerate(ds.colorinterp) if ci != ColorInterp.alpha) or (1,)
        self._bands_req = tuple(bands) if bands else None
        self._masked = any(MaskFlags.all_valid not in ds.mask_flag_enums[b - 1] for b in self._bands) or \
            any(ci == ColorInterp.alpha for ci in ds.colorinterp)
        self._lock = threading.Lock()
        t = ds.transform
        with rasterio.open(where) as full:
            levels = [full.shape] + [(-(-full.height // f), -(-full.width // f)) for f in full.overviews(1)]
        self.meta = ImageMeta(
            shape=ds.shape, bands=len(self._bands), dtype=np.dtype(ds.dtypes[self._bands[0] - 1]),
            format=f"GeoTIFF ({ds.driver})", crs=ds.crs.to_wkt() if ds.crs else None,
            transform=(t.a, t.b, t.c, t.d, t.e, t.f), nodata=ds.nodata, levels=tuple(levels),
            level=self.level, band_names=tuple(ds.colorinterp[b - 1].name for b in self._bands))

    def _read(self, rows, cols):
        from rasterio.windows import Window

        win = Window(cols[0], rows[0], cols[1] - cols[0], rows[1] - rows[0])
        with self._lock:
            data = self._ds.read(self._bands, window=win)
            valid = self._ds.dataset_mask(window=win) > 0 if self._masked else None
        return np.moveaxis(data, 0, -1), valid

    def close(self) -> None:
        with self._lock:  # never under a read in flight
            self._ds.close()

    def __reduce__(self):
        return (reopen, (GeoReader, self._src, self.level, self._bands_req))
