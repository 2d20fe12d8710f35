"""The house: the import graph read from the modules' own imports, the one
table of architectures, and start-up without torch."""
import ast
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "tilerseg"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in PKG.rglob("*.py"):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = f
    return mods


def _imports(name: str, f: Path, mods) -> list[tuple[str, list[str]]]:
    """``(module, names)`` for every import of a tilerseg module in ``f``,
    at any depth (function-level imports count too)."""
    out = []
    pkg = name.split(".") if f.name == "__init__.py" else name.split(".")[:-1]
    for n in ast.walk(ast.parse(f.read_text())):
        if isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg[:len(pkg) - n.level + 1]
                m = ".".join(base + ([n.module] if n.module else []))
            else:
                m = n.module or ""
            if not m.startswith("tilerseg"):
                continue
            names = [a.name for a in n.names]
            subs = [f"{m}.{a}" for a in names if f"{m}.{a}" in mods]
            out += [(s, []) for s in subs] + ([(m, [a for a in names if f"{m}.{a}" not in mods])] if m in mods else [])
        elif isinstance(n, ast.Import):
            out += [(a.name, []) for a in n.names if a.name in mods]
    return [(m, ns) for m, ns in out if m != name]


@pytest.fixture(scope="module")
def graph():
    mods = _modules()
    return mods, {m: _imports(m, f, mods) for m, f in mods.items()}


def test_no_import_cycles(graph):
    mods, g = graph
    edges = {m: {d for d, _ in deps if d != "tilerseg"} for m, deps in g.items()}
    state, cycles = {}, []

    def visit(v, path):
        state[v] = 1
        for w in edges.get(v, ()):
            if state.get(w) == 1:
                cycles.append(" -> ".join(path[path.index(w):] + [w]))
            elif w not in state:
                visit(w, path + [w])
        state[v] = 2

    for v in edges:
        if v not in state:
            visit(v, [v])
    assert not cycles, cycles


def test_io_imports_nothing_above_it(graph):
    _, g = graph
    above = ("tilerseg.engine", "tilerseg.api", "tilerseg.cli", "tilerseg.batch", "tilerseg.train",
             "tilerseg.tiling", "tilerseg.infer", "tilerseg.models", "tilerseg.preview", "tilerseg.demo")
    bad = [f"{m} imports {d}" for m, deps in g.items() if m.startswith("tilerseg.io") for d, _ in deps
           if d.startswith(above)]
    assert not bad, bad


def test_no_module_imports_another_modules_private_names(graph):
    _, g = graph
    bad = [f"{m} imports {d}.{n}" for m, deps in g.items() for d, names in deps for n in names
           if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_only_the_engine_creates_dask_graphs_or_pools():
    makers = ("ThreadPoolExecutor", "ProcessPoolExecutor", "dask.delayed", "dask.compute", "da.store",
              "dask.threaded", "multiprocessing.Pool", "from_delayed")
    bad = []
    for f in PKG.rglob("*.py"):
        if f.name == "engine.py":
            continue
        text = f.read_text()
        bad += [f"{f.relative_to(PKG)}: {m}" for m in makers if m in text]
    assert not bad, bad


def test_dask_and_distributed_are_imported_by_the_engine_and_the_cluster_module_only(graph):
    """What makes graphs and starts workers is in one place (issue 24): the
    allocator gives the cluster module its settings, it does not import
    distributed. infer.py asks which dask worker it runs on, to pick its GPU."""
    mods, _ = graph
    allowed = {"tilerseg.engine", "tilerseg.cluster", "tilerseg.infer"}
    bad = []
    for name, f in mods.items():
        for n in ast.walk(ast.parse(f.read_text())):
            roots = [a.name for a in n.names] if isinstance(n, ast.Import) else \
                [n.module or ""] if isinstance(n, ast.ImportFrom) and not n.level else []
            bad += [f"{name}: {r}" for r in roots if r.split(".")[0] in ("dask", "distributed", "dask_jobqueue")
                    and name not in allowed]
    assert not bad, bad


def test_architecture_table_matches_smp():
    import segmentation_models_pytorch as smp

    from tilerseg.models import ARCHITECTURES

    smp_rows = {n: a.cls for n, a in ARCHITECTURES.items() if a.smp}
    assert smp_rows == {n: c.__name__ for n, c in smp.MODEL_ARCHITECTURES_MAPPING.items()}


def test_unknown_model_names_the_nearest():
    from tilerseg.errors import ModelError
    from tilerseg.models import canonical

    with pytest.raises(ModelError, match="did you mean 'unetplusplus'"):
        canonical("unetplusplu")


def _fresh(code: str, cwd=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                          cwd=cwd)


def test_help_info_models_and_path_errors_do_not_import_torch(tmp_path):
    """What answers without a model must not pay for torch, timm and smp."""
    code = f"""
import sys, contextlib, io
from tilerseg import cli
calls = [["--help"], ["models"], ["run", "missing.tif", "-o", "m.zarr"],
         ["run", "{tmp_path}/x.tif", "-o", "{tmp_path}/nodir/m.zarr"], ["info", "missing.svs"],
         ["run", "missing.tif", "--tile", "abc"], ["eval", "--weights", "w.pt", "a", "b", "--halo", "x"]]
for argv in calls:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        try:
            cli.main(argv)
        except SystemExit:
            pass
heavy = [m for m in ("torch", "timm", "segmentation_models_pytorch") if m in sys.modules]
print("HEAVY", heavy)
"""
    r = _fresh(code, cwd=tmp_path)  # its failed-input ledger lines land there, not in the checkout
    assert "HEAVY []" in r.stdout, r.stdout + r.stderr


@pytest.mark.slow
def test_a_missing_input_answers_in_well_under_two_seconds(tmp_path):
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "tilerseg.cli", "run", "missing.tif", "-o", str(tmp_path / "m.zarr")],
                       capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"), timeout=60)
    took = time.perf_counter() - t0
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "missing.tif" in r.stderr
    assert took < 3.0, took  # 0.2-0.4 s measured on 2 cores; the bound leaves room for a loaded CI machine


