"""The library entry points the CLI is a thin layer over.

``run`` does what ``tilerseg run`` does: build the run's
:class:`~tilerseg.config.RunConfig`, take the output's writer (checks and
lock first, before any model is built), open the input lazily, build the
model once, let :mod:`tilerseg.tiling` choose the grid, and have the engine
compute blocks into the array the writer hands it. Images and volumes take
the same path. ``segment`` gives the same computation as a lazy dask array
for notebooks and pipelines."""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from .config import POSTPROCESS, ModelOptions, RunConfig, TilingOptions
from .engine import (Output, StoreStats, compute_into, default_workers, lazy_array, lazy_image, segment_plan,
                     store_plan, thread_map, volume_plan, warm_workers)
from .errors import InputError, ModelError
from .io import open_reader
from .io.arrays import ArrayReader
from .io.base import ImageMeta, Reader, scale_transform
from .io.remote import display, fingerprint as url_fingerprint, is_url
from .info import input_identity
from .io.writers import OutputInfo, Writer
from .models import (FILE_ARCHS, SHIPPED_DEMO, ModelInfo, ModelSpec, Normalization, arch, describe, dtype_scale,
                     is_volumetric, resolve_weights)

log = logging.getLogger(__name__)


class UntrainedModelWarning(UserWarning):
    """The model has random weights: its output means nothing."""


class NonLocalModelWarning(UserWarning):
    """The model has global context, so tiling changes its output."""


@dataclass(frozen=True)
class PredictorRef:
    """Picklable handle to a predictor, built once per worker process."""

    info: ModelInfo
    bands: int
    dtype: str
    device: str
    tta: str = "none"
    precision: str = "fp32"
    compile: bool = False
    backend: str = "torch"

    def get(self):
        from .infer import cached_predictor

        return cached_predictor(self.info, self.bands, self.dtype, self.device, self.tta, self.precision,
                                self.compile, self.backend)


@dataclass(frozen=True)
class RunReport:
    """What a run did, for the CLI and for scripts. ``tile`` and ``halo``
    are numbers for images, (z, y, x) for volumes."""

    output: str
    shape: tuple[int, ...]
    windows: int
    seconds: float
    tile: Any
    halo: Any
    stride: int
    note: str = ""
    windows_run: int = -1
    threshold: float = 0.5
    windows_resumed: int = 0
    preview: str | None = None
    tiling: str = ""
    backend: str = ""  # what ran the forward pass and why (auto: the probe's figures); "" for plain torch
    objects: dict | None = None  # --instances: objects per class and their median area
    input: str = ""  # the input as printed (a URL masked)
    bytes_read: int = 0  # an input by URL: bytes fetched for this run (here and on the workers)
    bytes_total: int = 0  # ... of the object's size

    @property
    def windows_skipped(self) -> int:
        """Windows not run: no tissue, or all nodata (not counting those of
        blocks an earlier run finished)."""
        return max(0, self.windows - self.windows_run - self.windows_resumed) if self.windows_run >= 0 else 0

    @property
    def megapixels_per_second(self) -> float:
        """Megapixels (megavoxels for volumes) per second."""
        return float(np.prod(self.shape)) / 1e6 / max(self.seconds, 1e-9)


def describe_model(m: ModelOptions) -> ModelInfo:
    """The model of a run, from its weights where they say (smp folder,
    tilerseg checkpoint), else from the options; read once per run."""
    spec = ModelSpec(arch=m.model, encoder=m.encoder, classes=m.classes, encoder_weights=m.encoder_weights,
                     kwargs=ModelSpec.freeze(dict(m.model_args)))
    info = describe(m.weights, spec)  # `demo`, `tilerseg:demo`: the shipped model (resolve_weights)
    if any(v is not None for v in (m.mean, m.std, m.scale)):
        n = info.normalization
        info = replace(info, normalization=Normalization(
            mean=m.mean if m.mean is not None else n.mean, std=m.std if m.std is not None else n.std,
            scale=m.scale if m.scale is not None else n.scale))
    return info


