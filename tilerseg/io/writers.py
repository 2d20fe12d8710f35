"""Output writers: OME-Zarr, pyramidal (OME-)TIFF, COG, PNG and polygons.

Every writer computes into a zarr group first, chunk by chunk (level ``0``
of an OME-Zarr multiscale), resamples it to the input's full resolution
when asked, adds reduced levels, then converts it tile by tile or object
by object. Everything goes to a temporary name beside the output and is
moved into place only when complete, so a path that exists is a finished
output."""
from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from typing import Callable

import numpy as np

from ..errors import OutputError
from .base import LABEL_NODATA, ImageMeta

log = logging.getLogger(__name__)
PNG_MAX_PIXELS = 20000 * 20000
FORMATS = {".zarr": "zarr", ".ome.zarr": "zarr", ".ome.tif": "ome-tiff", ".ome.tiff": "ome-tiff",
           ".tif": "tiff", ".tiff": "tiff", ".png": "png", ".geojson": "vector", ".gpkg": "vector"}
LABELS_ONLY = {"png": "PNG", "vector": "polygon outputs"}


@dataclass(frozen=True)
class OutputInfo:
    """What the result is, for metadata.

    ``meta`` is the grid the model ran on (the input's, at the processed
    level or mpp). ``target``, when given, is the input's full-resolution
    grid: the result is resampled onto it before writing."""

    meta: ImageMeta
    probabilities: bool
    classes: int
    class_names: tuple[str, ...] = ()
    source: str = ""
    model: str = ""
    target: ImageMeta | None = None

    @property
    def out_meta(self) -> ImageMeta:
        return self.target or self.meta

    def kind(self) -> dict:
        """What the file holds, for `tilerseg info` and readers of the output."""
        m = self.out_meta
        return {"kind": "probabilities" if self.probabilities else "labels", "classes": self.classes,
                "class_names": list(self.class_names), "nodata": None if self.probabilities else LABEL_NODATA,
                "mpp": m.mpp, "crs": m.crs, "transform": list(m.transform) if m.transform else None,
                "source": self.source, "model": self.model}


def output_format(path: str) -> str:
    low = os.fspath(path).lower().rstrip("/")
    for ext in sorted(FORMATS, key=len, reverse=True):
        if low.endswith(ext):
            return FORMATS[ext]
    ext = os.path.splitext(low)[1]
    raise OutputError(f"{path}: unknown output type {ext or '(none)'!r}; use .zarr, .ome.tif, .tif, .png, "
                      ".geojson or .gpkg")


def is_url(path) -> bool:
    """An fsspec URL (``s3://bucket/mask.zarr``, ``gs://``, ``memory://``...)."""
    return "://" in os.fspath(path)


