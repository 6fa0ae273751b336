"""Follow-up reading of every lesion at once: joint one-to-one matching of many baseline lesions.

Each lesion (a point, a point + radius, or a segment) is matched by the refined match
(``propagate.propagate_lesion``), then the matches are assigned jointly
(``scipy.optimize.linear_sum_assignment``): the places the matches point at are the columns,
and a lesion's cost for a place is its distance from where the lesion's neighbours' motion puts
it (``fitting.neighbour_prediction``). So two lesions cannot take one place, a match that
landed on a neighbour's place is given back (no identity swap) and a match its neighbours
disagree with is not accepted. Where the lesion was given with a radius or a segment, its
contrast is looked for at its place on the follow-up (``lesion_size.resegment``): faded
contrast means the lesion is not found there. Segments give volume and longest axial diameter
at both timepoints (a measurement aid for the reader, not a diagnosis).

Statuses: ``found``, ``not found`` (inside the follow-up but no match), ``outside the
follow-up``, ``ambiguous`` (two baseline lesions compete for one place, or their follow-up
segments join: a possible merge) and, for candidate regions of the follow-up with no baseline
partner, ``new``. All coordinates are LPS millimetres.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Optional, Sequence

import numpy as np
from scipy import ndimage
from scipy.optimize import linear_sum_assignment

from .embed import Embeddings
from .errors import InputError
from .fitting import neighbour_prediction
from .lesion_size import LesionSize, crop, mask_box, measure, resegment
from .matching import MatchOptions, MatchResult, match_points
from .propagate import propagate_lesion, sphere_mask
from .volume import Volume

STATUSES = ("found", "not found", "outside the follow-up", "ambiguous", "new")
MERGE_MM = 4.0  # matches closer than this point at one place
GATE_MM = 10.0  # a match may lie this far (plus a tenth of the nearest neighbour's distance) from the constellation's place
MAX_GATE_MM = 25.0
CLAIM_MM = 7.5  # a candidate region within a lesion's radius + this of its expected place is that lesion
SIGMA_MM = 60.0  # neighbours' weight falls to exp(-1/2) at this distance


def new_tracking_uid() -> str:
    """A DICOM UID derived from a random UUID (the 2.25 root, PS3.5 B.2)."""
    return f"2.25.{uuid.uuid4().int}"


@dataclass(frozen=True, eq=False)
class BaselineLesion:
    """One baseline lesion: ``centre_lps`` (3,) LPS mm, optionally ``radius_mm`` or ``mask``
    (0/1 Volume on a baseline-aligned lattice, usually a crop), and its tracking identifier
    (human-readable ``tracking_id`` and ``tracking_uid``, kept across timepoints)."""

    name: str
    centre_lps: tuple
    radius_mm: Optional[float] = None
    mask: Optional[Volume] = None
    tracking_id: str = ""
    tracking_uid: str = field(default_factory=new_tracking_uid)

    def __post_init__(self):
        c = np.asarray(self.centre_lps, dtype=np.float64).reshape(-1)
        if c.size != 3 or not np.all(np.isfinite(c)):
            raise InputError(f"lesion {self.name}: the centre must be three finite LPS coordinates")
        object.__setattr__(self, "centre_lps", tuple(float(v) for v in c))
        if not self.tracking_id:
            object.__setattr__(self, "tracking_id", self.name)
        if self.radius_mm is not None and not (np.isfinite(self.radius_mm) and self.radius_mm > 0):
            raise InputError(f"lesion {self.name}: the radius must be a positive number of mm, got {self.radius_mm}")

    @property
    def centre(self) -> np.ndarray:
        return np.asarray(self.centre_lps)


def lesions_from_points(points_lps, radius_mm: Optional[float] = None,
                        names: Optional[Sequence[str]] = None) -> list[BaselineLesion]:
    """Baseline lesions from (N, 3) LPS points, each with ``radius_mm`` when given."""
    pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    if len(pts) == 0:
        raise InputError("no lesion given")
    names = list(names) if names else [f"lesion {n + 1}" for n in range(len(pts))]
    return [BaselineLesion(str(nm), tuple(p), radius_mm) for nm, p in zip(names, pts)]


def lesions_from_label_map(labels: Volume, split_components: bool = True) -> list[BaselineLesion]:
    """Baseline lesions from a label map: one per label value, or, for a map with one value and
    ``split_components``, one per connected component (26-connected). Masks are cropped."""
    arr = np.asarray(labels.array)
    values = [int(v) for v in np.unique(arr) if v != 0]
    if not np.all(np.unique(arr) == np.round(np.unique(arr))):
        raise InputError(f"{labels.name or 'lesion map'}: not a label map (non-integer voxel values)")
    if not values:
        raise InputError(f"{labels.name or 'lesion map'}: no lesion (every voxel is 0)")
    parts = []
    if len(values) == 1 and split_components:
        comp, n = ndimage.label(arr == values[0], structure=np.ones((3, 3, 3)))
        parts = [(f"lesion {c}", comp == c) for c in range(1, n + 1)]
    else:
        parts = [(f"label {v}", arr == v) for v in values]
    out = []
    for name, inside in parts:
        mask = labels.with_array(inside.astype(np.float32), name=name)
        mask = crop(mask, *mask_box(mask, 2.0))
        zyx = np.argwhere(mask.array > 0.5)
        out.append(BaselineLesion(name, tuple(mask.index_to_lps(zyx[:, ::-1].mean(0))), mask=mask))
    return out


@dataclass(frozen=True, eq=False)
class TrackedLesion:
    """A baseline lesion on the follow-up.

    ``position_lps``: where it is now (found / ambiguous) or where it was expected (else; None
    when nothing places it); ``match``: the lesion centre's refined match; sizes when the
    lesion was given as a segment; ``followup_mask``: its follow-up segment (a crop of the
    follow-up lattice) when one was found.
    """

    lesion: BaselineLesion
    status: str
    reason: str
    position_lps: Optional[tuple]
    match: Optional[MatchResult]
    baseline_size: Optional[LesionSize] = None
    followup_size: Optional[LesionSize] = None
    followup_mask: Optional[Volume] = None
    details: dict = field(default_factory=dict)

    def change(self) -> Optional[dict]:
        """Absolute and relative change of volume and longest axial diameter (None without sizes)."""
        if self.baseline_size is None or self.followup_size is None:
            return None
        out = {}
        for key in ("volume_ml", "longest_axial_mm"):
            a, b = getattr(self.baseline_size, key), getattr(self.followup_size, key)
            out[key] = {"absolute": round(b - a, 4), "percent": round(100 * (b - a) / a, 1) if a > 0 else None}
        return out

    def to_dict(self, system: str = "LPS") -> dict:
        flip = np.array([-1.0, -1.0, 1.0]) if system.upper() == "RAS" else np.ones(3)
        pos = None if self.position_lps is None else [round(float(v), 2) for v in np.asarray(self.position_lps) * flip]
        return {"name": self.lesion.name, "tracking_id": self.lesion.tracking_id,
                "tracking_uid": self.lesion.tracking_uid, "status": self.status, "reason": self.reason,
                "baseline_position": [round(float(v), 2) for v in self.lesion.centre * flip],
                "followup_position": pos,
                "match": None if self.match is None else self.match.to_dict(system.upper()),
                "baseline_size": None if self.baseline_size is None else self.baseline_size.to_dict(),
                "followup_size": None if self.followup_size is None else self.followup_size.to_dict(),
                "change": self.change(), "details": self.details}


@dataclass(frozen=True, eq=False)
class NewFinding:
    """A candidate region of the follow-up with no baseline partner."""

    name: str
    position_lps: tuple
    size: LesionSize
    tracking_id: str
    tracking_uid: str
    reason: str
    mask: Optional[Volume] = None

    def to_dict(self, system: str = "LPS") -> dict:
        flip = np.array([-1.0, -1.0, 1.0]) if system.upper() == "RAS" else np.ones(3)
        return {"name": self.name, "tracking_id": self.tracking_id, "tracking_uid": self.tracking_uid,
                "status": "new", "reason": self.reason,
                "followup_position": [round(float(v), 2) for v in np.asarray(self.position_lps) * flip],
                "followup_size": self.size.to_dict()}


NOTE = ("Sizes and changes are a measurement aid for the reader (in the spirit of RECIST 1.1), "
        "not a diagnosis or a response category.")


@dataclass(frozen=True, eq=False)
class TrackingResult:
    """Every baseline lesion on one follow-up, and the new findings there."""

    lesions: tuple
    new_findings: tuple
    seconds: float
    details: dict = field(default_factory=dict)

    def counts(self) -> dict:
        out = {s: 0 for s in STATUSES}
        for t in self.lesions:
            out[t.status] += 1
        out["new"] = len(self.new_findings)
        return out

    def to_dict(self, system: str = "LPS") -> dict:
        return {"coordinate_system": system.upper(), "note": NOTE, "counts": self.counts(),
                "lesions": [t.to_dict(system) for t in self.lesions],
                "new_findings": [n.to_dict(system) for n in self.new_findings],
                "seconds": round(self.seconds, 3), "details": self.details}


# --- the assignment -------------------------------------------------------------------------
@dataclass(frozen=True)
class Assignment:
    """Outcome of ``assign`` per lesion: ``taken`` the index of the lesion whose match it took
    (itself normally, another on a swap; -1 when none), ``expected`` where its neighbours put
    it (None without neighbours), ``deviation_mm`` its own match's distance from there,
    ``rival`` the lesion that took its place when it competed for it (-1 otherwise)."""

    taken: np.ndarray
    expected: list
    deviation_mm: np.ndarray
    gate_mm: np.ndarray
    rival: np.ndarray


def assign(baseline_lps, matched_lps, usable, *, merge_mm: float = MERGE_MM, gate_mm: float = GATE_MM,
           sigma_mm: float = SIGMA_MM) -> Assignment:
    """One-to-one assignment of lesions to the places their matches point at.

    Args:
        baseline_lps: (N, 3) baseline lesion centres; matched_lps: (N, 3) their matches.
        usable: (N,) bool, matches that may be placed (e.g. inside the follow-up).
    Returns:
        Assignment. A lesion's cost for a place is the distance from where its (other,
        usable) neighbours' motion puts it; costs above its gate leave it unassigned.
    """
    src = np.asarray(baseline_lps, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(matched_lps, dtype=np.float64).reshape(-1, 3)
    use = np.asarray(usable, bool).ravel()
    n = len(src)
    expected, gates = [], np.full(n, float(gate_mm))
    for i in range(n):
        others = use & (np.arange(n) != i)
        q = neighbour_prediction(src[others], dst[others], src[i], sigma_mm=sigma_mm) if others.any() else None
        expected.append(q)
        if q is not None:
            nearest = float(np.linalg.norm(src[others] - src[i], axis=1).min())
            gates[i] = min(MAX_GATE_MM, gate_mm + 0.1 * nearest)
    anchor = [dst[i] if expected[i] is None else expected[i] for i in range(n)]
    deviation = np.array([0.0 if expected[i] is None else float(np.linalg.norm(dst[i] - expected[i]))
                          for i in range(n)])
    # places: usable matches closer than merge_mm are one place
    places, members = [], []
    for i in np.flatnonzero(use):
        for p, m in enumerate(members):
            if np.linalg.norm(dst[i] - places[p]) < merge_mm:
                m.append(i)
                break
        else:
            places.append(dst[i])
            members.append([i])
    big = 1e6
    cost = np.full((n, len(places) + n), big)
    for i in range(n):
        cost[i, len(places) + i] = gates[i]  # staying unassigned costs the gate
        for p, place in enumerate(places):
            c = float(np.linalg.norm(place - anchor[i]))
            if c <= gates[i]:
                cost[i, p] = c - (1e-3 if i in members[p] else 0.0)  # ties go to the lesion's own match
    rows, cols = linear_sum_assignment(cost)
    taken, rival = np.full(n, -1), np.full(n, -1)
    owner = {}
    for i, c in zip(rows, cols):
        if c < len(places):
            m = members[c]
            taken[i] = i if i in m else min(m, key=lambda j: float(np.linalg.norm(dst[j] - anchor[i])))
            owner[c] = i
    for i in range(n):
        if taken[i] < 0 and use[i]:
            p = next(p for p, m in enumerate(members) if i in m)
            if p in owner and cost[i, p] < big:
                rival[i] = owner[p]
    return Assignment(taken, expected, deviation, gates, rival)


# --- tracking ---------------------------------------------------------------------------------
def _global_voxels(mask: Optional[Volume], followup: Volume) -> set:
    """Flat follow-up indices of a crop mask's voxels (empty for None)."""
    if mask is None:
        return set()
    first = np.rint(followup.lps_to_index(mask.origin)).astype(int)[::-1]
    zyx = np.argwhere(mask.array > 0.5) + first
    ok = np.all((zyx >= 0) & (zyx < followup.array.shape), axis=1)
    return set(np.ravel_multi_index(zyx[ok].T, followup.array.shape).tolist())


