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

from .config import BACKENDS, MERGE_MODES, PAD_MODES, PRECISIONS, READERS, TTA_MODES

log = logging.getLogger("tilerseg")
EXIT_ERROR, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 130, 143


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _halo(text: str):
    if text == "auto":
        return text
    try:
        return _tile(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a number of pixels or 'auto', got {text!r}") from None


def _model_arg(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` with the value read as YAML: 3, 0.5, true, [64, 32], scse."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key.replace("-", "_"), yaml.safe_load(value)
    except yaml.YAMLError as err:
        where = getattr(err, "problem", None) or "not valid YAML"
        raise argparse.ArgumentTypeError(f"{text!r}: the value is read as YAML and {where} (quote it, or "
                                         "write lists as [1, 2])") from None


def _tile(text: str):
    if text == "auto":
        return text
    vals = _ints(text)
    if len(vals) == 1:
        return vals[0]
    if len(vals) == 3:
        return vals
    raise argparse.ArgumentTypeError(f"expected one side or three (z,y,x), got {text!r}")


def _none_or_str(text: str):
    return None if text.lower() in ("none", "null", "") else text


def _input_args(p: argparse.ArgumentParser, resample: bool = True) -> None:
    g = p.add_argument_group("input")
    g.add_argument("--level", type=int, help="pyramid level to read (0 = full resolution)")
    g.add_argument("--mpp", type=float, help="target microns per pixel: nearest level, resampled if none matches")
    g.add_argument("--bands", type=_ints, help="1-based bands to use, e.g. 1,2,3 (default: all but alpha)")
    g.add_argument("--reader", default="auto", choices=READERS,
                   help="force a backend (default: by file type)")
    g.add_argument("--missing-chunks", default="refuse", choices=("refuse", "nodata", "fill"),
                   help="zarr inputs with chunks not stored: refuse (default), mask them as nodata, or read "
                   "the array's fill value")
    if resample:
        g.add_argument("--force-resample", action="store_true",
                       help="let --mpp resample more than 8x (refused by default: usually a wrong scale)")


class _Parser(argparse.ArgumentParser):
    """argparse that names the nearest valid choice of a misspelt one."""

    def _check_value(self, action, value):
        if action.choices is not None and value not in action.choices:
            import difflib

            near = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            choices = ", ".join(map(repr, action.choices))
            raise argparse.ArgumentError(action, f"invalid choice: {value!r}{hint}; choose from {choices}")
        super()._check_value(action, value)


RUN_EXAMPLES = """examples:
  tilerseg run slide.svs --weights demo --tissue auto -o slide.mask.ome.tif     # a whole-slide image, QuPath/openslide
  tilerseg run scene.tif --weights model.pt -o buildings.tif                      # a GeoTIFF: a COG in its CRS
  tilerseg run xray.png --weights best.pt --bands 1,1,1 -o lungs.png              # a PNG, gray to 3 bands
"""


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="tilerseg", description="Seam-exact, out-of-core tiled segmentation.")
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    p.add_argument("--version", action="version", version=f"tilerseg {_version()}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", help="segment images into full-resolution masks", epilog=RUN_EXAMPLES,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("input", nargs="*", help="slides, TIFFs, GeoTIFFs, PNG/JPEGs or zarrs: one output each")
    r.add_argument("-o", "--output", help="output: .zarr (OME-Zarr), .ome.tif (pyramidal OME-TIFF), .tif (COG "
                   "for georeferenced inputs), .png, .geojson or .gpkg (polygons); or OUTDIR/ for one output "
                   "per input, <input>.mask.<--format>; default ./<input>.mask.zarr")
    r.add_argument("--manifest", help="text file, one input per line, optionally followed by its output")
    r.add_argument("--format", choices=("zarr", "ome.tif", "tif", "png", "geojson", "gpkg"),
                   help="output type for OUTDIR/ (default zarr)")
    r.add_argument("--resume", action="store_true", help="skip inputs the ledger (tilerseg-ledger.jsonl) has "
                   "done, and finish unfinished outputs from their finished blocks instead of starting over")
    r.add_argument("--config", help="YAML of run options (see pipelines/); flags override it")
    _input_args(r)
    m = r.add_argument_group("model")
    m.add_argument("--model", default="unet", help="registry name (see `tilerseg models`), default unet")
    m.add_argument("--weights", help="smp save_pretrained folder, .safetensors/.pt state dict, tilerseg checkpoint, "
                   "or `demo` for the shipped nuclei model")
    m.add_argument("--encoder", default="resnet34", help="encoder name (default resnet34)")
    m.add_argument("--classes", type=int, default=1, help="output classes (default 1: binary)")
    m.add_argument("--encoder-weights", type=_none_or_str, default=None,
                   help="pretrained encoder weights for an untrained model, e.g. imagenet (default none)")
    m.add_argument("--model-arg", type=_model_arg, action="append", metavar="KEY=VALUE",
                   help="extra model argument, repeatable: encoder_depth=3, decoder_attention_type=scse, "
                   "num_filters=16 (TernausNet)")
    m.add_argument("--mean", type=_floats, help="normalisation mean per band, in [0, 1] units (default ImageNet)")
    m.add_argument("--std", type=_floats, help="normalisation std per band (default ImageNet)")
    m.add_argument("--scale", type=float, help="divide pixels by this first (default: dtype maximum)")
    t = r.add_argument_group("tiling")
    t.add_argument("--tile", type=_tile, help="window side in px; z,y,x for volumetric models; default auto: "
                   "the largest window whose batch fits --memory-budget (fewer context pixels per output pixel)")
    t.add_argument("--memory-budget", help="memory one batch of windows may use for --tile auto, e.g. 2G "
                   "(default: a quarter of the RAM, half of the GPU memory, rounded down to a power of two)")
    t.add_argument("--halo", type=_halo, help="context on each side in px, or `auto` to measure the model's "
                   "receptive field (default: the checkpoint's, else the receptive field, so tiles are exact)")
    t.add_argument("--batch-size", type=int, help="windows per forward pass (default 4; volumes run one)")
    t.add_argument("--merge", default="auto", choices=("auto", *MERGE_MODES),
                   help="crop: keep window centres (exact for local models); gaussian: blend windows (nnU-Net); "
                   "auto (default): crop, or gaussian with half-window overlap for models with global context")
    t.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation: average over flips (4 views) or "
                   "flips and rotations (8); default: what the checkpoint recommends, else none")
    t.add_argument("--pad-mode", default="reflect", choices=PAD_MODES, help="border padding, numpy names (default reflect)")
    o = r.add_argument_group("output")
    o.add_argument("--probabilities", nargs="?", const="float32", choices=("float32", "uint8"),
                   help="write probabilities, one band per class (a binary model: P(foreground)); float32 (NaN = "
                   "nodata), or uint8 (round(p x 254), 255 = nodata) for 8-bit viewers such as openslide/QuPath")
    o.add_argument("--threshold", type=float,
                   help="binary threshold (default: the one the checkpoint records, else 0.5)")
    o.add_argument("--overwrite", action="store_true", help="replace an existing output")
    o.add_argument("--vector-crs", choices=("wgs84", "native"), help="GeoJSON coordinates of a georeferenced "
                   "input: wgs84 longitude/latitude as RFC 7946 says (default), or native: the input's CRS "
                   "(GeoPackage always keeps it)")
    o.add_argument("--preview", help="also write a PNG thumbnail with the mask overlaid")
    o.add_argument("--output-level", type=int, help="write the mask on this pyramid level of the input "
                   "(0: full resolution, upsampled) whatever --level/--mpp the model ran at")
    o.add_argument("--tissue", help="`auto`: find tissue on a thumbnail and skip windows without it; "
                   "or a mask file (non-zero = tissue)")
    e = r.add_argument_group("engine")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    e.add_argument("--precision", default="fp32", choices=PRECISIONS,
                   help="model arithmetic: fp16/bf16 autocast is faster on GPUs (default fp32, exact)")
    e.add_argument("--compile", action="store_true", help="torch.compile the model (slow start, faster batches)")
    e.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="forward pass on torch (default), ONNX Runtime or OpenVINO (exported once, cached beside "
                   "the weights; pip install tilerseg[cpu-fast]), or auto: the fastest on a short probe")
    e.add_argument("--workers", type=int, help="dask worker threads reading, running and writing blocks "
                   "(default: sized to the machine, 2 to 8)")
    e.add_argument("--scheduler", help="address of a running dask scheduler, e.g. tcp://host:8786")
    e.add_argument("--cluster", choices=("slurm", "pbs", "lsf"), help="start a batch-queue cluster through "
                   "dask-jobqueue for this run (with --cluster-config)")
    e.add_argument("--cluster-config", help="cluster YAML: queue, cores, memory, gpus, walltime, jobs "
                   "(see pipelines/cluster-slurm-gpu.yaml)")
    e.add_argument("--quiet", action="store_true", help="no progress bar")

    i = sub.add_parser("info", help="print size, levels, mpp, CRS, bands and dtype")
    i.add_argument("input")
    _input_args(i)

    g = sub.add_parser("ingest", help="copy an input into chunked zarr for reuse across a cluster")
    g.add_argument("input")
    g.add_argument("output", help="OUT.zarr")
    _input_args(g)
    g.add_argument("--chunk", type=int, default=1024, help="chunk side in px (default 1024)")
    g.add_argument("--workers", type=int, help="reader threads (default: sized to the machine)")
    g.add_argument("--overwrite", action="store_true")

    sub.add_parser("models", help="list the model registry")

    c = sub.add_parser("cluster-script", help="print the batch job script --cluster would submit")
    c.add_argument("cluster_config", metavar="CONFIG", help="cluster YAML, e.g. pipelines/cluster-slurm-gpu.yaml")
    c.add_argument("--cluster", choices=("slurm", "pbs", "lsf"), help="override the config's `cluster:` kind")
    c.add_argument("--scheduler", help="the address its worker connects to (e.g. of `dask scheduler`: "
                   "tcp://host:8786); without it the script has a placeholder to replace")

    h = sub.add_parser("halo", help="measure a model's receptive-field radius and recommend a halo")
    h.add_argument("--model", default="unet")
    h.add_argument("--weights")
    h.add_argument("--encoder", default="resnet34")
    h.add_argument("--encoder-depth", type=int, help="smp encoder_depth (default: the architecture's)")
    h.add_argument("--classes", type=int, default=1)
    h.add_argument("--in-channels", type=int, default=3, help="input bands (default 3; weights may fix it)")
    h.add_argument("--json", action="store_true", help='print {"radius": ..., "stride": ..., "halo": ...}')

    t = sub.add_parser("train", help="train a model on image/mask pairs from a YAML config (see pipelines/)")
    t.add_argument("train_config", metavar="CONFIG", help="training YAML, e.g. pipelines/em-membranes.yaml")
    t.add_argument("-o", "--output", help="run folder for best.pt, last.pt, history.csv/json, curves.png and "
                   "train.log (default runs/<config name>)")
    t.add_argument("--resume", action="store_true", help="continue the run in the output folder from last.pt")
    for flag, typ, what in (("--epochs", int, "epochs"), ("--batch-size", int, "crops per step"),
                            ("--lr", float, "learning rate"), ("--crop", int, "training crop side in px"),
                            ("--samples-per-epoch", int, "crops per epoch"), ("--seed", int, "random seed"),
                            ("--max-minutes", float, "stop after the epoch that passes this wall time"),
                            ("--augment", str, "none, light, medium or heavy"), ("--loss", str, "loss name"),
                            ("--device", str, "auto, cpu, cuda"), ("--precision", str, "auto, fp32, fp16, bf16"),
                            ("--loader-workers", int, "data loader processes")):
        t.add_argument(flag, type=typ, help=f"{what} (overrides the config)")
    t.add_argument("--set", dest="sets", action="append", type=_model_arg, default=[], metavar="KEY=VALUE",
                   help="override any config option (value read as YAML), repeatable")
    t.add_argument("--quiet", action="store_true", help="no progress bar")

    v = sub.add_parser("eval", help="score weights on images with masks, through the tiled engine")
    v.add_argument("images", help="an image, or a folder of them")
    v.add_argument("masks", help="its mask, or a folder of masks with matching names")
    v.add_argument("--weights", required=True, help="checkpoint from tilerseg train (or any --weights of run)")
    _input_args(v, resample=False)
    v.add_argument("--tile", type=int, help="window side (default: the checkpoint's, else 512)")
    v.add_argument("--halo", type=_halo, help="halo in px or auto (default: the checkpoint's, else 64)")
    v.add_argument("--batch-size", type=int)
    v.add_argument("--merge", default="auto", choices=("auto", *MERGE_MODES))
    v.add_argument("--tta", choices=TTA_MODES, help="test-time augmentation (default: the checkpoint's, else none)")
    v.add_argument("--threshold", type=float, help="binary threshold (default: the checkpoint's, else 0.5)")
    v.add_argument("--sweep-threshold", action="store_true",
                   help="score thresholds 0.05..0.95 and report the best (by overall IoU)")
    v.add_argument("--mask-values", type=_ints, help="mask value of each class (default: as in training)")
    v.add_argument("--mask-suffix", default="", help="mask names are image names plus this, e.g. _mask")
    v.add_argument("--device", default="auto")
    v.add_argument("--workers", type=int)
    v.add_argument("--json", action="store_true", help='print one JSON object {"images": [...], "overall": {...}}; two-class 2-D images also get the ISBI challenge scores (adapted_rand_error, vi_split, vi_merge, warping_error, splits, mergers)')

    p.subcommands = dict(sub.choices)
    d = sub.add_parser("demo", help="segment a synthetic slide with the shipped demo model (no download)")
    d.add_argument("outdir", nargs="?", default="tilerseg-demo", help="folder for slide, mask and preview")
    d.add_argument("--size", type=int, default=3072, help="slide side in px (default 3072)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _version() -> str:
    from . import __version__
    return __version__


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

        def one(input, output):
            if many:
                print(f"[{number[input, output]}/{len(jobs)}] {input} -> {output}", flush=True)
            progress, bar = _progress(a.quiet)
            with bar:
                return execute(input, output, job_cfg, progress=progress)

        def done(job, entry, report) -> None:
            if entry["status"] == "failed":
                print(f"tilerseg: error: {entry['error']}", file=sys.stderr, flush=True)
            else:
                _print_report(a, report)

        entries = run_jobs(jobs, ledger, one, resume=a.resume, on_done=done, reraise=a.debug)
    failed = [e for e in entries if e["status"] == "failed"]
    if many or a.manifest:
        print(f"{len(entries) - len(failed)} done, {len(failed)} failed, {len(jobs) - len(entries)} skipped "
              f"(already done); ledger {ledger}")
    if failed and many:
        print(f"tilerseg: {len(failed)} of {len(jobs)} inputs failed (errors above and in the ledger): "
              + ", ".join(e["input"] for e in failed), file=sys.stderr)
    return EXIT_ERROR if failed else 0


def _print_report(a, report) -> None:
    size = "x".join(str(v) for v in reversed(report.shape))
    unit = "voxels" if len(report.shape) == 3 else "px"
    tile = "x".join(str(v) for v in report.tile) if isinstance(report.tile, tuple) else report.tile
    print(f"wrote {report.output}: {size} {unit}, {report.windows} windows of {tile} px "
          f"(halo {report.halo}, stride {report.stride}) in {report.seconds:.1f} s, "
          f"{report.megapixels_per_second:.2f} M{'vox' if unit == 'voxels' else 'px'}/s", flush=True)
    if report.preview:
        print(f"wrote {os.path.abspath(report.preview)}")
    if report.windows_resumed:
        print(f"resumed: {report.windows_resumed} of {report.windows} windows were finished by an earlier run; "
              f"computed {report.windows_run}")
    if report.windows_skipped:
        why = "no tissue or all nodata" if a.tissue else "all nodata"
        print(f"skipped {report.windows_skipped} of {report.windows} windows "
              f"({report.windows_skipped / report.windows:.1%}): {why}")


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

    print(f"{'name':<16}{'class':<16}{'dims':<6}{'seam-exact':<12}aliases / why not")
    for name, row in sorted(ARCHITECTURES.items()):
        why = ", ".join(row.aliases) if row.local else row.why
        print(f"{name:<16}{row.cls:<16}{row.dims:<6}{'yes' if row.local else 'no':<12}{why}")
    print("\n--encoder takes any segmentation-models-pytorch encoder (default resnet34); tilerseg's own "
          "architectures (ternausnet, transunet, unet2d, unet3d) have fixed encoders.")
    print("\ntrained weights shipped with tilerseg (no download):\n"
          f"{'demo':<16}{'unet':<16}{'2':<6}{'yes':<12}nuclei on H&E-like RGB uint8 at 0.5 µm/px, 2 classes "
          "(background, nucleus): --weights demo, or segment(image, \"demo\")")
    return 0


def cmd_cluster_script(a) -> int:
    from .cluster import cluster_script

    print(cluster_script(a.cluster_config, a.cluster, a.scheduler), end="")
    return 0


def cmd_demo(a) -> int:
    from .demo import demo

    progress, bar = _progress(a.quiet)
    print(f"writing a {a.size}x{a.size} synthetic slide to {a.outdir}/slide.tif")
    with bar:
        res = demo(a.outdir, size=a.size, seed=a.seed, workers=a.workers, progress=progress)
    r = res["report"]
    print(f"wrote {res['mask']} ({r.windows} windows in {r.seconds:.1f} s, {r.megapixels_per_second:.2f} Mpx/s)")
    print(f"wrote {res['preview']}")
    print(f"Dice against the generator's truth: {res['dice']:.4f}")
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

    from .train import evaluate

    ev, th = evaluate(a.weights, a.images, a.masks, tile=a.tile, halo=a.halo, batch_size=a.batch_size,
                      merge=a.merge, tta=a.tta, threshold=a.threshold, sweep=a.sweep_threshold, level=a.level,
                      mpp=a.mpp, bands=a.bands, device=a.device, workers=a.workers, mask_values=a.mask_values,
                      mask_suffix=a.mask_suffix)
    rep = ev.report(th)
    if a.json:
        print(json.dumps(rep))
        return 0
    extra = "adapted_rand_error" in rep["overall"]
    print(f"{'image':<24}{'IoU':>8}{'Dice':>8}{'pixel error':>13}"
          + (f"{'Rand error':>12}{'warping error':>15}{'splits':>8}{'mergers':>8}" if extra else ""))
    for r in rep["images"] + [{"image": "overall", **rep["overall"]}]:
        print(f"{r['image'][:23]:<24}{r['iou']:>8.4f}{r['dice']:>8.4f}{r['pixel_error']:>13.4f}"
              + (f"{r['adapted_rand_error']:>12.4f}{r['warping_error']:>15.6f}{r['splits']:>8}{r['mergers']:>8}"
                 if extra else ""))
    o = rep["overall"]
    print("per class: " + ", ".join(f"{n} IoU {c['iou']:.4f} Dice {c['dice']:.4f}" for n, c in o["per_class"].items()))
    if "threshold" in rep:
        print(f"threshold {rep['threshold']:g}" + (" (best of the sweep)" if a.sweep_threshold else ""))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "halo": cmd_halo, "run": cmd_run, "info": cmd_info, "ingest": cmd_ingest, "models": cmd_models, "demo": cmd_demo,
            "cluster-script": cmd_cluster_script}


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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tilerseg: %(message)s"))
    log.addHandler(handler)
    log.propagate = False
    log.setLevel(logging.DEBUG if args.debug else logging.INFO)
    shown = warnings.showwarning
    warnings.showwarning = lambda msg, cat, *rest: print(f"tilerseg: warning: {msg}", file=sys.stderr)
    try:
        with warnings.catch_warnings():
            if not args.debug:
                warnings.filterwarnings("ignore", module="(rasterio|zarr|dask|distributed|timm|torch).*")
            warnings.simplefilter("always", UserWarning)
            return _command(args)
    finally:  # main() may be called again in this process (tests, notebooks)
        log.removeHandler(handler)
        warnings.showwarning = shown


def _command(args) -> int:
    from .errors import Terminated, TilersegError

    previous = _on_sigterm()
    try:
        return COMMANDS[args.command](args)
    except TilersegError as err:
        if args.debug:
            raise
        print(f"tilerseg: error: {err}", file=sys.stderr)
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
        text = " ".join(str(err).split())[:400]
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


if __name__ == "__main__":
    sys.exit(main())
