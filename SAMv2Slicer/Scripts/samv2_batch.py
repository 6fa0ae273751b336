#!/usr/bin/env python
"""Headless batch run of the SAMv2Slicer logic over a list of cases.

Input: a CSV file with one case per row and the columns

    baseline,followup,points[,case]

(paths relative to the CSV's folder; volumes in any format SimpleITK reads, or a DICOM
folder; points as a Slicer point list .mrk.json / .fcsv, or a CSV with columns
``x,y,z[,label]`` in LPS, or in RAS with ``--points-system RAS``).

For every case it writes, in ``OUTPUT/<case>/``:

* ``matched.mrk.json``: the matched points as a Slicer point list on the follow-up (labels
  of the source points; flagged matches end with " (?)" and are unselected);
* ``matched.csv``: label, source and matched positions (LPS mm), score, confident, reason;
* with ``--register``: ``registration_linear.h5`` (ITK, fixed=baseline -> moving=follow-up)
  and, with ``--deformable``, ``registration_displacement.nii.gz`` (both written by Slicer's
  transform writer from the output nodes), plus ``registration/`` from samv2core
  (``composite.h5``, the resampled follow-up and ``report.json``);

and ``OUTPUT/summary.csv`` with one line per case (ok / skipped / failed and why). Cases run
on samv2core's cohort runner (samv2core.cohort), in this process (the Slicer scene): each
case folder is written all-or-nothing with a ``manifest.json`` of checksums, a rerun after a
kill skips the cases that finished (outputs verified) and redoes the rest, case names are
made safe for folder names (``../x`` becomes ``x``), and one failing case never stops the
others. ``--shard i/n`` runs every n-th case (job arrays). The exit code is 0 when every
case succeeded, 1 when any case failed, 2 for unusable arguments, model or CSV (also when a
dependency such as torch is missing); inside Slicer the application always quits with it.

Run it in 3D Slicer (uses the application's Python and installed extension):

    Slicer --no-main-window --python-script samv2_batch.py cases.csv --output out/

or in plain Python with the ``slicer-core`` package (``pip install slicer-core``):

    python samv2_batch.py cases.csv --output out/ [--model model.safetensors] [--register affine]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

# The module folder (parent of Scripts/) holds SAMv2SlicerLib, in the source tree and once installed.
_MODULE_DIR = Path(__file__).resolve().parents[1]
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

EXIT_OK, EXIT_CASE_FAILED, EXIT_USAGE = 0, 1, 2
ROLES = {"baseline": ("baseline",), "followup": ("followup",), "points": ("points",)}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print usage + error)
        raise _UsageError(message)


class _UsageError(Exception):
    pass


def parse_args(argv):
    p = _Parser(prog="samv2_batch", description=__doc__.split("\n\n")[0])
    p.add_argument("cases", help="CSV with columns baseline, followup, points[, case]")
    p.add_argument("--output", "-o", required=True, help="output folder")
    p.add_argument("--model", default=None, help="weights file (.safetensors); default: the bundled model")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--method", default="refined", choices=["refined", "fixed_point", "nn"])
    p.add_argument("--register", default="none", choices=["none", "rigid", "affine"],
                   help="also register follow-up (moving) onto baseline (fixed)")
    p.add_argument("--deformable", action="store_true", help="add a deformable refinement (with --register)")
    p.add_argument("--modality", default="auto", choices=["auto", "CT", "MR"],
                   help="modality of both volumes (auto: guessed from intensities); used for matching and registration")
    p.add_argument("--points-system", default="LPS", choices=["LPS", "RAS"],
                   help="coordinate system of CSV point files (x,y,z[,label]); .mrk.json files name their own")
    p.add_argument("--cache-dir", default=None, help="folder for cached embeddings")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--shard", default=None, help="i/n: run only cases k with k %% n == i (job arrays)")
    return p.parse_args(argv)


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


class SlicerCaseJob:
    """The cohort runner's job: one case through the SAMv2Slicer logic, in this process's
    scene. The case's nodes are removed afterwards (success or failure) so memory stays flat."""

    def __init__(self, logic, args, model_id: str):
        self.logic = logic
        self.args = args
        self.settings = {"model": model_id, "method": args.method, "register": args.register,
                         "deformable": args.deformable, "modality": args.modality,
                         "points_system": args.points_system}

    def __call__(self, case, out_dir: Path) -> dict:
        scene = self.logic.scene
        keep = scene.GetNumberOfNodes()
        try:
            return self._run(case, out_dir)
        finally:
            _clear_case_nodes(scene, keep)

    def _run(self, case, out_dir: Path) -> dict:
        from samv2core.volume import load_volume
        from SAMv2SlicerLib import nodes

        args, logic, name = self.args, self.logic, case.name
        scene = logic.scene
        base = nodes.volume_to_node(load_volume(case.inputs["baseline"], args.modality), scene, f"{name}_baseline")
        follow = nodes.volume_to_node(load_volume(case.inputs["followup"], args.modality), scene, f"{name}_followup")
        points = load_points(case.inputs["points"], scene, f"{name}_points", args.points_system)
        outcome = logic.match_points(base, follow, points, method=args.method, output_name=f"{name}_matched")
        nodes.write_point_list(outcome.node, str(out_dir / "matched.mrk.json"))
        write_matches_csv(out_dir / "matched.csv", outcome)
        if args.register != "none":
            reg = logic.register(base, follow, mode=args.register, deformable=args.deformable,
                                 output_name=f"{name}_registration")
            nodes.write_transform_node(reg.linear_node, str(out_dir / "registration_linear.h5"))
            if reg.grid_node is not None:
                nodes.write_transform_node(reg.grid_node, str(out_dir / "registration_displacement.nii.gz"))
            # the core's complete set: composite transform, resampled follow-up, JSON report
            from samv2core.registration import write_registration

            write_registration(_core_result(reg.result), logic.volume(base, "baseline"),
                               logic.volume(follow, "follow-up", world=False), out_dir / "registration")
        return {"points": len(outcome.results), "confident": outcome.n_confident, "message": logic.status}


