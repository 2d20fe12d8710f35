"""Time tilerseg.losses.unet_weight_map on a 512x512 mask with 200 objects.

Usage: python scripts/bench_weight_map.py [--objects 200] [--size 512] [--reps 20]

Prints the best time of the windowed distance transforms beside the plain
approach (one full-image distance transform per object), measured in the same
run, and the largest difference between the two. Target: < 0.1 s."""
from __future__ import annotations

import argparse
import sys
import time

import numpy as np


def blobs(size: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    inst = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[:size, :size]
    k = 0
    while k < n:
        cy, cx, r = rng.integers(0, size, 2).tolist() + [int(rng.integers(4, 12))]
        disk = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        if (inst[disk] == 0).all():
            k += 1
            inst[disk] = k
    return inst


def full_edt(inst, w0=10.0, sigma=5.0):
    from scipy import ndimage

    d = np.stack([ndimage.distance_transform_edt(inst != k) for k in range(1, inst.max() + 1)])
    d.sort(axis=0)
    w = 1 + w0 * np.exp(-((d[0] + d[1]) ** 2) / (2 * sigma ** 2))
    w[inst > 0] = 1
    return w


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--objects", type=int, default=200)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--reps", type=int, default=20)
    a = p.parse_args()
    from tilerseg.losses import unet_weight_map

    inst = blobs(a.size, a.objects)
    best = {}
    for name, fn in (("windowed", unet_weight_map), ("full", full_edt)):
        times = []
        for _ in range(a.reps if name == "windowed" else max(1, a.reps // 10)):
            t0 = time.perf_counter()
            out = fn(inst)
            times.append(time.perf_counter() - t0)
        best[name] = (min(times), out)
    diff = np.abs(best["windowed"][1] - best["full"][1]).max()
    print(f"{a.size}^2 px, {a.objects} objects: windowed {best['windowed'][0] * 1e3:.1f} ms, "
          f"full per-object EDT {best['full'][0] * 1e3:.0f} ms ({best['full'][0] / best['windowed'][0]:.0f}x), "
          f"max difference {diff:.2e}; target < 100 ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
