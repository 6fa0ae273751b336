"""Inter-patient registration benchmark (issue 22): labelled pairs of two different people.

    python Testing/Benchmarks/benchmark_interpatient.py [--pairs ct-ct-ab,ct-ct-ba,...] [--no-peers] [--json OUT]

Per pair: ours (samv2core.registration.register_interpatient, affine + deformable) accepted or
refused, mean and per-label Dice (whole fixed grid, and inside the moving field of view as the
transform maps it), folding share, time; one-shot organ-centroid errors (each fixed-label centroid
sent through the transform vs the moving label's centroid, for labels not cut by either field of
view). Side by side: ANTs SyN and elastix (affine + B-spline defaults) from the SAME start as
ours (the moving image and labels resampled through our affine first) and with their defaults
(identity start). TotalSegmentator labels are model output, not manual truth.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "2")

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from repo_paths import SHARED  # noqa: E402

from samv2core.errors import RegistrationError  # noqa: E402
from samv2core.registration.interpatient import register_interpatient  # noqa: E402
from samv2core.registration.interpatient_match import match_across_patients  # noqa: E402
from samv2core.registration.label_overlap import dice_table, moving_fov_mask  # noqa: E402
from samv2core.volume import load_volume  # noqa: E402

# TotalSegmentator v2 'total_mr' -> 'total' (CT) codes, matched by class name (esophagus, small
# bowel, duodenum, colon, bladder, spinal cord, heart, aorta, IVC, portal/splenic vein and the
# organs 1-9 share names). Only MR codes 1-25 are used: their names agree between the published
# class tables we found; higher MR codes differ between TotalSegmentator versions.
MR_TO_CT = {1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 9: 9, 12: 15, 13: 18, 14: 19, 15: 20, 16: 21,
            21: 79, 22: 51, 23: 52, 24: 63, 25: 64}


def pairs(data: Path) -> dict:
    a = (data / "ct/totalseg_example/ct_3mm_30slices.nii.gz", data / "ct/totalseg_example/seg_3mm_30slices.nii.gz", None)
    b = (data / "ct/totalseg_dicom/dicom", data / "ct/totalseg_dicom/seg.nii.gz", None)
    mr = (data / "mr/abdomen_mr_totalseg_3mm.nii.gz", data / "mr/abdomen_mr_totalseg_3mm_seg.nii.gz", MR_TO_CT)
    sp = (data / "ct/msd_spleen2/ct.nii.gz", data / "ct/msd_spleen2/spleen_manual.nii.gz", None)
    oa = (data / "mr/oasis_pair_lapirn/subject_A_t1.nii.gz", data / "mr/oasis_pair_lapirn/subject_A_gm_wm.nii.gz", None)
    ob = (data / "mr/oasis_pair_lapirn/subject_B_t1.nii.gz", data / "mr/oasis_pair_lapirn/subject_B_gm_wm.nii.gz", None)
    return {"ct-ct-ab": (a, b, None), "ct-ct-ba": (b, a, None), "ct-mr": (a, mr, None), "mr-ct": (mr, a, None),
            "spleen-a": (sp, a, [1]), "spleen-b": (sp, b, [1]), "mr-mr-ab": (oa, ob, None), "mr-mr-ba": (ob, oa, None)}


def read_labels(path: Path, mapping) -> sitk.Image:
    img = sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkInt32)
    if mapping:
        arr = sitk.GetArrayFromImage(img)
        out = np.zeros_like(arr)
        for src, dst in mapping.items():
            out[arr == src] = dst
        new = sitk.GetImageFromArray(out)
        new.CopyInformation(img)
        img = new
    return img


def on_fixed(labels: sitk.Image, fixed, transform) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.Resample(labels, fixed.to_sitk(), transform, sitk.sitkNearestNeighbor, 0,
                                                sitk.sitkInt32))


def centroid_errors(fixed_lab: np.ndarray, moving_lab: sitk.Image, fixed, transform, shared) -> dict:
    """|T(centroid of fixed label) - centroid of moving label| (mm) for labels cut by neither FOV."""
    mov = sitk.GetArrayFromImage(moving_lab)
    out = {}
    for lab in shared:
        kf, km = np.argwhere(fixed_lab == lab), np.argwhere(mov == lab)
        if len(kf) == 0 or len(km) == 0:
            continue
        if kf[:, 0].min() == 0 or kf[:, 0].max() == fixed_lab.shape[0] - 1 or km[:, 0].min() == 0 \
                or km[:, 0].max() == mov.shape[0] - 1:
            continue  # cut by a field of view: its centroid is not anatomy
        cf = np.array(fixed.to_sitk().TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in kf.mean(0)[::-1])))
        cm = np.array(moving_lab.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in km.mean(0)[::-1])))
        out[str(lab)] = round(float(np.linalg.norm(np.array(transform.TransformPoint(tuple(cf))) - cm)), 1)
    return out


def label_centroids(labels: sitk.Image, wanted) -> dict:
    """{label: LPS centroid} of the labels in ``wanted`` not cut by the image's first / last slice."""
    arr = sitk.GetArrayFromImage(labels)
    out = {}
    for lab in wanted:
        k = np.argwhere(arr == lab)
        if len(k) == 0 or k[:, 0].min() == 0 or k[:, 0].max() == arr.shape[0] - 1:
            continue
        out[int(lab)] = np.array(labels.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in k.mean(0)[::-1])))
    return out


