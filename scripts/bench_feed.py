"""Does the pipeline feed the model? tilerseg with a zero-cost model against
the read + write floor, side by side in one run (issue 34).

Usage: python scripts/bench_feed.py [--size 8192] [--levels 1] [--threads 1,2]
       [--reps 1] [--standin 0,150,300] [--workdir DIR] [--json]
A 40x-slide-like case: --size 32768 --levels 4 (a JPEG-tiled pyramid; the
input is made once in --workdir and reused).

Rows, for each thread count N (the whole process pinned to N cores with
``taskset``; tilerseg's defaults otherwise):
- floor: every input tile decoded (tifffile's decoder, as the reader uses)
  and every level-0 output chunk of tilerseg's chunk shape thresholded to a
  uint8 mask and written to zarr with tilerseg's codec (zstd), one task per
  chunk on N threads, streaming: decode and encode of the same bytes and
  nothing else;
- tilerseg: ``tilerseg run IN -o OUT.zarr --weights conv1x1.onnx`` through
  the real CLI, default tiling, as a user would type it: a 1x1 convolution
  as ONNX, so the model costs next to nothing. Its rate counts the run's
  own seconds (the ledger's throughput: from the first read to the last
  pyramid level), start-up (imports, model build) is reported apart, as
  process wall time and time to the first window;
- peak RSS of each (``wait4``'s high-water mark, see _common.run_with_peak_rss);
- where tilerseg's time goes: busy thread-seconds per stage (read/decode,
  to-float + normalise, model, stitch + postprocess, write, pyramid), from
  one extra in-process run with each stage's function timed (the stages
  overlap on threads, so they may sum to more than the wall time);
- a GPU stand-in (``--standin``, Mpx/s): the same run in-process with the
  forward pass replaced by a sleep of pixels / rate (a CUDA kernel leaves
  the GIL as a sleep does); busy = slept seconds / run seconds.

The machine may be shared: the script prints ``uptime``'s load and the CPU
model with its figures; compare rows of one run only."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

SELF = os.path.abspath(__file__)
HERE = os.path.dirname(SELF)


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown CPU"


def load() -> str:
    return open("/proc/loadavg").read().split(" ", 3)[:3].__str__()


def make_input(work: str, size: int, levels: int) -> str:
    from tilerseg import synthetic

    path = os.path.join(work, f"img-{size}-l{levels}.tif")
    if not os.path.exists(path):
        synthetic.write_tiff(path + ".tmp", (size, size), tile_size=256, compression="jpeg", levels=levels,
                             background=0.3 if levels > 1 else None, workers=os.cpu_count() or 1)
        os.replace(path + ".tmp", path)
    return path


def make_model(work: str) -> str:
    """A 1x1 convolution, 3 bands to 1 class, as ONNX with dynamic sizes."""
    import warnings

    import torch

    path = os.path.join(work, "conv1x1.onnx")
    if not os.path.exists(path):
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(torch.nn.Conv2d(3, 1, 1).eval(), (torch.zeros(1, 3, 64, 64),), path, opset_version=17,
                              dynamo=False, input_names=["input"], output_names=["logits"],
                              dynamic_axes={"input": {0: "n", 2: "h", 3: "w"}, "logits": {0: "n", 2: "h", 3: "w"}})
    return path


def floor(src: str, out: str, chunk: int, threads: int) -> float:
    """Seconds to decode every tile and write every level-0 chunk (see the module doc)."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    import zarr

    from tilerseg.io.tiff import TiffReader

    shutil.rmtree(out, ignore_errors=True)
    reader = TiffReader(src)
    H, W = reader.meta.shape
    z = zarr.create_array(out, shape=(H, W), chunks=(chunk, chunk), dtype=np.uint8, compressors="auto",
                          fill_value=255)

    def one(rc):
        r, c = rc
        r1, c1 = min(r + chunk, H), min(c + chunk, W)
        img = reader._read_tiles((r, r1), (c, c1))
        z[r:r1, c:c1] = (img[..., 0] > 160).view(np.uint8)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, [(r, c) for r in range(0, H, chunk) for c in range(0, W, chunk)]))
    reader.close()
    return time.perf_counter() - t0


