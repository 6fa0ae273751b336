"""The operations the module runs (embed, match, propagate, register), each described once:
its typed request, its step function and its result codec, in one table (:data:`OPERATIONS`).

The worker process (``server``) and the in-process run (:func:`run_local`, used by scripts
and tests through ``logic.SAMv2Logic.run``) both look operations up here, so the two paths
run the same code: decode the request, run the step, write the result (JSON + files with
fixed names in the request's result folder), read it back.

This module imports no torch: the GUI builds requests and decodes results. Only the step
functions need the core's heavy modules; they import ``steps`` when they run (worker side).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import SimpleITK as sitk

from samv2core.coords import PhysicalPoint
from samv2core.match_result import MatchResult
from samv2core.volume import Volume

from . import protocol


# --- requests -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VolumeRef:
    """A volume as the worker reads it: a file in the session's private folder (native voxel type)."""

    path: str
    modality: str  # 'CT', 'MR' or 'auto' (guessed from intensities by the worker)
    name: str


@dataclass(frozen=True)
class EmbedRequest:
    volumes: tuple[VolumeRef, ...]


@dataclass(frozen=True)
class MatchRequest:
    template: VolumeRef
    query: VolumeRef
    points_lps: np.ndarray  # (N, 3) mm, in the template's own voxel space
    method: str


@dataclass(frozen=True)
class PropagateRequest:
    template: VolumeRef
    query: VolumeRef
    method: str
    points_lps: Optional[np.ndarray] = None  # (1, 3): the lesion centre, with radius_mm
    radius_mm: Optional[float] = None
    mask: Optional[VolumeRef] = None  # or a 0/1 segment mask (samples are taken from it)


@dataclass(frozen=True)
class RegisterRequest:
    fixed: VolumeRef
    moving: VolumeRef
    mode: str
    deformable: bool
    options: dict = field(default_factory=dict)  # RegistrationOptions fields (rebuilt by the worker)


# --- results the GUI receives ----------------------------------------------------------------------
@dataclass(frozen=True)
class PropagateResult:
    centre: MatchResult
    region: Optional[Volume]  # 0/1 mask on the follow-up lattice
    details: dict


@dataclass(frozen=True)
class RegisterResult:
    """Maps FIXED LPS points to MOVING points (ITK convention): ``linear(x + displacement(x))``."""

    linear: sitk.Transform
    displacement: Optional[sitk.Image]
    report: dict

    def transform_points(self, lps) -> np.ndarray:
        """Fixed LPS point(s) (N, 3) -> moving points, through the displacement then the linear map."""
        composite = sitk.CompositeTransform(3)
        composite.AddTransform(self.linear)
        if self.displacement is not None:  # added last: applied first
            composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(self.displacement)))
        pts = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
        return np.array([composite.TransformPoint(tuple(p)) for p in pts])


# --- step functions (worker side: ``steps`` imports torch) -----------------------------------------
def _embed(session, req: EmbedRequest, load: Callable, progress):
    from . import steps  # noqa: PLC0415 - the step runs in the worker (or a script), never in the GUI

    return steps.embed_volumes(session, [load(v) for v in req.volumes], progress)


def _match(session, req: MatchRequest, load: Callable, progress):
    from . import steps  # noqa: PLC0415 - worker side only

    return steps.match(session, load(req.template), load(req.query), req.points_lps, req.method, progress)


def _propagate(session, req: PropagateRequest, load: Callable, progress):
    from . import steps  # noqa: PLC0415 - worker side only

    base, follow = load(req.template), load(req.query)
    mask = load(req.mask) if req.mask is not None else None
    if mask is not None:
        samples, _ = steps.segment_samples(mask)
        samples = samples[base.contains_lps(samples)]
    else:
        samples = req.points_lps
    centre, region, details = steps.propagate(session, base, follow, samples, req.method, req.radius_mm, mask,
                                              progress)
    return PropagateResult(centre, region, details)


