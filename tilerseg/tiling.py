"""The one tiling decision: tile, halo, merge and batch for a model, 2-D and 3-D.

:func:`resolve` is the only place a halo is chosen: the user's value
(``--halo N``, or ``--halo auto`` to measure), else the checkpoint's, else
the model's receptive field, computed from its module graph
(:func:`tilerseg.receptive.analytic_radius`; the gradient probe where the
graph cannot be read, a perturbation probe for ONNX graphs). With that
halo, tiled output equals whole-image inference for local models. A graph
with a fixed input size runs with that tile only. Models with global context cannot be
seam-exact; they get the gaussian merge with half-window overlap. The
decision says why it chose each value (:attr:`Tiling.why`), and the run
prints it."""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass

import numpy as np

from .config import DEFAULT_BATCH, MERGE_MODES, TilingOptions
from .engine import TileSpec
from .errors import InputError, TileError
from .geometry import Grid, Grid3, block_layout, validate_tile
from .receptive import analytic_radius, probe_radius, recommend_halo

log = logging.getLogger(__name__)
DEFAULT_TILE = 512           # 2-D window side when nothing else decides it (volumes, models with global context)
MAX_AUTO_TILE = 4096         # --tile auto never picks a wider 2-D window (tasks stay small enough to overlap)
LIVE_SHARE = 0.5             # of all module outputs, the share counted as live at once (a quarter is measured)
BUDGET_SHARE = {"cpu": 0.25, "cuda": 0.5}  # default --memory-budget: this share of the RAM / GPU memory
VOLUME_VOXELS = 160 ** 3     # default 3-D windows grow up to about this many voxels (memory)
NON_LOCAL_HALO = 64          # starting halo for models with global context (the gaussian merge widens it)
WINDOW_FIXED_PX = 128 ** 2   # a window's fixed cost in pixels: the demo Unet ran t = 3.3 ms + 0.30 us/px (192-1024 px)
WORST_WORK = 4.0             # a budget whose best window costs this much more than the best at any budget is refused
UNKNOWN_BYTES = 4096         # activation bytes per input pixel assumed where a graph's shapes cannot be inferred
STREAM_BLOCKS = 2            # blocks whose reading (the first) and writing (the last) no model time hides
IN_FLIGHT = 2                # blocks held by the pipeline at once besides the batch in the model (read ahead, writing)


@dataclass(frozen=True)
class Tiling:
    """The grid parameters of a run; ``tile`` and ``halo`` per axis."""

    tile: tuple[int, ...]
    halo: tuple[int, ...]
    stride: int
    batch_size: int
    pad_mode: str
    merge: str
    why: str = ""

    @property
    def dims(self) -> int:
        return len(self.tile)

    def grid(self, shape):
        """The window grid over an image (H, W) or volume (Z, H, W)."""
        if self.dims == 3:
            return Grid3(tuple(shape), self.tile, self.halo, self.stride)
        return Grid(tuple(shape), self.tile[0], self.halo[0], self.stride, block_layout(self.batch_size))

    def tilespec(self) -> TileSpec:
        """The engine's window parameters: numbers for images, (z, y, x) for volumes."""
        tile, halo = (self.tile, self.halo) if self.dims == 3 else (self.tile[0], self.halo[0])
        return TileSpec(tile=tile, halo=halo, batch_size=self.batch_size, pad_mode=self.pad_mode)

    def summary(self) -> str:
        return f"{self.why}; stride {self.stride}, {self.merge} merge"


def receptive_radius(model, bands: int, stride: int, dims: int) -> tuple[int, str]:
    """The model's receptive-field radius and how it was found."""
    r = analytic_radius(model, in_channels=bands, stride=stride, dims=dims)
    if r is not None:
        return r, f"receptive field {r} px, computed from the module graph"
    r, _, how = probe_radius(model, in_channels=bands, stride=stride)
    return r, f"receptive field {r} px, {how}"


def _axes(v, dims: int, name: str) -> tuple[int, ...]:
    if isinstance(v, (tuple, list)):
        if len(v) != dims:
            raise InputError(f"--{name} {','.join(map(str, v))}: " + (
                "z,y,x values are for volumetric models (unet3d); a 2-D model takes one number" if dims == 2
                else "a volume takes one number or three (z,y,x)"))
        return tuple(int(x) for x in v)
    return (int(v),) * dims


def _text(v: tuple[int, ...]) -> str:
    return ",".join(map(str, v)) if len(set(v)) > 1 else str(v[0])


def _up(v: int, step: int) -> int:
    return int(math.ceil(v / step) * step)


