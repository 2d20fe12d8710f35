"""Where the tissue is, at low resolution, so windows on glass are skipped.

Most of a slide is glass: running the model there wastes hours. Tissue is
found on a thumbnail (a coarse pyramid level, or strided reads): stained
tissue is saturated and glass is not, so Otsu's threshold on HSV
saturation separates them (grey or single-band images use darkness
instead), and only what looks like glass (bright, unsaturated) is ever
skipped. Holes are filled, specks removed, and the mask is dilated by a
margin so faint tissue at an edge still runs. ``--tissue MASK`` takes a
mask file instead (any readable image; non-zero is tissue), stretched
over the image's extent."""
from __future__ import annotations

import functools
import logging

import numpy as np

from .errors import InputError
from .geometry import snap_boxes

log = logging.getLogger(__name__)
SIDE = 1024  # least thumbnail side; larger when windows are small against the image (see thumbnail_side)


def thumbnail_side(shape: tuple[int, int], crop: int) -> int:
    """A thumbnail side that gives each window's output area about 4 mask
    pixels across, within 1024..4096 (a 100,000 px slide with 320-px crops
    gets 1250 px, a mask pixel per 80 slide pixels)."""
    return int(np.clip(4 * max(shape) / max(crop, 1), SIDE, 4096))


def detect(path: str, *, side: int = SIDE, bands=None, reader: str = "auto") -> np.ndarray:
    """A boolean tissue mask of ``path`` at about ``side`` px, covering the
    whole image (the level the model runs at does not matter)."""
    from .preview import thumbnail

    img = thumbnail(str(path), side, bands=tuple(bands) if bands else None, reader=reader)
    return tissue_from_rgb(img)


GLASS_VALUE = 0.7       # glass is bright: its brightest band at least this share of 255
GLASS_SATURATION = 0.2  # and grey: (max - min) / max of its bands at most this


def glass_like(hi: np.ndarray, lo: np.ndarray, grey: bool) -> np.ndarray:
    """The pixels that can be glass: bright and (for colour images)
    unsaturated. Only these are ever skipped: a uniform or dark or coloured
    area is not glass, whatever Otsu's split says (in doubt, run)."""
    bright = hi >= GLASS_VALUE * 255
    if grey:
        return bright
    return bright & ((hi - lo) <= GLASS_SATURATION * np.maximum(hi, 1e-6))


