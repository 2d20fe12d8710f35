"""Command line: parse arguments, call the library, print one-line errors.

Thin on purpose: every command is a function in :mod:`tilerseg.api` or
:mod:`tilerseg.info`. Errors the user can fix (``TilersegError``) print as
one line and exit 1; ``--debug`` shows the traceback instead."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings

from .cli_args import build_parser
from .io.remote import mask_text

log = logging.getLogger("tilerseg")
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143


def run_config(a):
    """The run's :class:`~tilerseg.config.RunConfig` from parsed arguments."""
    from .config import RunConfig, option_names

    options = {name: getattr(a, name) for name in option_names() if hasattr(a, name)}
    model_args = {**dict(getattr(a, "model_args", None) or {}), **dict(a.model_arg or [])}  # --config's, then flags
    options["model_args"] = model_args or None
    return RunConfig.from_options(**options)


def cmd_run(a) -> int:
    from .api import execute
    from .batch import plan_jobs, run_jobs
    from .cluster import connect
    from .errors import InputError

    jobs, ledger = plan_jobs(a.input, a.output, manifest=a.manifest, fmt=a.format)
    cfg = run_config(a)
    if a.config and os.path.realpath(a.config) in {os.path.realpath(p) for j in jobs
                                                     for p in (j.output, cfg.output.preview) if p}:
        raise InputError(f"{a.config}: that is this run's --config; tilerseg never writes over its inputs: "
                         "choose another output")
    if cfg.output.preview and len(jobs) > 1:
        raise InputError("--preview takes one input (it names one PNG); drop it for batches")
    many = len(jobs) > 1
    number = {(j.input, j.output): k for k, j in enumerate(jobs, start=1)}

    with connect(a.scheduler, a.cluster, a.cluster_config) as scheduler:
        job_cfg = cfg if scheduler is None else cfg.replace(scheduler=scheduler)
        at_once = job_cfg.engine.inputs_at_once(len(jobs))
        if at_once > 1:
            log.info("%d inputs at a time on the scheduler (--concurrent)", at_once)

        def one(input, output):
            if many:
                print(mask_text(f"[{number[input, output]}/{len(jobs)}] {input} -> {output}"), flush=True)
            progress, bar = _progress(a.quiet or at_once > 1)  # no bars from inputs running together
            with bar:
                return execute(input, output, job_cfg, progress=progress)

        def done(job, entry, report) -> None:
            if entry["status"] == "failed":
                print(mask_text(f"tilerseg: error: {entry['error']}"), file=sys.stderr, flush=True)
            else:
                _print_report(a, report)

        entries = run_jobs(jobs, ledger, one, resume=a.resume, on_done=done, reraise=a.debug, at_once=at_once)
    failed = [e for e in entries if e["status"] == "failed"]
    if many or a.manifest:
        print(f"{len(entries) - len(failed)} done, {len(failed)} failed, {len(jobs) - len(entries)} skipped "
              f"(already done); ledger {ledger}")
    if failed and many:
        print(f"tilerseg: {len(failed)} of {len(jobs)} inputs failed (errors above and in the ledger): "
              + mask_text(", ".join(e["input"] for e in failed)), file=sys.stderr)
    return EXIT_ERROR if failed else 0


def shown(path: str) -> str:
    """A path as the summaries print it, one rule for every command:
    relative to the current folder when under it, else absolute; never
    with a doubled slash. URLs as given."""
    path = os.fspath(path)
    if "://" in path:
        return mask_text(path)  # a URL's token or password is never printed
    full = os.path.abspath(path)
    rel = os.path.relpath(full)
    return full if rel == os.pardir or rel.startswith(os.pardir + os.sep) else rel


