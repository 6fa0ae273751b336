"""Verified linear registration benchmark (issue 12): is a result ever accepted and wrong?

Run:  python Testing/Benchmarks/benchmark_registration_verified.py [--quick] [--no-peers] [--peers-only]
      [--features auto|sam|mind] [--model WEIGHTS] [--only REGEX] [--seeds N ...] [--cache DIR]
      [--json OUT]

Protocol (all pairs SIMULATED from real scans of ../shared/data with an exactly known rigid
motion; no real follow-up exists in the data):
* fixed = the real scan on its own native grid;
* moving = an OFF-CENTRE field-of-view crop of it (35-50% of the extent along the scan's longest
  axis, 75-100% along the others, pushed towards one end), moved by a rigid motion (rotation
  5-20 deg about a random axis, translation 60-120 mm) and resampled onto ITS OWN voxel grid
  (axes rotated with the motion, its own spacing), with noise and a contrast change;
* kinds: CT->CT (same modality), CT->MR-like (``samv2core.simulate.mr_like``, a non-monotonic
  CT-to-T1-like intensity map, flagged MR), MR->MR (brain / abdomen MRs, gamma + gain remap);
* plus the prostate pair: the real same-patient T2 (fixed) and DWI (moving), which are
  scanner-aligned, with the DWI moved by a known rigid motion (a real cross-contrast pair).

Per pair: wall time of ``register(mode='rigid')`` (embedding included, nothing cached), whether
it was accepted (a refusal is a RegistrationError with a one-line reason), and the mean point
error over fixed-body points (every 12 mm) whose true position lies inside the moving image.
A SILENT FAILURE is a pair accepted with a mean error above 5 mm: the target is none.

Peer: ANTs Rigid (``ants.registration`` defaults: Mattes MI, centre-of-mass start, 4-level
pyramid) on the native grids, in a subprocess with ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS set
(``--threads``; torch gets the same number). ANTs rows are cached in ``--cache`` (they do not
depend on this project's code), so ``--peers-only`` can run them ahead in the background.
"""
from __future__ import annotations

import os

THREADS = os.environ.get("SAMV2_BENCH_THREADS", "1")
os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", THREADS)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from scipy.spatial.transform import Rotation  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for repo_paths
from bench_table import fitted_table, fmt, print_machine_load  # noqa: E402
from benchmark_registration import run_ants  # noqa: E402  (one home for the peer runners)
from repo_paths import SHARED  # noqa: E402
from samv2core.preprocess import body_mask, resample_to_model_grid  # noqa: E402
from samv2core.registration.sampling import grid_points_in_mask  # noqa: E402
from samv2core.simulate import rigidly_moved, simulate_offcentre_pair  # noqa: E402
from samv2core.volume import Volume, load_volume  # noqa: E402

PROTOCOL = "v1"
SILENT_MM = 5.0

# (name, path under shared/data, modality)
SOURCES = {
    "ct3mm": ("ct/totalseg_example/ct_3mm.nii.gz", "CT"),
    "lung1": ("ct/radiomics_lung1/image.nrrd", "CT"),
    "aorta": ("ct/totalseg_aorta/ct_1.5mm.nii.gz", "CT"),
    "brain_t1": ("mr/brain_t1_niivue_chris.nii.gz", "MR"),
    "brain_flair": ("mr/brain_flair_niivue.nii.gz", "MR"),
    "abdomen_mr": ("mr/abdomen_mr_totalseg_3mm.nii.gz", "MR"),
}


@dataclass
class Pair:
    name: str
    kind: str  # "CT->CT", "CT->MR-like", "MR->MR", "T2->DWI"
    fixed: Volume
    moving: Volume
    truth: np.ndarray  # 4x4 fixed LPS -> moving LPS
    points: np.ndarray = field(default=None)  # fixed LPS evaluation points
    truth_points: np.ndarray = field(default=None)
    params: dict = field(default_factory=dict)


def _load(name: str) -> Volume:
    path, modality = SOURCES[name]
    v = load_volume(SHARED / path, modality)
    return Volume(v.array, v.spacing, v.origin, v.direction, modality, name, dict(v.meta))


CONTRAST = {"CT->CT": "same", "CT->MR-like": "mr-like", "MR->MR": "gamma"}