def _components(candidates: Volume) -> list[tuple[str, Volume]]:
    """(name, cropped 0/1 mask) of every connected component of every label of ``candidates``."""
    arr = np.asarray(candidates.array)
    out = []
    for v in (int(v) for v in np.unique(arr) if v != 0):
        comp, n = ndimage.label(arr == v, structure=np.ones((3, 3, 3)))
        for c in range(1, n + 1):
            mask = candidates.with_array((comp == c).astype(np.float32), name=f"label {v} region {c}")
            out.append((f"label {v} region {c}", crop(mask, *mask_box(mask, 1.0))))
    return out


def track_lesions(base_embedding: Embeddings, follow_embedding: Embeddings, baseline: Volume, followup: Volume,
                  lesions: Sequence[BaselineLesion], *, candidates: Optional[Volume] = None,
                  known_new: Sequence[tuple] = (), method: str = "refined",
                  options: Optional[MatchOptions] = None) -> TrackingResult:
    """Every baseline lesion on the follow-up, jointly and one-to-one, and the new findings.

    Args:
        base_embedding, follow_embedding: embeddings of the two scans.
        baseline, followup: the scans (intensities for the lesions' contrast and sizes).
        lesions: the baseline lesions (``lesions_from_points`` / ``lesions_from_label_map``).
        candidates: optional label map on the follow-up (the user's segmentation of findings);
            its connected components without a baseline partner are reported as ``new``.
        known_new: (tracking_id, tracking_uid, expected LPS position) of earlier new findings:
            a new region there keeps their identifier.
        method, options: the per-lesion match (``match_points``).
    Returns:
        TrackingResult. InputError for no lesions, repeated names or a lesion outside the baseline.
    """
    t0 = time.perf_counter()
    lesions = list(lesions)
    if not lesions:
        raise InputError("no lesion given")
    if len({lesion.tracking_uid for lesion in lesions}) != len(lesions):
        raise InputError("two lesions share one tracking UID")
    inside = baseline.contains_lps(np.array([lesion.centre for lesion in lesions]))
    if not np.all(inside):
        bad = lesions[int(np.flatnonzero(~inside)[0])]
        raise InputError(f"lesion {bad.name} lies outside the baseline image")
    matches, regions, base_masks = [], [], []
    for lesion in lesions:
        if lesion.mask is not None:
            prop = propagate_lesion(base_embedding, follow_embedding, followup, mask=lesion.mask, method=method,
                                    options=options)
            matches.append(prop.centre)
            regions.append(prop.region)
            base_masks.append(lesion.mask)
        elif lesion.radius_mm is not None:
            m = match_points(base_embedding, follow_embedding, lesion.centre[None], method=method, options=options)[0]
            matches.append(m)
            regions.append(sphere_mask(followup, m.query_point.to("LPS").as_array(), lesion.radius_mm))
            base_masks.append(sphere_mask(baseline, lesion.centre, lesion.radius_mm))
        else:
            matches.append(match_points(base_embedding, follow_embedding, lesion.centre[None], method=method,
                                        options=options)[0])
            regions.append(None)
            base_masks.append(None)
    src = np.array([lesion.centre for lesion in lesions])
    dst = np.array([m.query_point.to("LPS").as_array() for m in matches])
    in_fov = followup.contains_lps(dst, tolerance_voxels=0.0)
    plan = assign(src, dst, in_fov)
    t_match = time.perf_counter() - t0

    radii = [_lesion_radius(lesion) for lesion in lesions]
    tracked = []
    for i, lesion in enumerate(lesions):
        q = plan.expected[i]
        info = {"deviation_from_neighbours_mm": round(float(plan.deviation_mm[i]), 2),
                "gate_mm": round(float(plan.gate_mm[i]), 1), "match_confident": matches[i].confident,
                "match_reason": matches[i].reason}
        base_size = measure(lesion.mask) if lesion.mask is not None else None
        k = int(plan.taken[i])
        radius = radii[i]
        q_border = None if q is None else _border_distance_mm(followup, q)
        if not in_fov[i] or (k < 0 and q_border is not None and q_border < 0):
            where = dst[i] if not in_fov[i] else q
            tracked.append(TrackedLesion(lesion, "outside the follow-up",
                                         "its match lies outside the follow-up's field of view", tuple(where),
                                         matches[i], base_size, None, None, info))
            continue
        if k < 0:
            if plan.rival[i] >= 0:
                tracked.append(TrackedLesion(lesion, "ambiguous",
                                             f"competes with {lesions[plan.rival[i]].name} for one place "
                                             "(possible merge)", tuple(dst[i]), matches[i], base_size, None, None,
                                             dict(info, rival=lesions[plan.rival[i]].name)))
            else:
                tracked.append(TrackedLesion(lesion, "not found",
                                             f"its match lies {plan.deviation_mm[i]:.1f} mm from where its neighbours' "
                                             f"motion puts it (more than {plan.gate_mm[i]:.0f} mm)",
                                             None if q is None else tuple(q), matches[i], base_size, None, None, info))
            continue
        position, reason = dst[k], "matched"
        region = regions[i]
        if k != i:  # the match of another lesion is where this one belongs: a swap given back
            reason = f"matched at {lesions[k].name}'s match, where its neighbours put it (identity swap prevented)"
            region = None if regions[i] is None else _moved(regions[i], dst[k] - dst[i], followup)
            info["swapped_with"] = lesions[k].name
        if base_masks[i] is None:
            status = "found" if matches[i].confident else "not found"
            if not matches[i].confident:
                reason = f"no confident match ({matches[i].reason})"
            tracked.append(TrackedLesion(lesion, status, reason + " (position only: give a radius or a segment "
                                         "to check that the lesion is still there)", tuple(position), matches[i],
                                         None, None, None, info))
            continue
        if region is None or not np.any(region.array > 0.5):
            tracked.append(TrackedLesion(lesion, "outside the follow-up", "the lesion falls outside the follow-up's "
                                         "field of view", tuple(position), matches[i], base_size, None, None, info))
            continue
        seg = resegment(baseline, base_masks[i], followup, region)
        info["contrast_ratio"] = round(seg.contrast_ratio, 3)
        # a lesion beyond the field of view is matched onto its border: absent or unsure there means outside
        border_mm = _border_distance_mm(followup, position)
        info["fov_border_mm"] = round(border_mm, 1)
        at_border = border_mm < radius + 5.0
        if at_border and (not seg.present or (not matches[i].confident and q is not None
                                              and not followup.contains_lps(q, tolerance_voxels=0.0))):
            tracked.append(TrackedLesion(lesion, "outside the follow-up",
                                         f"matched {border_mm:.0f} mm from the border of the follow-up's field of view "
                                         "with no sure lesion there: probably beyond it", tuple(position), matches[i],
                                         base_size, None, None, info))
            continue
        if not seg.present:
            tracked.append(TrackedLesion(lesion, "not found", seg.reason, tuple(position), matches[i], base_size,
                                         None, None, info))
            continue
        if not matches[i].confident:
            reason += f"; the match is not confident ({matches[i].reason}) but the lesion's contrast is there"
        fsize = measure(seg.mask, seg.partial_volume_ml) if lesion.mask is not None else None
        tracked.append(TrackedLesion(lesion, "found", reason, tuple(position), matches[i], base_size, fsize,
                                     seg.mask, info))

    # a lesion not found is outside when the lesions found at their match (their contrast is there)
    # put it beyond the follow-up's image extent by more than its radius
    anchors = np.array([t.status == "found" for t in tracked])
    expected = list(plan.expected)
    for i, t in enumerate(tracked):
        if t.status not in ("not found", "outside the follow-up"):
            continue
        others = anchors & (np.arange(len(tracked)) != i)
        if others.any():
            expected[i] = neighbour_prediction(src[others], dst[others], src[i], sigma_mm=SIGMA_MM)
        if expected[i] is None:
            continue
        border = _border_distance_mm(followup, expected[i])
        info = dict(t.details, predicted_fov_border_mm=round(border, 1))
        if border < -radii[i]:
            tracked[i] = replace(t, status="outside the follow-up", position_lps=tuple(expected[i]), details=info,
                                 reason=f"the lesions found put it {-border:.0f} mm beyond the follow-up's field of "
                                        f"view (its radius is {radii[i]:.0f} mm)")

    # follow-up segments that join: a possible merge
    voxels = [_global_voxels(t.followup_mask, followup) for t in tracked]
    for a in range(len(tracked)):
        for b in range(a + 1, len(tracked)):
            if voxels[a] and voxels[b] and voxels[a] & voxels[b]:
                for x, y in ((a, b), (b, a)):
                    tracked[x] = replace(tracked[x], status="ambiguous",
                                         reason=f"its follow-up segment joins {tracked[y].lesion.name}'s "
                                                "(possible merge)", details=dict(tracked[x].details,
                                                                                 rival=tracked[y].lesion.name))
    # where a lesion without a follow-up segment is expected (its neighbours' motion), with the
    # room its own size and the prediction's error take: a candidate region there is that lesion
    claims = [(np.asarray(q), radii[i] + CLAIM_MM) for i, (q, t) in enumerate(zip(expected, tracked))
              if q is not None and t.followup_mask is None and t.status != "outside the follow-up"]
    new = _new_findings(candidates, followup, tracked, voxels, known_new, claims) if candidates is not None else []
    return TrackingResult(tuple(tracked), tuple(new), time.perf_counter() - t0,
                          {"match_seconds": round(t_match, 3), "method": method, "lesions": len(lesions)})