def resolve(opts: TilingOptions, *, model, info, stride: int, dims: int, bands: int, shape,
            global_parts: list[str] = (), worker_memory: int | None = None, skip=None) -> Tiling:
    """Tile, halo, merge and batch for ``model`` on an image of ``shape``.

    ``info`` is the model's :class:`~tilerseg.models.ModelInfo` (its
    checkpoint may recommend a tile and halo); ``global_parts`` names the
    model's modules with global context (none: the model is local);
    ``worker_memory``: the memory of the processes that will run the
    batches, where that is not this one (dask workers; see
    :func:`memory_budget`); ``skip`` (a :class:`~tilerseg.tissue.WindowMap`:
    the windows that will run, off glass and nodata) lets ``--tile auto``
    weigh the windows it skips."""
    why = []
    if opts.batch_size is not None and opts.batch_size != 1 and dims == 3:
        raise InputError(f"--batch-size {opts.batch_size}: volumes run one window per forward pass (a 3-D window "
                         "is a batch's worth of work); drop --batch-size and size windows with --tile")
    if opts.merge == "gaussian" and dims == 3:
        raise InputError("--merge gaussian: volumes are merged by crop (3-D models here are local, so crops are "
                         "exact); drop --merge")
    if opts.tta not in (None, "none") and dims == 3:
        raise InputError("--tta works on 2-D models only")
    # a graph with a fixed input size (an ONNX file) takes windows of that size only
    fixed = getattr(model, "input_size", None)
    where = getattr(model, "onnx_path", "the model")
    if fixed is not None and opts.tile not in (None, "auto") and _axes(opts.tile, dims, "tile") != (fixed[0],) * dims:
        raise InputError(f"--tile {_text(_axes(opts.tile, dims, 'tile'))}: {where} takes fixed {fixed[0]}x{fixed[0]} "
                         "windows (its graph's input shape); drop --tile, or export the model with dynamic height "
                         "and width")
    # the halo: the user's, else the checkpoint's, else the receptive field
    if opts.halo == "auto":
        radius, how = receptive_radius(model, bands, stride, dims)
        halo, note = recommend_halo(radius, stride), f"--halo auto: {how}"
    elif opts.halo is not None:
        halo, note = opts.halo, "--halo"
    elif info.halo is not None:
        halo, note = info.halo, "the checkpoint's"
    elif global_parts:
        halo, note = NON_LOCAL_HALO, "default for a model with global context"
    else:
        radius, how = receptive_radius(model, bands, stride, dims)
        halo, note = recommend_halo(radius, stride), how
    halo = _axes(halo, dims, "halo")
    # the tile: the user's, else the largest that fits memory (local 2-D models; a model with global
    # context keeps the checkpoint's, as its output depends on the window), else sized to the halo;
    # a fixed input size wins
    batch = opts.batch_size
    if fixed is not None:
        side = int(fixed[0])
        if side - 2 * halo[0] <= 0:
            raise TileError(f"{where} takes fixed {side}-px windows, too small for the halo {halo[0]} px ({note}): "
                            "give a smaller --halo to trade exactness for speed, or export the model with "
                            "dynamic height and width")
        tile, tnote = (side,) * dims, "fixed by the model's input shape"
    elif opts.tile not in (None, "auto"):
        tile, tnote = _axes(opts.tile, dims, "tile"), "--tile"
    elif info.tile is not None and (global_parts or dims == 3):
        tile, tnote = _axes(info.tile, dims, "tile"), "the checkpoint's"
    elif dims == 2 and not global_parts:
        budget, bnote = memory_budget(model, opts.memory_budget, worker_memory)
        tile, batch, tnote = auto_tile(halo[0], stride, shape, activation_bytes(model, bands, stride), budget,
                                       opts.batch_size, skip=skip,
                                       io_bytes=pipeline_bytes(bands, info.spec.classes))
        tnote += f"; budget {bnote}"
    else:
        tile, tnote = _default_tile(halo, stride, shape, dims), "sized to the halo and the image"
    merge, halo = _merge_mode(opts.merge, global_parts, tile, halo, stride)
    if merge == "gaussian" and global_parts and opts.halo is None:
        note += f"; widened to a quarter window for the gaussian merge ({', '.join(global_parts[:3])})"
    why.append(f"tile {_text(tile)} px ({tnote})")
    why.append(f"halo {_text(halo)} px ({note})")
    for t, h in zip(tile, halo):
        try:
            validate_tile(t, h, stride)
        except TileError as err:
            if opts.tile not in (None, "auto") and opts.halo is None and t - 2 * h <= 0:
                need = 2 * h + max(stride, h)
                raise TileError(f"--tile {t} is too small for the halo {h} this model needs ({note}): use "
                                f"--tile {_up(need, stride)} or more, or give --halo to trade exactness for "
                                "speed") from None
            raise err
    batch = batch or (1 if dims == 3 else DEFAULT_BATCH)
    return Tiling(tile=tile, halo=halo, stride=stride, batch_size=batch, pad_mode=opts.pad_mode, merge=merge,
                  why="; ".join(why))


