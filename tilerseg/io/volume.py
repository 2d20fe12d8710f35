"""Volumes (z, y, x): multi-page TIFF stacks, OME-TIFF with a Z axis, 3-D
zarr arrays; read lazily window by window, written slab by slab.

A volume reader returns ``(z, y, x, bands)`` arrays for any window; windows
that reach outside the volume are mirror-padded like 2-D windows
(:func:`read_padded3`). Outputs go to a zarr array first (the engine
stores chunks in parallel) and are then converted: ``.zarr`` keeps it (with
``multiscales`` axes z, y, x), ``.tif``/``.tiff``/``.ome.tif`` become a TIFF
stack, one tiled page per slice."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass

import numpy as np

from ..errors import FormatError, InputError
from ..geometry import pad_index
from .base import reopen

VOLUME_OUTPUTS = (".zarr", ".ome.zarr", ".tif", ".tiff", ".ome.tif", ".ome.tiff")
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


def check_volume_output(path: str, overwrite: bool) -> None:
    low = path.lower()
    if not low.endswith(VOLUME_OUTPUTS):
        raise InputError(f"{path}: a volume is written as .zarr (or .ome.zarr) or as a TIFF stack "
                         "(.tif, .tiff, .ome.tif)")
    if os.path.exists(path) and not overwrite:
        raise InputError(f"{path} exists; pass --overwrite to replace it")


def write_volume(path: str, array, compute, *, attrs: dict, spacing=None, overwrite: bool = False) -> str:
    """Compute the lazy ``array`` ((z, y, x) labels or (c, z, y, x)
    probabilities) into ``path``, under a temporary name moved into place
    only when complete. ``compute(array, zarr_array)`` stores it."""
    import zarr

    path = os.fspath(path)
    parent = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{os.getpid()}")
    store = tmp if path.lower().endswith(".zarr") else tmp + ".zarr"
    _remove(store)
    try:
        group = zarr.open_group(store, mode="w")
        chunks = tuple(c[0] for c in array.chunks)
        z = group.create_array("0", shape=array.shape, chunks=chunks, dtype=array.dtype,
                               fill_value=np.nan if array.dtype.kind == "f" else 0)
        axes = ([{"name": "c", "type": "channel"}] if array.ndim == 4 else []) + \
            [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
        scale = ([1.0] if array.ndim == 4 else []) + list(spacing or (1.0, 1.0, 1.0))
        group.attrs.update({"tilerseg": attrs, "ome": {"version": "0.5", "multiscales": [{
            "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [{"type": "scale", "scale": scale}]}],
            "name": attrs.get("source", "")}]}})
        compute(array, z)
        if path.lower().endswith(".zarr"):
            _remove(path)
            os.replace(tmp, path)
            return path
        _write_stack(tmp, z, path.lower().endswith((".ome.tif", ".ome.tiff")), spacing)
        _remove(path)
        os.replace(tmp, path)
        _remove(store)
        return path
    except BaseException:
        _remove(tmp)
        _remove(store)
        raise


def _write_stack(path: str, z, ome: bool, spacing) -> None:
    """One tiled, deflate-compressed page per slice (per channel and slice
    for probabilities), written slab by slab."""
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
    with tifffile.TiffWriter(path, bigtiff=True, ome=ome) as tw:
        tw.write(_pages(slices()), shape=data_shape, dtype=z.dtype, tile=tile, compression="zlib",
                 metadata=meta if ome else {"axes": axes}, photometric="minisblack")


def _pages(slabs):
    for slab in slabs:
        if slab.ndim == 3:
            yield from slab
        else:
            yield slab


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)