def check_output(path: str, overwrite: bool, probabilities: bool = False) -> None:
    """Fail before any work when the output cannot be written or cannot hold the result."""
    fmt = output_format(path)
    if probabilities and fmt in LABELS_ONLY:
        raise OutputError(f"{path}: {LABELS_ONLY[fmt]} hold label masks only; write probabilities to .tif "
                          "or .zarr, or drop --probabilities")
    if is_url(path):
        import fsspec

        if fmt != "zarr":
            raise OutputError(f"{path}: URLs take .zarr outputs (written chunk by chunk through fsspec); write "
                              f"other formats to a local or shared path")
        try:
            fs, root = fsspec.core.url_to_fs(path)
        except (ImportError, ValueError) as err:
            raise OutputError(f"{path}: cannot write there ({err}); install the fsspec backend for it "
                              "(s3fs, gcsfs, adlfs...)") from None
        if fs.exists(root) and not overwrite:
            raise OutputError(f"{path}: already exists; pass --overwrite to replace it")
        return
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise OutputError(f"{path}: output folder {parent} does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"{path}: output folder {parent} is not writable; choose another -o")
    if os.path.exists(path) and not overwrite:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")


class Writer:
    """Write a lazy result to ``path`` atomically and resumably.

    Work happens in a hidden state folder beside the output,
    ``.<name>.tilerseg/``: the result's zarr group (``work.zarr``), one
    mark per finished block (``done/``) and what the run was (``run.json``,
    its ``fingerprint``). The output is moved into place when complete and
    the folder removed. When a run fails or is killed, the folder stays;
    ``resume=True`` with the same fingerprint reopens it and the engine
    computes only unmarked blocks. Any other run starts it afresh.

    ``compute(source, zarr_array, marks)`` is the engine's block-by-block
    store (``source`` has ``shape``, ``chunks`` and ``dtype``); its return
    value is returned by :meth:`write`.

    A ``.zarr`` output may be an fsspec URL (object stores have no rename):
    the group is written in place, its OME metadata last, so that until the
    run completes it does not read as an image, and the state folder sits
    beside it under the same URL scheme."""

    def __init__(self, path: str, info: OutputInfo, *, overwrite: bool = False, workers: int = 2,
                 resume: bool = False, fingerprint: dict | None = None):
        import fsspec

        self.remote = is_url(path)
        self.path = os.fspath(path).rstrip("/") if self.remote else os.path.abspath(os.fspath(path).rstrip("/"))
        self.format = output_format(self.path)
        self.info, self.overwrite, self.workers = info, overwrite, workers
        self.resume, self.fingerprint = resume, fingerprint
        check_output(self.path, overwrite, info.probabilities)
        head, tail = self.path.rsplit("/", 1) if self.remote else os.path.split(self.path)
        self.fs = fsspec.core.url_to_fs(self.path)[0] if self.remote else fsspec.filesystem("file")
        self.state = f"{head}/.{tail}.tilerseg"
        self._tmp_zarr = self.path if self.remote else f"{self.state}/work.zarr"
        self._tmp_file = f"{self.state}/out.partial{os.path.splitext(tail)[1]}"
        self.marks_dir = f"{self.state}/done"

    def _open_state(self, first: str):
        """The zarr group to compute into: the earlier run's when resuming it
        (keeping only the array computed block by block), else a new one."""
        import json

        import zarr

        fs, stamp = self.fs, f"{self.state}/run.json"
        if self.resume and fs.exists(stamp):
            with fs.open(stamp, "r") as f:
                old = json.load(f)
            if old.get("fingerprint") != (self.fingerprint or {}).get("fingerprint"):
                raise OutputError(f"{self.path}: the unfinished run in {self.state} used other settings "
                                  f"({_differences(old, self.fingerprint or {})}); rerun without --resume to "
                                  "start over, or with that run's settings")
            group = zarr.open_group(self._tmp_zarr, mode="r+")
            for name in [n for n in group.array_keys() if n != first]:
                del group[name]
            return group, True
        if fs.exists(self.state):
            log.info("%s: discarding the unfinished run in %s%s", self.path, self.state,
                     "" if self.resume else " (pass --resume to continue it instead)")
            fs.rm(self.state, recursive=True)
        fs.makedirs(self.marks_dir, exist_ok=True)
        with fs.open(stamp, "w") as f:
            json.dump(self.fingerprint or {}, f, indent=1, default=str)
        return zarr.open_group(self._tmp_zarr, mode="w"), False

    def write(self, source, compute: Callable):
        from ..engine import ChunkMarks

        target = self.info.target
        first_name = "processed" if target else "0"
        owned = False
        try:
            group, resumed = self._open_state(first_name)
            owned = True
            first = group[first_name] if resumed and first_name in group else \
                self._create(group, first_name, source.shape, source.chunks, source.dtype)
            if tuple(first.shape) != tuple(source.shape):
                raise OutputError(f"{self.path}: the unfinished run in {self.state} has another shape; rerun "
                                  "without --resume")
            result = compute(source, first, ChunkMarks(self.marks_dir))
            if target is not None:
                from .pyramid import upsample_into

                z0 = self._create(group, "0", (*source.shape[:-2], *target.shape), source.chunks, source.dtype)
                upsample_into(first, z0, self.info.probabilities, workers=self.workers)
                del group["processed"]
            self._convert(group)
            owned = False
            self._remove(self.state)
            return result
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OutputError(f"{self.path}: disk full while writing; free space on "
                                  f"{os.path.dirname(self.path)} and rerun with --resume, or write "
                                  "elsewhere") from err
            raise
        finally:
            if owned:  # failed or interrupted: keep finished blocks worth resuming, else leave nothing
                if ChunkMarks(self.marks_dir).done():
                    log.warning("%s: not finished; the finished blocks are kept in %s: rerun the same command "
                                "with --resume to compute only the rest", self.path, self.state)
                else:
                    self._remove(self.state)
                    if self.remote:
                        self._remove(self.path)

    def _remove(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError as err:
            log.warning("could not remove %s: %s", path, err)

    def _create(self, group, name, shape, chunks, dtype):
        probabilities = self.info.probabilities
        return group.create_array(name, shape=shape, chunks=tuple(c[0] for c in chunks), dtype=dtype,
                                  fill_value=np.nan if probabilities else LABEL_NODATA,
                                  dimension_names=("c", "y", "x") if probabilities else ("y", "x"))

    def _convert(self, group) -> None:
        """Turn level 0 of the finished group into the requested format."""
        from .pyramid import build_levels, ome_metadata, physical_pixel
        from .tiffout import write_cog, write_pyramid_tiff

        info, m, z0 = self.info, self.info.out_meta, group["0"]
        if os.path.exists(self._tmp_file):  # left by an interrupted conversion
            os.remove(self._tmp_file)
        if self.format == "vector":
            from .polygons import write_vector

            transform, crs = vector_transform(m)
            n = write_vector(z0, self._tmp_file, class_names=info.class_names, transform=transform, crs=crs)
            log.info("%s: %d polygons", self.path, n)
            return self._move(self._tmp_file)
        if self.format == "png":
            _write_png(z0, self._tmp_file)
            return self._move(self._tmp_file)
        if self.format == "tiff" and m.georeferenced:
            write_cog(z0, self._tmp_file, m, info.kind())  # GDAL makes the overviews
            return self._move(self._tmp_file)
        levels = build_levels(group, info.probabilities, workers=self.workers)
        if self.format == "zarr":
            size, unit = physical_pixel(m)
            group.attrs.update(ome=ome_metadata([z.shape[-2:] for z in levels], probabilities=info.probabilities,
                                                classes=info.classes, class_names=info.class_names,
                                                pixel_size=size, unit=unit),
                               tilerseg=info.kind())
            return self._move(self._tmp_zarr)
        uid = None
        if self.fingerprint and self.fingerprint.get("fingerprint"):
            uid = str(uuid.uuid5(uuid.NAMESPACE_OID, self.fingerprint["fingerprint"]))
        write_pyramid_tiff(levels, self._tmp_file, m, info.kind(), ome=self.format == "ome-tiff", uid=uid)
        return self._move(self._tmp_file)

    def _move(self, tmp: str) -> None:
        if tmp == self.path:  # written in place (a URL)
            return
        old = None
        if os.path.exists(self.path):
            old = self.path + f".{uuid.uuid4().hex[:8]}.old"
            os.rename(self.path, old)
        os.rename(tmp, self.path)
        if old:
            shutil.rmtree(old) if os.path.isdir(old) else os.remove(old)


def open_writer(path, info: OutputInfo, *, overwrite: bool = False, resume: bool = False,
                fingerprint: dict | None = None) -> Writer:
    return Writer(path, info, overwrite=overwrite, resume=resume, fingerprint=fingerprint)


def _differences(old: dict, new: dict) -> str:
    """The settings that differ between two run stamps, for the error."""
    a, b = old.get("settings", {}), new.get("settings", {})
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(keys[:6]) if keys else "another input or model file"


def vector_transform(meta: ImageMeta) -> tuple[tuple[float, ...] | None, str | None]:
    """Where polygon coordinates live: the input's CRS for georeferenced
    inputs, else the input's level-0 pixels (what QuPath expects of a slide),
    whatever level or mpp the model ran at."""
    if meta.georeferenced:
        return tuple(meta.transform), meta.crs
    H0, W0 = meta.levels[0] if meta.levels else meta.shape
    H, W = meta.shape
    if (H0, W0) == (H, W):
        return None, None
    return (W0 / W, 0.0, 0.0, 0.0, H0 / H, 0.0), None


def _write_png(z, path: str) -> None:
    from PIL import Image

    if z.shape[0] * z.shape[1] > PNG_MAX_PIXELS:
        raise OutputError(f"{path}: {z.shape[1]}x{z.shape[0]} px is too large for PNG; write .tif or .zarr")
    from .pyramid import palette

    labels = np.ascontiguousarray(z[...], np.uint8)
    img = Image.frombytes("P", labels.shape[::-1], labels.tobytes())  # values kept; the palette shows classes
    img.putpalette(palette(LABEL_NODATA).ravel().tolist())
    img.save(path, format="PNG")
