"""``tilerseg train``: the training loop.

Random crops from image/mask pairs (:mod:`.data`), augmented
(:mod:`.augment`), a loss from :mod:`tilerseg.losses`, AdamW or RAdam with
Lookahead, a cosine or plateau schedule, mixed precision on GPU, gradient
accumulation. After every epoch the model is scored on the validation images
by the tiled engine (:mod:`.evaluate`), the log (CSV and JSON) and the plot
are rewritten, and ``last.pt`` (with the optimiser state, for ``--resume``)
and, when the monitored score improves, ``best.pt`` are saved. Both are
self-describing checkpoints for ``tilerseg run --weights``."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace

import numpy as np

from ..engine import TileSpec
from ..errors import InputError, ModelError
from ..infer import IMAGENET_MEAN, IMAGENET_STD, Predictor, output_stride, pick_device
from ..losses import instance_weights, make_loss
from ..models.weights import postprocess_record
from ..models import ModelInfo, arch, dtype_scale, is_volumetric, ModelSpec, Normalization, build, global_context, save_checkpoint
from .augment import build_augment
from .config import TrainConfig
from .data import CropDataset, LabelMap, Source, VolumeSource, find_pairs, open_sources, region_files, sample_stats, split
from .evaluate import evaluate_sources
from .labels import VectorOptions, is_vector
from .metrics import IGNORE

log = logging.getLogger("tilerseg.train")


@dataclass
class TrainResult:
    run_dir: str
    best: str
    last: str
    best_epoch: int
    best_scores: dict
    epochs_run: int
    seconds: float
    stopped: str
    threshold: float
    final: dict | None = None   # validation of best.pt with the recommended TTA and threshold


def _open_sources(cfg: TrainConfig) -> tuple[list[Source], list[Source], LabelMap]:
    labels = LabelMap(cfg.classes, cfg.mask_values, cfg.ignore_value)
    if cfg.val_images is not None:
        train_pairs = find_pairs(cfg.images, cfg.masks, mask_suffix=cfg.mask_suffix)
        val_pairs = find_pairs(cfg.val_images, cfg.val_masks or cfg.masks, mask_suffix=cfg.mask_suffix)
    elif cfg.val_names:
        pairs = find_pairs(cfg.images, cfg.masks, mask_suffix=cfg.mask_suffix)
        names = {str(n) for n in cfg.val_names}
        val_pairs = [p for p in pairs if p.name in names]
        train_pairs = [p for p in pairs if p.name not in names]
        missing = names - {p.name for p in val_pairs}
        if missing or not train_pairs:
            raise InputError(f"val_names: {', '.join(sorted(missing)) or 'all images'} "
                             f"{'not among the images' if missing else 'leave nothing to train on'}")
    else:
        train_pairs, val_pairs = split(find_pairs(cfg.images, cfg.masks, mask_suffix=cfg.mask_suffix),
                                       cfg.val_fraction, cfg.seed)
    if is_volumetric(cfg.model):
        vector = next((p.mask for p in train_pairs + val_pairs if is_vector(p.mask)), None)
        if vector:
            raise InputError(f"{vector}: vector labels are 2-D; a volume needs a label volume of its shape")
        if any(v is not None for v in (cfg.level, cfg.mpp, cfg.bands)):
            raise InputError("level, mpp and bands apply to 2-D images; volumes are read whole-resolution")
        train = [VolumeSource(p, labels) for p in train_pairs]
        val = [VolumeSource(p, labels) for p in val_pairs]
    else:
        vector = VectorOptions(class_names=tuple(cfg.class_names), regions=cfg.regions,
                               region_classes=tuple(cfg.region_classes), class_attribute=cfg.class_attribute,
                               layer=cfg.label_layer)
        kw = dict(level=cfg.level, mpp=cfg.mpp, bands=cfg.bands, vector=vector,
                  regions=region_files(cfg.regions, train_pairs + val_pairs))
        train = open_sources(train_pairs, labels, **kw)
        val = open_sources(val_pairs, labels, opened=train, **kw)
    bands = {s.image.meta.bands for s in train + val}
    if len(bands) > 1:
        raise InputError(f"the images have different band counts ({sorted(bands)}): choose bands with `bands:`")
    return train, val, labels


def _normalization(cfg: TrainConfig, train: list[Source], bands: int) -> Normalization:
    scale = cfg.scale or dtype_scale(train[0].image.meta.dtype)
    if cfg.normalization == "imagenet":
        if bands != 3:
            raise InputError(f"normalization imagenet needs 3 bands, the images have {bands}: use auto")
        return Normalization(mean=IMAGENET_MEAN, std=IMAGENET_STD, scale=scale)
    if cfg.normalization == "given":
        mean, std = tuple(map(float, cfg.mean)), tuple(map(float, cfg.std))
    else:
        mean, std = sample_stats(train, scale, seed=cfg.seed)
    if len(mean) != bands or len(std) != bands:
        mean, std = (mean * bands)[:bands], (std * bands)[:bands]
    return Normalization(mean=mean, std=std, scale=scale)


def _model(cfg: TrainConfig, bands: int):
    spec = ModelSpec(arch=cfg.model, encoder=cfg.encoder, classes=cfg.out_channels, in_channels=bands,
                     encoder_weights=cfg.encoder_weights, kwargs=ModelSpec.freeze(dict(cfg.model_args)))
    model = build(spec)
    if cfg.init_weights:
        from ..models.weights import load_state

        state = load_state(cfg.init_weights)
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise ModelError(f"{cfg.init_weights}: init_weights do not fit {cfg.model}/{cfg.encoder} with "
                             f"{cfg.out_channels} output channel(s): {str(err).splitlines()[0]}") from err
    return model, replace(spec, encoder_weights=None)


def _optimizer(cfg: TrainConfig, model):
    import torch

    pretrained = bool(cfg.encoder_weights or cfg.init_weights)
    encoder = getattr(model, "encoder", None)
    if pretrained and encoder is not None and cfg.encoder_lr_factor != 1:
        enc = {id(p) for p in encoder.parameters()}
        groups = [{"params": [p for p in model.parameters() if id(p) in enc], "lr": cfg.lr * cfg.encoder_lr_factor},
                  {"params": [p for p in model.parameters() if id(p) not in enc], "lr": cfg.lr}]
    else:
        groups = [{"params": list(model.parameters()), "lr": cfg.lr}]
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    from timm.optim import Lookahead

    return Lookahead(torch.optim.RAdam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay))


def _scheduler(cfg: TrainConfig, opt, steps_per_epoch: int):
    import torch

    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            opt, mode="min" if cfg.monitor == "pixel_error" else "max", factor=cfg.plateau_factor,
            patience=cfg.plateau_patience, min_lr=cfg.min_lr)
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = cfg.warmup_epochs * steps_per_epoch
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if cfg.schedule == "none":
            return 1.0
        t = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _precision(cfg: TrainConfig, device: str):
    import torch

    if device == "cpu":
        if cfg.precision == "fp16":
            raise InputError("precision fp16 needs a GPU; use bf16 or fp32 on CPU")
        if cfg.precision == "auto":
            # oneDNN runs bf16 convolutions natively on CPUs with AVX512-BF16/AMX (about 2x fp32 here);
            # elsewhere it would emulate them, slower than fp32
            return (torch.bfloat16 if _cpu_bf16() else None), False
        return (torch.bfloat16 if cfg.precision == "bf16" else None), False
    if cfg.precision == "fp32":
        return None, False
    if cfg.precision == "bf16" or (cfg.precision == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def _cpu_bf16() -> bool:
    import torch

    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _is_better(monitor: str, new: float, best: float | None) -> bool:
    if not np.isfinite(new):
        return False
    if best is None:
        return True
    return new < best - 1e-6 if monitor == "pixel_error" else new > best + 1e-6


def _tiling(cfg: TrainConfig, model, bands: int) -> TileSpec:
    """The tile and halo validation runs with, and the checkpoint recommends:
    the halo as :func:`tilerseg.tiling.resolve` chooses it (``halo: auto``:
    the receptive field); the tile grows when the halo would leave too
    small a crop."""
    from ..config import TilingOptions
    from ..tiling import resolve

    stride = output_stride(model)
    dims = 3 if is_volumetric(cfg.model) else 2
    was = model.training
    chosen = resolve(TilingOptions(halo=cfg.halo), model=model, info=ModelInfo(spec=ModelSpec()), stride=stride,
                     dims=dims, bands=bands, shape=(cfg.tile,) * dims, global_parts=global_context(model))
    model.train(was)
    halo = chosen.halo[0]
    tile = int(cfg.tile)
    if tile - 2 * halo < max(stride, tile // 4):
        tile = int(math.ceil((2 * halo + max(stride, cfg.tile // 2)) / stride) * stride)
        log.info("tile %d leaves too small a crop with halo %d: validating and recommending tile %d",
                 cfg.tile, halo, tile)
    return TileSpec(tile=tile, halo=halo, batch_size=cfg.val_batch_size)


class _Log:
    """history.csv, history.json and curves.png in the run folder."""

    def __init__(self, run_dir: str, history: list[dict]):
        self.run_dir, self.history = run_dir, history

    def add(self, row: dict) -> None:
        self.history.append(row)
        flat = [{k: v for k, v in r.items() if not isinstance(v, dict)} for r in self.history]
        for r, full in zip(flat, self.history):
            for name, sc in full.get("per_class", {}).items():
                r[f"iou_{name}"], r[f"dice_{name}"] = sc["iou"], sc["dice"]
        keys = list(dict.fromkeys(k for r in flat for k in r))
        with open(os.path.join(self.run_dir, "history.csv"), "w", newline="") as f:
            w = csv.DictWriter(f, keys)
            w.writeheader()
            w.writerows(flat)
        with open(os.path.join(self.run_dir, "history.json"), "w") as f:
            json.dump(self.history, f, indent=1)
        self.plot()

    def plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ep = [r["epoch"] for r in self.history]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(ep, [r["train_loss"] for r in self.history], label="train loss")
        a.set_xlabel("epoch")
        a.set_ylabel("loss")
        a.legend()
        for key in ("iou", "dice", "pixel_error"):
            b.plot(ep, [r[key] for r in self.history], label=f"val {key}")
        b.set_xlabel("epoch")
        b.set_ylim(0, 1)
        b.legend()
        b.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(os.path.join(self.run_dir, "curves.png"), dpi=80)
        plt.close(fig)


def _load_last(path: str) -> dict:
    """``last.pt`` for --resume, or one line saying why it cannot be used."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise InputError(f"{path}: cannot be loaded to resume ({type(err).__name__}: not a readable torch "
                         "checkpoint); it is damaged or truncated: start a new run in another "
                         "folder (-o), or delete last.pt to start this one over") from err
    if not isinstance(state, dict) or "training" not in state or "state_dict" not in state:
        raise InputError(f"{path}: not a last.pt written by tilerseg train (no training state), so there is "
                         "nothing to resume: start a new run in another folder (-o)")
    return state