def make_pair(source: Volume, kind: str, seed: int) -> Pair:
    sim = simulate_offcentre_pair(source, seed, CONTRAST[kind])
    truth = sim.truth_matrix()  # fixed (the real scan) -> moving (the follow-up)
    moving = Volume(sim.followup.array, sim.followup.spacing, sim.followup.origin, sim.followup.direction,
                    sim.followup.modality, f"{source.name}_{kind}_{seed}")
    return Pair(f"{source.name} {kind} s{seed}", kind, source, moving, truth, params=dict(sim.params))


def prostate_pair(seed: int = 0) -> Pair:
    """Real same-patient T2 (fixed) and DWI (moving), scanner-aligned; the DWI is moved by a known
    rigid motion (8-12 deg, 15-25 mm) and resampled on its own moved grid."""
    t2 = load_volume(SHARED / "mr" / "prostate_t2_monai.nii.gz", "MR")
    dwi = load_volume(SHARED / "mr" / "prostate_dwi_monai_same_patient.nii.gz", "MR")
    t2 = Volume(t2.array, t2.spacing, t2.origin, t2.direction, "MR", "prostate_t2", dict(t2.meta))
    dwi = Volume(dwi.array, dwi.spacing, dwi.origin, dwi.direction, "MR", "prostate_dwi", dict(dwi.meta))
    moving, truth = rigidly_moved(dwi, seed, name="prostate_dwi_moved")
    centre = dwi.corners_lps().mean(0)
    params = {"seed": seed, "rotation_deg": round(float(np.degrees(Rotation.from_matrix(truth[:3, :3]).magnitude())), 2),
              "offset_mm": round(float(np.linalg.norm(truth[:3, :3] @ centre + truth[:3, 3] - centre)), 1)}
    # both are flagged MR: the default ('auto') term for two MRs is MIND-SSC, which T2 vs DWI needs
    return Pair(f"prostate T2 <- DWI s{seed}", "T2->DWI", t2, moving, truth, params=params)


def eval_points(pair: Pair, spacing_mm: float = 12.0) -> None:
    """Fixed-body points (every ``spacing_mm``) whose true position lies inside the moving image."""
    fm = resample_to_model_grid(pair.fixed, 2.0)
    pts = grid_points_in_mask(fm, body_mask(fm), spacing_mm, border_mm=6.0, max_points=None)
    truth = pts @ pair.truth[:3, :3].T + pair.truth[:3, 3]
    keep = pair.moving.contains_lps(truth, tolerance_voxels=-2.0)
    pair.points, pair.truth_points = pts[keep], truth[keep]


def build_pairs(quick: bool = False, seeds: tuple = (1, 2, 3)) -> list[Pair]:
    """The 24 pairs (CT sources x 2 kinds x 3 seeds, MR sources x 2 seeds) of ``seeds``; other
    seeds give fresh pairs of the same protocol (the MR sources use the first two)."""
    ct, mr = tuple(seeds), tuple(seeds)[:2]
    plan = [("ct3mm", "CT->CT", s) for s in ct] + [("ct3mm", "CT->MR-like", s) for s in ct] \
        + [("lung1", "CT->CT", s) for s in ct] + [("lung1", "CT->MR-like", s) for s in ct] \
        + [("aorta", "CT->CT", s) for s in ct] + [("aorta", "CT->MR-like", s) for s in ct] \
        + [("brain_t1", "MR->MR", s) for s in mr] + [("brain_flair", "MR->MR", s) for s in mr] \
        + [("abdomen_mr", "MR->MR", s) for s in mr]
    if quick:
        plan = [p for p in plan if p[2] == seeds[0]]
        mr = mr[:1]
    sources: dict[str, Volume] = {}
    pairs = []
    for name, kind, seed in plan:
        if name not in sources:
            sources[name] = _load(name)
        pairs.append(make_pair(sources[name], kind, seed))
    pairs += [prostate_pair(s - 1) for s in mr]  # the real T2 / DWI pair, one known motion per MR seed
    for p in pairs:
        eval_points(p)
    return pairs


# --- methods ----------------------------------------------------------------------------------------
def point_error(map_points, pair: Pair) -> tuple[float, float]:
    err = np.linalg.norm(map_points(pair.points) - pair.truth_points, axis=1)
    return float(err.mean()), float(err.max())


