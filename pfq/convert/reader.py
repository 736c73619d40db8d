"""Open a weights file of any supported container and fingerprint it.

Containers are told apart by content, not by name: a torch zip (`.pth`, `.pth.tar`, `.pt`), a
safetensors file, or a legacy torch pickle (refused with a hint on how to re-save it).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pfq.convert import torch_zip
from pfq.convert.errors import ConvertError
from pfq.safe_open import UnsafeFileError, open_regular

_MAX_SAFETENSORS_HEADER = 100 << 20


@dataclass
class SourceFile:
    path: Path
    container: str  # "torch-zip" | "safetensors"
    tree: Any  # nested dicts/lists with TensorRef or np.ndarray leaves
    sha256: str


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= min(_MAX_SAFETENSORS_HEADER, size - 8) and head[8:9] == b"{"


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for bad headers/sizes
        raise ConvertError(f"{path}: unreadable safetensors file: {e}") from e


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The free-form `__metadata__` of a safetensors header (empty if none)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return dict(header.get("__metadata__") or {})


def read_source(path: str | Path) -> SourceFile:
    path = Path(path)
    try:
        with open_regular(path) as f:  # never a FIFO or a device, which would block or never end
            size = os.fstat(f.fileno()).st_size
            head = f.read(512)
    except UnsafeFileError as e:
        raise ConvertError(str(e)) from None
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        container, tree = "torch-zip", torch_zip.load(path)
    elif _looks_like_safetensors(head, size):
        container, tree = "safetensors", _read_safetensors(path)
    elif torch_zip.is_legacy_torch(head):
        torch_zip.load(path)  # raises the legacy-format error with the re-save hint
        raise AssertionError("unreachable")
    else:
        raise ConvertError(
            f"{path}: neither a torch zip checkpoint (.pth/.pt/.pth.tar) nor a safetensors "
            "file (if it is an old torch pickle, " + torch_zip.RESAVE_HINT + ")"
        )
    return SourceFile(path, container, tree, sha256_file(path))
