"""The library entry points the CLI is a thin layer over.

``run`` does what ``tilerseg run`` does: open the input lazily, build the
model once, tile, compute chunk by chunk into the output. ``segment`` gives
the same computation as a lazy dask array for notebooks and pipelines."""
from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np

from .engine import MERGE_MODES, Output, StoreStats, TileSpec, compute_into, lazy_image, lazy_segment, segment_plan, store_plan
from .errors import InputError, ModelError
from .infer import Predictor, cached_predictor, pick_device, resolve_normalization
from .io import open_reader, open_writer
from .io.arrays import ArrayReader
from .io.base import ImageMeta, Reader, scale_transform
from .io.writers import OutputInfo, check_output
from .models import ModelInfo, ModelSpec, Normalization, describe, global_context, instantiate
from .receptive import HaloReport, measure_halo

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

    def get(self) -> Predictor:
        return cached_predictor(self.info, self.bands, self.dtype, self.device, self.tta, self.precision,
                                self.compile)


@dataclass(frozen=True)
class RunReport:
    """What a run did, for the CLI and for scripts."""

    output: str
    shape: tuple[int, int]
    windows: int
    seconds: float
    tile: int
    halo: int
    stride: int
    note: str = ""
    windows_run: int = -1
    threshold: float = 0.5
    windows_resumed: int = 0

    @property
    def windows_skipped(self) -> int:
        """Windows not run: no tissue, or all nodata (not counting those of
        blocks an earlier run finished)."""
        return max(0, self.windows - self.windows_run - self.windows_resumed) if self.windows_run >= 0 else 0

    @property
    def megapixels_per_second(self) -> float:
        """Megapixels (megavoxels for volumes) per second."""
        return float(np.prod(self.shape)) / 1e6 / max(self.seconds, 1e-9)


def model_info(model: str = "unet", *, weights=None, encoder: str = "resnet34", classes: int = 1,
               encoder_weights: str | None = None, bands: int = 3, mean=None, std=None, scale=None,
               **kwargs: Any) -> ModelInfo:
    """Resolve the model from flags and weights, and check it fits ``bands``."""
    spec = ModelSpec(arch=model, encoder=encoder, classes=classes, in_channels=bands,
                     encoder_weights=encoder_weights, kwargs=ModelSpec.freeze(kwargs))
    if weights == "demo" and not os.path.exists("demo"):
        from .demo import demo_weights

        weights = demo_weights()  # the small nuclei model shipped in the package
    info = describe(weights, spec)
    need = info.spec.in_channels
    if need != bands:
        pick = ",".join(str(i % bands + 1) for i in range(need))
        raise ModelError(f"{weights}: the weights take {need} input band(s), the image has {bands}: "
                         f"choose or repeat bands with --bands (e.g. --bands {pick}) or use matching weights")
    if any(v is not None for v in (mean, std, scale)):
        n = info.normalization
        info = replace(info, normalization=Normalization(
            mean=tuple(mean) if mean is not None else n.mean, std=tuple(std) if std is not None else n.std,
            scale=scale if scale is not None else n.scale))
    return info


