"""The ``samv2`` command: embed, match, propagate, track, register, info, convert-checkpoint, demo."""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Optional

import numpy as np

from .batch import add_batch_arguments, run_batch
from .checked_tensors import save_checked
from .cli_options import add_model_arguments, embed_with_progress, session_from_args
from .demo import run_demo
from .errors import InputError, OneLineParser, SAMv2Error, run_cli
from .info import add_info_arguments, run_info
from .figures import figures_available, pictures_from_matches, write_match_figures
from .lesion_files import read_lesion_mask, write_lesion_outputs
from .markups import parse_inline, read_points, write_csv, write_markups
from .matching import MatchOptions, match_points
from .pair_registration import REGISTRATION
from .model_io import card_path_for, convert_official_checkpoint
from .outputs import OutputSet, check_outputs, json_text
from .propagate import propagate_lesion
from .registration.cli import add_register_arguments, run_register
from .registration.interpatient_match import match_across_patients
from .track_cli import add_track_arguments, cmd_track
from .volume import load_volume


# --- embed ------------------------------------------------------------------------------------
def cmd_embed(args) -> int:
    check_outputs([args.out], [args.image, args.model])
    if args.out and args.cache_dir and _inside(args.out, args.cache_dir):
        raise SAMv2Error(f"{args.out}: --out is inside the embedding cache folder {args.cache_dir}, whose entries the "
                         "cache manages; write it elsewhere")
    vol = load_volume(args.image, args.modality, series=args.series)
    session = session_from_args(args)
    t0 = time.perf_counter()
    emb = embed_with_progress(session, vol)
    dt = time.perf_counter() - t0
    summary = {"image": str(args.image), "model": session.label, "device": str(session.device),
               "seconds": round(dt, 3), "fine_shape": list(emb.fine.shape), "coarse_shape": list(emb.coarse.shape),
               "semantic": emb.semantic is not None, "fine_grid_spacing_mm": list(emb.fine_grid.spacing)}
    if args.out:
        tensors = {"fine": emb.fine.contiguous(), "coarse": emb.coarse.contiguous()}
        if emb.semantic is not None:
            tensors["semantic"] = emb.semantic.contiguous()
        save_checked(args.out, tensors, {"fine_grid": json.dumps(emb.fine_grid.__dict__),
                                         "coarse_grid": json.dumps(emb.coarse_grid.__dict__),
                                         "coordinate_system": "LPS", "model": session.label})
        summary["out"] = args.out
    print(json.dumps(summary, indent=2))
    return 0


def _inside(path, folder) -> bool:
    try:
        Path(os.path.abspath(path)).relative_to(os.path.abspath(folder))
        return True
    except ValueError:
        return False


# --- match ------------------------------------------------------------------------------------
def _gather_points(args):
    system = args.coords.upper()
    pts, labels, out_system = [], [], system
    for n, text in enumerate(args.point or []):
        pts.append(parse_inline(text, system))
        labels.append(f"P{n + 1}")
    if args.points:
        pl = read_points(args.points, system)
        pts.extend(pl.lps)
        labels.extend(pl.labels)
        if args.points.endswith(".json"):
            out_system = pl.source_system
    if not pts:
        raise SAMv2Error("no points given: use --point x,y,z and/or --points file.csv|file.mrk.json")
    return np.array(pts), labels, out_system


def match_volumes(template_path, query_path, points_lps, labels, args, session=None):
    """Run a match job; returns (results, report dict). Shared by the CLI and the demo."""
    series = getattr(args, "series", None)
    template = load_volume(template_path, args.modality, series=series) \
        if not hasattr(template_path, "array") else template_path
    query = load_volume(query_path, args.query_modality or args.modality, series=series) \
        if not hasattr(query_path, "array") else query_path
    if session is None:
        session = session_from_args(args)
    t0 = time.perf_counter()
    te = embed_with_progress(session, template)
    qe = embed_with_progress(session, query)
    t1 = time.perf_counter()
    opts = MatchOptions(min_score=args.min_score)
    results = match_points(te, qe, points_lps, method=args.method, options=opts, registration=REGISTRATION)
    t2 = time.perf_counter()
    return results, {"embed_seconds": round(t1 - t0, 3), "match_seconds": round(t2 - t1, 4)}


