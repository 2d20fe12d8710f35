"""Many inputs in one run: output names, manifests and the ledger.

Each input gets its own output. After each input, one JSON line is
appended to ``tilerseg-ledger.jsonl`` in the output folder (beside the
output file for a single input): ``input``, ``output``, ``status``
(``done`` or ``failed``), ``windows_computed``, ``windows_total``,
``seconds``, ``throughput`` (Mpx/s, Mvox/s for volumes), ``error``, and
when it ``finished``. A failed input does not stop the others. With
``resume``, inputs whose last ledger line is ``done`` (and whose output
exists) are skipped, and an unfinished output continues where it stopped."""
from __future__ import annotations

import json
import logging
import os
import shlex
import time
from dataclasses import dataclass
from typing import Callable

from .errors import InputError, Terminated, TilersegError
from .io.remote import mask_text

log = logging.getLogger(__name__)
LEDGER = "tilerseg-ledger.jsonl"
DEFAULT_FORMAT = "zarr"
FORMATS = ("zarr", "ome.tif", "tif", "png", "geojson", "gpkg")


@dataclass(frozen=True)
class Job:
    input: str
    output: str


def default_output(input: str, folder: str = "", fmt: str = DEFAULT_FORMAT) -> str:
    """``<folder>/<input name without its extension>.mask.<fmt>``: inner dots
    stay (``RGB.byte.tif`` -> ``RGB.byte.mask.zarr``); compound extensions
    such as ``.ome.tif`` go whole."""
    stem = _stem(os.path.basename(os.fspath(input).rstrip("/"))) or "input"
    name = f"{stem}.mask.{fmt.lstrip('.')}"
    return f"{folder.rstrip('/')}/{name}" if "://" in folder else os.path.join(folder, name)


def _stem(name: str) -> str:
    from .io.open import GEO_EXT, IMAGE_EXT, SLIDE_EXT, TIFF_EXT

    low = name.lower()
    for ext in sorted({*SLIDE_EXT, *TIFF_EXT, *IMAGE_EXT, *GEO_EXT, ".zarr", ".ome.zarr"}, key=len, reverse=True):
        if low.endswith(ext) and len(name) > len(ext):
            return name[:-len(ext)]
    return os.path.splitext(name)[0]


def _ledger_beside(path: str) -> str:
    """The ledger in ``path``'s folder; in the current folder for URL outputs
    (object stores cannot append)."""
    return os.path.abspath(LEDGER) if "://" in path else os.path.join(os.path.abspath(path), LEDGER)


def is_folder_output(output: str | None) -> bool:
    """``-o OUTDIR/``: a trailing slash, or an existing folder that is not a zarr output."""
    if not output:
        return False
    if output.endswith(("/", os.sep)):
        return True
    return os.path.isdir(output) and not output.rstrip("/").lower().endswith(".zarr")


