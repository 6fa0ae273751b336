#!/usr/bin/env python
"""Headless batch run of the SAMv2Slicer logic over a list of cases.

Input: a CSV file with one case per row and the columns

    baseline,followup,points[,case]

(paths relative to the CSV's folder; volumes in any format SimpleITK reads, or a DICOM
folder; points as a Slicer point list .mrk.json / .fcsv, or a CSV with columns
``x,y,z[,label]`` in LPS, or in RAS with ``--points-system RAS``).

For every case it writes, in ``OUTPUT/<case>/``:

* ``matched.mrk.json``: the matched points as a Slicer point list on the follow-up (labels
  of the source points; flagged matches end with " (?)", are locked and unselected);
* ``matched.csv``: label, source and matched positions (LPS mm), score, confident, reason;
* with ``--register``: ``registration_linear.h5`` (ITK, fixed=baseline -> moving=follow-up)
  and, with ``--deformable``, ``registration_displacement.nii.gz`` (both written by Slicer's
  transform writer from the output nodes), plus ``registration/`` from samv2core
  (``composite.h5``, the resampled follow-up and ``report.json``);

and ``OUTPUT/summary.csv`` with one line per case. The exit code is 0 when every case
succeeded, 1 when any case failed, 2 for unusable arguments or CSV.

Run it in 3D Slicer (uses the application's Python and installed extension):

    Slicer --no-main-window --python-script samv2_batch.py cases.csv --output out/

or in plain Python with the ``slicer-core`` package (``pip install slicer-core``):

    python samv2_batch.py cases.csv --output out/ [--model model.safetensors] [--register affine]
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import traceback
from pathlib import Path

# The module folder (parent of Scripts/) holds SAMv2SlicerLib, in the source tree and once installed.
_MODULE_DIR = Path(__file__).resolve().parents[1]
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2


def parse_args(argv):
    p = argparse.ArgumentParser(prog="samv2_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", help="CSV with columns baseline, followup, points[, case]")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--model", default=None, help="weights file (.safetensors); default: the bundled model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--method", default="fixed_point", choices=["fixed_point", "nn"])
    p.add_argument("--register", default="none", choices=["none", "rigid", "affine"],
                   help="also register follow-up (moving) onto baseline (fixed)")
    p.add_argument("--deformable", action="store_true", help="add a deformable refinement (with --register)")
    p.add_argument("--modality", default="auto", help="CT, MR or auto")
    p.add_argument("--points-system", default="LPS", choices=["LPS", "RAS"],
                   help="coordinate system of CSV point files (x,y,z[,label]); .mrk.json files name their own")
    p.add_argument("--cache-dir", default=None, help="folder for cached embeddings")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def read_cases(csv_path: Path) -> list[dict]:
    """Rows of the case CSV with absolute paths and a unique case name (ValueError if unusable)."""
    if not csv_path.is_file():
        raise ValueError(f"{csv_path}: no such file")
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip().lower() for c in (reader.fieldnames or [])]
        missing = {"baseline", "followup", "points"} - set(fields)
        if missing:
            raise ValueError(f"{csv_path}: missing column(s) {', '.join(sorted(missing))} "
                             f"(need baseline, followup, points[, case])")
        rows = []
        for n, raw in enumerate(reader, start=1):
            row = {k.strip().lower(): (v or "").strip() for k, v in raw.items() if k}
            if not any(row.values()):
                continue
            resolved = {k: str((csv_path.parent / row[k]).resolve()) if row.get(k) else ""
                        for k in ("baseline", "followup", "points")}
            case = row.get("case") or f"case{n:03d}"
            rows.append({"case": case, **resolved})
    if not rows:
        raise ValueError(f"{csv_path}: no cases")
    names = [r["case"] for r in rows]
    if len(set(names)) != len(names):
        raise ValueError(f"{csv_path}: case names are not unique")
    return rows


def load_points(path: str, scene, name: str, csv_system: str = "LPS"):
    """A NEW markups node from a .mrk.json / .fcsv (Slicer's readers) or a CSV points file
    (samv2core.markups format: x,y,z[,label] columns in ``csv_system``)."""
    from samv2core.coords import lps_to_ras
    from samv2core.errors import InputError
    from samv2core.markups import read_points
    from SAMv2SlicerLib import nodes

    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: points file not found")
    if p.name.lower().endswith((".json", ".fcsv")):
        return nodes.read_point_list_file(str(p), scene, name)
    if p.suffix.lower() != ".csv":
        raise InputError(f"{p}: points must be .mrk.json, .fcsv or .csv")
    points = read_points(p, csv_system)
    return nodes.new_point_list(scene, name, lps_to_ras(points.lps), points.labels)


def write_matches_csv(path: Path, outcome) -> None:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["label", "source_L", "source_P", "source_S", "matched_L", "matched_P", "matched_S",
                    "score", "confident", "reason", "method"])
        for label, r in zip(outcome.labels, outcome.results):
            src = r.template_point.to("LPS").as_array()
            dst = r.query_point.to("LPS").as_array()
            w.writerow([label, *(f"{v:.3f}" for v in src), *(f"{v:.3f}" for v in dst), f"{r.score:.4f}",
                        int(bool(r.confident)), r.reason or "", r.method])


def run_case(logic, case: dict, out_dir: Path, args) -> dict:
    """Process one case in its own scene state; returns the summary row (raises on failure)."""
    from samv2core.volume import load_volume
    from SAMv2SlicerLib import nodes

    scene = logic.scene
    t0 = time.monotonic()
    added_before = scene.GetNumberOfNodes()
    base = nodes.volume_to_node(load_volume(case["baseline"], args.modality), scene, f"{case['case']}_baseline")
    follow = nodes.volume_to_node(load_volume(case["followup"], args.modality), scene, f"{case['case']}_followup")
    points = load_points(case["points"], scene, f"{case['case']}_points", args.points_system)
    outcome = logic.match_points(base, follow, points, method=args.method, output_name=f"{case['case']}_matched")
    out_dir.mkdir(parents=True, exist_ok=True)
    nodes.write_point_list(outcome.node, str(out_dir / "matched.mrk.json"))
    write_matches_csv(out_dir / "matched.csv", outcome)
    files = ["matched.mrk.json", "matched.csv"]
    if args.register != "none":
        reg = logic.register(base, follow, mode=args.register, deformable=args.deformable,
                             output_name=f"{case['case']}_registration")
        nodes.write_transform_node(reg.linear_node, str(out_dir / "registration_linear.h5"))
        files.append("registration_linear.h5")
        if reg.grid_node is not None:
            nodes.write_transform_node(reg.grid_node, str(out_dir / "registration_displacement.nii.gz"))
            files.append("registration_displacement.nii.gz")
        # the core's complete set: composite transform, resampled follow-up, JSON report
        from samv2core.registration import write_registration

        write_registration(reg.result, logic.volume(follow, "follow-up", world=False),
                           logic.volume(base, "baseline"), out_dir / "registration")
        files.append("registration/")
    row = {"case": case["case"], "status": "ok", "points": len(outcome.results),
           "confident": outcome.n_confident, "seconds": round(time.monotonic() - t0, 2),
           "outputs": ";".join(files), "message": logic.status}
    _clear_case_nodes(scene, added_before)
    return row


def _clear_case_nodes(scene, keep: int) -> None:
    """Drop the nodes of a finished case so memory stays flat over long case lists."""
    while scene.GetNumberOfNodes() > keep:
        node = scene.GetNthNode(scene.GetNumberOfNodes() - 1)
        scene.RemoveNode(node)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cases = read_cases(Path(args.cases).resolve())
    except ValueError as exc:
        print(f"samv2_batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    import slicer

    from samv2core.errors import SAMv2Error
    from SAMv2SlicerLib.logic import SAMv2Logic

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # Inside the Slicer application use its scene; in plain Python a private one.
    scene = getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
    logic = SAMv2Logic(scene, cache_dir=args.cache_dir)
    try:
        logic.set_model(args.model, args.device)
    except SAMv2Error as exc:
        print(f"samv2_batch: {exc}", file=sys.stderr)
        return EXIT_USAGE
    out_root = Path(args.output).resolve()
    out_root.mkdir(parents=True, exist_ok=True)
    summary = []
    for case in cases:
        keep = scene.GetNumberOfNodes()
        try:
            row = run_case(logic, case, out_root / case["case"], args)
            print(f"[ok] {case['case']}: {row['message']} ({row['seconds']} s)")
        except SAMv2Error as exc:
            _clear_case_nodes(scene, keep)
            row = {"case": case["case"], "status": "failed", "message": str(exc)}
            print(f"[FAILED] {case['case']}: {exc}", file=sys.stderr)
        except Exception as exc:  # unexpected: keep going with the other cases, report it
            _clear_case_nodes(scene, keep)
            row = {"case": case["case"], "status": "failed", "message": f"{type(exc).__name__}: {exc}"}
            print(f"[FAILED] {case['case']}: {type(exc).__name__}: {exc}", file=sys.stderr)
            traceback.print_exc()
        summary.append(row)
    with open(out_root / "summary.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, ["case", "status", "points", "confident", "seconds", "outputs", "message"])
        w.writeheader()
        for row in summary:
            w.writerow(row)
    failed = sum(r["status"] != "ok" for r in summary)
    print(f"samv2_batch: {len(summary) - failed}/{len(summary)} case(s) succeeded; summary in {out_root / 'summary.csv'}")
    return EXIT_CASE_FAILED if failed else EXIT_OK


def _exit(code: int) -> None:
    import slicer

    if hasattr(slicer, "app"):  # inside Slicer: quit the application with the code
        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    _exit(main())
