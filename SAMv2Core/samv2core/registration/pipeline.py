"""register(): the SAME++ / CrossSAM pipeline on two volumes.

1. checks (3D, not all background, modality flags, physical overlap);
2. embeddings of both volumes; query points every 16 mm inside the body mask of the image with
   the smaller body (CrossSAM; options.query_side='moving' follows SAME++ literally);
3. cycle-consistent stable matches (score > 0.7), both ends inside the body masks and away from
   the field-of-view borders, matched end refined below the 4 mm embedding grid;
4. SAM-rigid (Arun SVD) or SAM-affine (least squares) with RANSAC + Tukey IRLS, minimum inlier
   count and fraction (a similarity when the matches only span a thin slab), then (``refine``)
   a short intensity optimisation of that transform (LNCC / MIND-SSC) started from it;
5. crop to the common field of view (margin) -> optional SAM-coarse control-grid field and
   optional deformable instance optimisation (SVF on embeddings + LNCC / MIND-SSC);
6. ITK transforms (fixed -> moving) and a report with residuals, Jacobian statistics, timings.

Anything that cannot support a transform raises RegistrationError; nothing partial is returned.
"""
from __future__ import annotations

import time
from typing import Callable, Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError, RegistrationError, SAMv2Error
from ..preprocess import body_mask, resample_to_model_grid
from ..session import EmbeddingSession
from ..volume import Modality, Volume
from .coarse import fit_coarse_field
from .deformable import make_deformable_image, refine_deformable, resolve_intensity_term, taper_window
from .fitting import MODES, robust_fit
from .fov import crop_volume, overlap_crop
from .linear_refine import refine_linear
from .grid import Grid, sample
from .options import RegistrationOptions
from .result import RegistrationResult
from .matches import registration_matches
from .mind_features import MindEmbedder
from .svf import jacobian_determinant, jacobian_stats

Progress = Optional[Callable[[float, str], None]]


