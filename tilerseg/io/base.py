"""The Reader protocol every input backend implements, and the shared
helpers built on it (level choice, resampling, padded reads)."""
from __future__ import annotations

import collections
import logging
import os
import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ..errors import InputError, ReadError
from ..geometry import pad_index

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ImageMeta:
    """What a reader knows about its image, at the resolution it serves.

    ``transform`` is an affine ``(a, b, c, d, e, f)`` as in rasterio/GDAL
    (x = a*col + b*row + c, y = d*col + e*row + f); ``crs`` is WKT.
    ``levels`` lists the (H, W) of every pyramid level in the file and
    ``level_mpp`` their microns per pixel where known."""

    shape: tuple[int, int]
    bands: int
    dtype: np.dtype
    format: str
    mpp: float | None = None
    crs: str | None = None
    transform: tuple[float, ...] | None = None
    nodata: float | None = None
    levels: tuple[tuple[int, int], ...] = ()
    level_mpp: tuple[float | None, ...] = ()
    level: int = 0
    note: str = ""
    band_names: tuple[str, ...] = field(default=())
    unknown_mpp: str = ""  # why a resolution tag was not taken as microns per pixel


    @property
    def georeferenced(self) -> bool:
        return self.crs is not None or (self.transform is not None and self.transform != IDENTITY)


IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
PRINT_DPI = (72, 96, 150, 300, 600)  # what scanners, screens and image editors write when they know no scale
_UM_PER_UNIT = {"inch": 25400.0, "centimeter": 10000.0, 2: 25400.0, 3: 10000.0}


def resolution_mpp(pixels_per_unit: float, unit) -> tuple[float | None, str]:
    """Microns per pixel from a TIFF resolution tag, when it plausibly is one.

    A resolution tag is written by every image editor, mostly as a screen or
    print default (72, 96, 150, 300 or 600 dpi, in inches or converted to
    centimetres); read as a microscope scale it makes a 72-dpi image
    352.8 µm/px. Only other values are taken as a scale. Returns
    ``(mpp or None, why not)``."""
    per_unit = _UM_PER_UNIT.get(unit.lower() if isinstance(unit, str) else unit)
    if not per_unit or not pixels_per_unit or pixels_per_unit <= 0:
        return None, ""
    dpi = pixels_per_unit * (25400.0 / per_unit)
    if any(abs(dpi / d - 1) < 1e-3 for d in PRINT_DPI):
        return None, f"resolution tag: {dpi:.0f} dpi, a screen/print default, not a scan resolution"
    return per_unit / pixels_per_unit, ""
LABEL_NODATA = 255  # the label value of nodata in every output; class values stay below it
PROBABILITY_SCALE = 254  # --probabilities uint8: round(p x 254), so that 255 stays nodata


def probability_bytes(p: np.ndarray) -> np.ndarray:
    """Probabilities as uint8 for 8-bit viewers (openslide, QuPath):
    ``round(p * 254)``, NaN (nodata) as 255."""
    with np.errstate(invalid="ignore"):
        scaled = np.rint(np.clip(p, 0, 1) * PROBABILITY_SCALE)
    return np.where(np.isnan(p), LABEL_NODATA, scaled).astype(np.uint8)


def scale_transform(transform, fx: float, fy: float) -> tuple[float, ...] | None:
    """``transform`` for pixels ``fx`` times wider and ``fy`` times taller
    (same origin and extent): a coarser level has ``f > 1``."""
    if transform is None:
        return None
    a, b, c, d, e, f = transform
    return (a * fx, b * fy, c, d * fx, e * fy, f)


_OPENED: "collections.OrderedDict" = collections.OrderedDict()
_OPENED_LOCK = threading.Lock()
_OPENED_MAX = 8


