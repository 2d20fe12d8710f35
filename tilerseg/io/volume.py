"""Volumes (z, y, x): multi-page TIFF stacks, OME-TIFF with a Z axis, 3-D
zarr arrays; read lazily window by window, written slab by slab.

A volume reader returns ``(z, y, x, bands)`` arrays for any window; windows
that reach outside the volume are mirror-padded like 2-D windows
(:func:`read_padded3`). Outputs go to a zarr array first (the engine
stores chunks in parallel) and are then converted by the writer
(:mod:`tilerseg.io.writers`): ``.zarr`` keeps it (with ``multiscales`` axes
z, y, x), ``.tif``/``.tiff``/``.ome.tif`` become a TIFF stack, one tiled page
per slice (:func:`write_stack`)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, InputError
from ..geometry import pad_index
from .base import reopen

_Z_AXES = "ZQIT"  # tifffile's names for a stack axis (Z, unknown, image sequence, time)
_CHANNEL_AXES = "CS"


@dataclass(frozen=True)
class VolumeMeta:
    shape: tuple[int, int, int]
    bands: int
    dtype: np.dtype
    spacing: tuple[float, float, float] | None = None   # z, y, x in µm when known
    format: str = ""


class VolumeReader:
    """Lazy (z, y, x, bands) reads from a TIFF stack or a zarr array."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise InputError(f"{self.path}: no such file or directory; check the path")
        self._tif = None
        if self.path.rstrip("/").endswith(".zarr") or os.path.isdir(self.path):
            self._open_zarr()
        else:
            self._open_tiff()

    def _open_zarr(self) -> None:
        import zarr

        try:
            node = zarr.open(self.path, mode="r")
        except Exception as err:
            raise FormatError(f"{self.path}: not a readable zarr store ({err})") from err
        if isinstance(node, zarr.Group):
            name = "0" if "0" in node else ("image" if "image" in node else None)
            if name is None:
                raise FormatError(f"{self.path}: a zarr group without a '0' or 'image' array; point at the array")
            node = node[name]
        if node.ndim == 3:
            self._order, bands = None, 1
        elif node.ndim == 4:
            # (z, y, x, c) or (c, z, y, x): the short axis is the channel one
            self._order = (1, 2, 3, 0) if node.shape[0] < min(node.shape[1:]) and node.shape[0] <= 4 else None
            bands = node.shape[0] if self._order else node.shape[3]
        else:
            raise FormatError(f"{self.path}: a {node.ndim}-D array; a volume is (z, y, x) or (z, y, x, bands)")
        self._z = node
        shape = node.shape[1:] if self._order else node.shape[:3]
        self.meta = VolumeMeta(shape=tuple(int(s) for s in shape), bands=int(bands), dtype=np.dtype(node.dtype),
                               format="zarr")

    def _open_tiff(self) -> None:
        import tifffile
        import zarr

        try:
            self._tif = tifffile.TiffFile(self.path)
            series = self._tif.series[0]
        except Exception as err:
            raise FormatError(f"{self.path}: not a readable TIFF ({type(err).__name__}: {err})") from err
        axes = series.axes
        zs = [a for a in axes if a in _Z_AXES and series.shape[axes.index(a)] > 1]
        other = [a for a in axes if a not in "YX" + _CHANNEL_AXES + _Z_AXES and series.shape[axes.index(a)] > 1]
        if len(zs) != 1 or other:
            raise FormatError(f"{self.path}: axes {axes} with shape {series.shape}: a volume needs one stack axis "
                              "(Z) besides Y, X and channels; for a 2-D image use a 2-D model")
        self._z = zarr.open_array(series.aszarr(), mode="r")
        keep = [axes.index(zs[0]), axes.index("Y"), axes.index("X")]
        chan = [i for i, a in enumerate(axes) if a in _CHANNEL_AXES]
        drop = [i for i in range(len(axes)) if i not in keep + chan]  # singleton axes
        self._axes, self._keep, self._chan, self._drop = axes, keep, chan, drop
        self._order = "tiff"
        bands = int(np.prod([series.shape[i] for i in chan])) if chan else 1
        spacing = None
        if self._tif.is_ome:
            spacing = _ome_spacing(self._tif.ome_metadata)
        self.meta = VolumeMeta(shape=tuple(int(series.shape[i]) for i in keep), bands=bands,
                               dtype=np.dtype(series.dtype), spacing=spacing, format="tiff")

    def read(self, z: tuple[int, int], y: tuple[int, int], x: tuple[int, int]) -> np.ndarray:
        """Voxels ``(z, y, x, bands)`` of a window inside the volume."""
        Z, H, W = self.meta.shape
        if not (0 <= z[0] < z[1] <= Z and 0 <= y[0] < y[1] <= H and 0 <= x[0] < x[1] <= W):
            raise ValueError(f"window z {z} y {y} x {x} outside volume {Z}x{H}x{W}")
        try:
            if self._order == "tiff":
                idx = [slice(None)] * len(self._axes)
                for i, (a, b) in zip(self._keep, (z, y, x)):
                    idx[i] = slice(a, b)
                for i in self._drop:
                    idx[i] = 0
                data = np.asarray(self._z[tuple(idx)])
                names = [a for i, a in enumerate(self._axes) if i not in self._drop]
                order = [names.index(self._axes[i]) for i in self._keep] + \
                    [names.index(self._axes[i]) for i in self._chan]
                data = data.transpose(order)
                return data.reshape(*data.shape[:3], -1)
            if self._order is None:
                data = np.asarray(self._z[z[0]:z[1], y[0]:y[1], x[0]:x[1]])
                return data[..., None] if data.ndim == 3 else data
            data = np.asarray(self._z[:, z[0]:z[1], y[0]:y[1], x[0]:x[1]])
            return np.moveaxis(data, 0, -1)
        except ValueError:
            raise
        except Exception as err:
            raise FormatError(f"{self.path}: could not decode z {z}, y {y}, x {x} ({type(err).__name__}: {err}); "
                              "the file is damaged there") from err

    def close(self) -> None:
        if self._tif is not None:
            self._tif.close()

    def __reduce__(self):
        return (reopen, (VolumeReader, self.path))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _ome_spacing(xml: str | None):
    import re

    if not xml:
        return None
    vals = {}
    for axis in "XYZ":
        m = re.search(rf'PhysicalSize{axis}="([0-9.eE+-]+)"', xml)
        vals[axis] = float(m.group(1)) if m else None
    if vals["X"] is None:
        return None
    return (vals["Z"] or vals["X"], vals["Y"] or vals["X"], vals["X"])


