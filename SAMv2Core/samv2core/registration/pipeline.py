"""register(): the SAME++ / CrossSAM pipeline on two volumes, as named stages.

1. ``preflight`` (preflight.py): 3D, not all background, modality flags, physical overlap, and
   the body masks on the 2 mm model grid, computed once and reused by every later stage;
2. ``embed_pair``: embeddings (or MIND-SSC descriptors) of both volumes;
3. ``fit_linear``: query points every 16 mm inside the body mask of the image with the smaller
   body (CrossSAM; options.query_side='moving' follows SAME++ literally), cycle-consistent
   stable matches (score > 0.7), both ends inside the body masks and away from the
   field-of-view borders, matched end refined below the 4 mm embedding grid; SAM-rigid (Arun
   SVD) or SAM-affine (least squares) with RANSAC + Tukey IRLS, minimum inlier count and
   fraction (a similarity when the matches only span a thin slab);
4. ``refine_stage`` (``refine``): a short intensity optimisation of that transform (LNCC /
   MIND-SSC) started from it; then ``verified_linear`` checks the result against the images
   (verify.py) and for inverse consistency (the inverse map refined from the moving image's side
   must stay within the refinement limit) and, with features 'auto', tries the other descriptors
   (stages 2-4 per candidate);
5. ``nonlinear_stage``: crop to the common field of view (margin) -> optional SAM-coarse
   control-grid field and optional deformable instance optimisation (SVF on embeddings + LNCC /
   MIND-SSC);
6. ITK transforms (fixed -> moving) and a report with residuals, Jacobian statistics, timings.

Each stage returns a typed result. Anything that cannot support a transform raises
RegistrationError; nothing partial is returned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..affine import sitk_affine
from ..embed import Embeddings
from ..errors import RegistrationError, SAMv2Error
from ..fitting import MODES, LinearFit, robust_fit
from ..grid import Grid
from ..progress import Progress
from ..session import EmbeddingSession
from ..volume import Modality, Volume
from .coarse import fit_coarse_field
from .deformable import make_deformable_image, refine_deformable, resolve_intensity_term, taper_window
from .fov import FovCrop, crop_volume, overlap_crop
from .grid import sample
from .linear_refine import refine_linear
from .matches import PointPairs, registration_matches
from .mind_features import MindEmbedder
from .options import RegistrationOptions
from .preflight import CheckedPair, preflight
from .result import RegistrationResult, displacement_image
from .svf import jacobian_determinant, jacobian_stats
from .verify import SimilarityProbe, Verification, choose, verify_linear


def _quiet(fraction: float, message: str) -> None:
    return None


def _default_embedder(device: str) -> EmbeddingSession:
    return EmbeddingSession.open(None, device=device)


def _load_embedder(device: str):
    try:
        return _default_embedder(device)
    except SAMv2Error as exc:
        raise RegistrationError(f"no embedding model available: {exc}") from None


def _crop_embedded(model_volume: Volume, mask: np.ndarray, lo, hi, emb):
    """The deformable view of one image cropped to the LPS box [lo, hi] (the CrossSAM FOV crop)."""
    cropped = crop_volume(model_volume, lo, hi)
    i0 = np.rint(model_volume.lps_to_index(np.asarray(cropped.origin))).astype(int)
    z, y, x = cropped.array.shape
    sub_mask = mask[i0[2]:i0[2] + z, i0[1]:i0[1] + y, i0[0]:i0[0] + x]
    return make_deformable_image(cropped, sub_mask, emb)


def _valid_box(model_volume: Volume, mask: np.ndarray, fov) -> tuple[np.ndarray, np.ndarray]:
    """LPS box where the refinements measure similarity: the fixed side of the common field of
    view, limited to the fixed body's bounding box."""
    kji = np.argwhere(mask)
    body_pts = model_volume.index_to_lps(kji[[kji[:, d].argmin() for d in range(3)] +
                                             [kji[:, d].argmax() for d in range(3)]][:, ::-1].astype(float))
    lo = np.maximum(fov.fixed_lo, body_pts.min(0))
    hi = np.minimum(fov.fixed_hi, body_pts.max(0))
    if np.any(hi - lo < 16.0):
        raise RegistrationError("the common field of view contains too little of the fixed body to refine the transform")
    return lo, hi


