"""Output writers: zarr (native), tiled TIFF/GeoTIFF and PNG.

Every writer computes into a zarr store first, chunk by chunk, then (for
TIFF/PNG) converts it tile by tile. Everything goes to a temporary name
beside the output and is moved into place only when complete, so a path
that exists is a finished output."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import OutputError
from .base import ImageMeta

log = logging.getLogger(__name__)
TIFF_TILE = 256
PNG_MAX_PIXELS = 20000 * 20000
FORMATS = {".zarr": "zarr", ".tif": "tiff", ".tiff": "tiff", ".png": "png"}


@dataclass(frozen=True)
class OutputInfo:
    """What the result is, for metadata: the input's grid and georeference."""

    meta: ImageMeta
    probabilities: bool
    classes: int
    class_names: tuple[str, ...] = ()
    source: str = ""
    model: str = ""


def output_format(path: str) -> str:
    low = path.lower().rstrip("/")
    if low.endswith((".ome.tif", ".ome.tiff", ".geojson", ".gpkg", ".ome.zarr")):
        raise OutputError(f"{path}: pyramidal OME-TIFF, OME-Zarr and vector outputs are not available yet; "
                          "write .zarr, .tif or .png")
    ext = os.path.splitext(low)[1]
    if ext not in FORMATS:
        raise OutputError(f"{path}: unknown output type {ext or '(none)'!r}; use .zarr, .tif or .png")
    return FORMATS[ext]


def check_output(path: str, overwrite: bool, probabilities: bool = False) -> None:
    """Fail before any work when the output cannot be written or cannot hold the result."""
    if probabilities and output_format(path) == "png":
        raise OutputError(f"{path}: PNG holds label masks only; write probabilities to .tif or .zarr")
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: output folder {parent} is not writable; choose another -o")
    if os.path.exists(path) and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")


class Writer:
    """Write a lazy dask result to ``path`` atomically.

    ``compute(array, zarr_array)`` is the engine's chunk-by-chunk store."""

    def __init__(self, path: str, info: OutputInfo, *, overwrite: bool = False):
        self.path = os.path.abspath(os.fspath(path).rstrip("/"))
        self.format = output_format(self.path)
        self.info, self.overwrite = info, overwrite
        check_output(self.path, overwrite, info.probabilities)
        head, tail = os.path.split(self.path)
        tag = uuid.uuid4().hex[:8]
        self._tmp_zarr = os.path.join(head, f".{tail}.{tag}.partial.zarr")
        self._tmp_file = os.path.join(head, f".{tail}.{tag}.partial{os.path.splitext(tail)[1]}")

    def write(self, array, compute: Callable) -> None:
        try:
            z = self._create_zarr(array)
            compute(array, z)
            if self.format == "zarr":
                self._move(self._tmp_zarr)
                return
            if self.format == "tiff":
                (_write_geotiff if self.info.meta.georeferenced else _write_tiff)(z, self._tmp_file, self.info)
            else:
                _write_png(z, self._tmp_file, self.info)
            self._move(self._tmp_file)
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OutputError(f"{self.path}: disk full while writing; free space on "
                                  f"{os.path.dirname(self.path)} or write elsewhere") from err
            raise
        finally:
            for p in (self._tmp_zarr, self._tmp_file):
                if os.path.isdir(p):
                    shutil.rmtree(p, ignore_errors=True)
                elif os.path.exists(p):
                    os.remove(p)

    def _create_zarr(self, array):
        import zarr

        m, i = self.info.meta, self.info
        z = zarr.create_array(
            self._tmp_zarr, shape=array.shape, chunks=tuple(c[0] for c in array.chunks), dtype=array.dtype,
            fill_value=np.nan if i.probabilities else 255,
            dimension_names=("c", "y", "x") if i.probabilities else ("y", "x"))
        z.attrs["tilerseg"] = {
            "kind": "probabilities" if i.probabilities else "labels", "classes": i.classes,
            "class_names": list(i.class_names), "nodata": None if i.probabilities else 255,
            "mpp": m.mpp, "crs": m.crs, "transform": list(m.transform) if m.transform else None,
            "source": i.source, "model": i.model}
        return z

    def _move(self, tmp: str) -> None:
        old = None
        if os.path.exists(self.path):
            old = self.path + f".{uuid.uuid4().hex[:8]}.old"
            os.rename(self.path, old)
        os.rename(tmp, self.path)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def open_writer(path, info: OutputInfo, *, overwrite: bool = False) -> Writer:
    return Writer(path, info, overwrite=overwrite)


