"""Follow-up reading of every lesion at once (issue 25) on SIMULATED multi-lesion pairs.

Each pair is made from a real CT of ../shared/data: the real lung tumour of radiomics_lung1
(where the scan has it) plus 2-7 inserted ellipsoidal lesions of 5-30 mm diameter with realistic
HU (solid nodules of ~30 HU in lung, lesions 50 HU darker than the organ in soft tissue). On the
follow-up one lesion vanished, one grew, one shrank, two sit 15 mm apart, the tumour grew by
2 mm and one new lesion appeared; then the hard follow-up protocol (``simulate_hard_followup``:
own voxel grid, 85% z coverage, rigid motion, B-spline deformation, contrast phase, noise).
The tracker gets the baseline lesions as a label map (segments) and, as the user's candidate
regions, the follow-up's true lesion label map.

Reported (all on simulated follow-ups): per-lesion CPM@10mm and DLT's CPM (within
min(radius, 10 mm)), error of found centres, status accuracy, identity swaps, follow-up volume
and volume-change error, and the time for the lesions of a pair (the machine is shared: loaded).

    python Testing/Benchmarks/benchmark_lesions.py --scans lung1 aorta --seeds 0 1 2
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_table import fitted_table, print_machine_load  # noqa: E402

from samv2core.lesion_tracking import lesions_from_label_map, track_lesions  # noqa: E402
from samv2core.session import EmbeddingSession  # noqa: E402
from samv2core.simulate import insert_lesion, simulate_hard_followup  # noqa: E402
from samv2core.volume import Volume, load_volume  # noqa: E402

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "ct"
SCANS = {"lung1": ("radiomics_lung1/image.nrrd", "radiomics_lung1/tumor_label.nrrd"),
         "aorta": ("totalseg_aorta/ct_1.5mm.nii.gz", None),
         "spleen": ("msd_spleen2/ct.nii.gz", None)}
NEW_LABEL = 99


def _place(ct: Volume, body: np.ndarray, placed: list, radius: float, rng, near=None) -> tuple:
    """A centre for a lesion of ``radius``: in lung (median < -600 HU) or soft tissue (0..100 HU),
    clear of the lesions ``placed`` (centre, radius); ``near``: exactly 15 mm from this centre."""
    sp = np.asarray(ct.spacing)[::-1]
    inner = np.argwhere(ndimage.distance_transform_edt(body, sampling=sp) > radius + 12)
    for _ in range(4000):
        if near is None:
            c = ct.index_to_lps(inner[rng.integers(len(inner))][::-1].astype(float))
        else:
            d = rng.normal(size=3)
            d[2] *= 0.3  # mostly in-plane: thick slices
            c = np.asarray(near) + 15.0 * d / np.linalg.norm(d)
        k = np.rint(ct.lps_to_index(c)).astype(int)
        if np.any(k < 0) or np.any(k >= ct.size_xyz) or not body[k[2], k[1], k[0]]:
            continue
        if any(np.linalg.norm(c - p) < r + radius + (2 if near is not None else 10) for p, r in placed
               if near is None or np.linalg.norm(p - near) > 1):
            continue
        lo, hi = np.maximum(k - 2, 0), k + 3
        med = float(np.median(ct.array[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]]))
        if med < -600:
            return c, 30.0
        if 0 <= med <= 100:
            return c, med - 50.0
    raise RuntimeError("no place for a lesion")


def make_case(ct: Volume, tumour: "np.ndarray | None", seed: int, n_lesions: "int | None" = None) -> dict:
    """A SIMULATED multi-lesion baseline / follow-up pair and its truth."""
    from samv2core.preprocess import body_mask

    rng = np.random.default_rng(1000 + seed)
    body = body_mask(ct)
    # 3-8 lesions in all, at least the four roles that must be there (vanished, grown, shrunk, close)
    n_inserted = max(4, int(rng.integers(3, 9)) - (tumour is not None))
    if n_lesions is not None:
        n_inserted = max(4, n_lesions - (tumour is not None))
    roles = ["vanished", "grown", "shrunk", "close"] + ["stable"] * 8
    lesions, placed = [], []
    if tumour is not None:
        c = ct.index_to_lps(np.argwhere(tumour)[:, ::-1].mean(0))
        placed.append((c, 15.0))
        lesions.append({"role": "tumour", "centre": c})
    for n in range(max(2, n_inserted)):
        role = roles[n]
        radius = float(rng.uniform(2.5, 5.0)) if role == "close" else float(rng.uniform(2.5, 15.0))
        radii = radius * rng.uniform(0.75, 1.25, 3)
        near = None
        if role == "close":  # 15 mm from the previous inserted lesion, made small too
            prev = lesions[-1]
            prev["radii"] = np.minimum(prev["radii"], 5.0)
            near = prev["centre"]
            placed[-1] = (near, 5.0)
        c, hu = _place(ct, body, placed, radii.max(), rng, near)
        placed.append((c, radii.max()))
        lesions.append({"role": role, "centre": c, "radii": radii, "hu": hu})
    r_new = float(rng.uniform(4.0, 10.0))
    c_new, hu_new = _place(ct, body, placed, r_new, rng)
    scale = {"grown": 1.3, "shrunk": 0.7}

    base, follow = ct, ct
    base_lab = np.zeros(ct.array.shape, np.int16)
    follow_lab = np.zeros(ct.array.shape, np.int16)  # the tumour's follow-up extent
    sp = np.asarray(ct.spacing)[::-1]
    for v, les in enumerate(lesions, start=1):
        les["label"] = v
        if les["role"] == "tumour":
            base_lab[tumour] = v
            grown = tumour | (ndimage.distance_transform_edt(~tumour, sampling=sp) <= 2.0)
            vals = ct.array[tumour]
            arr = np.array(follow.array)
            add = grown & ~tumour
            arr[add] = rng.choice(vals, int(add.sum()))
            follow = follow.with_array(arr)
            follow_lab[grown] = v
            les["radius"] = float((3 * tumour.sum() * np.prod(ct.spacing) / (4 * np.pi)) ** (1 / 3))
            continue
        base, m = insert_lesion(base, les["centre"], les["radii"], les["hu"], seed=seed * 100 + v)
        base_lab[m] = v
        les["radius"] = float(les["radii"].min())
        if les["role"] != "vanished":
            follow, _ = insert_lesion(follow, les["centre"], les["radii"] * scale.get(les["role"], 1.0), les["hu"],
                                      seed=seed * 100 + 50 + v)
    follow, m = insert_lesion(follow, c_new, [r_new] * 3, hu_new, seed=seed * 100 + 99)
    pair = simulate_hard_followup(follow, seed=seed)
    f_vol = pair.followup
    # the user's follow-up segmentation: every follow-up voxel mapped back to the baseline side
    # and tested against the true (analytic) ellipsoids, so thin slices lose no lesion
    field = sitk.TransformToDisplacementField(pair.transform, sitk.sitkVectorFloat64, f_vol.size_xyz, f_vol.origin,
                                              f_vol.spacing, tuple(f_vol.direction.ravel()))
    k, j, i = np.indices(f_vol.array.shape)
    back = f_vol.index_to_lps(np.stack([i, j, k], -1).reshape(-1, 3).astype(np.float64)) + \
        sitk.GetArrayFromImage(field).reshape(-1, 3)
    cand = np.zeros(len(back), np.float32)
    shapes = [(les["label"], les["centre"], les["radii"] * scale.get(les["role"], 1.0)) for les in lesions
              if les["role"] not in ("tumour", "vanished")] + [(NEW_LABEL, c_new, np.array([r_new] * 3))]
    for v, c, radii in shapes:
        cand[np.linalg.norm((back - c) / radii, axis=1) <= 1.0] = v
    if tumour is not None:
        kji = np.rint(ct.lps_to_index(back)[:, ::-1]).astype(int)
        ok = np.all((kji >= 0) & (kji < ct.array.shape), axis=1)
        hit = np.zeros(len(back), bool)
        hit[ok] = follow_lab[tuple(kji[ok].T)] == 1
        cand[hit] = 1
    cand_arr = cand.reshape(f_vol.array.shape)
    for les in lesions:
        les["truth"] = pair.map_points(les["centre"][None])[0]
        border = _border_mm(f_vol, les["truth"])  # negative outside the field of view
        les["inside"] = border > 0
        les["edge"] = abs(border) < les["radius"]  # partly cut: found or outside both fair
        det = _jacobian_det(pair.transform, les["truth"])
        if les["role"] == "tumour":
            les["base_ml"] = float(np.count_nonzero(base_lab == les["label"]) * np.prod(ct.spacing) / 1000)
            les["follow_ml"] = float(np.count_nonzero(follow_lab == les["label"]) * np.prod(ct.spacing) / 1000) / det
        else:  # the ellipsoids' exact volumes
            les["base_ml"] = float(4 / 3 * np.pi * np.prod(les["radii"]) / 1000)
            les["follow_ml"] = les["base_ml"] * scale.get(les["role"], 1.0) ** 3 / det
    new_truth = pair.map_points(c_new[None])[0]
    return {"baseline": base.with_array(base.array, "baseline"), "followup": f_vol,
            "labels": ct.with_array(base_lab.astype(np.float32), "baseline lesions"),
            "candidates": f_vol.with_array(cand_arr, "follow-up candidates"), "lesions": lesions,
            "new": {"truth": new_truth, "inside": _border_mm(f_vol, new_truth) > r_new,
                    "radius": r_new}}


def _border_mm(volume: Volume, lps) -> float:
    """Signed distance (mm) from ``lps`` to the nearest face of the field of view (< 0 outside)."""
    ijk = volume.lps_to_index(np.asarray(lps, dtype=np.float64))
    size = np.asarray(volume.size_xyz, dtype=np.float64)
    return float(np.min(np.minimum(ijk + 0.5, size - 0.5 - ijk) * np.asarray(volume.spacing)))


def _jacobian_det(transform: sitk.Transform, p, h: float = 2.0) -> float:
    """det of d(transform)/dx at ``p`` (follow-up -> baseline; central differences)."""
    j = np.zeros((3, 3))
    for a in range(3):
        e = np.zeros(3)
        e[a] = h
        j[:, a] = (np.asarray(transform.TransformPoint(tuple(p + e))) -
                   np.asarray(transform.TransformPoint(tuple(p - e)))) / (2 * h)
    return float(np.linalg.det(j))


def evaluate(case: dict, result) -> list[dict]:
    """One row per lesion (and the new one): truth, status, error, swap, volume errors."""
    by_label = {int(t.lesion.name.split()[-1]): t for t in result.lesions}
    truths = {les["label"]: les["truth"] for les in case["lesions"]}
    rows = []
    for les in case["lesions"]:
        t = by_label[les["label"]]
        want = (("edge, vanished" if les["role"] == "vanished" else "edge") if les["edge"] else "outside the follow-up" if not les["inside"] else
                "not found" if les["role"] == "vanished" else "found")
        pos = None if t.position_lps is None or t.status != "found" else np.asarray(t.position_lps)
        err = None if pos is None else float(np.linalg.norm(pos - les["truth"]))
        swap = False
        if pos is not None:
            others = [np.linalg.norm(pos - v) for k, v in truths.items() if k != les["label"]]
            swap = bool(others) and min(others) < err and min(others) < 10.0
        vol_err = chg_err = None
        if t.followup_size is not None and want == "found":
            vol_err = 100 * (t.followup_size.volume_ml / les["follow_ml"] - 1)
            truth_chg = 100 * (les["follow_ml"] / les["base_ml"] - 1)
            chg_err = t.change()["volume_ml"]["percent"] - truth_chg
        match_err = None if t.match is None else float(np.linalg.norm(t.match.query_point.to("LPS").as_array() -
                                                                      les["truth"]))
        rows.append({"role": les["role"], "want": want, "got": t.status, "err": err, "radius": les["radius"],
                     "swap": swap, "vol_err": vol_err, "chg_err": chg_err, "reason": t.reason,
                     "contrast": t.details.get("contrast_ratio"), "match_err": match_err,
                     "border_mm": _border_mm(case["followup"], les["truth"])})
    new_found = [n for n in result.new_findings if np.linalg.norm(np.asarray(n.position_lps) - case["new"]["truth"]) < 10]
    if case["new"]["inside"]:
        rows.append({"role": "new", "want": "new", "got": "new" if new_found else "missed", "err": None,
                     "radius": case["new"]["radius"], "swap": False, "vol_err": None, "chg_err": None,
                     "reason": ""})
    rows.append({"role": "false new", "want": "-", "got": str(len(result.new_findings) - len(new_found)),
                 "err": None, "radius": 0, "swap": False, "vol_err": None, "chg_err": None, "reason": ""})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scans", nargs="+", default=["lung1", "aorta"], choices=sorted(SCANS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--verbose", action="store_true")
    ap.add_argument("--timing", action="store_true",
                    help="only the time for 5 lesions on a new 512x512x60 pair (lung1 resampled to 60 slices)")
    args = ap.parse_args(argv)
    print_machine_load()
    session = EmbeddingSession.open(None, device="cpu", precision="fp32")
    if args.timing:
        return time_five_lesions(session, args.seeds)
    rows, timings = [], []
    for scan in args.scans:
        image, label = SCANS[scan]
        ct = load_volume(DATA / image)
        tumour = None if label is None else load_volume(DATA / label, "MR").array > 0.5
        for seed in args.seeds:
            case = make_case(ct, tumour, seed)
            t0 = time.perf_counter()
            e_base, e_follow = session.embed(case["baseline"]), session.embed(case["followup"])
            t_embed = time.perf_counter() - t0
            lesions = lesions_from_label_map(case["labels"], split_components=False)
            result = track_lesions(e_base, e_follow, case["baseline"], case["followup"], lesions,
                                   candidates=case["candidates"])
            timings.append((scan, seed, len(lesions), t_embed, result.seconds))
            for r in evaluate(case, result):
                rows.append(dict(r, scan=scan, seed=seed))
                if args.verbose:
                    print(scan, seed, r, file=sys.stderr)
    print_tables(rows, timings)
    return 0


def time_five_lesions(session, seeds) -> int:
    """Seconds for a new pair (both embeddings, nothing cached) and its 5 lesions, per seed."""
    ct = load_volume(DATA / SCANS["lung1"][0])
    tumour_vol = load_volume(DATA / SCANS["lung1"][1], "MR")
    size = (512, 512, 60)
    spacing = (ct.spacing[0], ct.spacing[1], ct.spacing[2] * (ct.size_xyz[2] - 1) / (size[2] - 1))
    ref = sitk.Image(size, sitk.sitkFloat32)
    ref.SetSpacing(spacing)
    ref.SetOrigin(ct.origin)
    ref.SetDirection(tuple(ct.direction.ravel()))
    ct60 = Volume.from_sitk(sitk.Resample(ct.to_sitk(), ref, sitk.Transform(), sitk.sitkLinear, -1024.0), "CT", "lung1")
    tumour = sitk.GetArrayFromImage(sitk.Resample(tumour_vol.to_sitk(), ref, sitk.Transform(),
                                                  sitk.sitkNearestNeighbor, 0.0)) > 0.5
    rows = []
    for seed in seeds:
        case = make_case(ct60, tumour, seed, n_lesions=5)
        lesions = lesions_from_label_map(case["labels"], split_components=False)
        session.clear_cache()
        t0 = time.perf_counter()
        e_base, e_follow = session.embed(case["baseline"]), session.embed(case["followup"])
        t1 = time.perf_counter()
        result = track_lesions(e_base, e_follow, case["baseline"], case["followup"], lesions,
                               candidates=case["candidates"])
        t2 = time.perf_counter()
        rows.append([seed, "x".join(map(str, case["baseline"].size_xyz)), "x".join(map(str, case["followup"].size_xyz)),
                     f"{len(lesions)} ({result.counts()['found']} found)", f"{t1 - t0:.1f}", f"{t2 - t1:.1f}", f"{t2 - t0:.1f}"])
    print("\n".join(fitted_table(["seed", "baseline", "follow-up", "lesions", "embed both (s)", "track (s)",
                                  "total (s)"], rows)))
    return 0


def print_tables(rows: list, timings: list) -> None:
    def frac(sel, ok):
        sel = list(sel)
        return f"{sum(ok(r) for r in sel)}/{len(sel)}" if sel else "-"

    present = [r for r in rows if r["want"] == "found"]
    errs = [r["err"] for r in present if r["err"] is not None]
    head = ["measure (simulated follow-ups)", "value"]
    table = [
        ["pairs / lesions", f"{len(timings)} / {sum(t[2] for t in timings)}"],
        ["CPM@10mm (present lesions)", frac(present, lambda r: r["err"] is not None and r["err"] <= 10)],
        ["DLT CPM (within min(radius, 10 mm))",
         frac(present, lambda r: r["err"] is not None and r["err"] <= min(r["radius"], 10))],
        ["found centres within 5 mm", frac([r for r in present if r["err"] is not None], lambda r: r["err"] <= 5)],
        ["centre error median / p90 / max (mm)",
         " / ".join(f"{v:.1f}" for v in (np.median(errs), np.percentile(errs, 90), max(errs))) if errs else "-"],
        ["status: present -> found", frac(present, lambda r: r["got"] == "found")],
        ["status: vanished -> not found", frac([r for r in rows if r["want"] == "not found"],
                                               lambda r: r["got"] == "not found")],
        ["status: outside -> outside the follow-up", frac([r for r in rows if r["want"] == "outside the follow-up"],
                                                          lambda r: r["got"] == "outside the follow-up")],
        ["status: at the FOV border -> found or outside", frac([r for r in rows if r["want"] == "edge"],
                                                                lambda r: r["got"] in ("found", "outside the follow-up"))],
        ["status: vanished at the border -> not found or outside",
         frac([r for r in rows if r["want"] == "edge, vanished"],
              lambda r: r["got"] in ("not found", "outside the follow-up"))],
        ["status: new -> new", frac([r for r in rows if r["want"] == "new"], lambda r: r["got"] == "new")],
        ["false new findings (total)", str(sum(int(r["got"]) for r in rows if r["role"] == "false new"))],
        ["identity swaps", str(sum(r["swap"] for r in rows))],
    ]
    for role in ("tumour", "grown", "shrunk", "close", "stable"):
        sel = [r for r in present if r["role"] == role]
        table.append([f"  {role}: found / within 5 mm", f"{frac(sel, lambda r: r['got'] == 'found')} / "
                      f"{frac(sel, lambda r: r['err'] is not None and r['err'] <= 5)}"])
    vol = [r for r in present if r["vol_err"] is not None]
    big = [r for r in vol if r["radius"] >= 5]
    table += [
        ["follow-up volume within 15% (all / radius >= 5 mm)",
         f"{frac(vol, lambda r: abs(r['vol_err']) <= 15)} / {frac(big, lambda r: abs(r['vol_err']) <= 15)}"],
        ["volume error median / max |%| (radius >= 5 mm)",
         " / ".join(f"{v:.1f}" for v in (np.median([abs(r['vol_err']) for r in big]),
                                           max(abs(r['vol_err']) for r in big))) if big else "-"],
        ["volume-change error median |pp| (radius >= 5 mm)",
         f"{np.median([abs(r['chg_err']) for r in big]):.1f}" if big else "-"],
        ["tracking seconds per pair median / max (loaded)",
         f"{np.median([t[4] for t in timings]):.1f} / {max(t[4] for t in timings):.1f}"],
        ["embedding both scans, seconds median (loaded)", f"{np.median([t[3] for t in timings]):.1f}"],
    ]
    print("\n".join(fitted_table(head, table)))
    wrong = [r for r in rows if r["want"] not in ("-", "edge", "edge, vanished") and r["got"] != r["want"]]
    if wrong:
        print("\nwrong statuses:")
        for r in wrong:
            where = "" if r.get("match_err") is None else \
                f"; match {r['match_err']:.1f} mm from truth, truth {r['border_mm']:.0f} mm from the FOV border"
            print(f"  {r['scan']} seed {r['seed']} {r['role']}: want {r['want']}, got {r['got']} ({r['reason']}{where})")


if __name__ == "__main__":
    sys.exit(main())