# --- stage results -------------------------------------------------------------------------------
@dataclass(eq=False)
class EmbeddedPair:
    """Stage 2: descriptors of both images on their model grids, with the body masks there."""

    fixed: Embeddings
    moving: Embeddings
    fixed_mask: np.ndarray
    moving_mask: np.ndarray
    features: str  # 'sam' | 'mind-ssc' | 'mind-ssc (cross-modality fallback)'


@dataclass(eq=False)
class LinearStage:
    """Stage 3: the stable matches and the robust linear fit to them."""

    embedded: EmbeddedPair
    pairs: PointPairs
    fit: LinearFit
    seconds: dict
    warnings: list = field(default_factory=list)


@dataclass(eq=False)
class RefineStage:
    """Stage 4: the linear map after the intensity refinement (the fit's when it was not applied)."""

    matrix: np.ndarray  # 4x4 fixed LPS -> moving LPS
    fov: FovCrop
    stats: Optional[dict]  # None when the refinement is switched off
    warnings: list = field(default_factory=list)


@dataclass(eq=False)
class NonlinearStage:
    """Stage 5: the displacement (None without coarse / deformable) and its report entries."""

    displacement: Optional[sitk.Image]
    report: dict
    warnings: list = field(default_factory=list)


# --- stages ---------------------------------------------------------------------------------------
def embed_pair(checked: CheckedPair, embedder, features: str = "sam", progress: Progress = None) -> EmbeddedPair:
    """Embed both images with ``embedder``; the body masks come from the preflight."""
    report = progress or _quiet
    report(0.02, "embedding the fixed image")
    emb_f = embedder.embed(checked.fixed.volume, progress=lambda f, m: report(0.02 + 0.28 * f, f"fixed: {m}"))
    report(0.30, "embedding the moving image")
    emb_m = embedder.embed(checked.moving.volume, progress=lambda f, m: report(0.30 + 0.28 * f, f"moving: {m}"))
    return EmbeddedPair(emb_f, emb_m, checked.fixed.mask_on(emb_f.model_volume),
                        checked.moving.mask_on(emb_m.model_volume), features)


def _match_and_fit(embedded: EmbeddedPair, mode: str, opts: RegistrationOptions) -> LinearStage:
    """Stable matches and the robust linear fit; RegistrationError when they cannot support it."""
    t0 = time.perf_counter()
    pairs = registration_matches(embedded.fixed, embedded.moving, embedded.fixed_mask, embedded.moving_mask,
                                 spacing_mm=opts.grid_spacing_mm, max_points=opts.max_query_points,
                                 passes=opts.stable_passes, min_score=opts.min_score,
                                 mask_margin_mm=opts.mask_margin_mm, query_side=opts.query_side,
                                 subvoxel=opts.subvoxel, min_points=opts.min_inliers)
    t1 = time.perf_counter()
    fit = robust_fit(pairs.fixed, pairs.moving, mode, threshold_mm=opts.inlier_threshold_mm,
                     min_inliers=opts.min_inliers, iterations=opts.ransac_iterations, scores=pairs.scores,
                     max_scale=opts.max_scale, affine_min_spread_mm=opts.affine_min_spread_mm,
                     min_inlier_fraction=opts.inlier_fraction_floor, seed=opts.seed)
    t2 = time.perf_counter()
    warnings = [fit.stats["warning"]] if "warning" in fit.stats else []
    return LinearStage(embedded, pairs, fit, {"matching_s": round(t1 - t0, 3), "linear_fit_s": round(t2 - t1, 3)},
                       warnings)


def mind_pair(checked: CheckedPair, features: str = "mind-ssc") -> tuple[EmbeddedPair, float]:
    """MIND-SSC descriptors of both images (and the seconds they took)."""
    t = time.perf_counter()
    mind = MindEmbedder()
    emb_f, emb_m = mind.embed(checked.fixed.volume), mind.embed(checked.moving.volume)
    embedded = EmbeddedPair(emb_f, emb_m, checked.fixed.mask_on(emb_f.model_volume),
                            checked.moving.mask_on(emb_m.model_volume), features)
    return embedded, round(time.perf_counter() - t, 3)


