"""In-memory and zarr arrays: numpy, dask, zarr arrays, and zarr stores on disk.

``tilerseg ingest`` writes a zarr group with an ``image`` array (H, W, C),
a ``valid`` mask (H, W) and the source's metadata in the group's
``tilerseg`` attribute; :class:`ZarrReader` reads it back, georeference and
all. A plain 2-D or 3-D (bands last) zarr array is read too."""
from __future__ import annotations

import os

import numpy as np

from ..errors import FormatError, InputError
from .base import ImageMeta, Reader


class ArrayReader(Reader):
    """Any array with ``shape`` (H, W) or (H, W, C) and numpy-style slicing."""

    def __init__(self, array, valid=None, meta: ImageMeta | None = None, path: str = "<array>"):
        self.path = path
        if array.ndim not in (2, 3):
            raise InputError(f"{path}: expected an (H, W) or (H, W, bands) array, got shape {array.shape}")
        self._array, self._valid = array, valid
        if meta is None:
            bands = 1 if array.ndim == 2 else array.shape[2]
            meta = ImageMeta(shape=tuple(array.shape[:2]), bands=bands, dtype=np.dtype(array.dtype), format="array")
        self.meta = meta

    def _read(self, rows, cols):
        win = (slice(*rows), slice(*cols))
        data = np.asarray(self._array[win])
        valid = None if self._valid is None else np.asarray(self._valid[win]).astype(bool)
        return data, valid


class ZarrReader(ArrayReader):
    """A zarr array, or a group written by ``tilerseg ingest``."""

    def __init__(self, path: str):
        import zarr

        self._path = str(path)
        try:
            node = zarr.open(self._path, mode="r")
        except Exception as err:
            raise FormatError(f"{self._path}: not a readable zarr store ({err})") from err
        valid, attrs = None, {}
        if isinstance(node, zarr.Group):
            if "image" not in node:
                raise FormatError(f"{self._path}: zarr group without an 'image' array; point at the array "
                                  "itself (path/to/store/name) or make one with `tilerseg ingest`")
            attrs = dict(node.attrs.get("tilerseg", {}))
            valid = node["valid"] if "valid" in node else None
            node = node["image"]
        else:
            attrs = dict(node.attrs.get("tilerseg", {}))
        bands = 1 if node.ndim == 2 else node.shape[2]
        transform = tuple(attrs["transform"]) if attrs.get("transform") else None
        meta = ImageMeta(shape=tuple(node.shape[:2]), bands=bands, dtype=np.dtype(node.dtype), format="zarr",
                         mpp=attrs.get("mpp"), crs=attrs.get("crs"), transform=transform,
                         nodata=attrs.get("nodata"), band_names=tuple(attrs.get("band_names", ())))
        super().__init__(node, valid=valid, meta=meta, path=self._path)

    def __reduce__(self):
        return (ZarrReader, (self._path,))


def is_zarr(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zarray", ".zgroup"))
