"""Errors that tilerseg raises for things the user can fix.

Every error derives from :class:`TilersegError` and from the builtin that
best describes it, so callers may catch either (``except OSError`` still
works for a file that cannot be read). The command line prints the message
of a ``TilersegError`` as one line; messages therefore say *what* went
wrong, *where*, and *what to do*.
"""


class TilersegError(Exception):
    """Root of all tilerseg errors."""


class InputError(TilersegError, ValueError):
    """The input image is missing, unsupported or not usable as given."""


class FormatError(InputError):
    """The input file cannot be opened: unsupported format or corrupt header."""


class ReadError(TilersegError, OSError):
    """A window of an opened input failed to read or decode."""


class ModelError(TilersegError, ValueError):
    """The model cannot be built, its weights cannot be loaded, or it does
    not fit the image (band count, resolution)."""


class TileError(TilersegError, ValueError):
    """The tile/halo combination does not fit the model's output stride."""


class OutputError(TilersegError, OSError):
    """The output cannot be written (path, permissions, full disk)."""


class Terminated(KeyboardInterrupt):
    """The process received SIGTERM (walltime, ``scancel``): handled as an
    interrupt, so a run stops the same way as on Ctrl-C."""
