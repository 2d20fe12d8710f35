"""Scoring through the tiled engine: what ``tilerseg eval`` and the
training loop's validation report is what ``tilerseg run`` would write.

Probabilities come from the engine's plan with the tiling a run would choose
(:func:`tilerseg.tiling.resolve`); each output block is compared with the
matching window of the mask as soon as it is computed
(:func:`tilerseg.engine.reduce_blocks`), so the image and its mask are never
held whole. For one output channel the block is scored at
every threshold of a sweep at once (``>=``, as the engine labels).

For two classes, 2-D images up to :data:`.challenge.MAX_PIXELS` can also get
the ISBI challenge's object scores (:mod:`.challenge`: adapted Rand error,
variation of information, warping error), which need the whole image: the
blocks' object-class probabilities are then copied into one image-sized
array as they pass. With ``instances`` (``tilerseg eval --instances``) the
same image is also post-processed into objects by
:func:`tilerseg.instances.label`, the code ``tilerseg run --instances``
runs, and the objects (their boundaries as class 0) are scored beside the
plain threshold."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np

from ..engine import Output, TileSpec, reduce_blocks, segment_plan, volume_plan
from ..errors import InputError
from .data import LabelMap, Source, VolumeSource, find_pairs, open_sources, region_files
from .labels import VectorOptions
from .challenge import MAX_PIXELS, challenge_scores, segmentation_scores
from .metrics import IGNORE, confusion, scores

log = logging.getLogger(__name__)
SWEEP = tuple(round(float(t), 2) for t in np.arange(0.05, 0.96, 0.05))  # plain floats: they go into checkpoints


@dataclass
class ImageScore:
    name: str
    matrices: np.ndarray          # (thresholds, classes, classes)
    seconds: float = 0.0
    canvas: "Canvas | None" = None  # whole-image probabilities for the challenge scores
    instances: object = None        # InstanceOptions: also score the post-processed objects
    own_threshold: bool = False     # the objects' threshold is the options', not the one scored
    _challenge: dict = field(default_factory=dict, repr=False)
    _cells: dict = field(default_factory=dict, repr=False)

    def cells(self, threshold: float | None) -> dict:
        """Scores of the objects :func:`tilerseg.instances.label` makes of
        the image at ``threshold`` (their boundaries and the background as
        class 0): ``matrix`` (the confusion), the challenge's scores and
        ``objects`` (cached; empty without a canvas or instances)."""
        from dataclasses import replace

        from ..instances import label_array

        key = 0.5 if threshold is None else float(threshold)
        if self.own_threshold and self.instances is not None:
            key = float(self.instances.threshold)
        if key not in self._cells:
            if self.canvas is None or self.instances is None:
                return {}
            c = self.canvas
            labels = label_array(c.prob[None], replace(self.instances, threshold=key))
            on = labels > 0
            self._cells[key] = {"matrix": confusion(c.truth, on.astype(np.uint8), 2),
                                **segmentation_scores(c.truth == 1, on, c.prob, key, keep=c.truth != IGNORE),
                                "objects": int(labels.max()), "threshold": key}
        return self._cells[key]

    def challenge(self, threshold: float | None) -> dict:
        """The challenge's scores at ``threshold`` (cached; empty without a canvas)."""
        key = 0.5 if threshold is None else float(threshold)
        if key not in self._challenge:
            if self.canvas is None:
                return {}
            c = self.canvas
            self._challenge[key] = challenge_scores(c.truth == 1, c.prob, key, keep=c.truth != IGNORE)
        return self._challenge[key]


@dataclass
class Canvas:
    """An image's object-class probability and class labels, whole."""

    prob: np.ndarray
    truth: np.ndarray

    @classmethod
    def wanted(cls, source, classes: int) -> "Canvas | None":
        shape = tuple(source.shape)
        if classes != 2 or len(shape) != 2 or shape[0] * shape[1] > MAX_PIXELS:
            return None
        return cls(np.zeros(shape, np.float32), np.full(shape, IGNORE, np.uint8))

    def put(self, probs: np.ndarray, index, truth: np.ndarray) -> None:
        sl = tuple(index[1:])
        self.prob[sl] = np.nan_to_num(probs[0] if probs.shape[0] == 1 else probs[1])
        self.truth[sl] = truth


