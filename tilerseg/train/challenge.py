"""The ISBI 2012 EM segmentation challenge's metrics, beside the pixel error
of :mod:`tilerseg.train.metrics`: the foreground-restricted adapted Rand
error, the variation of information (split and merge) and the warping error.

They judge a boundary map by the objects it separates, not by its pixels: a
one-pixel gap in a membrane costs almost nothing in pixel error but merges
two cells. The convention is the challenge's: the label's class 0 (the
membrane in ``pipelines/em-membranes.yaml``) is the boundary, and the objects
are the 4-connected components of class 1 (the cell interiors), in the truth
and in the thresholded prediction alike. The Rand error and the variation of
information are restricted to the truth's objects (membrane pixels of the
truth are not counted; each membrane pixel of the prediction is a segment
of its own), as in Arganda-Carreras et al., "Crowdsourcing the creation of
image segmentation algorithms for connectomics", Front. Neuroanat. 9 (2015),
and the Fiji code that scored the challenge (``RandError`` and
``VariationOfInformation`` of Trainable Segmentation, ``foregroundRestricted
StatsN2`` / ``foregroundRestrictedVI``: the prediction's zero component is
"pruned" into singletons, ``sum(p_i0)/n`` added back).
The warping error warps the truth's membranes toward the prediction's.

These need the whole image (objects span blocks), so :mod:`.evaluate` only
computes them for 2-D images up to :data:`MAX_PIXELS`."""
from __future__ import annotations

import functools

import numpy as np

MAX_PIXELS = 4096 * 4096  # whole-image metrics above this size are skipped (they hold a few copies of the image)
_OFFSETS = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))  # bit i of a 3x3 code


def objects(binary: np.ndarray) -> np.ndarray:
    """Label image of the 4-connected components of ``binary`` (0 = boundary)."""
    from scipy import ndimage

    return ndimage.label(np.asarray(binary, bool))[0]


def rand_and_vi(truth: np.ndarray, pred: np.ndarray, keep: np.ndarray | None = None) -> dict:
    """Foreground-restricted adapted Rand error and variation of information
    of binary maps (``True`` = object, ``False`` = boundary).

    ``skimage.metrics.adapted_rand_error`` and ``variation_of_information``
    on the objects' labels, ignoring the truth's boundary (label 0) and the
    pixels outside ``keep``; each boundary pixel of the prediction on the
    truth's objects is a segment of its own, as the challenge's Fiji code
    counts it (the same up to skimage's pairs without repetition, n(n-1)
    where Fiji's normalisation is n^2). So a membrane drawn wider than the
    truth's costs its pixels, not a merger of every cell it touches.
    ``vi_split`` is H(prediction | truth) (objects cut in pieces),
    ``vi_merge`` H(truth | prediction) (objects fused)."""
    from skimage.metrics import adapted_rand_error, variation_of_information

    t, p = objects(truth), objects(pred).astype(np.int64)
    if keep is not None:
        t = np.where(keep, t, 0)
    alone = (p == 0) & (t > 0)
    p[alone] = p.max() + 1 + np.arange(int(alone.sum()))
    if not t.any():
        return {"adapted_rand_error": float("nan"), "rand_precision": float("nan"),
                "rand_recall": float("nan"), "vi_split": float("nan"), "vi_merge": float("nan")}
    are, prec, rec = adapted_rand_error(t, p, ignore_labels=(0,))
    split, merge = variation_of_information(t, p, ignore_labels=(0,))
    return {"adapted_rand_error": float(are), "rand_precision": float(prec), "rand_recall": float(rec),
            "vi_split": float(split), "vi_merge": float(merge)}


@functools.lru_cache(maxsize=1)
def simple_table() -> np.ndarray:
    """``table[code]``: is the centre of a 3x3 patch a simple point, for
    every 8-neighbourhood ``code`` (bit i set = neighbour i of
    :data:`_OFFSETS` is an object pixel)? Objects are 4-connected, the
    boundary 8-connected: the centre is simple when exactly one 4-connected
    object component of the neighbourhood touches it by an edge and exactly
    one 8-connected boundary component lies in the neighbourhood (the
    topological numbers T4 = T8bar = 1 of Bertrand and Malandain, Pattern
    Recogn. Lett. 15, 1994). Flipping a simple point changes no topology."""
    from scipy import ndimage

    table = np.zeros(256, bool)
    four = ndimage.generate_binary_structure(2, 1)
    for code in range(256):
        patch = np.zeros((3, 3), bool)
        for bit, (dy, dx) in enumerate(_OFFSETS):
            patch[1 + dy, 1 + dx] = bool(code >> bit & 1)
        lab, _ = ndimage.label(patch, four)
        t4 = len({lab[1 + dy, 1 + dx] for dy, dx in ((-1, 0), (0, -1), (0, 1), (1, 0))} - {0})
        bg = ~patch
        bg[1, 1] = False
        t8 = ndimage.label(bg, np.ones((3, 3), bool))[1]
        table[code] = t4 == 1 and t8 == 1
    return table


