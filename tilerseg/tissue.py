"""Where the tissue is, at low resolution, so windows on glass are skipped.

Most of a slide is glass: running the model there wastes hours. Tissue is
found on a thumbnail (a coarse pyramid level, or strided reads): stained
tissue is saturated and glass is not, so Otsu's threshold on HSV
saturation separates them (grey or single-band images use darkness
instead). Holes are filled, specks removed, and the mask is dilated by a
margin so faint tissue at an edge still runs. ``--tissue MASK`` takes a
mask file instead (any readable image; non-zero is tissue), stretched
over the image's extent."""
from __future__ import annotations

import logging

import numpy as np

from .errors import InputError

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


def tissue_from_rgb(img: np.ndarray, margin: int = 2) -> np.ndarray:
    """Otsu on saturation (or darkness for grey images), centred between the
    two classes' means, holes filled,
    objects under 0.05% of the thumbnail removed, dilated by ``margin``."""
    from scipy import ndimage
    from skimage.filters import threshold_otsu

    rgb = np.asarray(img, np.float32)
    hi, lo = rgb.max(-1), rgb.min(-1)
    grey = np.percentile(hi - lo, 99) < 8  # no colour to speak of: grey-scale or one band
    signal = 1 - hi / 255 if grey else np.where(hi > 0, (hi - lo) / np.maximum(hi, 1e-6), 0)
    if np.ptp(signal) < 1e-3:  # one colour: no tissue can be told from glass
        return np.zeros(signal.shape, bool)
    t = threshold_otsu(signal)
    # two tight clusters (glass, stain) leave Otsu's criterion flat across the gap
    # and its first maximum at the glass cluster's edge: centre it between the means
    below, above = signal[signal <= t], signal[signal > t]
    if below.size and above.size:
        t = 0.5 * (below.mean() + above.mean())
    mask = signal > t
    mask = ndimage.binary_closing(mask, iterations=2)
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
    same extent)? Counted with a summed-area table, so it is exact and fast."""
    H, W = shape
    h, w = mask.shape
    sat = np.zeros((h + 1, w + 1), np.int64)
    sat[1:, 1:] = np.cumsum(np.cumsum(mask, 0), 1)
    ny, nx = n_windows
    r0 = np.floor(np.arange(ny) * crop * h / H).astype(int)
    r1 = np.ceil(np.minimum((np.arange(ny) + 1) * crop, H) * h / H).astype(int)
    c0 = np.floor(np.arange(nx) * crop * w / W).astype(int)
    c1 = np.ceil(np.minimum((np.arange(nx) + 1) * crop, W) * w / W).astype(int)
    r0, r1 = np.clip(r0, 0, h), np.clip(np.maximum(r1, r0 + 1), 0, h)
    c0, c1 = np.clip(c0, 0, w), np.clip(np.maximum(c1, c0 + 1), 0, w)
    count = sat[r1][:, c1] - sat[r0][:, c1] - sat[r1][:, c0] + sat[r0][:, c0]
    return count > 0