@dataclass
class Evaluation:
    """Confusion matrices per image and threshold; scores on demand."""

    class_names: tuple[str, ...]
    thresholds: tuple[float, ...]
    images: list[ImageScore] = field(default_factory=list)

    def total(self) -> np.ndarray:
        return sum(s.matrices for s in self.images)

    def best_threshold(self, monitor: str = "iou") -> float:
        """The sweep's threshold with the best overall score."""
        tot = self.total()
        vals = [scores(tot[i], self.class_names)[monitor] for i in range(len(self.thresholds))]
        vals = [(-v if monitor == "pixel_error" else v) for v in vals]
        return float(self.thresholds[int(np.nanargmax(vals))])

    def report(self, threshold: float | None = None) -> dict:
        """``{"images": [...], "overall": {...}}`` at ``threshold`` (for one
        output channel; the only matrix otherwise)."""
        i = self._index(threshold)
        th = self.thresholds[i]
        out = {"images": [{"image": s.name, **scores(s.matrices[i], self.class_names), **s.challenge(th)}
                          for s in self.images],
               "overall": {**scores(self.total()[i], self.class_names), **self._mean_challenge(th)}}
        if len(self.thresholds) > 1 or self.thresholds[0] is not None:
            out["threshold"] = self.thresholds[i]
        cells = self._cells_report(th)
        if cells:
            out["instances"] = cells
        return out

    def _cells_report(self, threshold) -> dict:
        """The post-processed objects' scores, per image and overall (pixel
        scores pooled over pixels, the challenge's averaged over images, as
        for the threshold)."""
        per = [s.cells(threshold) for s in self.images]
        if not per or not all(per):
            return {}
        names = self.class_names
        rows = [{"image": s.name, **_without(scores(p["matrix"], names)), **_without(p, "matrix")}
                for s, p in zip(self.images, per)]
        mean = {k: (int(sum(p[k] for p in per)) if isinstance(per[0][k], int) else
                    float(np.nanmean([p[k] for p in per]))) for k in per[0] if k != "matrix"}
        return {"images": rows, "overall": {**_without(scores(sum(p["matrix"] for p in per), names)), **mean}}

    def _mean_challenge(self, threshold) -> dict:
        """The challenge's scores averaged over the images (as it averaged
        its slices); event counts summed."""
        per = [s.challenge(threshold) for s in self.images]
        if not per or not all(per):
            return {}
        return {k: (int(sum(p[k] for p in per)) if isinstance(per[0][k], int) else
                    float(np.nanmean([p[k] for p in per]))) for k in per[0]}

    def _index(self, threshold):
        if threshold is None or len(self.thresholds) == 1:
            return 0 if len(self.thresholds) == 1 else self.thresholds.index(0.5) if 0.5 in self.thresholds else 0
        best = int(np.argmin([abs(t - threshold) for t in self.thresholds]))
        return best


def _without(d: dict, *keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys + ("per_class", "pixels")}


def _block_confusion(probs: np.ndarray, index, source, thresholds, classes: int, canvas=None) -> np.ndarray:
    ranges = [(int(sl.start), int(sl.stop)) for sl in index[1:]]  # index: (classes, *spatial slices)
    truth = source.truth(ranges)
    nodata = np.isnan(probs).any(axis=0)
    truth = np.where(nodata, IGNORE, truth)
    if canvas is not None:
        canvas.put(probs, index, truth)
    if probs.shape[0] == 1:
        p = np.nan_to_num(probs[0])
        return np.stack([confusion(truth, (p >= t).astype(np.uint8), classes) for t in thresholds])
    pred = np.nan_to_num(probs).argmax(axis=0)
    return confusion(truth, pred, classes)[None]


def score_source(source, predictor, tiles: TileSpec, merge: str, classes: int, out_channels: int,
                 thresholds, workers: int | None = None, canvas: Canvas | None = None) -> np.ndarray:
    """Confusion matrices ``(len(thresholds), classes, classes)`` of one
    image, computed block by block by the tiled engine (the blocks also
    fill ``canvas`` when given)."""
    from ..geometry import Grid3, as_triple

    out = Output(probabilities=True, merge=merge)
    if len(source.shape) == 3:
        grid3 = Grid3(source.shape, as_triple(tiles.tile, "tile"), as_triple(tiles.halo, "halo"), predictor.stride)
        plan = volume_plan(source.image, predictor, grid3, out, out_channels, pad_mode=tiles.pad_mode)
    else:
        plan = segment_plan(source.image, predictor, tiles.grid(source.shape, predictor.stride), tiles, out,
                            out_channels)
    parts = reduce_blocks(plan, lambda probs, index: _block_confusion(probs, index, source, thresholds, classes,
                                                                      canvas), workers=workers)
    return np.sum(parts, axis=0)


