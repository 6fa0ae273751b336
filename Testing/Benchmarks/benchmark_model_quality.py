"""Model-quality benchmark: point-matching accuracy of embedding models on real CT scans.

Prints one table with, for each method,
  * matching error on SIMULATED follow-ups (samv2core.simulate: known rigid motion + smooth
    deformation + contrast change + noise) of a real CT that was NOT used for training
    (default: ../shared/data/ct/totalseg_aorta, held out from the bundled model's training):
    mean / median / 90th percentile error (mm) and CPM@10mm (share of points within 10 mm);
  * cross-patient matching of organ centroids between the real CTs that have TotalSegmentator
    labels (example CT <-> DICOM CT <-> aorta CT for the structures they share): median
    centroid error (mm) and the share of matches landing inside the same organ mask.
    These are different patients and partial fields of view, so centroids of cut organs do
    not correspond exactly: read it as a coarse, relative comparison.

Methods: (a) the untrained lite network (random init, seed 0), (b) the bundled model with NN
matching, (c) the bundled model with fixed-point matching (also appearance-heads-only
variants), (d) a training-free baseline: MIND-SSC descriptors (multi-scale) with the same
matcher. No timing targets here; run: ``python Testing/Benchmarks/benchmark_model_quality.py``.
Use ``--json FILE`` to save the numbers (the model card quotes them).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for repo_paths
from bench_table import print_machine_load
from repo_paths import REPO, SHARED


def shared_data() -> Path:
    return SHARED


# --- descriptors -------------------------------------------------------------------------------
_MIND_CACHE: dict = {}


def mind_embeddings(template_emb):
    """MIND-SSC descriptors for ``template_emb``'s volume (cached per volume)."""
    key = id(template_emb.model_volume)
    if key not in _MIND_CACHE:
        _MIND_CACHE[key] = (template_emb.model_volume, _mind_embeddings(template_emb))
    return _MIND_CACHE[key][1]


def _mind_embeddings(template_emb):
    """MIND-SSC descriptors (samv2core.registration.mind_features) on the same fine and coarse
    grids as ``template_emb`` (coarse cells of the network's (4, 16, 16) stride, coarse descriptor
    on the full-resolution grid: the baseline as published in the model card)."""
    from samv2core.registration.mind_features import mind_embeddings as core_mind

    emb = core_mind(template_emb.model_volume, coarse_stride=(4, 16, 16), coarse_downsample=1)
    assert emb.fine_grid == template_emb.fine_grid and emb.coarse_grid.shape == template_emb.coarse_grid.shape
    return emb


def appearance_only(emb):
    """The same embeddings without the semantic head (fine + coarse matching, as SAM)."""
    from samv2core.embed import Embeddings

    dims = [(h, d) for h, d in emb.head_dims if h != "semantic"]
    keep = sum(d for _, d in dims)
    return Embeddings(emb.rows[:, :keep], tuple(dims), emb.coarse, emb.fine_grid, emb.coarse_grid,
                      emb.model_volume, emb.model_id + "-appearance", dict(emb.meta))


# --- tasks -----------------------------------------------------------------------------------
def followup_points(baseline, pair, n: int, seed: int, margin_mm: float = 12.0) -> tuple[np.ndarray, np.ndarray]:
    """n random body points of the baseline whose true follow-up position is well inside the follow-up."""
    from samv2core.preprocess import body_mask

    rng = np.random.default_rng(seed)
    mask = body_mask(baseline)
    idx = np.argwhere(mask)  # (z, y, x)
    pts, truth = [], []
    tries = 0
    while len(pts) < n and tries < 50 * n:
        tries += 1
        z, y, x = idx[rng.integers(len(idx))]
        p = baseline.index_to_lps(np.array([x, y, z], float) + rng.uniform(-0.5, 0.5, 3))
        # far enough from the baseline border too (the descriptor context must exist)
        if not baseline.contains_lps(p - 0, tolerance_voxels=0.0):
            continue
        ijk = baseline.lps_to_index(p)
        size = np.asarray(baseline.size_xyz)
        if np.any(ijk * np.asarray(baseline.spacing) < margin_mm) or np.any(
                (size - 1 - ijk) * np.asarray(baseline.spacing) < margin_mm):
            continue
        q = pair.map_points(p[None])[0]
        fijk = pair.followup.lps_to_index(q)
        fsize = np.asarray(pair.followup.size_xyz)
        sp = np.asarray(pair.followup.spacing)
        if np.any(fijk * sp < margin_mm) or np.any((fsize - 1 - fijk) * sp < margin_mm):
            continue
        pts.append(p)
        truth.append(q)
    return np.asarray(pts), np.asarray(truth)