def _kind(info: OutputInfo) -> dict:
    """What the file holds, for `tilerseg info` (TIFF description / GDAL tag)."""
    return {"kind": "probabilities" if info.probabilities else "labels", "classes": info.classes,
            "class_names": list(info.class_names)}


def _bands_first(z) -> tuple[int, int, int]:
    return (z.shape[0], *z.shape[1:]) if z.ndim == 3 else (1, *z.shape)


def _iter_windows(z, tile: int):
    """Yield ``(row0, col0, block)`` over ``z`` in strips one tile high and
    about one zarr chunk wide (whole tiles), so each chunk is decoded a few
    times at most and memory stays at one strip-chunk."""
    H, W = z.shape[-2:]
    step = max(1, z.chunks[-1] // tile) * tile  # whole tiles, so none straddles two reads
    for r0 in range(0, H, tile):
        for c0 in range(0, W, step):
            yield r0, c0, np.asarray(z[..., r0:r0 + tile, c0:c0 + step])


def _write_geotiff(z, path: str, info: OutputInfo) -> None:
    import rasterio
    from rasterio.transform import Affine
    from rasterio.windows import Window

    K, H, W = _bands_first(z)
    m = info.meta
    profile = dict(driver="GTiff", height=H, width=W, count=K, dtype="float32" if info.probabilities else "uint8",
                   crs=m.crs, transform=Affine(*m.transform), nodata=float("nan") if info.probabilities else 255,
                   tiled=True, blockxsize=TIFF_TILE, blockysize=TIFF_TILE, compress="deflate", BIGTIFF="IF_SAFER")
    with rasterio.Env(GDAL_CACHEMAX=64), rasterio.open(path, "w", **profile) as dst:
        for r0, c0, block in _iter_windows(z, TIFF_TILE):
            block = block if block.ndim == 3 else block[None]
            dst.write(block, window=Window(c0, r0, block.shape[-1], block.shape[-2]))
        dst.update_tags(TILERSEG=json.dumps(_kind(info)))
        if info.class_names:
            for k, name in enumerate(info.class_names[:K] if info.probabilities else ()):
                dst.set_band_description(k + 1, name)


def _write_tiff(z, path: str, info: OutputInfo) -> None:
    import tifffile

    K, H, W = _bands_first(z)
    t = TIFF_TILE
    dtype = np.float32 if info.probabilities else np.uint8
    fill = np.nan if info.probabilities else 255

    def tiles():
        for k in range(K):
            plane = z if z.ndim == 2 else _Plane(z, k)
            for _, _, block in _iter_windows(plane, t):
                for x in range(0, block.shape[1], t):
                    tile = np.full((t, t), fill, dtype)
                    part = block[:, x:x + t]
                    tile[:part.shape[0], :part.shape[1]] = part
                    yield tile

    kw = {}
    if info.meta.mpp:
        kw = dict(resolution=(1e4 / info.meta.mpp, 1e4 / info.meta.mpp), resolutionunit="CENTIMETER")
    tifffile.imwrite(path, tiles(), shape=(K, H, W) if K > 1 else (H, W), dtype=dtype, tile=(t, t),
                     compression="zlib", photometric="minisblack",
                     planarconfig="separate" if K > 1 else None, bigtiff=H * W * K * np.dtype(dtype).itemsize > 2**31,
                     metadata=None, description=json.dumps({"tilerseg": _kind(info)}), **kw)


class _Plane:
    """One band of a (K, H, W) zarr array, sliced lazily."""

    def __init__(self, z, k):
        self.z, self.k, self.shape, self.chunks = z, k, z.shape[1:], z.chunks[1:]

    def __getitem__(self, idx):
        return self.z[(self.k,) + tuple(i for i in idx if i is not Ellipsis)]


def _write_png(z, path: str, info: OutputInfo) -> None:
    from PIL import Image

    if z.shape[0] * z.shape[1] > PNG_MAX_PIXELS:
        raise OutputError(f"{path}: {z.shape[1]}x{z.shape[0]} px is too large for PNG; write .tif or .zarr")
    Image.fromarray(np.asarray(z[...])).save(path, format="PNG")
