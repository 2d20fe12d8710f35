"""A lock per output, so that two runs never write the same output.

The lock is a small file beside the output, ``.<name>.tilerseg.lock``,
holding who has it (process, host, start time, command). The holder keeps
an exclusive ``flock`` on it for as long as it runs; the kernel drops that
when the process dies however it dies, so a lock left by a dead process is
recognised (the file names a process but nobody holds the flock), taken
over, and said so."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time

from ..errors import OutputError

log = logging.getLogger(__name__)


class OutputLock:
    """Exclusive use of ``target`` (an output path) by this process."""

    def __init__(self, target: str):
        head, tail = os.path.split(os.path.abspath(target.rstrip("/")))
        self.target, self.path, self._fd = target, os.path.join(head, f".{tail}.tilerseg.lock"), None

    def acquire(self) -> "OutputLock":
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as err:
                raise OutputError(f"{self.target}: cannot create the lock file {self.path} "
                                  f"({err.strerror or err}); choose another -o") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = _read(fd)
                os.close(fd)
                raise OutputError(f"{self.target}: another tilerseg run is writing it ({_who(owner)}); wait for it "
                                  "to finish or stop it, or choose another -o") from None
            try:  # the file may have been removed by its last holder between our open and our flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        old = _read(fd)
        if old.get("pid"):
            log.warning("%s: taking over the lock left by %s, which is no longer running", self.target, _who(old))
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                  "command": " ".join(sys.argv)[:500]}).encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.remove(self.path)  # while still holding it: nobody can take a lock on the old file meanwhile
        except OSError:
            pass
        os.close(fd)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def _read(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (ValueError, OSError):
        return {}


def _who(owner: dict) -> str:
    if not owner:
        return "process unknown"
    return (f"process {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}: "
            f"{owner.get('command', '')}")
