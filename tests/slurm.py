"""A real one-node SLURM on loopback for the tests, the same software a
university cluster runs (dask-jobqueue's own CI does the same).

:func:`start` installs the Debian packages when they are missing (as root,
with apt), starts ``munged`` (as the munge user), then ``slurmctld`` and
``slurmd`` with a private ``slurm.conf`` naming this host with its cores
and memory, and points ``SLURM_CONF`` at it so ``sbatch``/``squeue``/
``scancel`` (and dask-jobqueue, which calls them) use it. :meth:`Slurm.stop`
cancels every job and stops what :func:`start` started. Where SLURM cannot
run, :func:`start` raises :class:`Unavailable` with the reason (the fixture
skips with it, or fails when ``TILERSEG_REQUIRE_SLURM=1``, as in CI).

A file lock keeps two pytest processes on one machine (xdist workers, two
checkouts) from starting two clusters on the same ports at once."""
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
LOCK = "/tmp/tilerseg-test-slurm.lock"
PORTS = (6817, 6818)  # slurmctld, slurmd


class Unavailable(RuntimeError):
    """SLURM cannot run here; the message says why."""


@dataclass
class Slurm:
    """A running one-node cluster: its folder, config, logs and partition."""

    root: str
    conf: str
    partition: str = "tilerseg"
    pids: dict = field(default_factory=dict)  # daemon name -> pid, of those this object started
    lock: object = None

    @property
    def ctld_log(self) -> str:
        return os.path.join(self.root, "slurmctld.log")

    @property
    def jobcomp_log(self) -> str:
        """One line per finished job (``jobcomp/filetxt``): the scheduler's record."""
        return os.path.join(self.root, "jobcomp.log")

    def env(self) -> dict:
        return dict(os.environ, SLURM_CONF=self.conf)

    def cmd(self, *args: str, check: bool = True) -> str:
        r = subprocess.run(list(args), capture_output=True, text=True, env=self.env(), timeout=60)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(args)}: {r.stderr.strip()}")
        return r.stdout

    def jobs(self, name: str | None = None) -> list[dict]:
        """Jobs in the queue (pending, running, completing): id, name, state."""
        out = self.cmd("squeue", "-h", "-o", "%i|%j|%T")
        rows = [dict(zip(("id", "name", "state"), ln.split("|"))) for ln in out.splitlines() if ln.strip()]
        return [r for r in rows if name is None or r["name"] == name]

    def finished(self) -> list[dict]:
        """Finished jobs from the scheduler's job-completion log."""
        if not os.path.exists(self.jobcomp_log):
            return []
        with open(self.jobcomp_log) as f:
            return [dict(kv.split("=", 1) for kv in ln.split() if "=" in kv) for ln in f if ln.strip()]

    def finished_since(self, before: set, name: str, count: int, timeout: float = 60) -> list[dict]:
        """Jobs named ``name`` not in ``before`` that the completion log records,
        waiting until there are ``count``: a cancelled job leaves the queue
        before slurmctld has always appended its line."""
        end = time.monotonic() + timeout
        while True:
            ran = [j for j in self.finished() if j.get("JobId") not in before and j.get("Name") == name]
            if len(ran) >= count or time.monotonic() > end:
                return ran
            time.sleep(0.5)

    def freeze(self, job: str) -> list[int]:
        """SIGSTOP every process of ``job`` (found by ``SLURM_JOB_ID`` in its
        environment): the job holds its tasks but makes no progress, however
        fast this machine is, until SLURM ends it (SIGKILL works on a stopped
        process)."""
        pids = []
        for entry in os.listdir("/proc"):
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    env = f.read().split(b"\0")
            except (OSError, ValueError):
                continue
            if f"SLURM_JOB_ID={job}".encode() in env:
                pids.append(int(entry))
        for pid in pids:
            try:
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        return pids

    def wait_empty(self, name: str | None = None, timeout: float = 60) -> list[dict]:
        """Wait until no job (named ``name``) is in the queue; return what is left."""
        end = time.monotonic() + timeout
        while (left := self.jobs(name)) and time.monotonic() < end:
            time.sleep(0.5)
        return left

    def stop(self) -> None:
        """Cancel every job, stop the daemons this object started, free the lock."""
        try:
            if "slurmctld" in self.pids:
                self.cmd("scancel", "--partition", self.partition, check=False)
                self.wait_empty(timeout=30)
        finally:
            for name in ("slurmd", "slurmctld", "munged"):
                if name in self.pids:
                    _terminate(self.pids.pop(name))
            if self.lock is not None:
                self.lock.close()
                self.lock = None


def _terminate(pid: int, timeout: float = 20) -> None:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _install() -> None:
    """apt-get the SLURM and munge packages (``apt-get update`` first when
    the package lists lack them)."""
    from aptget import apt_install

    error = apt_install(PACKAGES)
    if error:
        raise Unavailable(f"apt-get install {' '.join(PACKAGES)} failed: {error}")


