"""`samv2 demo`: find a lung tumour and landmarks on a simulated follow-up of a bundled CT.

The follow-up is SIMULATED from the bundled baseline with the hard follow-up protocol
(samv2core.simulate.simulate_hard_followup: own voxel grid, 85% z coverage, rigid motion,
B-spline deformation, contrast-phase change, noise), so the true position of every point is
known and the error can be printed. The table leads with the default (refined) method and
shows, for every match, which answer it used and why, and the reason for every flag;
fixed-point and NN follow for comparison, without a confidence flag.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .cli_options import embed_with_progress, session_from_args
from .figures import figures_available, pictures_from_matches, write_match_figures
from .markups import write_markups
from .matching import METHODS, match_points
from .pair_registration import REGISTRATION
from .outputs import atomic_write, check_writable, write_text_atomic
from .preprocess import body_mask
from .bundled_samples import load_sample
from .simulate import simulate_hard_followup


DEFAULT_METHOD = METHODS[0]  # 'refined'
DEMO_METHODS = (DEFAULT_METHOD, "fixed_point", "nn")


def demo_points(volume, label, n_landmarks: int = 6, seed: int = 0):
    """The tumour centroid plus landmarks spread through the body (LPS, labels)."""
    ijk = np.argwhere(label.array > 0)[:, ::-1].mean(0)
    pts, labels = [volume.index_to_lps(ijk)], ["tumour"]
    mask = body_mask(volume)
    # stay away from the first/last slices so the simulated motion keeps them in view
    z = volume.array.shape[0]
    mask[: z // 5] = False
    mask[z - z // 5:] = False
    cand = np.argwhere(mask)
    rng = np.random.default_rng(seed)
    for n, zyx in enumerate(cand[rng.choice(len(cand), n_landmarks, replace=False)]):
        pts.append(volume.index_to_lps(zyx[::-1].astype(float)))
        labels.append(f"landmark{n + 1}")
    return np.array(pts), labels


def write_demo_figures(out_dir: Path, baseline, followup, labels, results, truth) -> str:
    """The figure hook: a PNG per point and an overview when matplotlib is installed; returns a note."""
    if not figures_available():
        return "pictures skipped: matplotlib is not installed (pip install 'samv2core[figures]')"
    paths = write_match_figures(out_dir, baseline, followup, pictures_from_matches(labels, results, truth))
    return f"wrote {len(paths)} pictures to {out_dir}/ (one per point, refined matching, and overview.png)"


def run_demo(args) -> int:
    out = check_writable(Path(args.out), folder=True)
    out.mkdir(parents=True, exist_ok=True)
    baseline = load_sample("lung1_ct")
    label = load_sample("lung1_tumor_label")
    pair = simulate_hard_followup(baseline, seed=args.seed)
    followup = pair.followup
    for name, vol in (("followup_simulated.nrrd", followup), ("baseline.nrrd", baseline)):
        atomic_write(out / name, lambda tmp, v=vol: sitk.WriteImage(sitk.Cast(v.to_sitk(), sitk.sitkInt16), str(tmp),
                                                                    True))

    pts, labels = demo_points(baseline, label, seed=args.seed)
    truth = pair.map_points(pts)
    session = session_from_args(args, allow_untrained=True)
    print(f"model: {session.label}   device: {session.device}")
    t0 = time.perf_counter()
    te = embed_with_progress(session, baseline)
    t1 = time.perf_counter()
    qe = embed_with_progress(session, followup)
    t2 = time.perf_counter()
    print(f"embedding: baseline {t1 - t0:.2f} s, follow-up {t2 - t1:.2f} s (then cached)")
    rows = []
    report = {"model": session.label, "trained_model": session.trained, "simulated_followup": pair.params,
              "coordinate_system": "RAS (points in the .mrk.json files); LPS in this report", "methods": {}}
    # the default method first; the others for comparison only, without a confidence flag (their
    # flags do not meet the default's false-confident bound: a fixed-point match 13.7 mm off can
    # pass its own checks)
    for method in DEMO_METHODS:
        t = time.perf_counter()
        res = match_points(te, qe, pts, method=method, registration=REGISTRATION)
        dt = (time.perf_counter() - t) / len(pts)
        err = np.linalg.norm(np.array([r.query_point.xyz for r in res]) - truth, axis=1)
        points = [dict(label=l, error_mm=round(float(e), 2), **r.to_dict("LPS")) for l, e, r in zip(labels, err, res)]
        if method != DEFAULT_METHOD:
            for p in points:
                for key in ("confident", "reason"):
                    p.pop(key)
        report["methods"][method] = {"default": method == DEFAULT_METHOD, "ms_per_point": round(1000 * dt, 1),
                                     "median_error_mm": round(float(np.median(err)), 2), "points": points}
        for l, e, r in zip(labels, err, res):
            rows.append((method, l, r.score, r.confident, e, r))
        if method == "refined":
            figure_results = res
            write_markups(out / "followup_matches.mrk.json", np.array([r.query_point.xyz for r in res]),
                          [f"{l}-match" for l in labels], "RAS",
                          [f"score {r.score:.3f}" + ("" if r.confident else f"; NOT CONFIDENT: {r.reason}") for r in res],
                          [r.confident for r in res])
    write_markups(out / "baseline_points.mrk.json", pts, labels, "RAS")
    write_markups(out / "followup_truth.mrk.json", truth, [f"{l}-truth" for l in labels], "RAS")
    write_text_atomic(out / "report.json", json.dumps(report, indent=2))
    figures_note = write_demo_figures(out / "figures", baseline, followup, labels, figure_results, truth)

    print("\nFollow-up SIMULATED from the bundled lung CT (known motion), so errors are exact:")
    print(f"{DEFAULT_METHOD} is the default method (samv2 match, the API, Slicer); {', '.join(DEMO_METHODS[1:])} "
          "are shown for comparison, without a confidence flag ('-')")
    print(f"{'method':<12}{'point':<12}{'score':>7}  {'confident':<10}{'error mm':>9}  why")
    for method, l, s, c, e, r in rows:
        if method == DEFAULT_METHOD:
            flag, why = ("yes" if c else "NO"), "; ".join(w for w in (r.answer_reason, None if c else f"flag: {r.reason}")
                                                         if w)
        else:
            flag, why = "-", ""
        print(f"{method:<12}{l:<12}{s:>7.3f}  {flag:<10}{e:>9.1f}  {why}")
    for method, m in report["methods"].items():
        print(f"{method}{' (default)' if m['default'] else ''}: median error {m['median_error_mm']} mm, "
              f"{m['ms_per_point']} ms per point")
    print(f"\nwrote {out}/: baseline.nrrd, followup_simulated.nrrd, baseline_points.mrk.json, "
          f"followup_matches.mrk.json, followup_truth.mrk.json, report.json (load them in 3D Slicer)")
    print(figures_note)
    if not session.trained:
        print("WARNING: no trained model is installed; the numbers above come from random weights.")
    return 0
