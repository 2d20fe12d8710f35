"""A thumbnail of the input with the mask overlaid, for a person to look at.

Both sides are read at reduced size without loading either whole: the
input from its coarsest pyramid level that is still large enough (or by
strided strips), the result by strided strips of the writer's level 0.
:func:`render` is called by the writer, which owns the PNG file."""
from __future__ import annotations

import numpy as np

from .io import open_reader
from .io.base import LABEL_NODATA
from .io.pyramid import PALETTE as _CLASS_COLOURS

PALETTE = _CLASS_COLOURS.astype(np.float32)  # the same class colours as the outputs' colour tables


def strided(read, shape, f: int) -> np.ndarray:
    H, W = shape
    step = f * max(1, 256 // f)
    return np.concatenate([read(y, min(y + step, H))[::f, ::f] for y in range(0, H, step)], axis=0)


def thumbnail(path: str, side: int, **reader_kw) -> np.ndarray:
    """The image at about ``side`` px: from the coarsest pyramid level at
    least that large (any level covers the same extent), else by strides."""
    with open_reader(path, **reader_kw) as r:
        levels = r.meta.levels or (r.meta.shape,)
    level = max([k for k, (h, w) in enumerate(levels) if max(h, w) >= side] or [0])
    with open_reader(path, level=level or None, **reader_kw) as r:
        f = max(1, max(r.meta.shape) // side)
        img = strided(lambda a, b: r.read((a, b), (0, r.meta.shape[1]))[0], r.meta.shape, f)
    img = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    if img.dtype != np.uint8:  # stretch 16-bit and float images for display
        lo, hi = np.nanpercentile(img, (2, 98))
        img = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-9) * 255, 0, 255)
    return img.astype(np.float32)


def _labels(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Labels from label or probability rows; NaN probabilities -> 255."""
    if rows.ndim == 3 and np.issubdtype(rows.dtype, np.floating):
        nodata = np.isnan(rows).any(-1)
        probs = np.nan_to_num(rows)
        lab = (probs[..., 0] >= threshold).astype(np.uint8) if rows.shape[-1] == 1 else probs.argmax(-1)
        return np.where(nodata, LABEL_NODATA, lab).astype(np.uint8)
    return rows.reshape(rows.shape[0], rows.shape[1])


def render(image_path: str, level0, out_png: str, *, threshold: float = 0.5, side: int = 1024, bands=None,
           reader: str = "auto") -> str:
    """Draw ``out_png``: the image at about ``side`` px with class k > 0 in
    colour k of :data:`PALETTE`; nodata (255) is left uncoloured.

    ``level0`` is the finished result as the writer holds it (a zarr array
    of labels (H, W) or probabilities (classes, H, W)), read by strided
    strips, so the preview shows exactly what was written whatever the
    output format. The writer calls this and moves the PNG into place."""
    from PIL import Image

    kw = dict(bands=tuple(bands) if bands else None, reader=reader)
    if level0.ndim == 3:  # probabilities (classes, H, W)
        shape, read = level0.shape[-2:], lambda a, b: np.moveaxis(np.asarray(level0[:, a:b]), 0, -1)
    else:
        shape, read = level0.shape, lambda a, b: np.asarray(level0[a:b])
    f = max(1, max(shape) // side)
    lab = _labels(strided(read, shape, f), threshold)
    if lab.dtype.itemsize > 1:  # object ids (--instances): cycle through the colours, 255 (nodata) left out
        lab = np.where(lab > 0, (lab.astype(np.int64) - 1) % (LABEL_NODATA - 1) + 1, 0)
    img = thumbnail(str(image_path), max(lab.shape), **kw)
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((lab.shape[1], lab.shape[0]),
                                                                   Image.Resampling.BOX), np.float32)
    hit = (lab > 0) & (lab != LABEL_NODATA)
    colours = PALETTE[lab % len(PALETTE)]
    img[hit] = 0.45 * img[hit] + 0.55 * colours[hit]
    Image.fromarray(img.astype(np.uint8)).save(out_png, format="PNG")
    return out_png
