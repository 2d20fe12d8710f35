"""Keep the C allocator from handing the model's activations back to the
operating system after every layer.

glibc's malloc serves blocks above a threshold (128 KiB, growing to at most
32 MiB) with fresh ``mmap`` pages and unmaps them on ``free``. A U-Net
window's activations are larger, so every layer of every batch faults its
output into new zeroed pages. Threads other than the first get arenas whose
heaps stop at 64 MiB, so there larger blocks are mapped afresh whatever the
threshold. A dask nanny makes it worse: it starts workers with
``MALLOC_TRIM_THRESHOLD_=65536``, which also fixes the mmap threshold at
128 KiB.

Measured on a 2-core AMD EPYC (AVX2, fp32), the demo U-Net, 2 windows of
1728 px run on a pool thread with 2 torch threads: 8.3-8.6 s a batch as
glibc ships, 5.0-5.9 s with one arena, no mmap and a 1 GiB trim threshold;
4 windows of 512 px on the main thread with 1 torch thread: 1.4-1.5 s as
glibc ships, 1.8-2.1 s under a nanny's setting, 1.0-1.2 s with no mmap and
the trim threshold raised.
Peak memory is the same (the blocks are reused, not returned); the process
keeps the freed memory for its next batch instead of returning it.

Trimming is off, not merely raised: at a threshold of 1 GiB, a window of
2240 px (the demo U-Net's activations, about 2.7 GiB) still returned the top
of the heap after its largest layers, and faulted it in again at the next:
about 350,000 page faults and 1.2 s of system time per window, 2.8-2.9 s
against 3.5-4.1 s with trimming off (0 faults), same EPYC, 2 torch threads.

:func:`keep_heap` sets this for the process: the ``tilerseg`` command calls
it first, before it starts threads (one arena holds only for threads started
after). Dask workers are started by others: :data:`WORKER_ENV` is the
environment to start them with (the job scripts of ``--cluster`` export it;
set it for ``dask worker`` yourself), and the first model a worker builds
turns off the trimming its nanny set to 64 KiB. ``TILERSEG_MALLOC=system``
leaves the allocator alone.

glibc reads these variables once, when the process starts, and a worker's
threads have their arenas before its first task runs, so setting them later
does nothing: ``LocalCluster(env=...)`` and the config
``distributed.nanny.environ`` set them inside the worker after it started.
Use ``distributed.nanny.pre-spawn-environ`` (or export them before
``dask worker``; :func:`tilerseg.cluster.nanny_config` gives that config:
what starts workers lives with the cluster code, and this module imports
neither dask nor distributed). Measured on the same EPYC, one 1728 px window of the
demo model with one torch thread in a dask worker: 3.7-4.3 s with the
variables given through ``env=`` (1.7 million page faults per 4 windows,
5 s of system time), 2.5 s given before the start (200 faults), as in a
plain process. :func:`started_with_env` tells which a worker got; the run
warns once when one of its workers did not (:func:`tilerseg.engine.warm_workers`)."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

WORKER_ENV = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0"}
TRIM_THRESHOLD = -1  # glibc: "-1 disables trimming completely" (mallopt(3)); freed memory stays for the next batch
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt's parameters (malloc.h)


def left_alone(env) -> bool:
    """Whether ``env`` turns tilerseg's allocator settings off (``TILERSEG_MALLOC=system``)."""
    return env.get("TILERSEG_MALLOC", "").lower() == "system"


@functools.lru_cache(maxsize=None)
def keep_heap() -> bool:
    """Turn glibc's heap trimming off (:data:`TRIM_THRESHOLD`), stop serving
    blocks with ``mmap`` and keep one arena for threads started from now
    on. Returns whether it applied (glibc on Linux, not turned off)."""
    if left_alone(os.environ) or not os.uname().sysname == "Linux":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt
        return False
    ok = mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    ok &= mallopt(_M_MMAP_MAX, 0) == 1
    ok &= mallopt(_M_ARENA_MAX, 1) == 1
    log.debug("allocator: no trimming, no mmap, one arena: %s", "set" if ok else "not set")
    return bool(ok)


def started_with_env(environ_file: str = "/proc/self/environ") -> bool:
    """Whether this process was started with :data:`WORKER_ENV` (or with
    ``TILERSEG_MALLOC=system``): the environment it was executed with, which
    is what glibc read, not ``os.environ`` as changed since. True where
    that cannot be told (not Linux)."""
    try:
        with open(environ_file, "rb") as f:
            pairs = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    except OSError:
        return True
    env = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in pairs}
    return left_alone(env) or all(env.get(k) == v for k, v in WORKER_ENV.items())


def worker_env_advice() -> str:
    """What to do about a worker started without :data:`WORKER_ENV`."""
    names = " ".join(f"{k}={v}" for k, v in WORKER_ENV.items())
    return (f"start `dask worker` with {names} exported (with LocalCluster, in the config "
            "distributed.nanny.pre-spawn-environ, see tilerseg.cluster.nanny_config: env= is set after the worker "
            "started, too late for glibc); "
            "--cluster job scripts do this")
