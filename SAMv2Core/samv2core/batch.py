"""``samv2 batch``: a cohort of match (and optionally registration) cases on the cohort runner.

    samv2 batch cases.csv --output results/ [--workers N | --scheduler ADDRESS] [--shard i/n]

The CSV has the columns ``case,template,query`` and ``points`` and/or ``lesion``
(``baseline`` / ``followup`` are accepted for template / query, so the Slicer batch script's
CSV works unchanged); paths are relative to the CSV; a case needs points, a lesion or both.
Each case writes ``OUTPUT/<case>/``: for points ``matches.json``, ``matched.mrk.json``,
``matched.csv``; for a lesion (a label map, or a point file whose first point is the centre of
a ball of ``--lesion-radius-mm``) the propagated ``lesion.nrrd`` (label map on the query grid),
``lesion.seg.nrrd`` (Slicer segmentation) and ``lesion.json``; with ``--register``,
``registration/`` (ITK transforms, resampled query, report); plus its ``manifest.json`` (see
samv2core.cohort).
Exit code 0 when every case succeeded or was already finished, 1 when any case failed,
2 when the arguments, the model or the CSV cannot be used.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .cohort import Case, parse_shard, read_cases, run_cohort
from .device import select_device
from .errors import InputError
from .lesion_files import read_lesion_mask, write_lesion_outputs
from .markups import read_points, write_csv, write_markups
from .matching import MatchOptions, match_points
from .pair_registration import REGISTRATION
from .models import resolve_model
from .outputs import OutputSet
from .propagate import propagate_lesion
from .registration import register, write_registration
from .session import EmbeddingSession
from .volume import load_volume

ROLES = {"template": ("template", "baseline"), "query": ("query", "followup"), "points": ("points",)}
# ``samv2 batch`` also reads a lesion column; a case has points, a lesion or both
ALL_ROLES = {**ROLES, "lesion": ("lesion",)}
OPTIONAL_ROLES = ("points", "lesion")
POINT_FILES = (".json", ".csv")  # a lesion given as a point; anything else is a label map

# one embedding session per process (a Dask worker runs many cases), keyed by the model settings
_SESSIONS: dict = {}


@dataclass(frozen=True)
class MatchCaseJob:
    """Per case: embed template and query, match the points, optionally register query onto
    template; writes the files listed in the module doc into the case's folder."""

    model: Optional[str] = None
    model_id: str = "bundled"
    device: str = "auto"
    precision: str = "auto"
    method: str = "refined"
    points_system: str = "LPS"
    modality: str = "auto"
    min_score: Optional[float] = None
    register: str = "none"
    deformable: bool = False
    cache_dir: Optional[str] = None
    threads: Optional[int] = None
    lesion_radius_mm: Optional[float] = None
    lesion_label_value: Optional[int] = None

    @property
    def settings(self) -> dict:
        """What a finished case's results depend on (a change redoes the case)."""
        return {"model": self.model_id, "method": self.method, "points_system": self.points_system,
                "modality": self.modality, "min_score": self.min_score, "register": self.register,
                "deformable": self.deformable, "precision": self.precision,
                "lesion_radius_mm": self.lesion_radius_mm, "lesion_label_value": self.lesion_label_value}

    def session(self):
        """This process's embedding session for the job's model (opened on first use)."""
        key = (self.model, self.device, self.precision, self.cache_dir)
        if key not in _SESSIONS:
            if self.threads:
                torch.set_num_threads(self.threads)
            _SESSIONS[key] = EmbeddingSession.open(self.model, device=self.device, precision=self.precision,
                                                   cache_dir=self.cache_dir)
        return _SESSIONS[key]

    def __call__(self, case: Case, out_dir: Path) -> dict:
        if not case.inputs.get("points") and not case.inputs.get("lesion"):
            raise InputError(f"case {case.name} has neither points nor a lesion")
        template = load_volume(case.inputs["template"], self.modality)
        query = load_volume(case.inputs["query"], self.modality)
        session = self.session()
        te, qe = session.embed(template), session.embed(query)
        opts = MatchOptions(min_score=self.min_score) if self.min_score is not None else None
        info = {"message": ""}
        if case.inputs.get("points"):
            info = self._match(case, out_dir, te, qe, opts)
        if case.inputs.get("lesion"):
            lesion = self._propagate(case, out_dir, te, qe, query, opts)
            info["lesion"] = lesion
            info["message"] = "; ".join(m for m in (info["message"], lesion["message"]) if m)
        if self.register != "none":
            reg = register(template, query, mode=self.register, deformable=self.deformable, embedder=session)
            write_registration(reg, template, query, out_dir / "registration")
            info["message"] += f"; {self.register} registration, {reg.report['linear']['inliers']} inliers"
        return info

    def _propagate(self, case: Case, out_dir: Path, te, qe, query, opts) -> dict:
        """The case's lesion onto the query: lesion.nrrd, lesion.seg.nrrd, lesion.json."""
        path = case.inputs["lesion"]
        if path.lower().endswith(POINT_FILES):
            if self.lesion_radius_mm is None:
                raise InputError(f"{path}: a lesion given as a point needs --lesion-radius-mm")
            points = read_points(path, self.points_system)
            kind = {"point_lps": [round(float(v), 3) for v in points.lps[0]], "radius_mm": self.lesion_radius_mm}
            name = points.labels[0] or "lesion"
            result = propagate_lesion(te, qe, query, centre_lps=points.lps[0], radius_mm=self.lesion_radius_mm,
                                      method=self.method, options=opts)
        else:
            mask = read_lesion_mask(path, self.lesion_label_value)
            kind = {"label_map": path, "label_value": mask.meta["label_value"]}
            name = mask.name
            result = propagate_lesion(te, qe, query, mask=mask, method=self.method, options=opts)
        extra = {"case": case.name, "template": case.inputs["template"], "query": case.inputs["query"],
                 "embedding_model": self.model_id, "method": self.method, "lesion": kind}
        with OutputSet() as files:
            write_lesion_outputs(files, result, query, label_out=out_dir / "lesion.nrrd",
                                 seg_out=out_dir / "lesion.seg.nrrd", json_out=out_dir / "lesion.json",
                                 segment_name=name, extra=extra)
        return {"model": result.model, "confident": result.confident,
                "baseline_volume_ml": round(result.baseline_volume_ml, 4),
                "followup_volume_ml": round(result.followup_volume_ml, 4),
                "message": f"lesion propagated ({result.model}, {result.followup_volume_ml:.2f} mL"
                           + ("" if result.confident else ", NOT CONFIDENT") + ")"}

    def _match(self, case: Case, out_dir: Path, te, qe, opts) -> dict:
        """The case's points onto the query: matches.json, matched.mrk.json, matched.csv."""
        points = read_points(case.inputs["points"], self.points_system)
        results = match_points(te, qe, points.lps, method=self.method, options=opts, registration=REGISTRATION)
        system = points.source_system if case.inputs["points"].endswith(".json") else self.points_system
        doc = {"case": case.name, "template": case.inputs["template"], "query": case.inputs["query"],
               "model": self.model_id, "method": self.method, "coordinate_system": system,
               "matches": [dict(label=label, **r.to_dict(system)) for label, r in zip(points.labels, results)]}
        (out_dir / "matches.json").write_text(json.dumps(doc, indent=2), encoding="utf-8")
        write_markups(out_dir / "matched.mrk.json", np.array([r.query_point.xyz for r in results]), points.labels,
                      system, [f"score {r.score:.3f}" + ("" if r.confident else f"; NOT CONFIDENT: {r.reason}")
                               for r in results], [r.confident for r in results])
        write_csv(out_dir / "matched.csv", [
            {"label": label, **dict(zip("xyz", r.query_point.to(system).xyz)), "coordinate_system": system,
             "score": round(r.score, 4), "confident": r.confident, "reason": r.reason or ""}
            for label, r in zip(points.labels, results)])
        confident = sum(bool(r.confident) for r in results)
        return {"points": len(results), "confident": confident,
                "message": f"{confident}/{len(results)} points matched confidently"}


