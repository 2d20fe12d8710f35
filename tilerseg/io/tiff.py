"""TIFF, BigTIFF and OME-TIFF (pyramids included) through tifffile.

Tiled single-plane levels (whole-slide images, pyramidal TIFFs) are read
tile by tile: each tile's bytes with ``os.pread`` (no shared file position,
so threads read at once) and decoded by tifffile's own decoder, which
releases the GIL. That runs at the raw decoder's rate; tifffile's zarr store,
used for everything else, spends about as long again in zarr per tile."""
from __future__ import annotations

import os

import numpy as np

from ..errors import FormatError, InputError
from .remote import RemoteFile, display, is_url, mask_text
from .base import ImageMeta, Reader, reopen, resolution_mpp

_CHANNEL_AXES = "SC"


class TiffReader(Reader):
    """One level of the first image series, read chunk-wise through zarr."""

    def __init__(self, path: str, level: int = 0):
        import tifffile
        import zarr

        self._src, self.level = str(path), int(level)
        self._remote = RemoteFile(self._src) if is_url(self._src) else None
        self.path = display(self._src)
        try:
            self._tif = tifffile.TiffFile(self._remote or self._src)
            series = self._tif.series[0]
        except InputError:
            raise
        except Exception as err:
            raise FormatError(f"{self.path}: not a readable TIFF ({mask_text(str(err))})") from err
        if not 0 <= self.level < len(series.levels):
            raise FormatError(f"{self.path}: has levels 0..{len(series.levels) - 1}, not {self.level}: "
                              "pick one of those with --level")
        axes = series.axes
        self._axes = axes
        extra = [(a, n) for a, n in zip(axes, series.levels[self.level].shape) if a not in "YX" + _CHANNEL_AXES and n > 1]
        if extra:
            raise FormatError(f"{self.path}: has axes {axes} with shape {series.shape}; only 2-D images "
                              "(Y, X and channels) are supported: extract one plane first")
        _check_strips(series.levels[self.level], axes, self.path)
        self._z = zarr.open_array(series.aszarr(level=self.level), mode="r")
        self._page, self._fd = _tiled_page(series.levels[self.level], axes), None
        if self._page is not None and self._remote is None:
            self._fd = os.open(self._src, os.O_RDONLY)
        if self._page is not None:
            jpeg = self._page.compression in (6, 7, 34892, 33007)
            self._decodeargs = dict(jpegtables=self._page.jpegtables, jpegheader=self._page.jpegheader) if jpeg \
                else {}
        shapes = []
        for lvl in series.levels:
            shapes.append((lvl.shape[axes.index("Y")], lvl.shape[axes.index("X")]))
        chan = [a for a in axes if a in _CHANNEL_AXES]
        bands = int(np.prod([series.shape[axes.index(a)] for a in chan])) if chan else 1
        mpp0, why = _mpp(self._tif)
        level_mpp = tuple((mpp0 * shapes[0][1] / w if mpp0 else None) for _, w in shapes)
        self.meta = ImageMeta(
            shape=shapes[self.level], bands=bands, dtype=np.dtype(series.dtype),
            format="OME-TIFF" if self._tif.is_ome else "TIFF", mpp=level_mpp[self.level],
            levels=tuple(shapes), level_mpp=level_mpp, level=self.level, unknown_mpp=why)

    def _read(self, rows, cols):
        if self._page is not None:
            return self._read_tiles(rows, cols), None
        index = []
        for a in self._axes:
            if a == "Y":
                index.append(slice(*rows))
            elif a == "X":
                index.append(slice(*cols))
            elif a in _CHANNEL_AXES:
                index.append(slice(None))
            else:
                index.append(0)
        block = np.asarray(self._z[tuple(index)])
        kept = [a for a in self._axes if a in "YX" + _CHANNEL_AXES]
        order = [kept.index("Y"), kept.index("X")] + [i for i, a in enumerate(kept) if a in _CHANNEL_AXES]
        block = block.transpose(order)
        return block.reshape(block.shape[0], block.shape[1], -1), None

    def _read_tiles(self, rows, cols) -> np.ndarray:
        """The window from the tiles it touches, decoded one by one."""
        p = self._page
        th, tw = p.tilelength, p.tilewidth
        nx = -(-p.imagewidth // tw)
        out = np.empty((rows[1] - rows[0], cols[1] - cols[0], p.samplesperpixel), p.dtype)
        for ty in range(rows[0] // th, (rows[1] - 1) // th + 1):
            for tx in range(cols[0] // tw, (cols[1] - 1) // tw + 1):
                i = ty * nx + tx
                raw = self._pread(p.databytecounts[i], p.dataoffsets[i]) if p.databytecounts[i] else None
                tile = p.decode(raw, i, **self._decodeargs)[0]
                y0, x0 = max(rows[0], ty * th), max(cols[0], tx * tw)
                y1, x1 = min(rows[1], (ty + 1) * th), min(cols[1], (tx + 1) * tw)
                if tile is None:  # a sparse tile: never written
                    part = p.nodata
                else:  # edge tiles may come cropped to the image: what we slice lies inside it
                    tile = tile.reshape(tile.shape[-3], tile.shape[-2], -1)
                    part = tile[y0 - ty * th:y1 - ty * th, x0 - tx * tw:x1 - tx * tw]
                out[y0 - rows[0]:y1 - rows[0], x0 - cols[0]:x1 - cols[0]] = part
        return out

    def _pread(self, n: int, offset: int) -> bytes:
        """A tile's bytes: ``os.pread`` locally, the block cache by URL."""
        return os.pread(self._fd, n, offset) if self._remote is None else self._remote.tile(n, offset)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._tif.close()

    def __reduce__(self):
        return (reopen, (TiffReader, self._src, self.level))


def _tiled_page(level, axes: str):
    """The page of a level read tile by tile, or None: one page, tiled,
    2-D with contiguous samples, decodable by tifffile here."""
    if len(level.pages) != 1 or axes not in ("YX", "YXS") or not hasattr(os, "pread"):
        return None
    page = level.pages[0]
    ok = (getattr(page, "is_tiled", False) and page.imagedepth == 1 and page.planarconfig == 1
          and page.tiledepth == 1 and len(page.dataoffsets) == -(-page.imagelength // page.tilelength)
          * -(-page.imagewidth // page.tilewidth))
    return page if ok else None


MAX_READ_BYTES = 2 ** 30  # what one task may decode for a 512-row band of a stripped image


def _check_strips(level, axes: str, path: str) -> None:
    """Refuse a TIFF stored in strips so wide that every read decodes
    gigabytes: tifffile decodes whole strips, so a window of 512 rows of a
    1,000,000-px-wide image decodes 1.5 GB, whatever its width. Tiled TIFFs
    (every slide, every COG) are read by tiles and pass."""
    page = level.keyframe
    if page.is_tiled:
        return
    H, W = level.shape[axes.index("Y")], level.shape[axes.index("X")]
    row = int(np.prod(level.shape)) // H * np.dtype(level.dtype).itemsize
    rows = max(512, int(getattr(page, "rowsperstrip", 1) or 1))
    if row * rows > MAX_READ_BYTES:
        raise FormatError(f"{path}: {W}x{H} px ({W * H / 1e9:.3g} gigapixels) stored in strips of whole rows, so "
                          f"every 512-row read decodes {row * rows / 2 ** 30:.1f} GiB; convert it to a tiled TIFF "
                          "first (gdal_translate -co TILED=YES -co BIGTIFF=YES IN OUT.tif, or vips tiffsave IN "
                          "OUT.tif --tile --bigtiff)")


def _mpp(tif) -> tuple[float | None, str]:
    """Microns per pixel at level 0: OME PhysicalSizeX, else the resolution
    tags where they are a plausible scale (:func:`resolution_mpp`); and why
    not, when a tag was there."""
    import re

    if tif.is_svs:  # Aperio: "... |MPP = 0.4990|..." in the first page's description (as openslide reads it)
        m = re.search(r"\|\s*MPP\s*=\s*([0-9.eE+-]+)", tif.pages[0].description or "")
        if m:
            return float(m.group(1)), ""
    if tif.is_ome:

        m = re.search(r'PhysicalSizeX="([0-9.eE+-]+)"', tif.ome_metadata or "")
        unit = re.search(r'PhysicalSizeXUnit="([^"]+)"', tif.ome_metadata or "")
        if m and (unit is None or unit.group(1) in ("µm", "um", "\u00b5m")):
            return float(m.group(1)), ""
    page = tif.pages[0]
    xres, unit = page.tags.get("XResolution"), page.tags.get("ResolutionUnit")
    if xres is None or unit is None:
        return None, ""
    num, den = xres.value
    return resolution_mpp(num / den if den else 0, int(unit.value))
