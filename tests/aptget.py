"""Install Debian packages for a test's real daemon or browser (CI runs as root with apt)."""
import os
import subprocess


def apt_install(packages) -> str | None:
    """``apt-get install`` ``packages`` (``apt-get update`` first when the
    lists lack them); None on success, else the error's last lines."""
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if subprocess.run(cmd, capture_output=True, env=env).returncode == 0:
        return None
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return r.stderr.strip()[-300:] if r.returncode else None
