"""Readers and writers, one backend per module, behind ``open_reader`` and
``open_writer``."""
from .base import ImageMeta, Reader, read_padded
from .open import open_reader, READERS
from .writers import open_writer, Writer

__all__ = ["ImageMeta", "Reader", "read_padded", "open_reader", "open_writer", "Writer", "READERS"]
