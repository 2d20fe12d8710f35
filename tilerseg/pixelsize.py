"""The model's pixel size against the image's, checked once before a run.

A model sees objects at the size it learnt them: the shipped nuclei model,
trained at 0.5 µm/px, run on 300-m Landsat pixels says "nucleus 93%" of a
county. So where the weights declare a pixel size (a tilerseg checkpoint's
``mpp``, an ONNX or program's metadata):

- an image whose pixels are in another unit (a georeferenced raster in
  metres or degrees, against a microscope's µm) is refused in one line
  naming both and ``--ignore-pixel-size``;
- a ratio beyond :data:`RATIO` in the same unit is warned, naming
  ``--mpp``/``--level``, and recorded in the output's metadata;
- an image without a pixel size runs, and the tiling line says the pixel
  size went unchecked.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass

from .errors import InputError

RATIO = 1.5


class PixelSizeWarning(UserWarning):
    """The image's pixels are much larger or smaller than the model's."""


@dataclass(frozen=True)
class PixelCheck:
    """What the check found: ``note`` for the tiling line, ``record`` (or
    None) for the output's metadata."""

    note: str = ""
    record: dict | None = None


def crs_unit(crs: str | None) -> str | None:
    """The linear unit a CRS's WKT names last (``metre``, ``degree``, ``US survey foot``...)."""
    units = re.findall(r'UNIT\["([^"]+)"', crs or "")
    return units[-1] if units else None


SYMBOLS = {"metre": "m", "meter": "m", "metres": "m", "degree": "°", "foot": "ft", "US survey foot": "US ft"}


def check(model_mpp: float | None, meta, path: str, *, ignore: bool = False, stacklevel: int = 3) -> PixelCheck:
    """Check ``meta`` (an :class:`~tilerseg.io.base.ImageMeta`) against the
    model's ``model_mpp`` (µm per pixel; None: the weights declare none)."""
    if not model_mpp:
        return PixelCheck()
    if meta.mpp:
        ratio = meta.mpp / model_mpp
        if max(ratio, 1 / ratio) <= RATIO:
            return PixelCheck(f"pixel size {meta.mpp:.4g} µm/px checked against the model's {model_mpp:g}")
        warnings.warn(f"{path}: the image is read at {meta.mpp:.4g} µm/px, but the weights were trained at "
                      f"{model_mpp:g} µm/px ({ratio:.2f}x): objects will not have the size the model learnt; pass "
                      f"--mpp {model_mpp:g} (or the --level that matches)", PixelSizeWarning, stacklevel=stacklevel)
        record = {"model_mpp": model_mpp, "image_mpp": meta.mpp, "ratio": round(ratio, 4)}
        return PixelCheck(f"pixel size {meta.mpp:.4g} µm/px, {ratio:.2f}x the model's {model_mpp:g} (warned)",
                          record)
    unit = crs_unit(meta.crs) if meta.georeferenced else None
    if unit is None:
        return PixelCheck("pixel size unchecked (the image has none)")
    a, b, _, d, e, _ = meta.transform
    size = max((a * a + d * d) ** 0.5, (b * b + e * e) ** 0.5)
    record = {"model_mpp": model_mpp, "image_pixel": size, "image_unit": unit, "ignored": True}
    unit = SYMBOLS.get(unit, unit)
    if ignore:
        return PixelCheck(f"pixel size not checked (--ignore-pixel-size: the image's {size:.4g} {unit} against "
                          f"the model's {model_mpp:g} µm)", record)
    raise InputError(f"{path}: its pixels are {size:.4g} {unit} (from its CRS), but the weights were trained at "
                     f"{model_mpp:g} µm/px: the units differ, so the model is not for this image; pass "
                     "--ignore-pixel-size to run it anyway")