def _border_distance_mm(volume: Volume, lps) -> float:
    """Distance (mm) from ``lps`` to the nearest face of ``volume``'s field of view (along the index axes)."""
    ijk = volume.lps_to_index(np.asarray(lps, dtype=np.float64))
    size = np.asarray(volume.size_xyz, dtype=np.float64)
    return float(np.min(np.minimum(ijk + 0.5, size - 0.5 - ijk) * np.asarray(volume.spacing)))


def _lesion_radius(lesion: BaselineLesion) -> float:
    """The lesion's radius (mm): given, or of the sphere of its segment's volume; 0 for a bare point."""
    if lesion.radius_mm is not None:
        return float(lesion.radius_mm)
    if lesion.mask is None:
        return 0.0
    return float((3.0 * measure(lesion.mask).volume_ml * 1000.0 / (4.0 * np.pi)) ** (1.0 / 3.0))


def _moved(region: Volume, shift_lps: np.ndarray, followup: Volume) -> Optional[Volume]:
    """The region moved by whole follow-up voxels closest to ``shift_lps`` (stays on the lattice)."""
    steps = np.rint(followup.direction.T @ shift_lps / np.asarray(followup.spacing))
    origin = np.asarray(region.origin) + followup.direction @ (steps * np.asarray(followup.spacing))
    return Volume(region.array, region.spacing, tuple(origin), region.direction, region.modality, region.name)


