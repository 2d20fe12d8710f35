"""Which output blocks have landed, for ``--resume``."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ChunkMarks:
    """One empty file per finished block (``by.bx`` or ``z.y.x``) in
    ``root``, a folder or any fsspec URL that every worker can reach. A file
    appears only after its block is stored, and an empty file is written
    whole or not at all, so after a crash the marks name exactly the blocks
    that need no recomputing."""

    root: str

    def _fs(self):
        import fsspec

        return fsspec.core.url_to_fs(self.root)

    def mark(self, block: tuple) -> None:
        fs, path = self._fs()
        fs.touch(f"{path}/{'.'.join(map(str, block))}")

    def forget(self, block: tuple) -> None:
        """The block is to be computed again (its data is gone)."""
        fs, path = self._fs()
        name = f"{path}/{'.'.join(map(str, block))}"
        if fs.exists(name):
            fs.rm(name)

    def has(self, block: tuple) -> bool:
        fs, path = self._fs()
        return fs.exists(f"{path}/{'.'.join(map(str, block))}")

    def done(self) -> set[tuple]:
        fs, path = self._fs()
        if not fs.exists(path):
            return set()
        out = set()
        for p in fs.ls(path, detail=False):
            try:
                out.add(tuple(int(v) for v in p.rstrip("/").rsplit("/", 1)[-1].split(".")))
            except ValueError:
                continue
        return out
