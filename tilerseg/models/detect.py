"""Which weights format a path holds, from its content, not its name.

A user's file is named whatever their tool wrote (``model.pt`` may be a
state dict, a tilerseg checkpoint or a TorchScript program), so the loader
reads the first bytes, and for a zip archive its member names:

========================  ==============================================
``torchscript``           zip with ``*/code/`` and ``*/constants.pkl``
``exported``              zip with ``*/archive_format`` or ``*/models/*.json``
``bioimageio``            zip or folder with ``rdf.yaml``/``bioimageio.yaml``
``torch``                 zip with ``*/data.pkl``, or a legacy pickle:
                          a state dict or a tilerseg checkpoint
``safetensors``           8-byte header length, then ``{``
``onnx``                  a protobuf ``ModelProto`` (field 1, ir_version)
``smp``                   a folder with ``config.json``
``monai``                 a folder with ``configs/metadata.json``
``hub``                   ``hf://ORG/NAME[@REVISION]``
========================  ==============================================
"""
from __future__ import annotations

import os
import struct
import zipfile

HUB_PREFIX = "hf://"
FORMATS = ("torchscript", "exported", "bioimageio", "torch", "safetensors", "onnx", "smp", "monai", "hub")
BIOIMAGEIO_FILES = ("rdf.yaml", "bioimageio.yaml")


def detect(path) -> str | None:
    """The format of ``path`` (one of :data:`FORMATS`), or None when its
    content says nothing known (the caller's error then names it)."""
    path = os.fspath(path)
    if path.startswith(HUB_PREFIX):
        return "hub"
    if os.path.isdir(path):
        if any(os.path.exists(os.path.join(path, f)) for f in BIOIMAGEIO_FILES):
            return "bioimageio"
        if os.path.exists(os.path.join(path, "configs", "metadata.json")):
            return "monai"
        return "smp" if os.path.exists(os.path.join(path, "config.json")) else None
    if os.path.basename(path) in BIOIMAGEIO_FILES:
        return "bioimageio"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        return _zip_kind(path)
    if head[:1] == b"\x80":  # a pickle: torch.save's legacy format
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack("<Q", head[:8])[0] < 1 << 30:
        return "safetensors"
    if len(head) >= 2 and head[0] == 0x08 and head[1] < 0x40:  # ModelProto: field 1 (ir_version) first
        return "onnx"
    return None


def _zip_kind(path: str) -> str | None:
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
    except (zipfile.BadZipFile, OSError):
        return None
    if any(n in BIOIMAGEIO_FILES or n.endswith(tuple("/" + f for f in BIOIMAGEIO_FILES)) and n.count("/") == 1
           for n in names) and not any(n.endswith("/constants.pkl") for n in names):
        return "bioimageio"
    if any("/code/" in n for n in names) and any(n.endswith("/constants.pkl") for n in names):
        return "torchscript"
    if any(n.endswith("/archive_format") or "/models/" in n and n.endswith(".json") for n in names):
        return "exported"
    if any(n.endswith("data.pkl") for n in names):
        return "torch"
    return None
