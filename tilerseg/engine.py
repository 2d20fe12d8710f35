"""The only module that knows dask: one task per block of windows.

Each task reads its region plus halo (mirror-padded at image borders),
runs the model on its windows in batches, keeps each window's centre crop
and returns one finished output chunk. Chunks go straight to the store, so
peak memory depends on the tile and batch size, never on the image."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from .errors import TileError
from .geometry import PAD_MODES, Grid, Region, block_layout
from .io.base import LABEL_NODATA, Reader, read_padded

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class TileSpec:
    """Window side, context on each side, windows per forward pass, padding."""

    tile: int = 512
    halo: int = 64
    batch_size: int = 4
    pad_mode: Literal["reflect", "symmetric", "constant", "edge"] = "reflect"

    def __post_init__(self) -> None:
        if self.pad_mode not in PAD_MODES:
            raise TileError(f"unknown pad mode {self.pad_mode!r}: use one of {', '.join(PAD_MODES)}")
        if self.batch_size < 1:
            raise TileError(f"--batch-size must be at least 1 (got {self.batch_size})")

    def grid(self, shape: tuple[int, int], stride: int) -> Grid:
        return Grid(tuple(shape), self.tile, self.halo, stride, block_layout(self.batch_size))


@dataclass(frozen=True)
class Output:
    """What each task returns: probabilities (float32, NaN = nodata) or
    labels (uint8; threshold for one class, argmax for several; 255 = nodata).

    ``merge``: ``crop`` keeps each window's centre crop (exact for local
    networks); ``gaussian`` blends whole windows with a gaussian importance
    map (sigma = 1/8 of the window, as nnU-Net), for networks with global
    context, where windows disagree and hard crops leave seams."""

    probabilities: bool = False
    threshold: float = 0.5
    merge: Literal["crop", "gaussian"] = "crop"


MERGE_MODES = ("crop", "gaussian")


def background(classes: int, shape: tuple[int, int]) -> np.ndarray:
    """Probabilities of a skipped window: all background (class 0)."""
    out = np.zeros((classes, *shape), np.float32)
    if classes > 1:
        out[0] = 1.0
    return out


def _read_windows(reader: Reader, grid: Grid, region: Region, tiles: TileSpec, active, *, whole: bool):
    """Read a region once and pick the windows to run: ``active`` ones (no
    tissue mask means all) whose written area is not wholly nodata. The
    written area is the centre crop, or the ``whole`` window when merging by
    blending. Returns ``(data, valid, offsets)``; no read when none is active."""
    c, h = grid.crop, grid.halo
    wy0, wx0 = region.windows[0]
    run = [w for w in region.windows if active is None or active[w]]
    if not run:
        return None, None, []
    data, valid = read_padded(reader, region.read_rows, region.read_cols, tiles.pad_mode)
    size, margin = (grid.tile, 0) if whole else (c, h)
    offsets = [((wy - wy0) * c, (wx - wx0) * c) for wy, wx in run]
    if valid is not None:
        offsets = [(y, x) for y, x in offsets if valid[margin + y:margin + y + size, margin + x:margin + x + size].any()]
    return data, valid, offsets


def _run_windows(predictor, data: np.ndarray, offsets, tile: int, batch_size: int, classes: int):
    """Yield ``(y, x, probabilities (classes, tile, tile))`` per window, run in batches."""
    for start in range(0, len(offsets), batch_size):
        batch = offsets[start:start + batch_size]
        probs = predictor(np.stack([data[y:y + tile, x:x + tile] for y, x in batch]))
        if probs.shape[1] != classes:
            raise TileError(f"the model gives {probs.shape[1]} classes, {classes} were expected")
        for (y, x), p in zip(batch, probs):
            yield y, x, p


def predict_region(reader: Reader, predictor, grid: Grid, region: Region, tiles: TileSpec, classes: int,
                   active: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Probabilities ``(classes, h, w)``, validity ``(h, w)`` and the number
    of windows run, for one region's output.

    Windows not ``active`` (no tissue) and windows whose output area is all
    nodata are not run: they hold background."""
    c, h = grid.crop, grid.halo
    oh, ow = region.out_rows[1] - region.out_rows[0], region.out_cols[1] - region.out_cols[0]
    data, valid, offsets = _read_windows(reader, grid, region, tiles, active, whole=False)
    if data is None:  # nothing to see here: no read at all
        return background(classes, (oh, ow)), None, 0
    wy0, wx0 = region.windows[0]
    rows = (region.windows[-1][0] - wy0 + 1) * c
    cols = (region.windows[-1][1] - wx0 + 1) * c
    out = background(classes, (rows, cols))
    for y, x, p in _run_windows(predictor, data, offsets, grid.tile, tiles.batch_size, classes):
        out[:, y:y + c, x:x + c] = p[:, h:h + c, h:h + c]
    if valid is not None:
        valid = valid[h:h + oh, h:h + ow]
    return out[:, :oh, :ow], valid, len(offsets)


