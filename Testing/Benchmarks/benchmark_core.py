"""Core benchmark (issue 2): embedding time / peak memory, match latency, matching error.

Run:  python Testing/Benchmarks/benchmark_core.py [--model PATH] [--quick]

Prints one table per part. Follow-ups are SIMULATED from real CTs (known rigid motion + smooth
deformation + noise/contrast change), so the matching error is exact; no real follow-up pairs
exist in the data. Timings are wall-clock on this machine (CPU threads = torch default).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for repo_paths
from bench_table import header, print_machine_load, time_each
from repo_paths import SHARED

CT_FILES = {
    "chest-abdomen CT (totalseg_example, 3 mm)": "ct/totalseg_example/ct_3mm.nii.gz",
    "chest CT (totalseg_aorta, 1.5 mm)": "ct/totalseg_aorta/ct_1.5mm.nii.gz",
    "contrast CT DICOM (totalseg_dicom)": "ct/totalseg_dicom/dicom",
    "lung CT (radiomics_lung1)": "ct/radiomics_lung1/image.nrrd",
}

_CHILD = r"""
import json, resource, sys, time, numpy as np, torch
from samv2core.volume import Volume, load_volume
from samv2core.embed import Embedder
from samv2core.models import resolve_model
from samv2core.network import NetConfig, build_network
from samv2core.model_io import LoadedModel
spec = json.loads(sys.argv[1])
if spec["model"] in ("lite", "full"):
    torch.manual_seed(0)
    net = build_network(NetConfig.lite() if spec["model"] == "lite" else NetConfig.full()).eval()
    model, mid = net, spec["model"] + "-untrained"
else:
    model, mid = resolve_model(spec["model"]).model, None
if spec.get("shape_zyx"):
    # a model-grid volume of a given shape cut (or, for long scans, stacked along z) from a real CT
    from samv2core.preprocess import resample_to_model_grid
    m = resample_to_model_grid(load_volume(spec["path"]), 2.0)
    zs, ys, xs = spec["shape_zyx"]
    reps = int(np.ceil(zs / m.array.shape[0]))
    arr = np.concatenate([m.array] * reps, 0)
    z0 = (arr.shape[0] - zs) // 2; y0 = max(0, (arr.shape[1] - ys) // 2); x0 = max(0, (arr.shape[2] - xs) // 2)
    arr = arr[z0:z0 + zs, y0:y0 + ys, x0:x0 + xs]
    v = Volume(arr, (2.0, 2.0, 2.0), m.origin, np.eye(3), "CT", "cut")
else:
    v = load_volume(spec["path"])
e = Embedder(model, device="cpu", precision=spec.get("precision", "auto"), model_id=mid)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter(); emb = e.embed(v); dt = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": dt, "peak_rss_gb": peak / 1e6, "rss_increase_gb": (peak - base) / 1e6,
                  "model_grid": list(emb.model_volume.array.shape), "slabs": emb.meta["slabs"],
                  "embed_gb": emb.nbytes() / 1e9}))
