"""A headless Chromium for the viewer's browser tests: Debian's ``chromium``
driven by Playwright (Playwright's own browser download is not reachable
here). :func:`launch` installs the package with apt when it is missing and
this is root (as tests/slurm.py installs the SLURM daemons), and raises
:class:`Unavailable` with the reason where no browser can run; the fixture
skips with it, or fails when ``TILERSEG_REQUIRE_BROWSER=1`` (CI)."""
from __future__ import annotations

import os
import shutil
import subprocess

CHROMIUM = os.environ.get("TILERSEG_CHROMIUM", "/usr/bin/chromium")  # Debian's; another build by its path
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


class Unavailable(RuntimeError):
    """No browser can run here; the message says why."""


def _install() -> None:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise Unavailable(f"{CHROMIUM} is missing and apt-get cannot run here (install the chromium package)")
    from aptget import apt_install

    error = apt_install(["chromium"])
    if error:
        raise Unavailable(f"apt-get install chromium failed: {error}")


def launch():
    """``(playwright, browser)``: stop both with :func:`close`."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as err:
        raise Unavailable(f"playwright is not installed ({err}): pip install -e '.[test]'") from None
    if not os.path.exists(CHROMIUM):
        _install()
    pw = sync_playwright().start()
    try:
        return pw, pw.chromium.launch(executable_path=CHROMIUM, args=ARGS)
    except Exception as err:
        pw.stop()
        raise Unavailable(f"chromium did not start: {' '.join(str(err).split())[:300]}") from None


def close(pw, browser) -> None:
    browser.close()
    pw.stop()
