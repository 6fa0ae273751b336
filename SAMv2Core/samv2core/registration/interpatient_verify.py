"""The inter-patient verification policy: when a registration between two people is accepted.

The same-patient policy (verify.py) asks for a distinct millimetre-level optimum; between two
people there is none, so it refuses them all. Here a result is accepted only when:

* **every alternative start loses**: the chosen affine has the lowest distance of all starts,
  and any start that ended at a clearly different pose (more than ``ambiguous_mm`` apart over the
  fixed body) is worse by at least ``ambiguity_margin`` (relative): otherwise two anatomical
  placements explain the images equally well (e.g. a thin slab beside repeating vertebrae);
* **it improved**: the chosen affine's distance is below its start's and below the chance distance
  of unrelated anatomy;
* **inverse consistency**: the affine refined from the moving side, started at the inverse,
  returns fixed body points to within ``max_inverse_p90_mm`` (90th percentile);
* **no folding**: the deformable map's Jacobian determinant is <= 0 on at most
  ``max_folding_percent`` of the fixed body, and the deformable step lowered the distance;
* **the bodies overlap**: Dice of the fixed body and the warped moving body, inside the moving
  field of view, at least ``min_body_dice``; and at least ``min_inside_fraction`` of the fixed
  body (or of the smaller field of view) maps into the moving image;
* **better than the scanner coordinates** (when the scanner boxes intersect): the final
  distance over the fixed body is below that of the identity map by ``min_gain_over_identity``
  (relative); otherwise the scanner coordinates already fit as well and the result is refused.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class InterPatientVerifyOptions:
    """Thresholds of the inter-patient policy (written into the report)."""

    ambiguous_mm: float = 20.0
    ambiguity_margin: float = 0.01
    max_inverse_p90_mm: float = 10.0
    max_folding_percent: float = 0.1
    min_body_dice: float = 0.8
    min_inside_fraction: float = 0.2
    min_gain_over_identity: float = 0.01

    def to_dict(self) -> dict:
        return asdict(self)


def pose_gap_mm(a: np.ndarray, b: np.ndarray, points: np.ndarray) -> float:
    """Mean distance (mm) between where two 4x4 maps send the same points."""
    p = np.c_[points, np.ones(len(points))]
    return float(np.linalg.norm(p @ (a - b).T, axis=1).mean())


def verify_interpatient(candidates: list, inverse: dict, jacobian: dict, deformable: dict, body_dice: float,
                        inside_fraction: float, opts: InterPatientVerifyOptions,
                        points: np.ndarray | None = None, chance: float | None = None,
                        identity: dict | None = None) -> dict:
    """Apply the policy. ``candidates``: the affine results of every start, best (chosen) first
    (objects with name, start_distance, matrix, distance); ``identity``: {"identity", "result"}
    body distances when the scanner boxes intersect. Returns {"passed", "reason", "checks"}."""
    chosen = candidates[0]
    checks: dict = {}
    reasons: list[str] = []
    if points is None:
        points = np.zeros((1, 3))
    rivals = []
    for c in candidates[1:]:
        if c.distance < chosen.distance:
            reasons.append(f"the start '{c.name}' reached a better fit than the result")
        gap = pose_gap_mm(c.matrix, chosen.matrix, points) if len(points) > 1 else float("nan")
        rel = (c.distance - chosen.distance) / max(chosen.distance, 1e-9)
        rivals.append({"start": c.name, "pose_gap_mm": round(gap, 1), "relative_worse": round(rel, 4)})
        if gap > opts.ambiguous_mm and rel < opts.ambiguity_margin:
            reasons.append(f"the start '{c.name}' reached a pose {gap:.0f} mm away that fits as well "
                           f"({100 * rel:.1f}% worse): ambiguous placement")
    checks["alternative_starts"] = rivals
    if chosen.distance >= chosen.start_distance:
        reasons.append("the affine did not improve on its start")
    if chance is not None:
        checks["chance_distance"] = round(chance, 5)
        if chosen.distance >= chance:
            reasons.append("the result fits no better than unrelated anatomy")
    checks["inverse_p90_mm"] = inverse.get("p90_mm")
    if inverse.get("p90_mm", np.inf) > opts.max_inverse_p90_mm:
        reasons.append(f"inverse inconsistent: the affine refined from the moving side is "
                       f"{inverse.get('p90_mm')} mm off (90th percentile; bound {opts.max_inverse_p90_mm:g} mm)")
    if jacobian:
        fold = jacobian.get("folding_percent", 0.0)
        checks["folding_percent"] = fold
        if fold > opts.max_folding_percent:
            reasons.append(f"the deformable map folds on {fold:.3g}% of the body (bound {opts.max_folding_percent:g}%)")
        if deformable.get("distance_final", 0.0) > deformable.get("distance_linear", 0.0):
            reasons.append("the deformable step made the images agree less")
    checks["body_dice"] = round(body_dice, 4)
    if body_dice < opts.min_body_dice:
        reasons.append(f"the bodies overlap too little after registration (Dice {body_dice:.2f} < {opts.min_body_dice:g})")
    checks["inside_fraction"] = round(inside_fraction, 4)
    if inside_fraction < opts.min_inside_fraction:
        reasons.append(f"only {100 * inside_fraction:.0f}% of the fixed body maps into the moving image")
    if identity is not None:
        checks["distance_vs_scanner_coordinates"] = identity
        if identity["result"] > identity["identity"] * (1.0 - opts.min_gain_over_identity):
            reasons.append(f"the result fits no better than the scanner coordinates (distance {identity['result']:.4g} "
                           f"vs {identity['identity']:.4g}): the images are already aligned, use them as they are")
    return {"policy": "inter-patient", "passed": not reasons, "reason": "; ".join(reasons) or None,
            "checks": checks, "thresholds": opts.to_dict()}