def run(input, output, *, model: str = "unet", weights=None, encoder: str = "resnet34", classes: int = 1,
        encoder_weights: str | None = None, tile: int | None = None, halo: int | str | None = None, batch_size: int = 4,
        pad_mode: str = "reflect", probabilities: bool = False, threshold: float | None = None,
        level: int | None = None, mpp: float | None = None, bands=None, reader: str = "auto", mean=None, std=None, scale=None,
        device: str = "auto", workers: int | None = None, scheduler=None, overwrite: bool = False,
        tissue: str | None = None, output_level: int | None = None, tta: str | None = None, merge: str = "auto",
        model_args: dict | None = None, progress: Callable[[int, int], None] | None = None,
        resume: bool = False, precision: str = "fp32", compile: bool = False) -> RunReport:
    """Segment ``input`` into ``output`` chunk by chunk: .zarr (OME-Zarr),
    .ome.tif, .tif (COG when georeferenced), .png, .geojson or .gpkg.

    Options mirror ``tilerseg run --help``; ``halo="auto"`` measures the
    model's receptive field first. ``tissue`` is ``"auto"`` or a mask file:
    windows without tissue are skipped and written as background.
    ``output_level`` writes the result on that pyramid level's grid of the
    input (0: full resolution) whatever level or mpp the model ran at.
    ``tta`` ("flips" or "d4") averages each window over flipped/rotated views
    (default: what the checkpoint recommends, else none).
    ``merge``: "crop" (exact for local networks), "gaussian" (blended), or
    "auto": crop, or gaussian with half-window overlap for a model with
    global context (the run says so). ``model_args`` are extra builder
    arguments (``encoder_depth=3``, TernausNet's ``num_filters=16``...).
    ``progress(done, total)`` is called as windows finish.
    ``scheduler``: a dask scheduler address or ``distributed.Client``
    (default: threads in this process). ``resume`` continues an unfinished
    run of the same settings into the same output, computing only the
    blocks it had not finished. ``precision`` (fp32, fp16, bf16) runs the
    model under autocast; ``compile`` wraps it in ``torch.compile``."""
    output = os.fspath(output)
    if _volumetric(model, weights, encoder, classes):
        if any(v is not None for v in (level, mpp, bands, tissue, output_level)) or (tta or "none") != "none":
            raise InputError("--level, --mpp, --bands, --tissue, --output-level and --tta apply to 2-D images, "
                             "not to volumes")
        return run_volume(input, output, model=model, weights=weights, encoder=encoder, classes=classes,
                          tile=tile, halo=halo, pad_mode=pad_mode, probabilities=probabilities, threshold=threshold,
                          mean=mean, std=std, scale=scale, device=device, workers=workers, scheduler=scheduler,
                          overwrite=overwrite, model_args=model_args, progress=progress, precision=precision)
    for name, v in (("tile", tile), ("halo", halo)):
        if isinstance(v, (tuple, list)):
            raise InputError(f"--{name} {','.join(map(str, v))}: z,y,x values are for volumetric models (unet3d); "
                             "a 2-D model takes one number")
    check_output(output, overwrite, probabilities)
    src = open_reader(input, level=level, mpp=mpp, bands=tuple(bands) if bands else None, reader=reader)
    try:
        return _run(src, output, input=input, model=model, weights=weights, encoder=encoder, classes=classes,
                    encoder_weights=encoder_weights, tile=tile, halo=halo, batch_size=batch_size, pad_mode=pad_mode,
                    probabilities=probabilities, threshold=threshold, mean=mean, std=std, scale=scale,
                    device=device, workers=workers, scheduler=scheduler, overwrite=overwrite, progress=progress,
                    tissue=tissue, output_level=output_level, bands=bands, reader=reader, tta=tta, merge=merge,
                    model_args=model_args, resume=resume, precision=precision, compile=compile, level=level,
                    mpp=mpp)
    finally:
        src.close()


def _run(src: Reader, output: str, *, input, model, weights, encoder, classes, encoder_weights, tile, halo,
         batch_size, pad_mode, probabilities, threshold, mean, std, scale, device, workers, scheduler, overwrite,
         progress, tissue=None, output_level=None, bands=None, reader="auto", tta=None,
         merge="auto", model_args=None, resume=False, precision="fp32", compile=False, level=None,
         mpp=None) -> RunReport:
    info = model_info(model, weights=weights, encoder=encoder, classes=classes, encoder_weights=encoder_weights,
                      bands=src.meta.bands, mean=mean, std=std, scale=scale, **(model_args or {}))
    if not info.trained:
        warnings.warn(f"no --weights given: {info.spec.arch}/{info.spec.encoder} has random weights, so the mask "
                      "is meaningless; pass --weights for real results", UntrainedModelWarning, stacklevel=3)
    check_mpp(info, src.meta, os.fspath(input))
    ref = PredictorRef(info, src.meta.bands, np.dtype(src.meta.dtype).str, pick_device(device), tta or info.tta,
                       precision, compile)
    predictor = ref.get()  # build and validate once here; local tasks reuse this same instance
    tiles, merge = _tiling(info, predictor, tile=tile, halo=halo, merge=merge, batch_size=batch_size,
                           pad_mode=pad_mode, bands=src.meta.bands)
    threshold = info.binary_threshold(threshold)
    grid = tiles.grid(src.meta.shape, predictor.stride)
    active = _tissue_windows(tissue, input, grid, bands=bands, reader=reader) if tissue else None
    out = Output(probabilities=probabilities, threshold=threshold, merge=merge)
    plan = segment_plan(src, ref, grid, tiles, out, info.spec.classes, active=active)
    target = output_grid(src.meta, output_level)
    stamp = fingerprint(input, info, tiles=tiles, grid=grid, output=out, tta=ref.tta, precision=precision,
                        level=level, mpp=mpp, bands=bands, reader=reader, output_level=output_level, active=active)
    writer = open_writer(output, OutputInfo(meta=src.meta, probabilities=probabilities, classes=info.spec.classes,
                                            class_names=info.class_names, source=os.fspath(input),
                                            model=f"{info.spec.arch}/{info.spec.encoder}", target=target),
                         overwrite=overwrite, resume=resume, fingerprint=stamp)
    t0 = time.perf_counter()
    stats: StoreStats = writer.write(plan, lambda p, z, marks: store_plan(
        p, z, workers=workers, scheduler=scheduler, marks=marks, progress=progress))
    return RunReport(output=writer.path, shape=src.meta.shape, windows=grid.total_windows,
                     seconds=time.perf_counter() - t0, tile=tiles.tile, halo=tiles.halo, stride=predictor.stride,
                     note=src.meta.note, windows_run=stats.windows_run, threshold=threshold,
                     windows_resumed=stats.windows_resumed)