def _new_findings(candidates: Volume, followup: Volume, tracked: list, voxels: list,
                  known_new: Sequence[tuple], claims: Sequence[tuple] = ()) -> list[NewFinding]:
    """Candidate regions that no tracked lesion accounts for: by overlap, by position, or by lying
    within a ``claims`` sphere ((centre, radius mm): where an unplaced lesion is expected)."""
    out = []
    for name, mask in _components(candidates):
        size = measure(mask)
        zyx = np.argwhere(mask.array > 0.5)
        centre = mask.index_to_lps(zyx[:, ::-1].mean(0))
        near = max(GATE_MM, 0.5 * size.longest_axial_mm)
        same_grid = (np.allclose(candidates.spacing, followup.spacing) and np.allclose(candidates.direction,
                                                                                       followup.direction))
        mine = _global_voxels(mask, followup) if same_grid else set()
        partner = None
        for t, vox in zip(tracked, voxels):
            if (mine and vox and mine & vox) or (t.position_lps is not None
                                                 and np.linalg.norm(np.asarray(t.position_lps) - centre) < near):
                partner = t
                break
        if partner is not None or any(np.linalg.norm(c - centre) <= r for c, r in claims):
            continue
        tid, uid = f"new {len(known_new) + len(out) + 1}", new_tracking_uid()
        why = "a candidate region with no baseline lesion"
        for known_id, known_uid, expected in known_new:
            if np.linalg.norm(np.asarray(expected) - centre) < near:
                tid, uid, why = known_id, known_uid, "the new finding of an earlier follow-up"
                break
        out.append(NewFinding(name, tuple(centre), size, tid, uid, why, mask))
    return out


def track_timepoints(base_embedding: Embeddings, baseline: Volume, followups: Sequence[tuple],
                     lesions: Sequence[BaselineLesion], *, method: str = "refined",
                     options: Optional[MatchOptions] = None) -> list[TrackingResult]:
    """Baseline -> follow-up 1 -> follow-up 2 ...: every lesion keeps its tracking identifier.

    Each follow-up is read against the baseline (the lesions' reference); a new finding of
    one follow-up keeps its identifier on the next when a new region lies where its match
    puts it.

    Args:
        followups: (embedding, volume, candidates or None) per follow-up, in time order.
    Returns:
        One TrackingResult per follow-up.
    """
    results, known, prev = [], [], None
    for emb, vol, cand in followups:
        if prev is not None and results[-1].new_findings:
            found = results[-1].new_findings
            moved = match_points(prev, emb, np.array([f.position_lps for f in found]), method=method, options=options)
            known = [(f.tracking_id, f.tracking_uid, m.query_point.to("LPS").as_array()) for f, m in zip(found, moved)]
        results.append(track_lesions(base_embedding, emb, baseline, vol, lesions, candidates=cand,
                                     known_new=known, method=method, options=options))
        prev = emb
    return results
