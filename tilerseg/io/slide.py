"""Whole-slide images through openslide (.svs, .ndpi, .mrxs, .scn, DICOM, ...)."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .base import ImageMeta, Reader, reopen, resolution_mpp


class SlideReader(Reader):
    """One pyramid level of a slide; reads only the requested region.

    Pixels openslide reports as transparent (outside the scanned area) are
    returned as invalid, so they become nodata in the output."""

    def __init__(self, path: str, level: int = 0):
        import openslide

        self.path, self.level = str(path), int(level)
        try:
            self._slide = openslide.OpenSlide(self.path)
        except Exception as err:
            raise FormatError(f"{self.path}: openslide cannot open it ({err}); it is corrupt or not a "
                              "supported slide format") from err
        s = self._slide
        if not 0 <= self.level < s.level_count:
            raise FormatError(f"{self.path}: has levels 0..{s.level_count - 1}, not {self.level}: "
                              "pick one of those with --level")
        mpp0, why = _mpp(s.properties)
        level_mpp = tuple((mpp0 * d if mpp0 else None) for d in s.level_downsamples)
        W, H = s.level_dimensions[self.level]
        self._down = s.level_downsamples[self.level]
        self.meta = ImageMeta(
            shape=(H, W), bands=3, dtype=np.dtype(np.uint8), format=f"slide ({s.properties.get('openslide.vendor', 'openslide')})",
            mpp=level_mpp[self.level], levels=tuple((h, w) for w, h in s.level_dimensions),
            level_mpp=level_mpp, level=self.level, band_names=("red", "green", "blue"), unknown_mpp=why)

    def _read(self, rows, cols):
        loc = (int(round(cols[0] * self._down)), int(round(rows[0] * self._down)))
        region = self._slide.read_region(loc, self.level, (cols[1] - cols[0], rows[1] - rows[0]))
        rgba = np.asarray(region)
        alpha = rgba[..., 3]
        valid = None if alpha.min() == 255 else alpha > 0
        return rgba[..., :3], valid

    def close(self) -> None:
        self._slide.close()

    def __reduce__(self):
        return (reopen, (SlideReader, self.path, self.level))


def _mpp(props) -> tuple[float | None, str]:
    """openslide's mpp, except where it only converted a generic TIFF's
    resolution tag: that one must be a plausible scale (:func:`resolution_mpp`)."""
    mpp = props.get("openslide.mpp-x")
    if not mpp:
        return None, ""
    if props.get("openslide.vendor") == "generic-tiff" and props.get("tiff.XResolution"):
        return resolution_mpp(float(props["tiff.XResolution"]), props.get("tiff.ResolutionUnit", ""))
    return float(mpp), ""
