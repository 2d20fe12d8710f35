"""Where a default unet3d run's time goes, before and after the one tiling decision.

The case measured: `tilerseg run vol.tif --model unet3d -o vol.zarr` on a
40x200x210 random uint8 volume, the paper-sized unet3d (19 M parameters,
features 32, depth 3), untrained, fp32, on this machine's cores.

Before, the run (1) measured the receptive field with the input-gradient
probe on a 128^3 random cube (growing to 256^3 when the support reached the
cube's middle), then (2) used windows of 2*halo + 4*stride per axis: a 32^3
crop out of each 128^3 window, 2 x 7 x 7 = 98 windows. Now (1) the radius
comes from the module graph, and (2) default windows grow to about 160^3
voxels (here 9 windows of 136 x 168 x 168).

Prints, side by side in one run: the probe's time for one output voxel at
128^3 against the analytic figure's, and the forward time of one window of
each tiling, with the totals they imply. ``--run`` also times the real
command end to end (minutes on 2 cores).

    python scripts/bench_unet3d.py [--run]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="40,200,210")
    p.add_argument("--run", action="store_true", help="also run `tilerseg run` end to end")
    a = p.parse_args()
    shape = tuple(int(v) for v in a.shape.split(","))

    import numpy as np
    import torch

    from tilerseg.config import TilingOptions
    from tilerseg.models import ModelInfo, ModelSpec, build
    from tilerseg.receptive import analytic_radius
    from tilerseg.tiling import resolve

    torch.set_num_threads(os.cpu_count() or 1)
    model = build(ModelSpec("unet3d", "-", in_channels=1)).eval()
    params = sum(q.numel() for q in model.parameters())

    t0 = time.perf_counter()
    radius = analytic_radius(model, in_channels=1, stride=8, dims=3)
    t_analytic = time.perf_counter() - t0

    # the old probe: one output voxel's input gradient on a 128^3 cube (it ran three phases, and doubled the cube
    # to 256^3 when the support reached its middle); one phase timed here
    x = torch.randn(1, 1, 128, 128, 128, requires_grad=True)
    t0 = time.perf_counter()
    (g,) = torch.autograd.grad(model(x)[0, 0, 64, 64, 64], x)
    t_probe_phase = time.perf_counter() - t0
    del g, x

    new = resolve(TilingOptions(), model=model, info=ModelInfo(spec=ModelSpec("unet3d")), stride=8, dims=3,
                  bands=1, shape=shape)
    old_tile = tuple(2 * h + 4 * 8 for h in new.halo)
    n_old = math.prod(math.ceil(n / (t - 2 * h)) for n, t, h in zip(shape, old_tile, new.halo))
    n_new = new.grid(shape).total_windows

    def forward(tile) -> float:
        x = torch.zeros(1, 1, *tile).contiguous(memory_format=torch.channels_last_3d)
        m = model.to(memory_format=torch.channels_last_3d)
        with torch.inference_mode():
            m(torch.zeros(1, 1, 32, 32, 32))
            t0 = time.perf_counter()
            m(x)
        return time.perf_counter() - t0

    t_old, t_new = forward(old_tile), forward(new.tile)
    out = {"cpu": _cpu(), "threads": torch.get_num_threads(), "shape": shape, "params": params,
           "radius": radius, "analytic_s": round(t_analytic, 3), "probe_one_phase_128_s": round(t_probe_phase, 1),
           "old": {"tile": old_tile, "windows": n_old, "window_s": round(t_old, 1),
                   "total_s": round(n_old * t_old, 0)},
           "new": {"tile": new.tile, "windows": n_new, "window_s": round(t_new, 1),
                   "total_s": round(n_new * t_new, 0)},
           "voxels_computed_per_output_voxel": {
               "old": round(n_old * math.prod(old_tile) / math.prod(shape), 1),
               "new": round(n_new * math.prod(new.tile) / math.prod(shape), 1)}}
    out["speedup_windows"] = round(out["old"]["total_s"] / max(out["new"]["total_s"], 1e-9), 2)
    if a.run:
        import tifffile

        with tempfile.TemporaryDirectory() as work:
            vol = os.path.join(work, "vol.tif")
            tifffile.imwrite(vol, np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8))
            t0 = time.perf_counter()
            r = subprocess.run([sys.executable, "-m", "tilerseg.cli", "run", vol, "--model", "unet3d", "-o",
                                os.path.join(work, "vol.zarr"), "--quiet"], capture_output=True, text=True,
                               env=dict(os.environ, HF_HUB_OFFLINE="1"))
            out["run_s"] = round(time.perf_counter() - t0, 1)
            out["run_rc"], out["run_stderr"] = r.returncode, r.stderr.strip().splitlines()[-3:]
    print(json.dumps(out, indent=1))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
        return f"{name}, {'avx512_bf16' if 'avx512_bf16' in flags else 'no native bf16'}, {os.cpu_count()} cores"
    except OSError:
        return "?"


if __name__ == "__main__":
    main()
