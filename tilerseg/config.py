"""One description of a run, built once at the boundary and frozen.

The command line, a YAML pipeline (``--config``, ``pipelines/*.yaml``) and
the Python API (``tilerseg.run(input, output, **options)``) all build the
same :class:`RunConfig` through :meth:`RunConfig.from_options`. Options have
flat names (``batch_size`` or ``batch-size``) and live in five sections:
input, model, tiling, output and engine. An unknown name or a closed choice
spelt wrong fails at once with one line naming the nearest valid one, so a
typo cannot silently fall back to a default. Nothing here imports torch.
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

from .errors import InputError

PAD_MODES = ("reflect", "symmetric", "constant", "edge")
MERGE_MODES = ("crop", "gaussian")
TTA_MODES = ("none", "flips", "d4")
PRECISIONS = ("fp32", "fp16", "bf16")
READERS = ("auto", "openslide", "tifffile", "rasterio", "pillow", "zarr")
MISSING_CHUNKS = ("refuse", "nodata", "fill")  # zarr inputs with chunks not stored
VECTOR_CRS = ("wgs84", "native")               # GeoJSON coordinates
BACKENDS = ("torch", "onnxruntime", "openvino", "auto")
DEFAULT_BATCH = 4
MAX_OBJECT_SIDE = 8192  # --max-object's ceiling (tilerseg.instances keeps its flood keys exact up to it)


@dataclass(frozen=True)
class InputOptions:
    """How the input is read: pyramid level or target mpp, bands (1-based),
    the backend, and where tissue is (``auto`` or a mask file)."""

    level: int | None = None
    mpp: float | None = None
    bands: tuple[int, ...] | None = None
    reader: Literal["auto", "openslide", "tifffile", "rasterio", "pillow", "zarr"] = "auto"
    tissue: str | None = None
    force_resample: bool = False  # allow --mpp to resample more than 8x
    ignore_pixel_size: bool = False  # run a model whose pixel size is in another unit than the image's
    missing_chunks: Literal["refuse", "nodata", "fill"] = "refuse"  # zarr inputs with chunks not stored

    def reader_options(self) -> dict[str, Any]:
        """What :func:`tilerseg.io.open_reader` takes of these options."""
        return {"level": self.level, "mpp": self.mpp, "bands": self.bands, "reader": self.reader,
                "force_resample": self.force_resample, "missing_chunks": self.missing_chunks}


@dataclass(frozen=True)
class ModelOptions:
    """The model: registry name, weights, and what a bare state dict does
    not say (encoder, classes, extra builder arguments, normalisation)."""

    model: str = "unet"
    weights: str | None = None
    encoder: str = "resnet34"
    classes: int = 1
    encoder_weights: str | None = None
    model_args: tuple[tuple[str, Any], ...] = ()
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    scale: float | None = None


@dataclass(frozen=True)
class TilingOptions:
    """What the user asked of the tiling; :mod:`tilerseg.tiling` turns it
    and the model into the grid. None means: the checkpoint's, else the
    receptive field (halo); for the tile, ``auto``: the largest window whose
    batch fits ``memory_budget`` bytes (default: a share of the device's total memory)."""

    tile: int | tuple[int, ...] | str | None = None
    halo: int | tuple[int, ...] | str | None = None
    batch_size: int | None = None
    memory_budget: int | None = None
    pad_mode: Literal["reflect", "symmetric", "constant", "edge"] = "reflect"
    merge: Literal["auto", "crop", "gaussian"] = "auto"
    tta: Literal["none", "flips", "d4"] | None = None


@dataclass(frozen=True)
class OutputOptions:
    """What is written: labels (threshold) or probabilities, on which level
    of the input's grid, a preview PNG, and whether to replace."""

    probabilities: Literal[False, "float32", "uint8"] = False  # True means float32
    threshold: float | None = None
    output_level: int | None = None
    preview: str | None = None
    overwrite: bool = False
    vector_crs: Literal["wgs84", "native"] = "wgs84"  # GeoJSON: RFC 7946 lon/lat, or the input's CRS
    instances: bool = False          # objects: uint32 labels, one id each (tilerseg.instances)
    split_depth: float | None = None  # h-maxima depth (px) splitting touching objects (None: the radius rule)
    min_area: int | None = None       # objects smaller than this (px) are dropped
    # (None for either: the checkpoint's postprocess record, else the radius rule and 0: tilerseg.api.instance_options)
    max_object: int = 4096           # a foreground region wider or taller than this (px) is refused
    boundary_class: int | None = None  # a class that marks boundaries (default: one named boundary/contour)
    marker_threshold: float | None = None  # a membrane map's cells: markers where P >= this, watershed on 1 - P
    object_threshold: float | None = None  # the objects' foreground threshold (default: the threshold's)
    join_below: float | None = None  # a membrane map's cells: join neighbours whose boundary's mean 1 - P is under this

    @property
    def probability_dtype(self) -> str:
        return "uint8" if self.probabilities == "uint8" else "float32"


@dataclass(frozen=True)
class EngineOptions:
    """Where and how blocks are computed: ``backend`` runs the forward pass
    on torch, ONNX Runtime or OpenVINO, or the fastest found (``auto``).
    ``concurrent``: inputs of a batch run at once on a distributed
    scheduler (see :meth:`inputs_at_once`)."""

    workers: int | None = None
    scheduler: Any = None
    device: str = "auto"
    precision: Literal["fp32", "fp16", "bf16"] = "fp32"
    compile: bool = False
    resume: bool = False
    backend: Literal["torch", "onnxruntime", "openvino", "auto"] = "torch"
    concurrent: int | None = None

    def inputs_at_once(self, n_inputs: int) -> int:
        """How many of ``n_inputs`` run together: one at a time here on
        threads (the one model already uses every core); on a distributed
        scheduler ``concurrent`` (default 4), so that the workers take
        several inputs' tasks at once instead of idling through one small
        input's last block and conversion."""
        if self.scheduler is None:
            return 1
        return max(1, min(n_inputs, self.concurrent or 4))


SECTIONS = {"input": InputOptions, "model": ModelOptions, "tiling": TilingOptions, "output": OutputOptions,
            "engine": EngineOptions}
CHOICES = {"pad_mode": PAD_MODES, "merge": ("auto", *MERGE_MODES), "tta": TTA_MODES, "precision": PRECISIONS,
           "reader": READERS, "missing_chunks": MISSING_CHUNKS, "vector_crs": VECTOR_CRS,
           "probabilities": (False, "float32", "uint8"), "backend": BACKENDS}
# settings that change where or how fast a run goes, not its bytes (a backend or device changes
# probabilities by 1e-4 at most): left out of the resume fingerprint
# (memory_budget only sizes the tile, and the tiling chosen is in the fingerprint)
NOT_IN_FINGERPRINT = {"workers", "scheduler", "device", "compile", "resume", "overwrite", "preview", "backend",
                      "memory_budget", "force_resample", "concurrent",
                      "ignore_pixel_size"}
# the options a checkpoint records for --instances (ModelInfo.postprocess), as flags name them
CHECKPOINT_POSTPROCESS = ("object_threshold", "marker_threshold", "split_depth", "min_area", "join_below",
                          "boundary_class")
# what turns an --instances run's probabilities into objects: the probabilities do not depend on it, so it is
# left out of the resume fingerprint of such a run (a resume may change it), and a checkpoint may record it
POSTPROCESS = ("threshold", "object_threshold", "marker_threshold", "split_depth", "min_area", "join_below",
               "boundary_class", "max_object")
UNITS = {"": 1, "b": 1, "k": 2 ** 10, "kb": 2 ** 10, "kib": 2 ** 10, "m": 2 ** 20, "mb": 2 ** 20, "mib": 2 ** 20,
         "g": 2 ** 30, "gb": 2 ** 30, "gib": 2 ** 30, "t": 2 ** 40, "tb": 2 ** 40, "tib": 2 ** 40}


def parse_size(value) -> int:
    """Bytes from ``2G``, ``512MiB``, ``1.5 GB`` or a number of bytes (binary units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        n = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        num = text.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = text[len(num):]
        try:
            n = float(num) * UNITS[unit]
        except (ValueError, KeyError):
            raise InputError(f"--memory-budget {value!r}: give a size such as 2G, 512M or 1.5GiB") from None
    if n < 2 ** 20:
        raise InputError(f"--memory-budget {value!r}: give at least 1M (sizes without a unit are bytes)")
    return int(n)


def option_names() -> dict[str, str]:
    """Every option's flat name -> its section."""
    return {f.name: section for section, cls in SECTIONS.items() for f in fields(cls)}


def nearest(name: str, valid) -> str:
    """`` (did you mean 'x'?)`` for a misspelt name, else nothing."""
    near = difflib.get_close_matches(str(name), list(valid), n=1, cutoff=0.5)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _tuple(v):
    if v is None or isinstance(v, (str, int, float)):
        return v
    return tuple(v)


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs besides its input and output paths."""

    input: InputOptions = field(default_factory=InputOptions)
    model: ModelOptions = field(default_factory=ModelOptions)
    tiling: TilingOptions = field(default_factory=TilingOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    engine: EngineOptions = field(default_factory=EngineOptions)

    @classmethod
    def from_options(cls, **options) -> "RunConfig":
        """Build from flat options (``tile=512, batch_size=2, ...``); None
        means the default. Raises :class:`InputError` on an unknown name or
        a value outside a closed choice, naming the nearest valid one."""
        names = option_names()
        parts: dict[str, dict] = {s: {} for s in SECTIONS}
        for key, value in options.items():
            name = str(key).replace("-", "_")
            if name not in names:
                raise InputError(f"unknown option {key!r}{nearest(name, names)}; valid: {', '.join(sorted(names))}")
            if value is None:
                continue
            if name == "probabilities" and value is True:
                value = "float32"
            if name in CHOICES and value not in CHOICES[name]:
                raise InputError(f"{name.replace('_', '-')} {value!r}: use one of {', '.join(CHOICES[name])}"
                                 f"{nearest(value, CHOICES[name])}")
            if name == "model_args":
                value = tuple(sorted((str(k).replace("-", "_"), _tuple(v)) for k, v in dict(value).items()))
            elif name in ("bands", "mean", "std", "tile", "halo"):
                value = _tuple(value)
            elif name == "weights":
                value = os.fspath(value)
            elif name == "memory_budget":
                value = parse_size(value)
            parts[names[name]][name] = value
        cfg = cls(**{s: SECTIONS[s](**kw) for s, kw in parts.items()})
        cfg.check()
        return cfg

    def check(self) -> None:
        t = self.tiling
        if isinstance(t.tile, str) and t.tile != "auto":
            raise InputError(f"--tile {t.tile!r}: give a side in px, z,y,x, or auto")
        for name in ("tile", "halo"):
            value = getattr(t, name)
            sides = value if isinstance(value, tuple) else (value,)
            floor = 1 if name == "tile" else 0
            if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < floor for v in sides):
                raise InputError(f"--{name} {_flag(value)}: must be {'at least 1 px' if floor else 'zero or more'}"
                                 f" (leave it out for {'a size that fits the model' if floor else 'the receptive field'})")
        if t.batch_size is not None and t.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1 (got {t.batch_size})")
        if self.input.level is not None and self.input.mpp is not None:
            raise InputError("give --level or --mpp, not both")
        if self.output.threshold is not None and not 0 <= self.output.threshold <= 1:  # NaN fails too
            raise InputError(f"--threshold {self.output.threshold}: give a value between 0 and 1")
        o = self.output
        if o.instances and o.probabilities:
            raise InputError("--instances writes object labels; drop --probabilities (each object's mean "
                             "probability is in its table)")
        if o.instances and o.output_level is not None:
            raise InputError("--instances labels objects on the grid the model ran at; drop --output-level")
        if (o.split_depth is not None and not 0 < o.split_depth < 1e6) or (o.min_area is not None and o.min_area < 0):
            raise InputError("--split-depth must be above 0 and --min-area 0 or more")
        if o.join_below is not None and o.marker_threshold is None:
            raise InputError("--join-below joins a membrane map's cells: give --marker-threshold too")
        for flag in ("marker_threshold", "object_threshold", "join_below"):
            v = getattr(o, flag)
            if v is not None and not 0 < v <= 1:  # NaN fails too
                raise InputError(f"--{flag.replace('_', '-')} {v}: give a probability above 0, at most 1")
        if not 1 <= o.max_object <= MAX_OBJECT_SIDE:
            raise InputError(f"--max-object {o.max_object}: give 1 to {MAX_OBJECT_SIDE} px")
        for name in ("workers", "concurrent"):
            value = getattr(self.engine, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be at least 1 (got {value})")

    def options(self) -> dict[str, Any]:
        """The flat options, as :meth:`from_options` takes them."""
        out = {}
        for section in SECTIONS:
            part = getattr(self, section)
            out.update({f.name: getattr(part, f.name) for f in fields(part)})
        out["model_args"] = dict(out["model_args"])
        return out

    def replace(self, **options) -> "RunConfig":
        """A copy with some flat options changed."""
        return RunConfig.from_options(**{**self.options(), **options})

    def settings(self) -> dict[str, str]:
        """The settings that decide the output's bytes, for the resume fingerprint."""
        return {k: repr(v) for k, v in sorted(self.options().items()) if k not in NOT_IN_FINGERPRINT}


def _flag(value) -> str:
    return ",".join(str(v) for v in value) if isinstance(value, tuple) else str(value)


def read_mapping(path: str, what: str, where: str = "path") -> dict:
    """The YAML mapping in ``path`` (under a top-level ``what`` key if there
    is one); a missing file, bad YAML or a non-mapping is one clear line."""
    import yaml

    if not os.path.exists(path):
        raise InputError(f"{path}: no such config file; check the {where}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    raw = raw.get(what, raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of {what} options")
    return raw


def load_run_config(path) -> dict[str, Any]:
    """Read a run pipeline and return its options (flat names), checked by
    building a :class:`RunConfig` from them; flags override them."""
    path = os.fspath(path)
    raw = read_mapping(path, "run", "--config path")
    out = {str(k).replace("-", "_"): v for k, v in raw.items()}
    try:
        RunConfig.from_options(**out)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None
    return {k: tuple(v) if isinstance(v, list) and k in ("bands", "mean", "std") else v for k, v in out.items()}


__all__ = ["RunConfig", "InputOptions", "ModelOptions", "TilingOptions", "OutputOptions", "EngineOptions",
           "load_run_config", "read_mapping", "option_names", "replace"]