def reopen(cls, *args):
    """Unpickle a reader: one instance per process for the same class,
    arguments and file (size and modification time), so that the tasks a
    dask worker runs share one open file instead of reopening it (and
    re-parsing a slide's index) for every block. Readers are safe to share
    between threads. The last few are kept; older ones close when their
    last task lets go of them."""
    try:
        if isinstance(args[0], str) and "://" in args[0]:  # a URL: the same object for the run's length
            key = (cls, args)
        else:
            st = os.stat(args[0])
            key = (cls, args, st.st_size, st.st_mtime_ns)
        hash(key)
    except (OSError, TypeError, IndexError, ValueError):
        return cls(*args)
    with _OPENED_LOCK:
        reader = _OPENED.get(key)
        if reader is not None:
            _OPENED.move_to_end(key)
            return reader
    reader = cls(*args)
    with _OPENED_LOCK:
        reader = _OPENED.setdefault(key, reader)
        while len(_OPENED) > _OPENED_MAX:
            _OPENED.popitem(last=False)
    return reader


class Reader(ABC):
    """A lazily read 2-D image with bands last.

    Subclasses implement :meth:`_read` for a window inside the image and set
    ``self.meta``. :meth:`read` adds bounds checks and turns any decoding
    failure into one :class:`ReadError` that names the file and the window.
    Readers pickle by their opening arguments, so dask workers reopen them."""

    path: str
    meta: ImageMeta

    @abstractmethod
    def _read(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        """Return ``(pixels (h, w, bands), valid (h, w) bool or None)``."""

    def read(self, rows: tuple[int, int], cols: tuple[int, int]) -> tuple[np.ndarray, np.ndarray | None]:
        H, W = self.meta.shape
        if not (0 <= rows[0] < rows[1] <= H and 0 <= cols[0] < cols[1] <= W):
            raise ValueError(f"window rows {rows} cols {cols} outside image {H}x{W}")
        try:
            data, valid = self._read(rows, cols)
        except ReadError:
            raise
        except Exception as err:  # any decoder failure: report where, not how
            raise ReadError(
                f"{self.path}: could not decode rows {rows[0]}:{rows[1]}, cols {cols[0]}:{cols[1]} "
                f"({type(err).__name__}: {_one_line(err)}); the file is damaged or uses an unsupported "
                "codec there: re-export it, or check it with `tilerseg info`") from err
        data = np.asarray(data)
        if data.ndim == 2:
            data = data[..., None]
        if np.issubdtype(data.dtype, np.floating):
            finite = np.isfinite(data).all(axis=-1)
            if not finite.all():
                valid = finite if valid is None else (valid & finite)
                data = np.where(np.isfinite(data), data, 0).astype(data.dtype)
        return data, valid

    def close(self) -> None:  # pragma: no cover - trivial
        pass

    def __enter__(self) -> "Reader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _one_line(err: BaseException) -> str:
    """The error's text on one line, with its cause where the library
    points to it ("See previous exception")."""
    text = " ".join(str(err).split())
    cause = err.__cause__ or err.__context__
    if cause is not None and "previous exception" in text:
        text = f"{text.split('. See previous')[0]}: {' '.join(str(cause).split())}"
    return text[:300] or type(err).__name__


def pick_level(level_mpp: tuple[float | None, ...], target: float, tolerance: float = 0.05) -> tuple[int, float]:
    """Choose the pyramid level to serve ``target`` microns per pixel.

    Returns ``(level, scale)``: read ``level`` and downsample it by ``scale``
    (1.0 means the level matches within ``tolerance``). The finest level not
    coarser than the target is chosen, so resampling only ever shrinks;
    if every level is coarser, the finest level is upsampled (scale < 1)."""
    if not level_mpp or level_mpp[0] is None:
        raise InputError("the image has no microns-per-pixel metadata, so --mpp cannot be used: use --level")
    known = [(i, m) for i, m in enumerate(level_mpp) if m]
    for i, m in known:
        if abs(m / target - 1) <= tolerance:
            return i, 1.0
    finer = [(i, m) for i, m in known if m <= target]
    i, m = max(finer, key=lambda t: t[1]) if finer else known[0]
    return i, target / m


class ResampledReader(Reader):
    """Serve ``base`` resampled by ``scale`` (> 1 shrinks).

    Shrinking averages each output pixel's footprint ``[i*s, (i+1)*s)``
    (area weighting, as GDAL's ``average``); enlarging is bilinear. The
    weights are a function of absolute pixel positions only, so any window
    gives the values of resampling the whole image: no seams."""

    def __init__(self, base: Reader, scale: float):
        self.base, self.scale = base, float(scale)
        self.path = base.path
        H, W = base.meta.shape
        shape = (max(1, round(H / scale)), max(1, round(W / scale)))
        m = base.meta
        self.meta = replace(m, shape=shape, mpp=(m.mpp * scale if m.mpp else None),
                            transform=scale_transform(m.transform, scale, scale))

    def _read(self, rows, cols):
        H, W = self.base.meta.shape
        (y0, y1), wy = resample_weights(rows, self.scale, H)
        (x0, x1), wx = resample_weights(cols, self.scale, W)
        src, valid = self.base.read((y0, y1), (x0, x1))
        out = np.einsum("ij,jkc,lk->ilc", wy, src.astype(np.float64), wx, optimize=True)
        if np.issubdtype(src.dtype, np.integer):
            info = np.iinfo(src.dtype)
            out = np.clip(np.rint(out), info.min, info.max)
        if valid is not None:  # invalid wherever the footprint touches an invalid pixel
            valid = np.einsum("ij,jk,lk->il", wy > 0, ~valid, wx > 0, optimize=True) == 0
        return out.astype(src.dtype), valid

    def __reduce__(self):
        return (ResampledReader, (self.base, self.scale))


def resample_weights(span: tuple[int, int], s: float, n: int) -> tuple[tuple[int, int], np.ndarray]:
    """Source range and ``(out, src)`` weights for output pixels ``span``."""
    i = np.arange(*span, dtype=np.float64)
    if s >= 1:  # area: overlap of [k, k+1) with [i*s, (i+1)*s), clipped to the image
        lo, hi = i * s, np.minimum((i + 1) * s, n)
        k0, k1 = int(np.floor(lo[0])), min(n, int(np.ceil(hi[-1])))
        k = np.arange(k0, k1, dtype=np.float64)
        w = np.clip(np.minimum(hi[:, None], k + 1) - np.maximum(lo[:, None], k), 0, None)
    else:  # bilinear at centres, edges clamped
        x = np.clip((i + 0.5) * s - 0.5, 0, n - 1)
        k0, k1 = int(np.floor(x[0])), min(n, int(np.floor(x[-1])) + 2)
        k = np.arange(k0, k1, dtype=np.float64)
        w = np.clip(1 - np.abs(x[:, None] - k), 0, None)
    return (k0, k1), w / w.sum(axis=1, keepdims=True)


def read_padded(reader: Reader, rows: tuple[int, int], cols: tuple[int, int], mode: str,
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Read image rows/cols that may reach outside the image, padded as
    :func:`numpy.pad` with ``mode`` would pad the whole image.

    Only the bounding box of the source pixels is read, so an interior
    window reads exactly itself and a border window a little more."""
    H, W = reader.meta.shape
    ri, r_in = pad_index(np.arange(*rows), H, mode)
    ci, c_in = pad_index(np.arange(*cols), W, mode)
    r0, r1, c0, c1 = int(ri.min()), int(ri.max()) + 1, int(ci.min()), int(ci.max()) + 1
    data, valid = reader.read((r0, r1), (c0, c1))
    if rows[0] >= 0 and rows[1] <= H and cols[0] >= 0 and cols[1] <= W:
        return data, valid  # interior: the read is the window
    data = data[ri - r0][:, ci - c0]
    if valid is not None:
        valid = valid[ri - r0][:, ci - c0]
    if r_in is not None:  # constant mode: zero outside, and mark it invalid
        inside = r_in[:, None] & c_in[None, :]
        data = np.where(inside[..., None], data, 0).astype(data.dtype)
        valid = inside if valid is None else (valid & inside)
    return data, valid
