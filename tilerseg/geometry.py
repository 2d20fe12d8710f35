"""Pure tiling math for the overlap-tile strategy. No I/O, no torch, no dask.

Why tiles overlap
-----------------
A convolutional network's output pixel depends on the input within its
receptive-field radius ``r``. Cutting the image into windows and running
each alone gives wrong values wherever a window edge is closer than ``r``
to an output pixel: the seams. The overlap-tile strategy of the U-Net paper
runs windows of side ``tile`` but keeps only their centre crop of side
``crop = tile - 2 * halo``. When ``halo >= r`` each kept pixel sees exactly
the context it would see in a whole-image run.

The formula
-----------
The image (``H x W``) is mirror-padded by ``halo`` on every side, once; all
window positions are counted in that padded image. Window ``(i, j)`` covers
padded rows ``[i * crop, i * crop + tile)`` and its crop covers image rows
``[i * crop, (i + 1) * crop)``; ``ceil(H / crop)`` windows cover the image,
the last ones reaching into the padding instead of being shifted back inside
the image. Three conditions make the result equal to whole-image inference
on the same padded image:

* ``tile`` is a multiple of the network's output stride ``s`` (it can take it);
* ``crop`` is a positive multiple of ``s``, so every window origin sits on the
  stride grid of the padded image and down/up-sampling phases agree;
* ``halo`` is at least the receptive-field radius (measure it; see DESIGN.md).

Padding names follow :func:`numpy.pad`: ``reflect`` does not repeat the
edge pixel, ``symmetric`` does (dask's ``boundary="reflect"`` is numpy's
``symmetric``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np

from .errors import TileError

PadMode = Literal["reflect", "symmetric", "constant", "edge"]
PAD_MODES: tuple[str, ...] = ("reflect", "symmetric", "constant", "edge")


def validate_tile(tile: int, halo: int, stride: int) -> None:
    """Raise :class:`TileError` naming the nearest valid values when the
    window side ``tile`` or context ``halo`` does not fit a model of output
    stride ``stride``."""
    if tile <= 0 or halo < 0:
        raise TileError(f"tile must be positive and halo non-negative (got tile {tile}, halo {halo})")
    if tile % stride:
        lo, hi = (tile // stride) * stride, (tile // stride + 1) * stride
        options = " or ".join(str(v) for v in (lo, hi) if v > 2 * halo)
        raise TileError(
            f"tile {tile} is not a multiple of the model's output stride {stride}: "
            f"use --tile {options or hi}")
    crop = tile - 2 * halo
    if crop <= 0:
        best = ((tile // 2 - 1) // stride) * stride if tile // 2 > stride else 0
        raise TileError(
            f"halo {halo} leaves no centre crop in a {tile}-px window (tile - 2*halo = {crop}): "
            f"use --halo {best} or a larger --tile")
    if crop % stride:
        step = stride // 2 if stride % 2 == 0 else stride
        lo = (halo // step) * step
        candidates = [v for v in (lo, lo + step) if v >= 0 and tile - 2 * v > 0 and (tile - 2 * v) % stride == 0]
        raise TileError(
            f"tile {tile} with halo {halo} gives a crop of {crop} px, not a multiple of the model's "
            f"output stride {stride}, so windows would fall off the stride grid: use --halo "
            + " or ".join(str(v) for v in candidates))


def block_layout(batch_size: int) -> tuple[int, int]:
    """Windows per task as (rows, cols): about square, holding ``batch_size``
    windows so that one task feeds the model whole batches."""
    b = max(1, int(batch_size))
    cols = next(d for d in range(math.ceil(math.sqrt(b)), b + 1) if b % d == 0)
    return b // cols, cols


@dataclass(frozen=True)
class Region:
    """One task: which windows it runs, what it reads, what it writes.

    ``rows``/``cols`` of the *read* are in image coordinates and may reach
    outside the image by up to ``halo`` plus the last window's overhang;
    ``out_rows``/``out_cols`` are clipped to the image."""

    block: tuple[int, int]
    windows: tuple[tuple[int, int], ...]
    read_rows: tuple[int, int]
    read_cols: tuple[int, int]
    out_rows: tuple[int, int]
    out_cols: tuple[int, int]


@dataclass(frozen=True)
class Grid:
    """Window grid for an image of ``shape`` (H, W)."""

    shape: tuple[int, int]
    tile: int
    halo: int
    stride: int
    block: tuple[int, int] = (1, 1)

    def __post_init__(self) -> None:
        validate_tile(self.tile, self.halo, self.stride)

    @property
    def crop(self) -> int:
        return self.tile - 2 * self.halo

    @property
    def n_windows(self) -> tuple[int, int]:
        return tuple(max(1, math.ceil(n / self.crop)) for n in self.shape)  # type: ignore[return-value]

    @property
    def n_blocks(self) -> tuple[int, int]:
        return tuple(math.ceil(n / k) for n, k in zip(self.n_windows, self.block))  # type: ignore[return-value]

    @property
    def block_shape(self) -> tuple[int, int]:
        """Output pixels per full task (the output chunk shape)."""
        return self.block[0] * self.crop, self.block[1] * self.crop

    @property
    def chunks(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Dask-style chunks of the (H, W) output, one chunk per task."""
        out = []
        for n, b in zip(self.shape, self.block_shape):
            sizes = [b] * (n // b) + ([n % b] if n % b else [])
            out.append(tuple(sizes))
        return out[0], out[1]

    @property
    def total_windows(self) -> int:
        ny, nx = self.n_windows
        return ny * nx

    def region(self, by: int, bx: int) -> Region:
        ky, kx = self.block
        ny, nx = self.n_windows
        wy0, wy1 = by * ky, min((by + 1) * ky, ny)
        wx0, wx1 = bx * kx, min((bx + 1) * kx, nx)
        c, h = self.crop, self.halo
        windows = tuple((wy, wx) for wy in range(wy0, wy1) for wx in range(wx0, wx1))
        return Region(
            block=(by, bx),
            windows=windows,
            read_rows=(wy0 * c - h, wy1 * c + h),
            read_cols=(wx0 * c - h, wx1 * c + h),
            out_rows=(wy0 * c, min(wy1 * c, self.shape[0])),
            out_cols=(wx0 * c, min(wx1 * c, self.shape[1])),
        )

    def regions(self) -> Iterator[Region]:
        nby, nbx = self.n_blocks
        for by in range(nby):
            for bx in range(nbx):
                yield self.region(by, bx)


def pad_index(coords: np.ndarray, n: int, mode: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Map image coordinates that may lie outside ``[0, n)`` to source indices.

    Returns ``(index, inside)``. ``index`` follows :func:`numpy.pad`'s
    ``mode`` for any distance from the border (repeated reflection for pads
    longer than the image). ``inside`` is a boolean array for ``constant``
    (False where the constant value goes) and ``None`` otherwise.
    """
    coords = np.asarray(coords, dtype=np.int64)
    if mode == "constant":
        inside = (coords >= 0) & (coords < n)
        return np.clip(coords, 0, n - 1), inside
    if mode == "edge" or n == 1:
        return np.clip(coords, 0, n - 1), None
    if mode == "reflect":
        period = 2 * (n - 1)
        m = np.mod(coords, period)
        return np.where(m < n, m, period - m), None
    if mode == "symmetric":
        period = 2 * n
        m = np.mod(coords, period)
        return np.where(m < n, m, period - 1 - m), None
    raise TileError(f"unknown pad mode {mode!r}: use one of {', '.join(PAD_MODES)}")


@dataclass(frozen=True)
class Grid3:
    """Window grid for a volume of ``shape`` (Z, H, W): the same overlap-tile
    rule as :class:`Grid` on every axis (``tile``/``halo`` per axis), one
    window per task (a 3-D window is already a batch's worth of work)."""

    shape: tuple[int, int, int]
    tile: tuple[int, int, int]
    halo: tuple[int, int, int]
    stride: int

    def __post_init__(self) -> None:
        for t, h in zip(self.tile, self.halo):
            validate_tile(t, h, self.stride)

    @property
    def crop(self) -> tuple[int, int, int]:
        return tuple(t - 2 * h for t, h in zip(self.tile, self.halo))  # type: ignore[return-value]

    @property
    def n_windows(self) -> tuple[int, int, int]:
        return tuple(max(1, math.ceil(n / c)) for n, c in zip(self.shape, self.crop))  # type: ignore[return-value]

    @property
    def total_windows(self) -> int:
        return int(np.prod(self.n_windows))

    @property
    def chunks(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(min(c, n - i * c) for i in range(k))
                     for n, c, k in zip(self.shape, self.crop, self.n_windows))

    def window(self, index: tuple[int, int, int]) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """``(read, out)`` ranges per axis of window ``index``: the read may
        reach outside the volume (mirror-padded), the output is clipped."""
        read = tuple((i * c - h, i * c - h + t) for i, c, h, t in zip(index, self.crop, self.halo, self.tile))
        out = tuple((i * c, min((i + 1) * c, n)) for i, c, n in zip(index, self.crop, self.shape))
        return read, out

    def windows(self) -> Iterator[tuple[int, int, int]]:
        nz, ny, nx = self.n_windows
        for z in range(nz):
            for y in range(ny):
                for x in range(nx):
                    yield z, y, x


def as_triple(v, name: str) -> tuple[int, int, int]:
    """``64`` or ``(32, 64, 64)`` as a (z, y, x) triple."""
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 3
    t = tuple(int(x) for x in v)
    if len(t) != 3:
        raise TileError(f"{name} for a volume is one number or three (z,y,x), got {v!r}")
    return t  # type: ignore[return-value]


def snap_boxes(box: np.ndarray, crop: int, stride: int) -> np.ndarray:
    """Boxes ``(..., 4)``: ``y0, y1, x0, x1`` within a window's crop, grown
    outward to the model's stride (a window must start on the stride grid
    and span a multiple of it to equal whole-image inference), within the
    crop; an empty box becomes all zero."""
    box = np.asarray(box)
    out = box.copy()
    out[..., 0::2] = box[..., 0::2] // stride * stride
    out[..., 1::2] = np.minimum(-(-box[..., 1::2] // stride) * stride, crop)
    empty = (box[..., 1] <= box[..., 0]) | (box[..., 3] <= box[..., 2])
    out[empty] = 0
    return out
