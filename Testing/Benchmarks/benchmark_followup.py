"""Click-to-match on hard SIMULATED follow-ups (issues 10, 21): refined (default), fixed-point, NN, peers.

Run:  nice python Testing/Benchmarks/benchmark_followup.py [--quick] [--no-peers] [--ants] [--only lung,aorta,...]
      [--seeds 0,1,2] [--points 40] [--lesions 5] [--methods refined,fixed_point,nn] [--out results.json]

Follow-ups are SIMULATED from the real CTs of ../shared/data (all of them) with samv2core.simulate's hard
protocol (FollowupProtocol: own voxel grid with spacing x0.8-1.5 per axis, 85% of the z
coverage at a random offset, rigid motion up to 8 deg / 15 mm, cubic B-spline deformation with
coefficients up to +-16 mm on a 50 mm grid, contrast-phase change, gain, offset, noise 15 HU).
Query points are random points in the eroded (10 mm) body of the baseline whose true position
lies inside the follow-up; the truth is exact (the known transform). Lesion-change pairs: the
lung tumour grows by 6-10 mm or shrinks by 4 mm before the simulation; the truth is where the
lesion centre went.

Per scan and method (every pair, then pooled per scan): median / p90 error, CPM@10mm, share
of confident answers, false-confident = silent failures (confident and >= 10 mm off; count and
share), far-flagged (>= 10 mm off and flagged), refusals (pairs without an answer), worst case,
time to the first answer (load both scans + embed both + first click, which runs the refined
method's per-pair precompute; peers: load + register; torch import and model load once per
process, printed separately) with its breakdown, and time per further click. Peers:
``samv2 register`` (affine + deformable; points through its composite transform) and, with
--ants, ANTs SyN (antspyx defaults, run in a subprocess with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS).
Peers have no confidence flag: every answer counts as confident. Timings are wall clock on a
shared machine: compare rows of one run, and say whether the machine was loaded.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for repo_paths
from bench_table import rule
from repo_paths import SHARED
SCANS = {
    "lung": "ct/radiomics_lung1/image.nrrd",
    "abdomen3mm": "ct/totalseg_example/ct_3mm.nii.gz",
    "aorta": "ct/totalseg_aorta/ct_1.5mm.nii.gz",
    "dicom": "ct/totalseg_dicom/dicom",
    "spleen": "ct/msd_spleen2/ct.nii.gz",
}
LESION_SCAN, LESION_LABEL = "ct/radiomics_lung1/image.nrrd", "ct/radiomics_lung1/tumor_label.nrrd"
METHODS = ("nn", "fixed_point", "refined")

_ANTS_CHILD = r"""
import json, sys, time
import ants, numpy as np, pandas as pd
spec = json.loads(sys.argv[1])
t0 = time.perf_counter()
fixed = ants.image_read(spec["fixed"]); moving = ants.image_read(spec["moving"])
reg = ants.registration(fixed=fixed, moving=moving, type_of_transform="SyN")
pts = pd.DataFrame(np.asarray(spec["points"]), columns=["x", "y", "z"])
# ITK convention: the forward (image) transforms map fixed physical points to moving ones
out = ants.apply_transforms_to_points(3, pts, reg["fwdtransforms"])
print(json.dumps({"points": out[["x", "y", "z"]].to_numpy().tolist(), "seconds": time.perf_counter() - t0}))
"""


def stats(err: np.ndarray, confident: np.ndarray) -> dict:
    far = err >= 10.0
    return {"n": len(err), "median": float(np.median(err)), "p90": float(np.percentile(err, 90)),
            "cpm10": float(np.mean(~far)), "confident": float(np.mean(confident)),
            "false_confident": float(np.mean(confident & far)), "silent": int(np.sum(confident & far)),
            "flagged_far": int(np.sum(~confident & far)), "worst": float(err.max())}


def run_samv2(base_path, follow_path, points, truth, methods, threads, embedder):
    """Time to the first answer and per-click times for each matching method.

    Both scans are loaded and embedded once from scratch (no cache; timed); each method's
    first answer = that time + its own first click (the refined method's per-pair precompute,
    fixed points + arbiter + local registration set-up, runs inside its first click, as in the
    CLI and API; the Slicer worker runs it in the background after embedding)."""
    import torch
    from samv2core.arbiter import ArbiterOptions
    from samv2core.matching import Matcher, match_points
    from samv2core.pair_registration import REGISTRATION
    from samv2core.volume import load_volume

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    base, follow = load_volume(base_path, "CT"), load_volume(follow_path, "CT")
    t_load = time.perf_counter() - t0
    te, qe = embedder.embed(base), embedder.embed(follow)
    t_embed = time.perf_counter() - t0 - t_load
    out = {}
    out_reg = None
    for method in methods:
        results, clicks = [], []
        for p in points:
            t = time.perf_counter()
            if method == "refined_no_arbiter":  # the refined match before issue 21, for comparison
                results += match_points(te, qe, p[None], arbiter_options=ArbiterOptions(enabled=False))
            elif method == "refined_no_registration":  # issue 21's first round: no registration opinion
                results += match_points(te, qe, p[None])
            elif method == "refined":  # as the CLI, batch, demo and Slicer run it: with the registration opinion
                results += match_points(te, qe, p[None], registration=REGISTRATION)
            else:
                results += match_points(te, qe, p[None], method=method)
            clicks.append(time.perf_counter() - t)
        q = np.array([r.query_point.xyz for r in results])
        err = np.linalg.norm(q - truth, axis=1)
        conf = np.array([r.confident for r in results])
        timing = {"load_s": t_load, "embed_s": t_embed, "first_click_s": clicks[0]}
        if method == "refined":
            state = Matcher(te, qe).pair_state()  # cached: the first click built it
            timing["precompute_s"] = state.seconds
            timing["registration_s"] = state.registration_seconds  # 0: never needed on this pair
            timing["registration_needed"] = float(state.registration is not None)
            timing["registration_clicks"] = float(sum("registration" in r.details for r in results))
            if state.registration is not None and state.registration.available:  # for the JSON only, not timed
                out_reg = [state.registration.map(p).tolist() for p in points]
            else:
                out_reg = None
            if state.arbiter is not None:
                t = time.perf_counter()
                for p in points:
                    state.arbiter.estimate(p)
                timing["arbiter_ms_per_click"] = 1000 * (time.perf_counter() - t) / max(1, len(points))
        out[method] = {"err": err.tolist(), "confident": conf.tolist(), "first_s": t_load + t_embed + clicks[0],
                       "timing": timing,
                       "click_ms": 1000 * float(np.median(clicks[1:] if len(clicks) > 1 else clicks)),
                       "points": q.tolist(), "answers": [r.answer for r in results], "reasons": [r.reason for r in results],
                       "registration": [r.details.get("registration") for r in results],
                       "registration_all": out_reg if method == "refined" else None,
                       "candidates_truth": truth.tolist(),
                       "answer_reasons": [r.answer_reason for r in results]}
    return out


def run_register(base_path, follow_path, points, truth):
    from samv2core.errors import SAMv2Error
    from samv2core.registration import register
    from samv2core.volume import load_volume

    t0 = time.perf_counter()
    base, follow = load_volume(base_path, "CT"), load_volume(follow_path, "CT")
    try:
        res = register(base, follow, mode="affine", deformable=True)
    except SAMv2Error as exc:  # a refusal is a result too (reported, never silent)
        return {"error": str(exc).splitlines()[0][:120], "first_s": time.perf_counter() - t0}
    first = time.perf_counter() - t0
    t = time.perf_counter()
    q = res.transform_points(points)
    click = 1000 * (time.perf_counter() - t) / max(1, len(points))
    err = np.linalg.norm(q - truth, axis=1)
    return {"err": err.tolist(), "confident": [True] * len(err), "first_s": first, "click_ms": click}


def run_ants(base_path, follow_path, points, truth, threads, timeout):
    env = dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    spec = {"fixed": str(base_path), "moving": str(follow_path), "points": np.asarray(points).tolist()}
    t0 = time.perf_counter()
    try:
        out = subprocess.run([sys.executable, "-c", _ANTS_CHILD, json.dumps(spec)], capture_output=True, text=True,
                             env=env, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s", "first_s": timeout}
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or ["failed"])[-1][:120], "first_s": time.perf_counter() - t0}
    doc = json.loads(out.stdout.strip().splitlines()[-1])
    err = np.linalg.norm(np.asarray(doc["points"]) - truth, axis=1)
    return {"err": err.tolist(), "confident": [True] * len(err), "first_s": time.perf_counter() - t0, "click_ms": 0.0}


def save_volume(volume, path: Path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(volume.to_sitk(), str(path))


def make_cases(args):
    """(scan, seed, kind, baseline Volume, SimulatedPair, points, truth, lesion_mask) per pair."""
    from samv2core.simulate import body_points, change_lesion, simulate_hard_followup
    from samv2core.volume import load_volume

    only = set(args.only.split(",")) if args.only else None
    seeds = [int(s) for s in args.seeds.split(",")]
    for name, rel in SCANS.items():
        if only and name not in only:
            continue
        if not (SHARED / rel).exists():
            print(f"# skipped {name}: {SHARED / rel} not found", flush=True)
            continue
        vol = load_volume(SHARED / rel, "CT")
        for seed in seeds:
            pair = simulate_hard_followup(vol, seed)
            pts = body_points(vol, 20 * args.points, seed + 100)
            truth = pair.map_points(pts)
            ok = pair.followup.contains_lps(truth, -1.0)
            yield name, seed, "body", vol, pair, pts[ok][: args.points], truth[ok][: args.points]
    if args.lesions and (not only or "lesion" in only) and (SHARED / LESION_SCAN).exists():
        import SimpleITK as sitk

        vol = load_volume(SHARED / LESION_SCAN, "CT")
        label = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / LESION_LABEL))) > 0
        rng = np.random.default_rng(0)
        changes = [-4.0 if k % 3 == 2 else float(rng.uniform(6.0, 10.0)) for k in range(args.lesions)]
        ids = [int(k) for k in args.lesion_ids.split(",")] if args.lesion_ids else range(args.lesions)
        for k in ids:
            change = changes[k]
            changed, centre = change_lesion(vol, label, change, seed=k)
            pair = simulate_hard_followup(changed, 50 + k)
            pts = np.vstack([centre[None], body_points(vol, 10 * args.lesion_points, 200 + k)])
            truth = pair.map_points(pts)
            ok = pair.followup.contains_lps(truth, -1.0)
            ok[0] = True
            pts, truth = pts[ok][: args.lesion_points + 1], truth[ok][: args.lesion_points + 1]
            yield f"lesion{change:+.0f}mm", 50 + k, "lesion", vol, pair, pts, truth


def fmt_row(scan, method, s, first, click, refused=0):
    return (f"| {scan:<14} | {method:<12} | {s['n']:>4} | {s['median']:>6.2f} | {s['p90']:>6.2f} | {100 * s['cpm10']:>6.1f} | "
            f"{100 * s['confident']:>6.1f} | {s['silent']:>3d} ({100 * s['false_confident']:.1f}%) | {s['flagged_far']:>6d} | "
            f"{refused:>7d} | {s['worst']:>6.1f} | {first:>7.1f} | {click:>8.1f} |")


HEADER = ("| scan           | method       |    n | median |    p90 | CPM@10 |  conf% | false-c (silent) | far-fl | refused "
          "|  worst | first s | click ms |\n" + rule((14, 12, 4, 6, 6, 6, 6, 16, 6, 7, 6, 7, 8)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one seed, 15 points, 2 lesion pairs")
    ap.add_argument("--no-peers", action="store_true", help="skip samv2 register and ANTs SyN")
    ap.add_argument("--ants", action="store_true", help="also run ANTs SyN on the same pairs (slow: minutes per pair)")
    ap.add_argument("--ants-seeds", default="", help="run ANTs SyN only on these seeds (default: all)")
    ap.add_argument("--only", default="", help=f"comma list of {', '.join(SCANS)}, lesion")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--points", type=int, default=40)
    ap.add_argument("--lesions", type=int, default=5)
    ap.add_argument("--lesion-points", type=int, default=10)
    ap.add_argument("--lesion-ids", default="", help="run only these lesion-change pairs, e.g. 0,1 (default: all)")
    ap.add_argument("--methods", default=",".join(METHODS),
                    help=f"comma list of {', '.join(METHODS)}, refined_no_arbiter (the refined match without its "
                         "third opinion, as before issue 21), refined_no_registration (with the arbiter but without "
                         "the pair registration opinion)")
    ap.add_argument("--threads", type=int, default=1, help="torch / ITK threads (the machine is shared)")
    ap.add_argument("--ants-timeout", type=float, default=1800.0)
    ap.add_argument("--out", default="", help="write all per-point results as JSON here")
    args = ap.parse_args(argv)
    if args.quick:
        args.seeds, args.points, args.lesions = args.seeds.split(",")[0], 15, 2
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", str(args.threads))
    methods = [m for m in args.methods.split(",") if m]
    t = time.perf_counter()
    import torch  # noqa: F401 - timed: part of a cold first answer

    t_torch = time.perf_counter() - t
    from samv2core.embed import Embedder
    from samv2core.models import resolve_model

    t = time.perf_counter()
    embedder = Embedder(resolve_model(None).model, device="cpu")
    t_model = time.perf_counter() - t
    print("# Click-to-match on SIMULATED follow-ups (hard protocol, samv2core.simulate.FollowupProtocol)")
    print(f"# seeds {args.seeds}, {args.points} body points per pair, {args.lesions} lesion-change pairs; "
          f"threads {args.threads}; load average at start {os.getloadavg()[0]:.1f} (a shared machine: say loaded)")
    print(f"# once per process: torch import {t_torch:.2f} s, model load {t_model:.2f} s (not in 'first s' below)")
    print(HEADER, flush=True)
    collected: dict = {}
    all_rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for scan, seed, kind, vol, pair, pts, truth in make_cases(args):
            bpath, fpath = Path(tmp) / f"{scan}_{seed}_b.nrrd", Path(tmp) / f"{scan}_{seed}_f.nrrd"
            save_volume(pair.baseline, bpath)
            save_volume(pair.followup, fpath)
            res = run_samv2(bpath, fpath, pts, truth, methods, args.threads, embedder)
            if not args.no_peers:
                res["register"] = run_register(bpath, fpath, pts, truth)
                if args.ants and (not args.ants_seeds or str(seed) in args.ants_seeds.split(",")):
                    res["ants_syn"] = run_ants(bpath, fpath, pts, truth, args.threads, args.ants_timeout)
            for method, r in res.items():
                key = (scan.split("+")[0] if kind == "body" else "lesion", method)
                c = collected.setdefault(key, {"err": [], "conf": [], "first": [], "click": [], "centre": [],
                                               "refused": 0, "timing": []})
                if "error" in r:
                    print(f"| {scan:<14} | {method:<12} | refused / failed: {r['error']} ({r['first_s']:.0f} s) |",
                          flush=True)
                    c["refused"] += 1
                    continue
                err, conf = np.asarray(r["err"]), np.asarray(r["confident"])
                print(fmt_row(f"{scan}/{seed}", method, stats(err, conf), r["first_s"], r["click_ms"]), flush=True)
                if "timing" in r:
                    c["timing"].append(r["timing"])
                    print("|   first answer | " + ", ".join(f"{k} {v:.2f}" for k, v in r["timing"].items()) + " |",
                          flush=True)
                if kind == "lesion":
                    why = (r.get("answer_reasons") or [None])[0]
                    print(f"|   lesion centre | {method:<12} | error {err[0]:.1f} mm, "
                          f"{'confident' if conf[0] else 'flagged'}{'; ' + why if why else ''} |", flush=True)
                c["err"] += list(err)
                c["conf"] += list(conf)
                c["first"].append(r["first_s"])
                c["click"].append(r["click_ms"])
                if kind == "lesion":
                    c["centre"].append(float(err[0]))
                all_rows.append({"scan": scan, "seed": seed, "kind": kind, "method": method,
                                 **{k: v for k, v in r.items() if k not in ("first_s",)}, "first_s": r["first_s"],
                                 "params": pair.params})
    print("\n## Summary per scan (all seeds pooled; first/click: median over pairs)")
    print(HEADER)
    for (scan, method), c in collected.items():
        if not c["err"]:
            print(f"| {scan:<14} | {method:<12} | refused on all {c['refused']} pairs |")
            continue
        s = stats(np.asarray(c["err"]), np.asarray(c["conf"], bool))
        print(fmt_row(scan, method, s, float(np.median(c["first"])), float(np.median(c["click"])), c["refused"]))
    print("\n## Where a first answer's time goes (refined; median over pairs, s)")
    print(f"torch import {t_torch:.2f}, model load {t_model:.2f} (once per process)")
    for (scan, method), c in collected.items():
        if c["timing"] and method == "refined":
            keys = c["timing"][0].keys()
            print(f"{scan}: " + ", ".join(f"{k} {np.median([t[k] for t in c['timing']]):.2f}" for k in keys))
    for (scan, method), c in collected.items():
        if c["centre"]:
            print(f"lesion centres, {method}: " + ", ".join(f"{e:.1f}" for e in c["centre"]) + " mm")
    if args.out:
        Path(args.out).write_text(json.dumps(all_rows, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
