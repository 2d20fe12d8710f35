"""TorchScript programs (``torch.jit.save``/``torch.jit.trace``) as ``--weights``.

Detected by content (:func:`tilerseg.models.detect.detect`), whatever the
extension (``.pt``, ``.pth``, ``.ts``, ``.torchscript``): what WSInfer,
InstanSeg and MONAI ship. TorchScript is deprecated in torch 2.14 but is
what model zoos hold today; the file is loaded, never rebuilt, and run by
:class:`~tilerseg.models.program.ProgramModel`.
"""
from __future__ import annotations

import warnings

from .program import ProgramModel, describe_program, load_program
from .registry import ModelSpec

KIND = "torchscript"


def load(path: str):
    """``(module, metadata)`` of the TorchScript file, read once per
    process while the file is unchanged."""
    return load_program(path, _read, "TorchScript program", "torch.jit.save")


def _read(path: str, extra: dict):
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the user's file is one
        return torch.jit.load(path, map_location="cpu", _extra_files=extra).eval()


def describe(path: str, spec: ModelSpec) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of a TorchScript file."""
    module, meta = load(path)
    return describe_program(path, module, spec, kind=KIND, meta=meta)


def build(info) -> ProgramModel:
    module, _ = load(info.weights)
    return ProgramModel(info.weights, module, kind=KIND, in_channels=info.spec.in_channels,
                        **dict(info.spec.kwargs)).eval()
