"""The named stages of a registration, each returning a typed result (pipeline.py sequences them).

* ``embed_pair`` / ``mind_pair`` -> :class:`EmbeddedPair`: descriptors of both images (SAM
  embeddings or MIND-SSC) on their 2 mm model grids, with the preflight's body masks there;
* ``match_and_fit`` -> :class:`LinearStage`: query points every 16 mm inside the body mask of
  the image with the smaller body (CrossSAM; ``options.query_side='moving'`` follows SAME++
  literally), cycle-consistent stable matches (score > 0.7), both ends inside the body masks
  and away from the field-of-view borders, matched end refined below the 4 mm embedding grid;
  SAM-rigid (Arun SVD) or SAM-affine (least squares) with RANSAC + Tukey IRLS, minimum inlier
  count and fraction (a similarity when the matches only span a thin slab);
* ``refine_stage`` -> :class:`RefineStage`: a short intensity optimisation (LNCC / MIND-SSC) of
  that transform started from it, and the common field of view;
* ``nonlinear_stage`` -> :class:`NonlinearStage`: crop to the common field of view (margin) ->
  optional SAM-coarse control-grid field and optional deformable instance optimisation (SVF on
  embeddings + LNCC / MIND-SSC), with Jacobian statistics.

Which stages run for which descriptors and terms, and whether a result is trusted, is the
policy's business (policy.py). All points and 4x4 maps are LPS millimetres, fixed -> moving.
A stage that cannot support a transform raises RegistrationError; nothing partial is returned.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Optional

import numpy as np
import SimpleITK as sitk

from ..embed import Embeddings
from ..errors import RegistrationError, SAMv2Error
from ..fitting import LinearFit, robust_fit
from ..grid import Grid
from ..progress import Progress
from ..session import EmbeddingSession
from .coarse import fit_coarse_field
from .deformable import refine_deformable, taper_window
from .fov import FovCrop, overlap_crop
from .grid import sample
from .linear_intensity_refine import refine_linear
from .matches import PointPairs, registration_matches
from .mind_features import MindEmbedder
from .options import RegistrationOptions
from .preflight import CheckedPair
from .result import displacement_image
from .svf import jacobian_determinant, jacobian_stats
from .views import crop_view, resolve_intensity_term, valid_box


def quiet(fraction: float, message: str) -> None:
    """A progress callback that reports nothing."""
    return None


def _default_embedder(device: str) -> EmbeddingSession:
    return EmbeddingSession.open(None, device=device)


def load_embedder(device: str) -> EmbeddingSession:
    """The bundled model's EmbeddingSession on ``device``; RegistrationError when there is none."""
    try:
        return _default_embedder(device)
    except SAMv2Error as exc:
        raise RegistrationError(f"no embedding model available: {exc}") from None


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
    """Stage 2 (SAM): embed both images with ``embedder``; the body masks come from the preflight.

    Args:
        checked: the preflight's pair (volumes and body masks).
        embedder: an EmbeddingSession (anything with ``embed(volume, progress)``).
        features: the label the result carries ('sam').
        progress: callback(fraction, message), reported over 0.02-0.58.

    Returns:
        EmbeddedPair: both images' embeddings and (z, y, x) body masks on their model grids.
    """
    report = progress or quiet
    report(0.02, "embedding the fixed image")
    emb_f = embedder.embed(checked.fixed.volume, progress=lambda f, m: report(0.02 + 0.28 * f, f"fixed: {m}"))
    report(0.30, "embedding the moving image")
    emb_m = embedder.embed(checked.moving.volume, progress=lambda f, m: report(0.30 + 0.28 * f, f"moving: {m}"))
    return EmbeddedPair(emb_f, emb_m, checked.fixed.mask_on(emb_f.model_volume),
                        checked.moving.mask_on(emb_m.model_volume), features)


def match_and_fit(embedded: EmbeddedPair, mode: str, opts: RegistrationOptions) -> LinearStage:
    """Stage 3: stable matches and the robust linear fit to them.

    Args:
        embedded: both images' descriptors and body masks.
        mode: 'rigid' or 'affine'.
        opts: the match and fit settings (grid spacing, score, inlier threshold in mm, ...).

    Returns:
        LinearStage: the point pairs (LPS mm), the fit (fixed -> moving) and the seconds taken.

    Raises:
        RegistrationError: the matches cannot support a transform (one-line reason).
    """
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
    """Stage 2 (MIND-SSC): training-free descriptors of both images.

    Args:
        checked: the preflight's pair.
        features: the label the result carries ('mind-ssc', or the fallback's label).

    Returns:
        (EmbeddedPair, seconds): the descriptors with the body masks, and the time they took.
    """
    t = time.perf_counter()
    mind = MindEmbedder()
    emb_f, emb_m = mind.embed(checked.fixed.volume), mind.embed(checked.moving.volume)
    embedded = EmbeddedPair(emb_f, emb_m, checked.fixed.mask_on(emb_f.model_volume),
                            checked.moving.mask_on(emb_m.model_volume), features)
    return embedded, round(time.perf_counter() - t, 3)


