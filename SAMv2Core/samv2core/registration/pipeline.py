"""register(): the SAME++ / CrossSAM pipeline on two volumes, as named stages in sequence.

1. ``preflight`` (preflight.py): 3D, not all background, modality flags, physical overlap, and
   the body masks on the 2 mm model grid, computed once and reused by every later stage;
2-4. the linear result, from the policy (policy.py) that runs and judges the stages of
   stages.py: embeddings or MIND-SSC descriptors (``embed_pair`` / ``mind_pair``), stable
   matches and the robust SAM-rigid / SAM-affine fit (``match_and_fit``), its intensity
   refinement (``refine_stage``), and, by default, its verification against the images
   (verify.py) and for inverse consistency, with the descriptor fallback;
5. ``nonlinear_stage``: crop to the common field of view -> optional SAM-coarse field and
   optional deformable instance optimisation;
6. ITK transforms (fixed -> moving) and a report with residuals, Jacobian statistics, timings.

Anything that cannot support a transform raises RegistrationError; nothing partial is returned.
"""
from __future__ import annotations

import time
from typing import Optional

import SimpleITK as sitk

from ..affine import sitk_affine
from ..errors import RegistrationError
from ..fitting import MODES
from ..progress import Progress
from ..volume import Volume
from .options import RegistrationOptions
from .policy import LinearPolicy, policy_for
from .preflight import CheckedPair, preflight
from .result import RegistrationResult
from .stages import load_embedder, nonlinear_stage, quiet


def register(fixed: Volume, moving: Volume, mode: str = "affine", deformable: bool = False, coarse: bool = False,
             embedder=None, options: Optional[RegistrationOptions] = None, progress: Progress = None,
             checked: Optional[CheckedPair] = None, policy: Optional[LinearPolicy] = None) -> RegistrationResult:
    """Register ``moving`` onto ``fixed``.

    Args:
        fixed, moving: the two volumes (any direction, spacing, origin; LPS).
        mode: 'rigid' (same patient, e.g. CT-MRI; Arun SVD) or 'affine' (least squares).
        deformable: add the diffeomorphic instance optimisation (after cropping to the common
            field of view); coarse: add a SAM-coarse control-grid displacement.
        embedder: an EmbeddingSession (default: the bundled model, loaded on ``options.device``).
        options: RegistrationOptions (default settings when None).
        progress: callback(fraction, message).
        checked: the result of ``preflight(fixed, moving, options)`` when the caller already ran
            it (not repeated).
        policy: the LinearPolicy that runs and judges stages 2-4 (default: ``policy_for(options)``,
            the verified same-patient policy, or the unverified one when ``options.verify`` is off).

    Returns:
        RegistrationResult: ITK transforms mapping FIXED LPS points (mm) to MOVING LPS points
        (linear, displacement field or None, composite) and the report.

    Raises:
        RegistrationError: a one-line reason whenever the result could not be trusted.
    """
    opts = options or RegistrationOptions()
    report_progress = progress or quiet
    if mode not in MODES:
        raise RegistrationError(f"unknown registration mode {mode!r}: use 'rigid' or 'affine'")
    t_start = time.perf_counter()
    timing: dict[str, float] = {}

    # 1. checks and body masks (once)
    if checked is None or not checked.is_for(fixed, moving):
        checked = preflight(fixed, moving, opts)

    # 2-4. descriptors, linear candidates, refinement (and verification): the policy's stages
    if opts.features != "mind" and embedder is None:
        embedder = load_embedder(opts.device)
    outcome = (policy or policy_for(opts)).linear(checked, embedder, mode, opts, report_progress, timing)
    linear, refined = outcome.linear, outcome.refined
    lin4, fit = refined.matrix, linear.fit
    report = {"mode": mode, "coarse": bool(coarse), "deformable": bool(deformable),
              "modality_pair": checked.modality_pair,
              "fixed": {"name": fixed.name, "modality": fixed.modality.value, "size_xyz": list(fixed.size_xyz),
                        "spacing_mm": list(fixed.spacing)},
              "moving": {"name": moving.name, "modality": moving.modality.value, "size_xyz": list(moving.size_xyz),
                         "spacing_mm": list(moving.spacing)},
              "model_id": outcome.model_id, "features": linear.embedded.features,
              "convention": "fixed LPS -> moving LPS (ITK)",
              "matches": linear.pairs.report, "linear": fit.report(), "field_of_view": refined.fov.report(),
              "inliers": fit.n_inliers, "residual_mm_median": fit.report()["residual_mm_inliers"]["median"]}
    if refined.stats is not None:
        report["linear_refinement"] = refined.stats
        report["linear_matrix"] = lin4.tolist()  # 'linear' above describes the SAM fit before refinement
    if outcome.report is not None:
        report["verification"] = outcome.report

    # 5. nonlinear stages
    nonlinear = nonlinear_stage(checked, linear, refined, coarse, deformable, opts, report_progress, timing,
                                outcome.term)
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
    report["warnings"] = (gap_warning + outcome.warnings + linear.warnings
                          + refined.warnings + nonlinear.warnings)
    report_progress(1.0, "registration done")
    return RegistrationResult(linear_tf, nonlinear.displacement, composite, report)
