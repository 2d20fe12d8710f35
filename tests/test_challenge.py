"""The ISBI challenge's metrics on hand-made images whose answers are known.

Two cells left and right of a vertical membrane (class 0, three pixels
wide). Oracles: warping error 0 for any shift of the membrane that keeps
the cells apart; the minimal separator or bridge left by a merger or a split
(one pixel per row of a gap, one per row of a cut); skimage's own scores."""
from __future__ import annotations

import numpy as np
import pytest

from tilerseg.train.challenge import challenge_scores, rand_and_vi, simple_table, warp, warping_error

N = 40


def _cells():
    truth = np.ones((N, N), bool)
    truth[:, 18:21] = False
    return truth


def test_boundary_shifts_cost_nothing_in_warping_but_do_in_pixels():
    truth = _cells()
    pred = np.ones((N, N), np.float32)
    pred[:, 20:24] = 0  # moved two pixels right and one pixel thicker
    w = warping_error(truth, pred)
    assert w["warping_error"] == 0 and w["warping_pixels"] == 0
    assert (w["splits"], w["mergers"], w["object_additions"], w["object_deletions"]) == (0, 0, 0, 0)
    assert np.array_equal(warp(truth, pred), pred >= 0.5)  # the truth can reach the prediction
    assert ((pred >= 0.5) != truth).mean() > 0.05  # while the pixel error is not small
    assert rand_and_vi(truth, pred >= 0.5)["rand_recall"] == pytest.approx(1.0)  # same two cells


@pytest.mark.parametrize("rows", [1, 3, 5])
def test_a_gap_in_a_membrane_is_one_merger_and_one_separator_pixel_per_row(rows):
    truth = _cells()
    pred = truth.astype(np.float32)
    pred[10:10 + rows, 18:21] = 1.0
    w = warping_error(truth, pred)
    assert w["mergers"] == 1 and w["splits"] == 0
    assert w["warping_pixels"] == rows and w["warping_error"] == pytest.approx(rows / N ** 2)


@pytest.mark.parametrize("thick", [1, 2, 4])
def test_a_cut_through_a_cell_is_one_split_and_a_one_pixel_bridge_per_row(thick):
    truth = _cells()
    pred = truth.astype(np.float32)
    pred[25:25 + thick, :18] = 0.0
    w = warping_error(truth, pred)
    assert w["splits"] == 1 and w["mergers"] == 0
    assert w["warping_pixels"] == thick


def test_lost_and_invented_objects():
    truth = _cells()
    truth[5:9, 5:9] = False  # a membrane ring around a small cell
    truth[6:8, 6:8] = True
    pred = truth.astype(np.float32)
    pred[6:8, 6:8] = 0.0  # the small cell is lost: peeled down to its last pixel
    w = warping_error(truth, pred)
    assert (w["object_deletions"], w["warping_pixels"]) == (1, 1)
    pred = _cells().astype(np.float32)
    pred[30:32, 19] = 1.0  # a two-pixel cell inside the membrane: no truth object can grow into it
    w = warping_error(_cells(), pred)
    assert (w["object_additions"], w["warping_pixels"], w["mergers"]) == (1, 2, 0)


def test_ignored_pixels_neither_warp_nor_count():
    truth = _cells()
    pred = truth.astype(np.float32)
    pred[10:13, 18:21] = 1.0
    keep = np.ones((N, N), bool)
    keep[8:15, 15:24] = False
    w = warping_error(truth, pred, keep=keep)
    assert w["warping_pixels"] == 0 and w["warping_error"] == 0


def test_simple_points_are_the_topology_preserving_flips():
    t = simple_table()
    bits = lambda *idx: sum(1 << i for i in idx)  # neighbour order: NW N NE W E SW S SE
    assert not t[0]                      # an isolated pixel: deleting it deletes an object
    assert not t[255]                    # an interior pixel: deleting it opens a hole
    assert t[bits(1)]                    # the end of a line
    assert not t[bits(1, 6)]             # the middle of a vertical line: removal splits
    assert t[bits(0, 1, 2)]              # the edge of a block
    assert not t[bits(0)]                # only a diagonal object neighbour: objects are 4-connected


def _fiji(t: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Adapted Rand error and VI of labels ``t`` (truth), ``p`` (prediction)
    as the challenge's Fiji code computes them, transcribed:
    ``RandError.foregroundRestrictedStatsN2`` (1 - F-score) and
    ``VariationOfInformation.foregroundRestrictedVI``. The truth's 0 is not
    counted; the prediction's 0 pixels are pruned into singletons."""
    n = float((t > 0).sum())
    pij = np.zeros((t.max() + 1, p.max() + 1))
    np.add.at(pij, (t.ravel(), p.ravel()), 1)
    pij /= n
    a, b, aux, inner = pij[1:].sum(1), pij[1:, 1:].sum(0), pij[1:, 0].sum(), pij[1:, 1:]
    ab2 = (inner ** 2).sum() + aux / n
    prec, rec = ab2 / ((b ** 2).sum() + aux / n), ab2 / (a ** 2).sum()
    xlogx = lambda v: float((v[v > 0] * np.log(v[v > 0])).sum())
    vi = xlogx(a) + xlogx(b) - aux * np.log(n) - 2 * (xlogx(inner) - aux * np.log(n))
    return 1 - 2 * prec * rec / (prec + rec), vi / np.log(2)  # skimage gives bits, Fiji nats


@pytest.mark.parametrize("case", ["split", "wide membrane", "wide and gap"])
def test_the_rand_and_vi_scores_are_the_challenges_fiji_formulas(case):
    from skimage.measure import label

    truth = _cells()
    pred = truth.copy()
    if case == "split":
        pred[25:27, :18] = False
    else:  # the membrane drawn 9 px wide: 6 columns of each cell are the prediction's boundary
        pred[:, 15:24] = False
        if case == "wide and gap":
            pred[30:33, 15:24] = True  # and a gap in it: a real merger
    s = challenge_scores(truth, pred.astype(np.float32))
    fiji_rand, fiji_vi = _fiji(label(truth, connectivity=1), label(pred, connectivity=1))
    assert s["adapted_rand_error"] == pytest.approx(fiji_rand, abs=2e-3)  # n(n-1) pairs against n^2
    assert s["vi_split"] + s["vi_merge"] == pytest.approx(fiji_vi, rel=1e-6, abs=1e-9)
    if case == "split":
        assert s["vi_split"] > 0.1 and s["vi_merge"] == pytest.approx(0, abs=1e-9)
        assert s["splits"] == 1
    elif case == "wide membrane":  # no cell merged: the wide membrane's pixels cost only themselves
        assert s["rand_recall"] == pytest.approx(1.0) and s["vi_merge"] == pytest.approx(0, abs=1e-9)
        assert s["mergers"] == 0
    else:
        assert s["rand_recall"] < 0.6 and s["mergers"] == 1  # skimage's recall: pairs the prediction joins