def _block(reader, predictor, grid, region, tiles, output: Output, classes: int, active, on_done):
    if hasattr(predictor, "get"):  # a picklable reference, resolved once per worker
        predictor = predictor.get()
    probs, valid, n_run = predict_region(reader, predictor, grid, region, tiles, classes, active)
    if on_done is not None:
        on_done(n_run, len(region.windows) - n_run)
    return _finish(probs, valid, output)


def _finish(probs: np.ndarray, valid: np.ndarray | None, output: Output) -> np.ndarray:
    """Probabilities to the output chunk: NaN / 255 where not valid."""
    if output.probabilities:
        if valid is not None:
            probs[:, ~valid] = np.nan
        result = probs
    else:
        if probs.shape[0] == 1:
            result = (probs[0] >= output.threshold).astype(np.uint8)
        else:
            result = probs.argmax(axis=0).astype(np.uint8)
        if valid is not None:
            result[~valid] = LABEL_NODATA
    return result


def gaussian_map(tile: int) -> np.ndarray:
    """nnU-Net's importance map: a gaussian of sigma tile/8 at the window
    centre, 1 at the peak, never 0 (so every pixel has some weight)."""
    x = np.arange(tile, dtype=np.float64) - (tile - 1) / 2
    g1 = np.exp(-x ** 2 / (2 * (tile / 8) ** 2))
    g = np.outer(g1, g1)
    g /= g.max()
    return np.maximum(g, g[g > 0].min()).astype(np.float32)


def _blend_part(reader, predictor, grid, region, tiles, classes: int, active, on_done):
    """Gaussian merge, first half: run a region's windows whole and return
    the weighted sum, the weight and the validity over the region's read
    area (the output area grown by the halo)."""
    if hasattr(predictor, "get"):
        predictor = predictor.get()
    T = grid.tile
    rows, cols = region.read_rows[1] - region.read_rows[0], region.read_cols[1] - region.read_cols[0]
    num = np.zeros((classes, rows, cols), np.float32)
    den = np.zeros((rows, cols), np.float32)
    data, valid, offsets = _read_windows(reader, grid, region, tiles, active, whole=True)
    if offsets:
        g = gaussian_map(T)
        for y, x, p in _run_windows(predictor, data, offsets, T, tiles.batch_size, classes):
            num[:, y:y + T, x:x + T] += p * g
            den[y:y + T, x:x + T] += g
    if on_done is not None:
        on_done(len(offsets), len(region.windows) - len(offsets))
    return num, den, valid


def _blend(parts, regions, region: Region, output: Output, classes: int, halo: int) -> np.ndarray:
    """Gaussian merge, second half: add the neighbouring regions' parts over
    this region's output area, divide by the weight (background where no
    window ran) and finish as a crop-merge chunk would."""
    (r0, r1), (c0, c1) = region.out_rows, region.out_cols
    num = np.zeros((classes, r1 - r0, c1 - c0), np.float32)
    den = np.zeros((r1 - r0, c1 - c0), np.float32)
    valid = None
    for (pn, pd, pv), other in zip(parts, regions):
        (a0, _), (b0, _) = other.read_rows, other.read_cols
        y0, y1 = max(r0, a0), min(r1, a0 + pd.shape[0])
        x0, x1 = max(c0, b0), min(c1, b0 + pd.shape[1])
        if y0 >= y1 or x0 >= x1:
            continue
        src = (slice(y0 - a0, y1 - a0), slice(x0 - b0, x1 - b0))
        dst = (slice(y0 - r0, y1 - r0), slice(x0 - c0, x1 - c0))
        num[(slice(None), *dst)] += pn[(slice(None), *src)]
        den[dst] += pd[src]
        if other.block == region.block and pv is not None:
            valid = pv[halo:halo + r1 - r0, halo:halo + c1 - c0]
    probs = background(classes, den.shape)
    hit = den > 0
    probs[:, hit] = num[:, hit] / den[hit]
    return _finish(probs, valid, output)