def registration_options(values: dict):
    """RegistrationOptions from its (nested) fields; unknown fields are refused."""
    from samv2core.registration import RegistrationOptions  # noqa: PLC0415 - worker side only (torch)

    return _dataclass_from_dict(RegistrationOptions, values)


def _dataclass_from_dict(cls, values: dict):
    template = cls()
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s): {', '.join(sorted(unknown))}")
    kwargs = {}
    for name, value in values.items():
        current = getattr(template, name)
        if dataclasses.is_dataclass(current):
            value = _dataclass_from_dict(type(current), value)
        elif isinstance(current, tuple):
            value = tuple(value)
        kwargs[name] = value
    return cls(**kwargs)


def _register(session, req: RegisterRequest, load: Callable, progress):
    from . import steps  # noqa: PLC0415 - worker side only

    result = steps.register(session, load(req.fixed), load(req.moving), req.mode, req.deformable,
                            registration_options(req.options), progress)
    return RegisterResult(result.linear, result.displacement, dict(result.report))


# --- result codecs: JSON + files with fixed names in ``folder`` -----------------------------------
def match_to_dict(result: MatchResult) -> dict:
    return {"template_lps": list(result.template_point.to("LPS").xyz),
            "query_lps": list(result.query_point.to("LPS").xyz),
            "score": float(result.score), "confident": bool(result.confident), "reason": result.reason,
            "method": result.method, "details": protocol.plain(result.details),
            "answer": result.answer, "answer_reason": result.answer_reason}


def match_from_dict(data: dict) -> MatchResult:
    return MatchResult(PhysicalPoint(tuple(data["template_lps"]), "LPS"),
                       PhysicalPoint(tuple(data["query_lps"]), "LPS"),
                       float(data["score"]), bool(data["confident"]), data["reason"], data["method"],
                       dict(data.get("details") or {}), data.get("answer", "sam"), data.get("answer_reason"))


def _encode_names(names, folder: Path):
    return [str(n) for n in names]


def _decode_names(data, folder: Path):
    return [str(n) for n in data]


def _encode_matches(results, folder: Path):
    return [match_to_dict(r) for r in results]


def _decode_matches(data, folder: Path):
    return [match_from_dict(d) for d in data]


def _encode_propagation(result: PropagateResult, folder: Path):
    if result.region is not None:
        protocol.write_image(result.region.to_sitk(), folder / "region.nrrd")
    return {"centre": match_to_dict(result.centre), "details": protocol.plain(result.details),
            "region": result.region is not None}


def _decode_propagation(data, folder: Path):
    region = protocol.read_volume(folder / "region.nrrd", "CT", "propagated", folder) if data["region"] else None
    return PropagateResult(match_from_dict(data["centre"]), region, dict(data["details"]))


def _encode_registration(result: RegisterResult, folder: Path):
    sitk.WriteTransform(result.linear, str(folder / "linear.tfm"))
    if result.displacement is not None:
        protocol.write_image(result.displacement, folder / "displacement.nrrd")
    return {"report": protocol.plain(result.report), "displacement": result.displacement is not None}


def _decode_registration(data, folder: Path):
    linear = sitk.ReadTransform(str(protocol.regular_file(folder / "linear.tfm", folder, "transform file")))
    if linear.GetName() == "CompositeTransform":  # a .tfm of one transform may read back wrapped
        linear = sitk.CompositeTransform(linear).GetNthTransform(0)
    if linear.GetName() == "AffineTransform":
        linear = sitk.AffineTransform(linear)
    displacement = None
    if data["displacement"]:
        path = protocol.regular_file(folder / "displacement.nrrd", folder, "displacement file")
        displacement = sitk.ReadImage(str(path), sitk.sitkVectorFloat64)
    return RegisterResult(linear, displacement, dict(data["report"]))


# --- the table ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Operation:
    name: str
    request: type
    step: Callable[..., Any]  # (session, request, load_volume, progress) -> payload
    encode_result: Callable[[Any, Path], Any]  # payload -> JSON (files written to the folder)
    decode_result: Callable[[Any, Path], Any]  # JSON (+ files) -> what the GUI applies


OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("embed", EmbedRequest, _embed, _encode_names, _decode_names),
    Operation("match", MatchRequest, _match, _encode_matches, _decode_matches),
    Operation("propagate", PropagateRequest, _propagate, _encode_propagation, _decode_propagation),
    Operation("register", RegisterRequest, _register, _encode_registration, _decode_registration),
)}


def operation_of(request) -> Operation:
    for op in OPERATIONS.values():
        if type(request) is op.request:
            return op
    raise TypeError(f"not an operation request: {type(request).__name__}")


# --- request codec ----------------------------------------------------------------------------------
def _encode_value(value):
    if isinstance(value, VolumeRef):
        return {"volume": dataclasses.asdict(value)}
    if isinstance(value, tuple) and value and all(isinstance(v, VolumeRef) for v in value):
        return {"volumes": [dataclasses.asdict(v) for v in value]}
    if isinstance(value, np.ndarray):
        return {"array": value.tolist()}
    return protocol.plain(value)


def encode_request(request) -> dict:
    """The JSON arguments of a request (volumes as file references)."""
    return {f.name: _encode_value(getattr(request, f.name)) for f in dataclasses.fields(request)}


def _volume_ref(value) -> VolumeRef:
    if not isinstance(value, dict) or set(value) != {"path", "modality", "name"} \
            or not all(isinstance(v, str) for v in value.values()):
        raise ValueError("a volume reference needs string path, modality and name")
    return VolumeRef(**value)


def _decode_value(value):
    if isinstance(value, dict) and set(value) == {"volume"}:
        return _volume_ref(value["volume"])
    if isinstance(value, dict) and set(value) == {"volumes"} and isinstance(value["volumes"], list):
        return tuple(_volume_ref(v) for v in value["volumes"])
    if isinstance(value, dict) and set(value) == {"array"}:
        return np.asarray(value["array"], dtype=np.float64).reshape(-1, 3)
    return value


def decode_request(op_name: str, args) -> Any:
    """The typed request of a worker message; ValueError names what is wrong."""
    op = OPERATIONS.get(op_name) if isinstance(op_name, str) else None
    if op is None:
        raise ValueError(f"unknown operation {op_name!r}")
    if not isinstance(args, dict):
        raise ValueError(f"{op.name}: the arguments must be a JSON object")
    names = {f.name for f in dataclasses.fields(op.request)}
    if set(args) - names:
        raise ValueError(f"{op.name}: unknown argument(s) {', '.join(sorted(set(args) - names))}")
    values = {k: _decode_value(v) for k, v in args.items()}
    for f in dataclasses.fields(op.request):  # volumes must come as file references, nothing else
        value = values.get(f.name)
        if "VolumeRef" in str(f.type) and value is not None and not (
                isinstance(value, VolumeRef) or (isinstance(value, tuple) and all(isinstance(v, VolumeRef)
                                                                                  for v in value))):
            raise ValueError(f"{op.name}: {f.name} must be a volume reference")
    try:
        return op.request(**values)
    except TypeError as exc:
        raise ValueError(f"{op.name}: {exc}") from None


def volume_refs(request) -> list[VolumeRef]:
    """Every volume file a request names."""
    out = []
    for f in dataclasses.fields(request):
        value = getattr(request, f.name)
        if isinstance(value, VolumeRef):
            out.append(value)
        elif isinstance(value, tuple):
            out += [v for v in value if isinstance(v, VolumeRef)]
    return out


def run_local(session, request, load_volume: Callable[[VolumeRef], Volume], folder: Path, progress) -> Any:
    """Run a request in this process exactly as the worker does (step, result files, decode)."""
    op = operation_of(request)
    folder.mkdir(parents=True, exist_ok=True)
    data = json.loads(json.dumps(op.encode_result(op.step(session, request, load_volume, progress), folder)))
    return op.decode_result(data, folder)