def fingerprint(input, info: ModelInfo, **settings) -> dict:
    """What makes two runs produce the same output: the input and weights
    files (path, size, modification time), the model and every setting.
    ``--resume`` continues an unfinished run only when these agree."""
    import hashlib
    import json

    def stat(path):
        try:
            st = os.stat(path)
            return [os.path.abspath(path), st.st_size, st.st_mtime_ns]
        except (OSError, TypeError, ValueError):
            return [repr(path)]

    active = settings.pop("active", None)
    readable = {k: repr(v) for k, v in settings.items()}
    readable["input"] = stat(os.fspath(input)) if isinstance(input, (str, os.PathLike)) else [repr(input)]
    readable["model"] = repr(info.spec)
    readable["weights"] = stat(info.weights) if info.weights else None
    readable["checkpoint"] = repr(replace(info, weights=None))
    readable["tissue"] = hashlib.sha256(np.ascontiguousarray(active).tobytes()).hexdigest() \
        if active is not None else None
    text = json.dumps(readable, sort_keys=True, default=str)
    return {"fingerprint": hashlib.sha256(text.encode()).hexdigest(), "settings": readable}


def _volumetric(model, weights, encoder, classes) -> bool:
    from .models.registry import is_volumetric

    if weights is None or weights == "demo":
        return is_volumetric(model)
    return is_volumetric(describe(os.fspath(weights), ModelSpec(arch=model, encoder=encoder, classes=classes)).spec.arch)


def run_volume(input, output, *, model: str = "unet3d", weights=None, encoder: str = "-", classes: int = 1,
               tile=None, halo=None, pad_mode: str = "reflect", probabilities: bool = False,
               threshold: float | None = None, mean=None, std=None, scale=None, device: str = "auto",
               workers: int | None = None, scheduler=None, overwrite: bool = False, model_args: dict | None = None,
               progress: Callable[[int, int], None] | None = None, precision: str = "fp32") -> RunReport:
    """Segment a volume (TIFF stack, OME-TIFF with Z, 3-D zarr) with a
    volumetric model into a ``.zarr`` or TIFF stack, window by window with
    a halo and mirror padding on every axis. ``tile``/``halo`` are one
    number or (z, y, x); the halo defaults to the checkpoint's, else the
    measured receptive field."""
    from .engine import volume_plan
    from .geometry import Grid3, as_triple
    from .io.volume import VolumeReader, check_volume_output, write_volume

    output = os.fspath(output)
    check_volume_output(output, overwrite)
    src = VolumeReader(input)
    try:
        info = model_info(model, weights=weights, encoder=encoder, classes=classes, bands=src.meta.bands,
                          mean=mean, std=std, scale=scale, **(model_args or {}))
        if not info.trained:
            warnings.warn(f"no --weights given: {info.spec.arch} has random weights, so the mask is meaningless",
                          UntrainedModelWarning, stacklevel=2)
        ref = PredictorRef(info, src.meta.bands, np.dtype(src.meta.dtype).str, pick_device(device),
                           precision=precision)
        predictor = ref.get()
        stride = predictor.stride
        if halo is None:
            halo = info.halo if info.halo is not None else "auto"
        if halo == "auto":
            halo = _measured_halo(predictor, src.meta.bands)
        halo3 = as_triple(halo, "halo")
        if tile is None:
            tile = info.tile if info.tile is not None else tuple(2 * h + 4 * stride for h in halo3)
        tile3 = as_triple(tile, "tile")
        grid = Grid3(src.meta.shape, tile3, halo3, stride)
        threshold = info.binary_threshold(threshold)
        plan = volume_plan(src, ref, grid, Output(probabilities=probabilities, threshold=threshold),
                           info.spec.classes, pad_mode=pad_mode)
        attrs = {"source": os.fspath(input), "model": info.spec.arch, "classes": info.spec.classes,
                 "class_names": list(info.class_names), "probabilities": probabilities, "tile": list(tile3),
                 "halo": list(halo3)}
        t0 = time.perf_counter()
        stats = []
        path = write_volume(output, plan, lambda p, z: stats.append(store_plan(
            p, z, workers=workers, scheduler=scheduler, progress=progress)), attrs=attrs, spacing=src.meta.spacing,
            overwrite=overwrite)
        return RunReport(output=path, shape=src.meta.shape, windows=grid.total_windows,
                         seconds=time.perf_counter() - t0, tile=tile3, halo=halo3, stride=stride,
                         windows_run=stats[0].windows_run, threshold=threshold)
    finally:
        src.close()