def one_shot(fixed, moving, flab, mlab, forward) -> list[dict]:
    """One-shot landmarks (samv2 match --pair inter-patient): each fixed-label centroid (labels
    uncut in both maps) located on the moving subject; error against the moving label's centroid."""
    shared = set(np.unique(sitk.GetArrayViewFromImage(flab)).tolist()) & set(
        np.unique(sitk.GetArrayViewFromImage(mlab)).tolist()) - {0}
    cf, cm = label_centroids(flab, shared), label_centroids(mlab, shared)
    labs = sorted(set(cf) & set(cm))
    if not labs:
        return []
    results, _ = match_across_patients(fixed, moving, np.array([cf[k] for k in labs]), forward=forward)
    return [{"label": k, "error_mm": round(float(np.linalg.norm(np.array(r.query_point.xyz) - cm[k])), 1),
             "confident": r.confident, "inverse_mm": r.details.get("inverse_consistency_mm"), "reason": r.reason}
            for k, r in zip(labs, results)]


def evaluate(name, fixed, moving, fixed_labels, moving_labels, transform, seconds, only=None, accepted=None,
             folding=None) -> dict:
    fa = on_fixed(fixed_labels, fixed, sitk.Transform())
    wa = on_fixed(moving_labels, fixed, transform)
    shared = only or sorted(set(np.unique(fa).tolist()) & set(np.unique(sitk.GetArrayViewFromImage(moving_labels)).tolist()) - {0})
    fov = moving_fov_mask(moving, fixed, transform)
    d, dfov = dice_table(fa, wa, None, shared), dice_table(fa, wa, fov, shared)
    return {"method": name, "accepted": accepted, "dice_mean": d["mean"], "dice_fov_mean": dfov["mean"],
            "per_label": d["per_label"], "per_label_fov": dfov["per_label"], "labels": len(shared),
            "folding_percent": folding, "seconds": round(seconds, 1),
            "centroid_mm": centroid_errors(fa, moving_labels, fixed, transform, shared)}


def ants_syn(fixed, moving, prewarp, tmp: Path, type_of_transform="SyN"):
    """ANTs (antspyx) on the moving image resampled through ``prewarp`` (None: raw, defaults);
    returns the complete fixed -> moving sitk transform and seconds."""
    import ants
    fpath, mpath = tmp / "f.nii.gz", tmp / "m.nii.gz"
    sitk.WriteImage(fixed.to_sitk(), str(fpath))
    mimg = moving.to_sitk() if prewarp is None else sitk.Resample(moving.to_sitk(), fixed.to_sitk(), prewarp,
                                                                 sitk.sitkLinear, float(moving.array.min()))
    sitk.WriteImage(mimg, str(mpath))
    t = time.perf_counter()
    reg = ants.registration(ants.image_read(str(fpath)), ants.image_read(str(mpath)), type_of_transform=type_of_transform)
    sec = time.perf_counter() - t
    comp = sitk.CompositeTransform(3)
    if prewarp is not None:
        comp.AddTransform(prewarp)
    for f in reg["fwdtransforms"]:  # ANTs lists the last-applied first; sitk applies the last added first
        comp.AddTransform(sitk.ReadTransform(f) if f.endswith(".mat") else
                          sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(f), sitk.sitkVectorFloat64)))
    return comp, sec


