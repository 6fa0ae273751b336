"""The line protocol between the Slicer module and its worker process (``server``).

One JSON object per line, UTF-8. The client writes requests to the worker's stdin::

    {"id": 3, "op": "match", "args": {...}}      op: embed | match | propagate | register | ping
    {"op": "cancel", "id": 3}                    stop request 3 (queued or running)
    {"op": "shutdown"}

and reads events from its stdout::

    {"event": "ready", "pid": 1234, "protocol": 1}
    {"id": 3, "event": "progress", "fraction": 0.42, "message": "embedding follow-up"}
    {"id": 3, "event": "result", "result": {...}}
    {"id": 3, "event": "error", "kind": "InputError", "message": "...", "traceback": "..."}
    {"id": 3, "event": "cancelled"}

Every request names its model in ``args["model"]`` (the worker loads it once). The module never
sends ``set_model``: that op only loads the model ahead (Testing/Benchmarks/benchmark_worker.py
times the start-up with it).

Volumes and results never travel in the pipe: volumes are NRRD files (LPS geometry of the
core Volume, i.e. the node's voxels with its geometry) in the session's private folder,
written once per volume; results with images or transforms come
back as files (NRRD, ITK .tfm) next to a JSON description. This module holds the message
and payload codecs shared by both sides; it imports no Qt and no Slicer.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable

import numpy as np
import SimpleITK as sitk

from samv2core.coords import PhysicalPoint
from samv2core.matching import MatchResult
from samv2core.outputs import atomic_write
from samv2core.volume import Volume

PROTOCOL_VERSION = 1
OPS = ("embed", "match", "propagate", "register", "set_model", "ping")


# --- messages ---------------------------------------------------------------------------------
def _plain(obj):
    """json default: numpy scalars/arrays, paths, tuples of those."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    return str(obj)


def encode(message: dict) -> bytes:
    """One protocol line (ends with a newline)."""
    return (json.dumps(message, default=_plain, separators=(",", ":")) + "\n").encode("utf-8")


def decode(line: "bytes | str") -> dict:
    text = line.decode("utf-8") if isinstance(line, bytes) else line
    message = json.loads(text)
    if not isinstance(message, dict):
        raise ValueError(f"protocol: expected a JSON object, got {type(message).__name__}")
    return message


# --- volumes as files ------------------------------------------------------------------------
def volume_key(volume: Volume) -> str:
    """A file-safe key of the volume's content (voxels, geometry, modality)."""
    return volume.content_key[:24]


def write_volume(volume: Volume, folder: "str | Path", key: "str | None" = None) -> dict:
    """Write a volume (uncompressed NRRD, atomically) and return its reference for a request."""
    key = key or volume_key(volume)
    path = Path(folder) / f"vol-{key}.nrrd"
    if not path.is_file():
        atomic_write(path, lambda tmp: sitk.WriteImage(volume.to_sitk(), str(tmp), False))
    return {"key": key, "path": str(path), "modality": volume.modality.value, "name": volume.name}


def read_volume(ref: dict) -> Volume:
    return Volume.from_sitk(sitk.ReadImage(ref["path"]), ref["modality"], name=ref.get("name", ""))


# --- request arguments -------------------------------------------------------------------------
def encode_inputs(op: str, inputs: dict, volume_ref: Callable[[Volume], dict]) -> dict:
    """JSON-ready arguments of a Job's inputs: Volumes become file references."""
    args = {}
    for name, value in inputs.items():
        if isinstance(value, Volume):
            args[name] = {"volume": volume_ref(value)}
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, Volume) for v in value):
            args[name] = {"volumes": [volume_ref(v) for v in value]}
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            args[name] = {"options": type(value).__name__, "values": _plain(value)}
        elif isinstance(value, np.ndarray):
            args[name] = {"array": value.tolist()}
        else:
            args[name] = value
    return args