def _measured_halo(predictor: Predictor, bands: int) -> int:
    """``--halo auto``: the model's measured receptive field, on the stride grid."""
    report = measure_halo(predictor.model, in_channels=bands, stride=predictor.stride)
    log.info("--halo auto: measured receptive-field radius %d px, using halo %d", report.radius, report.halo)
    return report.halo


def _tiling(info: ModelInfo, predictor: Predictor, *, tile, halo, merge, batch_size, pad_mode, bands,
            stacklevel: int = 4) -> tuple[TileSpec, str]:
    """The tile, halo and merge a run uses: flags first, then what the
    checkpoint recommends, then the defaults; ``halo="auto"`` measures the
    model. A model with global context gets the gaussian merge, with a warning."""
    if halo == "auto":
        halo = _measured_halo(predictor, bands)
    parts = global_context(predictor.model)
    tile = tile or info.tile or 512
    merge, halo = _merge_mode(merge, parts, tile, halo if halo is not None else (info.halo or 64), predictor.stride)
    if parts:
        warnings.warn(f"{info.spec.arch}/{info.spec.encoder} has global context ({', '.join(parts[:4])}): tiled "
                      f"output cannot equal whole-image inference; using the {merge} merge with halo {halo} "
                      "(a larger --tile reduces the difference)", NonLocalModelWarning, stacklevel=stacklevel)
    return TileSpec(tile=tile, halo=halo, batch_size=batch_size, pad_mode=pad_mode), merge


MPP_TOLERANCE = 0.25


def check_mpp(info: ModelInfo, meta: ImageMeta, path: str) -> None:
    """Refuse an image whose resolution is far from the one the weights
    were trained at (when both are known)."""
    if not info.mpp or not meta.mpp:
        return
    ratio = meta.mpp / info.mpp
    if abs(ratio - 1) > MPP_TOLERANCE:
        raise InputError(f"{path}: the image is read at {meta.mpp:.4g} µm/px, but the weights were trained at "
                         f"{info.mpp:.4g} µm/px ({ratio:.2f}x): pass --mpp {info.mpp:g} (or the --level that "
                         "matches) so objects have the size the model learnt")


