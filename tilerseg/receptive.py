"""Measure a model's receptive-field radius: how much halo it needs.

Tiled output equals whole-image inference only when the halo is at least
the radius of the input region an output pixel depends on. Guessing it from
the architecture is error-prone (DESIGN.md), so it is measured: the support
of the input gradient of single output pixels, on a random input, for a few
positions within one stride period (the radius can depend on the phase)."""
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
            (grad,) = torch.autograd.grad(model(xi)[(0, slice(None)) + (c + p,) * dims].sum(), xi)  # no .grad kept
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


def recommend_halo(radius: int, stride: int) -> int:
    """The smallest halo >= ``radius`` that is a multiple of the stride, so
    that any tile that is a multiple of the stride keeps its crop on the grid."""
    return int(math.ceil(radius / stride) * stride)


def measure_halo(model, *, in_channels: int, stride: int, **kwargs) -> HaloReport:
    radius, size = gradient_radius(model, in_channels=in_channels, stride=stride, **kwargs)
    return HaloReport(radius=radius, stride=stride, halo=recommend_halo(radius, stride), size=size)


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
    resampling): measure it instead."""
    import torch

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
