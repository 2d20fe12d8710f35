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


def load_run_config(path) -> dict[str, Any]:
    """Read ``path`` and return ``{option: value}`` for :func:`tilerseg.run`."""
    import yaml

    path = os.fspath(path)
    if not os.path.exists(path):
        raise InputError(f"{path}: no such config file; check the --config path")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except yaml.YAMLError as err:
        raise InputError(f"{path}: not valid YAML ({' '.join(str(err).split())})") from err
    raw = raw.get("run", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected a mapping of run options")
    valid = run_options()
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in valid:
            raise InputError(f"{path}: unknown option {key!r}; valid: {', '.join(sorted(valid))}")
        out[name] = tuple(value) if name in _LISTS and isinstance(value, list) else value
    return out