def _pidfile(path: str, timeout: float = 20) -> int:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            with open(path) as f:
                return int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    raise Unavailable(f"{path} did not appear")


def _munge() -> int | None:
    """Start munged as the munge user unless one already answers; its pid
    when this call started it."""
    if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
        return None
    key = "/etc/munge/munge.key"
    for d in ("/run/munge", "/var/log/munge", "/var/lib/munge", "/etc/munge"):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "munge", "munge")
    if not os.path.exists(key):
        with open(key, "wb") as f:
            f.write(os.urandom(128))
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
    r = subprocess.run(["runuser", "-u", "munge", "--", "munged"], capture_output=True, text=True)
    if r.returncode:
        raise Unavailable(f"munged did not start: {r.stderr.strip()}")
    return _pidfile("/run/munge/munged.pid")


def _config(root: str, partition: str) -> str:
    """A slurm.conf for this host alone, its cores and memory from ``slurmd -C``."""
    host = socket.gethostname().split(".")[0]
    node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True).stdout.splitlines()[0]
    node = node.replace(f"NodeName={node.split()[0].split('=')[1]}", f"NodeName={host}")
    lines = [
        "ClusterName=tilerseg-test", f"SlurmctldHost={host}(127.0.0.1)", "SlurmUser=root", "SlurmdUser=root",
        f"SlurmctldPort={PORTS[0]}", f"SlurmdPort={PORTS[1]}", "AuthType=auth/munge",
        f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool",
        f"SlurmctldPidFile={root}/slurmctld.pid", f"SlurmdPidFile={root}/slurmd.pid",
        f"SlurmctldLogFile={root}/slurmctld.log", f"SlurmdLogFile={root}/slurmd.log", "SlurmctldDebug=info",
        "JobCompType=jobcomp/filetxt", f"JobCompLoc={root}/jobcomp.log",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "MpiDefault=none",
        "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",  # memory is not a consumable here
        "SchedulerType=sched/backfill", "ReturnToService=2", "KillWait=5", "MinJobAge=2", "InactiveLimit=0",
        "SchedulerParameters=sched_interval=2",
        f"{node.strip()} NodeAddr=127.0.0.1 State=UNKNOWN",
        f"PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP",
    ]
    for d in ("state", "spool"):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    conf = os.path.join(root, "slurm.conf")
    with open(conf, "w") as f:
        f.write("\n".join(lines) + "\n")
    return conf


def _ports_free() -> None:
    for port in PORTS:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                raise Unavailable(f"port {port} is in use (another SLURM runs here)") from None


def start(root: str, lock_timeout: float = 900) -> Slurm:
    """Start a one-node SLURM keeping its files in ``root``; raise
    :class:`Unavailable` with the reason where it cannot."""
    if os.name != "posix" or os.geteuid() != 0:
        raise Unavailable("a test SLURM needs root (to run slurmd and munged)")
    t0 = time.monotonic()
    phases = []
    if not all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        if not shutil.which("apt-get"):
            raise Unavailable("SLURM is not installed and there is no apt-get to install it")
        _install()
    phases.append(f"install {time.monotonic() - t0:.1f} s")
    lock = open(LOCK, "w")
    end = time.monotonic() + lock_timeout
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            if time.monotonic() > end:
                lock.close()
                raise Unavailable(f"another test process held {LOCK} for {lock_timeout:.0f} s") from None
            time.sleep(1)
    phases.append(f"lock {time.monotonic() - t0:.1f} s")
    cluster = Slurm(root=root, conf="", lock=lock)
    try:
        _ports_free()
        cluster.conf = _config(root, cluster.partition)
        munged = _munge()
        if munged:
            cluster.pids["munged"] = munged
        for daemon in ("slurmctld", "slurmd"):
            r = subprocess.run([daemon, "-f", cluster.conf], capture_output=True, text=True, env=cluster.env())
            if r.returncode:
                raise Unavailable(f"{daemon} did not start: {r.stderr.strip()[-300:]}")
            cluster.pids[daemon] = _pidfile(os.path.join(root, f"{daemon}.pid"))
        end = time.monotonic() + 60
        while cluster.cmd("sinfo", "-h", "-o", "%t", check=False).strip() not in ("idle", "mix", "alloc"):
            if time.monotonic() > end:
                raise Unavailable(f"the node did not come up: {cluster.cmd('sinfo', check=False)}")
            time.sleep(0.5)
        phases.append(f"node up {time.monotonic() - t0:.1f} s")
        with open(os.path.join(root, "startup.txt"), "w") as f:  # where a slow start went (cumulative)
            f.write(", ".join(phases) + "\n")
    except BaseException:
        cluster.stop()
        raise
    return cluster
