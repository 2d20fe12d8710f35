"""Fetch the ISBI 2012 EM segmentation challenge's 30 training slices.

Usage: python scripts/fetch_isbi2012.py DEST [--held-out 25-29] [--base-url URL]

The challenge (Arganda-Carreras et al., "Crowdsourcing the creation of image
segmentation algorithms for connectomics", Front. Neuroanat. 2015) published
30 serial-section TEM slices of the Drosophila ventral nerve cord, 512 x 512
px, with membrane labels (0 = membrane, 255 = cell interior). The U-Net
paper trained on them. They are fetched as PNGs from the copy kept with the
widely used Keras U-Net (github.com/zhixuhao/unet, data/membrane/train), one
file per slice, and laid out as ``pipelines/em-membranes.yaml`` expects:

    DEST/image/0.png ... DEST/label/0.png ...          training (and validation: 20-24)
    DEST/held-out/image/25.png ... held-out/label/...   never seen in training: score with `tilerseg eval`

Files land under a temporary folder and move into place when all are
there, so an interrupted or offline fetch leaves nothing half-done. A fetch
that fails prints one line and exits 1. Any ``--base-url`` that urllib
opens works (``file:///path`` for a local copy)."""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import urllib.error
import urllib.request

BASE_URL = "https://raw.githubusercontent.com/zhixuhao/unet/master/data/membrane/train"


def _range(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


def fetch(dest: str, slices: list[int], held_out: set[int], base_url: str, timeout: float) -> int:
    """Download ``slices`` into ``dest``; returns the number of files written."""
    wanted = [(kind, k, os.path.join(dest, *(["held-out"] if k in held_out else []), kind, f"{k}.png"))
              for kind in ("image", "label") for k in slices]
    todo = [w for w in wanted if not os.path.exists(w[2])]
    if not todo:
        return 0
    staging = os.path.join(dest, ".fetching")
    for kind, k, final in todo:
        part = os.path.join(staging, os.path.relpath(final, dest))
        os.makedirs(os.path.dirname(part), exist_ok=True)
        with urllib.request.urlopen(f"{base_url.rstrip('/')}/{kind}/{k}.png", timeout=timeout) as src, \
                open(part, "wb") as out:
            shutil.copyfileobj(src, out)
        with open(part, "rb") as f:
            if f.read(8) != b"\x89PNG\r\n\x1a\n":
                raise ValueError(f"{kind}/{k}.png is not a PNG (an error page?)")
    for kind, k, final in todo:  # all downloaded: move into place
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.replace(os.path.join(staging, os.path.relpath(final, dest)), final)
    shutil.rmtree(staging, ignore_errors=True)
    return len(todo)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dest", help="folder to fill, e.g. data/isbi2012")
    p.add_argument("--slices", type=_range, default=_range("0-29"), help="slices to fetch (default 0-29)")
    p.add_argument("--held-out", type=_range, default=_range("25-29"),
                   help="slices kept out of training, in DEST/held-out (default 25-29)")
    p.add_argument("--base-url", default=BASE_URL, help=f"where the image/ and label/ PNGs are (default {BASE_URL})")
    p.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    a = p.parse_args(argv)
    try:
        n = fetch(a.dest, a.slices, set(a.held_out), a.base_url, a.timeout)
    except (urllib.error.URLError, OSError, ValueError) as err:
        shutil.rmtree(os.path.join(a.dest, ".fetching"), ignore_errors=True)
        reason = getattr(err, "reason", None) or err
        print(f"fetch_isbi2012: cannot fetch from {a.base_url} ({reason}); this needs internet access, or "
              "--base-url pointing at a copy (file:///path/to/isbi2012)", file=sys.stderr)
        return 1
    print(f"{a.dest}: {n} files written" if n else f"{a.dest}: all {2 * len(a.slices)} files already there")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
