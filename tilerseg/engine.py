"""The only module that knows dask: one task per block of windows.

Each task reads its region plus halo (mirror-padded at image borders),
runs the model on its windows in batches, keeps each window's centre crop
and returns one finished output chunk. Chunks go straight to the store, so
peak memory depends on the tile and batch size, never on the image."""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np

from .config import MERGE_MODES
from .errors import TileError
from .geometry import PAD_MODES, Grid, Region, block_layout, snap_boxes
from .plan import WAVE_BLOCKS, Blocks, Plan
from .io.base import LABEL_NODATA, Reader, read_padded
from .io.marks import ChunkMarks
from .io.volume import read_padded3

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


def background(classes: int, shape: tuple[int, int]) -> np.ndarray:
    """Probabilities of a skipped window: all background (class 0)."""
    out = np.zeros((classes, *shape), np.float32)
    if classes > 1:
        out[0] = 1.0
    return out


def _read_windows(reader: Reader, grid: Grid, region: Region, tiles: TileSpec, active, *, whole: bool):
    """Read a region once and pick the windows to run and what of each.

    ``active`` (``(ny, nx, 4)``, see :meth:`tilerseg.tissue.WindowMap.boxes`;
    ``None``: all of every window) gives the part of each window's crop on
    tissue; a window with none is not run, and no region is read when no
    window runs. With nodata, that part is cut further to the valid pixels
    of the crop, read at full resolution, on the stride grid. A window
    whose ``whole`` area is written (merging by blending) is run whole
    when any of it is valid. Returns ``(data, valid, windows)``, each
    window ``(y, x, box)``: its offset in ``data`` and ``box = (y0, y1,
    x0, x1)`` of its crop to compute (``None``: the whole window)."""
    c, h = grid.crop, grid.halo
    wy0, wx0 = region.windows[0]
    run = [w for w in region.windows if active is None or active[w][1] > active[w][0]]
    if not run:
        return None, None, []
    data, valid = read_padded(reader, region.read_rows, region.read_cols, tiles.pad_mode)
    windows = []
    for w in run:
        y, x = (w[0] - wy0) * c, (w[1] - wx0) * c
        if whole:
            if valid is None or valid[y:y + grid.tile, x:x + grid.tile].any():
                windows.append((y, x, None))
            continue
        y0, y1, x0, x1 = (0, c, 0, c) if active is None else (int(v) for v in active[w])
        if valid is not None:
            v = valid[h + y + y0:h + y + y1, h + x + x0:h + x + x1]
            rows, cols = np.flatnonzero(v.any(1)), np.flatnonzero(v.any(0))
            if not rows.size:
                continue
            y0, y1, x0, x1 = (int(v) for v in snap_boxes(np.array([y0 + rows[0], y0 + rows[-1] + 1, x0 + cols[0],
                                                                    x0 + cols[-1] + 1]), c, grid.stride))
        windows.append((y, x, None if (y0, y1, x0, x1) == (0, c, 0, c) else (y0, y1, x0, x1)))
    return data, valid, windows


def _run_windows(predictor, data: np.ndarray, windows, tile: int, halo: int, batch_size: int, classes: int):
    """Yield ``(y, x, box, probabilities (classes, rows, cols))`` per window
    of :func:`_read_windows`, run in batches of windows of one shape: a
    whole window is ``tile`` px, a trimmed one its box grown by ``halo``."""
    shapes: dict = {}
    for y, x, box in windows:
        size = (tile, tile) if box is None else (box[1] - box[0] + 2 * halo, box[3] - box[2] + 2 * halo)
        shapes.setdefault(size, []).append((y, x, box))
    for (th, tw), group in shapes.items():
        for start in range(0, len(group), batch_size):
            batch = group[start:start + batch_size]
            corners = [(y + b[0], x + b[2]) if b else (y, x) for y, x, b in batch]
            probs = predictor(np.stack([data[y:y + th, x:x + tw] for y, x in corners]))
            if probs.shape[1] != classes:
                raise TileError(f"the model gives {probs.shape[1]} classes, {classes} were expected")
            for (y, x, b), p in zip(batch, probs):
                yield y, x, b, p