def _print_report(a, report) -> None:
    size = "x".join(str(v) for v in reversed(report.shape))
    unit = "voxels" if len(report.shape) == 3 else "px"
    tile = "x".join(str(v) for v in report.tile) if isinstance(report.tile, tuple) else report.tile
    from .tiling import counted

    print(f"wrote {shown(report.output)}: {size} {unit}, {counted(report.windows, 'window')} of {tile} px "
          f"(halo {report.halo}, stride {report.stride}) in {report.seconds:.1f} s, "
          f"{report.megapixels_per_second:.2f} M{'vox' if unit == 'voxels' else 'px'}/s", flush=True)
    if report.bytes_total:
        print(f"read {_megabytes(report.bytes_read)} of {_megabytes(report.bytes_total)} from "
              f"{mask_text(report.input)}")
    if report.backend:
        print(f"backend: {report.backend}")
    if report.objects is not None:
        per = "; ".join(f"{c['name']} {c['count']:,} (median {c['median_area_px']:g} px)"
                        for c in report.objects["per_class"])
        print(f"objects: {report.objects['count']:,}" + (f": {per}" if per else ""))
    if report.objects is None and report.output.lower().endswith((".geojson", ".gpkg")):
        print("polygons: touching objects are one polygon; --instances splits them into objects, one polygon "
              "and one table row each")
    if report.preview:
        print(f"wrote {shown(report.preview)}")
    if report.windows_resumed:
        print(f"resumed: {report.windows_resumed} of {report.windows} windows were finished by an earlier run; "
              f"computed {report.windows_run}")
    if report.windows_skipped:
        why = "no tissue or all nodata" if a.tissue else "all nodata"
        print(f"skipped {report.windows_skipped} of {report.windows} windows "
              f"({report.windows_skipped / report.windows:.1%}): {why}")


def _megabytes(n: int) -> str:
    """``84 MB``, ``1.2 MB``: the run summary's transfer figure."""
    return f"{n / 1e6:.3g} MB" if n < 1e8 else f"{n / 1e6:,.0f} MB"