def activation_bytes(model, bands: int, stride: int) -> float:
    """Bytes of activations per input pixel of one window: the outputs of
    every leaf module on a small window, per pixel, times
    :data:`LIVE_SHARE`. Activations grow with the window's area, so this
    figure sizes any window; inference frees each output once used, and
    the peak measured on CPU for smp U-Nets is about a quarter of the sum,
    so half keeps a margin."""
    import torch

    side = 4 * stride
    own = getattr(model, "tensor_bytes_per_pixel", None)  # a graph outside torch (ONNX) sums its own tensors
    if callable(own):
        per_pixel = own(side)
        if per_pixel is not None:
            return max(per_pixel * LIVE_SHARE, 4.0 * bands)
        log.info("the model's tensor sizes cannot be inferred: --tile auto assumes %d bytes per pixel",
                 UNKNOWN_BYTES)
        return float(UNKNOWN_BYTES)
    param = next(iter(model.parameters()), None)
    x = torch.zeros((1, bands, side, side), device=param.device if param is not None else "cpu")
    total = [0]

    def count(_module, _args, out):
        if isinstance(out, torch.Tensor):
            total[0] += out.numel() * out.element_size()

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        with torch.inference_mode():
            model(x.contiguous(memory_format=torch.channels_last))
    finally:
        for h in hooks:
            h.remove()
    return max(total[0] * LIVE_SHARE / side ** 2, 4.0 * bands)


def memory_budget(model, given: int | None, worker_memory: int | None = None) -> tuple[int, str]:
    """Bytes one batch of windows may use, and how that was decided:
    ``--memory-budget``, else a share (:data:`BUDGET_SHARE`) of the *total*
    memory of the model's device, rounded down to a power of two. Total, not
    free: the tile must not change between a run and its ``--resume`` (the
    tiling is part of what a resume checks), and free memory moves with
    whatever else the machine runs. On CPU workers of a distributed run
    (``worker_memory``: the smallest worker's memory limit) the share is of
    that limit, not of this machine's RAM: a login node with 256 GB must not
    size the batches of 16 GB workers (each worker runs one batch at a time)."""
    if given:
        return int(given), f"--memory-budget {_gib(given)}"
    param = next(iter(model.parameters()), None)
    if param is not None and param.device.type == "cuda":
        import torch

        total, share = torch.cuda.get_device_properties(param.device).total_memory, BUDGET_SHARE["cuda"]
        where = "the GPU memory"
    elif worker_memory:
        total, share = worker_memory, BUDGET_SHARE["cpu"]
        where = f"a dask worker's memory limit ({_gib(worker_memory)})"
    else:
        total, where, share = _total_ram(), "the RAM", BUDGET_SHARE["cpu"]
    budget = 2 ** int(math.log2(max(total * share, 2 ** 26)))
    return budget, f"{_gib(budget)}, {share:.0%} of {where}"


def _total_ram() -> int:
    """Physical RAM in bytes (a cgroup's limit where one is lower)."""
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    for limit in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(limit) as f:
                text = f.read().strip()
            if text.isdigit():
                total = min(total, int(text))
        except OSError:
            continue
    return total


def counted(n: int, noun: str) -> str:
    """``1 window``, ``3 windows``: a count and its noun, singular or plural."""
    return f"{n:,} {noun}{'' if n == 1 else 's'}"


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.2f} GiB" if n >= 2 ** 30 else f"{n / 2 ** 20:.0f} MiB"


def pipeline_bytes(bands: int, classes: int) -> float:
    """Bytes the pipeline itself writes and holds per pixel of a window,
    whatever the model: the decoded read and its stacked batch (``bands``
    each), the float32 normalised input (``4 bands``), the float32
    probabilities and their stitched block (``4 classes`` each) and the
    uint8 chunk. For a cheap model these, not its activations, are what a
    window costs (see :func:`auto_tile`)."""
    return 6.0 * bands + 8.0 * classes + 1.0