def _match_inter_patient(args, template, query, pts):
    """``samv2 match --pair inter-patient``: the points sent through the verified inter-patient
    registration (registration/interpatient_match.py); returns (results, timing, model label)."""
    if args.figure:
        raise InputError("--figure is not available with --pair inter-patient")
    series = getattr(args, "series", None)
    if not hasattr(template, "array"):
        template = load_volume(template, args.modality, series=series)
    if not hasattr(query, "array"):
        query = load_volume(query, args.query_modality or args.modality, series=series)
    t0 = time.perf_counter()
    results, report = match_across_patients(template, query, pts)
    timing = {"registration_seconds": round(time.perf_counter() - t0, 3), "pair": "inter-patient",
              "registration_verification": report["forward"]["verification"]["checks"]}
    return results, timing, "mind-ssc (training-free, inter-patient registration)"


def cmd_match(args) -> int:
    check_outputs([args.out, args.out_markups, args.out_csv],
                  [args.template, args.query, args.points, args.model],
                  folder_outputs=[(args.figure, ["overview.png"])] if args.figure else ())
    pts, labels, out_system = _gather_points(args)
    template, query = args.template, args.query
    if args.figure:
        if not figures_available():
            raise SAMv2Error("--figure needs matplotlib: pip install 'samv2core[figures]'")
        template = load_volume(args.template, args.modality, series=args.series)
        query = load_volume(args.query, args.query_modality or args.modality, series=args.series)
    if getattr(args, "pair", "same-patient") == "inter-patient":
        results, timing, model_label = _match_inter_patient(args, template, query, pts)
    else:
        session = session_from_args(args)
        results, timing = match_volumes(template, query, pts, labels, args, session)
        model_label = session.label
    doc = {"template": str(args.template), "query": str(args.query), "model": model_label,
           "method": args.method, "coordinate_system": out_system, **timing,
           "matches": [dict(label=l, **r.to_dict(out_system)) for l, r in zip(labels, results)]}
    text = json_text(doc)
    points = np.array([r.query_point.xyz for r in results])
    notes = [f"score {r.score:.3f}" + ("" if r.confident else f"; NOT CONFIDENT: {r.reason}") for r in results]
    rows = [_csv_row(l, r, out_system) for l, r in zip(labels, results)]
    try:
        with OutputSet() as files:  # JSON, point list and CSV: all written or none
            if args.out:
                files.write_text(args.out, text)
            if args.out_markups:
                write_markups(files.stage(args.out_markups), points, labels, out_system, notes,
                              [r.confident for r in results])
            if args.out_csv:
                write_csv(files.stage(args.out_csv), rows)
    except OSError as exc:
        raise SAMv2Error(f"could not write the outputs: {exc}") from None
    if not args.out:
        print(text)
    written = [p for p in (args.out, args.out_markups, args.out_csv) if p]
    if written:
        print(f"wrote {', '.join(map(str, written))}", file=sys.stderr)
    if args.figure:
        folder = Path(args.figure)
        earlier = [p.name for p in folder.glob("[0-9][0-9]_*.png")] if folder.is_dir() else []
        # the pictures of one run replace those of the previous run as a whole (a folder swap)
        with OutputSet(folder=folder, replaces=earlier) as pictures:
            # (no room beside the folder: the pictures are written one by one, each atomically)
            stage = pictures.stage(folder / "overview.png").parent if pictures.folder is not None else folder
            paths = write_match_figures(stage, template, query, pictures_from_matches(labels, results))
        print(f"wrote {len(paths)} pictures to {args.figure}", file=sys.stderr)
    return 0


def _csv_row(label: str, r, system: str) -> dict:
    """One CSV row: the answer on the query, the template point it answers, and why."""
    q, t = r.query_point.to(system).xyz, r.template_point.to(system).xyz
    score = r.score if np.isfinite(r.score) else float("nan")
    return {"label": label, "x": q[0], "y": q[1], "z": q[2], "coordinate_system": system,
            "score": round(score, 4), "confident": r.confident, "answer": r.answer or r.method,
            "reason": r.reason or "", "template_x": t[0], "template_y": t[1], "template_z": t[2]}


