"""PNG, JPEG and other small raster formats through Pillow.

These formats cannot be read window by window, so the image is decoded
once, when opened; for images larger than memory use a tiled TIFF or
``tilerseg ingest`` on a format that can."""
from __future__ import annotations

import numpy as np

from ..errors import FormatError
from .base import ImageMeta, Reader, reopen


class PillowReader(Reader):
    """Gray or RGB, 8- or 16-bit; an alpha channel becomes the validity mask."""

    def __init__(self, path: str):
        from PIL import Image

        self.path = str(path)
        try:
            with Image.open(self.path) as img:
                _check_size(img, self.path)
                img.load()
                self._pixels, self._valid = _to_array(img)
        except Image.DecompressionBombError as err:  # Pillow refuses before _check_size when the header is huge
            raise FormatError(f"{self.path}: {err}; {_TOO_LARGE}") from err
        except (OSError, SyntaxError, ValueError) as err:
            raise FormatError(f"{self.path}: Pillow cannot decode it ({err}); it is corrupt or not an image") from err
        H, W, C = self._pixels.shape
        self.meta = ImageMeta(shape=(H, W), bands=C, dtype=self._pixels.dtype, format="image (Pillow)")

    def _read(self, rows, cols):
        win = (slice(*rows), slice(*cols))
        return self._pixels[win], (None if self._valid is None else self._valid[win])

    def __reduce__(self):
        return (reopen, (PillowReader, self.path))


MAX_PIXELS = 2 ** 28  # 268 Mpx: 0.8 GB as RGB; PNG/JPEG cannot be read by windows, so all of it is decoded
_TOO_LARGE = ("PNG/JPEG cannot be read window by window, so the whole image would be decoded into memory: "
              "convert it to a tiled TIFF first (gdal_translate -co TILED=YES -co COMPRESS=DEFLATE IN OUT.tif, "
              "or vips tiffsave IN OUT.tif --tile --compression deflate)")


def _check_size(img, path: str) -> None:
    """Refuse an image too large to decode whole, before decoding it."""
    w, h = img.size
    if w * h > MAX_PIXELS:
        raise FormatError(f"{path}: {w}x{h} px ({w * h / 1e6:.0f} Mpx) is too large for this format; {_TOO_LARGE}")


def _to_array(img) -> tuple[np.ndarray, np.ndarray | None]:
    mode = img.mode
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    elif mode in ("1", "CMYK", "YCbCr", "LAB", "HSV"):
        img = img.convert("L" if mode == "1" else "RGB")
        mode = img.mode
    arr = np.asarray(img)
    if mode.startswith("I;16"):
        arr = arr.astype(np.uint16)
    elif mode == "I":
        arr = arr.astype(np.uint16) if arr.min() >= 0 and arr.max() <= 65535 else arr.astype(np.int32)
    if arr.ndim == 2:
        return arr[..., None], None
    if mode in ("RGBA", "LA"):
        alpha = arr[..., -1]
        return np.ascontiguousarray(arr[..., :-1]), (None if alpha.min() == alpha.max() == 255 else alpha > 0)
    return arr, None