# --- input checks ------------------------------------------------------------------------------
def check_volume(volume: Volume, role: str) -> None:
    """Refuse (RegistrationError) a 2D, constant/NaN or wrongly flagged volume."""
    if not isinstance(volume, Volume):
        raise RegistrationError(f"{role} image: expected a samv2core Volume, got {type(volume).__name__}")
    size = np.asarray(volume.size_xyz)
    extent = (size - 1) * np.asarray(volume.spacing)
    if size.min() < 2 or extent.min() < 8.0:
        raise RegistrationError(
            f"{role} image is 2D or too thin ({'x'.join(map(str, size))} voxels, extent "
            f"{'x'.join(f'{e:.0f}' for e in extent)} mm): registration needs a 3D volume")
    try:
        volume.validated()
    except InputError as exc:
        raise RegistrationError(f"{role} image: {exc}") from None
    a = volume.array
    sub = a.ravel()[:: max(1, a.size // 200_000)]
    p1 = float(np.percentile(sub, 1))
    if volume.modality is Modality.CT and float(a.min()) >= 0.0:
        raise RegistrationError(
            f"{role} image is flagged CT but has no negative values (min {float(a.min()):g}): CT must be in "
            "Hounsfield units (air -1000); if it is an MR image, flag it MR")
    if volume.modality is Modality.MR and p1 < -500.0:
        raise RegistrationError(
            f"{role} image is flagged MR but looks like CT in Hounsfield units (1st percentile {p1:.0f}); flag it CT")


def check_modalities(fixed: Volume, moving: Volume, opts: RegistrationOptions) -> str:
    """'same' or 'cross'; RegistrationError when the flags contradict the options."""
    pair = "same" if fixed.modality == moving.modality else "cross"
    if opts.modality_pair != "auto" and opts.modality_pair != pair:
        raise RegistrationError(
            f"modality mismatch: options say '{opts.modality_pair}' modality but fixed is {fixed.modality.value} "
            f"and moving is {moving.modality.value}")
    term = opts.deformable.intensity
    if pair == "cross" and term == "lncc":
        raise RegistrationError(
            f"LNCC compares intensities of the same modality; fixed is {fixed.modality.value}, moving "
            f"{moving.modality.value}: use the 'mind' (or 'auto') intensity term")
    return pair


def _boxes_intersect(a: Volume, b: Volume) -> bool:
    ca, cb = a.corners_lps(), b.corners_lps()
    return bool(np.all(np.minimum(ca.max(0), cb.max(0)) > np.maximum(ca.min(0), cb.min(0))))


def _body(volume: Volume, role: str, opts: RegistrationOptions) -> np.ndarray:
    mask = body_mask(volume)
    ml = float(mask.sum()) * float(np.prod(volume.spacing)) / 1000.0
    if ml < opts.min_body_volume_ml:
        raise RegistrationError(
            f"{role} image is all background: only {ml:.1f} ml above the body threshold "
            f"(at least {opts.min_body_volume_ml:g} ml needed)")
    return mask


def _default_embedder(device: str) -> EmbeddingSession:
    return EmbeddingSession.open(None, device=device)


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


def _displacement_image(field: torch.Tensor, grid: Grid) -> sitk.Image:
    arr = field[0].permute(1, 2, 3, 0).numpy().astype(np.float64)  # (z, y, x, 3)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetOrigin(grid.origin)
    img.SetSpacing(grid.spacing)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img


def _affine(matrix4: np.ndarray) -> sitk.AffineTransform:
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in matrix4[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in matrix4[:3, 3]))
    return t


def preflight(fixed: Volume, moving: Volume, options: Optional[RegistrationOptions] = None) -> str:
    """All checks that need no model: 3D, usable intensities, modality flags, physical overlap.

    Returns 'same' or 'cross' (modality pair); raises RegistrationError otherwise.
    """
    opts = options or RegistrationOptions()
    check_volume(fixed, "fixed")
    check_volume(moving, "moving")
    pair = check_modalities(fixed, moving, opts)
    # a cheap 4 mm look at each image: refuse all-background inputs before any embedding
    _body(resample_to_model_grid(fixed, 4.0, antialias=False), "fixed", opts)
    _body(resample_to_model_grid(moving, 4.0, antialias=False), "moving", opts)
    if opts.require_physical_overlap and not _boxes_intersect(fixed, moving):
        raise RegistrationError(
            "the fixed and moving images do not overlap physically (their scanner-coordinate boxes are disjoint); "
            "if they come from different scanners or patients and should be matched anatomically anyway, "
            "disable the check (require_physical_overlap=False, CLI --ignore-physical-overlap)")
    return pair


def _match_and_fit(emb_f, emb_m, mask_f, mask_m, mode: str, opts: RegistrationOptions):
    """Stable matches and the robust linear fit; RegistrationError when they cannot support it."""
    t0 = time.perf_counter()
    pairs = registration_matches(emb_f, emb_m, mask_f, mask_m, spacing_mm=opts.grid_spacing_mm,
                                 max_points=opts.max_query_points, passes=opts.stable_passes,
                                 min_score=opts.min_score, mask_margin_mm=opts.mask_margin_mm,
                                 query_side=opts.query_side, subvoxel=opts.subvoxel, min_points=opts.min_inliers)
    t1 = time.perf_counter()
    fit = robust_fit(pairs.fixed, pairs.moving, mode, threshold_mm=opts.inlier_threshold_mm,
                     min_inliers=opts.min_inliers, iterations=opts.ransac_iterations, scores=pairs.scores,
                     max_scale=opts.max_scale, affine_min_spread_mm=opts.affine_min_spread_mm, seed=opts.seed)
    t2 = time.perf_counter()
    pairs.report["seconds"] = {"matching_s": round(t1 - t0, 3), "linear_fit_s": round(t2 - t1, 3)}
    return pairs, fit


# --- the pipeline --------------------------------------------------------------------------------
def register(fixed: Volume, moving: Volume, mode: str = "affine", deformable: bool = False, coarse: bool = False,
             embedder=None, options: Optional[RegistrationOptions] = None, progress: Progress = None) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``; returns transforms mapping FIXED LPS points to MOVING points.

    ``mode``: 'rigid' (same patient, e.g. CT-MRI; Arun SVD) or 'affine' (least squares).
    ``coarse``: add a SAM-coarse control-grid displacement; ``deformable``: add the diffeomorphic
    instance optimisation (after cropping to the common field of view). ``embedder``: a
    samv2core.embed.Embedder (default: the bundled model). Raises RegistrationError with a
    one-line reason whenever the result could not be trusted.
    """
    opts = options or RegistrationOptions()
    report_progress = progress or (lambda f, m: None)
    if mode not in MODES:
        raise RegistrationError(f"unknown registration mode {mode!r}: use 'rigid' or 'affine'")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}
    warnings: list[str] = []

    def lap(name: str, t0: float) -> float:
        now = time.perf_counter()
        timing[name] = round(now - t0, 3)
        return now

    # 1. checks ----------------------------------------------------------------------------
    pair = preflight(fixed, moving, opts)
    t = time.perf_counter()

    # 2. embeddings -----------------------------------------------------------------------
    if opts.features == "mind":
        embedder = MindEmbedder()
    elif embedder is None:
        try:
            embedder = _default_embedder(opts.device)
        except SAMv2Error as exc:
            raise RegistrationError(f"no embedding model available: {exc}") from None
    report_progress(0.02, "embedding the fixed image")
    emb_f = embedder.embed(fixed, progress=lambda f, m: report_progress(0.02 + 0.28 * f, f"fixed: {m}"))
    report_progress(0.30, "embedding the moving image")
    emb_m = embedder.embed(moving, progress=lambda f, m: report_progress(0.30 + 0.28 * f, f"moving: {m}"))
    t = lap("embedding_s", t)
    mv_f, mv_m = emb_f.model_volume, emb_m.model_volume
    mask_f, mask_m = _body(mv_f, "fixed", opts), _body(mv_m, "moving", opts)

    # 3-4. stable matches and the linear fit ----------------------------------------------
    report_progress(0.60, "stable matching")
    features = "mind-ssc" if opts.features == "mind" else "sam"
    try:
        pairs, fit = _match_and_fit(emb_f, emb_m, mask_f, mask_m, mode, opts)
    except RegistrationError as exc:
        if not (opts.features == "auto" and pair == "cross"):
            raise
        # a model not trained across modalities: retry on modality-independent descriptors
        warnings.append(f"SAM embeddings: {exc}; used training-free MIND-SSC descriptors instead")
        report_progress(0.62, "SAM matches disagree across modalities: MIND-SSC descriptors")
        t_mind = time.perf_counter()
        mind = MindEmbedder()
        emb_f, emb_m = mind.embed(fixed), mind.embed(moving)
        timing["mind_descriptors_s"] = round(time.perf_counter() - t_mind, 3)
        features = "mind-ssc (cross-modality fallback)"
        try:
            pairs, fit = _match_and_fit(emb_f, emb_m, mask_f, mask_m, mode, opts)
        except RegistrationError as again:
            raise RegistrationError(f"{again} (MIND-SSC descriptors; SAM embeddings failed too: {exc})") from None
    fixed_pts, moving_pts, match_report = pairs.fixed, pairs.moving, pairs.report
    timing.update(pairs.report.pop("seconds"))
    t = time.perf_counter()
    lin4 = fit.homogeneous()
    fov = overlap_crop(fixed, moving, lin4, opts.fov_margin_mm)  # raises when nothing overlaps
    refine_stats = None
    if opts.refine:
        report_progress(0.70, f"intensity refinement of the {mode} fit ({fit.n_inliers} inliers)")
        # the term follows the deformable option when that names one, else LNCC / MIND by modality
        term = opts.deformable.intensity if opts.deformable.intensity in ("lncc", "mind") else "auto"
        try:
            lo, hi = _valid_box(mv_f, mask_f, fov)
            lin4, refine_stats = refine_linear(
                _crop_embedded(mv_f, mask_f, lo - 8.0, hi + 8.0, None),
                _crop_embedded(mv_m, mask_m, fov.moving_lo, fov.moving_hi, None), lin4, mode, lo, hi, term,
                opts.refine_options)
        except (ValueError, RegistrationError) as exc:  # too little overlap to refine: the SAM fit stands
            refine_stats = {"accepted": False, "reason": f"skipped: {exc}"}
        if not refine_stats["accepted"]:
            warnings.append(f"intensity refinement not applied: {refine_stats['reason']}")
        fov = overlap_crop(fixed, moving, lin4, opts.fov_margin_mm)
        t = lap("refine_s", t)
    linear = _affine(lin4)

    report = {"mode": mode, "coarse": bool(coarse), "deformable": bool(deformable), "modality_pair": pair,
              "fixed": {"name": fixed.name, "modality": fixed.modality.value, "size_xyz": list(fixed.size_xyz),
                        "spacing_mm": list(fixed.spacing)},
              "moving": {"name": moving.name, "modality": moving.modality.value, "size_xyz": list(moving.size_xyz),
                         "spacing_mm": list(moving.spacing)},
              "model_id": getattr(embedder, "model_id", None), "features": features,
              "convention": "fixed LPS -> moving LPS (ITK)",
              "matches": match_report, "linear": fit.report(), "field_of_view": fov.report(),
              "inliers": fit.n_inliers, "residual_mm_median": fit.report()["residual_mm_inliers"]["median"]}
    if "warning" in fit.stats:
        warnings.append(fit.stats["warning"])
    if refine_stats is not None:
        report["linear_refinement"] = refine_stats
        report["linear_matrix"] = lin4.tolist()  # 'linear' above describes the SAM fit before refinement

    # 5. nonlinear stages ----------------------------------------------------------------------
    displacement_img = None
    if coarse or deformable:
        valid_lo, valid_hi = _valid_box(mv_f, mask_f, fov)
        dopt = opts.deformable
        dom_lo, dom_hi = valid_lo - dopt.taper_mm, valid_hi + dopt.taper_mm
        field_grid = Grid.covering(dom_lo, dom_hi, dopt.field_spacing_mm)
        init = None
        if coarse:
            report_progress(0.75, "SAM-coarse field")
            inv = np.linalg.inv(lin4)
            target = moving_pts @ inv[:3, :3].T + inv[:3, 3]
            near = fit.residuals_mm < opts.coarse_max_residual_mm
            cf = fit_coarse_field(fixed_pts[near], target[near], dom_lo, dom_hi, opts.coarse_spacing_mm,
                                  opts.coarse_smoothness, irls_iterations=10, tukey_sigmas=opts.coarse_tukey_sigmas)
            coarse_disp = cf.resample(field_grid) * taper_window(field_grid, dopt.taper_mm)
            report["coarse_field"] = cf.stats

            def coarse_at(p, _d=coarse_disp, _g=field_grid):
                return sample(_d.to(p.device), _g, p)[0].T[None]
            init = coarse_at
            t = lap("coarse_s", t)
            total = coarse_disp
        if deformable:
            report_progress(0.80, "deformable refinement")
            resolve_intensity_term(dopt.intensity, fixed.modality.value, moving.modality.value)
            d_fixed = _crop_embedded(mv_f, mask_f, dom_lo - 8.0, dom_hi + 8.0, emb_f)
            d_moving = _crop_embedded(mv_m, mask_m, fov.moving_lo, fov.moving_hi, emb_m)
            try:
                res = refine_deformable(d_fixed, d_moving, lin4, valid_lo, valid_hi, init, dopt,
                                        progress=lambda f, m: report_progress(0.80 + 0.17 * f, m))
            except ValueError as exc:
                raise RegistrationError(f"deformable refinement impossible: {exc}") from None
            report["deformable_refinement"] = res.stats
            field_grid, total = res.grid, res.displacement
            t = lap("deformable_s", t)
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
        displacement_img = _displacement_image(total, field_grid)

    composite = sitk.CompositeTransform(3)
    composite.AddTransform(linear)
    if displacement_img is not None:
        # sitk copies the image into the transform; keep our own copy for the result
        composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(displacement_img)))
    timing["total_s"] = round(time.perf_counter() - t_start, 3)
    report["timing"] = timing
    report["settings"] = opts.to_dict()
    report["warnings"] = warnings
    report_progress(1.0, "registration done")
    return RegistrationResult(linear, displacement_img, composite, report)