def _progress(quiet: bool):
    """Windows done of total and throughput: a rich bar on a terminal, a log
    line every 10% elsewhere (batch jobs, CI), nothing with ``--quiet``."""
    import contextlib

    if quiet:
        return None, contextlib.nullcontext()
    if not sys.stderr.isatty() and os.environ.get("TILERSEG_PROGRESS") != "1":
        return _log_progress(), contextlib.nullcontext()
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    bar = Progress(TextColumn("windows"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                   transient=False)
    task = bar.add_task("run", total=None, rate="", start=False)  # the clock starts when computing does
    first = []

    def update(done: int, total: int) -> None:
        if not first:  # the engine's first call: the total, what an earlier run finished; the clock starts
            first.append(done)
            bar.start_task(task)
            bar.update(task, completed=done, total=total)
            return
        t = bar.tasks[0]
        rate = (done - first[0]) / t.elapsed if t.elapsed else 0.0
        bar.update(task, completed=done, total=total, rate=f"{rate:.2f} win/s")
        if done >= total:  # finished: later lines (conversion, polygons, the report) go below the bar
            bar.refresh()
            bar.stop()

    return update, bar


def _log_progress():
    import threading
    import time

    lock, shown, first = threading.Lock(), [0], []

    def update(done: int, total: int) -> None:
        with lock:
            if not first:  # rate from the engine's first call on (the start of computing), not model loading
                first.append((done, time.perf_counter()))
                return
            tenth = done * 10 // total
            if tenth > shown[0]:
                shown[0] = tenth
                d0, t0 = first[0]
                rate = (done - d0) / max(time.perf_counter() - t0, 1e-9)
                log.info("windows %d/%d (%d%%)%s", done, total, tenth * 10,
                         f", {rate:.2f} windows/s" if done > d0 else "")

    return update


def cmd_info(a) -> int:
    from .info import describe_input

    print(describe_input(a.input, level=a.level, mpp=a.mpp, bands=a.bands, reader=a.reader,
                         force_resample=a.force_resample, missing_chunks=a.missing_chunks))
    return 0


def cmd_ingest(a) -> int:
    from .api import ingest

    out = ingest(a.input, a.output, level=a.level, mpp=a.mpp, bands=a.bands, reader=a.reader, chunk=a.chunk,
                 workers=a.workers, overwrite=a.overwrite, force_resample=a.force_resample,
                 missing_chunks=a.missing_chunks)
    print(f"wrote {out}")
    return 0


def cmd_models(a) -> int:
    from .models import ARCHITECTURES

    if a.describe:
        from .models.card import card
        from .models.registry import ModelSpec

        for key, text in card(a.describe, ModelSpec(arch=a.model, encoder=a.encoder, classes=a.classes)):
            print(f"{key + ':':<15}{text}")
        return 0

    print(f"{'name':<16}{'class':<16}{'dims':<6}{'seam-exact':<12}aliases / why not")
    for name, row in sorted(ARCHITECTURES.items()):
        if name in ("onnx", "torchscript", "exported"):  # a file, not an architecture: said below
            continue
        why = ", ".join(row.aliases) if row.local else row.why
        print(f"{name:<16}{row.cls:<16}{row.dims:<6}{'yes' if row.local else 'no':<12}{why}")
    print("\n--encoder takes any segmentation-models-pytorch encoder (default resnet34); tilerseg's own "
          "architectures (ternausnet, transunet, unet2d, unet3d) have fixed encoders.")
    print("\nyour own model: --weights model.onnx runs an ONNX file (2-D, on ONNX Runtime), --weights model.pt a "
          "TorchScript or torch.export program, hf://ORG/NAME a Hub repository; seam-exact unless it pools "
          "globally or attends (the run says so; `tilerseg models --describe WEIGHTS` shows it)")
    print("\ntrained weights shipped with tilerseg (no download):\n"
          f"{'demo':<16}{'unet':<16}{'2':<6}{'yes':<12}nuclei on H&E-like RGB uint8 at 0.5 µm/px, 2 classes "
          "(background, nucleus): --weights demo (tilerseg:demo where a path named demo exists), or "
          "segment(image, \"demo\")")
    return 0


def cmd_cluster_script(a) -> int:
    from .cluster import cluster_script

    print(cluster_script(a.cluster_config, a.cluster, a.scheduler), end="")
    return 0


def cmd_demo(a) -> int:
    from .demo import demo

    progress, bar = _progress(a.quiet)
    print(f"writing a {a.size}x{a.size} synthetic slide to {shown(os.path.join(a.outdir, 'slide.tif'))}")
    with bar:
        res = demo(a.outdir, size=a.size, seed=a.seed, workers=a.workers, progress=progress, overwrite=a.overwrite)
    r = res["report"]
    print(f"wrote {shown(res['mask'])} ({r.windows} windows in {r.seconds:.1f} s, {r.megapixels_per_second:.2f} Mpx/s)")
    print(f"wrote {shown(res['preview'])}")
    print(f"Dice against the generator's truth: {res['dice']:.4f}")
    print(f"nuclei the generator drew: {res['nuclei']:,}; count them with: tilerseg run "
          f"{shown(res['slide'])} --weights demo --instances -o "
          f"{shown(os.path.join(a.outdir, 'objects.geojson'))}")
    return 0


def cmd_halo(a) -> int:
    import json

    from .api import halo

    extra = {"encoder_depth": a.encoder_depth} if a.encoder_depth else {}
    rep = halo(a.model, weights=a.weights, encoder=a.encoder, classes=a.classes, in_channels=a.in_channels, **extra)
    if a.json:
        print(json.dumps(rep.as_dict()))
    else:
        print(f"receptive-field radius {rep.radius} px ({rep.how.split(', ', 1)[-1]}; output stride "
              f"{rep.stride}): use --halo {rep.halo} for seam-exact tiles (runs use it by default)")
    return 0


def cmd_train(a) -> int:
    from .train import load_train_config, train

    over = {k: getattr(a, k) for k in ("epochs", "batch_size", "lr", "crop", "samples_per_epoch", "seed",
                                       "max_minutes", "augment", "loss", "device", "precision", "loader_workers")}
    over.update(dict(a.sets))
    cfg = load_train_config(a.train_config, over)
    out = a.output or os.path.join("runs", os.path.splitext(os.path.basename(a.train_config))[0])
    res = train(cfg, out, resume=a.resume, progress=False if a.quiet else None)
    b = res.best_scores
    print(f"trained {res.epochs_run} epoch(s) in {res.seconds / 60:.1f} min ({res.stopped})")
    if b:
        print(f"best epoch {res.best_epoch}: validation IoU {b['iou']:.4f}, Dice {b['dice']:.4f}, "
              f"pixel error {b['pixel_error']:.4f}")
    if res.final:
        f = res.final["scores"]
        rand = f", adapted Rand error {f['adapted_rand_error']:.4f}" if "adapted_rand_error" in f else ""
        print(f"best.pt with tta {res.final['tta']}, threshold {res.final['threshold']:g}: validation IoU "
              f"{f['iou']:.4f}, Dice {f['dice']:.4f}, pixel error {f['pixel_error']:.4f}{rand}")
    print(f"wrote {res.best} (run it: tilerseg run IMAGE --weights {res.best} -o mask.ome.tif), {res.last}, "
          f"history.csv, curves.png")
    return 0


def cmd_eval(a) -> int:
    import json

    from .config import RunConfig
    from .errors import InputError
    from .train import evaluate

    post = None
    if a.instances:
        post = RunConfig.from_options(instances=True, split_depth=a.split_depth, min_area=a.min_area,
                                      marker_threshold=a.marker_threshold, join_below=a.join_below,
                                      object_threshold=a.object_threshold).output
    elif any(v is not None for v in (a.split_depth, a.min_area, a.marker_threshold, a.object_threshold,
                                     a.join_below)):
        raise InputError("--marker-threshold, --object-threshold, --join-below, --split-depth and --min-area shape "
                         "--instances: add --instances")
    ev, th = evaluate(a.weights, a.images, a.masks, tile=a.tile, halo=a.halo, batch_size=a.batch_size,
                      merge=a.merge, tta=a.tta, threshold=a.threshold, sweep=a.sweep_threshold, level=a.level,
                      mpp=a.mpp, bands=a.bands, device=a.device, workers=a.workers, mask_values=a.mask_values,
                      mask_suffix=a.mask_suffix, instances=post, regions=a.regions,
                      region_classes=a.region_classes)
    rep = ev.report(th)
    if post is not None and "instances" not in rep:
        raise InputError("--instances: the challenge's scores need two classes and 2-D images up to 4096^2 px")
    if a.json:
        print(json.dumps(rep))
        return 0
    extra = "adapted_rand_error" in rep["overall"]
    print(f"{'image':<24}{'IoU':>8}{'Dice':>8}{'pixel error':>13}{'misclassified':>15}"
          + (f"{'Rand error':>12}{'warping error':>15}{'splits':>8}{'mergers':>8}" if extra else ""))
    for r in rep["images"] + [{"image": "overall", **rep["overall"]}]:
        print(f"{r['image'][:23]:<24}{r['iou']:>8.4f}{r['dice']:>8.4f}{r['pixel_error']:>13.4f}{r['misclassified']:>15.4f}"
              + (f"{r['adapted_rand_error']:>12.4f}{r['warping_error']:>15.6f}{r['splits']:>8}{r['mergers']:>8}"
                 if extra else ""))
    o = rep["overall"]
    print("per class: " + ", ".join(f"{n} IoU {c['iou']:.4f} Dice {c['dice']:.4f}" for n, c in o["per_class"].items()))
    if "threshold" in rep:
        print(f"threshold {rep['threshold']:g}" + (" (best of the sweep)" if a.sweep_threshold else ""))
    print("pixel error as the ISBI challenge counts it: 1 - F-score of class 1 for two classes; misclassified: the "
          "fraction of pixels wrong")
    if "instances" in rep:
        _print_side_by_side(rep)
    return 0


def _print_side_by_side(rep: dict) -> None:
    """The challenge's three figures of the plain threshold and of the
    post-processed objects (``eval --instances``), one row each."""
    o, c = rep["overall"], rep["instances"]["overall"]
    print()
    print(f"{'':<26}{'pixel error':>13}{'Rand error':>12}{'warping error':>15}{'splits':>8}{'mergers':>8}"
          f"{'objects':>9}")
    th = f" {rep['threshold']:g}" if "threshold" in rep else ""
    print(f"{'threshold' + th:<26}{o['pixel_error']:>13.4f}{o['adapted_rand_error']:>12.4f}{o['warping_error']:>15.6f}"
          f"{o['splits']:>8}{o['mergers']:>8}{'':>9}")
    print(f"{'objects (--instances) ' + format(c['threshold'], 'g'):<26}{c['pixel_error']:>13.4f}{c['adapted_rand_error']:>12.4f}"
          f"{c['warping_error']:>15.6f}{c['splits']:>8}{c['mergers']:>8}{c['objects']:>9}")
    print("means over the images but pixel error (pooled); objects: tilerseg run --instances' labels, their "
          "boundaries and background as class 0")


def cmd_view(a) -> int:
    import importlib.util

    from .errors import InputError

    missing = [m for m in ("starlette", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(f"tilerseg view needs {' and '.join(missing)}: pip install 'tilerseg[view]'")
    from .view import open_view
    from .view.server import check_port, serve

    check_port(a.port)  # before the files are opened (polygons take a while)
    serve(open_view(a.paths), host=a.host, port=a.port, open_browser=not a.no_browser)
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "halo": cmd_halo, "run": cmd_run, "info": cmd_info, "ingest": cmd_ingest, "models": cmd_models, "demo": cmd_demo,
            "cluster-script": cmd_cluster_script, "view": cmd_view}


def _parse(argv) -> argparse.Namespace:
    """Parse, letting a run's ``--config`` YAML supply defaults that flags override."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        from .config import load_run_config

        cfg = load_run_config(args.config)
        parser.subcommands["run"].set_defaults(**cfg)
        args = parser.parse_args(argv)
    return args


def main(argv=None) -> int:
    from .allocator import keep_heap

    keep_heap()  # before any thread starts: activations stay in the heap (see tilerseg.allocator)
    try:
        args = _parse(argv)
    except Exception as err:  # a bad --config file
        from .errors import TilersegError

        if not isinstance(err, TilersegError):
            raise
        print(f"tilerseg: error: {err}", file=sys.stderr)
        return EXIT_ERROR
    # tilerseg's own messages (progress, level choice) as "tilerseg: ..."; other libraries' warnings by name
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for h in logging.getLogger().handlers:  # other libraries' lines (GDAL's errors, aiohttp) name URLs too
        h.setFormatter(_Masked("%(name)s: %(message)s"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Masked("tilerseg: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    shown = warnings.showwarning
    warnings.showwarning = lambda msg, cat, *rest: print(mask_text(f"tilerseg: warning: {msg}"), file=sys.stderr)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.filterwarnings("ignore", module="(rasterio|zarr|dask|distributed|timm|torch).*")
            warnings.simplefilter("always", UserWarning)
            return _command(args)
    finally:  # main() may be called again in this process (tests, notebooks)
        log.removeHandler(handler)
        warnings.showwarning = shown


class _Masked(logging.Formatter):
    """Log lines with every URL's userinfo and query string masked (credentials)."""

    def format(self, record) -> str:
        return mask_text(super().format(record))


def _command(args) -> int:
    from .errors import Terminated, TilersegError

    previous = _on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except TilersegError as err:
        if args.debug:
            raise
        print(mask_text(f"tilerseg: error: {err}"), file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:  # `tilerseg models | head`: the reader left
        sys.stderr.close()
        return 0
    except KeyboardInterrupt as err:
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        print(f"tilerseg: {what}; no output was written (finished blocks are kept: rerun the same command with "
              "--resume to continue)", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED
    except Exception as err:  # a bug, not a user error: still one line unless --debug
        if args.debug:
            raise
        text = mask_text(" ".join(str(err).split())[:400])
        print(f"tilerseg: internal error: {type(err).__name__}: {text} (rerun with --debug for the traceback "
              "and report it)", file=sys.stderr)
        return EXIT_ERROR
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _on_sigterm():
    """SIGTERM (what SLURM, PBS and LSF send at walltime and on scancel)
    behaves like Ctrl-C: it raises :class:`~tilerseg.errors.Terminated` (a
    KeyboardInterrupt) in the main thread, so the same clean-up runs: the
    ledger gets a failed line, the finished blocks stay for --resume.
    Further SIGTERMs are ignored while that clean-up runs. Returns the
    previous handler (None off the main thread, where none is set)."""
    import threading

    from .errors import Terminated

    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated(f"terminated by signal {signum} (SIGTERM)")

    return signal.signal(signal.SIGTERM, handler)


def run(argv=None):
    """The ``tilerseg`` command (and ``python -m tilerseg.cli``): :func:`main`,
    then leave without tearing the interpreter down.

    Python's finalisation frees every object of every imported module one by
    one: with torch, and the sympy, torch._dynamo and triton that smp's
    imports (timm, torchvision) bring in, over 3,000 modules. Measured on a
    2-core AMD EPYC, ``tilerseg run`` on a 1024^2 image: 5.1-5.8 s with it,
    4.0-4.7 s without; about 1.1 s of every command. When :func:`main`
    returns, every output is closed (each writer closes its own); what the
    interpreter's exit would still do that matters is done here, in its
    order: other threads finish (``threading._shutdown``, as at exit), the
    atexit handlers run (logging's flush, dask's and tempfile's clean-ups),
    stdout and stderr are flushed; then the process ends with main's code.
    An exception out of :func:`main` (``--debug``, SystemExit) takes
    Python's usual exit."""
    import atexit
    import threading

    code = main(argv)
    threading._shutdown()  # what Py_Finalize runs first: non-daemon threads joined, executors' workers told to stop
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (`tilerseg models | head`), a closed stream
            pass
    os._exit(code if isinstance(code, int) else 0 if code is None else 1)


if __name__ == "__main__":
    run()