def decode_inputs(args: dict, load_volume: Callable[[dict], Volume]) -> dict:
    """The inverse of :func:`encode_inputs` (volumes loaded through ``load_volume``, which may cache)."""
    out = {}
    for name, value in args.items():
        if isinstance(value, dict) and "volume" in value:
            out[name] = load_volume(value["volume"])
        elif isinstance(value, dict) and "volumes" in value:
            out[name] = [load_volume(v) for v in value["volumes"]]
        elif isinstance(value, dict) and "array" in value:
            out[name] = np.asarray(value["array"], dtype=np.float64)
        elif isinstance(value, dict) and "options" in value:
            out[name] = _options_from_dict(value["options"], value["values"])
        else:
            out[name] = value
    return out


def _options_from_dict(class_name: str, values: dict):
    from samv2core.registration import RegistrationOptions  # noqa: PLC0415 - the GUI imports this module before the pip dependencies are installed

    if class_name != RegistrationOptions.__name__:
        raise ValueError(f"protocol: unknown options class {class_name!r}")
    return _dataclass_from_dict(RegistrationOptions, values)


def _dataclass_from_dict(cls, values: dict):
    """Rebuild a (nested) options dataclass from ``asdict`` output; tuples stay tuples."""
    template = cls()
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        current, value = getattr(template, f.name), values[f.name]
        if dataclasses.is_dataclass(current):
            value = _dataclass_from_dict(type(current), value)
        elif isinstance(current, tuple):
            value = tuple(value)
        kwargs[f.name] = value
    return cls(**kwargs)


# --- results ------------------------------------------------------------------------------------
def match_to_dict(result: MatchResult) -> dict:
    return {"template_lps": list(result.template_point.to("LPS").xyz),
            "query_lps": list(result.query_point.to("LPS").xyz),
            "score": float(result.score), "confident": bool(result.confident), "reason": result.reason,
            "method": result.method, "details": json.loads(json.dumps(result.details, default=_plain)),
            "answer": result.answer, "answer_reason": result.answer_reason}


def match_from_dict(data: dict) -> MatchResult:
    return MatchResult(PhysicalPoint(tuple(data["template_lps"]), "LPS"),
                       PhysicalPoint(tuple(data["query_lps"]), "LPS"),
                       float(data["score"]), bool(data["confident"]), data["reason"], data["method"],
                       dict(data.get("details") or {}), data.get("answer", "sam"), data.get("answer_reason"))


def encode_result(op: str, payload: Any, folder: "str | Path") -> Any:
    """JSON-ready description of a step's payload; images and transforms go to files in ``folder``."""
    folder = Path(folder)
    if op == "match":
        return [match_to_dict(r) for r in payload]
    if op == "propagate":
        centre, region, details = payload
        out = {"centre": match_to_dict(centre), "details": details, "region": None}
        if region is not None:
            out["region"] = write_volume(region, folder, key="region")
        return out
    if op == "register":
        out = {"report": json.loads(json.dumps(payload.report, default=_plain)), "linear": str(folder / "linear.tfm"),
               "displacement": None}
        sitk.WriteTransform(payload.linear, out["linear"])
        if payload.displacement is not None:
            out["displacement"] = str(folder / "displacement.nrrd")
            sitk.WriteImage(payload.displacement, out["displacement"], False)
        return out
    return payload  # embed, set_model, ping: plain JSON already


def decode_result(op: str, data: Any) -> Any:
    """The payload a Job's ``compute`` would have returned, rebuilt from :func:`encode_result` output."""
    if op == "match":
        return [match_from_dict(d) for d in data]
    if op == "propagate":
        region = None
        if data["region"] is not None:
            region = read_volume(data["region"])
        return match_from_dict(data["centre"]), region, dict(data["details"])
    if op == "register":
        from samv2core.registration.result import RegistrationResult  # noqa: PLC0415 - the GUI imports this module before the pip dependencies are installed

        linear = sitk.ReadTransform(data["linear"])
        if linear.GetName() == "CompositeTransform":  # a .tfm of one transform may read back wrapped
            linear = sitk.CompositeTransform(linear).GetNthTransform(0)
        linear = sitk.AffineTransform(linear) if linear.GetName() == "AffineTransform" else linear
        displacement = sitk.ReadImage(data["displacement"], sitk.sitkVectorFloat64) if data["displacement"] else None
        composite = sitk.CompositeTransform(3)
        composite.AddTransform(linear)
        if displacement is not None:
            composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(displacement)))
        return RegistrationResult(linear, displacement, composite, dict(data["report"]))
    return data
