"""Objects, not only pixels: instance labels that do not depend on the tiling.

Touching nuclei (or buildings) are one blob in a semantic mask. This
post-pass splits the foreground of the run's probabilities into objects and
numbers them, out of core, block by block, so that the result is the same
label image, ids included, whatever the blocks.

Why the blocks cannot change it (the argument for pixels is in
:mod:`tilerseg.geometry`; this builds on it):

1. The probabilities are seam-exact, so the foreground (a threshold, or the
   argmax) is the whole-image foreground, pixel by pixel.
2. A foreground *component* (4-connected) is a global object: each block
   labels its own pieces, and pieces that touch across a block face are
   joined by a union-find over the face pairs (only the faces travel; as
   dask-image's ``ndmeasure.label`` does). The result is the whole image's
   components.
3. Each component is split once, on its own bounding box (:func:`split`):
   a distance transform of the component alone, markers from its peaks and
   each pixel given to the marker of least distance over radius
   (:func:`_radius_split`; or h-maxima markers and a watershed with
   ``depth``; or, for a model with a boundary class, its interior pieces as
   markers). The input is the component's mask and probabilities in its
   box, which do not depend on the blocks, the box is the same crop of the
   image in any run, and every tie is broken in the component's raster
   order, so the objects are the same. A component that crosses blocks is
   painted into each block it touches from that one result.
4. Ids are given last, in raster order of each object's first pixel, over
   the whole image: a total order that no tiling changes.

A component whose box exceeds ``max_side``² px is refused, not cut: cutting
it would make the result depend on the cut.

Memory: one block of probabilities at a time, the faces, a few numbers per
component and per object (first pixel, area, centroid, mean probability),
and the labels of the components that cross blocks (each split once, kept
until painted, a byte a pixel of their boxes); never the label image.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from .config import MAX_OBJECT_SIDE
from .errors import InputError
from .splitting import split

log = logging.getLogger(__name__)
MAX_ID = 2 ** 32 - 1  # uint32 labels: 0 is background


@dataclass(frozen=True)
class InstanceOptions:
    """How the foreground is split into objects.

    ``threshold``: P(foreground) of a binary model. ``reach`` (the
    default split, :func:`tilerseg.splitting._radius_split`): a peak of
    the distance transform closer to a higher peak than ``reach`` x that
    peak's radius is the same object; lower splits more. The rule scales
    with each object (no object size to give), which a fixed minimum
    distance or depth cannot: on dense nuclei of radii 6-30 px it scores F1
    0.955 where a fixed h-maxima depth scored 0.77
    (``scripts/bench_instances.py --fixtures``). ``depth`` (px): instead,
    h-maxima of that depth of the distance transform as markers and a
    watershed of it: two touching round objects are split when the neck
    between them is at least this much narrower than either (with
    ``markers``, default 1.5). ``boundary_class``: the index of a class
    that marks boundaries (a 3-class background / interior / boundary
    model): its interior pieces are then the markers. ``min_area``: objects
    smaller than this many px are dropped (merged into background).
    ``max_side``: components whose bounding box is wider or taller are
    refused (at most :data:`MAX_SIDE`).

    ``markers``: a membrane map's cells (ISBI 2012): the markers are the
    h-maxima (``depth``) of the distance transform of the pixels where
    P(foreground) >= ``markers`` (the cells' sure interiors), and the
    watershed floods the boundary probability 1 - P from them, so a gap in
    a membrane closes where the evidence for membrane is highest; touching
    objects are then parted by a one-pixel line of background, so that the
    4-connected components of the foreground are the objects (the
    challenge's convention). ``None``: the distance-transform split
    above. ``join`` (with ``markers``): before parting, neighbouring
    objects whose shared boundary has a mean boundary probability under
    this are joined, weakest first (the markers over-split a cell whose
    interior has dim patches; its pieces share no membrane)."""

    threshold: float = 0.5
    depth: float | None = None
    reach: float = 1.15
    boundary_class: int | None = None
    min_area: int = 0
    max_side: int = 4096
    markers: float | None = None
    join: float | None = None


def foreground(probs: np.ndarray, opts: InstanceOptions) -> tuple[np.ndarray, np.ndarray]:
    """``(mask, classes)`` of probabilities ``(C, h, w)`` (NaN = nodata):
    the foreground, and each pixel's class (argmax; 1 for a binary model)."""
    with np.errstate(invalid="ignore"):
        if probs.shape[0] == 1:
            p = probs[0]
            mask = p >= opts.threshold
            return mask, mask.astype(np.uint8)
        valid = ~np.isnan(probs).any(0)
        cls = np.where(valid, np.nan_to_num(probs).argmax(0), 0).astype(np.uint8)
    return cls > 0, cls


def foreground_probability(probs: np.ndarray) -> np.ndarray:
    """P(foreground) of probabilities ``(C, h, w)``: the binary model's
    channel, else 1 - P(class 0); NaN (nodata) is 0."""
    p = probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]
    return np.nan_to_num(p.astype(np.float32, copy=False), nan=0.0)


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components (the objects' connectivity everywhere)."""
    from scipy import ndimage

    return ndimage.label(mask)


MAX_SIDE = MAX_OBJECT_SIDE  # --max-object's ceiling: the flood keys of tilerseg.splitting stay exact in float64


@dataclass
class _Block:
    """What phase 1 learns of one block: its pieces' boxes and first pixels,
    and the labels on its four faces."""

    n: int
    boxes: np.ndarray   # (n, 4) r0, r1, c0, c1 (global)
    first: np.ndarray   # (n,) global raster index of each piece's first pixel
    faces: dict


def _read(probs, r0, r1, c0, c1) -> np.ndarray:
    return np.asarray(probs[:, r0:r1, c0:c1], np.float32)


def _pieces(probs, opts: InstanceOptions, W: int, box) -> _Block:
    """Phase 1: a block's foreground pieces."""
    from scipy import ndimage

    r0, r1, c0, c1 = box
    mask, _ = foreground(_read(probs, r0, r1, c0, c1), opts)
    lab, n = components(mask)
    slices = ndimage.find_objects(lab)
    boxes = np.array([[s[0].start + r0, s[0].stop + r0, s[1].start + c0, s[1].stop + c0] for s in slices],
                     np.int64).reshape(-1, 4)
    first = np.zeros(n, np.int64)
    values, idx = np.unique(lab.ravel(), return_index=True)
    rows, cols = np.divmod(idx[values > 0], lab.shape[1])
    first[values[values > 0] - 1] = (rows + r0) * W + cols + c0
    faces = {"top": lab[0].copy(), "bottom": lab[-1].copy(), "left": lab[:, 0].copy(), "right": lab[:, -1].copy()}
    return _Block(n, boxes, first, faces)


def _link(blocks: dict) -> tuple[dict, np.ndarray]:
    """Phase 2, the union-find over the face pairs: the global component of
    every piece (scipy's connected components of the pair graph), and each
    block's offset into the piece numbering."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    offsets, total = {}, 0
    for b in sorted(blocks):
        offsets[b] = total
        total += blocks[b].n
    pairs = [np.zeros((0, 2), np.int64)]
    for (i, j), blk in blocks.items():
        for other, mine, theirs in (((i + 1, j), "bottom", "top"), ((i, j + 1), "right", "left")):
            if other not in blocks:
                continue
            a, b = blk.faces[mine], blocks[other].faces[theirs]
            on = (a > 0) & (b > 0)
            pairs.append(np.stack([a[on] - 1 + offsets[i, j], b[on] - 1 + offsets[other]], 1))
    edges = np.unique(np.concatenate(pairs), axis=0)
    graph = coo_matrix((np.ones(len(edges), np.int8), (edges[:, 0], edges[:, 1])), shape=(total, total))
    return offsets, connected_components(graph, directed=False)[1]


@dataclass
class _Components:
    """The global components: box, first pixel, and whether the box lies in one block."""

    box: np.ndarray
    first: np.ndarray
    inside: np.ndarray
    owner: np.ndarray  # (n, 2) the block of the first pixel


def _components(blocks: dict, offsets: dict, comp: np.ndarray, shape, chunks) -> _Components:
    (H, W), (ch, cw) = shape, chunks
    n = int(comp.max()) + 1 if len(comp) else 0
    box = np.stack([np.full(n, H), np.zeros(n, np.int64), np.full(n, W), np.zeros(n, np.int64)], 1).astype(np.int64)
    first = np.full(n, H * W, np.int64)
    for k, blk in blocks.items():
        if blk.n:
            c = comp[offsets[k]:offsets[k] + blk.n]
            for col, fn in ((0, np.minimum), (1, np.maximum), (2, np.minimum), (3, np.maximum)):
                fn.at(box[:, col], c, blk.boxes[:, col])
            np.minimum.at(first, c, blk.first)
    inside = (box[:, 0] // ch == (box[:, 1] - 1) // ch) & (box[:, 2] // cw == (box[:, 3] - 1) // cw)
    owner = np.stack([first // W // ch, first % W // cw], 1)
    return _Components(box, first, inside, owner)


def label(probs, out, opts: InstanceOptions, *, imap=map) -> dict:
    """Write the instance labels of ``probs`` (a zarr array (C, H, W) of
    probabilities, NaN = nodata) into ``out`` (uint32 (H, W)), block by
    block of ``out``'s chunks (``imap(fn, items)``: the engine's threads).

    Phase 1 finds each block's pieces, phase 2 joins them into components,
    phase 3 splits and counts the objects (components inside a block with
    the block, the others on their own box, by the block of their first
    pixel), phase 4 numbers them over the whole image and paints each
    block. Returns the object table: numpy columns in id order (see
    :func:`_stats`)."""
    import time

    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    H, W = out.shape
    ch, cw = out.chunks
    boxes = {(i, j): (r, min(r + ch, H), c, min(c + cw, W))
             for i, r in enumerate(range(0, H, ch)) for j, c in enumerate(range(0, W, cw))}
    keys = list(boxes)
    blocks = dict(zip(keys, imap(lambda k: _pieces(probs, opts, W, boxes[k]), keys)))
    t_pieces = lap()
    offsets, comp = _link(blocks)
    cs = _components(blocks, offsets, comp, (H, W), (ch, cw))
    _check_sizes(cs.box, opts)
    t_link = lap()

    def objects(k):  # phase 3: local labels of the components inside block k into out; stats of its objects
        r0, r1, c0, c1 = boxes[k]
        mine = comp[offsets[k]:offsets[k] + blocks[k].n] if blocks[k].n else np.zeros(0, np.int64)
        inside = np.unique(mine[cs.inside[mine]]) if len(mine) else mine
        p = _read(probs, r0, r1, c0, c1)
        mask, cls = foreground(p, opts)
        lab, _ = components(mask)
        keep = np.zeros(blocks[k].n + 1, bool)
        keep[1:] = cs.inside[mine] if len(mine) else keep[1:]
        local = split(keep[lab], cls, opts, foreground_probability(p))
        out[r0:r1, c0:c1] = local.astype(np.uint32)
        found = [_stats(local, p, cls, r0, c0, W, opts)] if local.max() else []
        crossing = [c for c in np.flatnonzero((cs.owner[:, 0] == k[0]) & (cs.owner[:, 1] == k[1]))
                    if not cs.inside[c]]
        for c in crossing:
            lab_c, p_c, cls_c = _crossing(probs, opts, cs, c, W)
            _keep_pieces(cache, lab_c, cs.box[c], c, (ch, cw))
            if lab_c.max():
                found.append(_stats(lab_c, p_c, cls_c, int(cs.box[c, 0]), int(cs.box[c, 2]), W, opts,
                                    component=c))
        return len(inside), found

    cache: dict = {}  # block -> [(component, row, col, labels)]: crossing components' pieces, until painted
    counted = dict(zip(keys, imap(objects, keys)))
    t_split = lap()
    table = _number([f for _, found in counted.values() for f in found])
    ids_of = _ids_by_component(table)
    t_number = lap()

    def paint(k):  # phase 4: final ids
        r0, r1, c0, c1 = boxes[k]
        local = np.asarray(out[r0:r1, c0:c1])
        lut = _block_lut(table, k, (ch, cw), W, local)
        block = lut[local]
        for c, y0, x0, piece in cache.pop(k, ()):  # the crossing components' objects, split once in phase 3
            ids = np.concatenate([[0], ids_of.get(int(c), np.zeros(0, np.int64))]).astype(np.uint32)
            on = piece > 0
            block[y0 - r0:y0 - r0 + piece.shape[0], x0 - c0:x0 - c0 + piece.shape[1]][on] = ids[piece[on]]
        out[r0:r1, c0:c1] = block

    for _ in imap(paint, keys):
        pass
    t_paint = lap()
    table["seconds"] = {"pieces": t_pieces, "link": t_link, "split": t_split, "number": t_number,
                        "paint": t_paint}
    log.info("instances: %d components (%d crossing blocks), %d objects; %.1f s: pieces %.1f, merge (union-find "
             "and numbering) %.2f, split %.1f, paint %.1f", len(cs.first), int((~cs.inside).sum()),
             len(table["id"]), clock[-1] - clock[0], t_pieces, t_link + t_number, t_split, t_paint)
    return table


def label_array(probs: np.ndarray, opts: InstanceOptions, chunk: int = 1024) -> np.ndarray:
    """:func:`label` of an in-memory probability array ``(C, H, W)`` (in
    blocks of ``chunk`` px, through an in-memory zarr array, so that it is
    the same code as a run's): the uint32 labels ``(H, W)``."""
    import zarr

    probs = np.asarray(probs, np.float32)
    out = zarr.open_array(zarr.storage.MemoryStore(), mode="w", shape=probs.shape[1:],
                          chunks=(min(chunk, probs.shape[1]), min(chunk, probs.shape[2])), dtype=np.uint32,
                          fill_value=0)
    label(probs, out, opts)
    return out[:]


def _check_sizes(box: np.ndarray, opts: InstanceOptions) -> None:
    """Refuse a component whose box is wider or taller than ``max_side``."""
    if not len(box):
        return
    h, w = box[:, 1] - box[:, 0], box[:, 3] - box[:, 2]
    big = np.flatnonzero(np.maximum(h, w) > opts.max_side)
    if len(big):
        i = big[np.argmax(np.maximum(h, w)[big])]
        r0, r1, c0, c1 = (int(v) for v in box[i])
        raise InputError(f"--instances: a foreground region of {c1 - c0}x{r1 - r0} px (rows {r0}:{r1}, cols "
                         f"{c0}:{c1}) is larger than --max-object {opts.max_side} px a side; it would have to be "
                         "cut, which makes objects depend on the tiling: raise --max-object (at most "
                         f"{MAX_SIDE}), or check the threshold and the model on that region")


def _keep_pieces(cache: dict, lab: np.ndarray, box, c: int, chunks) -> None:
    """Keep the labels ``lab`` of crossing component ``c`` (its box ``box``),
    cut by block, in ``cache[block]`` for the paint phase, so each component
    is split once, not once per block it touches (at ``--tile 256`` the
    repeated splits were 80% of the pass). Kept in the smallest integer
    type that holds them: memory is the crossing components' boxes, a byte
    a pixel for fewer than 256 objects."""
    (ch, cw), (r0, r1, c0, c1) = chunks, (int(v) for v in box)
    lab = lab.astype(np.min_scalar_type(int(lab.max())))
    for i in range(r0 // ch, (r1 - 1) // ch + 1):
        for j in range(c0 // cw, (c1 - 1) // cw + 1):
            y0, y1, x0, x1 = max(r0, i * ch), min(r1, (i + 1) * ch), max(c0, j * cw), min(c1, (j + 1) * cw)
            piece = lab[y0 - r0:y1 - r0, x0 - c0:x1 - c0]
            if piece.any():
                cache.setdefault((i, j), []).append((c, y0, x0, piece.copy()))  # dict and list ops: atomic


def _crossing(probs, opts, cs: _Components, c: int, W: int):
    """A component that crosses blocks, split on its own box: its labels
    (raster order in the box, which is the image's raster order among its
    objects), probabilities and classes."""
    r0, r1, c0, c1 = (int(v) for v in cs.box[c])
    p = _read(probs, r0, r1, c0, c1)
    mask, cls = foreground(p, opts)
    lab, _ = components(mask)
    fr, fc = divmod(int(cs.first[c]), W)
    return split(lab == lab[fr - r0, fc - c0], cls, opts, foreground_probability(p)), p, cls


def _stats(lab: np.ndarray, p: np.ndarray, cls: np.ndarray, r0: int, c0: int, W: int, opts: InstanceOptions,
           component: int = -1) -> dict:
    """Per object of ``lab`` (1..k, a box at ``(r0, c0)``): first pixel
    (global raster index), area (px), centroid ``row``/``col`` (px, pixel
    centres), ``probability`` (mean P of its class), ``class`` (its pixels'
    most common class; the boundary class only if it has nothing else),
    ``top``/``bottom`` rows."""
    k = int(lab.max())
    flat = lab.ravel()
    values, idx = np.unique(flat, return_index=True)
    idx = idx[values > 0]
    on = flat > 0
    rows, cols = np.divmod(np.flatnonzero(on), lab.shape[1])
    obj = flat[on]
    area = np.bincount(obj, minlength=k + 1)[1:]
    if p.shape[0] == 1:
        klass = np.ones(k, np.int64)
        pk = np.nan_to_num(p[0]).ravel()[on]
    else:
        votes = np.zeros((k + 1, p.shape[0]), np.int64)
        np.add.at(votes, (obj, cls.ravel()[on]), 1)
        votes[:, 0] = 0
        if opts.boundary_class is not None and p.shape[0] > 2:
            tally = votes.copy()
            tally[:, opts.boundary_class] = 0
            votes = np.where(tally[:, 1:].sum(1, keepdims=True) > 0, tally, votes)
        klass = votes[1:].argmax(1)
        pk = np.nan_to_num(p).reshape(p.shape[0], -1)[:, on][klass[obj - 1], np.arange(len(obj))]
    bottom = np.zeros(k + 1, np.int64)
    np.maximum.at(bottom, obj, rows)
    fr, fc = np.divmod(idx, lab.shape[1])
    return {"first": (fr + r0) * W + fc + c0, "area": area,
            "row": np.bincount(obj, rows + r0, minlength=k + 1)[1:] / area,  # global sums: exact, so the same in
            "col": np.bincount(obj, cols + c0, minlength=k + 1)[1:] / area,  # any crop
            "probability": np.bincount(obj, pk, minlength=k + 1)[1:] / area,
            "class": klass.astype(np.int64), "top": fr + r0, "bottom": bottom[1:] + r0,
            "component": np.full(k, component, np.int64)}


COLUMNS = ("first", "area", "row", "col", "probability", "class", "top", "bottom", "component")


def _number(found: list) -> dict:
    """Ids 1..N in raster order of the objects' first pixels, over the
    whole image: the table's columns in id order."""
    n = sum(len(f["first"]) for f in found)
    if n > MAX_ID:
        raise InputError(f"--instances: {n:,} objects do not fit uint32 labels (at most {MAX_ID:,}); split the "
                         "image, or raise --min-area")
    cols = {k: np.concatenate([f[k] for f in found]) if found else np.zeros(0, np.int64) for k in COLUMNS}
    order = np.argsort(cols["first"], kind="stable")
    table = {k: v[order] for k, v in cols.items()}
    table["id"] = np.arange(1, n + 1, dtype=np.int64)
    return table


def _ids_by_component(table: dict) -> dict:
    """The ids of each crossing component's objects, in raster order."""
    crossing = table["component"] >= 0
    comps, ids = table["component"][crossing], table["id"][crossing]
    order = np.argsort(comps, kind="stable")  # ids ascend within a component: raster order kept
    comps, ids = comps[order], ids[order]
    bounds = np.flatnonzero(np.diff(comps)) + 1
    return {int(c[0]): i for c, i in zip(np.split(comps, bounds), np.split(ids, bounds)) if len(c)}


def _block_lut(table: dict, k, chunks, W: int, local: np.ndarray) -> np.ndarray:
    """Local label (raster order in block ``k``) -> global id, for the
    objects of the components inside the block."""
    ch, cw = chunks
    first = table["first"]
    mine = (table["component"] < 0) & (first // W // ch == k[0]) & (first % W // cw == k[1])
    ids = table["id"][mine]  # ascending first pixel: the block's raster order
    lut = np.zeros(int(local.max()) + 1 if local.size else 1, np.uint32)
    lut[1:len(ids) + 1] = ids
    return lut