def test_started_with_env_reads_the_environment_the_process_was_started_with(tmp_path):
    """glibc reads MALLOC_* once, at exec: what counts is /proc/PID/environ,
    not os.environ as changed since (as a nanny's env= changes it)."""
    import subprocess
    import sys

    from tilerseg.allocator import WORKER_ENV, started_with_env

    def environ(env: dict):
        path = tmp_path / "environ"
        path.write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()) + b"\0")
        return str(path)

    assert started_with_env(environ({"PATH": "/bin", **WORKER_ENV}))
    assert not started_with_env(environ({"PATH": "/bin", "MALLOC_ARENA_MAX": "1"}))
    assert not started_with_env(environ({**WORKER_ENV, "MALLOC_ARENA_MAX": "8"}))
    assert started_with_env(environ({"TILERSEG_MALLOC": "system"}))  # turned off on purpose
    code = ("import os, sys; from tilerseg.allocator import WORKER_ENV, started_with_env; "
            "os.environ.update(WORKER_ENV); print(started_with_env())")
    late = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={k: v for k, v in os.environ.items() if k not in WORKER_ENV})
    early = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           env=dict(os.environ, **WORKER_ENV))
    assert (late.stdout.strip(), early.stdout.strip()) == ("False", "True"), (late.stderr, early.stderr)


def test_the_allocator_keeps_blocks_in_the_heap_in_a_fresh_process():
    """``tilerseg`` sets glibc to serve large blocks from its heap (no mmap):
    a fresh process that calls keep_heap() and then allocates 256 MiB in a
    new thread maps no new region of that size; without it, one appears."""
    import subprocess
    import sys

    code = r'''
import os, sys, threading
if sys.argv[1] == "heap":
    from tilerseg.allocator import keep_heap
    assert keep_heap()
def maps():  # anonymous mappings (the heap, [heap], is named)
    with open("/proc/self/maps") as f:
        return {ln.split()[0] for ln in f if len(ln.split()) == 5}
big = []
def grab():
    before = maps()
    buf = bytearray(256 * 2 ** 20)
    after = maps()
    big.append(any(int(r.split("-")[1], 16) - int(r.split("-")[0], 16) >= 256 * 2 ** 20 for r in after - before))
t = threading.Thread(target=grab); t.start(); t.join()
print(big[0])
'''
    out = {m: subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True) for m in ("heap", "glibc")}
    assert out["glibc"].stdout.strip() == "True", out["glibc"].stderr  # glibc maps a 256 MiB block afresh
    assert out["heap"].stdout.strip() == "False", out["heap"].stderr  # tilerseg's setting: from the heap


@pytest.mark.slow
def test_the_allocator_keeps_freed_memory_above_a_gibibyte():
    """A 2240 px window's activations (2.7 GiB) were returned to the system
    after the largest layers at a 1 GiB trim threshold, and faulted in again
    at the next (350,000 faults a window): trimming is off. A fresh process
    that frees 1.5 GiB at the top of its heap keeps the heap; without the
    setting glibc shrinks it."""
    import subprocess
    import sys

    code = r'''
import sys
if sys.argv[1] == "heap":
    from tilerseg.allocator import keep_heap
    assert keep_heap()
else:
    import ctypes
    ctypes.CDLL("libc.so.6").mallopt(-4, 0)  # no mmap, as tilerseg, so the block comes from the heap
def heap():
    with open("/proc/self/maps") as f:
        r = [ln.split()[0] for ln in f if ln.rstrip().endswith("[heap]")][0]
    return int(r.split("-")[1], 16) - int(r.split("-")[0], 16)
buf = bytearray(3 * 2 ** 29)
grown = heap()
del buf
print(grown >= 3 * 2 ** 29, heap() >= 3 * 2 ** 29)
'''
    out = {m: subprocess.run([sys.executable, "-c", code, m], capture_output=True, text=True) for m in ("heap", "glibc")}
    assert out["glibc"].stdout.split() == ["True", "False"], out["glibc"].stderr  # glibc trims it back
    assert out["heap"].stdout.split() == ["True", "True"], out["heap"].stderr  # tilerseg keeps it