def _core_result(result):
    """The core's RegistrationResult of the module's result (same maps: linear o (x + d(x)))."""
    import SimpleITK as sitk

    from samv2core.registration import RegistrationResult

    composite = sitk.CompositeTransform(3)
    composite.AddTransform(result.linear)
    if result.displacement is not None:  # added last: applied first
        composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(result.displacement)))
    return RegistrationResult(result.linear, result.displacement, composite, dict(result.report))


def _clear_case_nodes(scene, keep: int) -> None:
    """Drop the nodes added since ``keep`` nodes were in the scene."""
    while scene.GetNumberOfNodes() > keep:
        scene.RemoveNode(scene.GetNthNode(scene.GetNumberOfNodes() - 1))


def run(argv) -> int:
    """The batch run; raises _UsageError / SAMv2Error for unusable arguments, model or CSV."""
    args = parse_args(argv)
    from samv2core.cohort import parse_shard, read_cases, run_cohort
    from samv2core.errors import InputError

    if args.deformable and args.register == "none":
        raise InputError("--deformable needs --register rigid|affine")
    shard = parse_shard(args.shard)
    cases = read_cases(Path(args.cases).resolve(), ROLES)
    from samv2core.device import select_device
    from samv2core.models import resolve_model

    # load the model once, now (this imports torch): a missing package, a bad model file or a
    # missing GPU is refused before any case, with exit code 2; the logic then uses this model
    select_device(args.device)
    resolved = resolve_model(args.model, device=args.device)
    import slicer

    from SAMv2SlicerLib.logic import SAMv2Logic

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    # Inside the Slicer application use its scene; in plain Python a private one.
    scene = getattr(slicer, "mrmlScene", None) or slicer.vtkMRMLScene()
    logic = SAMv2Logic(scene, cache_dir=args.cache_dir)
    logic.set_model(model=resolved.model, device=args.device)
    model_id = args.model and str(Path(args.model).resolve()) or "bundled"
    summary = run_cohort(cases, Path(args.output).resolve(), SlicerCaseJob(logic, args, model_id), shard=shard)
    done = sum(o.status != "failed" for o in summary.outcomes)
    print(f"samv2_batch: {done}/{len(summary.outcomes)} case(s) succeeded; summary in {summary.summary_path}"
          + (f"; FAILED: {', '.join(o.case for o in summary.failed)}" if summary.failed else ""))
    return summary.exit_code


def main(argv=None) -> int:
    """Never raises: every failure to start is one line on stderr and exit code 2."""
    try:
        return run(sys.argv[1:] if argv is None else argv)
    except _UsageError as exc:
        print(f"samv2_batch: error: {exc} (see --help)", file=sys.stderr)
    except SystemExit as exc:  # --help
        return int(exc.code or 0) if isinstance(exc.code, int) else EXIT_USAGE
    except ImportError as exc:  # e.g. torch or slicer-core missing
        print(f"samv2_batch: error: a required package is missing ({exc}); " + _install_hint(exc), file=sys.stderr)
    except KeyboardInterrupt:
        print("samv2_batch: interrupted (run again to continue: finished cases are skipped)", file=sys.stderr)
        return 130
    except Exception as exc:
        text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        from_core = type(exc).__module__.startswith("samv2core") or isinstance(exc, (OSError, MemoryError))
        print(f"samv2_batch: error: {text}" + ("" if from_core else f" ({type(exc).__name__})"), file=sys.stderr)
    return EXIT_USAGE


def _in_slicer() -> bool:
    try:
        import slicer
    except BaseException:
        return False
    return hasattr(slicer, "app")


def _install_hint(exc: ImportError) -> str:
    """How to get the missing package, where this runs."""
    name = (getattr(exc, "name", None) or "").split(".")[0] or ("torch" if "torch" in str(exc) else "")
    if _in_slicer():
        if name == "torch":
            return "install the PyTorch extension (Extensions Manager), restart Slicer and run again"
        return "open the SAMv2 module once (it offers to install its Python packages) and run again"
    if name == "slicer":
        return "install slicer-core (pip install slicer-core) or run inside 3D Slicer"
    return f"install it (pip install {name or 'the package'}) or run inside 3D Slicer"


def _exit(code: int) -> None:
    """Quit with ``code``: inside Slicer the application must be told, or it keeps running."""
    if _in_slicer():
        import slicer

        slicer.util.exit(code)
    else:
        sys.exit(code)


if __name__ == "__main__":
    _code = EXIT_USAGE
    try:
        _code = main()
    finally:
        _exit(_code)