def fit_linear(checked: CheckedPair, embedded: EmbeddedPair, mode: str, opts: RegistrationOptions,
               progress: Progress = None) -> LinearStage:
    """Stable matches + robust fit; with features 'auto' on a cross-modality pair whose SAM matches
    cannot support a transform, the same on MIND-SSC descriptors (said in the warnings). This is
    the unverified path (``RegistrationOptions(verify=False)``)."""
    report = progress or _quiet
    report(0.60, "stable matching")
    try:
        return _match_and_fit(embedded, mode, opts)
    except RegistrationError as exc:
        if not (opts.features == "auto" and checked.modality_pair == "cross"):
            raise
        sam_error = exc
    # a model not trained across modalities: retry on modality-independent descriptors
    report(0.62, "SAM matches disagree across modalities: MIND-SSC descriptors")
    mind, seconds = mind_pair(checked, "mind-ssc (cross-modality fallback)")
    try:
        stage = _match_and_fit(mind, mode, opts)
    except RegistrationError as again:
        raise RegistrationError(f"{again} (MIND-SSC descriptors; SAM embeddings failed too: {sam_error})") from None
    stage.seconds["mind_descriptors_s"] = seconds
    stage.warnings.insert(0, f"SAM embeddings: {sam_error}; used training-free MIND-SSC descriptors instead")
    return stage


def refine_stage(checked: CheckedPair, linear: LinearStage, mode: str, opts: RegistrationOptions,
                 progress: Progress = None, term: Optional[str] = None) -> RefineStage:
    """The intensity refinement of the linear fit (when ``opts.refine``) and the common field of
    view; ``term`` ('lncc' | 'mind') overrides the one the options imply."""
    fixed, moving = checked.fixed.volume, checked.moving.volume
    lin4 = linear.fit.homogeneous()
    fov = overlap_crop(fixed, moving, lin4, opts.fov_margin_mm)  # raises when nothing overlaps
    if not opts.refine:
        return RefineStage(lin4, fov, None)
    (progress or _quiet)(0.70, f"intensity refinement of the {mode} fit ({linear.fit.n_inliers} inliers)")
    emb = linear.embedded
    mv_f, mv_m = emb.fixed.model_volume, emb.moving.model_volume
    # the term follows the deformable option when that names one, else LNCC / MIND by modality
    if term is None:
        term = opts.deformable.intensity if opts.deformable.intensity in ("lncc", "mind") else "auto"
    try:
        lo, hi = _valid_box(mv_f, emb.fixed_mask, fov)
        lin4, stats = refine_linear(
            _crop_embedded(mv_f, emb.fixed_mask, lo - 8.0, hi + 8.0, None),
            _crop_embedded(mv_m, emb.moving_mask, fov.moving_lo, fov.moving_hi, None), lin4, mode, lo, hi, term,
            opts.refine_options)
    except (ValueError, RegistrationError) as exc:  # too little overlap to refine: the SAM fit stands
        stats = {"accepted": False, "reason": f"skipped: {exc}"}
    warnings = [] if stats["accepted"] else [f"intensity refinement not applied: {stats['reason']}"]
    return RefineStage(lin4, overlap_crop(fixed, moving, lin4, opts.fov_margin_mm), stats, warnings)


