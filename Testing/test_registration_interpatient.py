"""Inter-patient registration (issue 22): the start that needs no scanner overlap, the inter-patient
verification policy, and the label (Dice) report, on small real crops of the TotalSegmentator
example CT (../shared/data; skipped when absent). Where a pair is made by moving one real scan to
far-away scanner coordinates, it is SIMULATED and the offset is known exactly."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import SimpleITK as sitk

from samv2core.registration.cli import add_register_arguments, run_register
from samv2core.registration.interpatient import (AffineCandidate, InterPatientOptions, PoseDistance,
                                                 affine_candidates, work_image)
from samv2core.registration.interpatient_verify import InterPatientVerifyOptions, verify_interpatient
from samv2core.registration.label_overlap import label_report
from samv2core.volume import Volume, load_volume

OFFSET = np.array([-480.0, 310.0, 860.0])  # scanner boxes far apart, as between two patients' scans


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """As register_interpatient does (InterPatientOptions.threads): the functions tested directly
    are many small tensor ops, 3-10x slower on two shared threads."""
    import torch

    from samv2core.device import torch_threads
    with torch_threads(1, torch.device("cpu")):
        yield


@pytest.fixture(scope="module")
def ct(shared_data):
    return load_volume(shared_data / "ct/totalseg_example/ct_3mm_30slices.nii.gz")


@pytest.fixture(scope="module")
def seg(shared_data):
    return sitk.ReadImage(str(shared_data / "ct/totalseg_example/seg_3mm_30slices.nii.gz"))


def _moved(vol: Volume, offset, z0: int = 6, z1: int = 24) -> Volume:
    """A z-slab of ``vol`` (slices z0..z1) placed ``offset`` mm away in scanner coordinates."""
    arr = vol.array[z0:z1]
    origin = np.asarray(vol.index_to_lps([0, 0, z0])) + offset
    return Volume(arr.copy(), vol.spacing, tuple(origin), vol.direction, vol.modality, "moved")


def _moved_labels(seg: sitk.Image, offset, z0: int = 6, z1: int = 24) -> sitk.Image:
    arr = sitk.GetArrayFromImage(seg)[z0:z1]
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(seg.GetSpacing())
    img.SetDirection(seg.GetDirection())
    img.SetOrigin(tuple(np.asarray(seg.TransformIndexToPhysicalPoint((0, 0, z0))) + offset))
    return img


def test_start_recovers_a_large_offset_without_scanner_overlap(ct):
    """SIMULATED: a 54 mm slab of the scan moved 1060 mm away; the start search + affine must find it."""
    moving = _moved(ct, OFFSET)
    opts = InterPatientOptions()
    fw, mw = (work_image(v, opts.spacing_mm, opts.mask_weight, opts.ct_intensity_weight) for v in (ct, moving))
    candidates, fine = affine_candidates(fw, mw, opts)
    best = candidates[0].matrix
    pts = fine.points.numpy().astype(float)
    err = np.linalg.norm(pts @ best[:3, :3].T + best[:3, 3] - (pts + OFFSET), axis=1)
    assert np.median(err) < 4.0, f"offset recovered to {np.median(err):.1f} mm (median)"
    assert candidates[0].distance < candidates[0].start_distance


def test_verification_refuses_a_wrong_result(ct):
    """A result 30 mm off along the body (the correct pose is among the alternatives) is refused;
    the correct pose with the wrong one as an alternative passes."""
    moving = _moved(ct, OFFSET)
    opts = InterPatientOptions()
    fw, mw = (work_image(v, opts.spacing_mm, opts.mask_weight, opts.ct_intensity_weight) for v in (ct, moving))
    dist = PoseDistance(fw, mw, 4000, 0)
    right = np.eye(4)
    right[:3, 3] = OFFSET
    wrong = right.copy()
    wrong[2, 3] += 30.0
    import torch
    d = {k: float(dist(torch.as_tensor(m[None], dtype=torch.float32))[0]) for k, m in (("r", right), ("w", wrong))}
    cands = {"r": AffineCandidate("right", right, d["r"] + 0.01, right, d["r"]),
             "w": AffineCandidate("wrong", wrong, d["w"] + 0.01, wrong, d["w"])}
    pts = dist.points.numpy().astype(float)
    inverse = {"p90_mm": 1.0}
    bad = verify_interpatient([cands["w"], cands["r"]], inverse, {}, {}, 0.95, 0.6, InterPatientVerifyOptions(), pts,
                              dist.chance)
    assert not bad["passed"] and "better fit" in bad["reason"]
    good = verify_interpatient([cands["r"], cands["w"]], inverse, {}, {}, 0.95, 0.6, InterPatientVerifyOptions(), pts,
                               dist.chance)
    assert good["passed"], good["reason"]
    folded = verify_interpatient([cands["r"]], inverse, {"folding_percent": 2.0},
                                 {"distance_linear": 0.2, "distance_final": 0.1}, 0.95, 0.6,
                                 InterPatientVerifyOptions(), pts, dist.chance)
    assert not folded["passed"] and "folds" in folded["reason"]
    inconsistent = verify_interpatient([cands["r"]], {"p90_mm": 25.0}, {}, {}, 0.95, 0.6,
                                       InterPatientVerifyOptions(), pts, dist.chance)
    assert not inconsistent["passed"] and "inverse" in inconsistent["reason"]


def test_dice_report_of_known_transforms(ct, seg):
    """The exact (known) transform gives Dice 1 on every shared label; 6 mm off gives less."""
    moving = _moved(ct, OFFSET)
    mseg = _moved_labels(seg, OFFSET)
    exact = sitk.TranslationTransform(3, tuple(OFFSET))
    rep, warped = label_report(seg, mseg, ct, moving, exact)
    assert rep["dice_in_moving_fov"]["mean"] == 1.0
    assert set(np.unique(sitk.GetArrayFromImage(warped)).tolist()) <= set(np.unique(sitk.GetArrayFromImage(mseg)).tolist())
    assert rep["dice"]["mean"] < 1.0  # the slab covers only part of the fixed labels
    off = sitk.TranslationTransform(3, tuple(OFFSET + [0.0, 0.0, 6.0]))
    rep6, _ = label_report(seg, mseg, ct, moving, off)
    assert rep6["dice_in_moving_fov"]["mean"] < 0.95


def test_cli_inter_patient_writes_warped_labels_and_dice(ct, seg, tmp_path):
    moving = _moved(ct, OFFSET)
    fpath, mpath = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    flab, mlab = tmp_path / "fl.nii.gz", tmp_path / "ml.nii.gz"
    sitk.WriteImage(ct.to_sitk(), str(fpath))
    sitk.WriteImage(moving.to_sitk(), str(mpath))
    sitk.WriteImage(seg, str(flab))
    sitk.WriteImage(_moved_labels(seg, OFFSET), str(mlab))
    parser = argparse.ArgumentParser()
    add_register_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(["--fixed", str(fpath), "--moving", str(mpath), "--pair", "inter-patient",
                              "--fixed-labels", str(flab), "--moving-labels", str(mlab), "--out", str(out), "--quiet"])
    assert run_register(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["pair"] == "inter-patient" and report["verification"]["passed"]
    assert report["labels"]["dice_in_moving_fov"]["mean"] > 0.8
    assert (out / "moving_labels_warped.nii.gz").is_file()
    # the same pair without --pair is refused by the same-patient pipeline, as before (exit 2, nothing written)
    args2 = parser.parse_args(["--fixed", str(fpath), "--moving", str(mpath), "--out", str(tmp_path / "o2"), "--quiet"])
    assert run_register(args2) == 2
    assert not (tmp_path / "o2" / "report.json").exists()
    # labels without their partner: one line, exit 2
    args3 = parser.parse_args(["--fixed", str(fpath), "--moving", str(mpath), "--pair", "inter-patient",
                               "--fixed-labels", str(flab), "--out", str(tmp_path / "o3"), "--quiet"])
    assert run_register(args3) == 2


def test_convex_adam_recovers_a_known_shift_without_folding(ct):
    """SIMULATED: the moving features are the fixed ones shifted 6 mm along x; the deformable step
    (convex search + Adam on the velocity) must find +6 mm inside the body and fold nowhere."""
    import torch

    from samv2core.registration.convex_search import convex_adam
    from samv2core.registration.svf import jacobian_determinant, jacobian_stats

    opts = InterPatientOptions()
    fw = work_image(ct, opts.spacing_mm, opts.mask_weight, opts.ct_intensity_weight)
    moving = torch.roll(fw.features, shifts=2, dims=4)  # moving(v) = fixed(v - 2 voxels in x)
    inner = fw.mask.clone()
    inner[..., :4] = 0
    inner[..., -4:] = 0
    from dataclasses import replace
    fast = replace(opts.deformable, iterations=40, fine_iterations=10)  # both levels run; fewer steps keep it quick
    u, stats = convex_adam(fw.features, moving, inner, fw.grid, fast)
    body = inner[0, 0] > 0.5
    ux = u[0, 0][body]
    assert abs(float(ux.median()) - 6.0) < 1.5, f"median x displacement {float(ux.median()):.2f} mm"
    assert float(u[0, 1][body].abs().median()) < 1.5 and float(u[0, 2][body].abs().median()) < 1.5
    assert stats["distance_final"] < stats["distance_linear"]
    assert jacobian_stats(jacobian_determinant(u, fw.grid.spacing), body.numpy())["folding_percent"] == 0.0


def test_pre_aligned_pair_keeps_scanner_coordinates_and_is_compared_with_them(ct):
    """A pair already aligned in scanner coordinates (here exactly: the slab where it was cut from):
    the linear part stays the identity, and the verification compares the result with it."""
    from samv2core.registration.interpatient import register_interpatient

    res = register_interpatient(ct, _moved(ct, np.zeros(3)), deformable=True)
    assert res.report["linear_kept"].startswith("scanner coordinates")
    assert np.allclose(res.report["linear_matrix"], np.eye(4))
    d = res.report["verification"]["checks"]["distance_vs_scanner_coordinates"]
    assert d["result"] < d["identity"]
    # the rule itself: the result's distance must be below the identity's by the margin
    cand = AffineCandidate("search 1", np.eye(4), 0.2, np.eye(4), 0.1)
    opts = InterPatientVerifyOptions()
    worse = verify_interpatient([cand], {"p90_mm": 1.0}, {}, {}, 0.95, 0.6, opts, None, 0.3,
                                {"identity": 0.05, "result": 0.0499})
    assert not worse["passed"] and "scanner coordinates" in worse["reason"]
    better = verify_interpatient([cand], {"p90_mm": 1.0}, {}, {}, 0.95, 0.6, opts, None, 0.3,
                                 {"identity": 0.05, "result": 0.03})
    assert better["passed"], better["reason"]


def test_one_shot_match_across_patients(ct, seg):
    """SIMULATED: organ centroids of the scan found on its slab moved 1060 mm away, through the
    inter-patient registration (samv2 match --pair inter-patient); a point outside the slab's field
    of view is never confident."""
    from samv2core.registration.interpatient_match import match_across_patients

    moving = _moved(ct, OFFSET)
    arr = sitk.GetArrayFromImage(seg)
    pts, truth = [], []
    for lab in (5, 79):  # liver, spinal cord: both span the slab (slices 6..24)
        k = np.argwhere(arr[8:22] == lab) + [8, 0, 0]
        c = np.array(seg.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in k.mean(0)[::-1])))
        pts.append(c)
        truth.append(c + OFFSET)
    outside = np.asarray(ct.index_to_lps([60, 50, 28]))  # slice 28: beyond the slab
    results, report = match_across_patients(ct, moving, np.array(pts + [outside]))
    assert report["forward"]["verification"]["passed"]
    for r, t in zip(results[:2], truth):
        err = np.linalg.norm(np.array(r.query_point.xyz) - t)
        assert err < 5.0 and r.confident, (err, r.reason)
    assert not results[2].confident and "field of view" in results[2].reason