def warp(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5, keep: np.ndarray | None = None) -> np.ndarray:
    """Warp the binary ``truth`` toward the thresholded prediction
    ``prob >= threshold`` by flipping only simple points (see
    :func:`simple_table`), so the warped truth keeps the truth's topology
    while coming as close to the prediction as that allows.

    As Jain et al. (2010) describe and the challenge's Fiji script did: every
    pass visits the pixels where the two disagree, the prediction's most
    confident first (largest ``|prob - threshold|``), and flips each one that
    is simple at that moment; passes repeat until one changes nothing. The
    image is framed by boundary; pixels outside ``keep`` never flip."""
    truth = np.asarray(truth, bool)
    prob = np.asarray(prob, np.float32)
    h, w = truth.shape
    width = w + 2
    src = np.zeros((h + 2, width), np.uint8)
    src[1:-1, 1:-1] = truth
    target = np.zeros_like(src)
    target[1:-1, 1:-1] = prob >= threshold
    allowed = np.zeros(src.shape, bool)
    allowed[1:-1, 1:-1] = True if keep is None else np.asarray(keep, bool)
    conf = np.zeros(src.shape, np.float32)
    conf[1:-1, 1:-1] = np.abs(prob - threshold)
    flat_src = bytearray(src.ravel().tobytes())
    flat_target = target.ravel()
    table = simple_table().tolist()
    offsets = [dy * width + dx for dy, dx in _OFFSETS]
    before = -1
    while True:
        cur = np.frombuffer(bytes(flat_src), np.uint8)
        wrong = np.flatnonzero((cur != flat_target) & allowed.ravel())
        if wrong.size == 0 or wrong.size == before:
            break
        before = wrong.size
        # most confident first; ties column by column, as the Fiji script visits them
        wrong = wrong[np.lexsort((wrong // width, wrong % width, -conf.ravel()[wrong]))]
        for i in wrong.tolist():
            code = 0
            for bit, off in enumerate(offsets):
                code |= flat_src[i + off] << bit
            if table[code]:
                flat_src[i] ^= 1
    return np.frombuffer(bytes(flat_src), np.uint8).reshape(src.shape)[1:-1, 1:-1].astype(bool)


def warping_error(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5, keep: np.ndarray | None = None) -> dict:
    """The warping error of Jain et al., "Boundary learning by optimization
    with topological constraints", CVPR 2010, as the ISBI 2012 challenge
    computed it: the share of pixels where the truth, warped toward the
    prediction by :func:`warp`, still differs from the thresholded
    prediction. Boundary shifts cost nothing; what is left are topological
    errors, which are also counted as events (each connected group of left
    pixels once):

    - ``splits``: extra pieces a truth object is cut into;
    - ``mergers``: truth objects fused into another;
    - ``object_additions`` / ``object_deletions``: objects the prediction
      invents or loses whole; other left pixels open or close holes.

    ``truth`` is binary (``True`` = object), ``prob`` the probability of
    the object class; pixels outside ``keep`` are neither warped nor
    counted."""
    truth = np.asarray(truth, bool)
    pred = np.asarray(prob) >= threshold
    warped = warp(truth, prob, threshold, keep)
    counted = np.ones(truth.shape, bool) if keep is None else np.asarray(keep, bool)
    left = (warped != pred) & counted
    events = _events(warped, pred & ~warped & counted, warped & ~pred & counted)
    n = int(counted.sum())
    return {"warping_error": float(left.sum() / n) if n else float("nan"), "warping_pixels": int(left.sum()),
            **events}


def _events(warped: np.ndarray, added: np.ndarray, removed: np.ndarray) -> dict:
    """Mergers and additions from the object pixels the prediction adds to
    the warped truth, splits and deletions from those it removes."""
    base = objects(warped)
    nb = int(base.max())
    grown = objects(warped | added)
    pairs = np.unique(np.stack([grown[grown > 0], base[grown > 0]]), axis=1)
    inside = np.bincount(pairs[0][pairs[1] > 0], minlength=int(grown.max()) + 1)[1:]
    cut = objects(warped & ~removed)
    pairs = np.unique(np.stack([base[cut > 0], cut[cut > 0]]), axis=1)
    pieces = np.bincount(pairs[0], minlength=nb + 1)[1:]
    return {"splits": int(np.maximum(pieces - 1, 0).sum()), "mergers": int(np.maximum(inside - 1, 0).sum()),
            "object_additions": int((inside == 0).sum()), "object_deletions": int((pieces == 0).sum())}


def challenge_scores(truth: np.ndarray, prob: np.ndarray, threshold: float = 0.5,
                     keep: np.ndarray | None = None) -> dict:
    """All the challenge's scores of one 2-D image: ``truth`` binary
    (``True`` = object class), ``prob`` the object class's probability."""
    truth = np.asarray(truth, bool)
    pred = np.asarray(prob) >= threshold
    return {**rand_and_vi(truth, pred, keep), **warping_error(truth, prob, threshold, keep)}


def segmentation_scores(truth: np.ndarray, cells: np.ndarray, prob: np.ndarray, threshold: float = 0.5,
                        keep: np.ndarray | None = None) -> dict:
    """The challenge's scores of a post-processed segmentation: ``cells``
    binary (``True`` = an object's pixel, ``False`` = boundary, e.g. the
    instance labels > 0 of :func:`tilerseg.instances.label`), ``prob`` the
    probability it was made from. The warping visits pixels in the order of
    the probability's confidence, as for the plain threshold, on the map
    :func:`decided` gives, whose threshold is exactly ``cells``."""
    return challenge_scores(truth, decided(cells, prob, threshold), threshold, keep)


def decided(cells: np.ndarray, prob: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A probability-like map that is ``>= threshold`` exactly on ``cells``
    and as far from the threshold as ``prob`` is (float32, as
    :func:`warp` compares)."""
    th = np.float32(threshold)
    d = np.abs(np.asarray(prob, np.float32) - th)
    below = np.minimum(th - d, np.nextafter(th, np.float32(-1)))
    return np.where(np.asarray(cells, bool), th + d, below).astype(np.float32)