def train(cfg: TrainConfig, run_dir, *, resume: bool = False, progress: bool | None = None,
          workers: int | None = None) -> TrainResult:
    """Train as ``cfg`` says into ``run_dir``; ``resume`` continues from
    ``run_dir/last.pt`` (same config) where a previous run stopped. One
    training per run folder: a second one is refused (the output lock)."""
    from ..io.lock import OutputLock

    run_dir = os.fspath(run_dir)
    os.makedirs(os.path.dirname(os.path.abspath(run_dir)), exist_ok=True)  # runs/ on a fresh checkout
    with OutputLock(run_dir):
        return _train(cfg, run_dir, resume=resume, progress=progress, workers=workers)


def _train(cfg: TrainConfig, run_dir: str, *, resume: bool, progress, workers) -> TrainResult:
    import torch

    fresh = not os.path.exists(run_dir)
    os.makedirs(run_dir, exist_ok=True)
    last_path, best_path = os.path.join(run_dir, "last.pt"), os.path.join(run_dir, "best.pt")
    if not resume and os.path.exists(last_path):
        raise InputError(f"{run_dir} already holds a training run (last.pt): pass --resume to continue it, "
                         "or choose another -o")
    handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logging.getLogger("tilerseg").addHandler(handler)
    if logging.getLogger("tilerseg").level > logging.INFO or logging.getLogger("tilerseg").level == 0:
        logging.getLogger("tilerseg").setLevel(logging.INFO)
    train_src, val_src, labels = [], [], None
    try:
        torch.manual_seed(cfg.seed)
        try:
            train_src, val_src, labels = _open_sources(cfg)
        except InputError:  # bad data: leave no run folder behind that looks like a run
            if fresh:
                import shutil

                shutil.rmtree(run_dir, ignore_errors=True)
            raise
        bands = train_src[0].image.meta.bands
        log.info("training on %d image(s), validating on %d: %s", len(train_src), len(val_src),
                 ", ".join(s.pair.name for s in val_src))
        norm = _normalization(cfg, train_src, bands)
        device = pick_device(cfg.device)
        model, spec = _model(cfg, bands)
        tiles = _tiling(cfg, model, bands)
        merge = "gaussian" if global_context(model) else "crop"
        fmt = torch.channels_last_3d if is_volumetric(cfg.model) else torch.channels_last
        model = model.to(device, memory_format=fmt)
        mpp = getattr(train_src[0].image.meta, "mpp", None)
        info = ModelInfo(spec=spec, normalization=norm, class_names=tuple(cfg.class_names), mpp=mpp,
                         tile=tiles.tile, halo=tiles.halo, threshold=cfg.threshold if cfg.binary else None,
                         mask_values=labels.values, ignore_value=labels.ignore, tta=cfg.tta,
                         input_dtype=np.dtype(train_src[0].image.meta.dtype).name, input_range=(0.0, float(norm.scale)),
                         postprocess=postprocess_record(cfg.postprocess, "the training config"))
        steps = max(1, cfg.samples_per_epoch // cfg.batch_size // cfg.accumulate)
        opt = _optimizer(cfg, model)
        sched = _scheduler(cfg, opt, steps)
        amp_dtype, use_scaler = _precision(cfg, device)
        scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        ema = None
        if cfg.ema:
            from timm.utils import ModelEmaV3

            ema = ModelEmaV3(model, decay=float(cfg.ema), use_warmup=True)
        net = ema.module if ema is not None else model  # what validation scores and checkpoints hold
        start, best, best_epoch, bad, history = 1, None, 0, 0, []
        if resume and os.path.exists(last_path):
            state = _load_last(last_path)
            tr = state["training"]
            if tr["config"] != _comparable(cfg):
                log.warning("--resume: the config differs from the one %s was trained with; continuing anyway",
                            last_path)
            model.load_state_dict(tr.get("raw_state_dict") or state["state_dict"])
            if ema is not None:
                ema.module.load_state_dict(state["state_dict"])
            opt.load_state_dict(tr["optimizer"])
            sched.load_state_dict(tr["scheduler"])
            if scaler is not None and tr.get("scaler"):
                scaler.load_state_dict(tr["scaler"])
            torch.set_rng_state(tr["torch_rng"])
            start, best, best_epoch, bad = tr["epoch"] + 1, tr["best"], tr["best_epoch"], tr["bad_epochs"]
            history = json.loads(tr["history"])
            info = replace(info, normalization=_norm_from(state["normalization"]))
            norm = info.normalization
            log.info("resuming after epoch %d (best %s %.4f at epoch %d)", tr["epoch"], cfg.monitor,
                     best if best is not None else float("nan"), best_epoch)
        logger = _Log(run_dir, history)
        ds = CropDataset(train_src, crop=cfg.crop, length=steps * cfg.batch_size * cfg.accumulate, seed=cfg.seed,
                         scale=norm.scale, mean=norm.mean, std=norm.std,
                         augment=build_augment(cfg.augment, cfg.crop[-1] if isinstance(cfg.crop, list) else cfg.crop,
                                               bands=spec.in_channels),
                         foreground=cfg.foreground,
                         weight_map=_weight_fn(cfg) if cfg.loss == "unet_weighted" else None)
        loss_fn = make_loss(cfg.loss, **dict(cfg.loss_args))
        log.info("%s%s, %.2f M parameters, %d output channel(s); %d steps of %d x %s px crops per epoch; "
                 "validation tile %d halo %d (%s merge) on %s%s", spec.arch,
                 "" if not arch(spec.arch).smp else f"/{spec.encoder}",
                 sum(p.numel() for p in model.parameters()) / 1e6, cfg.out_channels, steps, cfg.batch_size,
                 "x".join(map(str, cfg.crop)) if isinstance(cfg.crop, list) else cfg.crop, tiles.tile,
                 tiles.halo, merge, device, f", {str(amp_dtype).replace('torch.', '')} autocast" if amp_dtype is not None else "")
        t_start = time.perf_counter() - (history[-1]["elapsed"] if history else 0.0)
        stopped = "epochs"
        epoch = start - 1
        for epoch in range(start, cfg.epochs + 1):
            t0 = time.perf_counter()
            ds.set_epoch(epoch)
            loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=False,
                                                 num_workers=cfg.loader_workers, drop_last=True,
                                                 pin_memory=device.startswith("cuda"))
            model.train()
            losses = []
            with _progress(progress, f"epoch {epoch}/{cfg.epochs}", steps * cfg.accumulate) as advance:
                for i, batch in enumerate(loader):
                    x = batch[0].to(device, non_blocking=True).contiguous(memory_format=fmt)
                    rest = [b.to(device, non_blocking=True) for b in batch[1:]]
                    with torch.autocast(device.split(":")[0], dtype=amp_dtype, enabled=amp_dtype is not None):
                        logits = model(x)
                    loss = loss_fn(logits.float(), *rest) / cfg.accumulate
                    (scaler.scale(loss) if scaler else loss).backward()
                    losses.append(loss.item() * cfg.accumulate)
                    if (i + 1) % cfg.accumulate == 0:
                        if scaler:
                            scaler.step(opt)
                            scaler.update()
                        else:
                            opt.step()
                        opt.zero_grad(set_to_none=True)
                        if ema is not None:  # warm-up: early averages do not drag the random start along
                            ema.update(model, step=(epoch - 1) * steps + (i + 1) // cfg.accumulate)
                        if cfg.schedule != "plateau":
                            sched.step()
                    advance(float(np.mean(losses[-20:])))
            train_seconds = time.perf_counter() - t0
            # per-epoch validation without TTA (model selection; cheap); the final sweep uses cfg.tta
            predictor = Predictor(net, mean=norm.mean, std=norm.std, scale=norm.scale, device=device)
            ev = evaluate_sources(val_src, predictor, tiles, merge, cfg.class_names, cfg.out_channels,
                                  threshold=cfg.threshold, workers=workers)
            sc = ev.report(cfg.threshold)["overall"]
            lr = opt.param_groups[-1]["lr"]
            if cfg.schedule == "plateau":
                sched.step(sc[cfg.monitor])
            row = {"epoch": epoch, "lr": lr, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   "iou": sc["iou"], "dice": sc["dice"], "pixel_error": sc["pixel_error"],
                   "misclassified": sc["misclassified"], "train_seconds": round(train_seconds, 2), "val_seconds": round(time.perf_counter() - t0 -
                                                                                  train_seconds, 2),
                   "elapsed": round(time.perf_counter() - t_start, 2), "per_class": sc["per_class"]}
            improved = _is_better(cfg.monitor, sc[cfg.monitor], best)
            if improved:
                best, best_epoch, bad = sc[cfg.monitor], epoch, 0
                save_checkpoint(best_path, net, info, training_summary={"epoch": epoch, "scores": _plain(sc)})
            else:
                bad += 1
            logger.add(row)
            save_checkpoint(last_path, net, info, training={
                "epoch": epoch, "raw_state_dict": model.state_dict() if ema is not None else None,
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None, "torch_rng": torch.get_rng_state(),
                "best": best, "best_epoch": best_epoch, "bad_epochs": bad, "history": json.dumps(logger.history),
                "config": _comparable(cfg)})
            log.info("epoch %d/%d: loss %.4f, val IoU %.4f, Dice %.4f, pixel error %.4f%s (%.0f s + %.0f s val)",
                     epoch, cfg.epochs, row["train_loss"], sc["iou"], sc["dice"], sc["pixel_error"],
                     "  *best*" if improved else "", train_seconds, row["val_seconds"])
            if cfg.early_stopping and bad >= cfg.early_stopping:
                stopped = f"early stopping: no better {cfg.monitor} for {bad} epochs"
                break
            if cfg.max_minutes and time.perf_counter() - t_start > cfg.max_minutes * 60:
                stopped = f"max_minutes {cfg.max_minutes:g} reached"
                break
        threshold, final = cfg.threshold, None
        if not os.path.exists(best_path):
            save_checkpoint(best_path, net, info)
        elif (cfg.sweep_threshold and cfg.binary) or cfg.tta != "none":
            threshold, final = _sweep(best_path, net, info, val_src, tiles, merge, cfg, device, workers)
        with open(os.path.join(run_dir, "summary.json"), "w") as f:
            json.dump({"best_epoch": best_epoch, "monitor": cfg.monitor, "best": best, "stopped": stopped,
                       "validation_images": [s.pair.name for s in val_src], "final": final,
                       "seconds": round(time.perf_counter() - t_start, 1)}, f, indent=1)
        best_scores = next((r for r in logger.history if r["epoch"] == best_epoch), {})
        log.info("done after epoch %d (%s); best %s %.4f at epoch %d -> %s", epoch, stopped, cfg.monitor,
                 best if best is not None else float("nan"), best_epoch, best_path)
        return TrainResult(run_dir=run_dir, best=best_path, last=last_path, best_epoch=best_epoch,
                           best_scores={"per_class": {}, **best_scores},
                           epochs_run=epoch - start + 1, seconds=time.perf_counter() - t_start,
                           stopped=stopped, threshold=threshold, final=final)
    finally:
        for s in train_src + val_src:
            s.close()
        logging.getLogger("tilerseg").removeHandler(handler)
        handler.close()


def _sweep(best_path, model, info, val_src, tiles, merge, cfg, device, workers) -> float:
    """Score the best model on validation with the recommended TTA, at every
    threshold of the sweep when asked, and record the best threshold (by
    ``monitor``) and the scores in ``best.pt``."""
    import torch

    state = torch.load(best_path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["state_dict"])
    n = info.normalization
    predictor = Predictor(model, mean=n.mean, std=n.std, scale=n.scale, device=device, tta=cfg.tta)
    ev = evaluate_sources(val_src, predictor, tiles, merge, cfg.class_names, cfg.out_channels,
                          sweep=cfg.sweep_threshold and cfg.binary, threshold=cfg.threshold, workers=workers,
                          challenge=True)
    th = ev.best_threshold(cfg.monitor) if cfg.sweep_threshold and cfg.binary else cfg.threshold
    rep, base = ev.report(th)["overall"], ev.report(cfg.threshold)["overall"]
    log.info("best model on validation with tta %s: IoU %.4f, Dice %.4f, pixel error %.4f%s at threshold %g "
             "(%s %.4f at %g)", cfg.tta, rep["iou"], rep["dice"], rep["pixel_error"], _challenge_text(rep), th,
             cfg.monitor, base[cfg.monitor], cfg.threshold)
    summary = dict(state.get("training_summary") or {})
    summary["final"] = {"tta": cfg.tta, "threshold": th, "scores": _plain(rep),
                        "images": _plain(ev.report(th)["images"])}
    save_checkpoint(best_path, model, replace(info, threshold=th if cfg.binary else None),
                    training_summary=summary)
    return th, summary["final"]


def _challenge_text(sc: dict) -> str:
    if "adapted_rand_error" not in sc:
        return ""
    return (f", adapted Rand error {sc['adapted_rand_error']:.4f}, warping error {sc['warping_error']:.6f} "
            f"({sc['splits']} splits, {sc['mergers']} mergers)")


def _weight_fn(cfg: TrainConfig):
    args = dict(cfg.loss_args)
    w0, sigma, cw = args.get("w0", 10.0), args.get("sigma", 5.0), args.get("class_weights")
    return lambda labels: instance_weights(labels, w0=w0, sigma=sigma, class_weights=cw, ignore_index=IGNORE)


def _comparable(cfg: TrainConfig) -> str:
    d = cfg.as_dict()
    for k in ("epochs", "max_minutes", "early_stopping", "loader_workers", "device"):
        d.pop(k, None)
    return json.dumps(d, sort_keys=True, default=str)


def _norm_from(n: dict) -> Normalization:
    return Normalization(mean=tuple(n["mean"]), std=tuple(n["std"]), scale=n["scale"])


def _plain(sc: dict) -> dict:
    return json.loads(json.dumps(sc))


class _progress:
    """A rich progress bar on a terminal; nothing otherwise (the epoch line is logged)."""

    def __init__(self, enabled: bool | None, label: str, total: int):
        import sys

        self.enabled = (sys.stderr.isatty() or os.environ.get("TILERSEG_PROGRESS") == "1") \
            if enabled is None else enabled
        self.label, self.total = label, total

    def __enter__(self):
        if not self.enabled:
            return lambda loss: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                           TextColumn("loss {task.fields[loss]:.4f}"), TimeRemainingColumn(), transient=True)
        self._p.start()
        task = self._p.add_task(self.label, total=self.total, loss=float("nan"))
        return lambda loss: self._p.update(task, advance=1, loss=loss)

    def __exit__(self, *exc):
        if self.enabled:
            self._p.stop()