def predict_region(reader: Reader, predictor, grid: Grid, region: Region, tiles: TileSpec, classes: int,
                   active: np.ndarray | None = None, output: Output | None = None,
                   ) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Probabilities ``(classes, h, w)``, validity ``(h, w)`` and the number
    of windows run, for one region's output; with a labels ``output``, the
    finished uint8 chunk instead of the probabilities (each window's crop
    labelled as it lands, so no float block of the region is ever made).

    Windows off tissue (``active``) and windows whose output area is all
    nodata are not run, and the others compute only the part of their crop
    on tissue and valid (see :func:`_read_windows`): the rest holds
    background. What is computed equals whole-image inference there, as a
    full window's crop does: the trimmed window keeps the full halo."""
    c, h = grid.crop, grid.halo
    oh, ow = region.out_rows[1] - region.out_rows[0], region.out_cols[1] - region.out_cols[0]
    labels = output is not None and not output.probabilities
    data, valid, windows = _read_windows(reader, grid, region, tiles, active, whole=False)
    if data is None:  # nothing to see here: no read at all
        probs = background(classes, (oh, ow))
        return (_finish(probs, None, output) if labels else probs), None, 0
    wy0, wx0 = region.windows[0]
    rows = (region.windows[-1][0] - wy0 + 1) * c
    cols = (region.windows[-1][1] - wx0 + 1) * c
    if labels:  # the label of a background pixel, as _finish makes it
        out = np.full((rows, cols), _labels(background(classes, (1, 1)), output)[0, 0], np.uint8)
    else:
        out = background(classes, (rows, cols))
    for y, x, b, p in _run_windows(predictor, data, windows, grid.tile, h, tiles.batch_size, classes):
        y0, y1, x0, x1 = b or (0, c, 0, c)
        crop = p[:, h:h + y1 - y0, h:h + x1 - x0]
        if labels:
            out[y + y0:y + y1, x + x0:x + x1] = _labels(crop, output)
        else:
            out[:, y + y0:y + y1, x + x0:x + x1] = crop
    if valid is not None:
        valid = valid[h:h + oh, h:h + ow]
    if labels:
        out = out[:oh, :ow]
        if valid is not None:
            out[~valid] = LABEL_NODATA
        return out, valid, len(windows)
    return out[:, :oh, :ow], valid, len(windows)


def _block(reader, predictor, grid, region, tiles, output: Output, classes: int, active):
    """One crop-merge task: ``(chunk, windows run, windows skipped)``."""
    if hasattr(predictor, "get"):  # a picklable reference, resolved once per worker
        predictor = predictor.get()
    chunk, valid, n_run = predict_region(reader, predictor, grid, region, tiles, classes, active, output)
    if output.probabilities:
        chunk = _finish(chunk, valid, output)
    return chunk, n_run, len(region.windows) - n_run


def _labels(probs: np.ndarray, output: Output) -> np.ndarray:
    """Labels of probabilities ``(classes, ...)``: threshold for one class, argmax for several."""
    if probs.shape[0] == 1:
        return (probs[0] >= output.threshold).view(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)


def _finish(probs: np.ndarray, valid: np.ndarray | None, output: Output) -> np.ndarray:
    """Probabilities to the output chunk: NaN / 255 where not valid."""
    if output.probabilities:
        if valid is not None:
            probs[:, ~valid] = np.nan
        result = probs
    else:
        result = _labels(probs, output)
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


def _blend_part(reader, predictor, grid, region, tiles, classes: int, active):
    """Gaussian merge, first half: run a region's windows whole and return
    the weighted sum, the weight and the validity over the region's read
    area (the output area grown by the halo), and the windows run and skipped."""
    if hasattr(predictor, "get"):
        predictor = predictor.get()
    T = grid.tile
    rows, cols = region.read_rows[1] - region.read_rows[0], region.read_cols[1] - region.read_cols[0]
    num = np.zeros((classes, rows, cols), np.float32)
    den = np.zeros((rows, cols), np.float32)
    data, valid, offsets = _read_windows(reader, grid, region, tiles, active, whole=True)
    if offsets:
        g = gaussian_map(T)
        for y, x, _, p in _run_windows(predictor, data, offsets, T, 0, tiles.batch_size, classes):
            num[:, y:y + T, x:x + T] += p * g
            den[y:y + T, x:x + T] += g
    return num, den, valid, len(offsets), len(region.windows) - len(offsets)


