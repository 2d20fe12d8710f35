"""Measure a model's receptive-field radius: how much halo it needs.

Tiled output equals whole-image inference only when the halo is at least
the radius of the input region an output pixel depends on. Guessing it from
the architecture is error-prone (DESIGN.md), so it is measured: the support
of the input gradient of single output pixels, on a random input, for a few
positions within one stride period (the radius can depend on the phase)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class HaloReport:
    radius: int
    stride: int
    halo: int
    size: int

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
