"""Training checkpoints: atomic writes, integrity check on read, newest-valid-first discovery.

A checkpoint holds only plain tensors, numbers and strings (model + optimizer state, step,
config hash), so it is read with ``torch.load(weights_only=True)``: nothing is unpickled.
Writes go to a temporary file in the same folder, are fsync'ed and then renamed, so a crash
mid-write leaves the previous checkpoint intact. A SHA-256 of the payload file sits next to
it (``.sha256``); a checkpoint whose digest does not match is skipped, never loaded.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import torch

from samv2core.errors import CheckpointError
from samv2core.outputs import atomic_write, write_text_atomic

CKPT_RE = re.compile(r"^step_(\d{8})\.pt$")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_torch_save(obj, path: "str | os.PathLike") -> None:
    """torch.save to ``path`` atomically (fsync'ed before the rename), plus a ``.sha256`` side file."""
    path = Path(path)

    buffer = io.BytesIO()  # serialised first: torch's own writer reports a full disk as a RuntimeError
    torch.save(obj, buffer)

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a full disk is an OSError naming the checkpoint: one line, exit 2
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())

    # payload first, then its digest: a crash in between leaves a mismatch -> skipped, and
    # the previous checkpoint (different file name) is still intact.
    atomic_write(path, write)
    write_text_atomic(path.with_name(path.name + ".sha256"), _sha256(path) + "\n")


def load_checked(path: "str | os.PathLike") -> dict:
    """Load a checkpoint written by atomic_torch_save; CheckpointError if missing/corrupt."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    if not side.is_file():
        raise CheckpointError(f"{path}: checksum file missing (incomplete write?)")
    if side.read_text().strip() != _sha256(path):
        raise CheckpointError(f"{path}: checksum mismatch (file corrupt or truncated)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot be read as a checkpoint ({str(exc).splitlines()[0][:160]})") from None
    if not isinstance(obj, dict) or "step" not in obj or "model" not in obj:
        raise CheckpointError(f"{path}: not a samv2-train checkpoint")
    return obj


def checkpoint_path(ckpt_dir: Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every step checkpoint in ``ckpt_dir``, newest first."""
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := CKPT_RE.match(p.name))]
    return sorted(found, reverse=True)


def latest_valid(ckpt_dir: Path, log=print) -> "tuple[dict, Path] | None":
    """The newest checkpoint that passes its integrity check; corrupt ones are reported and skipped."""
    for step, p in list_checkpoints(ckpt_dir):
        try:
            return load_checked(p), p
        except CheckpointError as exc:
            log(f"warning: skipping checkpoint: {exc}")
    return None


def is_valid(path: Path) -> bool:
    """True when ``path``'s digest file matches its content (the check load_checked makes first)."""
    side = path.with_name(path.name + ".sha256")
    try:
        return side.read_text().strip() == _sha256(path)
    except OSError:
        return False


def set_aside(path: Path) -> None:
    """Rename a corrupt checkpoint (and its digest) to ``*.corrupt``: no longer listed."""
    for q in (path, path.with_name(path.name + ".sha256")):
        if q.exists():
            os.replace(q, q.with_name(q.name + ".corrupt"))


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the ``keep`` newest VALID step checkpoints (and their digests). Corrupt
    ones never count towards ``keep`` (so they cannot push a valid one out) and are left for
    inspection."""
    valid = [p for _, p in list_checkpoints(ckpt_dir) if is_valid(p)]
    for p in valid[keep:]:
        for q in (p, p.with_name(p.name + ".sha256")):
            try:
                q.unlink()
            except FileNotFoundError:
                pass