def _blend(parts, regions, region: Region, output: Output, classes: int, halo: int, counted=()):
    """Gaussian merge, second half: add the neighbouring regions' parts over
    this region's output area, divide by the weight (background where no
    window ran) and finish as a crop-merge chunk would. The windows of the
    parts at ``counted`` positions are this task's to report."""
    (r0, r1), (c0, c1) = region.out_rows, region.out_cols
    num = np.zeros((classes, r1 - r0, c1 - c0), np.float32)
    den = np.zeros((r1 - r0, c1 - c0), np.float32)
    valid = None
    n_run = sum(parts[i][3] for i in counted)
    n_skipped = sum(parts[i][4] for i in counted)
    for (pn, pd, pv, _, _), other in zip(parts, regions):
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
    return _finish(probs, valid, output), n_run, n_skipped


def lazy_array(plan: Plan):
    """The whole result of ``plan`` as a lazy dask array, one chunk per block
    (for notebooks: :func:`tilerseg.segment`)."""
    import operator

    import dask.array as da

    dsk, keys = plan.graph(plan.blocks)
    for b, key in keys.items():
        dsk[(plan.name, *plan.lead, *b)] = (operator.getitem, key, 0)
    return da.Array(dsk, plan.name, chunks=plan.chunks, dtype=plan.dtype)


def lazy_zarr(array):
    """A zarr array as a lazy dask array, chunk for chunk."""
    import dask.array as da

    return da.from_zarr(array)


