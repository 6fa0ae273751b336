"""Verification of a linear registration result by image evidence the matches did not produce.

Why: a robust fit to embedding matches can be confidently wrong (a consistent subset of wrong
matches, e.g. across modalities with a model not trained for them). Before a result is called
a success it must also be the best explanation of the IMAGES:

* local optimum: the image similarity at the result beats the similarity at 12 perturbations
  of it (+-``shift_mm`` along x, y, z; +-``angle_deg`` about the three axes through the body);
* distinct: it beats every one of ``alternatives`` seeded random placements 12-40 mm and 4-15
  deg away (a wrong fit sits in a shallow local optimum that some nearby placement of the same
  anatomy beats; a correct one stands out from all of them);
* scanner coordinates: it beats the identity map when that overlaps, and any other candidate
  fit (the other descriptors' result) is compared on the same points (``choose``);
* the intensity refinement agrees with the fit: a refinement that wants to move body points
  further than its limit is evidence against the fit, not only against the refinement: the fit
  is refused, and the refinement's end point counts only if it settled there and passes every
  check above as a result in its own right.

Inverse consistency (the inverse map refined from the moving side stays within the limit) needs
the refinement's image views and lives with the candidates in candidate.py
(``inverse_consistency``); which checks run, in which order, is the policy's (policy.py).

Similarity: MIND-SSC (negative mean squared descriptor difference; Heinrich et al. 2013) across
modalities, local NCC on 3x3x3 patches within one, both on 4 mm grids (pooled from the 2 mm
model grid), at fixed-body points whose mapped position lies inside the moving image.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from scipy.spatial.transform import Rotation

from ..affine import random_rigid
from ..volume import Volume
from ..intensity import local_ncc
from .grid import Grid, sample
from .mind import mind_ssc
from .views import intensity_tensor

TERMS = ("lncc", "mind")


@dataclass
class VerifyOptions:
    """Settings of the verification of a linear result."""

    spacing_mm: float = 4.0  # similarity grid (the model grid pooled 2x)
    max_points: int = 6000  # fixed-body sample points (a seeded random subset beyond this)
    shift_mm: float = 6.0  # perturbations the result must beat
    angle_deg: float = 5.0
    min_points: int = 100  # fewer overlapping sample points: nothing to verify with
    identity_overlap: float = 0.3  # compare with scanner coordinates when this fraction of points overlaps there
    alternatives: int = 24  # random placements further away the result must beat (0: skip)
    alternative_shift_mm: tuple = (12.0, 40.0)
    alternative_angle_deg: tuple = (4.0, 15.0)
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class Verification:
    """The verdict on one linear result; ``reason`` is a one-line explanation when it failed."""

    passed: bool
    reason: str
    term: str
    similarity: Optional[float] = None  # at the result (higher is better)
    best_perturbed: Optional[float] = None
    identity: Optional[float] = None
    points: int = 0
    details: dict = field(default_factory=dict)

    def report(self) -> dict:
        r = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in
             (("passed", self.passed), ("term", self.term), ("similarity", self.similarity),
              ("best_perturbed_similarity", self.best_perturbed), ("identity_similarity", self.identity),
              ("points", self.points))}
        if self.reason:
            r["reason"] = self.reason
        r.update(self.details)
        return r


def _pooled(model_volume: Volume, spacing_mm: float) -> tuple[torch.Tensor, Grid]:
    """(1, 1, z, y, x) intensities in [0, 1] on an identity-direction grid pooled to ``spacing_mm``."""
    img = intensity_tensor(model_volume, model_volume.modality.value)
    k = max(1, int(round(spacing_mm / max(model_volume.spacing))))
    sp = np.asarray(model_volume.spacing, float)
    origin = np.asarray(model_volume.origin, float)
    if k > 1 and min(img.shape[2:]) >= k:
        img = F.avg_pool3d(img, k, stride=k, ceil_mode=True)
        origin = origin + sp * (k - 1) / 2
        sp = sp * k
    return img.contiguous(), Grid(tuple(origin), tuple(sp), tuple(int(s) for s in img.shape[2:]))


def perturbations(centre: np.ndarray, shift_mm: float, angle_deg: float) -> list[np.ndarray]:
    """12 rigid 4x4 maps of fixed space: +-shift along x, y, z and +-angle about x, y, z through ``centre``."""
    out = []
    for axis in range(3):
        for sign in (-1.0, 1.0):
            m = np.eye(4)
            m[axis, 3] = sign * shift_mm
            out.append(m)
            r = Rotation.from_rotvec(np.deg2rad(sign * angle_deg) * np.eye(3)[axis]).as_matrix()
            m = np.eye(4)
            m[:3, :3] = r
            m[:3, 3] = centre - r @ centre
            out.append(m)
    return out


class SimilarityProbe:
    """Image similarity of any fixed->moving 4x4 map at fixed-body sample points (one set of
    points for every map, so their similarities compare)."""

    def __init__(self, fixed_model: Volume, fixed_mask: np.ndarray, moving_model: Volume, term: str,
                 options: Optional[VerifyOptions] = None):
        if term not in TERMS:
            raise ValueError(f"verification term must be one of {TERMS}, got {term!r}")
        self.opt = opt = options or VerifyOptions()
        self.term = term
        f_img, self.f_grid = _pooled(fixed_model, opt.spacing_mm)
        m_img, self.m_grid = _pooled(moving_model, opt.spacing_mm)
        # sample points: fixed-body voxels of the 2 mm model grid, thinned to the similarity grid
        step = max(1, int(round(opt.spacing_mm / max(fixed_model.spacing))))
        kji = np.argwhere(fixed_mask[::step, ::step, ::step]) * step
        if len(kji) > opt.max_points:
            kji = kji[np.sort(np.random.default_rng(opt.seed).choice(len(kji), opt.max_points, replace=False))]
        self.points = fixed_model.index_to_lps(kji[:, ::-1].astype(float))
        self.centre = self.points.mean(0) if len(self.points) else np.zeros(3)
        pts = torch.as_tensor(self.points, dtype=torch.float32)
        self.m_lo = np.asarray(self.m_grid.origin)
        self.m_hi = self.m_grid.upper
        if term == "mind":
            self.f_map, self.m_map = mind_ssc(f_img, 1, 1), mind_ssc(m_img, 1, 1)
            self.f_desc = sample(self.f_map, self.f_grid, pts[None])[0].T  # (N, 12)
        else:
            h = np.arange(-1, 2) * opt.spacing_mm
            self.patch = np.stack(np.meshgrid(h, h, h, indexing="ij"), -1).reshape(-1, 3)
            self.f_img, self.m_img = f_img, m_img
            fp = torch.as_tensor((self.points[:, None, :] + self.patch[None]).reshape(-1, 3), dtype=torch.float32)
            self.f_patch = sample(f_img, self.f_grid, fp[None]).reshape(len(self.points), -1)
            # flat fixed patches (air) carry no evidence
            f = self.f_patch - self.f_patch.mean(1, keepdim=True)
            self.textured = ((f * f).sum(1) > 1e-4).numpy()

    def scores(self, matrix4: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-point similarity (N,) (higher is better) and validity (N,) of one fixed->moving map."""
        m = np.asarray(matrix4, float)
        with torch.no_grad():
            if self.term == "mind":
                mapped = self.points @ m[:3, :3].T + m[:3, 3]
                md = sample(self.m_map, self.m_grid, torch.as_tensor(mapped, dtype=torch.float32)[None])[0].T
                sim = -((self.f_desc - md) ** 2).mean(1).numpy()
                valid = np.all((mapped >= self.m_lo) & (mapped <= self.m_hi), axis=1)
                return sim.astype(np.float64), valid
            # mapped patch centres plus the mapped patch offsets (a (N*27, 3) matmul is slow in numpy)
            pts = ((self.points @ m[:3, :3].T + m[:3, 3])[:, None, :] + (self.patch @ m[:3, :3].T)[None]).reshape(-1, 3)
            mp = sample(self.m_img, self.m_grid, torch.as_tensor(pts, dtype=torch.float32)[None])
            mp = mp.reshape(len(self.points), -1)
            ncc = local_ncc(self.f_patch, mp)
            inside = np.all((pts >= self.m_lo) & (pts <= self.m_hi), axis=1).reshape(len(self.points), -1).all(1)
            return ncc.numpy().astype(np.float64), inside & self.textured

    def compare(self, a: np.ndarray, b: np.ndarray) -> tuple[float, float, int]:
        """Mean similarity of maps ``a`` and ``b`` over the points valid for both, and that count."""
        sa, va = self.scores(a)
        sb, vb = self.scores(b)
        both = va & vb
        if not both.any():
            return float("nan"), float("nan"), 0
        return float(sa[both].mean()), float(sb[both].mean()), int(both.sum())