def run_cli(src: str, model: str, out: str, threads: int, extra=(), code: str | None = None) -> dict:
    """``tilerseg run`` pinned to ``threads`` cores: wall, run seconds, peak RSS, output chunk side;
    ``code``: a checkout whose ``tilerseg`` runs instead of this one (``--baseline``)."""
    sys.path.insert(0, HERE)
    from _common import run_with_peak_rss

    import shutil

    shutil.rmtree(out, ignore_errors=True)
    ledger = os.path.join(os.path.dirname(out), "tilerseg-ledger.jsonl")
    if os.path.exists(ledger):
        os.remove(ledger)
    cmd = ["taskset", "-c", ",".join(str(i) for i in range(threads)), sys.executable, "-m", "tilerseg.cli", "run",
           src, "-o", out, "--weights", model, "--overwrite", *extra]
    old = os.environ.get("PYTHONPATH")
    if code:
        os.environ["PYTHONPATH"] = os.path.abspath(code)
    import resource

    u0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        wall, peak, rc = run_with_peak_rss(cmd)
    finally:
        if code:
            os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
    if rc:
        raise SystemExit(f"tilerseg failed ({rc}): {' '.join(cmd)}")
    with open(ledger) as f:
        entry = json.loads(f.read().splitlines()[-1])
    import zarr

    z = zarr.open_group(out, mode="r")["0"]
    mpx = float(np.prod(z.shape)) / 1e6
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = u.ru_utime + u.ru_stime - u0.ru_utime - u0.ru_stime
    return {"wall_s": round(wall, 2), "run_s": round(mpx / entry["throughput"], 3), "peak_rss_mib": round(peak),
            "process_cpu_s": round(cpu, 2),
            "chunk": int(z.chunks[-1]), "mpx_s": round(entry["throughput"], 1)}


