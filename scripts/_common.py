"""Helpers shared by the benchmark scripts (never imported by the package)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time


def tiny_model_dir(path: str) -> str:
    """The benchmarks' tiny model: smp Unet-resnet18, depth 3, seeded, saved with save_pretrained."""
    import segmentation_models_pytorch as smp
    import torch

    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        smp.Unet("resnet18", encoder_weights=None, encoder_depth=3, decoder_channels=(16, 8, 4)).save_pretrained(path)
    return path


def run_with_peak_rss(cmd: list[str], interval: float = 0.05) -> tuple[float, float, int]:
    """Run ``cmd``; return (seconds, peak RSS of the whole process tree in MiB, exit code).

    The tree's resident memory is polled every ``interval`` s (children
    included); a peak between two polls is missed, more often on a busy
    machine, so the command's own high-water mark, which the kernel keeps
    exactly (``wait4``'s ``ru_maxrss``), is taken where it is higher (it is,
    where the tree is one process, as ``tilerseg run`` with its threaded
    scheduler)."""
    import psutil

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    root = psutil.Process(proc.pid)
    peak, done, err = [0], threading.Event(), []

    def poll():  # not proc.poll(): that could reap the child before wait4 reads its rusage
        while not done.is_set():
            try:
                procs = [root] + root.children(recursive=True)
                peak[0] = max(peak[0], sum(p.memory_info().rss for p in procs if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(interval)

    threads = [threading.Thread(target=poll, daemon=True),
               threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    done.set()
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join()
    proc.stderr.close()
    if proc.returncode:
        sys.stderr.write(b"".join(err).decode())
    peak_bytes = max(peak[0], usage.ru_maxrss * 1024)  # ru_maxrss: KiB on Linux
    return time.perf_counter() - t0, peak_bytes / 2**20, proc.returncode


def best_of(runs: dict, reps: int) -> dict:
    """Time each of ``runs`` (name -> callable) ``reps`` times, interleaved
    (one of each, then again), so load changes hit all alike; the best
    seconds of each."""
    best = {k: float("inf") for k in runs}
    for _ in range(reps):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - t0)
    return best
