"""Run ``tilerseg ARGS`` and kill it with SIGKILL at one phase of writing
its output, for the resume tests (tests/test_resume_phases.py).

``python tests/killat.py PHASE ARGS...``: the command runs as ``tilerseg
ARGS`` would, and the process sends itself SIGKILL (no cleanup runs, as
after kill -9 or an OOM kill) when the run reaches PHASE:

- ``windows``: the 5th block of windows is marked finished;
- ``instances``: the instance pass has found each block's pieces;
- ``conversion``: the output's conversion begins (the object table is written);
- ``converted``: the output is whole at its temporary path, nothing moved;
- ``between-moves``: the first finished file has been moved into place;
- ``moved``: every file is in place, the state folder not yet removed.

Only the moment is chosen here; the kill is real."""
import os
import signal
import sys


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def arm(phase: str) -> None:
    from tilerseg import instances
    from tilerseg.io import marks, writers

    if phase == "windows":
        mark, seen = marks.ChunkMarks.mark, []

        def counted(self, block):
            mark(self, block)
            seen.append(block)
            if len(seen) >= 5:
                die()
        marks.ChunkMarks.mark = counted
    elif phase == "instances":
        link = instances._link

        def linked(*a, **k):
            die()
            return link(*a, **k)
        instances._link = linked
    elif phase in ("conversion", "converted"):
        convert = writers.Writer._convert

        def converting(self, *a, **k):
            if phase == "conversion":
                die()
            made = convert(self, *a, **k)
            die()
            return made
        writers.Writer._convert = converting
    elif phase == "between-moves":
        move = writers._move_no_replace

        def moving(tmp, final):
            move(tmp, final)
            die()
        writers._move_no_replace = moving
    elif phase == "moved":
        place = writers.Writer._place

        def placed(self, products):
            place(self, products)
            die()
        writers.Writer._place = placed
    else:
        raise SystemExit(f"unknown phase {phase}")


if __name__ == "__main__":
    arm(sys.argv[1])
    from tilerseg import cli

    sys.exit(cli.main(sys.argv[2:]))