def segment_plan(reader: Reader, predictor, grid: Grid, tiles: TileSpec, output: Output, classes: int,
                 active: np.ndarray | None = None) -> Plan:
    """The blocks of a 2-D segmentation: ``(classes, H, W)`` float32
    probabilities or ``(H, W)`` uint8 labels, one block per task.

    ``active`` (booleans per window, ``grid.n_windows``) skips windows: they
    are written as background."""
    from dask.base import tokenize

    if output.merge not in MERGE_MODES:
        raise TileError(f"unknown merge {output.merge!r}: use {' or '.join(MERGE_MODES)}")
    # id(): two in-memory arrays of one shape share the path "<array>"
    name = "tilerseg-" + tokenize(reader.path, id(reader), reader.meta.shape, id(predictor), grid, tiles, output,
                                  active)
    raw = name + "-block"
    lead = (0,) if output.probabilities else ()
    pre = (slice(None),) if output.probabilities else ()
    ky, kx = grid.block
    ny, nx = grid.n_windows

    def out(b):
        r = grid.region(*b)
        return (*pre, slice(*r.out_rows), slice(*r.out_cols))

    def count(b):
        return (min((b[0] + 1) * ky, ny) - b[0] * ky) * (min((b[1] + 1) * kx, nx) - b[1] * kx)

    def build(pending):
        if output.merge == "gaussian":
            return _blend_graph(raw, pending, reader, predictor, grid, tiles, output, classes, active)
        dsk = {(raw, *b): (_block, reader, predictor, grid, grid.region(*b), tiles, output, classes, active)
               for b in pending}
        return dsk, {b: (raw, *b) for b in pending}

    chunks = ((classes,), *grid.chunks) if output.probabilities else grid.chunks
    reach = max(1, -(-grid.halo // min(grid.block_shape)))
    wave = max(8 * reach, -(-WAVE_BLOCKS // grid.n_blocks[1])) if output.merge == "gaussian" else None
    return Plan(name, (*(classes,) * bool(lead), *grid.shape), chunks, np.float32 if output.probabilities else np.uint8,
                Blocks(grid.n_blocks, out), Blocks(grid.n_blocks, count), build, lead, total_windows=ny * nx,
                wave_rows=wave)


def _blend_graph(name, pending, reader, predictor, grid: Grid, tiles, output, classes, active) -> tuple[dict, dict]:
    """Two tasks per block: run its windows (weighted, over the output
    area grown by the halo), then sum the neighbours that reach it. A
    neighbour reaches a block when the halo spans into it, so only
    ``ceil(halo / block)`` blocks around are read; parts are freed as soon
    as their neighbours are done, keeping memory to a few block rows.
    Each part's windows are reported by the first pending block using it."""
    import math

    part = name + "-part"
    nby, nbx = grid.n_blocks
    reach = max(1, math.ceil(grid.halo / min(grid.block_shape)))
    owner: dict = {}
    near_of = {}
    for by, bx in pending:
        near_of[by, bx] = [grid.region(y, x) for y in range(max(0, by - reach), min(nby, by + reach + 1))
                           for x in range(max(0, bx - reach), min(nbx, bx + reach + 1))]
        for o in near_of[by, bx]:
            owner.setdefault(o.block, (by, bx))
    dsk = {(part, *b): (_blend_part, reader, predictor, grid, grid.region(*b), tiles, classes, active)
           for b in owner}
    keys = {}
    for b in pending:
        near = near_of[b]
        counted = tuple(i for i, o in enumerate(near) if owner[o.block] == b)
        dsk[(name, *b)] = (_blend, [(part, *o.block) for o in near], near, grid.region(*b), output, classes,
                           grid.halo, counted)
        keys[b] = (name, *b)
    return dsk, keys


def default_workers(device: str = "cpu") -> int:
    """Threads for a local run: enough to keep reading and writing ahead of
    the one model (which uses every core itself), capped to bound memory.
    A model on a GPU leaves the cores to the pipeline while one thread
    waits for the device: one thread more than the cores (at least 3), so
    that the next batch is read and the last one written meanwhile."""
    import os

    cores = os.cpu_count() or 2
    if str(device).startswith("cuda"):
        return max(3, min(8, cores + 1))
    return max(2, min(8, cores))


@contextlib.contextmanager
def local_pool(workers: int | None = None, name: str = "tilerseg"):
    """Threads for dask's threaded scheduler, ``workers`` of them (default
    :func:`default_workers`). Our own pool, so that when a task fails we
    wait for the others in flight before the caller closes the reader
    under them (a closed GDAL dataset read by a live thread segfaults)."""
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max(1, workers or default_workers()), thread_name_prefix=name)
    try:
        yield pool
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def input_pool(n: int):
    """Threads for inputs of a batch running together (each drives its own
    run on a distributed scheduler). The caller shuts the pool down; after an
    interrupt without waiting, as the runs in flight end with their client."""
    from concurrent.futures import ThreadPoolExecutor

    return ThreadPoolExecutor(max(1, n), thread_name_prefix="tilerseg-input")


def thread_map(workers: int | None = None):
    """A ``parallel(fn, items)`` running ``fn`` on ``workers`` threads, for
    the writer's chunk loops (resampling, pyramid levels); errors raise.
    Its ``imap(fn, items)`` yields the results in order as they finish, a
    few items ahead of the consumer (TIFF tiles compressed in parallel and
    written in file order), so memory stays at a few items."""
    def parallel(fn, items) -> None:
        with local_pool(workers, "tilerseg-write") as pool:
            for _ in pool.map(fn, items):
                pass

    def imap(fn, items):
        import collections

        with local_pool(workers, "tilerseg-write") as pool:
            ahead = 2 * max(1, workers or default_workers())
            pending = collections.deque()
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= ahead:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()

    parallel.imap = imap
    return parallel


def reduce_blocks(plan: "Plan", fn, *, workers: int | None = None) -> list:
    """``fn(block_result, index)`` for every block of ``plan`` as it is
    computed, on local threads, without keeping the blocks: the results of
    ``fn`` in block order (for scoring a segmentation against a mask)."""
    from dask.threaded import get

    dsk, keys = plan.graph(plan.blocks)
    order = list(plan.blocks)
    name = plan.name + "-reduce"
    for b in order:
        dsk[(name, *b)] = (fn, (_first, keys[b]), plan.blocks[b])
    with local_pool(workers, "tilerseg-eval") as pool:
        return list(get(dsk, [(name, *b) for b in order], pool=pool))


def _first(piece):
    return piece[0]


def compute_into(array, target, *, workers: int | None = None) -> None:
    """Store ``array`` into ``target`` (a zarr array; or lists of both)
    chunk by chunk, on ``workers`` local threads (for ``ingest``; runs go
    through :func:`store_plan`)."""
    import dask
    import dask.array as da

    with local_pool(workers) as pool, dask.config.set(scheduler="threads", pool=pool):
        da.store(array, target, lock=False, compute=True)


@dataclass
class StoreStats:
    """Windows of one run: all of them, run by the model now, skipped (no
    tissue or all nodata), and in blocks finished by an earlier run."""

    windows_total: int
    windows_run: int = 0
    windows_skipped: int = 0
    windows_resumed: int = 0
    blocks_resumed: int = 0
    blocks_total: int = 0


def _store(piece, target, index, marks: ChunkMarks | None, block):
    chunk, n_run, n_skipped = piece
    target[index] = chunk
    if marks is not None:
        marks.mark(block)
    return n_run, n_skipped


def store_plan(plan: Plan, target, *, workers: int | None = None, scheduler=None, marks: ChunkMarks | None = None,
               progress: Callable[[int, int], None] | None = None) -> StoreStats:
    """Compute ``plan`` into ``target`` (a zarr array of its shape) block by
    block, each task storing its own block, and marking it in ``marks``.
    Blocks already marked are not computed again. ``progress(done, total)``
    counts windows as blocks land, on local and distributed runs alike.

    Local runs use dask's threaded scheduler with ``workers`` threads: the
    model is shared and runs one batch at a time on all cores, while other
    threads read and write. With a distributed ``scheduler`` (address or
    Client) tasks run on its workers, each building the model once; a task
    whose worker dies is rerun on another by the scheduler."""
    import threading

    from dask.base import tokenize

    done = {b for b in (marks.done() if marks is not None else ()) if b in plan.blocks}
    stats = StoreStats(windows_total=plan.total_windows, windows_resumed=sum(plan.windows[b] for b in done),
                       blocks_resumed=len(done), blocks_total=len(plan.blocks))
    if done:
        log.info("resuming: %d of %d blocks (%d of %d windows) were finished by an earlier run", len(done),
                 len(plan.blocks), stats.windows_resumed, stats.windows_total)
    store = "tilerseg-store-" + tokenize(plan.name, id(target))
    lock = threading.Lock()

    def landed(result) -> None:
        with lock:
            stats.windows_run += result[0]
            stats.windows_skipped += result[1]
            n = min(stats.windows_total, stats.windows_resumed + stats.windows_run + stats.windows_skipped)
        if progress:
            progress(n, stats.windows_total)

    if progress:  # the total from the start (a bar is never "0/?"), and what an earlier run finished
        progress(stats.windows_resumed, stats.windows_total)
    for wave in plan.waves(done):  # graphs of bounded size, however large the image
        dsk, keys = plan.graph(wave)
        skeys = []
        for b in wave:
            dsk[(store, *b)] = (_store, keys[b], target, plan.blocks[b], marks, b)
            skeys.append((store, *b))
        if scheduler is None:
            _execute_local(dsk, skeys, landed, workers)
        else:
            _execute_distributed(dsk, skeys, landed, scheduler)
    return stats


def _execute_local(dsk, keys, landed, workers) -> None:
    from dask.callbacks import Callback
    from dask.threaded import get

    wanted = set(keys)

    def posttask(key, result, dsk, state, worker_id):
        if key in wanted:
            landed(result)

    with local_pool(workers) as pool, Callback(posttask=posttask):
        get(dsk, keys, pool=pool)


def _execute_distributed(dsk, keys, landed, scheduler) -> None:
    from distributed import Client, as_completed

    client = scheduler if isinstance(scheduler, Client) else Client(scheduler)
    futures = client.get(dsk, keys, sync=False)
    try:
        for fut in as_completed(futures):
            landed(fut.result())
    finally:
        client.cancel(futures)
        if client is not scheduler:
            client.close()


def warm_workers(scheduler, ref) -> None:
    """Build the predictor behind ``ref`` (see :class:`tilerseg.api.PredictorRef`)
    on every worker of a distributed ``scheduler`` now, one task per worker,
    so that model loading is done before the run's clock starts, as it is
    for a local run; a worker that joins later builds it on its first task.
    A CPU worker started without the allocator settings
    (:func:`tilerseg.allocator.started_with_env`) is warned about, once per
    worker and process. Anything but a ``distributed.Client`` is left alone."""
    try:
        from distributed import Client
    except ImportError:  # pragma: no cover - a dependency
        return
    if not isinstance(scheduler, Client):
        return
    workers = list(scheduler.scheduler_info().get("workers", {}))
    futures = [scheduler.submit(_warm, ref, workers=[w], allow_other_workers=False, pure=False) for w in workers]
    scheduler.gather(futures, errors="skip")  # a worker lost meanwhile builds nothing: not an error
    slow = [w for w, f in zip(workers, futures) if f.status == "finished" and f.result() is False and w not in _WARNED]
    if slow:
        from .allocator import worker_env_advice

        _WARNED.update(slow)
        log.warning("%d of %d dask workers were started without tilerseg's allocator settings: their model runs "
                    "up to 1.5x slower (activations faulted in afresh at every layer); %s", len(slow), len(workers),
                    worker_env_advice())


_WARNED: set[str] = set()  # workers already warned about


def _warm(ref) -> bool:
    """Build the model; whether this worker's allocator can keep its
    activations (always true for a GPU model, whose activations are not in it)."""
    from .allocator import started_with_env

    ref.get()
    return not str(ref.device).startswith("cpu") or started_with_env()


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


def _volume_window(reader, predictor, grid, index, pad_mode: str, output: Output, classes: int):
    if hasattr(predictor, "get"):
        predictor = predictor.get()
    read, out = grid.window(index)
    data = read_padded3(reader, read, pad_mode)
    probs = predictor(data[None])[0]
    if probs.shape[0] != classes:
        raise TileError(f"the model gives {probs.shape[0]} classes, {classes} were expected")
    (hz, hy, hx), sizes = grid.halo, [b - a for a, b in out]
    probs = probs[:, hz:hz + sizes[0], hy:hy + sizes[1], hx:hx + sizes[2]]
    return _finish(np.ascontiguousarray(probs), None, output), 1, 0


def volume_plan(reader, predictor, grid, output: Output, classes: int, pad_mode: str = "reflect") -> Plan:
    """The 3-D counterpart of :func:`segment_plan`: one block per window of
    ``grid`` (a :class:`~tilerseg.geometry.Grid3`), each reading its
    mirror-padded window, running the model and keeping its centre crop:
    ``(classes, Z, H, W)`` probabilities or ``(Z, H, W)`` labels."""
    from dask.base import tokenize

    if output.merge != "crop":
        raise TileError("volumes are merged by crop only (3-D models here are local, so crops are exact)")
    name = "tilerseg-vol-" + tokenize(reader.path, id(reader), reader.meta.shape, id(predictor), grid, output,
                                      pad_mode)
    raw = name + "-block"
    lead = (0,) if output.probabilities else ()
    pre = (slice(None),) if output.probabilities else ()
    blocks = Blocks(grid.n_windows, lambda w: (*pre, *(slice(a, b) for a, b in grid.window(w)[1])))

    def build(pending):
        dsk = {(raw, *w): (_volume_window, reader, predictor, grid, w, pad_mode, output, classes) for w in pending}
        return dsk, {w: (raw, *w) for w in pending}

    chunks = ((classes,), *grid.chunks) if output.probabilities else grid.chunks
    return Plan(name, (*(classes,) * bool(lead), *grid.shape), chunks, np.float32 if output.probabilities else np.uint8,
                blocks, Blocks(grid.n_windows, lambda w: 1), build, lead, total_windows=grid.total_windows)
