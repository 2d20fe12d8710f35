"""Planning cost against image size: time and memory to plan a run and
build its first wave of tasks, for images from 20,000 to 1,000,000 px square.

Usage: python scripts/bench_plan.py [--sizes 20000,200000,1000000]

Setup: a reader that only claims its size (planning must not read), the
default tiling of the demo model (tile 512, halo 96, stride 32, batch 4:
2x2 windows per block), crop merge. Measured with tracemalloc (Python
allocations) and perf_counter, side by side in one run. Targets: a
200,000 px square slide plans in under 10 s and 200 MB; the cost is the
same at every size (the plan is lazy, tasks are handed over in waves)."""
from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np


def plan_cost(n: int) -> tuple[float, float, int, int]:
    """(seconds, peak MB, blocks, tasks in the first wave) to plan an n x n image."""
    from tilerseg.engine import Output, TileSpec, segment_plan
    from tilerseg.geometry import Grid, block_layout
    from tilerseg.io.base import ImageMeta, Reader

    class Claimed(Reader):
        def __init__(self):
            self.path, self.meta = f"claimed-{n}", ImageMeta(shape=(n, n), bands=3, dtype=np.dtype("u1"), format="-")

        def _read(self, rows, cols):
            raise AssertionError("planning must not read")

    tracemalloc.start()
    t0 = time.perf_counter()
    grid = Grid((n, n), 512, 96, 32, block_layout(4))
    plan = segment_plan(Claimed(), object(), grid, TileSpec(512, 96, 4), Output(), 1)
    wave = next(plan.waves())
    dsk, _ = plan.graph(wave)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 1e6
    tracemalloc.stop()
    return seconds, peak, len(plan.blocks), len(dsk)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="20000,200000,1000000")
    a = p.parse_args()
    import dask  # noqa: F401 (imported before timing: its import is not planning)

    rows = [(n, *plan_cost(n)) for n in (int(s) for s in a.sizes.split(","))]
    print(f"{'image':>18}{'blocks':>12}{'first wave':>12}{'plan s':>9}{'peak MB':>9}")
    for n, s, mb, blocks, tasks in rows:
        print(f"{f'{n:,} px square':>18}{blocks:>12,}{tasks:>12,}{s:>9.2f}{mb:>9.1f}")
    small, large = rows[0], rows[-1]
    print(f"largest / smallest: {large[1] / max(small[1], 1e-9):.2f}x the time, {large[2] / small[2]:.2f}x the memory "
          f"for {(large[0] / small[0]) ** 2:,.0f}x the pixels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
