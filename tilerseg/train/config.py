"""Training configuration: one flat, validated set of options.

A YAML file may group them in sections (``data:``, ``model:``, ``loss:``,
``optim:``, ``train:``, ``infer:``) or not; the sections are only for the
reader. Unknown keys fail with the list of valid ones. Flags on the command
line (``--epochs 3``, ``--set lr=1e-3``) override the file.

Relative data paths are taken from the current folder, or else from the
config file's folder."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError

SECTIONS = ("data", "model", "loss", "augment", "optim", "train", "infer")
LOSSES = ("dice_bce", "jaccard_bce", "ce_dice", "ce", "unet_weighted")
OPTIMIZERS = ("adamw", "radam_lookahead")
SCHEDULES = ("cosine", "plateau", "none")
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
MONITORS = ("iou", "dice", "pixel_error")


@dataclass
class TrainConfig:
    # data
    images: Any = None                 # file, folder, or list of them
    masks: Any = None
    val_images: Any = None             # optional: otherwise val_fraction of the images, by image
    val_masks: Any = None
    mask_suffix: str = ""              # a_mask.png matches a.png with "_mask"
    class_names: list = field(default_factory=lambda: ["background", "foreground"])
    mask_values: list | None = None    # mask value of each class (default: non-zero = 1 for 2 classes)
    ignore_value: int | None = None    # mask value of unannotated pixels (not trained on, not scored)
    regions: Any = None                # vector labels: "image", or vector file(s)/folder of known areas (by stem)
    region_classes: list = field(default_factory=lambda: ["Region"])  # vector classes marking known areas
    class_attribute: str | None = None # vector attribute naming the class (default classification.name, name, class)
    label_layer: str | None = None     # GeoPackage layer of the labels
    val_fraction: float = 0.2
    val_names: list | None = None      # hold out these images (by name without extension) instead of a random share
    level: int | None = None
    mpp: float | None = None
    bands: list | None = None
    crop: Any = 256                    # side in px; for volumes one side or [z, y, x]
    samples_per_epoch: int = 256
    foreground: float = 0.0            # share of crops that must hold a non-background pixel
    normalization: str = "auto"        # auto (measured on the training images), imagenet, or given mean/std
    mean: list | None = None
    std: list | None = None
    scale: float | None = None         # pixel / scale is in [0, 1]; default: the dtype's maximum
    loader_workers: int = 0
    # model
    model: str = "unet"
    encoder: str = "resnet18"
    encoder_weights: str | None = None
    model_args: dict = field(default_factory=dict)
    init_weights: str | None = None    # start from these weights (fine-tuning)
    # loss and augmentation
    loss: str = "dice_bce"
    loss_args: dict = field(default_factory=dict)
    augment: str = "medium"
    # optimisation
    optimizer: str = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    encoder_lr_factor: float = 0.1     # applied to a pretrained encoder (encoder_weights or init_weights)
    schedule: str = "cosine"
    warmup_epochs: int = 0
    min_lr: float = 1e-6
    plateau_patience: int = 3
    plateau_factor: float = 0.5
    epochs: int = 20
    batch_size: int = 8
    accumulate: int = 1
    precision: str = "auto"            # autocast; auto = bf16 on GPUs and CPUs that run it natively, fp16 on older GPUs, else fp32
    device: str = "auto"
    seed: int = 0
    ema: float = 0.0                   # decay of an exponential moving average of the weights (0 = off); it is what
                                       # validation scores and the checkpoints hold
    early_stopping: int = 0            # epochs without improvement before stopping (0 = off)
    monitor: str = "iou"
    max_minutes: float | None = None   # stop after the epoch that passes this wall time
    # inference (validation and the checkpoint's recommendation)
    tile: int = 512
    halo: Any = "auto"                 # "auto": measured on the trained model at the end
    val_batch_size: int = 4
    threshold: float = 0.5
    sweep_threshold: bool = False      # at the end, pick the binary threshold on validation (by monitor)
    tta: str = "none"                  # recorded in the checkpoint as the recommended --tta, used in validation
    postprocess: dict | None = None    # --instances options (object_threshold, marker_threshold, split_depth,
                                       # min_area, join_below, boundary_class) recorded as the checkpoint's defaults

    @property
    def classes(self) -> int:
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        """One output channel (sigmoid) for two classes with a binary loss."""
        return self.classes == 2 and self.loss in ("dice_bce", "jaccard_bce")

    @property
    def out_channels(self) -> int:
        return 1 if self.binary else self.classes

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def options() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def load_train_config(path=None, overrides: dict | None = None) -> TrainConfig:
    """Read ``path`` (YAML), apply ``overrides`` and validate."""
    from ..config import read_mapping

    raw: dict = {}
    base = os.getcwd()
    if path is not None:
        path = os.fspath(path)
        loaded = read_mapping(path, "train_config")
        for key, value in loaded.items():
            if key in SECTIONS and isinstance(value, dict):
                raw.update(value)
            else:
                raw[key] = value
        base = os.path.dirname(os.path.abspath(path))
    for key, value in (overrides or {}).items():  # --set data.images=... names a section like the YAML
        section, dot, name = str(key).partition(".")
        if value is not None:
            raw[name if dot and section in SECTIONS else key] = value
    valid = set(options())
    cfg = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            where = f"{path}: " if path else ""
            from ..config import nearest

            raise InputError(f"{where}unknown training option {key!r}{nearest(name, valid)}; valid: "
                             f"{', '.join(sorted(valid))}")
        cfg[name] = value
    c = TrainConfig(**cfg)
    for key in ("images", "masks", "val_images", "val_masks", "init_weights"):
        setattr(c, key, _resolve(getattr(c, key), base))
    if c.regions not in (None, "image"):
        c.regions = _resolve(c.regions, base)
    _validate(c)
    return c


def _resolve(value, base: str):
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [_resolve(v, base) for v in value]
    value = os.path.expanduser(str(value))
    if os.path.isabs(value) or os.path.exists(value):
        return value
    other = os.path.normpath(os.path.join(base, value))
    return other if os.path.exists(other) else value


def _validate(c: TrainConfig) -> None:
    def choice(name, allowed):
        if getattr(c, name) not in allowed:
            raise InputError(f"{name}: {getattr(c, name)!r} is not one of {', '.join(map(str, allowed))}")

    if c.images is None or c.masks is None:
        raise InputError("training needs images and masks (config keys images: and masks:, files or folders)")
    choice("loss", LOSSES)
    choice("optimizer", OPTIMIZERS)
    choice("schedule", SCHEDULES)
    choice("precision", PRECISIONS)
    choice("monitor", MONITORS)
    if isinstance(c.region_classes, str):
        c.region_classes = [c.region_classes]
    if c.classes < 2:
        raise InputError("class_names: give at least two classes (background first)")
    if c.loss in ("dice_bce", "jaccard_bce") and c.classes != 2:
        raise InputError(f"loss {c.loss} is binary, but there are {c.classes} classes: use ce_dice, ce or unet_weighted")
    crops = c.crop if isinstance(c.crop, list) else [c.crop]
    if len(crops) not in (1, 3) or any(int(v) < 1 for v in crops):
        raise InputError(f"crop must be a positive side (or [z, y, x] for volumes), got {c.crop!r}")
    from ..models.registry import is_volumetric

    if is_volumetric(c.model) and c.loss == "unet_weighted":
        raise InputError("loss unet_weighted (the U-Net border weights) is 2-D; for volumes use ce, ce_dice or dice_bce")
    for name in ("samples_per_epoch", "epochs", "batch_size", "accumulate", "tile"):
        if int(getattr(c, name)) < 1:
            raise InputError(f"{name} must be at least 1, got {getattr(c, name)}")
    if not 0 < c.val_fraction < 1:
        raise InputError(f"val_fraction must be between 0 and 1, got {c.val_fraction}")
    if c.halo != "auto" and (not isinstance(c.halo, int) or c.halo < 0):
        raise InputError(f"halo must be a number of pixels or 'auto', got {c.halo!r}")
    if not 0 <= float(c.ema) < 1:
        raise InputError(f"ema is a decay in [0, 1), got {c.ema}")
    if c.tta not in ("none", "flips", "d4"):
        raise InputError(f"tta {c.tta!r}: use none, flips or d4")
    if c.postprocess is not None:
        from ..errors import ModelError
        from ..models.weights import postprocess_record

        try:
            postprocess_record(c.postprocess, "the training config")
        except ModelError as err:
            raise InputError(str(err)) from None
    if c.normalization not in ("auto", "imagenet", "given"):
        raise InputError(f"normalization {c.normalization!r}: use auto, imagenet, or given (with mean and std)")
    if c.normalization == "given" and (c.mean is None or c.std is None):
        raise InputError("normalization given: set mean and std (one value per band)")