def nonlinear_stage(checked: CheckedPair, linear: LinearStage, refined: RefineStage, coarse: bool,
                    deformable: bool, opts: RegistrationOptions, progress: Progress = None,
                    timing: Optional[dict] = None, term: Optional[str] = None) -> NonlinearStage:
    """SAM-coarse and / or deformable refinement over the common field of view; ``term``: the
    intensity term the linear result verified with, used when the deformable option says 'auto'."""
    report_progress = progress or _quiet
    timing = {} if timing is None else timing
    if not (coarse or deformable):
        return NonlinearStage(None, {})
    emb, lin4, fov = linear.embedded, refined.matrix, refined.fov
    mv_f, mv_m = emb.fixed.model_volume, emb.moving.model_volume
    report: dict = {}
    warnings: list = []
    t = time.perf_counter()
    valid_lo, valid_hi = _valid_box(mv_f, emb.fixed_mask, fov)
    dopt = opts.deformable
    if term is not None and dopt.intensity == "auto":
        dopt = replace(dopt, intensity=term)
    dom_lo, dom_hi = valid_lo - dopt.taper_mm, valid_hi + dopt.taper_mm
    field_grid = Grid.covering(dom_lo, dom_hi, dopt.field_spacing_mm)
    init = None
    if coarse:
        report_progress(0.75, "SAM-coarse field")
        inv = np.linalg.inv(lin4)
        target = linear.pairs.moving @ inv[:3, :3].T + inv[:3, 3]
        near = linear.fit.residuals_mm < opts.coarse_max_residual_mm
        cf = fit_coarse_field(linear.pairs.fixed[near], target[near], dom_lo, dom_hi, opts.coarse_spacing_mm,
                              opts.coarse_smoothness, irls_iterations=10, tukey_sigmas=opts.coarse_tukey_sigmas)
        coarse_disp = cf.resample(field_grid) * taper_window(field_grid, dopt.taper_mm)
        report["coarse_field"] = cf.stats

        def coarse_at(p, _d=coarse_disp, _g=field_grid):
            return sample(_d.to(p.device), _g, p)[0].T[None]
        init = coarse_at
        now = time.perf_counter()
        timing["coarse_s"] = round(now - t, 3)
        t = now
        total = coarse_disp
    if deformable:
        report_progress(0.80, "deformable refinement")
        fixed, moving = checked.fixed.volume, checked.moving.volume
        resolve_intensity_term(dopt.intensity, fixed.modality.value, moving.modality.value)
        d_fixed = _crop_embedded(mv_f, emb.fixed_mask, dom_lo - 8.0, dom_hi + 8.0, emb.fixed)
        d_moving = _crop_embedded(mv_m, emb.moving_mask, fov.moving_lo, fov.moving_hi, emb.moving)
        try:
            res = refine_deformable(d_fixed, d_moving, lin4, valid_lo, valid_hi, init, dopt,
                                    progress=lambda f, m: report_progress(0.80 + 0.17 * f, m))
        except ValueError as exc:
            raise RegistrationError(f"deformable refinement impossible: {exc}") from None
        report["deformable_refinement"] = res.stats
        field_grid, total = res.grid, res.displacement
        timing["deformable_s"] = round(time.perf_counter() - t, 3)
    det = jacobian_determinant(total, field_grid.spacing)
    inside = np.all((field_grid.points() >= valid_lo) & (field_grid.points() <= valid_hi), axis=-1)
    jstats = jacobian_stats(det)
    jstats["common_fov"] = jacobian_stats(det, inside)
    jstats["linear_determinant"] = round(float(np.linalg.det(lin4[:3, :3])), 6)
    jstats["note"] = "det(I + grad d) of the nonlinear part; the complete map's determinant is this times linear_determinant"
    report["jacobian"] = jstats
    report["folding_percent"] = jstats["folding_percent"]
    if jstats["folding_percent"] > 0:
        warnings.append(f"{jstats['folding_percent']:.4f}% of the field's voxels fold (det J <= 0)")
    report["field_grid"] = field_grid.to_dict()
    return NonlinearStage(displacement_image(total, field_grid), report, warnings)


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
        return self.verification is not None and self.verification.passed

    def report(self) -> dict:
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


@dataclass(eq=False)
class VerifiedLinear:
    """Stage 3-4 with verification: the accepted candidate and what was tried."""

    chosen: Candidate
    candidates: list
    report: dict
    warnings: list = field(default_factory=list)


def claims_cross_modality(embedder) -> bool:
    """True when the model card says the model was validated across modalities (CT-MRI)."""
    descriptors = getattr(embedder, "descriptors", embedder)  # an EmbeddingSession or the descriptors
    card = getattr(descriptors, "card", None)
    training = getattr(card, "training", None) or {}
    return bool(training.get("cross_modality_validated", False))


def verification_terms(checked: CheckedPair, opts: RegistrationOptions) -> list[str]:
    """The similarity terms to refine and verify with, in order of trial: the deformable option's
    term when it names one; else 'lncc' within one modality and 'mind' across; for two MR images
    'lncc', then 'mind' when nothing verifies with it (two MR sequences of different contrast,
    e.g. T2 and DWI, do not agree in local NCC; MIND-SSC is less precise on one contrast)."""
    if opts.deformable.intensity in ("lncc", "mind"):
        return [opts.deformable.intensity]
    if checked.modality_pair == "cross":
        return ["mind"]
    both_mr = checked.fixed.volume.modality is Modality.MR and checked.moving.volume.modality is Modality.MR
    return ["lncc", "mind"] if both_mr else ["lncc"]


