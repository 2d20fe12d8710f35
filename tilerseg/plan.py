"""A segmentation as output blocks: which region each block fills, how
many windows it runs, and the dask graph of the pending ones, all computed
on demand, so that planning costs the same for any image size. The engine
builds plans (:func:`tilerseg.engine.segment_plan`, ``volume_plan``) and
stores them wave by wave (``store_plan``)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any, Callable

import numpy as np

WAVE_BLOCKS = 2048  # blocks per wave of tasks: enough to keep any cluster busy, a few MB of graph


class Blocks(Mapping):
    """``block index -> value`` over a grid of ``shape`` blocks, computed
    when asked: a plan holds no per-block state, so planning a
    200,000-px-square slide (100,000 blocks) or a header that claims a
    million px square costs the same few kilobytes. Iteration is in
    row-major order; :meth:`rows` iterates a band of leading indices."""

    def __init__(self, shape: tuple[int, ...], value: Callable[[tuple[int, ...]], Any]):
        self.shape, self._value = tuple(int(n) for n in shape), value

    def __getitem__(self, b):
        if b not in self:
            raise KeyError(b)
        return self._value(b)

    def __contains__(self, b) -> bool:
        return isinstance(b, tuple) and len(b) == len(self.shape) and all(
            isinstance(i, (int, np.integer)) and 0 <= i < n for i, n in zip(b, self.shape))

    def __iter__(self) -> Iterator[tuple[int, ...]]:
        return self.rows(0, self.shape[0])

    def __len__(self) -> int:
        return int(np.prod(self.shape))

    def rows(self, start: int, stop: int) -> Iterator[tuple[int, ...]]:
        for first in range(start, min(stop, self.shape[0])):
            for rest in np.ndindex(*self.shape[1:]):
                yield (first, *rest)


class Plan:
    """A segmentation as output blocks, in the form :func:`store_plan`
    stores block by block (and ``engine.lazy_array`` gives as a lazy dask array), skipping blocks
    already finished (resume) and counting the windows each block ran.

    ``blocks`` maps each block index to the output region it fills (a
    tuple of slices of the output array) and ``windows`` to its number of
    windows, both :class:`Blocks` computed on demand; ``build(pending)``
    gives the dask graph computing the pending blocks and, per block, the
    key of a task returning ``(chunk, windows run, windows skipped)``.
    ``wave_rows``: leading block indices per wave of tasks handed to the
    scheduler at once (memory and graph time stay bounded; a blended plan
    asks for enough rows that its halo overlap between waves is small)."""

    def __init__(self, name: str, shape, chunks, dtype, blocks: Blocks, windows: Blocks, build, lead: tuple = (),
                 total_windows: int | None = None, wave_rows: int | None = None):
        self.name, self.shape, self.chunks, self.dtype = name, tuple(shape), tuple(chunks), np.dtype(dtype)
        self.blocks, self.windows, self.build, self.lead = blocks, windows, build, lead
        self._total = total_windows
        self.wave_rows = wave_rows or max(1, -(-WAVE_BLOCKS // max(1, len(blocks) // max(1, blocks.shape[0]))))

    @property
    def total_windows(self) -> int:
        return int(self._total if self._total is not None else sum(self.windows.values()))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def graph(self, pending) -> tuple[dict, dict]:
        return self.build(list(pending))

    def waves(self, done=frozenset()) -> Iterator[list]:
        """The blocks not in ``done``, in waves of :attr:`wave_rows` rows."""
        for start in range(0, self.blocks.shape[0], self.wave_rows):
            wave = [b for b in self.blocks.rows(start, start + self.wave_rows) if b not in done]
            if wave:
                yield wave