def _max_move(points: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """Largest distance between where maps ``a`` and ``b`` send ``points``."""
    if not len(points):
        return 0.0
    return float(np.linalg.norm(points @ (a[:3, :3] - b[:3, :3]).T + (a[:3, 3] - b[:3, 3]), axis=1).max())


def verify_linear(probe: SimilarityProbe, matrix4: np.ndarray, refine_stats: Optional[dict] = None) -> Verification:
    """Verify a fixed->moving 4x4 map (the linear result after refinement) against the images.

    ``refine_stats``: the refinement's statistics. When it moved further than its limit without
    settling, the map fails at once (no image optimum near the fit); when it settled beyond the
    limit, ``matrix4`` must be its end point (the fit it disagreed with is refused) and is verified
    like any result."""
    m = np.asarray(matrix4, float)
    opt, term = probe.opt, probe.term
    details: dict = {"options": opt.to_dict()}
    if (refine_stats is not None and not refine_stats.get("accepted", True)
            and "would move" in refine_stats.get("reason", "") and not refine_stats.get("converged", False)):
        return Verification(False, f"the intensity refinement disagrees with the fit ({refine_stats['reason']}) and "
                                   f"found no optimum near it in {len(refine_stats.get('rounds', [1]))} rounds: the fit "
                                   "is not where the images agree", term, details=details)
    s0, v0 = probe.scores(m)
    valid = v0.copy()
    perturbed = []
    for p in perturbations(probe.centre, opt.shift_mm, opt.angle_deg):
        s, v = probe.scores(m @ p)
        perturbed.append(s)
        valid &= v
    n = int(valid.sum())
    if n < opt.min_points:
        return Verification(False, f"only {n} fixed-body sample points overlap the moving image at the result "
                                   f"(at least {opt.min_points}): nothing to verify it with", term, points=n,
                            details=details)
    sim = float(s0[valid].mean())
    per = [float(s[valid].mean()) for s in perturbed]
    best = max(per)
    details["perturbed_similarities"] = [round(v, 5) for v in per]
    out = Verification(True, "", term, sim, best, None, n, details)
    if sim <= best:
        k = int(np.argmax(per))
        what = (f"{'-+'[k % 4 // 2]}{opt.shift_mm:g} mm along {'xyz'[k // 4]}" if k % 2 == 0
                else f"{'-+'[k % 4 // 2]}{opt.angle_deg:g} deg about {'xyz'[k // 4]}")
        out.passed = False
        out.reason = (f"the images agree better {what} of the result ({term} {best:.4f} vs {sim:.4f}): "
                      "it is not at an image-similarity optimum")
        return out
    beaten, compared, margin = beaten_by_alternative(probe, m)
    details["alternatives_compared"] = compared
    if margin is not None:
        details["alternatives_min_margin"] = round(margin, 5)
    if beaten is not None:
        out.passed = False
        out.reason = beaten
        return out
    sid, vid = probe.scores(np.eye(4))
    if vid.mean() >= opt.identity_overlap and _max_move(probe.points, m, np.eye(4)) > 2 * opt.shift_mm:
        a, b, nb = probe.compare(m, np.eye(4))
        out.identity = b
        details["identity_points"] = nb
        if nb >= opt.min_points and b >= a:
            out.passed = False
            out.reason = (f"the images agree better in scanner coordinates than at the result ({term} {b:.4f} vs "
                          f"{a:.4f})")
    return out


def beaten_by_alternative(probe: SimilarityProbe, m: np.ndarray) -> tuple[Optional[str], int, Optional[float]]:
    """(reason, alternatives compared, smallest margin): reason is None when the result beats
    every alternative placement (each compared on the points valid for both), else one line
    naming the alternative that beat it by most."""
    opt = probe.opt
    worst, compared, margin = None, 0, None
    s0, v0 = probe.scores(m)
    rng = np.random.default_rng(opt.seed)
    for _ in range(opt.alternatives):
        q = random_rigid(rng, probe.centre, opt.alternative_angle_deg, opt.alternative_shift_mm)
        alt = m @ q
        s, v = probe.scores(alt)
        both = v0 & v
        n = int(both.sum())
        if n < opt.min_points:  # the alternative leaves the moving image: nothing to compare
            continue
        a, b = float(s0[both].mean()), float(s[both].mean())
        compared += 1
        margin = a - b if margin is None else min(margin, a - b)
        if b >= a and (worst is None or b - a > worst[0]):
            worst = (b - a, alt, a, b)
    if worst is None:
        return None, compared, margin
    _, alt, a, b = worst
    moved = _max_move(probe.points, m, alt)
    return (f"the images agree better at another placement up to {moved:.0f} mm away ({probe.term} {b:.4f} vs "
            f"{a:.4f}): the result is not a distinct similarity optimum"), compared, margin


def choose(probe: SimilarityProbe, candidates: list) -> tuple[int, dict]:
    """Index of the best of several verified candidate maps (``(name, matrix4)``) by the similarity
    on the points valid for all of them, and the comparison for the report."""
    valid = np.ones(len(probe.points), bool)
    sims = []
    for _, m in candidates:
        s, v = probe.scores(m)
        sims.append(s)
        valid &= v
    if valid.sum() >= probe.opt.min_points:
        means = [float(s[valid].mean()) for s in sims]
    else:  # little common overlap: each over its own valid points
        means = [float(s[probe.scores(m)[1]].mean()) for s, (_, m) in zip(sims, candidates)]
    best = int(np.argmax(means))
    apart = max((_max_move(probe.points, candidates[best][1], m) for _, m in candidates), default=0.0)
    return best, {"similarity": {name: round(v, 5) for (name, _), v in zip(candidates, means)},
                  "common_points": int(valid.sum()), "max_disagreement_mm": round(apart, 2)}