def evaluate_sources(sources: list[Source], predictor, tiles: TileSpec, merge: str, class_names, out_channels: int,
                     sweep: bool = False, threshold: float = 0.5, workers: int | None = None,
                     challenge: bool = False, instances=None, own_threshold: bool = False,
                     keep: bool = False) -> Evaluation:
    """Score ``sources``; with ``challenge``, two-class 2-D images small
    enough also get the challenge's object scores in :meth:`Evaluation.report`
    (at one threshold they are computed image by image, so only one image is
    held at a time; a sweep keeps every image's probabilities until the
    threshold is chosen). ``instances`` (:class:`tilerseg.instances.InstanceOptions`,
    with ``challenge``): the report's ``instances`` scores the objects made
    of the same probabilities, at their own threshold with ``own_threshold``.
    ``keep``: every image's canvas is kept (to score other post-processes
    of the same probabilities, as ``scripts/tune_em_instances.py`` does)."""
    import time

    thresholds = (SWEEP if sweep else (threshold,)) if out_channels == 1 else (None,)
    if out_channels == 1 and threshold not in thresholds:
        thresholds = tuple(sorted({*thresholds, threshold}))
    ev = Evaluation(class_names=tuple(class_names), thresholds=thresholds)
    for src in sources:
        t0 = time.perf_counter()
        canvas = Canvas.wanted(src, len(class_names)) if challenge else None
        m = score_source(src, predictor, tiles, merge, len(class_names), out_channels,
                         thresholds if out_channels == 1 else (0.5,), workers, canvas)
        score = ImageScore(src.pair.name, m, time.perf_counter() - t0, canvas, instances, own_threshold)
        if canvas is not None and len(thresholds) == 1 and not keep:  # the only threshold: score now, free it
            score.challenge(thresholds[0])
            score.cells(thresholds[0])
            score.canvas = None
        ev.images.append(score)
    return ev


def evaluate(weights, images, masks, *, tile: int | None = None, halo=None, batch_size: int | None = None,
             merge: str = "auto", tta: str | None = None, threshold: float | None = None, sweep: bool = False,
             level=None, mpp=None, bands=None, device: str = "auto", workers: int | None = None,
             mask_values=None, ignore_value=None, mask_suffix: str = "", instances=None,
             keep: bool = False, regions=None, region_classes=("Region",), class_attribute=None,
             label_layer=None) -> tuple[Evaluation, float]:
    """``tilerseg eval``: score ``weights`` on image/mask pairs. Mask values
    are read as in training (the checkpoint records how); returns the
    evaluation and the threshold to report (swept, given, the checkpoint's,
    or 0.5). ``instances`` (the run's :class:`tilerseg.config.OutputOptions`):
    also score the objects ``tilerseg run --instances`` would make with them.
    Vector truth (:mod:`.labels`) is named by the checkpoint's class names
    and scored inside its known area only (``regions`` as in training)."""
    from ..api import PredictorRef, check_mpp, choose_tiling, instance_options, model_info
    from ..config import TilingOptions
    from ..infer import pick_device
    from ..models import ModelSpec, describe, is_volumetric

    pairs = find_pairs(images, masks, mask_suffix=mask_suffix)
    recorded = describe(os.fspath(weights), ModelSpec())
    names = recorded.class_names or tuple(f"class{i}" for i in range(max(2, recorded.spec.classes)))
    labels = LabelMap(len(names), mask_values if mask_values is not None else recorded.mask_values,
                      ignore_value if ignore_value is not None else recorded.ignore_value)
    if is_volumetric(recorded.spec.arch):
        sources = [VolumeSource(p, labels) for p in pairs]
    else:
        vector = VectorOptions(class_names=tuple(names), regions=regions, region_classes=tuple(region_classes),
                               class_attribute=class_attribute, layer=label_layer)
        sources = open_sources(pairs, labels, vector=vector, regions=region_files(regions, pairs), level=level,
                               mpp=mpp, bands=bands)
    try:
        for s in sources:
            if isinstance(s, Source):
                s.check_values(instances=instances is not None)
        probe = sources[0].image.meta.bands
        info = model_info("unet", weights=os.fspath(weights), bands=probe)
        ref = PredictorRef(info, probe, np.dtype(sources[0].image.meta.dtype).str, pick_device(device),
                           tta or info.tta)
        predictor = ref.get()
        for s in sources:
            if s.image.meta.bands != probe:
                raise InputError(f"{s.pair.image}: {s.image.meta.bands} band(s), the first image has {probe}")
            if isinstance(s, Source):
                check_mpp(info, s.image.meta, s.pair.image)
        opts = TilingOptions(tile=tile, halo=halo, batch_size=batch_size, merge=merge)
        tiling = choose_tiling(opts, info, predictor, sources[0].shape)
        merge = tiling.merge
        tiles = tiling.tilespec()
        th = info.binary_threshold(threshold)
        from ..api import with_checkpoint_postprocess

        own = instances is not None and with_checkpoint_postprocess(instances, info).object_threshold is not None
        if instances is not None:
            instances = instance_options(instances, info, th)
        ev = evaluate_sources(sources, predictor, tiles, merge, names, info.spec.classes, sweep=sweep,
                              threshold=th, workers=workers, challenge=True, instances=instances,
                              own_threshold=own, keep=keep)
    finally:
        for s in sources:
            s.close()
    return ev, (ev.best_threshold() if sweep and info.spec.classes == 1 else th)
