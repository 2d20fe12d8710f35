"""The command line's arguments: every subcommand, its flags and their
help, the value parsers, and argparse that names the nearest valid choice.
:mod:`tilerseg.cli` runs what they parse."""
from __future__ import annotations

import argparse

from .config import BACKENDS, MERGE_MODES, MISSING_CHUNKS, PAD_MODES, PRECISIONS, READERS, TTA_MODES, VECTOR_CRS


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
    g.add_argument("--missing-chunks", default="refuse", choices=MISSING_CHUNKS,
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
    r.add_argument("--ignore-pixel-size", action="store_true", help="run a model whose declared pixel size is in "
                   "another unit than the image's (µm against a CRS's metres); refused by default")
    m = r.add_argument_group("model")
    m.add_argument("--model", default="unet", help="registry name (see `tilerseg models`), default unet")
    m.add_argument("--weights", help="smp save_pretrained folder, .safetensors/.pt state dict, tilerseg checkpoint, "
                   "an ONNX file, a TorchScript or torch.export program (your own model: bands, classes and metadata "
                   "read from it; the format is read from the content), a bioimage.io package (.zip, folder, rdf.yaml), a "
                   "MONAI bundle folder, hf://ORG/NAME[@REV], or `demo` for the "
                   "shipped nuclei model (`tilerseg:demo` names it where a path named demo exists)")
    m.add_argument("--encoder", default="resnet34", help="encoder name (default resnet34)")
    m.add_argument("--classes", type=int, default=1, help="output classes (default 1: binary)")
    m.add_argument("--encoder-weights", type=_none_or_str, default=None,
                   help="pretrained encoder weights for an untrained model, e.g. imagenet (default none)")
    m.add_argument("--model-arg", type=_model_arg, action="append", metavar="KEY=VALUE",
                   help="extra model argument, repeatable: encoder_depth=3, decoder_attention_type=scse, "
                   "num_filters=16 (TernausNet); for an .onnx file: stride=N, output=logits|probabilities, "
                   "layout=NCHW|NHWC")
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
    o.add_argument("--vector-crs", choices=VECTOR_CRS, help="GeoJSON coordinates of a georeferenced "
                   "input: wgs84 longitude/latitude as RFC 7946 says (default), or native: the input's CRS "
                   "(GeoPackage always keeps it)")
    o.add_argument("--preview", help="also write a PNG thumbnail with the mask overlaid")
    o.add_argument("--instances", action="store_true", default=None,
                   help="objects, not only pixels: uint32 labels (0 = background, one id per object, the same "
                   "whatever the tiling), polygons with area, centroid and mean probability, and a .csv table")
    o.add_argument("--split-depth", type=float, help="--instances: split by h-maxima of this depth (px of the "
                   "distance transform: how much narrower a neck between touching objects must be than either) "
                   "instead of the default rule, which scales with each object's radius")
    o.add_argument("--min-area", type=int, help="--instances: drop objects under this many px (default 0)")
    o.add_argument("--max-object", type=int, help="--instances: refuse a foreground region wider or taller "
                   "than this, instead of cutting it (default 4096 px)")
    o.add_argument("--marker-threshold", type=float, help="--instances on a membrane map (EM): markers where "
                   "P(cell) is at least this, a watershed on the membrane probability closes gaps, objects parted "
                   "by one pixel of background (default: off, the distance split)")
    o.add_argument("--join-below", type=float, help="--instances with --marker-threshold: join neighbouring "
                   "cells whose shared boundary has a mean membrane probability under this, weakest first "
                   "(default: off)")
    o.add_argument("--object-threshold", type=float, help="--instances: the objects' foreground threshold, "
                   "when it should differ from the mask's --threshold (e.g. lower, for thin parting lines)")
    o.add_argument("--boundary-class", type=int, help="--instances: the class that marks boundaries in a "
                   "3-class model (default: a class named boundary or contour); its interiors seed the objects")
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
                   "the weights; pip install tilerseg[cpu-fast]), or auto: another runtime only where a short "
                   "probe finds it 5%% faster than torch")
    e.add_argument("--workers", type=int, help="dask worker threads reading, running and writing blocks "
                   "(default: sized to the machine, 2 to 8)")
    e.add_argument("--scheduler", help="address of a running dask scheduler, e.g. tcp://host:8786")
    e.add_argument("--cluster", choices=("slurm", "pbs", "lsf"), help="start a batch-queue cluster through "
                   "dask-jobqueue for this run (with --cluster-config)")
    e.add_argument("--cluster-config", help="cluster YAML: queue, cores, memory, gpus, walltime, jobs "
                   "(see pipelines/cluster-slurm-gpu.yaml)")
    e.add_argument("--concurrent", type=int, help="inputs of a batch run at once with --scheduler/--cluster "
                   "(default 4; without them one at a time, the model already uses every core)")
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

    ms = sub.add_parser("models", help="list the model registry, or describe weights (--describe)")
    ms.add_argument("--describe", metavar="WEIGHTS", help="what a weights file or hf:// repository is: format, "
                    "bands, classes, pixel size, halo, preprocessing, seam-exact or not")
    ms.add_argument("--model", default="unet", help="architecture of a bare state dict (default unet)")
    ms.add_argument("--encoder", default="resnet34", help="its encoder (default resnet34)")
    ms.add_argument("--classes", type=int, default=1, help="its classes (default 1)")

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
    v.add_argument("--regions", help="vector truth: 'image' (all known), or vector file(s) of the known areas")
    v.add_argument("--region-classes", type=lambda s: s.split(","), default=["Region"],
                   help="vector truth: classes marking known areas (comma-separated, default Region)")
    v.add_argument("--device", default="auto")
    v.add_argument("--workers", type=int)
    v.add_argument("--instances", action="store_true", help="also score the objects tilerseg run --instances "
                   "makes (their boundaries as class 0), beside the plain threshold (two classes, 2-D)")
    v.add_argument("--marker-threshold", type=float, help="--instances: as for run")
    v.add_argument("--split-depth", type=float, help="--instances: as for run")
    v.add_argument("--join-below", type=float, help="--instances: as for run")
    v.add_argument("--object-threshold", type=float, help="--instances: as for run")
    v.add_argument("--min-area", type=int, help="--instances: as for run")
    v.add_argument("--json", action="store_true", help='print one JSON object {"images": [...], "overall": {...}}; two-class 2-D images also get the ISBI challenge scores (adapted_rand_error, vi_split, vi_merge, warping_error, splits, mergers)')

    w = sub.add_parser("view", help="see an image and its segmentation in a browser (needs tilerseg[view])",
                       description="Serve one page that shows IMAGE with each OUTPUT as a layer over it. "
                       "OUTPUT alone finds its image from the output's record.")
    w.add_argument("paths", nargs="+", metavar="IMAGE [OUTPUT ...]",
                   help="an image tilerseg run reads, then masks, probabilities, GeoJSON/GPKG it wrote")
    w.add_argument("--port", type=int, help="port to listen on, 1..65535 (default: a free one)")
    w.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1, this machine "
                   "only; reach it from elsewhere through an SSH tunnel)")
    w.add_argument("--no-browser", action="store_true", help="only print the URL")

    p.subcommands = dict(sub.choices)
    d = sub.add_parser("demo", help="segment a synthetic slide with the shipped demo model (no download)")
    d.add_argument("outdir", nargs="?", default="tilerseg-demo", help="folder for slide, mask and preview")
    d.add_argument("--size", type=int, default=3072, help="slide side in px (default 3072)")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--workers", type=int, default=2)
    d.add_argument("--quiet", action="store_true", help="no progress bar")
    d.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier demo in OUTDIR")
    return p


def _version() -> str:
    from . import __version__
    return __version__
