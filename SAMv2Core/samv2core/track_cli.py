"""``samv2 track``: follow-up reading of every lesion at once, over one or more follow-ups
(baseline -> follow-up 1 -> follow-up 2 ...), written as JSON, CSV and one DICOM SR per follow-up."""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from .cli_options import add_model_arguments, embed_with_progress, session_from_args
from .errors import InputError, SAMv2Error
from .lesion_tracking import lesions_from_label_map, lesions_from_points, track_timepoints
from .markups import parse_inline, read_points
from .matching import MatchOptions
from .outputs import OutputSet, check_outputs
from .tracking_files import write_tracking_outputs
from .tracking_sr import image_context
from .volume import load_volume


def add_track_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``samv2 track``: the scans, the baseline lesions, candidate regions, the outputs."""
    p.add_argument("--baseline", required=True, help="the baseline image (file or DICOM folder)")
    p.add_argument("--followup", required=True, nargs="+", help="one or more follow-up images, in time order")
    lesion = p.add_argument_group("the baseline lesions: --lesions, or --point / --points (optionally --radius-mm)")
    lesion.add_argument("--lesions", metavar="MAP", help="label map on the baseline: one lesion per label value "
                                                         "(a one-valued map: one per connected region)")
    lesion.add_argument("--point", action="append", help="a lesion centre x,y,z in --coords (repeat per lesion)")
    lesion.add_argument("--points", help="Slicer .mrk.json or CSV x,y,z[,label]: one lesion per point")
    lesion.add_argument("--coords", choices=["LPS", "RAS", "lps", "ras"],
                        help="coordinate system of --point / a CSV and of the outputs (default LPS)")
    lesion.add_argument("--radius-mm", type=float, help="lesion radius (with points): lets the reading check that "
                                                        "the lesion is still there")
    p.add_argument("--candidates", nargs="+", metavar="MAP",
                   help="per follow-up, a label map of candidate findings on it (or '-' for none): regions with no "
                        "baseline partner are listed as new")
    p.add_argument("--method", default="refined", choices=["refined", "fixed_point", "nn"])
    p.add_argument("--min-score", type=float, default=MatchOptions().min_score)
    p.add_argument("--modality", default="auto", help="CT, MR or auto")
    p.add_argument("--out", help="the JSON document (default: stdout)")
    p.add_argument("--out-csv", help="one row per lesion and follow-up")
    p.add_argument("--out-sr", nargs="+", help="per follow-up, a DICOM SR TID 1500 Measurement Report (.dcm)")
    add_model_arguments(p)


def _lesions(args) -> tuple[list, str]:
    given = [n for n, v in (("--lesions", args.lesions), ("--point", args.point), ("--points", args.points)) if v]
    if len(given) != 1:
        raise InputError("give the baseline lesions as one of --lesions, --point or --points"
                         + (f", not {' and '.join(given)}" if given else ""))
    system = (args.coords or "LPS").upper()
    if args.lesions:
        if args.radius_mm is not None:
            raise InputError("--radius-mm is for point lesions; --lesions keeps each segment's shape")
        return lesions_from_label_map(load_volume(args.lesions, "MR")), system
    if args.point:
        if not args.coords:
            raise InputError("--point needs --coords LPS or RAS (say which system the coordinates are in)")
        return lesions_from_points(np.array([parse_inline(p, system) for p in args.point]), args.radius_mm), system
    pts = read_points(args.points, system)
    names = [lab or f"lesion {n + 1}" for n, lab in enumerate(pts.labels)]
    if len(set(names)) != len(names):
        raise InputError(f"{args.points}: two points share one label; lesions need distinct names")
    return lesions_from_points(pts.lps, args.radius_mm, names), system


def cmd_track(args) -> int:
    n = len(args.followup)
    if args.candidates and len(args.candidates) != n:
        raise InputError(f"--candidates needs one map (or '-') per follow-up: {n} follow-ups, "
                         f"{len(args.candidates)} maps")
    if args.out_sr and len(args.out_sr) != n:
        raise InputError(f"--out-sr needs one file per follow-up: {n} follow-ups, {len(args.out_sr)} files")
    if args.radius_mm is not None and not (np.isfinite(args.radius_mm) and args.radius_mm > 0):
        raise InputError(f"--radius-mm must be a positive number of mm, got {args.radius_mm}")
    cands = [None if c in (None, "-") else c for c in (args.candidates or [None] * n)]
    check_outputs([args.out, args.out_csv, *(args.out_sr or [])],
                  [args.baseline, *args.followup, args.lesions, args.points, *[c for c in cands if c], args.model])
    lesions, system = _lesions(args)
    base = load_volume(args.baseline, args.modality)
    follows = [load_volume(f, args.modality) for f in args.followup]
    cand_maps = [None if c is None else load_volume(c, "MR") for c in cands]
    session = session_from_args(args)
    t0 = time.perf_counter()
    e_base = embed_with_progress(session, base)
    steps = [(embed_with_progress(session, f), f, c) for f, c in zip(follows, cand_maps)]
    results = track_timepoints(e_base, base, steps, lesions, method=args.method,
                               options=MatchOptions(min_score=args.min_score))
    contexts = [image_context(f) for f in follows]
    extra = {"baseline": str(args.baseline), "followups": [str(f) for f in args.followup],
             "embedding_model": session.label, "method": args.method, "seconds": round(time.perf_counter() - t0, 3)}
    try:
        with OutputSet() as files:  # JSON, CSV and SRs: all written or none
            doc = write_tracking_outputs(files, results, contexts, json_out=args.out, csv_out=args.out_csv,
                                         sr_outs=args.out_sr or (), system=system, extra=extra)
    except OSError as exc:
        raise SAMv2Error(f"could not write the outputs: {exc}") from None
    if not args.out:
        print(json.dumps(doc, indent=2))
    return 0