def refine_stage(checked: CheckedPair, linear: LinearStage, mode: str, opts: RegistrationOptions,
                 progress: Progress = None, term: Optional[str] = None) -> RefineStage:
    """Stage 4: the intensity refinement of the linear fit (when ``opts.refine``) and the common
    field of view.

    Args:
        checked: the preflight's pair.
        linear: the fit to refine (its embedded pair gives the model-grid images and masks).
        mode: 'rigid' or 'affine' (the kind of update).
        opts: ``refine``, ``refine_options``, ``fov_margin_mm`` and the deformable term are read.
        progress: callback(fraction, message).
        term: 'lncc' | 'mind' overrides the term the options imply.

    Returns:
        RefineStage: the 4x4 fixed LPS -> moving LPS map (the fit's when the refinement was not
        applied, said in its warnings), the common field of view and the refinement statistics
        (None when switched off; ``end_matrix`` when it settled beyond its limit).
    """
    fixed, moving = checked.fixed.volume, checked.moving.volume
    lin4 = linear.fit.homogeneous()
    fov = overlap_crop(fixed, moving, lin4, opts.fov_margin_mm)  # raises when nothing overlaps
    if not opts.refine:
        return RefineStage(lin4, fov, None)
    (progress or quiet)(0.70, f"intensity refinement of the {mode} fit ({linear.fit.n_inliers} inliers)")
    emb = linear.embedded
    mv_f, mv_m = emb.fixed.model_volume, emb.moving.model_volume
    # the term follows the deformable option when that names one, else LNCC / MIND by modality
    if term is None:
        term = opts.deformable.intensity if opts.deformable.intensity in ("lncc", "mind") else "auto"
    try:
        lo, hi = valid_box(mv_f, emb.fixed_mask, fov)
        lin4, stats = refine_linear(
            crop_view(mv_f, emb.fixed_mask, lo - 8.0, hi + 8.0, None),
            crop_view(mv_m, emb.moving_mask, fov.moving_lo, fov.moving_hi, None), lin4, mode, lo, hi, term,
            opts.refine_options)
    except (ValueError, RegistrationError) as exc:  # too little overlap to refine: the SAM fit stands
        stats = {"accepted": False, "reason": f"skipped: {exc}"}
    warnings = [] if stats["accepted"] else [f"intensity refinement not applied: {stats['reason']}"]
    return RefineStage(lin4, overlap_crop(fixed, moving, lin4, opts.fov_margin_mm), stats, warnings)


def nonlinear_stage(checked: CheckedPair, linear: LinearStage, refined: RefineStage, coarse: bool,
                    deformable: bool, opts: RegistrationOptions, progress: Progress = None,
                    timing: Optional[dict] = None, term: Optional[str] = None) -> NonlinearStage:
    """Stage 5: SAM-coarse and / or deformable refinement over the common field of view.

    Args:
        checked: the preflight's pair.
        linear: the linear stage (its matches seed the coarse field, its descriptors the
            deformable embedding term).
        refined: the linear map (4x4, fixed LPS -> moving LPS) and common field of view.
        coarse, deformable: which nonlinear parts to add (neither: an empty stage).
        opts: ``deformable`` and the coarse settings.
        progress: callback(fraction, message); timing: dict receiving 'coarse_s' / 'deformable_s'.
        term: the intensity term the linear result verified with, used when the deformable
            option says 'auto'.

    Returns:
        NonlinearStage: the displacement image (mm, LPS vectors, on the field grid) or None, the
        report entries (Jacobian statistics, folding) and warnings.
    """
    report_progress = progress or quiet
    timing = {} if timing is None else timing
    if not (coarse or deformable):
        return NonlinearStage(None, {})
    emb, lin4, fov = linear.embedded, refined.matrix, refined.fov
    mv_f, mv_m = emb.fixed.model_volume, emb.moving.model_volume
    report: dict = {}
    warnings: list = []
    t = time.perf_counter()
    valid_lo, valid_hi = valid_box(mv_f, emb.fixed_mask, fov)
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
        d_fixed = crop_view(mv_f, emb.fixed_mask, dom_lo - 8.0, dom_hi + 8.0, emb.fixed)
        d_moving = crop_view(mv_m, emb.moving_mask, fov.moving_lo, fov.moving_hi, emb.moving)
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


