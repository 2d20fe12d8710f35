"""Pick the backend for an input path and apply level/mpp/band choices."""
from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import replace
from typing import Literal

from ..config import READERS
from ..errors import FormatError, InputError
from .remote import RemoteFile, display, is_url, mask_text, stat, strip_query
from .base import Reader, ResampledReader, pick_level

log = logging.getLogger(__name__)

ReaderName = Literal["auto", "openslide", "tifffile", "rasterio", "pillow", "zarr"]
SLIDE_EXT = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide", ".dcm"}
TIFF_EXT = {".tif", ".tiff", ".btf", ".tf8", ".ome.tif", ".ome.tiff"}
IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
GEO_EXT = {".vrt", ".img", ".jp2", ".nc", ".hdf", ".ecw"}
_GEO_TAGS = (33550, 33922, 34264, 34735)  # pixel scale, tiepoint, transformation, geokeys


def open_reader(path, *, level: int | None = None, mpp: float | None = None,
                bands: tuple[int, ...] | None = None, reader: str = "auto", force_resample: bool = False,
                missing_chunks: str = "refuse") -> Reader:
    """Open ``path`` lazily with the right backend.

    ``level`` picks a pyramid level; ``mpp`` picks the level nearest a
    target microns per pixel and resamples when none is within 5%; more
    than :data:`MAX_RESAMPLE` either way is refused unless
    ``force_resample`` (it is far more often a wrong scale than a wish).
    The choice is logged and kept in ``reader.meta.note``."""
    path = os.fspath(path)
    if is_url(path):
        name = _detect_url(path, reader)
    elif not os.path.exists(path):
        raise InputError(f"{path}: no such file or directory; check the path")
    else:
        name = _detect(path) if reader == "auto" else reader
    if level is not None and mpp is not None:
        raise InputError("give --level or --mpp, not both")
    r = _open(name, path, level or 0, bands, missing_chunks)
    if mpp is not None:
        lvl, scale = pick_level(r.meta.level_mpp, float(mpp))
        if not force_resample and not 1 / MAX_RESAMPLE <= scale <= MAX_RESAMPLE:
            r.close()
            raise InputError(_resample_refusal(path, r.meta, lvl, scale, mpp))
        if lvl != r.meta.level:
            r.close()
            r = _open(name, path, lvl, bands, missing_chunks)
        if scale != 1.0:
            r = ResampledReader(r, scale)
        note = (f"--mpp {mpp:g}: using level {lvl} ({r.meta.levels[lvl][1]}x{r.meta.levels[lvl][0]} px, "
                f"{r.meta.level_mpp[lvl]:.4g} µm/px)" + (f", resampled by 1/{scale:.4g} to "
                                                       f"{r.meta.shape[1]}x{r.meta.shape[0]} px" if scale != 1.0 else ""))
        log.info(note)
        r.meta = replace(r.meta, note=note)
    if bands and name != "rasterio":  # rasterio reads only the chosen bands itself
        r = BandSelect(r, bands)
    _probe(r)
    return r


MAX_RESAMPLE = 8.0


def pixel_count(n: int) -> str:
    """``37.3 gigapixels``, ``4.2 megapixels``: a size people can read."""
    return f"{n / 1e9:.3g} gigapixels" if n >= 1e8 else f"{n / 1e6:.3g} megapixels"


def _resample_refusal(path: str, meta, level: int, scale: float, mpp: float) -> str:
    h, w = meta.levels[level] if meta.levels else meta.shape
    H, W = max(1, round(h / scale)), max(1, round(w / scale))
    way = "up" if scale < 1 else "down"
    return (f"{path}: --mpp {mpp:g} would resample level {level} ({meta.level_mpp[level]:.4g} µm/px) "
            f"{max(scale, 1 / scale):.4g}x {way} to {W}x{H} px ({pixel_count(W * H)}); more than "
            f"{MAX_RESAMPLE:g}x is refused as a likely wrong scale: check the mpp with `tilerseg info`, or pass "
            "--force-resample to do it anyway")


def _detect(path: str) -> str:
    low = path.lower().rstrip("/")
    ext = os.path.splitext(low)[1]
    from .arrays import is_zarr

    if is_zarr(path) or low.endswith(".zarr"):
        return "zarr"
    if ext in SLIDE_EXT:
        return "openslide"
    if ext in IMAGE_EXT:
        return "pillow"
    if ext in GEO_EXT:
        return "rasterio"
    if ext in TIFF_EXT:
        return "rasterio" if _is_geotiff(path) else "tifffile"
    raise FormatError(f"{path}: unsupported file type {ext or '(no extension)'!r}; tilerseg reads slides "
                      f"({', '.join(sorted(SLIDE_EXT))}), TIFF/OME-TIFF/GeoTIFF, PNG/JPEG and zarr "
                      "(force a backend with --reader)")


TIFF_SLIDE_EXT = {".svs", ".scn", ".bif"}  # slides that are TIFFs tifffile reads tile by tile (remote: no openslide)


