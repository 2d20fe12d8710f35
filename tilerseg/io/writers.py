"""The one writer: every byte tilerseg writes goes through :class:`Writer`.

Masks (OME-Zarr, pyramidal OME-TIFF, COG, PNG, polygons), volumes (OME-Zarr
or TIFF stacks), the preview PNG and ``ingest`` copies all get the same
guarantees: a lock per output, refusal to write over an input or (without
``overwrite``) over an existing path, checked again at the move, work in a
hidden state folder with a mark per finished block (``resume``), nodata 255
or NaN, a temporary name moved into place only when complete, and one-line
errors. The result is computed into a zarr group first, chunk by chunk
(level ``0`` of an OME-Zarr multiscale), resampled to the input's full
resolution when asked, given reduced levels, then converted tile by tile
or object by object."""
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
from .base import LABEL_NODATA, PROBABILITY_SCALE, ImageMeta
from .lock import OutputLock
from .marks import ChunkMarks
from .pyramid import Parallel, serial
from .remote import display, mask_text

log = logging.getLogger(__name__)


def compressors(dtype) -> list | str:
    """The codecs of an output's zarr arrays (levels copy level 0's).

    Float probabilities: Blosc lz4 with byte shuffle. zarr's default zstd
    took 1.2 s of a 4096^2 run's 12.6 s on a 2-core EPYC, on a pool thread
    beside the model, to compress 67 MB of them by 1.18x; lz4 with shuffle
    writes them 8x faster and smaller (1.26x). Labels and uint8
    probabilities keep zstd, which shrinks a label mask 47x at 0.12 GB/s."""
    if np.dtype(dtype).kind == "f":
        from zarr.codecs import BloscCodec

        return [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    return "auto"


PNG_MAX_PIXELS = 20000 * 20000
VOLUME_FORMATS = ("zarr", "ome-tiff", "tiff")
FORMATS = {".zarr": "zarr", ".ome.zarr": "zarr", ".ome.tif": "ome-tiff", ".ome.tiff": "ome-tiff",
           ".tif": "tiff", ".tiff": "tiff", ".png": "png", ".geojson": "vector", ".gpkg": "vector"}
LABELS_ONLY = {"png": "PNG holds", "vector": "polygon outputs hold"}
PLACING = "placing.json"  # in the state folder: the products being moved into place


@dataclass(frozen=True)
class OutputInfo:
    """What the result is, for metadata.

    ``meta`` is the grid the model ran on (the input's, at the processed
    level or mpp). ``target``, when given, is the input's full-resolution
    grid: the result is resampled onto it before writing."""

    meta: "ImageMeta | VolumeMeta"  # noqa: F821 (a VolumeMeta for volumes)
    probabilities: bool
    classes: int
    class_names: tuple[str, ...] = ()
    source: str = ""
    model: str = ""
    target: ImageMeta | None = None
    probability_dtype: str = "float32"  # or uint8: 0..254 = probability x 254, 255 = nodata (8-bit viewers)
    vector_crs: str = "wgs84"           # GeoJSON coordinates: RFC 7946 lon/lat, or the input's CRS (native)
    instances: bool = False             # uint32 object ids (0 = none) from the probabilities, by ``post``
    objects: dict | None = None         # an instance output's summary (objects per class, median area)
    pixel_size: dict | None = None      # the model's pixel size against the image's, where they differ
    source_id: dict | None = None       # the input's level-0 size and bytes: which image a viewer may lay it on

    @property
    def out_meta(self) -> ImageMeta:
        return self.target or self.meta

    @property
    def volume(self) -> bool:
        return len(self.meta.shape) == 3

    def band_names(self) -> list[str]:
        """The name of each probability band: the classes', and for a binary
        model (one band, P(foreground)) the foreground class's."""
        names = list(self.class_names)
        if self.classes == 1:
            return [names[1] if len(names) > 1 else "foreground"]
        return [names[k] if k < len(names) else f"class {k}" for k in range(self.classes)]

    def kind(self) -> dict:
        """What the file holds, for `tilerseg info` and readers of the output."""
        out = self._kind()
        if self.pixel_size:
            out["pixel_size"] = self.pixel_size
        if self.source_id:
            out["source_id"] = self.source_id
        return out

    def _kind(self) -> dict:
        m = self.out_meta
        if self.instances:
            return {"kind": "instances", "dtype": "uint32", "classes": self.classes,
                    "class_names": list(self.class_names), "nodata": None, "background": 0, "mpp": m.mpp,
                    "crs": m.crs, "transform": list(m.transform) if m.transform else None, "source": self.source,
                    "model": self.model, "objects": self.objects}
        if self.probabilities and not self.volume:
            uint8 = self.probability_dtype == "uint8"
            return {"kind": "probabilities", "classes": self.classes, "class_names": list(self.class_names),
                    "band_names": self.band_names(), "dtype": self.probability_dtype,
                    "scale": PROBABILITY_SCALE if uint8 else 1, "nodata": LABEL_NODATA if uint8 else None,
                    "mpp": m.mpp, "crs": m.crs, "transform": list(m.transform) if m.transform else None,
                    "source": self.source, "model": self.model}
        if self.volume:
            return {"kind": "probabilities" if self.probabilities else "labels", "classes": self.classes,
                    "class_names": list(self.class_names), "nodata": None if self.probabilities else LABEL_NODATA,
                    "spacing": list(m.spacing) if m.spacing else None, "source": self.source, "model": self.model}
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


def table_path(path: str) -> str:
    """Where an instance output's object table goes: beside it, ``.csv``."""
    low = os.fspath(path).rstrip("/")
    for ext in sorted(FORMATS, key=len, reverse=True):
        if low.lower().endswith(ext):
            return low[:-len(ext)] + ".csv"
    return low + ".csv"


def check_output(path: str, overwrite: bool, probabilities: bool | str = False, instances: bool = False,
                 ours=frozenset()) -> None:
    """Fail before any work when the output cannot be written or cannot hold
    the result. ``ours``: paths an interrupted run of this output had moved
    into place, which its resume may replace."""
    fmt = output_format(path)
    if instances and fmt == "png":
        raise OutputError(f"{path}: PNG holds class masks only; write --instances to .zarr, .ome.tif, .tif, "
                          ".geojson or .gpkg")
    if instances and is_url(path):
        raise OutputError(f"{path}: --instances writes a table beside the output; write it to a local or "
                          "shared path")
    if instances and os.path.exists(table_path(path)) and not overwrite and table_path(path) not in ours:
        raise OutputError(f"{table_path(path)}: already exists (the object table of {os.path.basename(path)}); "
                          "pass --overwrite to replace it")
    if probabilities == "uint8" and fmt == "zarr":
        raise OutputError(f"{path}: zarr keeps float32 probabilities (napari and zarr read them); "
                          "--probabilities uint8 is for TIFF outputs that 8-bit viewers read: name it .ome.tif or .tif")
    if probabilities and fmt in LABELS_ONLY:
        raise OutputError(f"{path}: {LABELS_ONLY[fmt]} label masks only; write probabilities to .tif "
                          "or .zarr, or drop --probabilities")
    if is_url(path):
        import fsspec

        if fmt not in ("zarr", "ome-tiff", "tiff", "vector"):
            raise OutputError(f"{path}: URLs take .zarr (written chunk by chunk), .ome.tif, .tif, .geojson and "
                              ".gpkg outputs (written locally, then uploaded); write PNGs to a local path")
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
    if os.path.exists(path) and not overwrite and path not in ours:
        raise OutputError(f"{path}: already exists; pass --overwrite to replace it")


class Writer:
    """Write one output, atomically, resumably, and alone.

    Construct it before any work: it checks the paths (the output's folder
    exists and is writable, no output is one of ``inputs``, an existing
    output or preview needs ``overwrite``). Enter it (``with``) to take the
    output's lock; a second run on the same output is refused at once.

    Work happens in a hidden state folder beside the output,
    ``.<name>.tilerseg/``: the result's zarr group (``work.zarr``), one
    mark per finished block (``done/``) and what the run was (``run.json``,
    its ``fingerprint``). The output is moved into place when complete and
    the folder removed. When a run fails or is interrupted after finishing
    blocks, the folder stays; ``resume=True`` with the same fingerprint
    reopens it and the engine computes only unmarked blocks.

    ``preview`` is the path of a PNG that :meth:`write`'s ``render_preview
    (level0, tmp_png)`` draws from the finished result; it is moved into
    place with the output. ``parallel(fn, items)`` runs the chunk loops of resampling
    and pyramid building (the engine's threads; serial by default).

    A ``.zarr`` output may be an fsspec URL (object stores have no rename):
    the group is written in place, its OME metadata last, so that until the
    run completes it does not read as an image, and the state folder sits
    beside it under the same URL scheme."""

    def __init__(self, path: str, *, overwrite: bool = False, resume: bool = False, inputs=(),
                 preview: str | None = None, probabilities: bool = False, volume: bool = False,
                 parallel: Parallel = serial, instances: bool = False):
        import fsspec

        self.remote = is_url(path)
        self.path = os.fspath(path).rstrip("/") if self.remote else os.path.abspath(os.fspath(path).rstrip("/"))
        self.format = output_format(self.path)
        self.overwrite, self.resume, self.parallel = overwrite, resume, parallel
        self.preview = preview
        self.upload = None  # a file output at a URL: written at a local staging path, uploaded when complete
        if self.remote and self.format != "zarr":
            check_output(self.path, overwrite, probabilities, instances)  # the URL: refused if there, unless --overwrite
            self.upload, self.path, self.remote = self.path, staging_path(self.path), False
        head, tail = self.path.rsplit("/", 1) if self.remote else os.path.split(self.path)
        self.fs = fsspec.core.url_to_fs(self.path)[0] if self.remote else fsspec.filesystem("file")
        self.state = f"{head}/.{tail}.tilerseg"
        self._ours = self._placed_before() if resume else set()
        if volume:
            self.check_volume()
        check_output(self.path, overwrite, probabilities, instances, ours=self._ours)
        _not_an_input(self.path, "-o", inputs)
        self.table = table_path(self.path) if instances else None
        self.objects: dict | None = None  # an instance run's summary, once written
        if self.table:
            _not_an_input(self.table, "the object table", inputs)
        if preview is not None:
            self._check_preview(preview, inputs)
        self._tmp_zarr = self.path if self.remote else f"{self.state}/work.zarr"
        self._src_zarr = f"{self.state}/source.zarr"  # what the model computed, when the output is made from it
        self._tmp_file = f"{self.state}/out.partial{os.path.splitext(tail)[1]}"
        self.marks_dir = f"{self.state}/done"
        # a URL's lock is local, in its staging folder: it keeps two runs on this machine off one output
        self._lock = OutputLock(staging_path(self.path) if self.remote else self.path)

    def _placed_before(self) -> set[str]:
        """The finished files an interrupted run had begun to move into
        place (its ``placing.json``): a resume of that run may replace
        them, as they are its own."""
        import json

        record = f"{self.state}/{PLACING}"
        if self.remote or not os.path.exists(record):
            return set()
        try:
            with open(record, encoding="utf-8") as f:
                return {os.path.abspath(p) for p in json.load(f)}
        except (OSError, ValueError, TypeError):
            return set()

    def check_volume(self) -> None:
        """Refuse an output format that cannot hold a volume."""
        if self.format not in VOLUME_FORMATS:
            raise OutputError(f"{self.path}: a volume is written as .zarr (or .ome.zarr) or as a TIFF stack "
                              "(.tif, .tiff, .ome.tif)")

    def _check_preview(self, path: str, inputs) -> None:
        path = os.path.abspath(os.fspath(path))
        if not path.lower().endswith(".png"):
            raise OutputError(f"--preview {path}: the preview is a PNG; name it .png")
        if path == self.path:
            raise OutputError(f"--preview {path}: that is the output itself; name another PNG")
        _not_an_input(path, "--preview", inputs)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            raise OutputError(f"--preview {path}: folder {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK):
            raise OutputError(f"--preview {path}: folder {parent} is not writable; choose another path")
        if os.path.exists(path) and not self.overwrite and path not in self._ours:
            raise OutputError(f"--preview {path}: already exists; pass --overwrite to replace it")

    def __enter__(self) -> "Writer":
        if self._lock is not None:
            self._lock.acquire()
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            self._lock.release()

    def _open_state(self, fingerprint: dict):
        """The zarr group the output is made in: the earlier run's when
        resuming it (its arrays made from the computed blocks are made
        again), else a new one; and whether it is resumed."""
        import json

        import zarr

        fs, stamp = self.fs, f"{self.state}/run.json"
        if self.resume and fs.exists(stamp):
            with fs.open(stamp, "r") as f:
                old = json.load(f)
            if old.get("fingerprint") != fingerprint.get("fingerprint"):
                raise OutputError(f"{self.path}: the unfinished run in {self.state} used other settings "
                                  f"({_differences(old, fingerprint)}); rerun without --resume to "
                                  "start over, or with that run's settings")
            fs.makedirs(self.marks_dir, exist_ok=True)
            return zarr.open_group(self._tmp_zarr, mode="a"), True  # "a": a .zarr moved into place is made anew
        if fs.exists(self.state):
            log.info("%s: discarding the unfinished run in %s%s", self.path, self.state,
                     "" if self.resume else " (pass --resume to continue it instead)")
            fs.rm(self.state, recursive=True)
        fs.makedirs(self.marks_dir, exist_ok=True)
        with fs.open(stamp, "w") as f:
            json.dump(fingerprint, f, indent=1, default=str)
        return zarr.open_group(self._tmp_zarr, mode="w"), False

    def _source(self, group, name: str, source, info: OutputInfo, resumed: bool):
        """The array the blocks are computed into, and the marks it backs.

        Level ``0`` itself when the output is that array; else
        (``processed``, resampled afterwards; ``probabilities``, labelled
        afterwards) an array of its own in ``source.zarr``, kept until the
        output is in place, so that a run interrupted while the output is
        made from it resumes from it. Every other array of ``group`` is
        made from it, so a resume removes them. Marks whose block has no
        stored chunk any more are forgotten (see :meth:`_trust_marks`)."""
        import zarr

        home = group if name == "0" else zarr.open_group(self._src_zarr, mode="a" if resumed else "w")
        for other in [n for n in group.array_keys() if not (home is group and n == name)]:
            del group[other]
        first = home[name] if resumed and name in home else \
            self._create(home, name, source.shape, source.chunks, source.dtype, info)
        if tuple(first.shape) != tuple(source.shape):
            raise OutputError(f"{self.path}: the unfinished run in {self.state} has another shape; rerun "
                              "without --resume")
        if resumed:
            self._trust_marks(first, f"{self._tmp_zarr if home is group else self._src_zarr}/{name}")
        return first

    def _trust_marks(self, array, root: str) -> None:
        """Forget the marks of blocks whose chunk is not stored in ``array``
        (at ``root``): a mark promises the block's data, and a resume
        skips what is marked. Every chunk of the array is written, nodata
        too (``write_empty_chunks``), so a missing chunk is lost data:
        a removed or damaged state folder, or a level 0 already moved
        into place as the output."""
        marks = ChunkMarks(self.marks_dir)
        done = marks.done()
        if not done:
            return
        path = fsspec_path(root) if self.remote else root
        stored = {p[len(path) + 1:] for p in self.fs.find(path)} if self.fs.exists(path) else set()
        lost = [b for b in done if array.metadata.encode_chunk_key((0,) * (array.ndim - len(b)) + tuple(b))
                not in stored]
        for b in lost:
            marks.forget(b)
        if lost:
            log.warning("%s: %d of the %d blocks marked finished in %s have no data; computing them again",
                        self.path, len(lost), len(done), self.state)

    def write(self, source, compute: Callable, info: OutputInfo, fingerprint: dict | None = None,
              render_preview: Callable | None = None, post: Callable | None = None):
        """Compute ``source`` (``shape``, ``chunks``, ``dtype``) with
        ``compute(source, zarr_array, marks)`` into the work group, convert
        it, render the preview, and move both into place. Returns what
        ``compute`` returned.

        ``info.instances``: ``source`` computes probabilities, and
        ``post(probabilities, labels, imap)`` (:func:`tilerseg.instances.label`)
        fills the uint32 labels from them and returns the object table,
        which is written beside the output (:func:`table_path`); the
        probabilities are not part of the output. Nothing computed is
        removed before every product is in place: a run interrupted at any
        point resumes from its finished blocks (their marks checked against
        their data) to the bytes of an uninterrupted run."""
        self._check_held("write")
        fingerprint = fingerprint or {}
        target = info.target
        first_name = "processed" if target else "probabilities" if info.instances else "0"
        owned, stream = False, None
        try:
            if self.upload:
                log.info("%s: written first to %s (room needed there: up to about %.3g MB, the work zarr and the "
                         "file), uploaded once complete", display(self.upload), os.path.dirname(self.path),
                         2 * np.prod(source.shape) * np.dtype(source.dtype).itemsize / 1e6)
            group, resumed = self._open_state(fingerprint)
            owned = True
            first = self._source(group, first_name, source, info, resumed)
            if os.path.exists(self._tmp_file):  # left by an interrupted conversion
                os.remove(self._tmp_file)
            stream = self._stream(source, group, info, fingerprint)
            result = compute(source, first, ChunkMarks(self.marks_dir))
            if target is not None:
                from .pyramid import upsample_into

                z0 = self._create(group, "0", (*source.shape[:-2], *target.shape), source.chunks, source.dtype, info)
                upsample_into(first, z0, info.probabilities, parallel=self.parallel)
            products = []
            if info.instances:
                info, table_tmp = self._instances(group, first, info, post)
                products.append((table_tmp, self.table))
            made = self._convert(group, info, fingerprint, stream)
            products.append((made, self.path))
            if self.preview is not None:
                tmp_png = f"{self.state}/preview.partial.png"
                render_preview(group["0"], tmp_png)
                products.insert(0, (tmp_png, os.path.abspath(self.preview)))
            self._record_placing(products)
            self._place(products)
            owned = False
            self._remove(self.state)  # the computed blocks go only now, with the output whole in place
            if self.upload:
                self._upload()
            return result
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OutputError(f"{self.path}: disk full while writing; free space on "
                                  f"{os.path.dirname(self.path)} and rerun with --resume, or write "
                                  "elsewhere") from err
            raise
        finally:
            if stream is not None:
                stream.stop()  # after a failure: no partial TIFF (nothing to do once it finished)
            if owned:  # failed or interrupted: keep finished blocks worth resuming, else leave nothing
                if ChunkMarks(self.marks_dir).done():
                    log.warning("%s: not finished; the finished blocks are kept in %s: rerun the same command "
                                "with --resume to compute only the rest%s", self.path, self.state,
                                " (the --instances options may change: the probabilities do not depend on them)"
                                if info.instances else "")
                else:
                    self._remove(self.state)
                    if self.remote:
                        self._remove(self.path)

    def _upload(self) -> None:
        """Put the finished local file at its URL in one upload (an object
        store shows an object only once its upload completes: the output
        appears whole or not at all), then remove the local copy."""
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.upload)
        if fs.exists(root) and not self.overwrite:
            raise OutputError(f"{display(self.upload)}: appeared while this run was writing; it was left alone. The "
                              f"finished file is {self.path}: upload it yourself, or rerun with --overwrite")
        try:
            fs.put_file(self.path, root)
        except Exception as err:
            raise OutputError(f"{display(self.upload)}: upload failed ({mask_text(' '.join(str(err).split()))[:200]}); "
                              f"the finished file is kept at {self.path}: upload it, or rerun") from None
        os.remove(self.path)
        self.path = self.upload

    def _record_placing(self, products) -> None:
        """Say in the state folder which files are about to be moved into
        place, before the first is moved: a run killed between the moves
        (or before the state is removed) has its resume replace them."""
        import json

        if self.remote:
            return
        finals = [os.path.abspath(final) for tmp, final in products if tmp != final]
        tmp = f"{self.state}/{PLACING}.partial"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(finals, f)
        os.replace(tmp, f"{self.state}/{PLACING}")

    def _instances(self, group, probabilities, info: OutputInfo, post: Callable):
        """The object labels of the finished probabilities, as level ``0``,
        and the object table (CSV at a temporary path)."""
        from dataclasses import replace

        from .objects import summary, write_csv

        shape, chunks = probabilities.shape[-2:], probabilities.chunks[-2:]
        labels = group.create_array("0", shape=shape, chunks=chunks, dtype=np.uint32, fill_value=0,
                                    compressors=compressors(np.uint32), dimension_names=("y", "x"), overwrite=True)
        table = post(probabilities, labels, getattr(self.parallel, "imap", map))
        info = replace(info, objects=summary(table, info.class_names, info.out_meta))
        self._objects, self.objects = table, info.objects
        tmp = f"{self.state}/objects.partial.csv"
        n = write_csv(table, tmp, info.class_names, info.out_meta)
        log.info("%s: %d objects", self.path, n)
        return info, tmp

    def write_group(self, fill: Callable[[object], None]) -> str:
        """Write a zarr group that ``fill(group)`` fills (``ingest``), under
        the same lock, checks and atomic move; nothing to resume."""
        import zarr

        self._check_held("write_group")
        self._remove(self.state)
        try:
            self.fs.makedirs(self.state, exist_ok=True)
            fill(zarr.open_group(self._tmp_zarr, mode="w"))
            self._place([(self._tmp_zarr, self.path)])
        except OSError as err:
            if err.errno == errno.ENOSPC:
                raise OutputError(f"{self.path}: disk full while writing; free space on "
                                  f"{os.path.dirname(self.path)} or write elsewhere") from err
            raise
        finally:
            self._remove(self.state)
        return self.path

    def _check_held(self, what: str) -> None:
        if self._lock is not None and not self._lock.held:
            raise RuntimeError(f"Writer.{what} outside `with writer:` (the output's lock is not held)")

    def _remove(self, path: str) -> None:
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except OSError as err:
            log.warning("could not remove %s: %s", path, err)

    def _create(self, group, name, shape, chunks, dtype, info: OutputInfo):
        axes = ("z", "y", "x") if info.volume else ("y", "x")
        floats = info.probabilities or info.instances  # instances: the probabilities they are made from
        return group.create_array(name, shape=shape, chunks=tuple(c[0] for c in chunks), dtype=dtype,
                                  compressors=compressors(dtype), config={"write_empty_chunks": True},
                                  fill_value=np.nan if floats else LABEL_NODATA,
                                  dimension_names=("c", *axes) if floats else axes)

    def _stream(self, source, group, info: OutputInfo, fingerprint: dict):
        """A :class:`~tilerseg.io.stream.TiffStream` writing the pyramidal
        TIFF while ``source`` is computed into ``group["0"]``, where the format
        allows: ``.ome.tif`` and ``.tif`` without georeference (a COG is
        GDAL's to order), an image computed on the output grid (not
        resampled to it afterwards), blocks split at the chunks. For a local
        ``.zarr``, a :class:`~tilerseg.io.stream.LevelStream` building its
        levels as rows land. Else None: the file is written after the run."""
        from .pyramid import Levels
        from .stream import LevelStream, TiffStream

        blocks = getattr(source, "blocks", None)
        chunks = getattr(source, "chunks", None)
        if (info.volume or info.instances or self.format not in ("ome-tiff", "tiff", "zarr")
                or info.target is not None or self.remote
                or (self.format == "tiff" and info.out_meta.georeferenced) or blocks is None
                or tuple(blocks.shape) != (len(chunks[-2]), len(chunks[-1]))):
            return None
        levels = Levels(group, info.probabilities, parallel=self.parallel)
        if self.format == "zarr":
            return LevelStream(levels, chunks, ChunkMarks(self.marks_dir))
        return TiffStream(levels, chunks, ChunkMarks(self.marks_dir), self._tmp_file, meta=info.out_meta,
                          kind=info.kind(), ome=self.format == "ome-tiff", uid=_uid(fingerprint),
                          imap=getattr(self.parallel, "imap", map))

    def _convert(self, group, info: OutputInfo, fingerprint: dict, stream=None) -> str:
        """Turn level 0 of the finished group into the requested format, at
        a temporary path; returns it. ``stream``: the TIFF being written
        since the run started (:meth:`_stream`), finished here."""
        from .pyramid import build_levels, ome_metadata, physical_origin, physical_pixel
        from .tiffout import write_cog, write_pyramid_tiff

        m, z0 = info.out_meta, group["0"]
        if info.volume:
            return self._convert_volume(group, info, _uid(fingerprint))
        if self.format == "vector":
            from .polygons import write_vector

            transform, crs = vector_transform(m)
            n = write_vector(z0, self._tmp_file, class_names=info.class_names, transform=transform, crs=crs,
                             vector_crs=info.vector_crs, instances=self._properties(info) if info.instances else None)
            log.info("%s: %d polygons", self.path, n)
            return self._tmp_file
        if self.format == "png":
            _write_png(z0, self._tmp_file)
            return self._tmp_file
        if self.format == "tiff" and m.georeferenced:
            write_cog(z0, self._tmp_file, m, info.kind())  # GDAL makes the overviews
            return self._tmp_file
        if stream is not None and self.format != "zarr":
            return stream.finish()  # the levels are built by the stream as rows become final
        means = info.probabilities and not info.instances  # object ids are reduced as labels: a mean id is no object
        levels = stream.finish() if stream is not None else build_levels(group, means, parallel=self.parallel)
        if self.format == "zarr":
            size, unit = physical_pixel(m)
            group.attrs.update(ome=ome_metadata([z.shape[-2:] for z in levels], probabilities=means,
                                                classes=info.classes, class_names=info.class_names,
                                                pixel_size=size, unit=unit, origin=physical_origin(m),
                                                band_names=info.band_names() if means else ()),
                               tilerseg=info.kind())
            if info.instances:  # object ids: a label image, without the class colours
                ome = dict(group.attrs["ome"])
                ome["image-label"] = {"version": "0.5"}
                group.attrs.update(ome=ome)
            return self._tmp_zarr
        write_pyramid_tiff(levels, self._tmp_file, m, info.kind(), ome=self.format == "ome-tiff",
                           uid=_uid(fingerprint), imap=getattr(self.parallel, "imap", map))
        return self._tmp_file

    def _properties(self, info: OutputInfo):
        """``(bottom rows, id -> (class, properties))`` of the objects, for their polygons."""
        from .objects import rows

        table = self._objects
        props = list(rows(table, info.class_names, info.out_meta))
        return table["bottom"], lambda i: (props[i - 1]["class"], props[i - 1])

    def _convert_volume(self, group, info: OutputInfo, uid: str | None) -> str:
        """A volume: OME-Zarr with axes (c,) z, y, x and the voxel size, or
        a TIFF stack with one tiled page per slice."""
        from .volume import write_stack

        spacing = info.meta.spacing
        if self.format == "zarr":
            z0 = group["0"]
            axes = ([{"name": "c", "type": "channel"}] if z0.ndim == 4 else []) + \
                [{"name": a, "type": "space", "unit": "micrometer"} for a in "zyx"]
            scale = ([1.0] if z0.ndim == 4 else []) + list(spacing or (1.0, 1.0, 1.0))
            group.attrs.update({"tilerseg": info.kind(), "ome": {"version": "0.5", "multiscales": [{
                "axes": axes, "datasets": [{"path": "0", "coordinateTransformations": [
                    {"type": "scale", "scale": scale}]}], "name": info.source}]}})
            return self._tmp_zarr
        write_stack(self._tmp_file, group["0"], self.format == "ome-tiff", spacing, uid)
        return self._tmp_file

    def _place(self, products: list[tuple[str, str]]) -> None:
        """Move each finished ``(tmp, final)`` into place, the output last.
        A path that appeared meanwhile is not replaced without overwrite."""
        for tmp, final in products:
            if tmp == final:  # written in place (a URL)
                continue
            if os.path.lexists(final) and not self.overwrite and os.path.abspath(final) not in self._ours:
                raise OutputError(f"{final}: appeared while this run was writing; it was left alone. Remove it "
                                  f"or rerun with --overwrite (add --resume to reuse the finished blocks in "
                                  f"{self.state})")
            old = None
            if os.path.lexists(final):
                old = final + f".{uuid.uuid4().hex[:8]}.old"
                os.rename(final, old)
            _move_no_replace(tmp, final)
            if old:
                shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


def staging_path(url: str) -> str:
    """Where a file output bound for ``url`` is written first: a folder
    named after the URL in ``TILERSEG_STAGING`` (else the system's temporary
    folder), the same on every run, so ``--resume`` finds the work of an
    interrupted one. It needs room for the output and its work zarr."""
    import hashlib
    import tempfile

    from .remote import strip_query

    base = os.environ.get("TILERSEG_STAGING") or tempfile.gettempdir()
    key = hashlib.sha256(url.encode()).hexdigest()[:16]
    folder = os.path.join(base, f"tilerseg-upload-{key}")
    os.makedirs(folder, exist_ok=True)
    return os.path.join(folder, os.path.basename(strip_query(url).rstrip("/")))


def fsspec_path(url: str) -> str:
    """The path of ``url`` in its filesystem (what its ``find`` lists)."""
    import fsspec

    return fsspec.core.url_to_fs(url)[1]


def _uid(fingerprint: dict) -> str | None:
    """The OME UUID, from the run's fingerprint: a resumed run writes the same bytes."""
    fp = fingerprint.get("fingerprint")
    return str(uuid.uuid5(uuid.NAMESPACE_OID, fp + fingerprint.get("post", ""))) if fp else None


def _move_no_replace(tmp: str, final: str) -> None:
    """Rename, never over a path that exists: a file is hard-linked (which
    fails on an existing name) then unlinked; a folder is renamed (which
    fails on an existing non-empty folder, and an empty one is refused first)."""
    try:
        if os.path.isdir(tmp):
            if os.path.lexists(final):
                raise FileExistsError(errno.EEXIST, "exists", final)
            os.rename(tmp, final)
        else:
            try:
                os.link(tmp, final)
            except OSError as err:
                if err.errno in (errno.EEXIST,):
                    raise
                os.rename(tmp, final)  # a filesystem without hard links
                return
            os.remove(tmp)
    except FileExistsError:
        raise OutputError(f"{final}: appeared while this run was writing; it was left alone. Remove it or rerun "
                          "with --overwrite --resume") from None


def _not_an_input(path: str, flag: str, inputs) -> None:
    """No output may be one of the run's inputs, even with --overwrite."""
    if is_url(path):
        return
    real = os.path.realpath(path)
    for inp in inputs:
        if inp is None or is_url(os.fspath(inp)):
            continue
        if os.path.realpath(os.fspath(inp)) == real:
            raise OutputError(f"{flag} {path}: that is an input of this run; tilerseg never writes over its "
                              "inputs (not even with --overwrite): choose another path")


def open_writer(path, **kwargs) -> Writer:
    return Writer(path, **kwargs)


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
