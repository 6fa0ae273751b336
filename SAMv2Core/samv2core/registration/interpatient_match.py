"""One-shot landmarks across patients: template points found on another subject through the
inter-patient registration (SAMv2's atlas task: annotate one template, find the points on every
other scan).

Each point is sent through the verified template -> query registration (interpatient.py, fixed =
template). Its ``confident`` flag is honest in the same sense as ``samv2 match``: a point is
confident only when

* the registration was accepted (otherwise RegistrationError: nothing is returned);
* the point lies inside the template body and maps inside the query image (a point outside
  the other scan's field of view has no answer there);
* **inverse consistency at the point**: the independent registration of the reverse direction
  (query -> template) sends the answer back to within ``max_inverse_mm`` of the template point.
  Where the two directions disagree, neither placement is trustworthy at that point.

The score is exp(-inverse error / max_inverse_mm), 1 for a perfectly consistent point.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np

from ..coords import PhysicalPoint
from ..errors import RegistrationError
from ..matching import MatchResult
from ..preprocess import body_mask
from ..volume import Volume
from .interpatient import InterPatientOptions, register_interpatient
from .result import RegistrationResult


@dataclass(frozen=True)
class InterPatientMatchOptions:
    """Knobs of :func:`match_across_patients` (written into the report)."""

    max_inverse_mm: float = 10.0  # confident only if the reverse registration returns the point this close
    deformable: bool = True
    registration: InterPatientOptions = field(default_factory=InterPatientOptions)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["registration"] = self.registration.to_dict()
        return d


def _inside_body(volume: Volume, points: np.ndarray) -> np.ndarray:
    mask = body_mask(volume)
    idx = np.rint(volume.lps_to_index(points)).astype(int)  # (N, 3) i, j, k
    idx = np.clip(idx, 0, np.asarray(mask.shape[::-1]) - 1)
    inside = volume.contains_lps(points)
    out = np.zeros(len(points), bool)
    for n, (i, j, k) in enumerate(idx):
        if inside[n]:
            out[n] = bool(mask[k, j, i])
    return out


def match_across_patients(template: Volume, query: Volume, points_lps,
                          options: Optional[InterPatientMatchOptions] = None,
                          forward: Optional[RegistrationResult] = None) -> tuple[list[MatchResult], dict]:
    """Template points (N, 3) LPS located on ``query`` (another subject).

    ``forward``: an accepted template -> query inter-patient registration already computed (else
    it is run here). Returns (one MatchResult per point, report: both registrations' reports).
    Raises RegistrationError (one line) when the template -> query registration is refused.
    """
    opts = options or InterPatientMatchOptions()
    pts = np.asarray(points_lps, dtype=float).reshape(-1, 3)
    if forward is None:
        forward = register_interpatient(template, query, deformable=opts.deformable, options=opts.registration)
    mapped = np.array([forward.composite.TransformPoint(tuple(p)) for p in pts])
    try:
        backward = register_interpatient(query, template, deformable=opts.deformable, options=opts.registration)
        back = np.array([backward.composite.TransformPoint(tuple(q)) for q in mapped])
        inverse_mm = np.linalg.norm(back - pts, axis=1)
        backward_reason = None
    except RegistrationError as exc:  # the reverse direction refused: no point can be checked
        backward, inverse_mm, backward_reason = None, np.full(len(pts), np.inf), str(exc)
    in_template = _inside_body(template, pts)
    in_query = query.contains_lps(mapped)
    results = []
    for n, p in enumerate(pts):
        reasons = []
        if not in_template[n]:
            reasons.append("the template point is outside the template body")
        if not in_query[n]:
            reasons.append("the point maps outside the query image's field of view")
        if backward_reason:
            reasons.append(f"the reverse registration was refused ({backward_reason})")
        elif inverse_mm[n] > opts.max_inverse_mm:
            reasons.append(f"the reverse registration returns it {inverse_mm[n]:.1f} mm away "
                           f"(bound {opts.max_inverse_mm:g} mm)")
        err = float(inverse_mm[n])
        score = float(np.exp(-err / opts.max_inverse_mm)) if np.isfinite(err) else 0.0
        results.append(MatchResult(PhysicalPoint(tuple(float(v) for v in p)),
                                   PhysicalPoint(tuple(float(v) for v in mapped[n])), score, not reasons,
                                   "; ".join(reasons) or None, "inter-patient registration",
                                   {"inverse_consistency_mm": round(err, 2) if np.isfinite(err) else None},
                                   answer="registration"))
    report = {"pair": "inter-patient", "forward": forward.report,
              "backward": backward.report if backward is not None else {"refused": backward_reason},
              "settings": opts.to_dict()}
    return results, report


__all__ = ["InterPatientMatchOptions", "match_across_patients"]