class Stages:
    """Busy thread-seconds per stage, by wrapping each stage's function."""

    def __init__(self):
        self.busy: dict[str, float] = {}
        self.lock = threading.Lock()
        self.first: float | None = None
        self.cpu_first = 0.0

    def started(self, seconds: float) -> None:
        """The first batch reached the model: when, and the process CPU time so far."""
        import resource

        with self.lock:
            if self.first is None:
                self.first = seconds
                u = resource.getrusage(resource.RUSAGE_SELF)
                self.cpu_first = u.ru_utime + u.ru_stime

    def add(self, name: str, dt: float) -> None:
        with self.lock:
            self.busy[name] = self.busy.get(name, 0.0) + dt

    def wrap(self, owner, attr: str, name: str):
        fn = getattr(owner, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.add(name, time.perf_counter() - t0)

        setattr(owner, attr, timed)


GPU = threading.Lock()


def gpu_standin(windows: np.ndarray, rate: float, st: "Stages", t_start: float) -> np.ndarray:
    """What a GPU predictor leaves the host to do: the uint8 batch goes to
    the device, normalisation, model and activation run there (a sleep of
    pixels / ``rate`` Mpx/s, which releases the GIL as a CUDA stream wait
    does; none for ``rate`` 0: a model that costs nothing), and float32
    probabilities come back (made here by one GIL-free numpy pass)."""
    t0 = time.perf_counter()
    st.started(t0 - t_start)
    n, h, w = windows.shape[:3]
    if rate:
        with GPU:  # one device: one batch at a time, as the predictor's lock has it
            t1 = time.perf_counter()
            time.sleep(n * h * w / (rate * 1e6))
            st.add("gpu busy (sleep)", time.perf_counter() - t1)
    probs = np.greater(windows[..., 0], 127).astype(np.float32)[:, None]
    st.add("model", time.perf_counter() - t0)
    return probs


class TimedLock:
    """The predictor's lock, its waits counted (a batch waiting for the one before)."""

    def __init__(self, stages: Stages, lock):
        self.stages, self.lock = stages, lock

    def __enter__(self):
        t0 = time.perf_counter()
        self.lock.acquire()
        self.stages.add("waiting for the model lock", time.perf_counter() - t0)

    def __exit__(self, *exc):
        self.lock.release()


def instrumented_run(src: str, model: str, out: str, threads: int, extra=(), standin: float | None = None) -> dict:
    """:func:`instrumented` in a fresh process pinned to ``threads`` cores,
    as the command runs (its allocator settings apply before any thread)."""
    cmd = ["taskset", "-c", ",".join(map(str, range(threads))), sys.executable, SELF, "--instrumented", src,
           model, out, "none" if standin is None else str(standin), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if r.returncode:
        raise SystemExit(f"instrumented run failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def instrumented(src: str, model: str, out: str, standin: float | None = None, extra=()) -> dict:
    """One in-process ``tilerseg run`` (``cli.main``) with its stages timed;
    ``standin`` (Mpx/s): the forward pass replaced by a sleep of pixels / rate."""
    import shutil

    from tilerseg import cli, engine, infer
    from tilerseg.io import pyramid, writers

    shutil.rmtree(out, ignore_errors=True)
    st = Stages()
    t_start = time.perf_counter()
    st.wrap(engine, "read_padded", "read/decode")
    st.wrap(engine, "_finish", "postprocess")
    st.wrap(engine, "_store", "write")
    st.wrap(engine, "predict_region", "region (read+model+stitch)")
    st.wrap(pyramid.Levels, "advance", "pyramid")
    st.wrap(writers.Writer, "_convert", "convert (pyramid+metadata)")
    real = infer.cached_predictor

    def cached(*a, **k):
        p = real(*a, **k)
        if True:  # the predictor is cached across runs: wrap its own parts afresh for this run
            net, run = p.__dict__.setdefault("_bench_net", p._net), p.__dict__.setdefault("_bench_run", p._run)

            def timed_net(x):
                t0 = time.perf_counter()
                st.started(t0 - t_start)
                y = net(x)
                st.add("model", time.perf_counter() - t0)
                return y

            def timed_run(w):
                t0 = time.perf_counter()
                try:
                    return run(w) if standin is None else gpu_standin(w, standin, st, t_start)
                finally:
                    st.add("predictor (float+norm+model+activation)", time.perf_counter() - t0)
            p._net, p._run = timed_net, timed_run
            p._lock = TimedLock(st, p.__dict__.setdefault("_bench_lock", p._lock))
        return p

    infer.cached_predictor = cached
    import resource

    if standin and "--workers" not in extra:
        from tilerseg.engine import default_workers

        extra = [*extra, "--workers", str(default_workers("cuda"))]  # what a run on a GPU gets by default
    try:
        t0 = time.perf_counter()
        rc = cli.main(["run", src, "-o", out, "--weights", model, "--overwrite", "--quiet", *extra])
        wall = time.perf_counter() - t0
        cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        infer.cached_predictor = real
    if rc:
        raise SystemExit(f"in-process run failed ({rc})")
    ledger = os.path.join(os.path.dirname(out), "tilerseg-ledger.jsonl")
    with open(ledger) as f:
        entry = json.loads(f.read().splitlines()[-1])
    import zarr

    mpx = float(np.prod(zarr.open_group(out, mode="r")["0"].shape)) / 1e6
    busy = {k: round(v, 3) for k, v in st.busy.items()}
    pred = busy.pop("predictor (float+norm+model+activation)", 0.0)
    busy["to-float+normalise+activation"] = round(pred - busy.get("model", 0.0)
                                                  - busy.get("waiting for the model lock", 0.0), 3)
    region = busy.pop("region (read+model+stitch)", 0.0)
    busy["stitch (crop copies)"] = round(region - busy.get("read/decode", 0.0) - pred, 3)
    conv = busy.pop("convert (pyramid+metadata)", 0.0)
    busy["pyramid"] = round(max(busy.get("pyramid", 0.0), conv), 3)
    run_s = mpx / entry["throughput"]
    res = {"wall_s": round(wall, 2), "run_s": round(run_s, 3), "mpx_s": round(entry["throughput"], 1),
           "first_model_call_s": round(st.first or 0, 2), "busy_s": busy}
    if standin is not None:
        res["model_busy_share"] = round(busy.get("gpu busy (sleep)", 0.0) / run_s, 3)
        # host work per pixel, on all cores, start-up included (an upper bound on what the run needs)
        cpu = (cpu1.ru_utime + cpu1.ru_stime) - st.cpu_first  # from the first batch to the end of the run
        res["host_cpu_s"] = round(cpu, 2)
        res["per_core_mpx_s"] = round(mpx / max(cpu, 1e-3), 1)
        if standin:
            res["cores_for_rate"] = round(standin / res["per_core_mpx_s"], 1)
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=8192)
    p.add_argument("--levels", type=int, default=1, help="input pyramid levels (4 for a slide-like 32768^2)")
    p.add_argument("--threads", default="1,2", help="core counts to pin runs to")
    p.add_argument("--reps", type=int, default=1, help="runs of each row; the best is kept")
    p.add_argument("--standin", default="0,150,300",
                   help="GPU stand-in rates, Mpx/s (0: a predictor that costs nothing; '' for none)")
    p.add_argument("--no-breakdown", action="store_true")
    p.add_argument("--extra", default="", help="more `tilerseg run` options, e.g. '--tile 1024'")
    p.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "tilerseg-bench-feed"))
    p.add_argument("--baseline", help="a checkout of tilerseg (e.g. the code before a change) run in the same rows")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.makedirs(a.workdir, exist_ok=True)
    os.chdir(a.workdir)  # `python -m` puts the current folder first on sys.path: never the checkout's own code
    src, model = make_input(a.workdir, a.size, a.levels), make_model(a.workdir)
    mpx = a.size * a.size / 1e6
    res = {"cpu": cpu_model(), "load_before": load(), "size": a.size, "levels": a.levels, "rows": []}
    out = os.path.join(a.workdir, "out", "mask.zarr")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    for n in [int(t) for t in a.threads.split(",")]:
        best_t, best_f, best_b = None, None, None
        for _ in range(a.reps):
            t = run_cli(src, model, out, n, a.extra.split())
            f = subprocess.run(["taskset", "-c", ",".join(map(str, range(n))), sys.executable, SELF, "--floor",
                                src, os.path.join(a.workdir, "floor.zarr"), str(t["chunk"]), str(n)],
                               capture_output=True, text=True, check=True).stdout.split()
            fs, fpeak, fcpu = float(f[0]), float(f[1]), float(f[2])
            best_t = t if best_t is None or t["run_s"] < best_t["run_s"] else best_t
            best_f = (fs, fpeak, fcpu) if best_f is None or fs < best_f[0] else best_f
            if a.baseline:
                b = run_cli(src, model, out, n, a.extra.split(), code=a.baseline)
                best_b = b if best_b is None or b["run_s"] < best_b["run_s"] else best_b
        res["rows"].append({"threads": n, "floor_s": round(best_f[0], 3), "floor_mpx_s": round(mpx / best_f[0], 1),
                            "floor_peak_rss_mib": round(best_f[1]), "floor_cpu_s": round(best_f[2], 2),
                            "floor_per_core_mpx_s": round(mpx / best_f[2], 1), "tilerseg": best_t,
                            "ratio": round(best_f[0] / best_t["run_s"], 3)})
        if best_b is not None:
            res["rows"][-1].update(baseline=best_b, baseline_ratio=round(best_f[0] / best_b["run_s"], 3))
    if len(res["rows"]) > 1:
        res["speedup_1_to_2"] = round(res["rows"][0]["tilerseg"]["run_s"] / res["rows"][-1]["tilerseg"]["run_s"], 2)
    top = max(int(t) for t in a.threads.split(","))
    if not a.no_breakdown:
        res["breakdown"] = instrumented_run(src, model, out, top, a.extra.split())
    for rate in [float(r) for r in a.standin.split(",") if r]:
        res[f"standin_{rate:g}"] = instrumented_run(src, model, out, top, a.extra.split(), standin=rate)
    res["load_after"] = load()
    if a.json:
        print(json.dumps(res))
        return 0
    print(f"{res['cpu']}, load {res['load_before']} -> {res['load_after']} (shared machine: figures under load)")
    print(f"input {a.size}^2, JPEG tiles 256, {a.levels} level(s); zero-cost model: 1x1 conv (ONNX)")
    print(f"{'threads':>7} {'floor Mpx/s':>12} {'tilerseg Mpx/s':>15} {'ratio':>6} {'run s':>6} {'wall s':>7} "
          f"{'RSS MiB':>8} {'floor RSS':>9}")
    for r in res["rows"]:
        t = r["tilerseg"]
        print(f"{r['threads']:>7} {r['floor_mpx_s']:>12.1f} {t['mpx_s']:>15.1f} {r['ratio']:>6.2f} {t['run_s']:>6.2f} "
              f"{t['wall_s']:>7.2f} {t['peak_rss_mib']:>8} {r['floor_peak_rss_mib']:>9}")
    for r in res["rows"]:
        if "baseline" in r:
            b = r["baseline"]
            print(f"{r['threads']:>7} baseline ({a.baseline}): {b['mpx_s']:.1f} Mpx/s, ratio {r['baseline_ratio']:.2f}, "
                  f"run {b['run_s']:.2f} s, wall {b['wall_s']:.2f} s, RSS {b['peak_rss_mib']} MiB, "
                  f"process CPU {b['process_cpu_s']:.2f} s (this code: {r['tilerseg']['process_cpu_s']:.2f} s)")
    print("floor host rate per core (CPU seconds, robust to load): "
          + ", ".join(f"{r['floor_per_core_mpx_s']} Mpx/s ({r['threads']} threads)" for r in res["rows"]))
    if "speedup_1_to_2" in res:
        print(f"1 -> {res['rows'][-1]['threads']} threads: {res['speedup_1_to_2']}x")
    for key in [k for k in res if k == "breakdown" or k.startswith("standin")]:
        b = res[key]
        extra = f", model busy {b['model_busy_share']:.0%} of the run" if "model_busy_share" in b else ""
        if "per_core_mpx_s" in b:
            extra += f", host {b['per_core_mpx_s']} Mpx/s per core"
        if "cores_for_rate" in b:
            extra += f" -> {b['cores_for_rate']} cores to keep up"
        print(f"{key}: run {b['run_s']:.2f} s ({b['mpx_s']} Mpx/s), first model call {b['first_model_call_s']} s "
              f"after start{extra}; busy thread-seconds: " + ", ".join(f"{k} {v:.2f}" for k, v in b["busy_s"].items()))
    return 0


def _floor_main(argv) -> int:
    """``--floor SRC OUT CHUNK THREADS``: one floor run in its own process (its peak RSS alone)."""
    import resource

    u0 = resource.getrusage(resource.RUSAGE_SELF)
    s = floor(argv[0], argv[1], int(argv[2]), int(argv[3]))
    u = resource.getrusage(resource.RUSAGE_SELF)
    print(s, u.ru_maxrss / 1024, u.ru_utime + u.ru_stime - u0.ru_utime - u0.ru_stime)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--instrumented":
        v = sys.argv[2:]
        print(json.dumps(instrumented(v[0], v[1], v[2], None if v[3] == "none" else float(v[3]), v[4:])))
        sys.stdout.flush()
        os._exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "--floor":
        sys.exit(_floor_main(sys.argv[2:]))
    sys.exit(main())