def add_batch_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("cases", help="CSV with columns case, template (or baseline), query (or followup), and points "
                                 "and/or lesion (a label map, or a point file with --lesion-radius-mm)")
    p.add_argument("--output", "-o", required=True, help="output folder (one sub-folder per case + summary.csv)")
    p.add_argument("--workers", type=int, default=1,
                   help="Dask LocalCluster worker processes (default 1); 0 runs the cases in this process")
    p.add_argument("--scheduler", help="address of an existing Dask scheduler (e.g. tcp://host:8786)")
    p.add_argument("--shard", help="i/n: run only cases k with k %% n == i (job arrays, e.g. $SLURM_ARRAY_TASK_ID/4)")
    p.add_argument("--threads", type=int, help="torch threads per worker")
    p.add_argument("--method", default="refined", choices=["refined", "fixed_point", "nn"])
    p.add_argument("--min-score", type=float, help="confidence threshold on the similarity score")
    p.add_argument("--points-system", default="LPS", choices=["LPS", "RAS"],
                   help="coordinate system of CSV point files; .mrk.json files name their own")
    p.add_argument("--modality", default="auto", help="CT, MR or auto")
    p.add_argument("--register", default="none", choices=["none", "rigid", "affine"],
                   help="also register each query (moving) onto its template (fixed)")
    p.add_argument("--deformable", action="store_true", help="with --register: add the deformable refinement")
    p.add_argument("--lesion-radius-mm", type=float,
                   help="radius (mm) of a lesion given as a point file in the lesion column: a ball on the query")
    p.add_argument("--lesion-label-value", type=int,
                   help="the lesion's value in label maps of the lesion column (default: the map's only non-zero value)")
    p.add_argument("--model", help="weights (.safetensors with its .json card); default: the bundled model")
    p.add_argument("--device", default="auto", help="auto (CUDA > MPS > CPU), cpu, cuda, cuda:N or mps")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--cache-dir", help="keep embeddings on disk here (shared by the workers)")


