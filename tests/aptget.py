"""Install Debian packages for a test's real daemon or browser (CI runs as root with apt)."""
import fcntl
import os
import subprocess
import tempfile

# apt takes dpkg's lock and fails at once when it is held: two test workers (SLURM on one,
# chromium on the other) installing at the same moment failed CI that way. One install at a
# time here, and apt waits for a lock that another program holds.
_LOCK = os.path.join(tempfile.gettempdir(), "tilerseg-tests-apt.lock")
_WAIT = ["-o", "DPkg::Lock::Timeout=600"]


def apt_install(packages) -> str | None:
    """``apt-get install`` ``packages`` (``apt-get update`` first when the
    lists lack them), one install at a time across test workers; None on
    success, else the error's last lines."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", *_WAIT, "install", "-y", "-q", "--no-install-recommends", *packages]
    with open(_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if subprocess.run(cmd, capture_output=True, env=env).returncode == 0:
            return None
        subprocess.run(["apt-get", *_WAIT, "update", "-q"], capture_output=True, env=env)
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return r.stderr.strip()[-300:] if r.returncode else None
