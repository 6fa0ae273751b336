"""The computing steps of the module (no MRML, no Qt, no Slicer): match points, propagate a
lesion, register, embed ahead of use. Each takes the core ``EmbeddingSession`` (model and
embeddings cache) and a progress callback.

The module logic runs them in-process (scripts, tests); the worker process (``server``) runs
the same functions for the Slicer GUI.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import SimpleITK as sitk

from samv2core.fitting import fit_affine
from samv2core.matching import match_points, prepare_pair
from samv2core.registration import register as core_register
from samv2core.session import EmbeddingSession
from samv2core.volume import Volume

from .cancellation import ProgressCallback, no_progress, sub_progress


def embed_volumes(session: EmbeddingSession, volumes, progress: ProgressCallback = no_progress) -> list[str]:
    """Embed volumes ahead of use (the background 'embed' request); returns their names.

    For a baseline / follow-up pair this also runs the refined match's per-pair precompute
    (kept with the two embeddings), so that it happens while the user places points and the
    first click only matches."""
    steps_total = len(volumes) + (1 if len(volumes) == 2 else 0)
    embs = [session.embed(vol, sub_progress(progress, i / steps_total, (i + 1) / steps_total))
            for i, vol in enumerate(volumes)]
    if len(embs) == 2:
        progress(2 / steps_total, "preparing the pair for matching")
        prepare_pair(*embs)
    progress(1.0, "embedded")
    return [v.name for v in volumes]


def match(session: EmbeddingSession, base: Volume, follow: Volume, points_lps, method: str,
          progress: ProgressCallback = no_progress) -> list:
    """Match template points (LPS, in the baseline's voxel space) onto the follow-up."""
    points_lps = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    e_base = session.embed(base, sub_progress(progress, 0.0, 0.45))
    e_follow = session.embed(follow, sub_progress(progress, 0.45, 0.9))
    progress(0.9, f"matching {len(points_lps)} point(s)")
    results = match_points(e_base, e_follow, points_lps, method=method)
    progress(1.0, "matched")
    return results


def propagate(session: EmbeddingSession, base: Volume, follow: Volume, samples_lps, method: str,
              radius_mm: Optional[float], mask: Optional[Volume], progress: ProgressCallback = no_progress):
    """Match the lesion samples (centre first) and build its region on the follow-up lattice:
    a ball of ``radius_mm`` around the matched centre, or ``mask`` carried by a local fit.
    Returns (centre MatchResult, region Volume or None, details)."""
    samples_lps = np.asarray(samples_lps, dtype=np.float64).reshape(-1, 3)
    e_base = session.embed(base, sub_progress(progress, 0.0, 0.45))
    e_follow = session.embed(follow, sub_progress(progress, 0.45, 0.85))
    progress(0.85, "matching the lesion")
    results = match_points(e_base, e_follow, samples_lps, method=method)
    centre = results[0]
    if mask is None:
        region = sphere_mask(follow, centre.query_point.to("LPS").as_array(), float(radius_mm))
        details = {"radius_mm": float(radius_mm), "model": "sphere"}
    else:
        fit, details = local_affine(samples_lps, results)
        region = warp_mask(mask, fit, follow)
    progress(1.0, "lesion propagated")
    return centre, region, details


def register(session: EmbeddingSession, fixed: Volume, moving: Volume, mode: str, deformable: bool, options,
             progress: ProgressCallback = no_progress):
    """Register moving onto fixed with the session's model (a samv2core RegistrationResult)."""
    return core_register(fixed, moving, mode=mode, deformable=deformable, embedder=session,
                         options=options, progress=progress)


def sphere_mask(reference: Volume, centre_lps, radius_mm: float) -> Optional[Volume]:
    """A 0/1 ball of ``radius_mm`` around ``centre_lps`` on a crop of the reference grid (None if outside)."""
    centre_lps = np.asarray(centre_lps, dtype=np.float64)
    box = centre_lps + np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * radius_mm
    grid = _subgrid(reference, box, margin_voxels=1)
    if grid is None:
        return None
    origin_index, size = grid
    k, j, i = np.meshgrid(*(np.arange(s) for s in size[::-1]), indexing="ij")
    ijk = np.stack([i, j, k], -1).reshape(-1, 3) + origin_index
    d = np.linalg.norm(reference.index_to_lps(ijk) - centre_lps, axis=1).reshape(size[::-1])
    origin = reference.index_to_lps(origin_index)
    return Volume((d <= radius_mm).astype(np.float32), reference.spacing, tuple(origin), reference.direction,
                  "CT", "sphere")


def _subgrid(reference: Volume, points_lps, margin_voxels: int = 1):
    """(first index (i, j, k), size (x, y, z)) of the reference-lattice box around points, clipped."""
    ijk = reference.lps_to_index(np.asarray(points_lps, dtype=np.float64).reshape(-1, 3))
    lo = np.floor(ijk.min(0)).astype(int) - margin_voxels
    hi = np.ceil(ijk.max(0)).astype(int) + margin_voxels
    size_xyz = np.asarray(reference.size_xyz)
    lo = np.maximum(lo, 0)
    hi = np.minimum(hi, size_xyz - 1)
    if np.any(hi < lo):
        return None
    return lo, tuple(int(v) for v in hi - lo + 1)


def segment_samples(mask: Volume, max_points: int = 13):
    """Points that describe a segment: centroid first, then extreme points along the principal axes."""
    zyx = np.argwhere(mask.array > 0.5)
    ijk = zyx[:, ::-1].astype(np.float64)
    lps = mask.index_to_lps(ijk)
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


def local_affine(samples_lps: np.ndarray, results) -> tuple[sitk.AffineTransform, dict]:
    """Baseline->follow-up affine from the sample matches (translation-only fallback)."""
    src = np.asarray(samples_lps, dtype=np.float64)
    dst = np.array([r.query_point.to("LPS").as_array() for r in results])
    ok = np.array([r.confident for r in results])
    ok[0] = True  # the centre always counts: it is the lesion position reported to the user
    t = dst[0] - src[0]
    a = np.eye(3)
    model = "translation"
    if ok.sum() >= 5:
        lin, _ = fit_affine(src[ok], dst[ok])
        sv = np.linalg.svd(lin, compute_uv=False)
        if np.linalg.det(lin) > 0 and sv.min() > 0.7 and sv.max() < 1.4:
            a = lin
            t = dst[0] - a @ src[0]  # keep the matched centre exact
            model = "affine"
    fit = sitk.AffineTransform(3)
    fit.SetMatrix(tuple(a.ravel()))
    fit.SetTranslation(tuple(t))
    return fit, {"model": model, "points": int(ok.sum()), "translation_mm": [round(float(v), 2) for v in t]}


def warp_mask(mask: Volume, baseline_to_followup: sitk.Transform, follow: Volume) -> Optional[Volume]:
    """Carry a 0/1 mask into the follow-up lattice (cropped to the mapped mask) through the fit."""
    corners = mask.corners_lps()
    mapped = np.array([baseline_to_followup.TransformPoint(tuple(c)) for c in corners])
    grid = _subgrid(follow, mapped, margin_voxels=2)
    if grid is None:
        return None
    origin_index, size = grid
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing(follow.spacing)
    ref.SetOrigin(tuple(follow.index_to_lps(origin_index)))
    ref.SetDirection(tuple(follow.direction.ravel()))
    # resampling pulls values: each follow-up voxel looks up the baseline mask through the inverse
    out = sitk.Resample(mask.to_sitk(), ref, baseline_to_followup.GetInverse(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, "CT", name="propagated").with_array(
        (sitk.GetArrayFromImage(out) >= 0.5).astype(np.float32))