def errors_for(template_emb, query_emb, pts, truth, method: str) -> np.ndarray:
    from samv2core.matching import match_points

    res = match_points(template_emb, query_emb, pts, method=method)
    found = np.array([r.query_point.as_array() for r in res])
    return np.linalg.norm(found - truth, axis=1)


def label_centroids(label_path: Path, image_volume, ids_map: dict) -> dict:
    """{structure name: (centroid LPS, mask Volume)} for labels in ``ids_map`` (name -> id or file)."""
    import SimpleITK as sitk

    from samv2core.volume import Volume

    out = {}
    for name, spec in ids_map.items():
        if isinstance(spec, Path):
            img = sitk.ReadImage(str(spec))
            arr = sitk.GetArrayFromImage(img) > 0
        else:
            img = sitk.ReadImage(str(label_path))
            arr = sitk.GetArrayFromImage(img) == spec
        if arr.sum() < 20:
            continue
        vol = Volume.from_sitk(img, "CT", name=name)
        zyx = np.argwhere(arr).mean(0)
        out[name] = (vol.index_to_lps(zyx[::-1]), vol.with_array(arr.astype(np.float32)))
    return out


def inside_mask(mask_vol, lps: np.ndarray, tol_mm: float = 3.0) -> bool:
    ijk = mask_vol.lps_to_index(lps)
    tol = np.ceil(tol_mm / np.asarray(mask_vol.spacing)).astype(int)
    c = np.rint(ijk).astype(int)
    a = mask_vol.array
    lo = np.maximum(c - tol, 0)
    hi = np.minimum(c + tol + 1, np.asarray(mask_vol.size_xyz))
    if np.any(lo >= hi):
        return False
    return bool(a[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]].any())


