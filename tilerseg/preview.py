"""A thumbnail of the input with the mask overlaid, for a person to look at.

Both sides are read at reduced size without loading either whole: the
input from its coarsest pyramid level that is still large enough (or by
strided strips), the mask by strided strips."""
from __future__ import annotations

import numpy as np

from .io import open_reader

PALETTE = np.array([[0, 0, 0], [0, 230, 60], [255, 60, 40], [40, 120, 255], [255, 200, 0], [200, 0, 255],
                    [0, 220, 220], [255, 130, 0]], np.float32)


def _strided(read, shape, f: int) -> np.ndarray:
    H, W = shape
    step = f * max(1, 256 // f)
    return np.concatenate([read(y, min(y + step, H))[::f, ::f] for y in range(0, H, step)], axis=0)


def _thumbnail(path: str, side: int, **reader_kw) -> np.ndarray:
    """The image at about ``side`` px: from the coarsest pyramid level at
    least that large (any level covers the same extent), else by strides."""
    with open_reader(path, **reader_kw) as r:
        levels = r.meta.levels or (r.meta.shape,)
    level = max([k for k, (h, w) in enumerate(levels) if max(h, w) >= side] or [0])
    with open_reader(path, level=level or None, **reader_kw) as r:
        f = max(1, max(r.meta.shape) // side)
        img = _strided(lambda a, b: r.read((a, b), (0, r.meta.shape[1]))[0], r.meta.shape, f)
    img = img[..., :3] if img.shape[-1] >= 3 else np.repeat(img[..., :1], 3, axis=-1)
    if img.dtype != np.uint8:  # stretch 16-bit and float images for display
        lo, hi = np.nanpercentile(img, (2, 98))
        img = np.clip((img.astype(np.float32) - lo) / max(hi - lo, 1e-9) * 255, 0, 255)
    return img.astype(np.float32)


def _mask_rows(mask_path: str):
    """``(shape, read(row0, row1) -> (rows, W[, K]))`` for a written mask:
    zarr label or probability arrays directly, any other format by reader."""
    from .io.arrays import is_zarr

    if is_zarr(mask_path):
        from .io.arrays import open_output

        z, _ = open_output(mask_path)
        if z.ndim == 3:  # probabilities (classes, H, W)
            return z.shape[-2:], lambda a, b: np.moveaxis(np.asarray(z[:, a:b]), 0, -1)
        return z.shape, lambda a, b: np.asarray(z[a:b])
    r = open_reader(mask_path)
    return r.meta.shape, lambda a, b: r.read((a, b), (0, r.meta.shape[1]))[0]


def _labels(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Labels from label or probability rows; NaN probabilities -> 255."""
    if rows.ndim == 3 and np.issubdtype(rows.dtype, np.floating):
        nodata = np.isnan(rows).any(-1)
        probs = np.nan_to_num(rows)
        lab = (probs[..., 0] >= threshold).astype(np.uint8) if rows.shape[-1] == 1 else probs.argmax(-1)
        return np.where(nodata, 255, lab).astype(np.uint8)
    return rows.reshape(rows.shape[0], rows.shape[1])


def write_preview(image_path: str, mask_path: str, out_png: str, *, side: int = 1024, threshold: float = 0.5,
                  bands=None, reader: str = "auto") -> str:
    """Write ``out_png``: the image at about ``side`` px with class k > 0 in
    colour k of :data:`PALETTE`; nodata (255) is left uncoloured."""
    from PIL import Image

    shape, read = _mask_rows(str(mask_path))
    f = max(1, max(shape) // side)
    lab = _labels(_strided(read, shape, f), threshold)
    img = _thumbnail(str(image_path), max(lab.shape), bands=tuple(bands) if bands else None, reader=reader)
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((lab.shape[1], lab.shape[0]),
                                                                   Image.Resampling.BOX), np.float32)
    hit = (lab > 0) & (lab != 255)
    colours = PALETTE[np.minimum(lab, len(PALETTE) - 1)]
    img[hit] = 0.45 * img[hit] + 0.55 * colours[hit]
    Image.fromarray(img.astype(np.uint8)).save(out_png)
    return out_png
