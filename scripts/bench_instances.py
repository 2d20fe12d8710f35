"""--instances at scale: count, memory and the merge's share, against dask-image's label.

Usage: python scripts/bench_instances.py [--sides 5000 20000] [--workdir DIR] [--json]

For each side, writes a synthetic slide (tilerseg.synthetic: nuclei on
tissue, half the area; about 0.4 nuclei per 24x24 px cell of tissue), runs
``tilerseg run SLIDE --weights demo --instances -o objects.zarr`` in a fresh
process and records its wall time, peak RSS (the whole process tree) and the
instance pass's phases as the run logs them. Then labels the same
foreground (the run's objects > 0) with dask-image's ``ndmeasure.label``
(the peer: exact connected components across chunks, no splitting) in
another process, with its time and peak RSS. Prints, per side: the
generator's true count, tilerseg's count and error, dask-image's count,
the objects that cross blocks, times and memory.

Targets (issue 23): peak RSS at 20,000^2 within 1.3x of 5,000^2; the merge
(union-find over block faces and the global numbering) < 15% of the run's
wall time. StarDist's ``predict_instances_big`` and Cellpose need their
pretrained weights from the internet at run time, so here the peer is
dask-image (``pip install dask-image``; the bench extra)."""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

PEER = r"""
import sys, time, zarr, dask.array as da
from dask_image.ndmeasure import label
z = zarr.open_group(sys.argv[1], mode="r")["0"]
t0 = time.perf_counter()
fg = da.from_zarr(z) > 0
lab, n = label(fg)
n = int(n.compute())
print(n, time.perf_counter() - t0)
"""


def measure(side: int, work: str, workers: int) -> dict:
    from tilerseg.synthetic import nuclei, write_tiff

    src = os.path.join(work, f"slide-{side}.tif")
    if not os.path.exists(src):
        write_tiff(src, (side, side), levels=4, compression="jpeg", workers=workers)
    out = os.path.join(work, f"objects-{side}.zarr")
    cmd = [sys.executable, "-m", "tilerseg.cli", "run", src, "--weights", "demo", "--instances", "-o", out,
           "--overwrite", "--workers", str(workers)]
    seconds, peak, rc, text = _timed(cmd)
    m = re.search(r"instances: (\d+) components \((\d+) crossing blocks\), (\d+) objects; ([\d.]+) s: pieces "
                  r"([\d.]+), merge \(union-find and numbering\) ([\d.]+), split ([\d.]+), paint ([\d.]+)", text)
    if rc or not m:
        sys.exit(text)
    comps, crossing, objects, post, pieces, merge, split, paint = m.groups()
    peer_s, peer_peak, peer_rc, peer_out = _timed([sys.executable, "-c", PEER, out])
    if peer_rc:
        sys.exit(peer_out)
    peer_n, peer_label_s = peer_out.split()[-2:]
    truth = nuclei((side, side))
    return {"side": side, "truth": truth, "objects": int(objects), "error": (int(objects) - truth) / truth,
            "components": int(comps), "crossing_blocks": int(crossing), "wall_s": seconds, "peak_mib": peak,
            "instance_pass_s": float(post), "merge_s": float(merge), "merge_share": float(merge) / seconds,
            "split_s": float(split), "pieces_s": float(pieces), "paint_s": float(paint),
            "dask_image_count": int(peer_n), "dask_image_s": float(peer_label_s), "dask_image_peak_mib": peer_peak}


def _timed(cmd) -> tuple[float, float, int, str]:
    """Wall seconds, peak RSS (MiB) of the process tree, exit code, and what it printed."""
    import threading
    import time

    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    root, peak = psutil.Process(proc.pid), [0]

    def poll():
        while proc.poll() is None:
            try:
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in [root] + root.children(recursive=True)))
            except psutil.Error:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=poll, daemon=True)
    t.start()
    out, _ = proc.communicate()
    t.join()
    return time.perf_counter() - t0, peak[0] / 2 ** 20, proc.returncode, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sides", type=int, nargs="+", default=[5000, 20000])
    p.add_argument("--workdir")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="tilerseg-instances-")
    os.makedirs(work, exist_ok=True)
    rows = [measure(side, work, a.workers) for side in a.sides]
    if a.json:
        print(json.dumps(rows))
        return 0
    print(f"{'side':>7}{'truth':>9}{'tilerseg':>10}{'error':>8}{'crossing':>10}{'wall s':>8}{'peak MiB':>10}"
          f"{'merge s':>9}{'merge %':>9}{'split s':>9}{'dask-image':>12}{'its s':>7}{'its MiB':>9}")
    for r in rows:
        print(f"{r['side']:>7}{r['truth']:>9}{r['objects']:>10}{r['error']:>+8.2%}{r['crossing_blocks']:>10}"
              f"{r['wall_s']:>8.1f}{r['peak_mib']:>10.0f}{r['merge_s']:>9.2f}{r['merge_share']:>9.2%}"
              f"{r['split_s']:>9.1f}{r['dask_image_count']:>12}{r['dask_image_s']:>7.1f}"
              f"{r['dask_image_peak_mib']:>9.0f}")
    if len(rows) > 1:
        print(f"peak RSS {rows[-1]['side']}^2 / {rows[0]['side']}^2: {rows[-1]['peak_mib'] / rows[0]['peak_mib']:.2f} "
              "(target <= 1.3); merge share target < 15%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
