"""A pyramidal TIFF written while its level 0 is computed.

Level 0's tiles go into the file as soon as the blocks they cover are
marked finished (:class:`~tilerseg.io.marks.ChunkMarks`, which the workers
write on a cluster too), on a thread of its own that compresses strips of
tiles in parallel (the writer's ``imap``). The reduced levels are built on
the same thread chunk row by chunk row as level 0's rows become final
(:class:`~tilerseg.io.pyramid.Levels`), and written after level 0. After
the last block only what could not be done earlier is left: the last rows
of each level, the levels' tiles, and level 0's other planes for
probabilities (TIFF stores plane after plane). The file is written in the same order as
after the run, so its bytes are the same, and a resumed run writes them
again from the start.

A run that fails or is interrupted stops the thread and removes the
partial file (:meth:`TiffStream.stop`)."""
from __future__ import annotations

import logging
import os
import threading
import numpy as np

from .marks import ChunkMarks

log = logging.getLogger(__name__)

POLL_SECONDS = 0.25  # how often the marks a strip waits for are looked at


class Stopped(Exception):
    """The run failed or was interrupted: the stream ends without a file."""


class TiffStream:
    """Write level 0 of ``levels`` (:class:`~tilerseg.io.pyramid.Levels`; a
    zarr array computed block by block, blocks split at ``chunks``'
    boundaries and marked in ``marks``) and then its reduced levels to
    ``path`` with :func:`~tilerseg.io.tiffout.stream_pyramid_tiff`;
    ``tiff`` holds its keyword arguments (meta, kind, ome, uid, imap)."""

    def __init__(self, levels, chunks, marks: ChunkMarks, path: str, **tiff):
        from .tiffout import stream_pyramid_tiff

        self.path, self._marks, self._pyramid = path, marks, levels
        self._rows = np.cumsum((0, *chunks[-2]))
        self._cols = np.cumsum((0, *chunks[-1]))
        self._done: set = set()
        self._computed, self._abort = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._finished = False
        z0, shapes = levels.arrays[0], [z.shape for z in levels.arrays]
        self._thread = threading.Thread(target=self._run, name="tilerseg-tiff-stream", daemon=True, args=(
            stream_pyramid_tiff, z0, shapes, tiff))
        self._thread.start()

    def _run(self, write, z0, shapes, tiff) -> None:
        try:
            write(z0, shapes, self._rest, self.path, ready=self._ready, **tiff)
        except BaseException as err:  # handed to the run's thread by finish()
            self._error = err
            _remove(self.path)

    def _rest(self) -> list:
        """The levels, once the run has computed every block and they are built."""
        while not self._computed.wait(POLL_SECONDS):
            if self._abort.is_set():
                raise Stopped
        if self._abort.is_set():
            raise Stopped
        return self._pyramid.finish()

    def _ready(self, r0: int, r1: int, c0: int, c1: int) -> None:
        """Return once every block under rows ``r0:r1``, columns ``c0:c1``
        is marked (or the whole compute is done); raise :class:`Stopped`
        when the run stops. Rows above ``r0`` are final: the levels they
        allow are built first."""
        self._pyramid.advance(r0)
        ys = range(int(np.searchsorted(self._rows, r0, "right")) - 1, int(np.searchsorted(self._rows, r1)))
        xs = range(int(np.searchsorted(self._cols, c0, "right")) - 1, int(np.searchsorted(self._cols, c1)))
        need = {(y, x) for y in ys for x in xs}
        while not (self._computed.is_set() or need <= self._done):
            if self._abort.is_set():
                raise Stopped
            self._done.update(b for b in need - self._done if self._marks.has(b))  # a few files, not a listing
            if not need <= self._done:
                self._abort.wait(POLL_SECONDS)
        if self._abort.is_set():
            raise Stopped

    def finish(self) -> str:
        """Every block is computed: finish the levels and the file, and
        return its path; an error of the thread is raised here."""
        self._computed.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._finished = True
        return self.path

    def stop(self) -> None:
        """End the stream without a file (the run failed or was interrupted);
        nothing to do once :meth:`finish` returned."""
        if self._finished:
            return
        self._abort.set()
        self._thread.join(timeout=60)
        _remove(self.path)


class LevelStream:
    """The reduced levels of a zarr output, built while its level 0 is
    computed: a thread waits for each row of blocks to be marked finished
    (``marks``; blocks split at ``chunks``' boundaries) and builds what that
    row allows (:meth:`~tilerseg.io.pyramid.Levels.advance`), so that after
    the last block only the last rows of each level are left, instead of
    every level read back and built after the run. Each level chunk is
    built once, from the same level-0 pixels, so the bytes are those
    :func:`~tilerseg.io.pyramid.build_levels` writes."""

    def __init__(self, levels, chunks, marks: ChunkMarks):
        self._pyramid, self._marks = levels, marks
        self._rows = np.cumsum((0, *chunks[-2]))
        self._ncols = len(chunks[-1])
        self._computed, self._abort = threading.Event(), threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="tilerseg-level-stream", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            done: set = set()
            for by in range(len(self._rows) - 1):
                need = {(by, bx) for bx in range(self._ncols)}
                while not need <= done:
                    if self._computed.is_set() or self._abort.is_set():
                        return  # the rest is built by finish(), or nothing is
                    done.update(b for b in need - done if self._marks.has(b))
                    if not need <= done:
                        self._abort.wait(POLL_SECONDS / 5)
                self._pyramid.advance(int(self._rows[by + 1]))
        except BaseException as err:  # handed to the run's thread by finish()
            self._error = err

    def finish(self) -> list:
        """Every block is computed: build the rest and return all level arrays, finest first."""
        self._computed.set()
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._pyramid.finish()

    def stop(self) -> None:
        """The run failed or was interrupted: end the thread (no level is finished)."""
        self._abort.set()
        self._thread.join(timeout=60)


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        log.warning("could not remove %s: %s", path, err)