def elastix_bspline(fixed, moving, prewarp, tmp: Path):
    """itk-elastix affine + B-spline default maps on the moving image resampled through ``prewarp``
    (None: raw, identity start); returns a callable warping a label image and seconds."""
    import itk
    src = moving.to_sitk() if prewarp is None else sitk.Resample(moving.to_sitk(), fixed.to_sitk(), prewarp,
                                                                sitk.sitkLinear, float(moving.array.min()))
    sitk.WriteImage(sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32), str(tmp / "ef.nii.gz"))
    sitk.WriteImage(sitk.Cast(src, sitk.sitkFloat32), str(tmp / "em.nii.gz"))
    f = itk.imread(str(tmp / "ef.nii.gz"), itk.F)
    m = itk.imread(str(tmp / "em.nii.gz"), itk.F)
    po = itk.ParameterObject.New()
    po.AddParameterMap(po.GetDefaultParameterMap("affine"))
    po.AddParameterMap(po.GetDefaultParameterMap("bspline"))
    t = time.perf_counter()
    _, params = itk.elastix_registration_method(f, m, parameter_object=po, log_to_console=False,
                                                output_directory=str(tmp))
    sec = time.perf_counter() - t
    for i in range(params.GetNumberOfParameterMaps()):
        params.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
        params.SetParameter(i, "ResultImagePixelType", "int")

    def warp(labels: sitk.Image) -> np.ndarray:
        lab = labels if prewarp is None else sitk.Resample(labels, fixed.to_sitk(), prewarp, sitk.sitkNearestNeighbor, 0)
        sitk.WriteImage(sitk.Cast(lab, sitk.sitkFloat32), str(tmp / "el.nii.gz"))
        li = itk.imread(str(tmp / "el.nii.gz"), itk.F)
        out = itk.transformix_filter(li, params, log_to_console=False)
        return np.rint(itk.GetArrayFromImage(out)).astype(np.int32)
    return warp, sec


def run_pair(key, spec, peers: bool) -> list[dict]:
    (fi, fl, fmap), (mi, ml, mmap), only = spec
    fixed, moving = load_volume(fi), load_volume(mi)
    flab, mlab = read_labels(fl, fmap), read_labels(ml, mmap)
    rows = []
    t = time.perf_counter()
    try:
        res = register_interpatient(fixed, moving, deformable=True)
        sec = time.perf_counter() - t
        rows.append(evaluate("ours (affine+deformable)", fixed, moving, flab, mlab, res.composite, sec, only, True,
                             res.report.get("folding_percent")))
        rows.append(evaluate("ours affine only", fixed, moving, flab, mlab, res.linear, sec, only, True))
        start = res.linear
        rows[0]["chosen_start"] = res.report["chosen_start"]
        rows[0]["one_shot"] = one_shot(fixed, moving, flab, mlab, res)
    except RegistrationError as exc:
        rows.append({"method": "ours (affine+deformable)", "accepted": False, "refusal": str(exc),
                     "seconds": round(time.perf_counter() - t, 1)})
        start = None
    rows.append(evaluate("identity (scanner coordinates)", fixed, moving, flab, mlab, sitk.Transform(), 0.0, only))
    if rows[0].get("accepted"):  # never silently wrong: an accepted result below the identity start is a failure
        rows[0]["below_identity"] = bool(rows[0]["dice_mean"] < rows[-1]["dice_mean"])
        rows[0]["timing"] = res.report["timing"]
    if not peers:
        return rows
    with tempfile.TemporaryDirectory() as tmpd:
        tmp = Path(tmpd)
        for label, prewarp in (("same start as ours", start), ("defaults (identity start)", None)):
            if label.startswith("same") and prewarp is None:
                continue
            try:
                comp, sec = ants_syn(fixed, moving, prewarp, tmp)
                rows.append(evaluate(f"ANTs SyN, {label}", fixed, moving, flab, mlab, comp, sec, only))
            except Exception as exc:  # a peer failing is a row, not a crash
                rows.append({"method": f"ANTs SyN, {label}", "error": str(exc).splitlines()[-1][:200]})
            try:
                warp, sec = elastix_bspline(fixed, moving, prewarp, tmp)
                fa = on_fixed(flab, fixed, sitk.Transform())
                wa = warp(mlab)
                shared = only or sorted(set(np.unique(fa).tolist()) & set(np.unique(sitk.GetArrayViewFromImage(mlab)).tolist()) - {0})
                rows.append({"method": f"elastix affine+B-spline, {label}", "dice_mean": dice_table(fa, wa, None, shared)["mean"],
                             "seconds": round(sec, 1)})
            except Exception as exc:
                rows.append({"method": f"elastix affine+B-spline, {label}", "error": str(exc).splitlines()[-1][:200]})
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="ct-ct-ab,ct-ct-ba")
    p.add_argument("--no-peers", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if not SHARED.is_dir():
        print(f"shared data not found at {SHARED}: nothing to benchmark")
        return 1
    table = pairs(SHARED)
    results = {}
    print("| pair | method | accepted | mean Dice (all fixed) | mean Dice (in moving FOV) | labels | folding % | "
          "centroid median mm | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for key in args.pairs.split(","):
        rows = run_pair(key, table[key], not args.no_peers)
        results[key] = rows
        for r in rows:
            cen = list((r.get("centroid_mm") or {}).values())
            print(f"| {key} | {r['method']} | {r.get('accepted', '-')} | {r.get('dice_mean', r.get('error', r.get('refusal')))} | "
                  f"{r.get('dice_fov_mean', '-')} | {r.get('labels', '-')} | {r.get('folding_percent', '-')} | "
                  f"{round(float(np.median(cen)), 1) if cen else '-'} | {r.get('seconds', '-')} |", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