"""


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else "failed"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def part_embedding(args) -> None:
    print("\n## Embedding time and peak memory (2 mm model grid, one process per run, untrained weights "
          "for the variant rows: speed/memory do not depend on the weights)")
    print("\n".join(header([("volume", "<44"), ("variant", "<7"), ("model grid z,y,x", "<16"), ("slabs", ">5"),
                             ("seconds", ">7"), ("peak RSS GB", ">11"), ("RSS increase GB", ">15")])))
    rows = [(k, SHARED / p, {}) for k, p in CT_FILES.items()]
    body = SHARED / CT_FILES["chest-abdomen CT (totalseg_example, 3 mm)"]
    rows.insert(0, ("chest-abdomen CT cut to 96x160x160 @2 mm", body, {"shape_zyx": [96, 160, 160]}))
    rows.append(("long scan 560x180x180 @2 mm (real CT stacked)", body, {"shape_zyx": [560, 180, 180]}))
    variants = ["lite"] if args.quick else ["lite", "full"]
    for name, path, extra in rows:
        if not path.exists():
            print(f"| {name:<44} | skipped: {path} not available")
            continue
        for variant in variants:
            r = run_child({"path": str(path), "model": variant, **extra})
            if "error" in r:
                print(f"| {name:<44} | {variant:<7} | error: {r['error']}")
                continue
            print(f"| {name:<44} | {variant:<7} | {','.join(map(str, r['model_grid'])):<16} | {r['slabs']:>5} | "
                  f"{r['seconds']:>7.2f} | {r['peak_rss_gb']:>11.2f} | {r['rss_increase_gb']:>15.2f} |")


def part_matching(args) -> None:
    from samv2core.embed import Embedder
    from samv2core.matching import match_points
    from samv2core.models import resolve_model
    from samv2core.preprocess import body_mask
    from samv2core.simulate import simulate_followup
    from samv2core.volume import load_volume

    resolved = resolve_model(args.model, allow_untrained=True)
    print(f"\n## Matching on SIMULATED follow-ups of real CTs (model: {resolved.label})")
    print("Follow-up = real CT + known rigid motion (<=4 deg, <=8 mm) + smooth deformation (peak 5 mm) + "
          "2% noise + 5% contrast change; error = distance to the exactly known true position.")
    embedder = Embedder(resolved.model, device="cpu")
    print("\n".join(header([("CT", "<44"), ("method", "<11"), ("points", ">6"), ("median mm", ">9"), ("mean mm", ">7"),
                             ("p90 mm", ">6"), ("CPM@10mm", ">8"), ("confident", ">9"), ("ms/point", ">8")])))
    all_err = {"nn": [], "fixed_point": []}
    for name, rel in CT_FILES.items():
        path = SHARED / rel
        if not path.exists():
            print(f"| {name:<44} | skipped: {path} not available")
            continue
        vol = load_volume(path)
        pair = simulate_followup(vol, seed=7)
        mask = body_mask(vol)
        z = vol.array.shape[0]
        mask[: max(1, z // 6)] = False
        mask[z - max(1, z // 6):] = False
        rng = np.random.default_rng(0)
        cand = np.argwhere(mask)
        pts = vol.index_to_lps(cand[rng.choice(len(cand), args.points, replace=False)][:, ::-1].astype(float))
        truth = pair.map_points(pts)
        inside = pair.followup.contains_lps(truth)
        pts, truth = pts[inside], truth[inside]
        te = embedder.embed(vol)
        qe = embedder.embed(pair.followup)
        for method in ("nn", "fixed_point"):
            # one click at a time, as a user does
            res, times = time_each(lambda p: match_points(te, qe, p[None], method=method)[0], pts)
            err = np.linalg.norm(np.array([r.query_point.xyz for r in res]) - truth, axis=1)
            all_err[method].extend(err)
            print(f"| {name:<44} | {method:<11} | {len(err):>6} | {np.median(err):>9.2f} | {err.mean():>7.2f} | "
                  f"{np.percentile(err, 90):>6.2f} | {100 * np.mean(err <= 10):>7.1f}% | "
                  f"{100 * np.mean([r.confident for r in res]):>8.0f}% | {1000 * np.median(times):>8.1f} |")
    for method, errs in all_err.items():
        if errs:
            e = np.array(errs)
            print(f"| {'ALL':<44} | {method:<11} | {len(e):>6} | {np.median(e):>9.2f} | {e.mean():>7.2f} | "
                  f"{np.percentile(e, 90):>6.2f} | {100 * np.mean(e <= 10):>7.1f}% | {'':>9} | {'':>8} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="weights to evaluate (default: bundled model, else untrained lite)")
    ap.add_argument("--points", type=int, default=30, help="points per CT")
    ap.add_argument("--quick", action="store_true", help="lite variant only")
    ap.add_argument("--skip-embedding", action="store_true")
    args = ap.parse_args()
    import torch

    print_machine_load()
    print(f"# samv2core benchmark — torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs, CUDA {'yes' if torch.cuda.is_available() else 'no'}")
    if not SHARED.is_dir():
        print(f"real data not available at {SHARED}: nothing to benchmark")
        return
    if not args.skip_embedding:
        part_embedding(args)
    part_matching(args)


if __name__ == "__main__":
    main()
