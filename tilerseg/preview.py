"""A thumbnail of the input with the mask overlaid, for a person to look at.

Both sides are read at reduced size without loading either whole: the
input from its coarsest pyramid level that is still large enough (or by
strided strips), the mask by strided strips."""
from __future__ import annotations

import numpy as np

from .io import open_reader

from .io.base import LABEL_NODATA
from .io.pyramid import PALETTE as _CLASS_COLOURS

PALETTE = _CLASS_COLOURS.astype(np.float32)  # the same class colours as the outputs' colour tables


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


def _vector_labels(path: str, image_path: str, shape: tuple[int, int], **reader_kw) -> np.ndarray:
    """A polygon output rasterized onto a ``shape`` thumbnail of the input:
    features are in the input's CRS (georeferenced) or level-0 pixels."""
    import fiona
    from rasterio.features import rasterize
    from rasterio.transform import Affine

    with open_reader(image_path, **reader_kw) as r:
        m = r.meta
    H0, W0 = m.levels[0] if m.levels else m.shape
    if m.georeferenced:  # the transform of the level read, stretched to the thumbnail
        transform = Affine(*m.transform) * Affine.scale(m.shape[1] / shape[1], m.shape[0] / shape[0])
    else:
        transform = Affine.scale(W0 / shape[1], H0 / shape[0])
    with fiona.open(path) as fc:
        shapes = ((f.geometry, int(f.properties["class"])) for f in fc)
        return rasterize(shapes, out_shape=shape, transform=transform, fill=0, dtype="uint8")


def _labels(rows: np.ndarray, threshold: float) -> np.ndarray:
    """Labels from label or probability rows; NaN probabilities -> 255."""
    if rows.ndim == 3 and np.issubdtype(rows.dtype, np.floating):
        nodata = np.isnan(rows).any(-1)
        probs = np.nan_to_num(rows)
        lab = (probs[..., 0] >= threshold).astype(np.uint8) if rows.shape[-1] == 1 else probs.argmax(-1)
        return np.where(nodata, LABEL_NODATA, lab).astype(np.uint8)
    return rows.reshape(rows.shape[0], rows.shape[1])


def write_preview(image_path: str, mask_path: str, out_png: str, *, side: int = 1024, threshold: float = 0.5,
                  bands=None, reader: str = "auto") -> str:
    """Write ``out_png``: the image at about ``side`` px with class k > 0 in
    colour k of :data:`PALETTE`; nodata (255) is left uncoloured."""
    from PIL import Image

    kw = dict(bands=tuple(bands) if bands else None, reader=reader)
    if str(mask_path).lower().endswith((".geojson", ".gpkg")):
        img = _thumbnail(str(image_path), side, **kw)
        lab = _vector_labels(str(mask_path), str(image_path), img.shape[:2], **kw)
    else:
        shape, read = _mask_rows(str(mask_path))
        f = max(1, max(shape) // side)
        lab = _labels(_strided(read, shape, f), threshold)
        img = _thumbnail(str(image_path), max(lab.shape), **kw)
    img = np.asarray(Image.fromarray(img.astype(np.uint8)).resize((lab.shape[1], lab.shape[0]),
                                                                   Image.Resampling.BOX), np.float32)
    hit = (lab > 0) & (lab != LABEL_NODATA)
    colours = PALETTE[lab % len(PALETTE)]
    img[hit] = 0.45 * img[hit] + 0.55 * colours[hit]
    Image.fromarray(img.astype(np.uint8)).save(out_png)
    return out_png