def fit_bands(info: ModelInfo, bands: int) -> ModelInfo:
    """An untrained model takes the image's bands; weights must match them."""
    if not info.trained:
        return replace(info, spec=replace(info.spec, in_channels=bands))
    need = info.spec.in_channels
    if need != bands:
        pick = ",".join(str(i % bands + 1) for i in range(need))
        raise ModelError(f"{info.weights}: the weights take {need} input band(s), the image has {bands}: "
                         f"choose or repeat bands with --bands (e.g. --bands {pick}; in Python bands=({pick.replace(',', ', ')})) "
                         "or use matching weights")
    return info


def model_info(model: str = "unet", *, weights=None, encoder: str = "resnet34", classes: int = 1,
               encoder_weights: str | None = None, bands: int = 3, mean=None, std=None, scale=None,
               **kwargs: Any) -> ModelInfo:
    """Resolve the model from options and weights, and check it fits ``bands``."""
    opts = RunConfig.from_options(model=model, weights=weights, encoder=encoder, classes=classes,
                                  encoder_weights=encoder_weights, mean=mean, std=std, scale=scale,
                                  model_args=kwargs).model
    return fit_bands(describe_model(opts), bands)


def run(input, output, *, progress: Callable[[int, int], None] | None = None, config: RunConfig | None = None,
        **options) -> RunReport:
    """Segment ``input`` into ``output`` chunk by chunk: .zarr (OME-Zarr),
    .ome.tif, .tif (COG when georeferenced), .png, .geojson or .gpkg; a
    volume (with a volumetric model such as ``unet3d``) into .zarr or a TIFF
    stack.

    ``options`` are those of ``tilerseg run --help`` by their long names
    (``tile=512, batch_size=2, weights="best.pt", preview="p.png"``...), or
    a ready ``config``; see :class:`tilerseg.config.RunConfig`.
    ``progress(done, total)`` is called as windows finish."""
    cfg = config.replace(**options) if config is not None else RunConfig.from_options(**options)
    return execute(input, output, cfg, progress=progress)


def execute(input, output, cfg: RunConfig, *, progress=None) -> RunReport:
    """Run ``cfg`` from ``input`` into ``output``: the writer first (paths
    checked, lock taken), then the input and the model."""
    output, i, o, e = os.fspath(output), cfg.input, cfg.output, cfg.engine
    if "://" not in os.fspath(input) and not os.path.exists(input):
        raise InputError(f"{os.fspath(input)}: no such file or directory; check the path")
    inputs = [input, cfg.model.weights] + ([i.tissue] if i.tissue and i.tissue != "auto" else [])
    volume = _volume_by_name(cfg.model)
    writer = Writer(output, overwrite=o.overwrite, resume=e.resume, inputs=inputs, preview=o.preview,
                    probabilities=o.probabilities, volume=bool(volume), parallel=thread_map(e.workers),
                    instances=o.instances)
    with writer:
        info = describe_model(cfg.model)
        if is_volumetric(info.spec.arch):
            writer.check_volume()
            return _run_volume(input, writer, info, cfg, progress)
        before = _bytes_read(e.scheduler) if is_url(os.fspath(input)) else None
        src = open_reader(input, **i.reader_options())
        try:
            report = _run_image(src, input, writer, info, cfg, progress)
        finally:
            src.close()
        if before is None:
            return report
        from .io.remote import stat

        return replace(report, input=display(os.fspath(input)), bytes_read=_bytes_read(e.scheduler) - before,
                       bytes_total=stat(os.fspath(input))["size"] or 0)


def _bytes_read(scheduler) -> int:
    """Bytes fetched by URL so far, in this process and on a distributed
    scheduler's workers (each opens the URL itself)."""
    from .io import remote

    n = remote.bytes_read()
    if hasattr(scheduler, "run"):
        n += sum(scheduler.run(remote.bytes_read).values())
    return n


def _volume_by_name(m: ModelOptions) -> bool | None:
    """Whether the model is volumetric, from its name alone (no file read);
    None when weights decide it."""
    if m.weights is not None and m.weights not in ("demo", SHIPPED_DEMO):
        return None
    return is_volumetric(m.model)