def is_volume_file(path: str) -> bool:
    """Whether ``path`` holds a stack (more than one slice along Z)."""
    try:
        VolumeReader(path).close()
        return True
    except (FormatError, InputError):
        return False


def read_padded3(reader: VolumeReader, ranges, mode: str) -> np.ndarray:
    """A window that may reach outside the volume, padded like
    :func:`numpy.pad` with ``mode`` would pad the whole volume."""
    idx = [pad_index(np.arange(a, b), n, mode)[0] for (a, b), n in zip(ranges, reader.meta.shape)]
    box = [(int(i.min()), int(i.max()) + 1) for i in idx]
    data = reader.read(*box)
    inside = all(a >= 0 and b <= n for (a, b), n in zip(ranges, reader.meta.shape))
    if inside:
        return data
    return data[np.ix_(idx[0] - box[0][0], idx[1] - box[1][0], idx[2] - box[2][0])]


def write_stack(path: str, z, ome: bool, spacing, uid: str | None = None) -> None:
    """One tiled, deflate-compressed page per slice (per channel and slice
    for probabilities), written slab by slab. ``uid``: the OME UUID (the
    writer derives it from the run's fingerprint, so a resumed run writes
    the same bytes)."""
    import tifffile

    shape = z.shape
    slices = (lambda: (np.asarray(z[:, k]) for k in range(shape[1]))) if z.ndim == 4 else \
        (lambda: (np.asarray(z[k]) for k in range(shape[0])))
    axes = "ZCYX" if z.ndim == 4 else "ZYX"
    data_shape = (shape[1], shape[0], *shape[2:]) if z.ndim == 4 else shape
    meta = {"axes": axes}
    if spacing:
        meta.update({"PhysicalSizeZ": spacing[0], "PhysicalSizeY": spacing[1], "PhysicalSizeX": spacing[2]})
    tile = (min(256, ((shape[-2] + 15) // 16) * 16), min(256, ((shape[-1] + 15) // 16) * 16))
    kw = {"metadata": {"axes": axes}}
    if ome:
        xml = tifffile.OmeXml(**({"UUID": uid} if uid else {}))
        xml.addimage(np.dtype(z.dtype), data_shape, (int(np.prod(data_shape[:-2])), 1, 1, *data_shape[-2:], 1),
                     **meta)
        kw = {"metadata": None, "description": xml.tostring()}
    with tifffile.TiffWriter(path, bigtiff=True, ome=False) as tw:
        tw.write(_pages(slices()), shape=data_shape, dtype=z.dtype, tile=tile, compression="zlib",
                 photometric="minisblack", **kw)


def _pages(slabs):
    for slab in slabs:
        if slab.ndim == 3:
            yield from slab
        else:
            yield slab