def _detect_url(url: str, reader: str) -> str:
    """The backend for a URL: openslide reads only local files, so
    TIFF-based slides go to tifffile and the others are refused."""
    info = stat(url)
    low = strip_query(url).lower().rstrip("/")
    ext = os.path.splitext(low)[1]
    if reader not in ("auto", "openslide"):
        return reader
    if reader == "openslide" or (ext in SLIDE_EXT and ext not in TIFF_SLIDE_EXT):
        raise FormatError(f"{display(url)}: openslide reads only local files and this slide format "
                          f"({ext or 'openslide'}) is not a TIFF tifffile reads tile by tile; copy it locally "
                          "first (aws s3 cp / curl -O) and run on the copy")
    if info.get("directory") or low.endswith(".zarr"):
        return "zarr"
    if url.split("://", 1)[0].lower() in ("http", "https") and info["size"]:
        RemoteFile(url, info["size"]).check_ranges()
    if ext in TIFF_SLIDE_EXT:
        _is_geotiff(url, info["size"])  # the header parses and the data is all there
        return "tifffile"
    if ext in TIFF_EXT:
        return "rasterio" if _is_geotiff(url, info["size"]) else "tifffile"
    if ext in GEO_EXT:
        return "rasterio"
    if ext in IMAGE_EXT:
        raise FormatError(f"{display(url)}: {ext} images are read whole, not window by window; copy it "
                          "locally first, or convert it to a tiled TIFF")
    raise FormatError(f"{display(url)}: unsupported file type {ext or '(no extension)'!r}; by URL tilerseg "
                      "reads TIFF/OME-TIFF/GeoTIFF/COG, SVS and zarr (force a backend with --reader)")


def _is_geotiff(path: str, size: int | None = None) -> bool:
    import tifffile

    url = is_url(path)
    where = display(path) if url else path
    try:
        said_cm = _tifffile_warnings() if url else contextlib.nullcontext([])
        with (RemoteFile(path, size) if url else open(path, "rb")) as fh, said_cm as said, \
                tifffile.TiffFile(fh) as tif:
            tags = tif.pages[0].tags
            n = len(tif.pages)  # every IFD parsed now: one past the end is logged
            if url:  # a local file keeps failing at the window it cannot decode (tests rely on it)
                check_complete(tif, size, where)
            if said and n and url:
                raise FormatError(f"{where}: truncated or corrupt: {said[0]}; copy or upload it again")
            return any(t in tags for t in _GEO_TAGS)
    except InputError:
        raise
    except Exception as err:
        raise FormatError(f"{where}: not a readable TIFF ({mask_text(str(err))}); it is corrupt or "
                          "truncated") from err


class _tifffile_warnings:
    """Collect what tifffile logs while parsing (an IFD offset past the end
    of a truncated file is logged, not raised), instead of printing it."""

    def __enter__(self):
        import logging as lg

        self.said, self.logger = [], lg.getLogger("tifffile")
        self.handler = lg.Handler()
        self.handler.emit = lambda rec: self.said.append(" ".join(rec.getMessage().split())[:160])
        self.logger.addHandler(self.handler)
        self.propagate, self.logger.propagate = self.logger.propagate, False
        return self.said

    def __exit__(self, *exc):
        self.logger.removeHandler(self.handler)
        self.logger.propagate = self.propagate


def check_complete(tif, size: int, where: str) -> None:
    """Refuse a TIFF whose pages point past its end (cut short in a copy or
    an upload) before any window is read, rather than failing half-way."""
    need = 0
    for page in tif.pages:
        counts = getattr(page, "databytecounts", ()) or ()
        if counts:
            need = max(need, max(o + n for o, n in zip(page.dataoffsets, counts)))
    if need > size:
        raise FormatError(f"{where}: truncated: {size} bytes, but its image data reaches byte {need}; copy or "
                          "upload it again")


def _open(name: str, path: str, level: int, bands, missing_chunks: str = "refuse") -> Reader:
    if name == "openslide":
        from .slide import SlideReader
        return SlideReader(path, level)
    if name == "tifffile":
        from .tiff import TiffReader
        return TiffReader(path, level)
    if name == "rasterio":
        from .geotiff import GeoReader
        return GeoReader(path, level, bands)
    if name == "zarr":
        from .arrays import ZarrReader
        return ZarrReader(path, level, missing_chunks)
    if level:
        raise InputError(f"{path}: --level needs a pyramidal format; this one has a single level")
    if name == "pillow":
        from .image import PillowReader
        return PillowReader(path)
    raise InputError(f"unknown reader {name!r}: use one of {', '.join(READERS)}")


def _probe(r: Reader) -> None:
    """Decode one pixel now, so an unsupported codec fails before any work."""
    try:
        r.read((0, 1), (0, 1))
    except Exception as err:
        r.close()
        msg = str(err).split("; the file is damaged")[0]
        raise FormatError(f"{msg}; it is corrupt or uses an unsupported codec: re-export or convert it") from err


class BandSelect(Reader):
    """Pick bands (1-based) of any reader."""

    def __init__(self, base: Reader, bands):
        self.base, self.bands = base, tuple(int(b) for b in bands)
        self.path = base.path
        bad = [b for b in self.bands if not 1 <= b <= base.meta.bands]
        if bad:
            raise InputError(f"{base.path}: has bands 1..{base.meta.bands}; --bands {bad} do not exist")
        self.meta = replace(base.meta, bands=len(self.bands))

    def _read(self, rows, cols):
        data, valid = self.base.read(rows, cols)
        return data[..., [b - 1 for b in self.bands]], valid

    def __reduce__(self):
        return (BandSelect, (self.base, self.bands))
