"""Run configurations from YAML (``pipelines/*.yaml``), validated once.

A file holds the options of ``tilerseg run`` under their long names
(``batch_size`` or ``batch-size``); flags on the command line override it.
Unknown keys fail with the list of valid ones, so a typo cannot silently
fall back to a default."""
from __future__ import annotations

import inspect
import os
from typing import Any

from .errors import InputError

_LISTS = {"bands", "mean", "std"}


def run_options() -> list[str]:
    from .api import run

    return [n for n, p in inspect.signature(run).parameters.items()
            if p.kind is p.KEYWORD_ONLY and n not in ("progress",)]


def read_mapping(path: str, what: str, where: str = "path") -> dict:
    """The YAML mapping in ``path`` (under a top-level ``what`` key if there
    is one); a missing file, bad YAML or a non-mapping is one clear line."""
    import yaml

    if not os.path.exists(path):
        raise InputError(f"{path}: no such config file; check the {where}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    raw = raw.get(what, raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of {what} options")
    return raw


def load_run_config(path) -> dict[str, Any]:
    """Read ``path`` and return ``{option: value}`` for :func:`tilerseg.run`."""
    path = os.fspath(path)
    raw = read_mapping(path, "run", "--config path")
    valid = run_options()
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            raise InputError(f"{path}: unknown option {key!r}; valid: {', '.join(sorted(valid))}")
        out[name] = tuple(value) if name in _LISTS and isinstance(value, list) else value
    return out