def lazy_segment(reader: Reader, predictor, grid: Grid, tiles: TileSpec, output: Output, classes: int,
                 on_done: Callable[[int, int], None] | None = None, active: np.ndarray | None = None):
    """A lazy dask array of the segmentation: ``(classes, H, W)`` float32
    probabilities or ``(H, W)`` uint8 labels, one chunk per task.

    ``active`` (booleans per window, ``grid.n_windows``) skips windows: they
    are written as background. ``on_done(run, skipped)`` counts windows."""
    import dask.array as da
    from dask.base import tokenize

    # id(): two in-memory arrays of one shape share the path "<array>"
    name = "tilerseg-" + tokenize(reader.path, id(reader), reader.meta.shape, id(predictor), grid, tiles, output,
                                  active)
    lead = (0,) if output.probabilities else ()
    if output.merge == "gaussian":
        dsk = _blend_graph(name, lead, reader, predictor, grid, tiles, output, classes, active, on_done)
    elif output.merge == "crop":
        dsk = {(name, *lead, *r.block): (_block, reader, predictor, grid, r, tiles, output, classes, active, on_done)
               for r in grid.regions()}
    else:
        raise TileError(f"unknown merge {output.merge!r}: use {' or '.join(MERGE_MODES)}")
    if output.probabilities:
        return da.Array(dsk, name, chunks=((classes,), *grid.chunks), dtype=np.float32)
    return da.Array(dsk, name, chunks=grid.chunks, dtype=np.uint8)


def _blend_graph(name, lead, reader, predictor, grid: Grid, tiles, output, classes, active, on_done) -> dict:
    """Two tasks per block: run its windows (weighted, over the output
    area grown by the halo), then sum the neighbours that reach it. A
    neighbour reaches a block when the halo spans into it, so only
    ``ceil(halo / block)`` blocks around are read; parts are freed as soon
    as their neighbours are done, keeping memory to a few block rows."""
    import math

    part = name + "-part"
    nby, nbx = grid.n_blocks
    reach = max(1, math.ceil(grid.halo / min(grid.block_shape)))
    dsk = {(part, *r.block): (_blend_part, reader, predictor, grid, r, tiles, classes, active, on_done)
           for r in grid.regions()}
    for r in grid.regions():
        by, bx = r.block
        near = [grid.region(y, x) for y in range(max(0, by - reach), min(nby, by + reach + 1))
                for x in range(max(0, bx - reach), min(nbx, bx + reach + 1))]
        dsk[(name, *lead, by, bx)] = (_blend, [(part, *o.block) for o in near], near, r, output, classes,
                                      grid.halo)
    return dsk


def default_workers() -> int:
    """Threads for a local run: enough to keep reading and writing ahead of
    the one model (which uses every core itself), capped to bound memory."""
    import os

    return max(2, min(8, os.cpu_count() or 2))


def compute_into(array, target, *, workers: int | None = None, scheduler=None) -> None:
    """Store ``array`` into ``target`` (a zarr array; or lists of both) chunk by chunk.

    Local runs use dask's threaded scheduler with ``workers`` threads: the
    model is shared and runs one batch at a time on all cores, while other
    threads read and write. With a distributed ``scheduler`` (address or
    Client) tasks run on its workers, each building the model once."""
    import dask
    import dask.array as da

    if scheduler is None:
        from concurrent.futures import ThreadPoolExecutor

        # our own pool, so that when a task fails we wait for the others in
        # flight before the caller closes the reader under them (a closed
        # GDAL dataset read by a live thread segfaults)
        pool = ThreadPoolExecutor(max(1, workers or default_workers()), thread_name_prefix="tilerseg")
        try:
            with dask.config.set(scheduler="threads", pool=pool):
                da.store(array, target, lock=False, compute=True)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return
    from distributed import Client

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    try:
        da.store(array, target, lock=False, compute=True, scheduler=client)
    finally:
        if client is not scheduler:
            client.close()


