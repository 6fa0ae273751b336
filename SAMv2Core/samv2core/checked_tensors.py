"""Safetensors files that carry a checksum of their own tensors, written atomically.

``save_checked`` stores the SHA-256 of every tensor's bytes (in key order) in the file's
metadata under ``tensors_sha256``; ``load_checked`` recomputes it and raises
``CorruptFileError`` when the file is truncated, unreadable or its payload changed (a header
left intact over corrupted data is caught too). Used for the embedding disk cache and
``samv2 embed --out``.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import SAMv2Error
from .outputs import atomic_write

_log = logging.getLogger(__name__)

CHECKSUM_KEY = "tensors_sha256"


class CorruptFileError(SAMv2Error):
    """A checked tensor file is unreadable, truncated or fails its checksum."""


def tensors_sha256(tensors: dict) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def save_checked(path: "str | os.PathLike", tensors: dict, metadata: dict | None = None) -> Path:
    """Write ``tensors`` (name -> tensor) with ``metadata`` (str -> str) and their checksum."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {**(metadata or {}), CHECKSUM_KEY: tensors_sha256(tensors)}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def load_checked(path: "str | os.PathLike") -> tuple[dict, dict]:
    """(tensors, metadata) of a file written by ``save_checked``; CorruptFileError otherwise."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises several types for a damaged header/payload
        raise CorruptFileError(f"{path}: unreadable tensor file ({str(exc).splitlines()[0][:120]})") from None
    expected = meta.get(CHECKSUM_KEY)
    if not expected:
        raise CorruptFileError(f"{path}: no checksum in the file (written by another tool or version)")
    if tensors_sha256(tensors) != expected:
        raise CorruptFileError(f"{path}: checksum mismatch (the file is corrupt)")
    return tensors, meta


def discard_cache_entry(path: Path, what: str, exc: Exception) -> None:
    """Drop a cache entry that failed its checks: one warning naming ``what`` and why, then the
    file is removed so the value is recomputed. Never raises: a cache never fails a command."""
    _log.warning("samv2: warning: %s ignored and recomputed: %s", what, exc)
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


def load_keyed_entry(path: Path, key: str):
    """(tensors, metadata) of the cache entry at ``path`` written for ``key``; None when absent.

    Raises CorruptFileError when the checksum fails or the entry was written for another key."""
    path = Path(path)
    if not path.exists():
        return None
    tensors, meta = load_checked(path)
    if meta.get("key") != key:
        raise CorruptFileError(f"{path}: entry is for another pair or settings")
    return tensors, meta
