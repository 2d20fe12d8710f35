"""Measure a model's receptive-field radius: how much halo it needs.

Tiled output equals whole-image inference only when the halo is at least
the radius of the input region an output pixel depends on. Guessing it from
the architecture is error-prone (DESIGN.md), so it is measured: the support
of the input gradient of single output pixels, on a random input, for a few
positions within one stride period (the radius can depend on the phase).
Models without gradients (ONNX graphs) are measured by perturbation: the
output pixels a changed input pixel moves. The module graph gives it
exactly where it can be read (:func:`analytic_radius`)."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HaloReport:
    radius: int
    stride: int
    halo: int
    size: int
    how: str = "measured by input gradients"

    def as_dict(self) -> dict:
        return {"radius": self.radius, "stride": self.stride, "halo": self.halo}


def gradient_radius(model, *, in_channels: int, stride: int, size: int = 256, max_size: int = 2048,
                    seed: int = 0) -> tuple[int, int]:
    """Return ``(radius, size)``: the halo an output crop aligned on the
    stride grid needs, from the input-gradient support of single output
    pixels on a ``size`` px random input (grown until the support fits).

    The support of a pixel at phase ``p`` (its offset within a stride
    period) is not centred: it reaches ``up(p)`` px before it and
    ``down(p)`` after. In a crop that starts on the grid, that pixel is
    ``p`` px from the crop's first edge and ``stride - 1 - p`` from its last,
    so the radius is ``max_p max(up(p) - p, down(p) - (stride - 1 - p))`` over
    both axes; for a stride-aligned pixel it is its plain support radius."""
    import torch

    model = model.eval()
    dims = int(getattr(model, "spatial_dims", 2))  # 3 for volumetric models: a cube, same rule per axis
    if dims == 3:
        size, max_size = min(size, 128), min(max_size, 256)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    size = int(math.ceil(size / stride) * stride)
    while True:
        x = torch.randn(1, in_channels, *(size,) * dims, generator=gen, dtype=torch.float32)
        c = (size // 2 // stride) * stride
        radius, reach = 0, 0
        for p in sorted({0, stride // 2, stride - 1}):
            xi = x.to(device).requires_grad_(True)
            out = model(xi)[(0, slice(None)) + (c + p,) * dims]
            # classes weighted unequally: the plain sum of a softmax's outputs is 1, whose gradient is none
            weights = torch.linspace(1.0, 2.0, out.numel(), device=out.device) if out.numel() > 1 else 1.0
            (grad,) = torch.autograd.grad((out * weights).sum(), xi)  # no .grad kept
            support = np.argwhere(grad[0].abs().sum(0).cpu().numpy() > 0)
            if not len(support):
                continue
            up = (c + p) - support.min(axis=0)
            down = support.max(axis=0) - (c + p)
            radius = max(radius, int(max((up - p).max(), (down - (stride - 1 - p)).max())))
            reach = max(reach, int(max(up.max(), down.max())))
        if reach < size // 2 - stride or size >= max_size:
            return radius, size
        size *= 2


def perturbation_radius(model, *, in_channels: int, stride: int, size: int = 256, max_size: int = 2048,
                        seed: int = 0, trials: int = 2) -> tuple[int, int]:
    """Return ``(radius, size)`` as :func:`gradient_radius` does, for a
    model without gradients (an ONNX graph): measured by perturbation.

    On a random ``size`` px input the model runs once; then one input pixel
    near the centre (all bands) is replaced by distant random values, at
    the phases 0, ``stride // 2`` and ``stride - 1`` within a stride period,
    and the output pixels that changed (by more than two runs of the same
    input differ: nothing, for a deterministic runtime) are its reach.
    ``trials`` fresh random inputs and values per position are united,
    because one perturbation can miss output pixels it happens not to move
    (a ReLU that stays off, an influence below float rounding): the reach
    is a lower bound that the union tightens, where the gradient's support
    is exact. The input grows, up to ``max_size``, until the reach stays
    clear of its border; a graph with a fixed input size (``input_size``)
    is measured at that size only.

    The radius follows :func:`gradient_radius`'s rule seen from the input
    side: an input pixel whose reach covers the first pixel of a crop
    starting on a grid line ``g`` after it needs a halo of its distance to
    ``g``, and one reaching back to the last pixel of a crop ending on a
    grid line before it, its distance to that pixel; the radius is the
    largest such distance over both axes. The three phases give it to
    within ``stride - 1`` px (and give the halo exactly when each output
    pixel's support moves forward with the pixel, as in convolutional
    nets); the pixel farthest from the grid line that still reaches it is
    then found by bisection within one stride period, ``log2(stride)``
    perturbations of one input per side, so that the radius is exact too."""
    import torch

    rng = np.random.default_rng(seed)
    fixed = getattr(model, "input_size", None)
    if fixed is not None:
        size = max_size = int(fixed[0])
    size = int(math.ceil(size / stride) * stride)
    lo, hi = getattr(model, "input_range", None) or (None, None)

    def sample(shape):
        if lo is None:
            return rng.standard_normal(shape).astype(np.float32)
        return rng.integers(int(lo), int(hi) + 1, shape).astype(np.float32)

    def run(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).float().cpu().numpy()[0]

    def changed(y, x, bases, outs, noise):
        """The bounding box ``(first, last)`` per axis of the output pixels
        that move when input pixel (y, x) does, or None."""
        moved = np.zeros((size, size), bool)
        for base_in, base_out in zip(bases, outs):
            xp = base_in.copy()
            if lo is None:  # far from the input's values, either sign
                xp[0, :, y, x] = np.sign(rng.standard_normal(in_channels)) * rng.uniform(4, 8, in_channels)
            else:           # the far end of the range
                xp[0, :, y, x] = np.where(xp[0, :, y, x] < (lo + hi) / 2, hi, lo)
            moved |= (np.abs(run(xp) - base_out) > noise).any(axis=0)
        support = np.argwhere(moved)
        return (support.min(axis=0), support.max(axis=0)) if len(support) else None

    while True:
        c = (size // 2 // stride) * stride
        bases = [sample((1, in_channels, size, size)) for _ in range(trials)]
        outs = [run(x) for x in bases]
        noise = float(np.abs(run(bases[0]) - outs[0]).max())  # a runtime that is not deterministic
        radius, reach, seen = 0, 0, {}
        for p in sorted({0, stride // 2, stride - 1}):
            i = c + p
            box = changed(i, i, bases, outs, noise)
            if box is None:
                continue
            seen[p] = box
            for first, last in zip(*box):
                starts = (last // stride) * stride   # the last grid line the pixel reaches: a crop starting there
                ends = (first // stride + 1) * stride  # the first grid line after its first pixel: a crop ending there
                radius = max(radius, int(starts - i) if starts > i else 0, int(i - ends + 1) if ends <= i else 0)
            reach = max(reach, int(max((box[1] - i).max(), (i - box[0]).max())))
        if not seen:  # nothing moved: no reach at all
            return 0, size
        if reach >= size // 2 - stride and size < max_size:
            size *= 2
            continue
        if reach >= size // 2 - stride:
            log.warning("the perturbation reaches the border of a %d-px input: the receptive field may be wider "
                        "than measured", size)
        if 0 in seen and stride > 1:  # one input per step: the phases above already fix the halo
            radius = max(radius, _bisect(changed, seen[0], c, stride, bases[:1], outs[:1], noise))
        return radius, size


def _bisect(changed, box, c: int, stride: int, bases, outs, noise) -> int:
    """The radius from the input pixels farthest from a grid line that still
    reach across it: the first pixel ``i`` in ``(c - stride, c]`` whose
    reach ends at or past ``g`` (the last grid line pixel ``c`` reaches),
    and the last ``i`` in ``[c, c + stride)`` whose reach starts before
    ``g'`` (the first grid line after pixel ``c``'s first). Both axes at
    once: pixel (y, x) moves each axis's search by its own bounds."""
    first, last = box
    g = (last // stride) * stride            # per axis
    g2 = (first // stride + 1) * stride
    a_lo, a_hi = np.full(2, c - stride), np.full(2, c)  # reaches g: no at a_lo, yes at a_hi
    b_lo, b_hi = np.full(2, c), np.full(2, c + stride)  # reaches back before g2: yes at b_lo, no at b_hi
    while (a_hi - a_lo > 1).any() or (b_hi - b_lo > 1).any():
        if (a_hi - a_lo > 1).any():
            mid = (a_lo + a_hi) // 2
            got = changed(int(mid[0]), int(mid[1]), bases, outs, noise)
            yes = got[1] >= g if got is not None else np.zeros(2, bool)
            a_hi, a_lo = np.where((a_hi - a_lo > 1) & yes, mid, a_hi), np.where((a_hi - a_lo > 1) & ~yes, mid, a_lo)
        if (b_hi - b_lo > 1).any():
            mid = (b_lo + b_hi) // 2
            got = changed(int(mid[0]), int(mid[1]), bases, outs, noise)
            yes = got[0] < g2 if got is not None else np.zeros(2, bool)
            b_lo, b_hi = np.where((b_hi - b_lo > 1) & yes, mid, b_lo), np.where((b_hi - b_lo > 1) & ~yes, mid, b_hi)
    return int(max((g - a_hi).max(), (b_lo - g2 + 1).max(), 0))


def probe_radius(model, *, in_channels: int, stride: int, **kwargs) -> tuple[int, int, str]:
    """``(radius, size, how)``: by input gradients for torch modules, by
    perturbation for a model that runs outside torch (``runs_outside_torch``:
    an ONNX graph has no gradients to follow)."""
    if getattr(model, "runs_outside_torch", False):
        import time

        t0 = time.perf_counter()
        radius, size = perturbation_radius(model, in_channels=in_channels, stride=stride, **kwargs)
        halo = recommend_halo(radius, stride)
        log.info("receptive field measured by perturbation on a %d-px input in %.1f s (to skip it: --halo %d, or "
                 "halo %d in the model's metadata)", size, time.perf_counter() - t0, halo, halo)
        return radius, size, "measured by perturbation"
    radius, size = gradient_radius(model, in_channels=in_channels, stride=stride, **kwargs)
    return radius, size, "measured by input gradients"


def recommend_halo(radius: int, stride: int) -> int:
    """The smallest halo >= ``radius`` that is a multiple of the stride, so
    that any tile that is a multiple of the stride keeps its crop on the grid."""
    return int(math.ceil(radius / stride) * stride)


def measure_halo(model, *, in_channels: int, stride: int, **kwargs) -> HaloReport:
    """The measured halo (see :func:`probe_radius`) and how it was found."""
    radius, size, how = probe_radius(model, in_channels=in_channels, stride=stride, **kwargs)
    return HaloReport(radius=radius, stride=stride, halo=recommend_halo(radius, stride), size=size, how=how)


# ---- the analytic receptive field: read from the module graph ----------------------------------------------
#
# Each tensor the model computes gets, per spatial axis, ``(jump, lo, hi)``:
# feature ``i`` depends on input pixels ``i * jump + lo[i % P]`` to
# ``i * jump + hi[i % P]``, ``P = len(lo)`` (a period: after an upsampling,
# neighbouring features reach differently). Exact fractions throughout.

class _Untraceable(Exception):
    """An operation whose spatial reach cannot be read off its arguments."""


_IGNORED = {"size", "dim", "numel", "__len__", "get_device", "type", "detach", "__get__", "is_contiguous",
            "contiguous", "clone", "to", "float", "half", "__setstate__", "data_ptr", "stride", "storage_offset"}
_MIXING = {"reshape", "view", "flatten", "permute", "transpose", "unfold", "__getitem__", "narrow", "roll",
           "mean", "sum", "amax", "amin", "max", "min", "std", "var", "scaled_dot_product_attention",
           "multi_head_attention_forward", "matmul", "bmm", "einsum", "linear", "flip", "rot90", "chunk", "split",
           "unbind", "squeeze", "unsqueeze", "expand", "repeat", "stack", "grid_sample", "pixel_shuffle",
           "pixel_unshuffle"}


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _arg(args, kwargs, i, name, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _window(axis, k, s, p, d):
    """Convolution or pooling: output ``o`` reads ``o*s - p + t*d``, t < k."""
    j, lo, hi = axis
    P = len(lo)
    n = P // math.gcd(P, s)
    src = [[q * s - p + t * d for t in range(k)] for q in range(n)]
    return (j * s, tuple(min((i - q * s) * j + lo[i % P] for i in row) for q, row in enumerate(src)),
            tuple(max((i - q * s) * j + hi[i % P] for i in row) for q, row in enumerate(src)))


def _transposed(axis, k, s, p, d):
    """Transposed convolution: output ``o`` receives input ``i`` where
    ``i*s - p + t*d == o``."""
    j, lo, hi = axis
    P = len(lo)
    los, his = [], []
    for q in range(P * s):
        ins = [(q + p - t * d) // s for t in range(k) if (q + p - t * d) % s == 0]
        if not ins:
            raise _Untraceable("a transposed convolution leaves outputs without input")
        los.append(min(i * j + lo[i % P] for i in ins) - q * j / s)
        his.append(max(i * j + hi[i % P] for i in ins) - q * j / s)
    return j / s, tuple(los), tuple(his)


def _upsample(axis, f: Fraction, mode: str):
    """Nearest: ``o -> floor(o / f)``; linear (half-pixel centres): the two
    inputs around ``(o + 0.5) / f - 0.5``. Integer factors only."""
    j, lo, hi = axis
    if f.denominator != 1:
        raise _Untraceable(f"resampling by {f}")
    f, P = int(f), len(lo)
    los, his = [], []
    for q in range(P * f):
        if mode == "nearest":
            ins = [q // f]
        elif mode in ("bilinear", "trilinear", "linear"):
            base = math.floor(Fraction(2 * q + 1, 2 * f) - Fraction(1, 2))
            ins = [base, base + 1]
        else:
            raise _Untraceable(f"interpolation mode {mode!r}")
        los.append(min(i * j + lo[i % P] for i in ins) - q * j / f)
        his.append(max(i * j + hi[i % P] for i in ins) - q * j / f)
    return j / f, tuple(los), tuple(his)


def _union(axes):
    """Elementwise ops and concatenation: the union of the inputs' reach."""
    jumps = {a[0] for a in axes}
    if len(jumps) != 1:
        raise _Untraceable("features of different strides are joined")
    P = math.lcm(*(len(a[1]) for a in axes))
    return (axes[0][0], tuple(min(a[1][q % len(a[1])] for a in axes) for q in range(P)),
            tuple(max(a[2][q % len(a[2])] for a in axes) for q in range(P)))


class _Reach:
    """Follows every torch function a model calls (a TorchFunctionMode) and
    records the reach of each tensor it produces."""

    def __init__(self, dims: int):
        from torch.overrides import TorchFunctionMode

        self.dims, self.reach = dims, {}
        outer = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                outer.follow(func, args, kwargs, out)
                return out

        self.mode = Mode()

    def get(self, t):
        hit = self.reach.get(id(t))
        return hit[1] if hit is not None and hit[0] is t else None

    def set(self, t, r) -> None:
        self.reach[id(t)] = (t, tuple(r))  # holding t keeps its id from being reused

    def follow(self, func, args, kwargs, out) -> None:
        import torch

        flat = [a for a in args if isinstance(a, torch.Tensor)]
        flat += [t for a in args if isinstance(a, (list, tuple)) for t in a if isinstance(t, torch.Tensor)]
        flat += [v for v in kwargs.values() if isinstance(v, torch.Tensor)]
        known = [(t, self.get(t)) for t in flat if self.get(t) is not None]
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        name = getattr(func, "__name__", "")
        name = name if name.startswith("__") else name.strip("_")
        if not known or not outs or name in _IGNORED:
            return
        d = self.dims
        x, r = known[0]
        spatial = tuple(x.shape[-d:])
        if name.startswith("conv_transpose"):
            k, s = tuple(args[1].shape[2:]), _tuple(_arg(args, kwargs, 3, "stride", 1), d)
            p, dil = _tuple(_arg(args, kwargs, 4, "padding", 0), d), _tuple(_arg(args, kwargs, 7, "dilation", 1), d)
            new = [_transposed(a, *v) for a, *v in zip(r, k, s, p, dil)]
        elif name.startswith("conv"):
            k, s = tuple(args[1].shape[2:]), _tuple(_arg(args, kwargs, 3, "stride", 1), d)
            dil, pad = _tuple(_arg(args, kwargs, 5, "dilation", 1), d), _arg(args, kwargs, 4, "padding", 0)
            p = tuple((ki - 1) * di // 2 for ki, di in zip(k, dil)) if pad == "same" else \
                (0,) * d if pad == "valid" else _tuple(pad, d)
            new = [_window(a, *v) for a, *v in zip(r, k, s, p, dil)]
        elif "pool" in name and "adaptive" not in name:
            k = _tuple(_arg(args, kwargs, 1, "kernel_size"), d)
            s = _arg(args, kwargs, 2, "stride", None)
            s = k if s in (None, ()) else _tuple(s, d)
            p = _tuple(_arg(args, kwargs, 3, "padding", 0), d)
            dil = _tuple(_arg(args, kwargs, 4, "dilation", 1), d) if "max" in name else (1,) * d
            new = [_window(a, *v) for a, *v in zip(r, k, s, p, dil)]
        elif name in ("interpolate", "upsample"):
            if _arg(args, kwargs, 4, "align_corners", None):
                raise _Untraceable("align_corners=True resampling depends on the input size")
            mode = _arg(args, kwargs, 3, "mode", "nearest")
            new = [_upsample(a, Fraction(b, n), mode) for a, n, b in zip(r, spatial, outs[0].shape[-d:])]
        elif name == "pad":
            pads = list(_arg(args, kwargs, 1, "pad"))
            pairs = ([(0, 0)] * d + [(pads[2 * i], pads[2 * i + 1]) for i in range(len(pads) // 2)][::-1])[-d:]
            new = [(j, tuple(-a * j + lo[(q - a) % len(lo)] for q in range(len(lo))),
                    tuple(-a * j + hi[(q - a) % len(hi)] for q in range(len(hi)))) for (j, lo, hi), (a, _) in
                   zip(r, pairs)]
        else:
            shapes = {tuple(o.shape[-d:]) for o in outs if o.dim() >= d + 2}
            if name in _MIXING or shapes != {spatial} or any(
                    t.dim() >= d + 2 and tuple(t.shape[-d:]) != spatial for t, _ in known):
                raise _Untraceable(f"{name or func} moves or mixes positions")
            new = [_union([rr[i] for _, rr in known]) for i in range(d)]
        for o in outs:
            if o.dim() >= d + 2:
                self.set(o, new)


def analytic_radius(model, *, in_channels: int, stride: int, dims: int = 2) -> int | None:
    """The receptive-field radius read from the module graph, in the sense
    of :func:`gradient_radius` (an output crop starting on the stride grid):
    every convolution, pooling, padding and resampling the model runs on a
    small input is followed with its kernel, stride, dilation and padding,
    exactly, phase by phase. Instant where the probe takes seconds to
    minutes. Returns None when the model does something whose reach is not
    a window (global pooling, attention, reshapes, size-dependent
    resampling), or that runs outside torch (an ONNX graph): measure it
    instead."""
    import torch

    if getattr(model, "runs_outside_torch", False):
        return None

    side = max(2 * stride, 16)
    device = next(model.parameters()).device
    x = torch.zeros(1, in_channels, *(side,) * dims, device=device)
    tracker = _Reach(dims)
    tracker.set(x, [(Fraction(1), (Fraction(0),), (Fraction(0),))] * dims)
    try:
        with torch.no_grad(), tracker.mode:
            y = model.eval()(x)
    except _Untraceable as err:
        log.debug("no analytic receptive field: %s", err)
        return None
    r = tracker.get(y)
    if r is None or any(j != 1 for j, _, _ in r):
        return None
    radius = 0
    for _, lo, hi in r:
        for p in range(stride):  # p: the output pixel's offset from the crop's first edge, within a period
            up, down = -lo[p % len(lo)], hi[p % len(hi)]
            radius = max(radius, math.ceil(up - p), math.ceil(down - (stride - 1 - p)))
    return int(radius)
