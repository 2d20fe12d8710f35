"""TorchScript programs (``torch.jit.save``/``torch.jit.trace``) as ``--weights``.

Detected by content (:func:`tilerseg.models.detect.detect`), whatever the
extension (``.pt``, ``.pth``, ``.ts``, ``.torchscript``): what WSInfer,
InstanSeg and MONAI ship. TorchScript is deprecated in torch 2.14 but is
what model zoos hold today; the file is loaded, never rebuilt, and run by
:class:`~tilerseg.models.program.ProgramModel`.
"""
from __future__ import annotations

import functools
import os
import warnings

from ..errors import ModelError
from .program import META_FILE, ProgramModel, describe_program, read_meta
from .registry import ModelSpec

KIND = "torchscript"


def load(path: str):
    """``(module, metadata)`` of the TorchScript file, read once per
    process while the file is unchanged."""
    st = os.stat(path)
    return _cached(os.path.abspath(path), st.st_size, st.st_mtime_ns, path)


@functools.lru_cache(maxsize=2)
def _cached(abspath: str, size: int, mtime: int, shown: str):
    import torch

    extra = {META_FILE: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation: the user's file is one
            module = torch.jit.load(abspath, map_location="cpu", _extra_files=extra)
    except Exception as err:
        text = " ".join(str(err).split())[:160] or type(err).__name__
        raise ModelError(f"{shown}: not a loadable TorchScript program ({type(err).__name__}: {text}); give a file "
                         "written by torch.jit.save") from None
    return module.eval(), read_meta(shown, extra[META_FILE])


def describe(path: str, spec: ModelSpec) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of a TorchScript file."""
    module, meta = load(path)
    return describe_program(path, module, spec, kind=KIND, meta=meta)


def build(info) -> ProgramModel:
    module, _ = load(info.weights)
    return ProgramModel(info.weights, module, kind=KIND, in_channels=info.spec.in_channels,
                        **dict(info.spec.kwargs)).eval()
