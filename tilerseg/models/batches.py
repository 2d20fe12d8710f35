"""Running a program traced at a fixed batch (ONNX graphs, TorchScript and
``torch.export`` programs) over any number of windows."""
from __future__ import annotations

from typing import Callable


def in_fixed_batches(run: Callable, x, step: int):
    """``run`` over ``x`` (N, ...) in pieces of ``step`` windows, the
    outputs concatenated: a program traced at batch ``step`` takes no other.
    The last piece is filled with copies of its first window and the
    outputs of the copies dropped."""
    import torch

    parts = []
    for i in range(0, x.shape[0], step):
        part = x[i:i + step]
        k = part.shape[0]
        if k < step:
            part = torch.cat([part, part[:1].expand(step - k, *part.shape[1:])])
        parts.append(run(part)[:k])
    return torch.cat(parts) if len(parts) > 1 else parts[0]