# --- propagate --------------------------------------------------------------------------------
def add_propagate_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``samv2 propagate``: the pair, the lesion (point + radius or a label), the outputs."""
    p.add_argument("--baseline", required=True, help="image the lesion is drawn on")
    p.add_argument("--followup", required=True, help="image to carry the lesion onto")
    lesion = p.add_argument_group("the lesion: --point or --points with --radius-mm, or --label")
    lesion.add_argument("--point", help="lesion centre x,y,z in the system named by --coords (required with it)")
    lesion.add_argument("--points", help="Slicer .mrk.json (its own system; the first control point is the centre) "
                                         "or CSV x,y,z[,label] in --coords")
    lesion.add_argument("--coords", choices=["LPS", "RAS", "lps", "ras"],
                        help="coordinate system of --point / a CSV, and of the JSON output (default LPS for a file)")
    lesion.add_argument("--radius-mm", type=float, help="lesion radius in mm (with a point): a ball on the follow-up")
    lesion.add_argument("--label", metavar="MAP", help="label map of the lesion on the baseline (NRRD, NIfTI, MHA)")
    lesion.add_argument("--label-value", type=int, help="the lesion's value in --label (default: its only non-zero value)")
    p.add_argument("--method", default="refined", choices=["refined", "fixed_point", "nn"],
                   help="matching method of the lesion's points (default refined)")
    p.add_argument("--min-score", type=float, default=MatchOptions().min_score,
                   help=f"confidence threshold on the similarity score ({MatchOptions().min_score:g})")
    p.add_argument("--modality", default="auto", help="baseline modality: CT, MR or auto")
    p.add_argument("--followup-modality", help="follow-up modality if different (CT, MR or auto)")
    p.add_argument("--name", help="segment name (default: the label map's or point's name)")
    p.add_argument("--out-label", help="write the lesion on the follow-up grid as a label map (.nrrd, .nii.gz)")
    p.add_argument("--out-seg", help="write the lesion as a Slicer segmentation (.seg.nrrd)")
    p.add_argument("--out", help="write the JSON summary here instead of stdout")
    p.add_argument("--out-label-value", type=int, default=1, help="label value in the outputs (1..255, default 1)")
    add_model_arguments(p)


def _lesion_point(args) -> tuple:
    """(centre LPS (3,), its name, the output system) of ``--point`` / ``--points``."""
    if args.point is not None:
        if not args.coords:
            raise InputError("--point needs --coords LPS or RAS (say which system the coordinates are in)")
        return parse_inline(args.point, args.coords.upper()), "lesion", args.coords.upper()
    points = read_points(args.points, (args.coords or "LPS").upper())
    system = points.source_system if args.points.endswith(".json") else (args.coords or "LPS").upper()
    return points.lps[0], points.labels[0] or "lesion", (args.coords or system).upper()


def cmd_propagate(args) -> int:
    given = [name for name, v in (("--point", args.point), ("--points", args.points), ("--label", args.label)) if v]
    if len(given) != 1:
        raise InputError("give the lesion as one of --point, --points (with --radius-mm) or --label"
                         + (f", not {' and '.join(given)}" if given else ""))
    if args.label and args.radius_mm is not None:
        raise InputError("--radius-mm is for a point lesion; a --label lesion keeps its own shape")
    if not args.label and args.label_value is not None:
        raise InputError("--label-value needs --label")
    if not args.label and args.radius_mm is None:
        raise InputError(f"{given[0]} needs --radius-mm (the lesion radius in mm)")
    if args.radius_mm is not None and not (np.isfinite(args.radius_mm) and args.radius_mm > 0):
        raise InputError(f"--radius-mm must be a positive number of mm, got {args.radius_mm}")
    if not (args.out_label or args.out_seg):
        raise InputError("nothing to write: give --out-label and/or --out-seg")
    if args.out_seg and not str(args.out_seg).lower().endswith(".seg.nrrd"):
        raise InputError(f"--out-seg {args.out_seg}: a Slicer segmentation file must end in .seg.nrrd")
    if not 1 <= args.out_label_value <= 255:
        raise InputError(f"--out-label-value must be 1..255, got {args.out_label_value}")
    check_outputs([args.out_label, args.out_seg, args.out],
                  [args.baseline, args.followup, args.points, args.label, args.model])
    system = (args.coords or "LPS").upper()
    if args.label:
        mask = read_lesion_mask(args.label, args.label_value)
        centre, name, lesion_doc = None, mask.name, {"label_map": str(args.label),
                                                 "label_value": mask.meta["label_value"]}
    else:
        mask = None
        centre, name, system = _lesion_point(args)
        lesion_doc = {"point_lps": [round(float(v), 3) for v in centre], "radius_mm": args.radius_mm}
    base = load_volume(args.baseline, args.modality)
    follow = load_volume(args.followup, args.followup_modality or args.modality)
    session = session_from_args(args)
    t0 = time.perf_counter()
    e_base, e_follow = embed_with_progress(session, base), embed_with_progress(session, follow)
    result = propagate_lesion(e_base, e_follow, follow, centre_lps=centre, radius_mm=args.radius_mm, mask=mask,
                              method=args.method, options=MatchOptions(min_score=args.min_score))
    extra = {"baseline": str(args.baseline), "followup": str(args.followup), "embedding_model": session.label,
             "method": args.method, "lesion": lesion_doc, "seconds": round(time.perf_counter() - t0, 3),
             "outputs": {k: str(v) for k, v in (("label_map", args.out_label), ("segmentation", args.out_seg)) if v}}
    try:
        with OutputSet() as files:  # label map, segmentation and JSON: all written or none
            doc = write_lesion_outputs(files, result, follow, label_out=args.out_label, seg_out=args.out_seg,
                                       json_out=args.out, segment_name=args.name or name,
                                       label_value=args.out_label_value, system=system, extra=extra)
    except OSError as exc:
        raise SAMv2Error(f"could not write the outputs: {exc}") from None
    if not args.out:
        print(json.dumps(doc, indent=2))
    if not result.confident:
        print(f"warning: the lesion centre's match is not confident ({result.centre.reason}): check it",
              file=sys.stderr)
    return 0


# --- convert ----------------------------------------------------------------------------------
def cmd_convert(args) -> int:
    check_outputs([args.dst, card_path_for(args.dst)], [args.src])
    card = convert_official_checkpoint(args.src, args.dst, variant=args.variant)
    print(json.dumps({"written": str(args.dst), "name": card.name, "heads": card.heads,
                      "modality": card.modality, "sha256": card.sha256}, indent=2))
    return 0


# --- demo -------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    return run_demo(args)


# Sub-commands served by packages installed beside the core (optional extras). The core imports
# none of them (its import contract has no exceptions): main() imports the named module by name
# when the sub-command runs and hands it the rest of the command line.
BESIDE_THE_CORE = {
    "view": ("samv2view.cli", "browser view: click on the baseline, see the match on the follow-up "
                              "(package samv2view, the 'view' extra; samv2 view --help)"),
}


def _run_beside_the_core(name: str, argv: list) -> int:
    module_name = BESIDE_THE_CORE[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not module_name.startswith(exc.name):
            raise
        print(f"samv2 {name}: error: the package {exc.name} is not installed: pip install 'samv2core[{name}]'",
              file=sys.stderr)
        return 2
    return module.main(argv)


_SERIES_HELP = "the DICOM series (UID) to read when a folder holds several (else refused)"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="samv2", description="Self-supervised anatomical embeddings (SAMv2) for "
                                "landmark matching and registration. Points are LPS mm unless --coords RAS.")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("embed", help="compute the embeddings of one image")
    e.add_argument("image", help="NIfTI / NRRD / MHA file or DICOM series folder")
    e.add_argument("--modality", default="auto", help="CT, MR or auto")
    e.add_argument("--series", action="append", metavar="UID", help=_SERIES_HELP)
    e.add_argument("--out", help="write the embeddings (.safetensors)")
    add_model_arguments(e)
    e.set_defaults(func=cmd_embed)

    m = sub.add_parser("match", help="find template points on a query image")
    m.add_argument("--template", required=True, help="image the points are placed on")
    m.add_argument("--query", required=True, help="image to find them on")
    m.add_argument("--point", action="append", help="x,y,z (repeatable), in --coords")
    m.add_argument("--points", help="CSV (x,y,z[,label]) in --coords, or a Slicer .mrk.json (its own system)")
    m.add_argument("--coords", default="LPS", choices=["LPS", "RAS", "lps", "ras"],
                   help="coordinate system of --point / CSV input and of the output (default LPS)")
    m.add_argument("--method", default="refined", choices=["refined", "fixed_point", "nn"],
                   help="refined (default): SAM answer made precise by a local registration and checked against it")
    m.add_argument("--min-score", type=float, default=MatchOptions().min_score,
                   help=f"confidence threshold on the similarity score ({MatchOptions().min_score:g})")
    m.add_argument("--modality", default="auto", help="template modality: CT, MR or auto")
    m.add_argument("--query-modality", help="query modality if different (CT, MR or auto)")
    m.add_argument("--series", action="append", metavar="UID", help=_SERIES_HELP + " (repeat for the query)")
    m.add_argument("--out", help="write the JSON result here instead of stdout")
    m.add_argument("--out-markups", help="also write the matched points as a Slicer .mrk.json")
    m.add_argument("--out-csv", help="also write the matched points as CSV")
    m.add_argument("--figure", metavar="DIR", help="also write a PNG per point and overview.png here (needs matplotlib)")
    m.add_argument("--pair", default="same-patient", choices=["same-patient", "inter-patient"],
                   help="inter-patient: the template is another subject (an atlas); points are sent through the "
                        "verified inter-patient registration, confident only where the reverse registration agrees")
    add_model_arguments(m)
    m.set_defaults(func=cmd_match)

    c = sub.add_parser("convert-checkpoint", help="convert an official SAM/SAMv2/CrossSAM .pth to safetensors")
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--variant", default="auto", help="auto, SAM, SAMv2 or CrossSAM (any case)")
    c.set_defaults(func=cmd_convert)

    d = sub.add_parser("demo", help="the main job on bundled sample data with the bundled model")
    d.add_argument("--out", default="samv2_demo", help="output folder (default ./samv2_demo)")
    d.add_argument("--seed", type=int, default=0,
                   help="seed of the simulated follow-up's random deformation (default 0; same seed, same pair)")
    add_model_arguments(d)
    d.set_defaults(func=cmd_demo)

    for name, (_, text) in BESIDE_THE_CORE.items():  # listed here, run by main() before this parser
        sub.add_parser(name, help=text, add_help=False)

    b = sub.add_parser("batch", help="run a cohort (CSV of cases): resumable, one failure never stops the others, "
                                     "on Dask workers or job-array shards")
    add_batch_arguments(b)
    b.set_defaults(func=run_batch)

    pr = sub.add_parser("propagate", help="carry a lesion (point + radius, or a label map) onto a follow-up: "
                                          "label map, Slicer segmentation and JSON")
    add_propagate_arguments(pr)
    pr.set_defaults(func=cmd_propagate)

    i = sub.add_parser("info", help="what the loader makes of an image: size, spacing, orientation, extent and "
                                    "centre in LPS and RAS, modality, DICOM series")
    add_info_arguments(i)
    i.set_defaults(func=run_info)

    tr = sub.add_parser("track", help="follow-up reading of every lesion at once (one-to-one, new and vanished "
                                      "lesions, size change): JSON, CSV and DICOM SR per follow-up")
    add_track_arguments(tr)
    tr.set_defaults(func=cmd_track)

    r = sub.add_parser("register", help="register a moving image to a fixed image")
    add_register_arguments(r)
    r.set_defaults(func=run_register)
    return p


def _join_negative_points(argv: list) -> list:
    """Let '--point -12,5,3' work: argparse would read '-12,5,3' as an option."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--point" and i + 1 < len(argv) and argv[i + 1].startswith("-") and argv[i + 1][1:2].isdigit():
            out.append(f"--point={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


@contextlib.contextmanager
def _native_stderr_silenced(command: str):
    """Send what C++ libraries (ITK, VNL, torch) print straight to file descriptor 2 to
    /dev/null, so a refusal is the one line this package prints; Python's own stderr (errors,
    progress, warnings) still reaches the terminal. SAMV2_DEBUG=1 keeps everything."""
    try:
        real = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):  # stderr captured (tests) or replaced
        real = False
    if not real or os.environ.get("SAMV2_DEBUG") or command in ("batch", "view"):
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    previous = sys.stderr
    sys.stderr = open(saved, "w", buffering=1, encoding=previous.encoding, errors="backslashreplace",
                      closefd=False)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = previous
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def _progress_lines(wanted: bool):
    """``--progress``: stage lines on stderr for this command (progress.py reads the setting)."""
    previous = os.environ.get("SAMV2_PROGRESS")
    if wanted:
        os.environ["SAMV2_PROGRESS"] = "lines"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("SAMV2_PROGRESS", None)
        else:
            os.environ["SAMV2_PROGRESS"] = previous


def _terminated(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so staged outputs are removed on the way out (SIGKILL cannot
    # be caught: its leftovers are removed by the next run writing there)
    print("samv2: terminated", file=sys.stderr)
    raise SystemExit(128 + signum)


def main(argv: Optional[list] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in BESIDE_THE_CORE:
        return _run_beside_the_core(argv[0], argv[1:])
    with contextlib.suppress(AttributeError, ValueError):  # a non-UTF-8 path printed never aborts the run
        sys.stdout.reconfigure(errors="backslashreplace")
    with contextlib.suppress(ValueError):  # not the main thread: leave the handler alone
        if signal.getsignal(signal.SIGTERM) == signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _terminated)

    def start():  # Ctrl-C while the parser imports its sub-commands is reported like any other
        args = build_parser().parse_args(_join_negative_points(argv))
        with _progress_lines(getattr(args, "progress", False)), _native_stderr_silenced(args.command), \
                warnings.catch_warnings():
            if not sys.warnoptions:  # third-party warnings (torch...) are not this tool's messages
                warnings.filterwarnings("ignore")
            return args.func(args)

    return run_cli("samv2", start)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
