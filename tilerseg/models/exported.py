"""``torch.export`` programs (``torch.export.save``, ``.pt2``) as ``--weights``.

Detected by content (:func:`tilerseg.models.detect.detect`). The program's
input shape says what it takes: a fixed batch (one traced window) is run a
window at a time, a fixed height and width fixes the tile, and dynamic
dimensions (``torch.export.Dim``) take any window within their range; a
window outside it fails with one line naming its shape. Run by
:class:`~tilerseg.models.program.ProgramModel` on the program's
``module()``, through which input gradients flow for the receptive field.
"""
from __future__ import annotations

from ..errors import ModelError
from .program import ProgramModel, describe_program, load_program
from .registry import ModelSpec

KIND = "exported"


def load(path: str):
    """``(program, module, metadata)`` of the ``.pt2`` file, read once per
    process while the file is unchanged."""
    (program, module), meta = load_program(path, _read, "torch.export program", "torch.export.save")
    return program, module, meta


def _read(path: str, extra: dict):
    import torch

    program = torch.export.load(path, extra_files=extra)
    return program, program.module()


def input_shape(program, path: str) -> tuple[int | None, ...]:
    """The first user input's shape, None on each dynamic axis."""
    user = program.graph_signature.user_inputs
    node = next((n for n in program.graph.nodes if n.op == "placeholder" and n.name in user), None)
    val = node.meta.get("val") if node is not None else None
    if val is None or val.dim() != 4:
        raise ModelError(f"{path}: the exported program has no 4-D image input (batch, channels, height, width); "
                         "tilerseg runs 2-D segmentation models")
    return tuple(d if isinstance(d, int) else None for d in val.shape)


def describe(path: str, spec: ModelSpec) -> dict:
    """The :class:`~tilerseg.models.ModelInfo` fields of a ``.pt2`` file."""
    program, module, meta = load(path)
    return describe_program(path, module, spec, kind=KIND, meta=meta, input_shape=input_shape(program, path))


def build(info) -> ProgramModel:
    program, module, _ = load(info.weights)
    return ProgramModel(info.weights, module, kind=KIND, in_channels=info.spec.in_channels,
                        input_shape=input_shape(program, info.weights), **dict(info.spec.kwargs)).eval()
