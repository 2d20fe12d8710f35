"""In-memory and zarr arrays: numpy, dask, zarr arrays, and zarr stores on disk.

``tilerseg ingest`` writes a zarr group with an ``image`` array (H, W, C),
a ``valid`` mask (H, W) and the source's metadata in the group's
``tilerseg`` attribute; :class:`ZarrReader` reads it back, georeference and
all. A plain 2-D or 3-D (bands last) zarr array is read too, and so is an
OME-Zarr multiscale image (tilerseg's own outputs among them), any level."""
from __future__ import annotations

import os

import numpy as np

from ..config import MISSING_CHUNKS
from ..errors import FormatError, InputError
from .base import ImageMeta, Reader, scale_transform, reopen


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
    """A zarr array, a group written by ``tilerseg ingest``, or an OME-Zarr
    multiscale image (channel axis moved last; ``level`` picks a scale)."""

    def __init__(self, path: str, level: int = 0, missing: str = "refuse"):
        import zarr

        from .remote import display, fail, is_url

        self._path, self.level, self._missing_mode = str(path), int(level), missing
        try:
            node = zarr.open(self._path, mode="r")
        except Exception as err:
            if is_url(self._path):
                raise fail(self._path, err, "not a readable zarr store") from None
            raise FormatError(f"{self._path}: not a readable zarr store ({err})") from err
        valid, attrs, levels = None, dict(node.attrs.get("tilerseg", {})), None
        found = multiscale(node) if isinstance(node, zarr.Group) else None
        if found is not None:
            levels, axes = found
            if not 0 <= self.level < len(levels):
                raise InputError(f"{self._path}: has levels 0..{len(levels) - 1}; --level {self.level} does not exist")
            node = levels[self.level]
            if attrs:  # a tilerseg output: chunks left unwritten are nodata by design (the fill value)
                missing = "fill"
            if axes and axes[0] == "c" and node.ndim == 3:  # (instance outputs once declared a "c" they lack)
                node = _ChannelsLast(node)
        elif isinstance(node, zarr.Group):
            if "image" not in node:
                raise FormatError(f"{self._path}: zarr group without an 'image' array or OME-Zarr multiscales; "
                                  "point at the array itself (path/to/store/name) or make one with `tilerseg ingest`")
            valid = node["valid"] if "valid" in node else None
            node = node["image"]
        elif self.level:
            raise InputError(f"{self._path}: --level needs a pyramidal format; this one has a single level")
        self._gone = _missing_chunks(node, self._path, missing)
        bands = 1 if node.ndim == 2 else node.shape[2]
        f = 2 ** self.level
        mpp = attrs.get("mpp") * f if attrs.get("mpp") else None
        transform = scale_transform(attrs.get("transform") or None, f, f)
        meta = ImageMeta(shape=tuple(node.shape[:2]), bands=bands, dtype=np.dtype(node.dtype), format="zarr",
                         mpp=mpp, crs=attrs.get("crs"), transform=transform, nodata=attrs.get("nodata"),
                         band_names=tuple(attrs.get("band_names", ())), level=self.level,
                         levels=tuple(tuple(z.shape[-2:]) for z in levels) if levels else (),
                         level_mpp=tuple(attrs["mpp"] * 2 ** k for k in range(len(levels)))
                         if levels and attrs.get("mpp") else ())
        super().__init__(node, valid=valid, meta=meta, path=display(self._path))

    def _read(self, rows, cols):
        data, valid = super()._read(rows, cols)
        if self._gone:  # --missing-chunks nodata: pixels of missing chunks are invalid
            (ch, cw), gone = self._gone
            for i in range(rows[0] // ch, (rows[1] - 1) // ch + 1):
                for j in range(cols[0] // cw, (cols[1] - 1) // cw + 1):
                    if (i, j) in gone:
                        if valid is None:
                            valid = np.ones(data.shape[:2], bool)
                        valid[max(i * ch - rows[0], 0):(i + 1) * ch - rows[0],
                              max(j * cw - cols[0], 0):(j + 1) * cw - cols[0]] = False
        return data, valid

    def __reduce__(self):
        return (reopen, (ZarrReader, self._path, self.level, self._missing_mode))


def _missing_chunks(node, path: str, mode: str):
    """Check that every chunk of a zarr input is stored. A deleted or never
    written chunk reads as the fill value (0) without a word, which would
    become a silent hole in the mask. ``mode``: refuse (an error naming the
    first one), nodata (returns ``((chunk h, chunk w), {(row, col), ...})``
    so reads mark them invalid) or fill (the zarr meaning: the fill value).
    Only local stores can be listed; others are taken as they are."""
    if mode not in MISSING_CHUNKS:
        raise InputError(f"--missing-chunks {mode!r}: use one of {', '.join(MISSING_CHUNKS)}")
    z = getattr(node, "z", node)  # a channels-first OME-Zarr level seen channels-last
    root = getattr(getattr(getattr(z, "store_path", None), "store", None), "root", None)
    if mode == "fill" or root is None or not hasattr(z, "metadata"):
        return None
    folder = os.path.join(str(root), z.store_path.path)
    grid = z.shards or z.chunks
    shape = z.cdata_shape if not z.shards else tuple(-(-n // s) for n, s in zip(z.shape, grid))
    stored = set()
    for dirpath, _, files in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        stored.update(f if rel == "." else os.path.join(rel, f).replace(os.sep, "/") for f in files)
    gone = [c for c in np.ndindex(*shape) if z.metadata.encode_chunk_key(c) not in stored]
    if not gone:
        return None
    yx = (1, 2) if z is not node else (0, 1)  # (C, H, W) levels keep rows and columns at 1, 2
    ch, cw = grid[yx[0]], grid[yx[1]]
    if mode == "refuse":
        r, c = gone[0][yx[0]], gone[0][yx[1]]
        raise FormatError(f"{path}: {len(gone)} of {int(np.prod(shape))} chunks of the array are missing (the first "
                          f"at rows {r * ch}:{(r + 1) * ch}, cols {c * cw}:{(c + 1) * cw}); they would read as "
                          "zeros: restore them, or pass --missing-chunks nodata to mask them in the output "
                          "(--missing-chunks fill reads them as the array's fill value)")
    return (ch, cw), {(k[yx[0]], k[yx[1]]) for k in gone}


class _ChannelsLast:
    """A (C, H, W) array seen as (H, W, C)."""

    def __init__(self, z):
        self.z, self.ndim, self.dtype = z, 3, z.dtype
        self.shape = (*z.shape[1:], z.shape[0])

    def __getitem__(self, idx):
        return np.moveaxis(np.asarray(self.z[(slice(None), *idx)]), 0, -1)


def multiscale(group):
    """``(level arrays, axis names)`` of an OME-Zarr group (0.4 or 0.5), else None."""
    attrs = dict(group.attrs)
    ms = attrs.get("ome", attrs).get("multiscales")
    if not ms:
        return None
    paths = [d["path"] for d in ms[0]["datasets"]]
    axes = [a["name"] if isinstance(a, dict) else a for a in ms[0].get("axes", [])]
    return [group[p] for p in paths], axes


def open_output(path: str):
    """``(level-0 array, tilerseg attributes)`` of a zarr output: an
    OME-Zarr group written by tilerseg, or a bare array."""
    import zarr

    node = zarr.open(str(path), mode="r")
    attrs = dict(node.attrs.get("tilerseg", {}))
    if isinstance(node, zarr.Group):
        found = multiscale(node)
        if found is None:
            raise FormatError(f"{path}: a zarr group that is not an OME-Zarr image")
        node = found[0][0]
    return node, attrs


def is_zarr(path: str) -> bool:
    return os.path.isdir(path) and any(
        os.path.exists(os.path.join(path, f)) for f in ("zarr.json", ".zarray", ".zgroup"))