# --- main ------------------------------------------------------------------------------------
def summarise(err: np.ndarray) -> dict:
    e = np.asarray(err, float)
    return {"n": int(len(e)), "mean": float(e.mean()), "median": float(np.median(e)),
            "p90": float(np.percentile(e, 90)), "cpm10": float(np.mean(e <= 10.0))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="weights to evaluate as 'bundled' (default: the bundled model)")
    ap.add_argument("--heldout", help="held-out CT for simulated follow-ups (default: ct/totalseg_aorta)")
    ap.add_argument("--followups", type=int, default=3, help="simulated follow-ups (seeds 0..N-1)")
    ap.add_argument("--points", type=int, default=40, help="points per follow-up")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", help="write the numbers to this JSON file")
    ap.add_argument("--no-cross-patient", action="store_true", help="skip the cross-patient centroid task")
    ap.add_argument("--no-baselines", action="store_true", help="only the evaluated model (quick checks)")
    ap.add_argument("--mr-like", action="store_true",
                    help="cross-modality variant: the simulated follow-ups get an MR-like contrast (CT -> MR-like)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print_machine_load()

    from samv2core.embed import Embedder
    from samv2core.errors import CheckpointError
    from samv2core.model_io import bundled_model_path, load_model
    from samv2core.network import NetConfig, build_network
    from samv2core.simulate import simulate_followup
    from samv2core.volume import load_volume

    data = shared_data()
    heldout = Path(args.heldout) if args.heldout else data / "ct" / "totalseg_aorta" / "ct_1.5mm.nii.gz"
    if not heldout.exists():
        print(f"benchmark_model_quality: skipped, held-out CT not available: {heldout}")
        return 0
    if args.model:
        model_path = Path(args.model)
    else:
        try:
            model_path = bundled_model_path()
        except CheckpointError:
            model_path = REPO / "SAMv2Core" / "samv2core" / "models" / "samv2_lite.safetensors"
    t0 = time.time()
    torch.manual_seed(0)
    untrained = build_network(NetConfig.lite()).eval()
    models = {"untrained": Embedder(untrained, device="cpu", precision="fp32", storage_dtype=torch.float32,
                                    model_id="untrained-lite-seed0")}
    have_model = model_path.is_file()
    if have_model:
        loaded = load_model(model_path, device="cpu")
        models["bundled"] = Embedder(loaded, device="cpu", precision="fp32", storage_dtype=torch.float32)
    else:
        print(f"note: no trained model at {model_path}; only the untrained network and MIND-SSC are measured")

    # rows: (label, model key, transform of the embeddings, matching method)
    rows = [("(a) untrained network, NN", "untrained", None, "nn"),
            ("(a) untrained network, fixed-point", "untrained", None, "fixed_point")]
    if have_model:
        rows += [("(b) bundled model, NN", "bundled", None, "nn"),
                 ("(c) bundled model, fixed-point", "bundled", None, "fixed_point"),
                 ("(b') bundled, appearance heads only, NN", "bundled", appearance_only, "nn"),
                 ("(c') bundled, appearance heads only, fixed-point", "bundled", appearance_only, "fixed_point")]
    rows += [("(d) MIND-SSC (training-free), NN", "untrained", mind_embeddings, "nn"),
             ("(d) MIND-SSC (training-free), fixed-point", "untrained", mind_embeddings, "fixed_point")]

    if args.no_baselines and have_model:
        rows = [r for r in rows if r[1] == "bundled" and r[2] is None]
        models.pop("untrained")
    # --- task 1: simulated follow-ups of the held-out CT ---------------------------------------
    base = load_volume(heldout, "CT")
    fu_err = {r[0]: [] for r in rows}
    for seed in range(args.followups):
        pair = simulate_followup(base, seed=seed, mr=args.mr_like)
        pts, truth = followup_points(base, pair, args.points, seed=100 + seed)
        embs = {k: (e.embed(base), e.embed(pair.followup)) for k, e in models.items()}
        for label, key, tf, method in rows:
            a, b = embs[key]
            if tf is not None:
                a, b = tf(a), tf(b)
            fu_err[label].extend(errors_for(a, b, pts, truth, method))
    # --- task 2: cross-patient organ centroids ------------------------------------------------
    ex_img = data / "ct" / "totalseg_example" / "ct_3mm_30slices.nii.gz"
    ex_seg = data / "ct" / "totalseg_example" / "seg_3mm_30slices.nii.gz"
    dc_img = data / "ct" / "totalseg_dicom" / "dicom"
    dc_seg = data / "ct" / "totalseg_dicom" / "seg.nii.gz"
    ao_dir = data / "ct" / "totalseg_aorta" / "masks"
    cp_err = {r[0]: [] for r in rows}
    cp_hit = {r[0]: [] for r in rows}
    cp_pairs = []
    if ex_seg.exists() and dc_seg.exists() and not args.no_cross_patient:
        import SimpleITK as sitk

        ex_ids = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(ex_seg)))).tolist()) - {0}
        dc_ids = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(dc_seg)))).tolist()) - {0}
        common = sorted(ex_ids & dc_ids)
        vols = {"example": load_volume(ex_img, "CT"), "dicom": load_volume(dc_img, "CT"), "aorta": base}
        cents = {"example": label_centroids(ex_seg, vols["example"], {f"label{i}": int(i) for i in common}),
                 "dicom": label_centroids(dc_seg, vols["dicom"], {f"label{i}": int(i) for i in common})}
        # TotalSegmentator v2 ids: 52 aorta, 32 vertebrae_T12 (the aorta CT has these as binary masks)
        ao_map = {"label52": ao_dir / "aorta.nii.gz", "label32": ao_dir / "vertebrae_T12.nii.gz"}
        if all(p.exists() for p in ao_map.values()):
            cents["aorta"] = label_centroids(Path(), base, ao_map)
        for a_name, b_name in (("example", "dicom"), ("dicom", "example"), ("aorta", "example"),
                               ("aorta", "dicom"), ("example", "aorta"), ("dicom", "aorta")):
            if a_name not in cents or b_name not in cents:
                continue
            names = sorted(set(cents[a_name]) & set(cents[b_name]))
            if not names:
                continue
            pts = np.array([cents[a_name][n][0] for n in names])
            truth = np.array([cents[b_name][n][0] for n in names])
            masks = [cents[b_name][n][1] for n in names]
            cp_pairs.append(f"{a_name}->{b_name} ({len(names)})")
            embs = {k: (e.embed(vols[a_name]), e.embed(vols[b_name])) for k, e in models.items()}
            for label, key, tf, method in rows:
                ea, eb = embs[key]
                if tf is not None:
                    ea, eb = tf(ea), tf(eb)
                from samv2core.matching import match_points

                res = match_points(ea, eb, pts, method=method)
                found = np.array([r.query_point.as_array() for r in res])
                cp_err[label].extend(np.linalg.norm(found - truth, axis=1))
                cp_hit[label].extend(inside_mask(m, f) for m, f in zip(masks, found))

    # --- report ----------------------------------------------------------------------------------
    print()
    print(f"Model quality benchmark ({time.time() - t0:.0f} s). Follow-ups are SIMULATED from the real held-out CT "
          f"{heldout.relative_to(data) if heldout.is_relative_to(data) else heldout} "
          f"({args.followups} follow-ups x {args.points} points; known rigid+deformable motion"
          + ("; MR-like contrast: CT -> MR-like cross-modality matching" if args.mr_like else "") + ").")
    print(f"Model evaluated as 'bundled': {model_path if have_model else 'none'}")
    print(f"Cross-patient organ centroids (real CTs, TotalSegmentator labels): {', '.join(cp_pairs) or 'n/a'}")
    hdr = (f"{'method':<52s} | {'FU mean':>7s} {'median':>7s} {'p90':>7s} {'CPM@10':>7s} | "
           f"{'XP median':>9s} {'XP mean':>8s} {'in-organ':>8s}")
    print(hdr)
    print("-" * len(hdr))
    results = {}
    for label, *_ in rows:
        fu = summarise(fu_err[label])
        xp = summarise(cp_err[label]) if cp_err[label] else None
        hit = float(np.mean(cp_hit[label])) if cp_hit[label] else float("nan")
        results[label] = {"followup": fu, "cross_patient": xp, "cross_patient_in_organ": hit}
        xs = (f"{xp['median']:9.1f} {xp['mean']:8.1f} {100 * hit:7.0f}%" if xp else f"{'n/a':>9s} {'':8s} {'':8s}")
        print(f"{label:<52s} | {fu['mean']:7.2f} {fu['median']:7.2f} {fu['p90']:7.2f} {100 * fu['cpm10']:6.1f}% | {xs}")
    print("FU = simulated follow-ups of the held-out CT (errors in mm); XP = cross-patient organ centroids "
          "(mm; in-organ = match inside the same structure's mask, 3 mm tolerance).")
    if args.json:
        out = {"heldout": str(heldout), "model": str(model_path) if have_model else None, "mr_like": args.mr_like,
               "followups": args.followups, "points_per_followup": args.points, "cross_patient_pairs": cp_pairs,
               "simulated_followups": True, "results": results}
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