def ants_worker(folder: str) -> int:
    """Subprocess: ANTs Rigid on a saved pair; prints JSON (seconds, err_mean, err_max)."""
    f = Volume.from_sitk(sitk.ReadImage(str(Path(folder) / "fixed.nii.gz")), "auto", "fixed")
    m = Volume.from_sitk(sitk.ReadImage(str(Path(folder) / "moving.nii.gz")), "auto", "moving")
    pair = Pair("", "", f, m, np.eye(4), np.load(Path(folder) / "points.npy"), np.load(Path(folder) / "truth.npy"))
    mapping, sec, _, _ = run_ants(None, "ANTs Rigid", f, m)
    mean, mx = point_error(mapping.points, pair)
    print(json.dumps({"seconds": sec, "err_mean": mean, "err_max": mx}))
    return 0


def run_ants_cached(pair: Pair, cache: Path, threads: str, cached_only: bool = False) -> dict:
    key = f"{PROTOCOL}|{pair.name}|{pair.params}"
    store = cache / "ants_rigid.json"
    done = json.loads(store.read_text()) if store.exists() else {}
    if key in done or cached_only:
        return done.get(key, {})
    folder = cache / pair.name.replace(" ", "_").replace(">", "").replace("<", "")
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(pair.fixed.to_sitk(), str(folder / "fixed.nii.gz"))
    sitk.WriteImage(pair.moving.to_sitk(), str(folder / "moving.nii.gz"))
    np.save(folder / "points.npy", pair.points)
    np.save(folder / "truth.npy", pair.truth_points)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--ants-worker", str(folder)],
                          capture_output=True, text=True, cwd=str(folder), timeout=1800,
                          env=dict(os.environ, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=threads))
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        row = {"failed": tail[:120]}
    else:
        row = json.loads(proc.stdout.strip().splitlines()[-1])
    done = json.loads(store.read_text()) if store.exists() else {}
    done[key] = row
    store.write_text(json.dumps(done, indent=1))
    return row


