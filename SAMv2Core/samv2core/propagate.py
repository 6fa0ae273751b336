"""Lesion propagation: carry a lesion drawn on a baseline scan onto its follow-up.

A lesion is given either as a point + radius (the region on the follow-up is a ball of that
radius around the matched centre) or as a 0/1 mask on the baseline lattice (its centroid and
points halfway to its extremes along the principal axes are matched, a local map pinned at the
matched centroid is fitted by ``fitting.anchored_affine``, and the mask is resampled through it).
The region always lies on the follow-up's own voxel lattice (a crop of it). All coordinates are
LPS millimetres; arrays are (z, y, x) as in ``Volume``.

Used by the Slicer module, ``samv2 propagate``, ``samv2 batch`` and the browser view (``samv2view``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk

from .affine import sitk_affine
from .embed import Embeddings, inside_source
from .errors import InputError
from .fitting import anchored_affine
from .matching import MatchOptions, MatchResult, match_points
from .volume import Volume

MODELS = ("sphere", "affine", "translation")


@dataclass(frozen=True, eq=False)
class LesionPropagation:
    """A lesion carried onto the follow-up.

    ``centre``: the matched lesion centre (``centre.query_point`` on the follow-up, LPS mm).
    ``region``: 0/1 Volume on a crop of the follow-up lattice, or None when it falls outside.
    ``model``: 'sphere' (point + radius), 'affine' or 'translation' (the local map of a mask).
    ``baseline_volume_ml``: the lesion's volume on the baseline (a ball's exact volume for
    point + radius, the mask's voxels otherwise). ``details``: JSON-ready facts of the fit.
    """

    centre: MatchResult
    region: Optional[Volume]
    model: str
    baseline_volume_ml: float
    details: dict = field(default_factory=dict)

    @property
    def confident(self) -> bool:
        """Whether the centre's match is confident (the region follows the centre)."""
        return bool(self.centre.confident)

    @property
    def followup_volume_ml(self) -> float:
        """Volume of the propagated region in mL (0 when it fell outside the follow-up)."""
        return 0.0 if self.region is None else mask_volume_ml(self.region)

    def label_map(self, followup: Volume, value: int = 1) -> Volume:
        """The region on the whole follow-up grid: ``value`` inside, 0 elsewhere.

        Args:
            followup: the follow-up volume the propagation was computed for.
            value: label value of the lesion (1..255).
        Returns:
            Volume with the follow-up's geometry, (z, y, x) array of 0 / ``value``.
        """
        out = np.zeros(followup.array.shape, np.float32)
        if self.region is not None:
            first = np.rint(followup.lps_to_index(self.region.origin)).astype(int)
            if not np.allclose(followup.lps_to_index(self.region.origin), first, atol=1e-3):
                raise ValueError("the region does not lie on this follow-up's lattice")
            i, j, k = first
            z, y, x = self.region.array.shape
            out[k:k + z, j:j + y, i:i + x][self.region.array > 0.5] = value
        return followup.with_array(out, name="lesion")

    def to_dict(self, system: str = "LPS") -> dict:
        """JSON-ready summary: matched centre (in ``system``), confidence, model, volumes."""
        return {"centre": self.centre.to_dict(system), "confident": self.confident, "model": self.model,
                "baseline_volume_ml": round(self.baseline_volume_ml, 4),
                "followup_volume_ml": round(self.followup_volume_ml, 4), "details": self.details}


def propagate_lesion(base_embedding: Embeddings, follow_embedding: Embeddings, followup: Volume, *,
                     centre_lps=None, radius_mm: Optional[float] = None, mask: Optional[Volume] = None,
                     samples_lps=None, method: str = "refined",
                     options: Optional[MatchOptions] = None) -> LesionPropagation:
    """Carry a lesion from the baseline onto the follow-up.

    Give either ``centre_lps`` and ``radius_mm`` (a ball) or ``mask`` (a segment).

    Args:
        base_embedding, follow_embedding: embeddings of the baseline and follow-up scans.
        followup: the follow-up scan; the region is built on its voxel lattice.
        centre_lps: (3,) lesion centre on the baseline, LPS mm (with ``radius_mm``).
        radius_mm: radius of the ball on the follow-up, mm (> 0).
        mask: 0/1 lesion mask on a baseline-aligned grid (values > 0.5 are inside).
        samples_lps: (N, 3) LPS mm points describing the mask, centre first; default
            ``segment_samples(mask)`` (samples outside the baseline scan are dropped).
        method: matching method of ``match_points`` ('refined', 'fixed_point', 'nn').
        options: matching options (confidence threshold).
    Returns:
        LesionPropagation. Raises InputError for an unusable lesion (both or neither form,
        a radius not > 0, an empty mask, a centre outside the baseline scan).
    """
    if (mask is None) == (centre_lps is None):
        raise InputError("give the lesion either as a point with a radius or as a mask, not both or neither")
    if mask is None:
        if radius_mm is None or not (np.isfinite(radius_mm) and radius_mm > 0):
            raise InputError(f"the lesion radius must be a positive number of mm, got {radius_mm}")
        samples = np.asarray(centre_lps, dtype=np.float64).reshape(-1, 3)[:1]
        baseline_ml = 4.0 / 3.0 * np.pi * float(radius_mm) ** 3 / 1000.0
    else:
        baseline_ml = mask_volume_ml(mask)
        if baseline_ml <= 0:
            raise InputError(f"the lesion mask {mask.name or ''} is empty (no voxel above 0.5)".replace("  ", " "))
        samples = segment_samples(mask)[0] if samples_lps is None else np.asarray(samples_lps, np.float64).reshape(-1, 3)
        keep = inside_source(base_embedding, samples)
        keep[0] = True  # the centre is never dropped: outside the baseline it is refused by matching
        samples = samples[keep]
    results = match_points(base_embedding, follow_embedding, samples, method=method, options=options)
    centre = results[0]
    centre_follow = centre.query_point.to("LPS").as_array()
    if mask is None:
        region = sphere_mask(followup, centre_follow, float(radius_mm))
        return LesionPropagation(centre, region, "sphere", baseline_ml, {"radius_mm": float(radius_mm)})
    dst = np.array([r.query_point.to("LPS").as_array() for r in results])
    fit = anchored_affine(samples, dst, [r.confident for r in results], anchor=0)
    region = warp_mask(mask, sitk_affine(fit.homogeneous()), followup)
    details = {"points": fit.n_inliers, "samples": len(samples),
               "translation_mm": [round(float(v), 2) for v in centre_follow - samples[0]],
               "matrix": fit.matrix.round(6).tolist()}
    return LesionPropagation(centre, region, fit.mode, baseline_ml, details)


