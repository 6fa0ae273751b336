"""One candidate linear result: a descriptor set's fit, refined and verified with one term,
and the inverse-consistency check of a result (the policy, policy.py, decides which candidates
run, in which order, and which is kept).

All maps are 4x4 fixed LPS -> moving LPS (mm).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Optional

import numpy as np

from ..errors import RegistrationError
from ..progress import Progress
from .fov import overlap_crop
from .linear_intensity_refine import refine_linear
from .options import RegistrationOptions
from .preflight import CheckedPair
from .stages import EmbeddedPair, LinearStage, RefineStage, match_and_fit, refine_stage
from .verify import SimilarityProbe, Verification, verify_linear
from .views import crop_view, valid_box

LABEL = {"sam": "SAM embeddings", "mind-ssc": "MIND-SSC descriptors"}  # descriptor sets by name, for reasons


@dataclass(eq=False)
class Candidate:
    """One descriptor set's linear result on its way to verification."""

    features: str  # 'sam' | 'mind-ssc'
    fit_refused: str = ""  # set when the refinement's end point replaced a fit it disagreed with
    linear: Optional[LinearStage] = None
    refined: Optional[RefineStage] = None
    verification: Optional[Verification] = None
    error: str = ""  # why it produced no result or failed verification (one line)

    @property
    def passed(self) -> bool:
        """True when it was verified and passed."""
        return self.verification is not None and self.verification.passed

    def report(self) -> dict:
        """The registration report's entry for this candidate: verdict, reason, inlier count and
        spread (mm), and the verification's numbers."""
        r: dict = {"passed": self.passed}
        if self.error:
            r["reason"] = self.error
        if self.fit_refused:
            r["fit_refused"] = self.fit_refused
        if self.linear is not None:
            fit = self.linear.fit
            r["inliers"] = fit.n_inliers
            r["matches"] = int(fit.inliers.size)
            pts = self.linear.pairs.fixed[fit.inliers]
            if len(pts) >= 3:  # how far the inliers spread (std along their principal axes, mm)
                r["inlier_spread_mm"] = (np.linalg.svd(pts - pts.mean(0), compute_uv=False)
                                         / np.sqrt(len(pts))).round(1).tolist()
        if self.verification is not None:
            r.update(self.verification.report())
        return r


def candidate(checked: CheckedPair, embedded: EmbeddedPair, mode: str, opts: RegistrationOptions,
              probe: SimilarityProbe, progress: Progress, fits: dict, verify=verify_linear) -> Candidate:
    """One descriptor set's linear result, refined and verified with ``probe.term``.

    Args:
        checked: the preflight's pair; embedded: one descriptor set of both images.
        mode: 'rigid' | 'affine'; opts: the registration options; progress: callback.
        probe: the similarity probe of the term being tried.
        fits: cache of the fit (or its RegistrationError) per descriptor set: the fit does not
            depend on the term.
        verify: ``verify(probe, matrix4, refine_stats) -> Verification`` (the policy's check).

    Returns:
        Candidate: its fit, refined map and verdict; ``error`` says why it has no result.
    """
    cand = Candidate(embedded.features)
    if embedded.features not in fits:  # the fit does not depend on the term: once per descriptor set
        try:
            fits[embedded.features] = match_and_fit(embedded, mode, opts)
        except RegistrationError as exc:
            fits[embedded.features] = exc
    fit = fits[embedded.features]
    if isinstance(fit, RegistrationError):
        cand.error = str(fit)
        return cand
    cand.linear = fit
    try:
        t = time.perf_counter()
        cand.refined = refine_stage(checked, cand.linear, mode, opts, progress, probe.term)
        if cand.refined.stats is not None:
            cand.linear.seconds["refine_s"] = round(time.perf_counter() - t, 3)
    except RegistrationError as exc:
        cand.error = str(exc)
        return cand
    stats = cand.refined.stats
    if stats is not None and stats.get("end_matrix") is not None and stats["converged"]:
        # the refinement moved further than its limit and settled: that refuses the FIT; the
        # refinement's end point is a result in its own right, kept only if it verifies below
        end = np.asarray(stats["end_matrix"])
        cand.fit_refused = (f"the {LABEL[embedded.features]} fit was refused: the intensity refinement moved it by "
                            f"up to {stats['change_mm_max']:.1f} mm (limit {opts.refine_options.max_change_mm:g}); "
                            "the refinement's end point was verified instead")
        cand.refined = RefineStage(end, overlap_crop(checked.fixed.volume, checked.moving.volume, end,
                                                     opts.fov_margin_mm), stats, [cand.fit_refused])
    t = time.perf_counter()
    cand.verification = verify(probe, cand.refined.matrix, cand.refined.stats)
    cand.linear.seconds["verify_s"] = round(time.perf_counter() - t, 3)
    cand.error = cand.verification.reason
    return cand


def inverse_consistency(checked: CheckedPair, emb: EmbeddedPair, lin4: np.ndarray, mode: str,
                        opts: RegistrationOptions, term: str) -> dict:
    """Refine the INVERSE map from the moving image's side (its body points, the fixed image as
    the target), one round from inv(lin4): a result that is where the images agree stays put; the
    backward refinement moving it further than the refinement limit refuses it.

    Args:
        checked: the preflight's pair; emb: the descriptors' pair (model-grid images, masks).
        lin4: the 4x4 fixed LPS -> moving LPS map to check; mode: 'rigid' | 'affine'.
        opts: ``refine_options.max_change_mm`` is the limit (mm); term: 'lncc' | 'mind'.

    Returns:
        dict: ``passed``; ``backward_change_mm_max`` (mm), ``limit_mm``, ``seconds``, and a
        one-line ``reason`` when it failed, or ``skipped`` when too little overlaps to tell.
    """
    limit = opts.refine_options.max_change_mm
    inv = np.linalg.inv(lin4)
    mv_f, mv_m = emb.fixed.model_volume, emb.moving.model_volume
    try:
        fov = overlap_crop(checked.moving.volume, checked.fixed.volume, inv, opts.fov_margin_mm)
        lo, hi = valid_box(mv_m, emb.moving_mask, fov)
        _, stats = refine_linear(crop_view(mv_m, emb.moving_mask, lo - 8.0, hi + 8.0, None),
                                 crop_view(mv_f, emb.fixed_mask, fov.moving_lo, fov.moving_hi, None), inv, mode,
                                 lo, hi, term, replace(opts.refine_options, rounds=1, max_change_mm=np.inf))
    except (ValueError, RegistrationError) as exc:  # too little of the moving body overlaps: no evidence either way
        return {"passed": True, "skipped": str(exc)}
    moved = stats["change_mm_max"] if stats["rounds"][0]["improved"] else 0.0
    out = {"passed": moved <= limit, "backward_change_mm_max": moved, "limit_mm": limit,
           "seconds": stats["seconds"]}
    if not out["passed"]:
        out["reason"] = (f"not inverse-consistent: refining the inverse map from the moving image's side moves it by "
                         f"up to {moved:.1f} mm (limit {limit:g})")
    return out