class SamMethod:
    """register(mode='rigid') with the bundled model, embeddings computed afresh for every pair."""

    def __init__(self, features: str, device: str = "cpu", model: str | None = None):
        from samv2core.session import EmbeddingSession

        self.embedder = EmbeddingSession.open(model, device=device)
        self.label = self.embedder.label
        self.features = features

    def run(self, pair: Pair) -> dict:
        from samv2core.errors import RegistrationError
        from samv2core.registration import RegistrationOptions, register

        self.embedder.clear_cache()
        t = time.perf_counter()
        try:
            res = register(pair.fixed, pair.moving, mode="rigid", embedder=self.embedder,
                           options=RegistrationOptions(features=self.features, device="cpu"))
        except RegistrationError as exc:
            return {"seconds": time.perf_counter() - t, "accepted": False, "reason": str(exc)}
        sec = time.perf_counter() - t
        mean, mx = point_error(res.transform_points, pair)
        rep = res.report
        return {"seconds": sec, "accepted": True, "err_mean": mean, "err_max": mx, "features": rep["features"],
                "verification": rep.get("verification", {}).get("summary", ""), "timing": rep["timing"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one seed per source (9 pairs + prostate)")
    ap.add_argument("--no-peers", action="store_true", help="no ANTs column")
    ap.add_argument("--peers-only", action="store_true", help="only run (and cache) ANTs Rigid")
    ap.add_argument("--cached-peers", action="store_true", help="ANTs rows from the cache only (no new ANTs runs)")
    ap.add_argument("--features", default="auto", choices=["auto", "sam", "mind"])
    ap.add_argument("--model", help="a weights file to evaluate instead of the bundled model")
    ap.add_argument("--only", help="only pairs whose name matches this regular expression")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                    help="simulation seeds (default 1 2 3, the reported pairs; others give fresh pairs)")
    ap.add_argument("--cache", default="/tmp/samv2_regbench_verified", help="ANTs results and saved pairs")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--table-from", nargs="+", help="print the table from rows written by --json (several runs)")
    ap.add_argument("--ants-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ants_worker:
        return ants_worker(args.ants_worker)
    import torch

    torch.set_num_threads(int(THREADS))
    print_machine_load()
    if not SHARED.is_dir():
        print(f"the benchmark needs the real data in {SHARED}", file=sys.stderr)
        return 1
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if args.table_from:
        rows = [r for f in args.table_from for r in json.loads(Path(f).read_text())]
        print_table(rows, "bundled model (rows from " + ", ".join(args.table_from) + ")", args.features)
        return 0
    pairs = build_pairs(args.quick, tuple(args.seeds))
    if args.only:
        pairs = [p for p in pairs if re.search(args.only, p.name)]
    sam = None if args.peers_only else SamMethod(args.features, model=args.model)
    rows = []
    for p in pairs:
        row = {"pair": p.name, "kind": p.kind, "points": int(len(p.points)), **p.params}
        if sam is not None:
            row["sam"] = sam.run(p)
        if not args.no_peers:
            row["ants"] = run_ants_cached(p, cache, THREADS, args.cached_peers)
        rows.append(row)
        s, a = row.get("sam", {}), row.get("ants", {})
        print(f"[{time.perf_counter() - t_all:6.0f} s] {p.name}: SAM {'ok' if s.get('accepted') else 'refused'} "
              f"err {fmt(s.get('err_mean'))} {fmt(s.get('seconds'), 1)} s {s.get('features', s.get('reason', ''))[:90]}"
              f" | ANTs err {fmt(a.get('err_mean'))} {fmt(a.get('seconds'), 1)} s", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1, default=str))
    if sam is None:
        return 0
    print_table(rows, sam.label, args.features)
    print(f"total benchmark time {time.perf_counter() - t_all:.0f} s")
    return 0


def print_table(rows: list, label: str, features: str) -> None:
    print(f"\nVerified rigid registration - {len(rows)} pairs SIMULATED from real scans (known motion); "
          f"model: {label}; features={features}; threads: torch {THREADS}, ITK {THREADS}")
    head = ["pair", "rot deg", "offset mm", "FOV", "ours s", "accepted", "err mm", "features / reason", "ANTs s",
            "ANTs err"]
    table = []
    for r in rows:
        s, a = r["sam"], r.get("ants", {})
        table.append([r["pair"], fmt(r.get("rotation_deg"), 1), fmt(r.get("offset_mm"), 0),
                      fmt(r.get("fov_fraction_longest_axis")), fmt(s["seconds"], 1), "yes" if s["accepted"] else "no",
                      fmt(s.get("err_mean")), (s.get("features") or s.get("reason", ""))[:70],
                      fmt(a.get("seconds"), 1), fmt(a.get("err_mean"))])
    print("\n".join(fitted_table(head, table)))
    acc = [r for r in rows if r["sam"]["accepted"]]
    silent = [r for r in acc if r["sam"]["err_mean"] > SILENT_MM]
    errs = [r["sam"]["err_mean"] for r in acc]
    ours_t = [r["sam"]["seconds"] for r in rows]
    ants_t = [r["ants"]["seconds"] for r in rows if "seconds" in r.get("ants", {})]
    ants_e = [r["ants"]["err_mean"] for r in rows if "err_mean" in r.get("ants", {})]
    print(f"\nsilent failures (accepted and > {SILENT_MM:g} mm off): {len(silent)}"
          + (f"  <- {', '.join(r['pair'] for r in silent)}" if silent else ""))
    print(f"accepted: {len(acc)}/{len(rows)} ({100 * len(acc) / len(rows):.0f}%); refused: "
          f"{len(rows) - len(acc)}")
    if errs:
        print(f"point error over accepted pairs: median {np.median(errs):.2f} mm, max {max(errs):.2f} mm")
    print(f"time per pair, ours: median {np.median(ours_t):.1f} s, max {max(ours_t):.1f} s")
    if ants_t:
        print(f"time per pair, ANTs Rigid (native): median {np.median(ants_t):.1f} s, max {max(ants_t):.1f} s; "
              f"error median {np.median(ants_e):.2f} mm, max {max(ants_e):.2f} mm, > {SILENT_MM:g} mm: "
              f"{sum(e > SILENT_MM for e in ants_e)} (over the {len(ants_t)} pairs with an ANTs row)")


if __name__ == "__main__":
    sys.exit(main())