def mask_volume_ml(mask: Volume) -> float:
    """Volume of the voxels above 0.5 in mL (spacing in mm)."""
    return float(np.count_nonzero(mask.array > 0.5) * np.prod(mask.spacing) / 1000.0)


def segment_samples(mask: Volume, max_points: int = 13) -> tuple[np.ndarray, tuple]:
    """Points that describe a segment: its centroid, then points halfway to its extremes along the principal axes.

    Args:
        mask: 0/1 Volume (values > 0.5 are inside), not empty.
        max_points: at most this many points.
    Returns:
        ((N, 3) LPS mm, N labels), centroid first.
    """
    zyx = np.argwhere(mask.array > 0.5)
    if len(zyx) == 0:
        raise InputError(f"the lesion mask {mask.name or ''} is empty (no voxel above 0.5)".replace("  ", " "))
    lps = mask.index_to_lps(zyx[:, ::-1].astype(np.float64))
    centroid = lps.mean(0)
    pts, labels = [centroid], ["centroid"]
    if len(lps) >= 8:
        centred = lps - centroid
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        for a, axis in enumerate(vt):
            proj = centred @ axis
            for sign, idx in (("-", int(np.argmin(proj))), ("+", int(np.argmax(proj)))):
                # halfway to the extreme: inside the lesion but spread out
                pts.append(centroid + 0.5 * (lps[idx] - centroid))
                labels.append(f"axis{a}{sign}")
    return np.asarray(pts[:max_points]), tuple(labels[:max_points])


def sphere_mask(reference: Volume, centre_lps, radius_mm: float) -> Optional[Volume]:
    """A 0/1 ball on a crop of the reference lattice.

    Args:
        reference: the volume whose lattice the ball is drawn on.
        centre_lps: (3,) ball centre, LPS mm.
        radius_mm: ball radius, mm.
    Returns:
        0/1 Volume on a crop of ``reference``'s lattice, or None when the ball lies outside it.
    """
    centre_lps = np.asarray(centre_lps, dtype=np.float64)
    box = centre_lps + np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * radius_mm
    sub = _subgrid(reference, box, margin_voxels=1)
    if sub is None:
        return None
    first, size = sub
    k, j, i = np.meshgrid(*(np.arange(s) for s in size[::-1]), indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3) + first
    d = np.linalg.norm(reference.index_to_lps(ijk) - centre_lps, axis=1).reshape(size[::-1])
    return Volume((d <= radius_mm).astype(np.float32), reference.spacing, tuple(reference.index_to_lps(first)),
                  reference.direction, "CT", "sphere")


def warp_mask(mask: Volume, baseline_to_followup: sitk.Transform, followup: Volume) -> Optional[Volume]:
    """Carry a 0/1 mask onto the follow-up lattice through a transform.

    Args:
        mask: 0/1 Volume on the baseline side.
        baseline_to_followup: maps baseline LPS points to follow-up LPS points (invertible).
        followup: the volume whose lattice the result lies on.
    Returns:
        0/1 Volume on a crop of ``followup``'s lattice around the mapped mask, or None when it
        falls outside the follow-up.
    """
    mapped = np.array([baseline_to_followup.TransformPoint(tuple(c)) for c in mask.corners_lps()])
    sub = _subgrid(followup, mapped, margin_voxels=2)
    if sub is None:
        return None
    first, size = sub
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(followup.spacing)
    ref.SetOrigin(tuple(followup.index_to_lps(first)))
    ref.SetDirection(tuple(followup.direction.ravel()))
    # resampling pulls values: each follow-up voxel looks up the baseline mask through the inverse
    out = sitk.Resample(mask.to_sitk(), ref, baseline_to_followup.GetInverse(), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)
    return Volume.from_sitk(out, "CT", name="propagated").with_array(
        (sitk.GetArrayFromImage(out) >= 0.5).astype(np.float32))


def _subgrid(reference: Volume, points_lps, margin_voxels: int = 1) -> Optional[tuple]:
    """(first index (i, j, k), size (x, y, z)) of the reference-lattice box around LPS points,
    clipped to the reference; None when the box misses it."""
    ijk = reference.lps_to_index(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3))
    lo = np.maximum(np.floor(ijk.min(0)).astype(int) - margin_voxels, 0)
    hi = np.minimum(np.ceil(ijk.max(0)).astype(int) + margin_voxels, np.asarray(reference.size_xyz) - 1)
    if np.any(hi < lo):
        return None
    return lo, tuple(int(v) for v in hi - lo + 1)