def job_from_args(args) -> MatchCaseJob:
    """The job of ``samv2 batch``; loads the model once here so a bad --model is refused
    (exit 2) before any case runs."""
    select_device(args.device)  # a missing GPU is refused up front
    resolved = resolve_model(args.model, device="cpu")
    model_id = getattr(resolved.model.card, "sha256", None) or resolved.label
    return MatchCaseJob(model=str(Path(args.model).resolve()) if args.model else None, model_id=model_id,
                        device=args.device, precision=args.precision, method=args.method,
                        points_system=args.points_system.upper(), modality=args.modality, min_score=args.min_score,
                        register=args.register, deformable=args.deformable,
                        lesion_radius_mm=args.lesion_radius_mm, lesion_label_value=args.lesion_label_value,
                        cache_dir=str(Path(args.cache_dir).resolve()) if args.cache_dir else None,
                        threads=args.threads or (default_threads(args.workers) if args.workers else None))


def run_batch(args) -> int:
    if args.workers < 0:
        raise InputError(f"--workers must be 0 or more, got {args.workers}")
    if args.deformable and args.register == "none":
        raise InputError("--deformable needs --register rigid|affine")
    if args.lesion_radius_mm is not None and not (np.isfinite(args.lesion_radius_mm) and args.lesion_radius_mm > 0):
        raise InputError(f"--lesion-radius-mm must be a positive number of mm, got {args.lesion_radius_mm}")
    shard = parse_shard(args.shard)
    cases = read_cases(args.cases, ALL_ROLES, optional=OPTIONAL_ROLES)
    bare = next((c for c in cases if not (c.inputs["points"] or c.inputs["lesion"])), None)
    if bare is not None:
        raise InputError(f"{args.cases}: row {bare.row} ({bare.name}) has neither points nor a lesion")
    job = job_from_args(args)
    summary = run_cohort(cases, args.output, job, workers=args.workers, scheduler=args.scheduler, shard=shard)
    done = sum(o.status != "failed" for o in summary.outcomes)
    print(f"samv2 batch: {done}/{len(summary.outcomes)} case(s) done "
          f"({sum(o.status == 'skipped' for o in summary.outcomes)} finished earlier); summary in "
          f"{summary.summary_path}" + (f"; FAILED: {', '.join(o.case for o in summary.failed)}" if summary.failed else ""),
          flush=True)
    return summary.exit_code


def default_threads(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // max(1, workers))
