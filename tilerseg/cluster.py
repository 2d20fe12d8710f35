"""Where a run's tasks go: threads here (the default), an existing dask
scheduler (``--scheduler tcp://host:8786``), or a batch-queue cluster that
tilerseg starts through dask-jobqueue (``--cluster slurm|pbs|lsf`` with a
YAML cluster config, see ``pipelines/cluster-*.yaml``).

Cluster config keys: ``cluster`` (slurm, pbs or lsf), ``jobs`` (how many
batch jobs to start), and per job ``queue``, ``account``, ``walltime``,
``cores``, ``memory``, ``gpus`` (one worker process per GPU, each holding
the model once), ``processes`` (without GPUs), ``local_directory``,
``job_script_prologue`` (lines run before the worker: modules, venv),
``job_extra_directives``, ``worker_extra_args``, ``python``, ``interface``,
``log_directory``, ``job_name``. Every worker must reach the inputs and
the output folder (a shared filesystem)."""
from __future__ import annotations

import contextlib
import logging

from .errors import InputError

log = logging.getLogger(__name__)
KINDS = ("slurm", "pbs", "lsf")
PASSED = ("queue", "account", "walltime", "cores", "memory", "processes", "local_directory", "job_script_prologue",
          "job_extra_directives", "worker_extra_args", "python", "interface", "log_directory", "job_name",
          "death_timeout")
KEYS = ("cluster", "jobs", "gpus", *PASSED)


def load_cluster_config(path: str, kind: str | None = None) -> tuple[str, dict]:
    """``(kind, config)`` from a cluster YAML; ``kind`` overrides its ``cluster`` key."""
    from .config import read_mapping

    cfg = dict(read_mapping(path, "cluster config", "--cluster-config"))
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise InputError(f"{path}: unknown key(s) {', '.join(unknown)}; cluster configs take {', '.join(KEYS)}")
    kind = (kind or cfg.get("cluster") or "").lower()
    if kind not in KINDS:
        raise InputError(f"{path}: cluster kind {kind or '(none)'!r}: set `cluster:` to one of {', '.join(KINDS)} "
                         "or pass --cluster")
    for key in ("cores", "memory"):
        if not cfg.get(key):
            raise InputError(f"{path}: `{key}` is required (per batch job, e.g. cores: 8, memory: 64GB)")
    return kind, cfg


def jobqueue_kwargs(kind: str, cfg: dict) -> dict:
    """dask-jobqueue cluster arguments for ``cfg``: one worker process per
    GPU (with the scheduler's GPU request), else ``processes``."""
    from .allocator import WORKER_ENV

    kw = {k: cfg[k] for k in PASSED if cfg.get(k) is not None}
    kw.setdefault("job_name", "tilerseg")
    # the workers' allocator keeps activations in its heap (tilerseg.allocator); the user's lines come after
    prologue = kw.get("job_script_prologue") or []
    kw["job_script_prologue"] = [f"export {k}={v}" for k, v in WORKER_ENV.items()] + (
        [prologue] if isinstance(prologue, str) else list(prologue))
    gpus = int(cfg.get("gpus") or 0)
    if gpus:
        kw["processes"] = gpus
        extra = list(kw.get("job_extra_directives") or [])
        if kind == "slurm":
            extra.append(f"--gres=gpu:{gpus}")
        elif kind == "lsf":
            extra.append(f'-gpu "num={gpus}"')
        else:  # PBS Pro: GPUs go in the select statement
            kw["resource_spec"] = f"select=1:ncpus={cfg['cores']}:ngpus={gpus}:mem={cfg['memory']}"
        if extra:
            kw["job_extra_directives"] = extra
    if kind == "lsf" and "account" in kw:
        kw["project"] = kw.pop("account")
    return kw


def nanny_config() -> dict:
    """Dask config under which a nanny starts its workers with the
    allocator settings (:data:`tilerseg.allocator.WORKER_ENV`) from exec on,
    as a job script's ``export`` does:
    ``with dask.config.set(nanny_config()): LocalCluster(...)``."""
    import dask

    from .allocator import WORKER_ENV

    key = "distributed.nanny.pre-spawn-environ"
    return {key: {**dask.config.get(key, {}), **WORKER_ENV}}