def _predictor(info: ModelInfo, meta, cfg: RunConfig, tta: str = "none"):
    """The run's predictor and its picklable reference. ``--backend auto``
    starts on torch: the runtime is decided once the tiling is known
    (:func:`_settle_backend`), so the probe measures the run's own windows."""
    from .infer import pick_device

    if not info.trained:
        warnings.warn(f"no --weights given: {_name(info)} has random weights, so the mask is meaningless; pass "
                      "--weights for real results", UntrainedModelWarning, stacklevel=4)
    e = cfg.engine
    backend = "torch" if e.backend == "auto" else e.backend
    ref = PredictorRef(info, meta.bands, np.dtype(meta.dtype).str, pick_device(e.device), tta, e.precision,
                       e.compile, backend)
    return ref, ref.get()  # built and validated once here; local tasks reuse this same instance


def _settle_backend(cfg: RunConfig, ref: PredictorRef, predictor, tiling, windows: int):
    """``--backend auto``: probe the run's window and batch on each runtime
    (:func:`tilerseg.backends.decide`) and return the reference, predictor
    and note of the one chosen; workers then build that runtime, and none
    probes again. Other backends: as built, with their note."""
    if cfg.engine.backend != "auto":
        return ref, predictor, predictor.backend_note if cfg.engine.backend != "torch" else ""
    from .backends import decide

    views = {"flips": 4, "d4": 8}.get(ref.tta, 1)
    batch = tiling.batch_size * views
    name, note = decide(predictor.model, device=predictor.device, in_channels=ref.bands, dims=tiling.dims,
                        stride=tiling.stride, weights=ref.info.weights, window=tiling.tile, batch=batch,
                        batches=max(1, -(-windows // tiling.batch_size)), precision=ref.precision,
                        compile=ref.compile)
    log.info("backend: %s", note)
    if name == "torch" or name == ref.backend:
        return ref, predictor, note
    ref = replace(ref, backend=name)
    return ref, ref.get(), note


def _name(info: ModelInfo) -> str:
    """``unet/resnet34``; tilerseg's own architectures have no --encoder; an
    ONNX model is its file."""
    if info.spec.arch in FILE_ARCHS:  # a file that is its own architecture (ONNX, TorchScript, export)
        return os.path.basename(info.weights or "") or f"the {info.spec.arch} model"
    return f"{info.spec.arch}/{info.spec.encoder}" if arch(info.spec.arch).smp else info.spec.arch


def choose_tiling(opts: TilingOptions, info: ModelInfo, predictor, shape, *, scheduler=None, stacklevel: int = 4,
                  skip=None, note: str = ""):
    """The run's tiling (see :func:`tilerseg.tiling.resolve`), said once;
    sized for the workers of a distributed ``scheduler`` where there is one,
    and for the windows that will run (``skip``: a
    :class:`~tilerseg.tissue.WindowMap`)."""
    from .cluster import worker_memory
    from .models import global_context
    from .tiling import resolve

    parts = global_context(predictor.model)
    tiling = resolve(opts, model=predictor.model, info=info, stride=predictor.stride, dims=len(shape),
                     bands=info.spec.in_channels, shape=shape, global_parts=parts,
                     worker_memory=worker_memory(scheduler), skip=skip)
    if parts:
        warnings.warn(f"{_name(info)} has global context ({', '.join(parts[:4])}): tiled "
                      f"output cannot equal whole-image inference; using the {tiling.merge} merge with halo "
                      f"{tiling.halo[0]} (a larger --tile reduces the difference)", NonLocalModelWarning,
                      stacklevel=stacklevel)
    # seam-exact: a local model cropped with the halo measured or declared (a --halo given may be short)
    exact = "seam-exact" if tiling.merge == "crop" and not parts and opts.halo in (None, "auto") else ""
    log.info("tiling: %s", "; ".join(t for t in (tiling.summary(), exact, note) if t))
    return tiling


def _run_image(src: Reader, input, writer: Writer, info: ModelInfo, cfg: RunConfig, progress) -> RunReport:
    i, o, e = cfg.input, cfg.output, cfg.engine
    info = fit_bands(info, src.meta.bands)
    pixels = check_mpp(info, src.meta, os.fspath(input), i.ignore_pixel_size)
    notes = [pixels.note]
    from .models.bioimageio import fix_statistics, needs_statistics

    if needs_statistics(info):  # a bioimage.io package's per-sample statistics: once, over the whole image
        info, note = fix_statistics(info, src)
        notes.append(note)
    check_dtype(info, src.meta, os.fspath(input), cfg.model)
    post = _instance_pass(o, info, info.binary_threshold(o.threshold)) if o.instances else None  # checked first
    ref, predictor = _predictor(info, src.meta, cfg, cfg.tiling.tta or info.tta)
    wmap = _window_map(i, input, src.meta)
    tiling = choose_tiling(cfg.tiling, info, predictor, src.meta.shape, scheduler=e.scheduler, stacklevel=5,
                           skip=wmap if wmap.may_skip else None, note="; ".join(n for n in notes if n))
    tiles = tiling.tilespec()
    threshold = info.binary_threshold(o.threshold)
    grid = tiling.grid(src.meta.shape)
    active = wmap.boxes(grid)
    ref, predictor, backend = _settle_backend(cfg, ref, predictor, tiling, grid.total_windows if active is None
                                              else int((active[..., 1] > active[..., 0]).sum()))
    out = Output(probabilities=bool(o.probabilities) or o.instances, threshold=threshold, merge=tiling.merge)
    plan = segment_plan(src, ref, grid, tiles, out, info.spec.classes, active=active)
    oinfo = OutputInfo(meta=src.meta, probabilities=bool(o.probabilities), classes=info.spec.classes,
                       class_names=info.class_names, source=display(os.fspath(input)),
                       model=f"{info.spec.arch}/{info.spec.encoder}", target=output_grid(src.meta, o.output_level),
                       probability_dtype=o.probability_dtype, vector_crs=o.vector_crs, instances=o.instances,
                       pixel_size=pixels.record, source_id=input_identity(input, src.meta))
    render = None
    if o.preview:
        from .preview import render as draw

        def render(level0, tmp):
            draw(input, level0, tmp, threshold=threshold, bands=i.bands, reader=i.reader)
    warm_workers(e.scheduler, ref)  # models built before the clock starts, as for a local run
    workers = e.workers or default_workers(predictor.device)
    t0 = time.perf_counter()
    stats: StoreStats = writer.write(plan, lambda p, z, marks: store_plan(
        p, z, workers=workers, scheduler=e.scheduler, marks=marks, progress=progress), oinfo,
        fingerprint(input, info, cfg, tiling, active), render_preview=render,
        post=post)
    return RunReport(output=writer.path, shape=src.meta.shape, windows=grid.total_windows,
                     seconds=time.perf_counter() - t0, tile=tiling.tile[0], halo=tiling.halo[0],
                     stride=predictor.stride, note=src.meta.note, windows_run=stats.windows_run, threshold=threshold,
                     windows_resumed=stats.windows_resumed, preview=o.preview, tiling=tiling.summary(),
                     backend=backend, objects=writer.objects)


def _run_volume(input, writer: Writer, info: ModelInfo, cfg: RunConfig, progress) -> RunReport:
    """A volume (TIFF stack, OME-TIFF with Z, 3-D zarr) with a volumetric
    model: 3-D windows, mirror padding on every axis, the same writer."""
    from .io.volume import VolumeReader

    i, o, e = cfg.input, cfg.output, cfg.engine
    if any(v is not None for v in (i.level, i.mpp, i.bands, i.tissue, o.output_level)):
        raise InputError("--level, --mpp, --bands, --tissue and --output-level apply to 2-D images, not to volumes")
    if o.preview:
        raise InputError("--preview draws 2-D images; drop it for volumes (open the .zarr in napari)")
    src = VolumeReader(input)
    try:
        info = fit_bands(info, src.meta.bands)
        ref, predictor = _predictor(info, src.meta, cfg)
        tiling = choose_tiling(cfg.tiling, info, predictor, src.meta.shape, scheduler=e.scheduler, stacklevel=5)
        grid = tiling.grid(src.meta.shape)
        ref, predictor, backend = _settle_backend(cfg, ref, predictor, tiling, grid.total_windows)
        threshold = info.binary_threshold(o.threshold)
        plan = volume_plan(src, ref, grid, Output(probabilities=bool(o.probabilities), threshold=threshold),
                           info.spec.classes, pad_mode=tiling.pad_mode)
        warm_workers(e.scheduler, ref)
        oinfo = OutputInfo(meta=src.meta, probabilities=bool(o.probabilities), classes=info.spec.classes,
                           class_names=info.class_names, source=display(os.fspath(input)), model=info.spec.arch)
        t0 = time.perf_counter()
        stats = writer.write(plan, lambda p, z, marks: store_plan(
            p, z, workers=e.workers, scheduler=e.scheduler, marks=marks, progress=progress), oinfo,
            fingerprint(input, info, cfg, tiling, None))
        return RunReport(output=writer.path, shape=src.meta.shape, windows=grid.total_windows,
                         seconds=time.perf_counter() - t0, tile=tiling.tile, halo=tiling.halo,
                         stride=predictor.stride, windows_run=stats.windows_run, threshold=threshold,
                         windows_resumed=stats.windows_resumed, tiling=tiling.summary(), backend=backend)
    finally:
        src.close()


def fingerprint(input, info: ModelInfo, cfg: RunConfig, tiling, active) -> dict:
    """What makes two runs produce the same output: the input and weights
    files (path, size, modification time), the model, every setting that
    decides the bytes (:meth:`RunConfig.settings`), the tiling chosen and
    the tissue mask. ``--resume`` continues an unfinished run only when
    these agree. For ``--instances`` the post-process options
    (:data:`~tilerseg.config.POSTPROCESS`) are apart, in ``post``: the
    probabilities a resume reuses do not depend on them."""
    import hashlib
    import json

    def stat(path):
        if is_url(path):  # the server's size and ETag (or last-modified), the URL without credentials
            return url_fingerprint(path)
        try:
            st = os.stat(path)
            return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
        except (OSError, TypeError, ValueError):
            return [repr(path)]

    readable = cfg.settings()
    post = {k: readable.pop(k) for k in POSTPROCESS if k in readable} if cfg.output.instances else {}
    readable["tiling"] = repr(replace(tiling, why=""))
    readable["input"] = stat(os.fspath(input)) if isinstance(input, (str, os.PathLike)) else [repr(input)]
    readable["model"] = repr(info.spec)
    readable["weights"] = stat(info.weights) if info.weights else None
    readable["checkpoint"] = repr(replace(info, weights=None, postprocess=()))  # the objects' options: in post
    if cfg.output.instances:
        post["checkpoint"] = repr(info.postprocess)
    readable["tissue"] = hashlib.sha256(np.ascontiguousarray(active).tobytes()).hexdigest() \
        if active is not None else None
    text = json.dumps(readable, sort_keys=True, default=str)
    out = {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), "settings": readable}
    if post:  # the objects' options: in the output's identity (its OME UUID), not in what a resume must match
        out["post"] = hashlib.sha256(json.dumps(post, sort_keys=True).encode()).hexdigest()
        out["post_settings"] = post
    return out


def check_mpp(info: ModelInfo, meta: ImageMeta, path: str, ignore: bool = False):
    """The model's pixel size against the image's (:mod:`tilerseg.pixelsize`)."""
    from .pixelsize import check

    return check(info.mpp, meta, path, ignore=ignore, stacklevel=4)


class InputRangeWarning(UserWarning):
    """The weights do not say which pixel values they were trained on."""


def check_dtype(info: ModelInfo, meta: ImageMeta, path: str, m: ModelOptions) -> None:
    """Refuse an image of another dtype than the weights were trained on:
    the checkpoint's ``scale`` (255 for uint8) applied to uint16 or float
    pixels gives values the model never saw, and masks that are almost all
    foreground. Explicit ``--scale``/``--mean``/``--std`` say the user has
    mapped the values, so they pass. Weights without that record get a
    warning when the image is not uint8 (what most published weights saw)."""
    if not info.trained or any(v is not None for v in (m.scale, m.mean, m.std)) or info.spec.arch in ("bioimageio", "monai"):
        return  # (a bioimage.io package's or MONAI bundle's own preprocessing maps the raw values)
    dtype = np.dtype(meta.dtype).name
    if info.input_dtype and dtype != info.input_dtype:
        lo, hi = info.input_range or (0.0, dtype_scale(info.input_dtype))
        raise InputError(f"{path}: the image is {dtype}, but the weights were trained on {info.input_dtype} images "
                         f"(values {lo:g} to {hi:g} mapped to 0..1): pass --scale with the value your data's "
                         f"{hi:g} corresponds to (e.g. --scale {dtype_scale(dtype):g} for the full {dtype} range), "
                         "or --mean/--std, or convert the image to " + info.input_dtype)
    if not info.input_dtype and dtype != "uint8":
        warnings.warn(f"{info.weights}: the weights do not record the pixel values they were trained on, and "
                      f"{path} is {dtype}: it is divided by {info.normalization.scale or dtype_scale(dtype):g}; if "
                      "the model saw other values, pass --scale (or --mean/--std) to match", InputRangeWarning,
                      stacklevel=5)


BOUNDARY_NAMES = ("boundary", "contour", "border", "edge")  # a class so named separates touching objects


def _instance_pass(o, info: ModelInfo, threshold: float):
    """``post(probabilities, labels, imap)`` for the writer: the instance
    labels (:func:`tilerseg.instances.label`) with the run's options."""
    from .instances import label

    opts = instance_options(o, info, threshold)
    return lambda probabilities, labels, imap: label(probabilities, labels, opts, imap=imap)


def instance_options(o, info: ModelInfo, threshold: float):
    """The :class:`~tilerseg.instances.InstanceOptions` of output options
    ``o`` (``run --instances`` and ``eval --instances`` alike); a 3-class
    model with a class named boundary or contour splits by it."""
    from .instances import InstanceOptions

    o = with_checkpoint_postprocess(o, info)
    boundary = o.boundary_class
    if boundary is None:
        names = [str(n).lower() for n in info.class_names]
        boundary = next((k for k, n in enumerate(names) if k and n in BOUNDARY_NAMES), None)
    if boundary is not None and info.spec.classes < 3:
        raise InputError(f"--boundary-class {boundary}: {_name(info)} has {_classes(info)}, so no class can mark "
                         "boundaries; drop --boundary-class (touching objects are split by their shape), or use "
                         "a model with background, interior and boundary classes")
    if boundary is not None and not 0 < boundary < info.spec.classes:
        raise InputError(f"--boundary-class {boundary}: {_name(info)} has classes 1 to {info.spec.classes - 1} "
                         "besides background (0); give one of them")
    threshold = threshold if o.object_threshold is None else o.object_threshold
    return InstanceOptions(threshold=threshold, depth=o.split_depth,  # None: the radius rule
                           boundary_class=boundary, min_area=o.min_area or 0, max_side=o.max_object,
                           markers=o.marker_threshold,
                           join=o.join_below)


def with_checkpoint_postprocess(o, info: ModelInfo):
    """Output options ``o`` with the ``--instances`` options the checkpoint
    records (:attr:`ModelInfo.postprocess`, chosen on its validation
    slices) where no flag gave them: a flag overrides."""
    recorded = {k: v for k, v in info.postprocess if getattr(o, k, None) is None}
    return replace(o, **recorded) if recorded else o


def _classes(info: ModelInfo) -> str:
    """``one output (background and foreground)``, ``2 classes``: what the model gives."""
    return "one output (background and foreground)" if info.spec.classes == 1 else f"{info.spec.classes} classes"


def _window_map(i, input, meta: ImageMeta):
    """Where windows will run: on tissue (``--tissue auto`` or a mask
    file) and off nodata; computed only where asked (the tiling decision
    asks when it chooses the tile, the run for the windows on tissue)."""
    from .tissue import WindowMap, detect, from_file, valid_map

    path = os.fspath(input)
    tissue = None
    if i.tissue == "auto":
        def tissue(side):
            return detect(path, side=side, bands=i.bands, reader=i.reader)
    elif i.tissue:
        def tissue(side):
            return from_file(i.tissue)
    maybe_nodata = meta.nodata is not None or np.issubdtype(np.dtype(meta.dtype), np.floating) or meta.georeferenced

    def valid(side):
        return valid_map(path, side, bands=i.bands, reader=i.reader, missing_chunks=i.missing_chunks) \
            if isinstance(input, (str, os.PathLike)) \
            else None

    return WindowMap(meta.shape, tissue=tissue, valid=valid if maybe_nodata else None, name=str(i.tissue))


def output_grid(meta: ImageMeta, level: int | None) -> ImageMeta | None:
    """The input's grid at pyramid ``level`` (same extent as ``meta``), to
    write the result on; None when that is the grid the model ran on."""
    if level is None:
        return None
    levels = meta.levels or (meta.shape,)
    if not 0 <= level < len(levels):
        raise InputError(f"--output-level {level}: the input has levels 0..{len(levels) - 1}")
    (H, W), (h, w) = meta.shape, tuple(levels[level])
    if (h, w) == (H, W):
        return None
    fy, fx = H / h, W / w
    mpp = meta.level_mpp[level] if level < len(meta.level_mpp) and meta.level_mpp[level] else \
        (meta.mpp * fx if meta.mpp else None)
    return replace(meta, shape=(h, w), mpp=mpp, transform=scale_transform(meta.transform, fx, fy), level=level,
                   note="")


def segment(array, model, *, tile: int | None = None, halo: int | str | None = None, batch_size: int = 4,
            pad_mode: str = "reflect", probabilities: bool = True, threshold: float = 0.5, valid=None,
            classes: int | None = None, mean=None, std=None, scale=None, device: str = "auto", tta: str = "none",
            merge: str = "crop", bands=None, backend: str = "torch", instances: bool = False,
            split_depth: float | None = None, workdir: str | None = None):
    """Segment an in-memory or lazy array; returns a lazy dask array.

    ``array`` is numpy, dask or zarr, shaped (H, W) or (H, W, bands) or a
    :class:`~tilerseg.io.Reader`; ``bands`` (1-based, may repeat: ``(1, 1, 1)``
    feeds a gray image to an RGB model) picks its bands. ``model`` is a torch
    module, a registry name (random weights), ``"demo"`` (the shipped nuclei
    model) or a path to weights. ``tile``/``halo`` default as
    for a run (the halo: the checkpoint's, else the receptive field). The
    result is ``(classes, H, W)`` float32 probabilities (NaN where ``valid``
    is False), or ``(H, W)`` uint8 labels with ``probabilities=False``;
    compute it, or store it with ``dask.array.to_zarr``, chunk by chunk.
    ``backend`` runs the forward pass on another runtime (see
    :mod:`tilerseg.backends`). ``instances=True`` gives uint32 object ids
    instead (0 = none; see :mod:`tilerseg.instances`), computed into a zarr
    folder (``workdir``, else a temporary one) and read back lazily."""
    from .infer import Predictor, resolve_normalization

    from .io.open import BandSelect

    src = array if isinstance(array, Reader) else ArrayReader(array, valid=valid)
    if bands is not None:
        src = BandSelect(src, bands)
    bands, dtype = src.meta.bands, src.meta.dtype
    if hasattr(model, "forward"):
        m, s, sc = resolve_normalization(Normalization(_t(mean), _t(std), scale), bands, dtype)
        predictor = Predictor(model, mean=m, std=s, scale=sc, device=device, tta=tta, backend=backend)
        info = ModelInfo(spec=ModelSpec(in_channels=bands))
        n_classes = classes or _probe_classes(predictor, bands)
    else:
        path = os.fspath(model)
        weights = resolve_weights(path)  # `demo` or `tilerseg:demo`: the shipped model
        weights = weights if os.path.exists(weights) or path.startswith("hf://") else None
        info = model_info(path if weights is None else "unet", weights=weights, bands=bands,
                          classes=classes or 1, mean=mean, std=std, scale=scale)
        from .models.bioimageio import fix_statistics, needs_statistics

        if needs_statistics(info):  # once over the whole array, as a run does over its image
            info, _ = fix_statistics(info, src)
        predictor = PredictorRef(info, bands, np.dtype(dtype).str, _device(device), tta, backend=backend).get()
        n_classes = info.spec.classes
    opts = TilingOptions(tile=tile, halo=halo, batch_size=batch_size, pad_mode=pad_mode, merge=merge)
    tiling = choose_tiling(opts, info, predictor, src.meta.shape)
    tiles = tiling.tilespec()
    grid = tiling.grid(src.meta.shape)
    plan = segment_plan(src, predictor, grid, tiles, Output(probabilities or instances, threshold, tiling.merge),
                        n_classes)
    if not instances:
        return lazy_array(plan)
    return _segment_instances(plan, threshold, split_depth, workdir)


def _segment_instances(plan, threshold: float, depth: float | None, workdir: str | None):
    """``segment(..., instances=True)``: the probabilities stored chunk by
    chunk in a zarr folder (``workdir``, else a temporary one), labelled
    there (:func:`tilerseg.instances.label`), and the uint32 labels given
    back as a dask array read from it. The object table: ``tilerseg.run(...,
    instances=True)``."""
    import tempfile

    import zarr

    from .engine import lazy_zarr, store_plan
    from .instances import InstanceOptions, label

    root = zarr.open_group(workdir or tempfile.mkdtemp(prefix="tilerseg-instances-"), mode="w")
    probs = root.create_array("probabilities", shape=plan.shape, chunks=tuple(c[0] for c in plan.chunks),
                              dtype=np.float32, fill_value=np.nan)
    store_plan(plan, probs)
    labels = root.create_array("labels", shape=plan.shape[-2:], chunks=probs.chunks[-2:], dtype=np.uint32,
                               fill_value=0)
    label(probs, labels, InstanceOptions(threshold=threshold, depth=depth), imap=thread_map().imap)
    return lazy_zarr(labels)


def _device(device: str) -> str:
    from .infer import pick_device

    return pick_device(device)


def _t(v):
    return tuple(v) if v is not None else None


def _probe_classes(predictor, bands: int) -> int:
    s = predictor.stride
    return int(predictor(np.zeros((1, s * 2, s * 2, bands), np.uint8)).shape[1])


def ingest(input, output, *, level: int | None = None, mpp: float | None = None, bands=None,
           reader: str = "auto", chunk: int = 1024, workers: int | None = None, overwrite: bool = False,
           force_resample: bool = False, missing_chunks: str = "refuse") -> str:
    """Copy any readable input into a chunked zarr group (``image``,
    ``valid``, metadata in attributes) that every cluster worker can read
    fast, through the writer (lock, checks, atomic move)."""
    output = os.fspath(output)
    writer = Writer(output, overwrite=overwrite, inputs=[input])
    if writer.format != "zarr":
        raise InputError(f"{output}: ingest writes a .zarr group; name the output .zarr")
    with writer:
        src = open_reader(input, level=level, mpp=mpp, bands=tuple(bands) if bands else None, reader=reader,
                          force_resample=force_resample, missing_chunks=missing_chunks)
        try:
            image, valid = lazy_image(src, chunk)
            m = src.meta

            def fill(root) -> None:
                root.attrs["tilerseg"] = {"mpp": m.mpp, "crs": m.crs, "nodata": m.nodata, "level": m.level,
                                          "transform": list(m.transform) if m.transform else None,
                                          "band_names": list(m.band_names), "source": os.fspath(input),
                                          "note": m.note}
                # every chunk stored, zeros too: a chunk missing later means a damaged copy (readers refuse it)
                z = root.create_array("image", shape=image.shape, chunks=(chunk, chunk, m.bands), dtype=m.dtype,
                                      config={"write_empty_chunks": True})
                # all-valid chunks equal the fill value and are not written: no cost when nothing is masked
                zv = root.create_array("valid", shape=valid.shape, chunks=(chunk, chunk), dtype=bool,
                                       fill_value=True)
                compute_into([image, valid], [z, zv], workers=workers)  # one read per chunk feeds both

            return writer.write_group(fill)
        finally:
            src.close()


def halo(model: str = "unet", *, weights=None, encoder: str = "resnet34", classes: int = 1, in_channels: int = 3,
         **kwargs: Any):
    """The receptive-field radius of a model (from its module graph, else
    measured by input gradients) and the halo to use with it."""
    from .infer import output_stride
    from .models import instantiate
    from .receptive import HaloReport, recommend_halo
    from .tiling import receptive_radius

    info = describe(weights, ModelSpec(arch=model, encoder=encoder, classes=classes, in_channels=in_channels,
                                       kwargs=ModelSpec.freeze(kwargs)))
    net = instantiate(info)
    stride = output_stride(net)
    radius, how = receptive_radius(net, info.spec.in_channels, stride, int(getattr(net, "spatial_dims", 2)))
    return HaloReport(radius=radius, stride=stride, halo=recommend_halo(radius, stride), size=0, how=how)