def _image_part(read, part: str):
    data, valid = read
    if part == "image":
        return data
    return np.ones(data.shape[:2], bool) if valid is None else valid


def lazy_image(reader: Reader, chunk: int = 1024):
    """The reader's pixels ``(H, W, bands)`` and validity ``(H, W)`` as lazy
    dask arrays sharing one read per chunk (for ``ingest``)."""
    import dask.array as da
    from dask.base import tokenize
    from dask.highlevelgraph import HighLevelGraph

    H, W = reader.meta.shape
    rows = [(r, min(r + chunk, H)) for r in range(0, H, chunk)]
    cols = [(c, min(c + chunk, W)) for c in range(0, W, chunk)]
    chunks = (tuple(b - a for a, b in rows), tuple(b - a for a, b in cols))
    token = tokenize(reader.path, reader.meta, chunk)
    read = f"tilerseg-read-{token}"
    reads = {(read, i, j): (reader.read, r, c) for i, r in enumerate(rows) for j, c in enumerate(cols)}
    out = []
    for part in ("image", "valid"):
        name = f"tilerseg-{part}-{token}"
        lead = (0,) if part == "image" else ()
        dsk = {(name, i, j, *lead): (_image_part, (read, i, j), part) for i in range(len(rows)) for j in range(len(cols))}
        graph = HighLevelGraph({read: reads, name: dsk}, {read: set(), name: {read}})
        if part == "image":
            out.append(da.Array(graph, name, chunks=chunks + ((reader.meta.bands,),), dtype=reader.meta.dtype))
        else:
            out.append(da.Array(graph, name, chunks=chunks, dtype=bool))
    return out[0], out[1]


def _volume_window(reader, predictor, grid, index, pad_mode: str, output: Output, classes: int, on_done):
    from .io.volume import read_padded3

    if hasattr(predictor, "get"):
        predictor = predictor.get()
    read, out = grid.window(index)
    data = read_padded3(reader, read, pad_mode)
    probs = predictor(data[None])[0]
    if probs.shape[0] != classes:
        raise TileError(f"the model gives {probs.shape[0]} classes, {classes} were expected")
    (hz, hy, hx), sizes = grid.halo, [b - a for a, b in out]
    probs = probs[:, hz:hz + sizes[0], hy:hy + sizes[1], hx:hx + sizes[2]]
    if on_done is not None:
        on_done(1, 0)
    return _finish(np.ascontiguousarray(probs), None, output)


def lazy_segment_volume(reader, predictor, grid, output: Output, classes: int, pad_mode: str = "reflect",
                        on_done: Callable[[int, int], None] | None = None):
    """The 3-D counterpart of :func:`lazy_segment`: one task per window of
    ``grid`` (a :class:`~tilerseg.geometry.Grid3`), each reading its
    mirror-padded window, running the model and returning its centre crop:
    ``(classes, Z, H, W)`` probabilities or ``(Z, H, W)`` labels."""
    import dask.array as da
    from dask.base import tokenize

    if output.merge != "crop":
        raise TileError("volumes are merged by crop only (3-D models here are local, so crops are exact)")
    name = "tilerseg-vol-" + tokenize(reader.path, id(reader), reader.meta.shape, id(predictor), grid, output,
                                      pad_mode)
    lead = (0,) if output.probabilities else ()
    dsk = {(name, *lead, *w): (_volume_window, reader, predictor, grid, w, pad_mode, output, classes, on_done)
           for w in grid.windows()}
    if output.probabilities:
        return da.Array(dsk, name, chunks=((classes,), *grid.chunks), dtype=np.float32)
    return da.Array(dsk, name, chunks=grid.chunks, dtype=np.uint8)