def _candidate(checked: CheckedPair, embedded: EmbeddedPair, mode: str, opts: RegistrationOptions,
               probe: SimilarityProbe, progress: Progress, fits: dict) -> Candidate:
    """One descriptor set's fit (cached in ``fits`` across similarity terms), refined and verified
    with ``probe.term``."""
    cand = Candidate(embedded.features)
    if embedded.features not in fits:  # the fit does not depend on the term: once per descriptor set
        try:
            fits[embedded.features] = _match_and_fit(embedded, mode, opts)
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
        cand.fit_refused = (f"the {_LABEL[embedded.features]} fit was refused: the intensity refinement moved it by "
                            f"up to {stats['change_mm_max']:.1f} mm (limit {opts.refine_options.max_change_mm:g}); "
                            "the refinement's end point was verified instead")
        cand.refined = RefineStage(end, overlap_crop(checked.fixed.volume, checked.moving.volume, end,
                                                     opts.fov_margin_mm), stats, [cand.fit_refused])
    t = time.perf_counter()
    cand.verification = verify_linear(probe, cand.refined.matrix, cand.refined.stats)
    cand.linear.seconds["verify_s"] = round(time.perf_counter() - t, 3)
    cand.error = cand.verification.reason
    return cand


def inverse_consistency(checked: CheckedPair, emb: EmbeddedPair, lin4: np.ndarray, mode: str,
                        opts: RegistrationOptions, term: str) -> dict:
    """Refine the INVERSE map from the moving image's side (its body points, the fixed image as
    the target), one round from inv(lin4): a result that is where the images agree stays put; the
    backward refinement moving it further than the refinement limit refuses it."""
    limit = opts.refine_options.max_change_mm
    inv = np.linalg.inv(lin4)
    mv_f, mv_m = emb.fixed.model_volume, emb.moving.model_volume
    try:
        fov = overlap_crop(checked.moving.volume, checked.fixed.volume, inv, opts.fov_margin_mm)
        lo, hi = _valid_box(mv_m, emb.moving_mask, fov)
        _, stats = refine_linear(_crop_embedded(mv_m, emb.moving_mask, lo - 8.0, hi + 8.0, None),
                                 _crop_embedded(mv_f, emb.fixed_mask, fov.moving_lo, fov.moving_hi, None), inv, mode,
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


_LABEL = {"sam": "SAM embeddings", "mind-ssc": "MIND-SSC descriptors"}


def _inverse_consistent(passed: list, checked: CheckedPair, mode: str, opts: RegistrationOptions,
                        probe: SimilarityProbe) -> list:
    """The verified candidates left once the best of them is inverse-consistent: the best (by
    similarity) is checked; one that fails is refused (its verification says why) and the next
    best is checked. Without the refinement (``opts.refine`` off) there is no check."""
    while passed and opts.refine:
        k = choose(probe, [(c.features, c.refined.matrix) for c in passed])[0] if len(passed) > 1 else 0
        best = passed[k]
        t = time.perf_counter()
        backward = inverse_consistency(checked, best.linear.embedded, best.refined.matrix, mode, opts, probe.term)
        best.linear.seconds["inverse_consistency_s"] = round(time.perf_counter() - t, 3)
        best.verification.details["inverse_consistency"] = backward
        if backward["passed"]:
            break
        best.verification.passed, best.verification.reason = False, backward["reason"]
        best.error = backward["reason"]
        passed = [c for c in passed if c.passed]
    return passed


def verified_linear(checked: CheckedPair, embedder, mode: str, opts: RegistrationOptions,
                    progress: Progress = None, timing: Optional[dict] = None) -> VerifiedLinear:
    """Linear candidates from the descriptors ``opts.features`` allows, each verified against the
    images (verify.py); the best verified one is kept, or RegistrationError names why none was.

    'sam' / 'mind': that descriptor only. 'auto': SAM, and MIND-SSC when SAM's result fails; for a
    cross-modality pair whose model card does not claim cross-modality validation, both, and the
    better verified one is kept."""
    report_progress = progress or _quiet
    timing = {} if timing is None else timing
    both = (opts.features == "auto" and checked.modality_pair == "cross" and not claims_cross_modality(embedder))
    order = {"sam": ["sam"], "mind": ["mind-ssc"], "auto": ["sam", "mind-ssc"]}[opts.features]
    embeddings: dict = {}
    fits: dict = {}

    def embedded_for(features: str) -> EmbeddedPair:
        if features not in embeddings:
            t = time.perf_counter()
            if features == "sam":
                embeddings[features] = embed_pair(checked, embedder, "sam", report_progress)
                timing["embedding_s"] = round(time.perf_counter() - t, 3)
            else:
                report_progress(0.6, "MIND-SSC descriptors")
                embeddings[features], timing["mind_descriptors_s"] = mind_pair(checked, "mind-ssc")
                timing.setdefault("embedding_s", timing["mind_descriptors_s"])
        return embeddings[features]

    earlier: dict = {}  # term -> the candidates' reports with that term, when none verified
    refusals: list[str] = []
    for term in verification_terms(checked, opts):
        probe = SimilarityProbe(checked.fixed.model_volume, checked.fixed.mask, checked.moving.model_volume, term,
                                opts.verify_options)
        candidates: list[Candidate] = []
        for features in order:
            if candidates and candidates[-1].passed and not both:
                break
            embedded = embedded_for(features)
            report_progress(0.62, f"stable matching and fit ({_LABEL[features]}, {term})")
            t = time.perf_counter()
            candidates.append(_candidate(checked, embedded, mode, opts, probe, report_progress, fits))
            timing[f"linear_{features}_s"] = round(timing.get(f"linear_{features}_s", 0.0) + time.perf_counter() - t, 3)
        passed = _inverse_consistent([c for c in candidates if c.passed], checked, mode, opts, probe)
        if passed:
            break
        earlier[term] = {c.features: c.report() for c in candidates}
        refusals.append("; ".join(f"{_LABEL[c.features]} ({term}): {c.error}" for c in candidates))
    tried = {c.features: c.report() for c in candidates}
    if not passed:
        raise RegistrationError(f"the {mode} result could not be verified against the images ({'; '.join(refusals)})")
    warnings = []
    comparison = None
    if len(passed) > 1:
        k, comparison = choose(probe, [(c.features, c.refined.matrix) for c in passed])
        chosen = passed[k]
        why = (f"{_LABEL[chosen.features]} kept: both verified, its {probe.term} similarity is higher "
               f"({comparison['similarity']}; the fits differ by up to {comparison['max_disagreement_mm']} mm)")
    else:
        chosen = passed[0]
        failed = [c for c in candidates if not c.passed]
        why = f"{_LABEL[chosen.features]} verified" + "".join(
            f"; {_LABEL[c.features]} not: {c.error}" for c in failed)
        if failed:
            warnings.append(f"{_LABEL[failed[0].features]} result refused ({failed[0].error}); "
                            f"used {_LABEL[chosen.features]} instead")
    if chosen.fit_refused:
        why += f" ({chosen.fit_refused})"
    if earlier:
        why += (f" with {probe.term} (nothing verified with {', '.join(earlier)}: the images' local intensities "
                "do not correspond, e.g. two MR contrasts)")
        warnings.append(f"no result verified with {', '.join(earlier)}; refined and verified with {probe.term}")
    report = {"summary": why, "chosen": chosen.features, "term": probe.term, "candidates": tried,
              "cross_modality_model": claims_cross_modality(embedder)}
    if earlier:
        report["earlier_terms"] = earlier
    if comparison is not None:
        report["comparison"] = comparison
    return VerifiedLinear(chosen, candidates, report, warnings)


# --- the pipeline ---------------------------------------------------------------------------------
def register(fixed: Volume, moving: Volume, mode: str = "affine", deformable: bool = False, coarse: bool = False,
             embedder=None, options: Optional[RegistrationOptions] = None, progress: Progress = None,
             checked: Optional[CheckedPair] = None) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``; returns transforms mapping FIXED LPS points to MOVING points.

    ``mode``: 'rigid' (same patient, e.g. CT-MRI; Arun SVD) or 'affine' (least squares).
    ``coarse``: add a SAM-coarse control-grid displacement; ``deformable``: add the diffeomorphic
    instance optimisation (after cropping to the common field of view). ``embedder``: a
    samv2core.embed.Embedder (default: the bundled model). ``checked``: the result of
    ``preflight(fixed, moving, options)`` when the caller already ran it (not repeated). Raises
    RegistrationError with a one-line reason whenever the result could not be trusted.
    """
    opts = options or RegistrationOptions()
    report_progress = progress or _quiet
    if mode not in MODES:
        raise RegistrationError(f"unknown registration mode {mode!r}: use 'rigid' or 'affine'")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    # 1. checks and body masks (once)
    if checked is None or not checked.is_for(fixed, moving):
        checked = preflight(fixed, moving, opts)
    t = time.perf_counter()

    # 2-4. embeddings, linear candidates, refinement and verification
    verification = None
    if opts.verify:
        if opts.features != "mind" and embedder is None:
            embedder = _load_embedder(opts.device)
        verified = verified_linear(checked, embedder, mode, opts, report_progress, timing)
        linear, refined = verified.chosen.linear, verified.chosen.refined
        timing.update(linear.seconds)
        verification = verified
        if linear.embedded.features == "mind-ssc":
            embedder = MindEmbedder()
    else:
        t = time.perf_counter()
        if opts.features == "mind":
            embedded, _ = mind_pair(checked, "mind-ssc")
            embedder = MindEmbedder()
        else:
            if embedder is None:
                embedder = _load_embedder(opts.device)
            embedded = embed_pair(checked, embedder, "sam", report_progress)
        timing["embedding_s"] = round(time.perf_counter() - t, 3)
        linear = fit_linear(checked, embedded, mode, opts, report_progress)
        timing.update(linear.seconds)
        t = time.perf_counter()
        refined = refine_stage(checked, linear, mode, opts, report_progress)
        if refined.stats is not None:
            timing["refine_s"] = round(time.perf_counter() - t, 3)
    lin4, fit = refined.matrix, linear.fit
    report = {"mode": mode, "coarse": bool(coarse), "deformable": bool(deformable),
              "modality_pair": checked.modality_pair,
              "fixed": {"name": fixed.name, "modality": fixed.modality.value, "size_xyz": list(fixed.size_xyz),
                        "spacing_mm": list(fixed.spacing)},
              "moving": {"name": moving.name, "modality": moving.modality.value, "size_xyz": list(moving.size_xyz),
                         "spacing_mm": list(moving.spacing)},
              "model_id": getattr(embedder, "model_id", None), "features": linear.embedded.features,
              "convention": "fixed LPS -> moving LPS (ITK)",
              "matches": linear.pairs.report, "linear": fit.report(), "field_of_view": refined.fov.report(),
              "inliers": fit.n_inliers, "residual_mm_median": fit.report()["residual_mm_inliers"]["median"]}
    if refined.stats is not None:
        report["linear_refinement"] = refined.stats
        report["linear_matrix"] = lin4.tolist()  # 'linear' above describes the SAM fit before refinement
    if verification is not None:
        report["verification"] = verification.report

    # 5. nonlinear stages
    nonlinear = nonlinear_stage(checked, linear, refined, coarse, deformable, opts, report_progress, timing,
                                None if verification is None else verification.report["term"])
    report.update(nonlinear.report)

    linear_tf = sitk_affine(lin4)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(linear_tf)
    if nonlinear.displacement is not None:
        # sitk copies the image into the transform; keep our own copy for the result
        composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(nonlinear.displacement)))
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    report["timing"] = timing
    report["settings"] = opts.to_dict()
    report["scanner_gap_mm"] = checked.scanner_gap_mm
    gap_warning = ([f"the images' scanner-coordinate boxes do not intersect ({checked.scanner_gap_mm:g} mm apart): "
                    "the result rests on the anatomy alone"] if checked.scanner_gap_mm > 0 else [])
    report["warnings"] = (gap_warning + (verification.warnings if verification is not None else []) + linear.warnings
                          + refined.warnings + nonlinear.warnings)
    report_progress(1.0, "registration done")
    return RegistrationResult(linear_tf, nonlinear.displacement, composite, report)