def tissue_from_rgb(img: np.ndarray, margin: int = 2) -> np.ndarray:
    """Otsu on saturation (or darkness for grey images), centred between the
    two classes' means, holes filled,
    objects under 0.05% of the thumbnail removed, dilated by ``margin``.
    A pixel is glass only when it is on the glass side of the split and
    looks like glass (:func:`glass_like`): an image all of one stain, or of
    two stains and no glass, is all tissue, not half or none of it."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    bands = [np.asarray(img)[..., k] for k in range(np.shape(img)[-1])]  # per band: 2x faster than over axis -1
    hi = functools.reduce(np.maximum, bands).astype(np.float32)
    lo = functools.reduce(np.minimum, bands).astype(np.float32)
    grey = np.percentile(hi - lo, 99) < 8  # no colour to speak of: grey-scale or one band
    glass = glass_like(hi, lo, grey)
    signal = 1 - hi / 255 if grey else np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0)
    if np.ptp(signal) < 1e-3:  # one colour: glass if it looks like glass, else all tissue
        return ~glass
    t = threshold_otsu(signal)
    # two tight clusters (glass, stain) leave Otsu's criterion flat across the gap
    # and its first maximum at the glass cluster's edge: centre it between the means
    below, above = signal[signal <= t], signal[signal > t]
    if below.size and above.size:
        t = 0.5 * (below.mean() + above.mean())
    mask = (signal > t) | ~glass
    # closed on an edge-padded copy: closing erodes from outside the array, which cut tissue at its corners
    mask = ndimage.binary_closing(np.pad(mask, 2, mode="edge"), iterations=2)[2:-2, 2:-2]
    mask = ndimage.binary_fill_holes(mask)
    lab, _ = ndimage.label(mask)
    keep = np.bincount(lab.ravel()) >= max(4, int(mask.size * 5e-4))
    keep[0] = False
    mask = keep[lab]
    return ndimage.binary_dilation(mask, iterations=margin) if margin else mask


def from_file(path: str) -> np.ndarray:
    """A tissue mask read from a file: non-zero pixels (any band) are tissue."""
    from .io import open_reader
    from .preview import strided

    with open_reader(path) as r:
        f = max(1, max(r.meta.shape) // SIDE)
        img = strided(lambda a, b: r.read((a, b), (0, r.meta.shape[1]))[0], r.meta.shape, f)
    mask = np.asarray(img).reshape(img.shape[0], img.shape[1], -1).any(-1)
    if not mask.any():
        raise InputError(f"{path}: the tissue mask is empty (no non-zero pixel); every window would be skipped")
    return mask


def window_has_tissue(mask: np.ndarray, shape: tuple[int, int], crop: int, n_windows: tuple[int, int]) -> np.ndarray:
    """``(ny, nx)`` booleans: does window ``(wy, wx)``'s output area (``crop``
    px on the image grid of ``shape``) touch tissue in ``mask`` (any size,
    same extent)? Its box (:func:`window_boxes`) is not empty."""
    box = window_boxes(mask, shape, crop, n_windows)
    return box[..., 1] > box[..., 0]


def window_boxes(mask: np.ndarray, shape: tuple[int, int], crop: int, n_windows: tuple[int, int]) -> np.ndarray:
    """``(ny, nx, 4)``: per window, the box ``y0, y1, x0, x1`` (image px,
    from the window's crop origin) that holds all of ``mask``'s true pixels
    in its output area, a mask pixel counted as all the image pixels it
    covers; ``0, 0, 0, 0`` where the area holds none."""
    return Boxes(mask)(shape, crop, n_windows)


class Boxes:
    """:func:`window_boxes` for many crops of one mask: the mask's running
    sums are taken once, and each crop then costs ``O(side x windows)``
    (next/previous true index along each axis, vectorised), so the tile
    choice weighs hundreds of candidate crops in well under a second."""

    def __init__(self, mask: np.ndarray):
        m = np.asarray(mask, np.int32)
        h, w = m.shape
        self.shape = m.shape
        self.rows = np.zeros((h, w + 1), np.int32)
        self.rows[:, 1:] = np.cumsum(m, 1)
        self.cols = np.zeros((w, h + 1), np.int32)
        self.cols[:, 1:] = np.cumsum(m.T, 1)

    def __call__(self, shape, crop: int, n_windows) -> np.ndarray:
        H, W = shape
        h, w = self.shape
        ny, nx = n_windows
        r0, r1, c0, c1 = _bands(self.shape, shape, crop, n_windows)
        ya, yb = _first_last((self.rows[:, c1] - self.rows[:, c0]) > 0, r0, r1)  # map rows, (ny, nx)
        xa, xb = _first_last((self.cols[:, r1] - self.cols[:, r0]) > 0, c0, c1)  # map columns, (nx, ny)
        xa, xb = xa.T, xb.T
        some = ya < yb
        top = (np.arange(ny) * crop)[:, None]
        left = (np.arange(nx) * crop)[None, :]
        bottom, right = np.minimum(top + crop, H), np.minimum(left + crop, W)
        box = np.stack([np.clip(np.floor(ya * H / h).astype(np.int64), top, bottom) - top,
                        np.clip(np.ceil(yb * H / h).astype(np.int64), top, bottom) - top,
                        np.clip(np.floor(xa * W / w).astype(np.int64), left, right) - left,
                        np.clip(np.ceil(xb * W / w).astype(np.int64), left, right) - left], -1)
        box[~some] = 0
        return box


def _first_last(occ: np.ndarray, a: np.ndarray, b: np.ndarray):
    """``occ`` (length, k): per band ``[a_i, b_i)`` and column k, the first
    true index and one past the last (``a_i, a_i`` where none)."""
    length = occ.shape[0]
    at = np.arange(length)[:, None]
    nxt = np.minimum.accumulate(np.where(occ, at, length)[::-1], axis=0)[::-1]
    prv = np.maximum.accumulate(np.where(occ, at, -1), axis=0)
    first, last = nxt[a], prv[b - 1] + 1
    none = first >= b[:, None]
    first[none], last[none] = 0, 0
    return first, last


def _bands(mshape, shape, crop: int, n_windows):
    """Per window row and column, the mask rows / columns under its output area."""
    H, W = shape
    h, w = mshape
    ny, nx = n_windows
    r0 = np.floor(np.arange(ny) * crop * h / H).astype(int)
    r1 = np.ceil(np.minimum((np.arange(ny) + 1) * crop, H) * h / H).astype(int)
    c0 = np.floor(np.arange(nx) * crop * w / W).astype(int)
    c1 = np.ceil(np.minimum((np.arange(nx) + 1) * crop, W) * w / W).astype(int)
    r0, r1 = np.clip(r0, 0, h - 1), np.clip(np.maximum(r1, r0 + 1), 1, h)
    c0, c1 = np.clip(c0, 0, w - 1), np.clip(np.maximum(c1, c0 + 1), 1, w)
    return r0, r1, c0, c1


MAP_CROP = 256  # the map is read at the resolution for this crop (or the run's, where smaller)


class WindowMap:
    """Where windows will run, at low resolution: the tiling decision
    (:func:`tilerseg.tiling.auto_tile`, which weighs the windows each
    candidate crop would run) and the run (which skips the windows off
    tissue and trims the rest to the tissue in them) read the same map, so
    the choice describes the run.

    ``tissue(side)`` gives the tissue mask at about ``side`` px (``None``:
    no ``--tissue``); ``valid(side)`` the pixels that are not nodata (or
    ``None`` where the image has none). Only the tissue mask decides which
    windows are skipped or trimmed from the map; the nodata map, a strided
    sample, only estimates them for the tiling decision (the run skips
    all-nodata windows and trims the rest exactly, at full resolution).
    Masks are computed on first use and kept, so a run detects its tissue
    once."""

    def __init__(self, shape, *, tissue=None, valid=None, name: str = ""):
        self.shape, self._tissue, self._valid, self.name = tuple(shape), tissue, valid, name
        self._masks: dict = {}
        self._runs: dict = {}

    @property
    def tissue(self) -> bool:
        """Whether a tissue mask (``--tissue``) decides windows, not only nodata."""
        return self._tissue is not None

    @property
    def may_skip(self) -> bool:
        """Whether any window may be skipped (a tissue mask, or nodata)."""
        return self._tissue is not None or self._valid is not None

    def side(self, crop: int) -> int:
        return thumbnail_side(self.shape, min(crop, MAP_CROP))

    def _mask(self, kind: str, side: int):
        if (kind, side) not in self._masks:
            make = self._tissue if kind == "tissue" else self._valid
            m = make(side) if make else None
            if m is not None and kind == "valid":
                from scipy import ndimage

                m = ndimage.binary_dilation(m, iterations=1)  # a strided sample: grow it, as a map of where runs may be
            self._masks[kind, side] = m
        return self._masks[kind, side]

    def _where(self):
        """The map of where windows run (tissue and valid), as
        :class:`Boxes`, and its true share; ``None, 1.0`` without one."""
        side = self.side(MAP_CROP)  # one map for every candidate: each side is another detection
        if ("boxes", side) not in self._masks:
            masks = [m for m in (self._mask("tissue", side), self._mask("valid", side)) if m is not None]
            if not masks:
                self._masks["boxes", side] = None, 1.0
            else:
                both = masks[0] if len(masks) == 1 else _fit(masks[0], masks[1].shape) & masks[1]
                self._masks["boxes", side] = Boxes(both), float(both.mean())
        return self._masks["boxes", side]

    def covered(self) -> float:
        """Image pixels that the windows' boxes hold together, at least,
        for any crop: the map's true pixels, each the image area it stands
        for (a box holds every mask pixel it touches, whole)."""
        return self._where()[1] * self.shape[0] * self.shape[1]

    def runs(self, crop: int, stride: int) -> np.ndarray:
        """``(n, 2)``: the computed output area (rows, columns) of each of
        the ``n`` windows of output side ``crop`` that will run, trimmed to
        the tissue and valid pixels in them on the stride grid."""
        if (crop, stride) not in self._runs:
            n = tuple(max(1, -(-s // crop)) for s in self.shape)
            where = self._where()[0]
            if where is None:
                box = np.zeros((*n, 4), np.int64)
                box[..., 1::2] = crop
            else:
                box = where(self.shape, crop, n)
            box = snap_boxes(box, crop, stride).reshape(-1, 4)
            size = np.stack([box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]], -1)
            self._runs[crop, stride] = size[size.min(1) > 0]
        return self._runs[crop, stride]

    def boxes(self, grid) -> np.ndarray | None:
        """Per window of ``grid``, ``(ny, nx, 4)``: the part of its crop to
        compute (``y0, y1, x0, x1`` from the crop's origin, on the stride
        grid), all zero for a window off tissue; ``None`` without ``--tissue``."""
        if self._tissue is None:
            return None
        mask = self._mask("tissue", self.side(grid.crop))
        box = snap_boxes(window_boxes(mask, grid.shape, grid.crop, grid.n_windows), grid.crop, grid.stride)
        run = box[..., 1] > box[..., 0]
        area = ((box[..., 1] - box[..., 0]) * (box[..., 3] - box[..., 2])).sum()
        log.info("--tissue %s: tissue on %.1f%% of the thumbnail, %d of %d windows to run, trimmed to %.0f%% "
                 "of their crops", self.name, 100 * mask.mean(), int(run.sum()), run.size,
                 100 * area / max(1, run.sum() * grid.crop ** 2))
        return box.astype(np.int32)


def _fit(mask: np.ndarray, shape) -> np.ndarray:
    """``mask`` resampled (nearest) to ``shape``, over the same extent."""
    if mask.shape == tuple(shape):
        return mask
    rows = np.minimum((np.arange(shape[0]) + 0.5) * mask.shape[0] / shape[0], mask.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(shape[1]) + 0.5) * mask.shape[1] / shape[1], mask.shape[1] - 1).astype(int)
    return mask[rows][:, cols]


def valid_map(path: str, side: int, *, bands=None, reader: str = "auto",
              missing_chunks: str = "refuse") -> np.ndarray | None:
    """Which pixels are not nodata, sampled at about ``side`` px from the
    coarsest level at least that large; ``None`` if every sample is valid."""
    from .io import open_reader
    from .preview import strided

    kw = dict(bands=tuple(bands) if bands else None, reader=reader, missing_chunks=missing_chunks)
    with open_reader(path, **kw) as r:
        levels = r.meta.levels or (r.meta.shape,)
    level = max([k for k, (h, w) in enumerate(levels) if max(h, w) >= side] or [0])
    with open_reader(path, level=level or None, **kw) as r:
        f = max(1, max(r.meta.shape) // side)

        def read(a, b):
            data, valid = r.read((a, b), (0, r.meta.shape[1]))
            return np.ones(data.shape[:2], bool) if valid is None else valid

        valid = strided(read, r.meta.shape, f)
    return None if valid.all() else valid