def read_manifest(path: str) -> list[tuple[str, str | None]]:
    """``(input, output or None)`` per line of a manifest: one input per
    line, optionally followed by its output (quote paths with spaces);
    blank lines and ``#`` comments are ignored. Relative paths are relative
    to the manifest's folder."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as err:
        raise InputError(f"--manifest {path}: cannot read it ({err.strerror or err}); give a text file with one "
                         "input per line") from None
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            parts = shlex.split(line, comments=True)
        except ValueError as err:
            raise InputError(f"--manifest {path}, line {n}: {err}; quote paths with spaces") from None
        if not parts:
            continue
        if len(parts) > 2:
            raise InputError(f"--manifest {path}, line {n}: expected `INPUT [OUTPUT]`, got {len(parts)} fields; "
                             "quote paths with spaces")
        resolve = (lambda p: p if "://" in p or os.path.isabs(p) else os.path.join(base, p))
        out.append((resolve(parts[0]), resolve(parts[1]) if len(parts) == 2 else None))
    if not out:
        raise InputError(f"--manifest {path}: no inputs in it")
    return out


def plan_jobs(inputs: list[str], output: str | None, *, manifest: str | None = None,
              fmt: str | None = None) -> tuple[list[Job], str]:
    """The ``(input, output)`` pairs of a run and where its ledger goes.

    One input with ``-o FILE``: that file, ledger beside it. Several inputs,
    a manifest or ``-o OUTDIR/``: one output per input in OUTDIR (``.``
    by default), named ``<input>.mask.<fmt>`` unless the manifest names it."""
    pairs: list[tuple[str, str | None]] = [(i, None) for i in inputs]
    if manifest:
        pairs += read_manifest(manifest)
    if not pairs:
        raise InputError("no input given: name images, or --manifest LIST")
    if fmt and fmt.lstrip(".") not in FORMATS:
        raise InputError(f"--format {fmt}: use one of {', '.join(FORMATS)}")
    folder_mode = len(pairs) > 1 or manifest is not None or is_folder_output(output)
    if not folder_mode:
        single = output or default_output(pairs[0][0], "", fmt or DEFAULT_FORMAT)
        return [Job(pairs[0][0], single)], _ledger_beside(single if "://" in single else os.path.dirname(
            os.path.abspath(single)))
    if output and not is_folder_output(output) and os.path.exists(output):
        raise InputError(f"-o {output}: several inputs need an output folder; give -o OUTDIR/")
    folder = output or "."
    if "://" not in folder:
        os.makedirs(folder, exist_ok=True)
    jobs, seen = [], {}
    sources = {os.path.realpath(i) for i, _ in pairs if "://" not in i} | \
        ({os.path.realpath(manifest)} if manifest else set())
    for inp, out in pairs:
        path = out or default_output(inp, folder, fmt or DEFAULT_FORMAT)
        path = path if "://" in path else os.path.abspath(path)
        if path in seen:
            raise InputError(f"{inp} and {seen[path]} would both write {path}: give outputs in a manifest "
                             "(`INPUT OUTPUT` per line)")
        if "://" not in path and os.path.realpath(path) in sources:
            raise InputError(f"{path}: the output of {inp} is an input of this run; tilerseg never writes over its "
                             "inputs: give another output")
        seen[path] = inp
        jobs.append(Job(inp, path))
    return jobs, _ledger_beside(folder)


def read_ledger(path: str) -> dict[tuple[str, str], dict]:
    """The last entry per ``(input, output)``; unreadable lines are skipped
    (a line cut short by a crash)."""
    last: dict[tuple[str, str], dict] = {}
    if not os.path.exists(path):
        return last
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                e = json.loads(line)
                last[(e["input"], e["output"])] = e
            except (ValueError, KeyError, TypeError):
                continue
    return last


def append_ledger(path: str, entry: dict, *, warn: bool = True) -> None:
    """One JSON line, written and flushed at once (a crash loses at most it).
    No ledger where its folder does not exist (the run's error says why).
    ``warn`` False: a ledger that cannot be written is logged at debug level
    only (a failed job: its own error already says when the folder cannot be
    written, and --resume reruns a failed job whether or not it is recorded)."""
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        log.debug("no ledger: %s does not exist", os.path.dirname(path))
        return
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        log.log(logging.WARNING if warn else logging.DEBUG, "could not write the ledger %s: %s", path,
                err.strerror or err)


def _now() -> str:
    """The ledger's ``finished`` time."""
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def _exists(path: str) -> bool:
    """An output, local or at a URL."""
    if "://" not in path:
        return os.path.exists(path)
    from .io.remote import filesystem

    fs, root = filesystem(path)
    return fs.exists(root)


def _key(job: Job) -> tuple[str, str]:
    """The ledger's names for a job: URLs with credentials masked."""
    from .io.remote import display

    return display(os.fspath(job.input)), display(os.fspath(job.output))


def run_jobs(jobs: list[Job], ledger: str, run: Callable, *, resume: bool = False,
             on_done: Callable | None = None, reraise: bool = False, at_once: int = 1) -> list[dict]:
    """Run ``run(input, output)`` (returning a :class:`~tilerseg.api.RunReport`)
    for each job, appending a ledger entry per job; errors are recorded,
    not raised (except an interrupt). ``on_done(job, entry, report)`` is
    called after each job (``reraise``: a failure is recorded, then raised).

    ``at_once`` jobs run together, on threads of this process (for a
    distributed scheduler, whose workers then take the tasks of several
    inputs at a time instead of waiting for one input's last block and its
    conversion). An interrupt (Ctrl-C, SIGTERM) records every unfinished
    job as failed, then propagates. Returns the entries of this run,
    skipped jobs left out, in the order they finished."""
    before = read_ledger(ledger) if resume else {}
    todo = []
    for job in jobs:
        prev = before.get(_key(job))
        if resume and prev and prev.get("status") == "done" and _exists(job.output):
            log.info("%s: done in the ledger (%s), skipped", job.input, job.output)
            continue
        todo.append(job)
    entries: list[dict] = []

    def record(job, entry, report) -> None:
        entry["finished"] = _now()
        append_ledger(ledger, entry, warn=entry["status"] == "done")  # a failure says one line: its own
        entries.append(entry)
        if on_done is not None:
            on_done(job, entry, report)

    def attempt(job):
        t0 = time.perf_counter()
        entry = {"input": _key(job)[0], "output": _key(job)[1]}
        try:
            report = run(job.input, job.output)
        except KeyboardInterrupt:
            raise
        except Exception as err:  # recorded; the next input goes on
            if isinstance(err, TilersegError):
                text = mask_text(str(err))
            else:
                text = (f"internal error: {type(err).__name__}: {mask_text(' '.join(str(err).split())[:300])} (rerun with "
                        "--debug for the traceback and report it)")
                log.debug("%s failed", job.input, exc_info=True)
            entry.update(status="failed", windows_computed=None, windows_total=None,
                         seconds=round(time.perf_counter() - t0, 3), throughput=None, error=text)
            return entry, None, err
        entry.update(status="done", windows_computed=report.windows_run, windows_total=report.windows,
                     seconds=round(time.perf_counter() - t0, 3),
                     throughput=round(report.megapixels_per_second, 4), error=None)
        return entry, report, None

    def stopped(job, err, t0) -> dict:
        what = "terminated by SIGTERM (walltime or scancel)" if isinstance(err, Terminated) else \
            "interrupted (Ctrl-C)"
        return {"input": _key(job)[0], "output": _key(job)[1], "status": "failed", "windows_computed": None,
                "windows_total": None, "seconds": round(time.perf_counter() - t0, 3), "throughput": None,
                "error": f"{job.input}: {what}; rerun the same command with --resume to continue",
                "finished": _now()}

    if at_once <= 1 or len(todo) <= 1:
        for job in todo:
            t0 = time.perf_counter()
            try:
                entry, report, err = attempt(job)
            except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: recorded, then the run stops
                append_ledger(ledger, stopped(job, stop, t0))
                raise
            record(job, entry, report)
            if err is not None and reraise:
                raise err
        return entries
    _run_together(todo, attempt, record, stopped, at_once, reraise, ledger)
    return entries


def _run_together(todo, attempt, record, stopped, at_once: int, reraise: bool, ledger: str) -> None:
    """:func:`run_jobs` with ``at_once`` jobs on threads. The main thread
    waits and writes the ledger, so an interrupt lands there; the jobs in
    flight are then written as failed and left to stop with the client."""
    import concurrent.futures as cf

    from .engine import input_pool

    pool = input_pool(min(at_once, len(todo)))
    started, futures, recorded = {}, {}, set()
    try:
        for job in todo:
            started[job] = time.perf_counter()
            futures[pool.submit(attempt, job)] = job
        for fut in cf.as_completed(futures):
            job = futures[fut]
            entry, report, err = fut.result()
            record(job, entry, report)
            recorded.add(job)
            if err is not None and reraise:
                raise err
    except KeyboardInterrupt as stop:
        for fut, job in futures.items():
            if job not in recorded:
                fut.cancel()
                append_ledger(ledger, stopped(job, stop, started[job]))
        raise
    finally:
        # jobs still running (an interrupt, --debug) end when the caller closes their client; do not wait here
        pool.shutdown(wait=False, cancel_futures=True)
