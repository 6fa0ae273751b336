"""The line protocol between the Slicer module and its worker process (``server``).

One JSON object per line, UTF-8. The client writes requests to the worker's stdin::

    {"id": 3, "op": "match", "args": {...}}      op: an ``ops.OPERATIONS`` name, or ping
    {"op": "cancel", "id": 3}                    stop request 3 (queued or running)
    {"op": "shutdown"}

and reads events from its stdout::

    {"event": "ready", "pid": 1234, "protocol": 2}
    {"id": 3, "event": "progress", "fraction": 0.42, "message": "embedding follow-up"}
    {"id": 3, "event": "result", "result": {...}, "device": "cpu"}
    {"id": 3, "event": "error", "kind": "InputError", "message": "...", "traceback": "..."}
    {"id": 3, "event": "cancelled"}

A request id is a non-negative integer (anything else is answered with an error whose id is
null). Volumes and results never travel in the pipe: volumes are NRRD files (native voxel
type) in the session's private folder; results with images or transforms come back as files
with fixed names in ``results/r<id>/`` of that folder. The worker opens only regular files
inside its private folder, plus the model file the client names. This module holds the
message codec and the file checks both sides use; it imports no Qt, no Slicer and no torch.
"""
from __future__ import annotations

import dataclasses
import json
import os
import stat
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from samv2core.errors import InputError
from samv2core.volume import Volume

PROTOCOL_VERSION = 2
MAX_REQUEST_ID = 2**53  # JSON-safe integers


# --- messages ---------------------------------------------------------------------------------
def _plain(obj):
    """json default: numpy scalars/arrays, paths, dataclasses."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def plain(value):
    """A JSON-ready copy of ``value`` (numpy values become Python ones)."""
    return json.loads(json.dumps(value, default=_plain))


def encode(message: dict) -> bytes:
    """One protocol line (ends with a newline)."""
    return (json.dumps(message, default=_plain, separators=(",", ":")) + "\n").encode("utf-8")


def decode(line: "bytes | str") -> dict:
    """The message of one line; ValueError for anything that is not a JSON object."""
    try:
        message = json.loads(line.decode("utf-8") if isinstance(line, bytes) else line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"protocol: not a JSON line ({exc})") from None
    if not isinstance(message, dict):
        raise ValueError(f"protocol: expected a JSON object, got {type(message).__name__}")
    return message


def valid_request_id(value) -> bool:
    """Request ids name result folders: only plain non-negative integers are accepted."""
    return type(value) is int and 0 <= value < MAX_REQUEST_ID


def result_folder(workdir: "str | Path", request_id: int) -> Path:
    """The folder of a request's result files (the id is checked: never a path from the wire)."""
    if not valid_request_id(request_id):
        raise ValueError(f"protocol: invalid request id {request_id!r}")
    return Path(workdir) / "results" / f"r{request_id}"


# --- files ---------------------------------------------------------------------------------------
def regular_file(path: "str | Path", inside: "str | Path | None" = None, what: str = "file") -> Path:
    """``path`` resolved, after checking it is a regular file (not a FIFO, device or folder) and,
    with ``inside``, that it lies in that folder (links resolved). InputError otherwise."""
    p = Path(path)
    try:
        real = p.resolve(strict=True)
        mode = os.stat(real).st_mode
    except (OSError, RuntimeError):
        raise InputError(f"{what} {p.name!r} not found") from None
    if inside is not None:
        root = Path(inside).resolve()
        if real != root and root not in real.parents:
            raise InputError(f"{what} {p.name!r} is outside the worker's private folder")
    if not stat.S_ISREG(mode):
        raise InputError(f"{what} {p.name!r} is not a regular file")
    return real


def write_image(image: sitk.Image, path: "str | Path") -> None:
    """Write an image atomically (uncompressed: the folder is private and short-lived)."""
    from samv2core.outputs import atomic_write  # noqa: PLC0415 - light core module, only when writing

    atomic_write(Path(path), lambda tmp: sitk.WriteImage(image, str(tmp), False))


def read_volume(path: "str | Path", modality: str = "auto", name: str = "", inside=None) -> Volume:
    """A core Volume from a volume file of the protocol (checked as :func:`regular_file`)."""
    real = regular_file(path, inside, "volume file")
    return Volume.from_sitk(sitk.ReadImage(str(real)), modality, name=name)
