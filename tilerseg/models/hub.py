"""``--weights hf://ORG/NAME[@REVISION]``: a Hugging Face Hub repository.

Resolved through ``huggingface_hub.snapshot_download``, so its cache
(``HF_HUB_CACHE``, else ``HF_HOME/hub``, read when the run starts) and
``HF_HUB_OFFLINE`` are honoured; tilerseg sets ``HF_HUB_OFFLINE=1`` unless
the user set it (:mod:`tilerseg.models.registry`), so a run never reaches
the network unless asked to. The snapshot folder is then weights like any
other: an smp ``from_pretrained`` repository (``config.json`` beside
``model.safetensors``) is an smp folder, and a repository holding one file
of a format :func:`~tilerseg.models.detect.detect` knows is that file.
"""
from __future__ import annotations

import os

from ..errors import ModelError
from .detect import HUB_PREFIX, detect

# a repo holding several weights files: the first format here wins
PREFERRED = ("torchscript", "exported", "onnx", "safetensors", "torch")


def parse(url: str) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``hf://ORG/NAME[@REVISION]``."""
    rest = url[len(HUB_PREFIX):]
    repo, _, rev = rest.partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise ModelError(f"{url}: name a Hub repository as hf://ORG/NAME or hf://ORG/NAME@REVISION")
    return repo, rev or None


def cache_dir() -> str | None:
    """The Hub cache folder the environment names now (None: the default)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    return os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None


def resolve(url: str) -> str:
    """The local path of the weights in repository ``url``: its snapshot
    folder (smp) or the weights file in it; uncached while offline, or
    holding no weights, is one line saying what to do."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo, rev = parse(url)
    try:
        folder = snapshot_download(repo, revision=rev, cache_dir=cache_dir())
    except LocalEntryNotFoundError:
        where = cache_dir() or "the default Hugging Face cache"
        raise ModelError(f"{url}: not in the Hub cache ({where}) and HF_HUB_OFFLINE is on: fetch it once on a "
                         f"machine with internet with `HF_HUB_OFFLINE=0 tilerseg models --describe {url}` (or "
                         f"`hf download {repo}`), then copy the cache here") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise ModelError(f"{url}: {type(err).__name__} on the Hub; check the repository name and revision") \
            from None
    except OSError as err:  # the network itself
        raise ModelError(f"{url}: cannot reach the Hub ({type(err).__name__}); check the connection, or set "
                         "HF_HUB_OFFLINE=1 to use the cache") from None
    return pick(url, folder)


def pick(url: str, folder: str) -> str:
    """The weights in a snapshot ``folder``: the folder itself where it is
    one format (smp, bioimage.io, MONAI), else its one weights file."""
    if detect(folder) is not None:
        return folder
    found = {}
    for root, _, files in os.walk(folder):
        for name in sorted(files):
            path = os.path.join(root, name)
            kind = detect(path)
            if kind in PREFERRED:
                found.setdefault(kind, []).append(path)
    for kind in PREFERRED:
        if kind in found:
            return found[kind][0]
    held = ", ".join(sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder)
                            for f in fs)[:6]) or "no files"
    raise ModelError(f"{url}: the repository holds no weights tilerseg reads ({held}); give a repo with an smp "
                     "save_pretrained config.json and model.safetensors, or a TorchScript, torch.export, ONNX or "
                     "state-dict file")