def worker_memory(scheduler) -> int | None:
    """The memory limit of the smallest worker of a distributed
    ``scheduler`` (a ``distributed.Client``), in bytes: of the workers
    connected, else, for a jobqueue cluster whose jobs have not started
    yet, its jobs' ``memory`` over their ``processes``. None for threads
    here, or where no limit is known (workers started without one)."""
    info = getattr(scheduler, "scheduler_info", None)
    if info is None:
        return None
    limits = [w.get("memory_limit") or 0 for w in info().get("workers", {}).values()]
    if any(limits):
        return min(v for v in limits if v)
    spec = getattr(getattr(scheduler, "cluster", None), "new_spec", None)
    options = spec.get("options", {}) if isinstance(spec, dict) else {}
    if options.get("memory"):
        from dask.utils import parse_bytes

        return int(parse_bytes(options["memory"]) / max(1, int(options.get("processes") or 1)))
    return None


def _cluster_class(kind: str):
    try:
        import dask_jobqueue
    except ImportError:  # pragma: no cover - a dependency
        raise InputError("--cluster needs dask-jobqueue: pip install dask-jobqueue") from None
    return {"slurm": dask_jobqueue.SLURMCluster, "pbs": dask_jobqueue.PBSCluster, "lsf": dask_jobqueue.LSFCluster}[kind]


def make_cluster(kind: str, cfg: dict):
    """The dask-jobqueue cluster object (its scheduler runs in this process)."""
    return _cluster_class(kind)(scheduler_options={"dashboard_address": ":0"}, **jobqueue_kwargs(kind, cfg))


PLACEHOLDER = "tcp://SCHEDULER-HOST:8786"


def cluster_script(path: str, kind: str | None = None, scheduler: str | None = None) -> str:
    """The batch job script ``--cluster`` would submit for the config at
    ``path``, its worker connecting to ``scheduler`` (a placeholder address
    without one). Submitted by hand (``sbatch``), it adds a worker to a
    scheduler started elsewhere (``dask scheduler``); its worker name is
    made unique per job by the shell, so several submissions can join."""
    kind, cfg = load_cluster_config(path, kind)
    cls = _cluster_class(kind)
    name = "tilerseg-$(hostname)-$$"
    return cls.job_cls(scheduler or PLACEHOLDER, name=name, **jobqueue_kwargs(kind, cfg)).job_script()


@contextlib.contextmanager
def connect(scheduler=None, cluster: str | None = None, cluster_config: str | None = None):
    """Yield what :func:`tilerseg.engine.store_plan` takes as ``scheduler``:
    None (threads here), or a ``distributed.Client`` of the given scheduler
    address or of a jobqueue cluster started for the run and stopped after."""
    if cluster is None and cluster_config is None:
        if scheduler is None or not isinstance(scheduler, str):
            yield scheduler
            return
        from distributed import Client

        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as err:
            raise InputError(f"--scheduler {scheduler}: cannot reach a dask scheduler there ({err}); start one "
                             "(`dask scheduler`, then `dask worker ADDRESS` per machine) or fix the address") from None
        with client:
            yield client
        return
    if scheduler is not None:
        raise InputError("--scheduler and --cluster exclude each other: connect to a running scheduler, or let "
                         "tilerseg start a batch cluster")
    if cluster_config is None:
        raise InputError(f"--cluster {cluster} needs --cluster-config FILE.yaml (queue, cores, memory, gpus, "
                         "walltime; see pipelines/cluster-slurm-gpu.yaml)")
    from distributed import Client

    kind, cfg = load_cluster_config(cluster_config, cluster)
    jobs = int(cfg.get("jobs") or 1)
    with make_cluster(kind, cfg) as cl:
        # adapt, not scale: a job that ends (walltime, --lifetime, scancel) is
        # replaced, so the run goes on with `jobs` jobs to its end
        cl.adapt(minimum_jobs=jobs, maximum_jobs=jobs)
        log.info("%s cluster: %d job(s) submitted; tasks start as workers join (scheduler %s)", kind, jobs,
                 cl.scheduler_address)
        with Client(cl) as client:
            yield client