def auto_tile(halo: int, stride: int, shape, per_pixel: float, budget: int,
              batch: int | None, skip=None, io_bytes: float = 0.0) -> tuple[tuple[int, int], int, str]:
    """``--tile auto``: the window, the batch size and why.

    Each window computes ``(crop + 2 halo)^2`` pixels for ``crop^2`` kept
    ones, so larger windows waste less on context: a 64-px halo costs 1.78
    input pixels per output pixel at 512 px, 1.31 at 1024. The largest
    window is the one whose batch fits ``budget`` (``batch`` windows when
    given, else one); among the crops up to it, on the stride grid, the one
    whose windows cost least over this image wins (:func:`work`). ``skip``
    (a :class:`tilerseg.tissue.WindowMap`: its ``runs(crop, stride)``, the
    computed area of each window that will run) counts only the windows that
    are not skipped (tissue, nodata), each trimmed to what it computes: on
    a slide that is mostly glass, smaller windows skip more of it, and the
    choice weighs that against their larger share of context. Crops whose
    least possible work (``skip.covered()`` grown by the halo's share at
    that crop) exceeds the best work found are not counted: the choice is
    the same, found in a fraction of the time. The batch is then as many such windows as the
    budget holds, up to :data:`DEFAULT_BATCH` and the windows that run.

    ``io_bytes`` (:func:`pipeline_bytes`) counts what reading, converting
    and writing cost besides the model. Memory: :data:`IN_FLIGHT` blocks of
    it are held beside the batch's activations. Time: the model hides the
    reading and writing of every block but the first one read and the last
    one written (:data:`STREAM_BLOCKS`), so a window's cost gains that
    share, in the model's pixel-equivalents (``io_bytes / per_pixel`` of
    its pixels). Negligible for a U-Net (thousands of activation bytes per
    pixel); for a cheap model it keeps the blocks small enough to stream:
    measured on a 2-core EPYC, a 1x1 convolution over 8192^2 px ran 4.1-6.7 s
    in four 4096-px windows (peak RSS 7.4 GiB) and 1.7 s in 512-px ones (0.9 GiB).

    A budget that holds no window whose crop is at least the halo (more
    than 8/9 of it context), or whose best window costs more than
    :data:`WORST_WORK` times the best window's at any budget, is refused
    with the smallest budget that works."""
    def windows(c: int) -> int:
        return math.prod(math.ceil(n / c) for n in shape)

    stream = STREAM_BLOCKS * (batch or DEFAULT_BATCH) * io_bytes / per_pixel

    def cost(c: int) -> float:
        fill = stream * (c + 2 * halo) ** 2  # the first block's read, the last one's write: not overlapped
        if not skip:
            return work(windows(c), c + 2 * halo) + fill
        return trimmed_work(skip.runs(c, stride), halo) + fill

    def bound(c: int) -> float:
        """No less than cost(c): a trimmed box b <= c px a side computes at
        least (1 + 2 halo / c)^2 times its b^2 px, and the boxes together
        hold at least what the map covers."""
        return skip.covered() * (1 + 2 * halo / c) ** 2 + stream * (c + 2 * halo) ** 2 if skip else cost(c)

    def cheapest(crops) -> int:
        """min(crops, key=(cost, -c)), counting crops in order of bound."""
        best, key = None, None
        for c in sorted(crops, key=lambda c: (bound(c), -c)):
            if key is not None and bound(c) > key[0] * (1 + 1e-9):
                break
            if key is None or (cost(c), -c) < key:
                best, key = c, (cost(c), -c)
        return best

    per_window = budget / (batch or 1) / (per_pixel + IN_FLIGHT * io_bytes)
    side = min(MAX_AUTO_TILE, int(math.sqrt(per_window)))
    covers = [_up(max(int(n), 1), stride) for n in shape]
    top = min(max((MAX_AUTO_TILE - 2 * halo) // stride * stride, stride), max(covers))
    cmax = min(max(stride, (side - 2 * halo) // stride * stride), top)
    candidates = range(stride, cmax + 1, stride)
    best = cheapest(candidates)
    free = cheapest(range(stride, top + 1, stride))  # as if memory were no limit
    least = min(_up(max(halo, 1), stride), top)
    if cmax < least or cost(best) > WORST_WORK * cost(free):
        c = least
        while c < free and cost(c) > WORST_WORK * cost(free):
            c += stride
        need = (batch or 1) * (c + 2 * halo) ** 2 * (per_pixel + IN_FLIGHT * io_bytes)
        raise TileError(f"--memory-budget {_gib(budget)} holds no window worth running: the largest that fits "
                        f"is {2 * halo + cmax} px, which computes {cost(best) / max(cost(free), 1):.1f}x the "
                        f"pixels of {2 * halo + free}-px windows for the halo {halo}; give --memory-budget "
                        f"{_gib_up(need)} or more (a {c + 2 * halo}-px window), or --tile and --halo")
    tile = best + 2 * halo
    fits = int(budget // (tile * tile * (per_pixel + IN_FLIGHT * io_bytes)))
    n_run = len(skip.runs(best, stride)) if skip else windows(best)
    if batch is None:
        batch = max(1, min(DEFAULT_BATCH, fits, n_run))
    over = "" if fits >= batch else f", over the budget: no smaller window holds the halo {halo}"
    note = (f"auto: {counted(windows(best), 'window')} of {tile} px in {'a batch' if batch == 1 else 'batches'} "
            f"of {batch}, about {_gib(batch * tile * tile * per_pixel)} of activations{over}")
    if skip and cost(best) < work(windows(best), tile):
        plain = min(candidates, key=lambda c: (work(windows(c), c + 2 * halo), -c))  # the choice without skipping
        share = (cost(best) - n_run * WINDOW_FIXED_PX) / max(1, n_run * tile * tile)
        runs = "every window runs" if n_run == windows(best) else \
            f"{n_run} of the {counted(windows(best), 'window')} run (the others have none)"
        note += (f"; only the pixels off nodata{' and on tissue' if skip.tissue else ''} are computed: {runs}, "
                 f"cut to {share:.0%} of {'its' if windows(best) == 1 else 'their'} pixels on average, "
                 f"{work(windows(plain), plain + 2 * halo) / max(cost(best), 1):.1f}x less work than "
                 f"{plain + 2 * halo}-px windows computing every pixel")
    return (tile, tile), batch, note


def work(windows: int, tile: int) -> float:
    """What ``windows`` windows of ``tile`` px cost, in pixel-equivalents:
    the model's time is linear in the pixels of a window, plus a fixed cost
    per window (:data:`WINDOW_FIXED_PX`). A constant, not a timing, so the
    choice is the same on every run and ``--resume`` finds the same tiling."""
    return windows * (tile * tile + WINDOW_FIXED_PX)


def trimmed_work(areas, halo: int) -> float:
    """:func:`work` of windows trimmed to ``areas`` (``(n, 2)``: the rows
    and columns of output each computes), each grown by the halo."""
    size = np.asarray(areas, np.int64).reshape(-1, 2) + 2 * halo
    return float((size[:, 0] * size[:, 1]).sum() + len(size) * WINDOW_FIXED_PX)


def _gib_up(n: float) -> str:
    """A size a little above ``n``, as ``--memory-budget`` takes it."""
    mib = 2 ** 20
    return f"{math.ceil(n / mib / 16) * 16}M" if n < 2 ** 30 else f"{math.ceil(n / 2 ** 30 * 10) / 10:g}G"


def _default_tile(halo: tuple[int, ...], stride: int, shape, dims: int) -> tuple[int, ...]:
    """A window whose centre crop is at least the halo (so no more than
    about 8/9 of each window is context), never much larger than the image.
    2-D: at least 512 px, square. 3-D: crops grow, smallest first, until a
    window holds about :data:`VOLUME_VOXELS`."""
    covers = [_up(max(int(n), 1), stride) for n in shape]
    if dims == 2:
        h = halo[0]
        crop = max(stride, _up(h, stride), _up(DEFAULT_TILE - 2 * h, stride))
        crop = min(crop, max(max(covers), stride))
        return (2 * h + crop,) * 2
    crops = [min(c, max(stride, _up(h, stride))) for c, h in zip(covers, halo)]
    while True:
        grow = [i for i in range(3) if crops[i] < covers[i]]
        if not grow:
            break
        i = min(grow, key=lambda k: crops[k])
        bigger = list(crops)
        bigger[i] += stride
        if math.prod(2 * h + c for h, c in zip(halo, bigger)) > VOLUME_VOXELS:
            break
        crops = bigger
    return tuple(2 * h + c for h, c in zip(halo, crops))


def _merge_mode(merge: str, parts, tile, halo, stride) -> tuple[str, tuple[int, ...]]:
    """``merge="auto"``: crop for local models; for models with global
    context, gaussian with at least a quarter-window halo (windows overlap
    by half, as nnU-Net's default step), kept on the stride grid."""
    if merge not in ("auto", *MERGE_MODES):
        raise InputError(f"unknown --merge {merge!r}: use auto, {' or '.join(MERGE_MODES)}")
    if merge != "auto":
        return merge, halo
    if not parts:
        return "crop", halo
    step = stride // 2 if stride % 2 == 0 else stride
    out = []
    for t, h in zip(tile, halo):
        quarter = (t // 4 // step) * step
        out.append(max(h, quarter) if (t - 2 * max(h, quarter)) % stride == 0 else h)
    return "gaussian", tuple(out)