def _merge_mode(merge: str, parts: list[str], tile: int, halo: int, stride: int) -> tuple[str, int]:
    """Resolve ``merge="auto"``: crop for local models; for models with
    global context, gaussian with at least a quarter-window halo (windows
    overlap by half, as nnU-Net's default step), kept on the stride grid."""
    if merge not in ("auto", *MERGE_MODES):
        raise InputError(f"unknown --merge {merge!r}: use auto, {' or '.join(MERGE_MODES)}")
    if merge != "auto":
        return merge, halo
    if not parts:
        return "crop", halo
    step = stride // 2 if stride % 2 == 0 else stride
    quarter = (tile // 4 // step) * step
    return "gaussian", max(halo, quarter) if (tile - 2 * max(halo, quarter)) % stride == 0 else halo


def _tissue_windows(tissue: str, input, grid, *, bands, reader) -> np.ndarray:
    """Which windows touch tissue: ``tissue`` is "auto" or a mask file."""
    from .tissue import detect, from_file, thumbnail_side, window_has_tissue

    if tissue == "auto":
        mask = detect(os.fspath(input), side=thumbnail_side(grid.shape, grid.crop), bands=bands, reader=reader)
    else:
        mask = from_file(tissue)
    active = window_has_tissue(mask, grid.shape, grid.crop, grid.n_windows)
    log.info("--tissue %s: tissue on %.1f%% of the thumbnail, %d of %d windows to run", tissue,
             100 * mask.mean(), int(active.sum()), active.size)
    return active


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


def segment(array, model, *, tile: int = 512, halo: int = 64, batch_size: int = 4, pad_mode: str = "reflect",
            probabilities: bool = True, threshold: float = 0.5, valid=None, classes: int | None = None,
            mean=None, std=None, scale=None, device: str = "auto", tta: str = "none", merge: str = "crop"):
    """Segment an in-memory or lazy array; returns a lazy dask array.

    ``array`` is numpy, dask or zarr, shaped (H, W) or (H, W, bands) or a
    :class:`~tilerseg.io.Reader`. ``model`` is a torch module, a registry
    name (random weights) or a path to weights. The result is ``(classes,
    H, W)`` float32 probabilities (NaN where ``valid`` is False), or
    ``(H, W)`` uint8 labels with ``probabilities=False``; compute it, or
    store it with ``dask.array.to_zarr``, chunk by chunk."""
    src = array if isinstance(array, Reader) else ArrayReader(array, valid=valid)
    bands, dtype = src.meta.bands, src.meta.dtype
    if hasattr(model, "forward"):
        m, s, sc = resolve_normalization(Normalization(_t(mean), _t(std), scale), bands, dtype)
        predictor = Predictor(model, mean=m, std=s, scale=sc, device=device, tta=tta)
        n_classes = classes or _probe_classes(predictor, bands)
    else:
        path = os.fspath(model)
        weights = path if os.path.exists(path) else None
        info = model_info(path if weights is None else "unet", weights=weights, bands=bands,
                          classes=classes or 1, mean=mean, std=std, scale=scale)
        predictor = PredictorRef(info, bands, np.dtype(dtype).str, pick_device(device), tta).get()
        n_classes = info.spec.classes
    tiles = TileSpec(tile=tile, halo=halo, batch_size=batch_size, pad_mode=pad_mode)
    grid = tiles.grid(src.meta.shape, predictor.stride)
    return lazy_segment(src, predictor, grid, tiles, Output(probabilities, threshold, merge), n_classes)


def _t(v):
    return tuple(v) if v is not None else None


def _probe_classes(predictor: Predictor, bands: int) -> int:
    s = predictor.stride
    return int(predictor(np.zeros((1, s * 2, s * 2, bands), np.uint8)).shape[1])


def ingest(input, output, *, level: int | None = None, mpp: float | None = None, bands=None,
           reader: str = "auto", chunk: int = 1024, workers: int | None = None, overwrite: bool = False) -> str:
    """Copy any readable input into a chunked zarr group (``image``,
    ``valid``, metadata in attributes) that every cluster worker can read
    fast. Written atomically."""
    import shutil
    import uuid

    import zarr

    output = os.path.abspath(os.fspath(output).rstrip("/"))
    check_output(output, overwrite)
    src = open_reader(input, level=level, mpp=mpp, bands=tuple(bands) if bands else None, reader=reader)
    image, valid = lazy_image(src, chunk)
    head, tail = os.path.split(output)
    tmp = os.path.join(head, f".{tail}.{uuid.uuid4().hex[:8]}.partial.zarr")
    m = src.meta
    try:
        root = zarr.open_group(tmp, mode="w")
        root.attrs["tilerseg"] = {"mpp": m.mpp, "crs": m.crs, "transform": list(m.transform) if m.transform else None,
                                  "nodata": m.nodata, "band_names": list(m.band_names), "source": os.fspath(input),
                                  "level": m.level, "note": m.note}
        z = root.create_array("image", shape=image.shape, chunks=(chunk, chunk, m.bands), dtype=m.dtype)
        # all-valid chunks equal the fill value and are not written: no cost when nothing is masked
        zv = root.create_array("valid", shape=valid.shape, chunks=(chunk, chunk), dtype=bool, fill_value=True)
        compute_into([image, valid], [z, zv], workers=workers)  # one read per chunk feeds both
        if os.path.exists(output):
            shutil.rmtree(output) if os.path.isdir(output) else os.remove(output)
        os.rename(tmp, output)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
        src.close()
    return output


def halo(model: str = "unet", *, weights=None, encoder: str = "resnet34", classes: int = 1, in_channels: int = 3,
         **kwargs: Any) -> HaloReport:
    """Measure the receptive-field radius of a model (input-gradient support)
    and the halo to use with it; see :mod:`tilerseg.receptive`."""
    from .infer import output_stride

    info = describe(weights, ModelSpec(arch=model, encoder=encoder, classes=classes, in_channels=in_channels,
                                       kwargs=ModelSpec.freeze(kwargs)))
    net = instantiate(info)
    return measure_halo(net, in_channels=info.spec.in_channels, stride=output_stride(net))
