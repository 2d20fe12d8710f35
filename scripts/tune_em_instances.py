"""Choose ``eval --instances``' post-process options on validation slices.

Computes the probabilities of IMAGES once (the checkpoint's tiling, TTA and
threshold, as ``tilerseg eval``), then scores every combination of marker
threshold, h-depth, join threshold (``--join-below``; ``off``) and minimum area with the challenge's adapted Rand error
(fast), and the best few also with the warping error. Run it on the
validation slices only (20-24 for pipelines/em-membranes.yaml), never on
held-out ones:

    python scripts/tune_em_instances.py runs/em/best.pt VAL/image VAL/label --write

``--write`` records the best combination (by Rand error, then pixel error)
in the checkpoint: ``run --instances`` and ``eval --instances`` with it then
use these options unless flags say otherwise.
"""
from __future__ import annotations

import argparse
import itertools
import time

import numpy as np


def main() -> None:
    from tilerseg.instances import InstanceOptions, label_array
    from tilerseg.train.challenge import rand_and_vi, segmentation_scores
    from tilerseg.train.evaluate import evaluate
    from tilerseg.train.metrics import IGNORE, confusion, scores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("weights")
    ap.add_argument("images")
    ap.add_argument("masks")
    ap.add_argument("--thresholds", type=float, nargs="+", help="foreground thresholds (default: the checkpoint's)")
    ap.add_argument("--markers", type=float, nargs="+", default=[0.8, 0.9, 0.95, 0.98])
    ap.add_argument("--depths", type=float, nargs="+", default=[0.5, 1.5, 3.0])
    ap.add_argument("--min-areas", type=int, nargs="+", default=[0, 20, 60])
    ap.add_argument("--joins", nargs="+", default=["off", "0.2", "0.3"], help="--join-below values, or off")
    ap.add_argument("--top", type=int, default=4, help="combinations also scored by warping error")
    ap.add_argument("--write", action="store_true", help="record the best options in the checkpoint (its defaults)")
    a = ap.parse_args()
    ev, th = evaluate(a.weights, a.images, a.masks, sweep=True, keep=True)
    canvases = [(s.name, s.canvas) for s in ev.images]
    print(f"threshold {th:g}; {len(canvases)} image(s): {', '.join(n for n, _ in canvases)}")
    results = []
    joins = [None if j == "off" else float(j) for j in a.joins]
    for t, m, d, j, area in itertools.product(a.thresholds or [th], a.markers, a.depths, joins, a.min_areas):
        opts = InstanceOptions(threshold=t, depth=d, min_area=area, markers=m, join=j)
        cells = [label_array(c.prob[None], opts) > 0 for _, c in canvases]
        rand = np.mean([rand_and_vi(c.truth == 1, on, keep=c.truth != IGNORE)["adapted_rand_error"]
                        for (_, c), on in zip(canvases, cells)])
        cm = sum(confusion(c.truth, on.astype(np.uint8), 2) for (_, c), on in zip(canvases, cells))
        results.append((rand, scores(cm)["pixel_error"], t, m, d, j, area))
        print(f"threshold {t:<5g} markers {m:<5g} depth {d:<4g} join {j or 'off':<4} min_area {area:<4d} Rand {rand:.4f} "
              f"pixel error {results[-1][1]:.4f}", flush=True)
    if a.write:
        from tilerseg.models.weights import record_postprocess

        _, _, t, m, d, j, area = min(results, key=lambda r: r[:2])
        best = {"object_threshold": t, "marker_threshold": m, "split_depth": d, "min_area": area, "join_below": j}
        record_postprocess(a.weights, best)
        print(f"recorded in {a.weights}: " + " ".join(f"--{k.replace('_', '-')} {v:g}" for k, v in best.items()
                                                     if v is not None))
    print("\nbest by Rand error, with the warping error:")
    for rand, pe, t, m, d, j, area in sorted(results, key=lambda r: r[:2])[:a.top]:  # j may be None
        t0 = time.perf_counter()
        opts = InstanceOptions(threshold=t, depth=d, min_area=area, markers=m, join=j)
        s = [segmentation_scores(c.truth == 1, label_array(c.prob[None], opts) > 0, c.prob, t,
                                 keep=c.truth != IGNORE) for _, c in canvases]
        print(f"threshold {t:<5g} markers {m:<5g} depth {d:<4g} join {j or 'off':<4} min_area {area:<4d} Rand {rand:.4f} "
              f"pixel error {pe:.4f} warping "
              f"{np.mean([x['warping_error'] for x in s]):.6f} splits {sum(x['splits'] for x in s)} mergers "
              f"{sum(x['mergers'] for x in s)} ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
