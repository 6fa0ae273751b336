"""``samv2 register``: arguments and runner (wired into samv2core.cli by one line).

    samv2 register --fixed F --moving M --mode rigid|affine [--coarse] [--deformable] --out DIR

Exit status 0 on success; any refusal (no overlap, background image, too few matches,
modality mismatch, 2D input...) prints one line to stderr and returns 2, writing nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..cli_options import add_model_arguments, session_from_args
from ..errors import SAMv2Error
from ..figures import figures_available, registration_figure
from ..outputs import check_outputs
from ..progress import progress_bar
from ..volume import load_volume
from .deformable import DeformableOptions
from .io import OUTPUT_FILES, resample_moving, write_registration
from .options import FEATURES, MODALITY_PAIRS, RegistrationOptions
from .pair_cli import add_label_report, add_pair_arguments, read_label_args, register_pair
from .pipeline import register
from .preflight import preflight
from .views import INTENSITY_TERMS


def add_register_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``register`` sub-command's arguments to ``parser`` (defaults: RegistrationOptions)."""
    d, dd = RegistrationOptions(), DeformableOptions()
    parser.add_argument("--fixed", required=True, help="fixed (reference) image: NIfTI / NRRD / MHA / DICOM folder")
    parser.add_argument("--moving", required=True, help="moving image, registered onto the fixed one")
    parser.add_argument("--mode", default="affine", choices=["rigid", "affine"],
                        help="linear model: rigid (same patient, e.g. CT-MRI) or affine (default)")
    parser.add_argument("--no-refine", action="store_true",
                        help="skip the intensity refinement (LNCC / MIND-SSC) of the linear transform: pure SAM fit")
    parser.add_argument("--coarse", action="store_true", help="add the SAM-coarse control-grid displacement")
    parser.add_argument("--deformable", action="store_true",
                        help="add the diffeomorphic deformable refinement (instance optimisation)")
    parser.add_argument("--out", required=True, help="output folder (transforms, resampled image, report.json)")
    parser.add_argument("--fixed-modality", default="auto", help="CT, MR or auto (DICOM tag / intensities)")
    parser.add_argument("--moving-modality", default="auto", help="CT, MR or auto")
    parser.add_argument("--modality-pair", default=d.modality_pair, choices=list(MODALITY_PAIRS),
                        help="declare 'same' or 'cross' modality: refuse if the images disagree")
    parser.add_argument("--features", default=d.features, choices=list(FEATURES),
                        help="descriptors to match: sam (the model), mind (training-free MIND-SSC), auto (SAM; "
                             "a CT-MRI pair whose SAM matches disagree is retried with MIND-SSC, said in the report)")
    parser.add_argument("--min-score", type=float, default=d.min_score,
                        help=f"similarity threshold of a match ({d.min_score:g})")
    parser.add_argument("--grid-spacing", type=float, default=d.grid_spacing_mm,
                        help=f"query point spacing in mm ({d.grid_spacing_mm:g})")
    parser.add_argument("--min-inliers", type=int, default=d.min_inliers,
                        help=f"refuse with fewer inlier matches ({d.min_inliers})")
    parser.add_argument("--inlier-threshold", type=float, default=d.inlier_threshold_mm,
                        help=f"inlier distance in mm ({d.inlier_threshold_mm:g})")
    parser.add_argument("--fov-margin", type=float, default=d.fov_margin_mm,
                        help=f"margin of the field-of-view crop, mm ({d.fov_margin_mm:g})")
    parser.add_argument("--intensity-term", default=dd.intensity, choices=list(INTENSITY_TERMS),
                        help="refinement / verification / deformable intensity term: auto (LNCC same modality, MIND "
                             "cross; two MRs: LNCC, or MIND-SSC when only that verifies), lncc, mind, none")
    parser.add_argument("--no-embedding-term", action="store_true",
                        help="deformable step without the embedding cosine (intensity term only)")
    parser.add_argument("--smoothness", type=float, default=dd.smoothness,
                        help=f"deformable regularisation weight ({dd.smoothness:g})")
    parser.add_argument("--ignore-physical-overlap", action="store_true",
                        help=f"register images whose scanner-coordinate boxes are more than {d.physical_gap_mm:g} mm "
                             "apart (different scanners or patients)")
    add_pair_arguments(parser)
    parser.add_argument("--series", action="append", metavar="UID",
                        help="the DICOM series (UID) to read when a folder holds several (repeat for the other image)")
    add_model_arguments(parser)
    parser.add_argument("--seed", type=int, default=d.seed,
                        help=f"seed of the random sampling (matches, RANSAC, deformable step); same seed, same result "
                             f"({d.seed})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def options_from_args(args) -> RegistrationOptions:
    """RegistrationOptions from parsed ``register`` arguments."""
    dopt = DeformableOptions(intensity=args.intensity_term, device=args.device, seed=args.seed,
                             smoothness=float(args.smoothness),
                             embedding_weight=0.0 if args.no_embedding_term else DeformableOptions().embedding_weight)
    return RegistrationOptions(refine=not args.no_refine, features=args.features,
                               grid_spacing_mm=args.grid_spacing, min_score=args.min_score, min_inliers=args.min_inliers, inlier_threshold_mm=args.inlier_threshold,
                               fov_margin_mm=args.fov_margin, modality_pair=args.modality_pair,
                               require_physical_overlap=not args.ignore_physical_overlap, deformable=dopt,
                               device=args.device, seed=args.seed)


def write_overlay(result, fixed, moving, out_dir) -> dict:
    """``overlay.png`` (before/after colour fusion, three planes) when matplotlib is installed."""
    if not figures_available():
        print("samv2 register: note: overlay.png skipped (pip install 'samv2core[figures]')", file=sys.stderr)
        return {}
    return {"overlay": registration_figure(fixed, moving, resample_moving(result, fixed, moving),
                                           Path(out_dir) / "overlay.png")}


def _verified(ver) -> bool:
    if not ver:
        return False
    chosen = (ver.get("candidates") or {}).get(ver.get("chosen"), ver)
    return bool(chosen.get("passed", False))


def _verification_text(ver) -> str:
    """What the verification said, in one line for the summary."""
    if not ver:
        return "not verified (no image-similarity check ran for this result)"
    chosen = (ver.get("candidates") or {}).get(ver.get("chosen"), ver)
    if _verified(ver):
        sim = chosen.get("similarity")
        best = chosen.get("best_perturbed_similarity")
        detail = f" ({ver.get('term', '')} {sim} at the result vs at most {best} when moved)" if sim is not None else ""
        return f"verified: {ver.get('summary') or 'the result sits at an image-similarity optimum'}{detail}"
    return f"NOT verified: {chosen.get('reason') or ver.get('summary') or 'the image-similarity check failed'}"


def run_register(args, embedder=None) -> int:
    """Run ``samv2 register``; returns the exit status (0 ok, 2 refused / failed).

    ``embedder`` (optional) replaces the model given by ``--model`` / the bundled one.
    """
    try:
        # before any work: --out must be a folder that can be written and holds no input
        check_outputs([], [args.fixed, args.moving, args.model, getattr(args, "fixed_labels", None),
                           getattr(args, "moving_labels", None)], [(args.out, OUTPUT_FILES)])
        options = options_from_args(args)
        fixed = load_volume(args.fixed, args.fixed_modality, series=args.series)
        moving = load_volume(args.moving, args.moving_modality, series=args.series)
        labels = read_label_args(args)
        inter = getattr(args, "pair", "same-patient") == "inter-patient"
        checked = None if inter else preflight(fixed, moving, options)  # refuse bad inputs before loading a model
        if inter:
            label = "mind-ssc (training-free, inter-patient)"
        elif embedder is None and options.features == "mind":
            label = "mind-ssc (training-free)"
        elif embedder is None:
            embedder = session_from_args(args)
            label = embedder.label
        else:
            label = getattr(embedder, "model_id", type(embedder).__name__)
        with progress_bar("register", quiet=args.quiet) as update:
            if inter:
                result = register_pair(args, fixed, moving, update)
            else:
                result = register(fixed, moving, mode=args.mode, deformable=args.deformable, coarse=args.coarse,
                                  embedder=embedder, options=options, progress=update, checked=checked)
        result.report["model"] = label
        warped = add_label_report(result, labels, fixed, moving)
        paths = write_registration(result, fixed, moving, args.out,
                                   None if warped is None else {"moving_labels_warped.nii.gz": warped})
        paths.update(write_overlay(result, fixed, moving, args.out))
    except SAMv2Error as exc:
        hint = ("; two different people? --pair inter-patient"
                if "overlap physically" in str(exc) and getattr(args, "pair", "") != "inter-patient" else "")
        print(f"samv2 register: error: {exc}{hint}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid option values
        print(f"samv2 register: error: {exc}", file=sys.stderr)
        return 2
    rep = result.report
    summary = {"out": str(args.out), "files": {k: str(v) for k, v in paths.items()}, "mode": rep["mode"],
               "inliers": rep["linear"]["inliers"], "matches": rep["linear"]["matches"],
               "verified": _verified(rep.get("verification")),
               "verification": _verification_text(rep.get("verification")),
               "residual_mm_median": rep["linear"]["residual_mm_inliers"]["median"],
               "residual_mm_median_is": "the median distance between the inlier matches' points on the moving image "
                                        "and where the linear fit puts them: how well the matches agree with one map, "
                                        "not the registration's accuracy",
               "folding_percent": rep.get("folding_percent"), "timing": rep["timing"], "model": label,
               "features": rep["features"], "warnings": rep["warnings"], "pair": rep.get("pair", "same-patient")}
    if "labels" in rep:
        summary["dice_mean"] = rep["labels"]["dice"]["mean"]
    print(json.dumps(summary, indent=2))
    return 0
