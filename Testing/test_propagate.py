"""Lesion propagation (samv2core.propagate) on real data: the bundled lung CT (pyradiomics lung1,
PyPI origin) with its tumour label, and a SIMULATED follow-up with a known rigid motion; the
bundled model. Checks: the propagated tumour lands where the known motion maps it, keeps its
volume, the label map / .seg.nrrd / JSON are written (the .seg.nrrd read back with SimpleITK),
and unusable lesions are refused.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from samv2core.errors import InputError
from samv2core.fitting import anchored_affine
from samv2core.lesion_files import read_lesion_mask, write_lesion_outputs
from samv2core.outputs import OutputSet
from samv2core.propagate import mask_volume_ml, propagate_lesion, segment_samples
from samv2core.bundled_samples import load_sample, sample_path
from samv2core.simulate import simulate_followup

CENTROID_TOL_MM = 3.0  # the tumour's voxels are 2 x 2 x 5 mm
# the tumour has only 70 voxels (1.4 mL): re-voxelising it on the follow-up lattice moves a
# boundary voxel in or out, so the volume is kept to 25 %
VOLUME_REL_TOL = 0.25


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    from samv2core.session import EmbeddingSession

    ct = load_sample("lung1_ct")
    pair = simulate_followup(ct, seed=2, rotation_deg=4.0, translation_mm=8.0, deformation_mm=0.0)
    session = EmbeddingSession.open(None, device="cpu", precision="fp32")
    tumour = read_lesion_mask(sample_path("lung1_tumor_label"))
    zyx = np.argwhere(tumour.array > 0.5)
    centroid = tumour.index_to_lps(zyx[:, ::-1].mean(0))
    root = tmp_path_factory.mktemp("propagate")
    sitk.WriteImage(pair.followup.to_sitk(), str(root / "follow.nrrd"), True)
    return {"pair": pair, "tumour": tumour, "centroid": centroid, "truth": pair.map_points(centroid[None])[0],
            "e_base": session.embed(ct), "e_follow": session.embed(pair.followup), "root": root}


def _centroid(volume) -> np.ndarray:
    zyx = np.argwhere(volume.array > 0.5)
    return volume.index_to_lps(zyx[:, ::-1].mean(0))


def test_label_lands_where_the_known_motion_maps_it_and_keeps_its_volume(case):
    follow = case["pair"].followup
    out = propagate_lesion(case["e_base"], case["e_follow"], follow, mask=case["tumour"])
    assert out.model in ("affine", "translation") and out.confident
    assert np.linalg.norm(_centroid(out.label_map(follow)) - case["truth"]) < CENTROID_TOL_MM
    assert out.baseline_volume_ml == pytest.approx(70 * 2 * 2 * 5 / 1000)  # 70 voxels of 20 mm^3
    assert out.followup_volume_ml == pytest.approx(out.baseline_volume_ml, rel=VOLUME_REL_TOL)
    # the region lies on the follow-up's lattice
    offset = follow.lps_to_index(out.region.origin)
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-6)
    np.testing.assert_allclose(out.region.direction, follow.direction)


def test_point_and_radius_give_a_ball_around_the_matched_centre(case):
    follow = case["pair"].followup
    out = propagate_lesion(case["e_base"], case["e_follow"], follow, centre_lps=case["centroid"], radius_mm=8.0)
    assert out.model == "sphere" and out.details["radius_mm"] == 8.0
    centre = out.centre.query_point.to("LPS").as_array()
    assert np.linalg.norm(centre - case["truth"]) < CENTROID_TOL_MM
    assert np.linalg.norm(_centroid(out.region) - centre) < 1.0
    assert out.baseline_volume_ml == pytest.approx(4 / 3 * np.pi * 8.0 ** 3 / 1000)
    assert out.followup_volume_ml == pytest.approx(out.baseline_volume_ml, rel=0.15)


def test_outputs_write_a_label_map_and_a_segmentation_slicer_reads(case, tmp_path):
    follow = case["pair"].followup
    out = propagate_lesion(case["e_base"], case["e_follow"], follow, mask=case["tumour"], method="nn")
    with OutputSet() as files:
        doc = write_lesion_outputs(files, out, follow, label_out=tmp_path / "t.nii.gz", seg_out=tmp_path / "t.seg.nrrd",
                                   json_out=tmp_path / "t.json", segment_name="tumour", label_value=3)
    labels = sitk.ReadImage(str(tmp_path / "t.nii.gz"))
    seg = sitk.ReadImage(str(tmp_path / "t.seg.nrrd"))
    for image in (labels, seg):  # both on the follow-up grid
        assert image.GetSize() == tuple(follow.size_xyz)
        np.testing.assert_allclose(image.GetOrigin(), follow.origin, atol=1e-4)
        np.testing.assert_allclose(image.GetDirection(), follow.direction.ravel(), atol=1e-6)
    arr = sitk.GetArrayFromImage(seg)
    assert set(np.unique(arr)) == {0, 3}
    np.testing.assert_array_equal(arr, sitk.GetArrayFromImage(labels))
    assert np.count_nonzero(arr) * 0.02 == pytest.approx(out.followup_volume_ml)
    meta = {k: seg.GetMetaData(k) for k in seg.GetMetaDataKeys()}
    assert meta["Segment0_Name"] == "tumour" and meta["Segment0_LabelValue"] == "3"
    assert meta["Segment0_ID"] and meta["Segment0_Layer"] == "0" and len(meta["Segment0_Color"].split()) == 3
    assert meta["Segmentation_MasterRepresentation"] == "Binary labelmap"
    zyx = np.argwhere(arr > 0)
    lo, hi = zyx.min(0)[::-1], zyx.max(0)[::-1]
    assert [int(v) for v in meta["Segment0_Extent"].split()] == [int(v) for pair in zip(lo, hi) for v in pair]
    written = json.loads((tmp_path / "t.json").read_text())
    assert written == json.loads(json.dumps(doc))
    assert written["confident"] is out.confident and written["model"] == out.model
    assert written["followup_volume_ml"] > 0 and len(written["centre"]["query_point"]) == 3


def test_cli_writes_all_outputs_for_a_ras_point(case, tmp_path, capsys):
    from samv2core.cli import main

    ras = case["centroid"] * [-1, -1, 1]
    outs = {"--out-label": tmp_path / "ball.nrrd", "--out-seg": tmp_path / "ball.seg.nrrd", "--out": tmp_path / "b.json"}
    code = main(["propagate", "--baseline", str(sample_path("lung1_ct")), "--followup", str(case["root"] / "follow.nrrd"),
                 f"--point={ras[0]},{ras[1]},{ras[2]}", "--coords", "RAS", "--radius-mm", "6", "--method", "nn",
                 "--device", "cpu", "--precision", "fp32", *[str(a) for kv in outs.items() for a in kv]])
    assert code == 0, capsys.readouterr().err
    assert all(p.is_file() for p in outs.values())
    doc = json.loads(outs["--out"].read_text())
    assert doc["coordinate_system"] == "RAS" and doc["model"] == "sphere"
    truth_ras = case["truth"] * [-1, -1, 1]
    assert np.linalg.norm(np.asarray(doc["centre"]["query_point"]) - truth_ras) < CENTROID_TOL_MM
    assert doc["baseline_volume_ml"] == pytest.approx(4 / 3 * np.pi * 0.216, rel=1e-3)
    assert sitk.ReadImage(str(outs["--out-seg"])).GetMetaData("Segment0_Name") == "lesion"
    assert not list(tmp_path.glob(".partial-*"))


def test_unusable_lesions_are_refused(case):
    follow, tumour = case["pair"].followup, case["tumour"]
    args = (case["e_base"], case["e_follow"], follow)
    with pytest.raises(InputError, match="not both or neither"):
        propagate_lesion(*args)
    with pytest.raises(InputError, match="not both or neither"):
        propagate_lesion(*args, mask=tumour, centre_lps=case["centroid"], radius_mm=5.0)
    for radius in (None, 0.0, -3.0, float("nan")):
        with pytest.raises(InputError, match="radius"):
            propagate_lesion(*args, centre_lps=case["centroid"], radius_mm=radius)
    with pytest.raises(InputError, match="empty"):
        propagate_lesion(*args, mask=tumour.with_array(np.zeros_like(tumour.array)))
    with pytest.raises(InputError, match="outside"):
        propagate_lesion(*args, centre_lps=case["centroid"] + [0, 0, 900.0], radius_mm=5.0)


def test_segment_samples_start_at_the_centroid_and_stay_inside(case):
    tumour = case["tumour"]
    pts, labels = segment_samples(tumour)
    assert labels[0] == "centroid" and len(pts) == 7
    np.testing.assert_allclose(pts[0], case["centroid"])
    ijk = np.rint(tumour.lps_to_index(pts)).astype(int)
    assert tumour.array[ijk[:, 2], ijk[:, 1], ijk[:, 0]].mean() > 0.5  # mostly on tumour voxels
    assert mask_volume_ml(tumour) == pytest.approx(1.4)


def test_anchored_affine_pins_the_anchor_and_falls_back_to_its_translation():
    rng = np.random.default_rng(0)
    src = rng.uniform(-20, 20, (9, 3))
    a = np.array([[1.05, 0.02, 0.0], [-0.03, 0.97, 0.04], [0.0, 0.01, 1.02]])
    dst = src @ a.T + [4.0, -7.0, 2.0] + rng.normal(0, 0.3, (9, 3))  # matches ~0.5 mm off
    fit = anchored_affine(src, dst)
    assert fit.mode == "affine"
    np.testing.assert_allclose(fit.apply(src[:1]), dst[:1], atol=1e-9)  # the anchor maps exactly
    np.testing.assert_allclose(fit.matrix, a, atol=0.05)
    few = anchored_affine(src, dst, usable=[True, True, True, False, False, False, False, False, False])
    assert few.mode == "translation" and few.n_inliers == 1
    np.testing.assert_allclose(few.matrix, np.eye(3))
    np.testing.assert_allclose(few.translation, dst[0] - src[0])
    flipped = anchored_affine(src, src * [-1, 1, 1])  # a reflection is no local map of anatomy
    assert flipped.mode == "translation"


def test_batch_propagates_a_label_and_a_point_lesion_per_case(case, tmp_path, capsys):
    from samv2core.cli import main
    from samv2core.markups import write_markups

    write_markups(tmp_path / "centre.mrk.json", case["centroid"][None], ["nodule"], "RAS")
    cases = tmp_path / "cases.csv"
    cases.write_text("case,baseline,followup,lesion\n"
                     f"label,{sample_path('lung1_ct')},{case['root'] / 'follow.nrrd'},{sample_path('lung1_tumor_label')}\n"
                     f"point,{sample_path('lung1_ct')},{case['root'] / 'follow.nrrd'},centre.mrk.json\n")
    code = main(["batch", str(cases), "-o", str(tmp_path / "out"), "--workers", "0", "--method", "nn",
                 "--lesion-radius-mm", "6", "--device", "cpu", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    for name, model in (("label", ("affine", "translation")), ("point", ("sphere",))):
        folder = tmp_path / "out" / name
        doc = json.loads((folder / "lesion.json").read_text())
        assert doc["model"] in model and doc["case"] == name
        labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "lesion.nrrd")))
        seg = sitk.ReadImage(str(folder / "lesion.seg.nrrd"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(seg), labels)
        follow = case["pair"].followup
        centroid = follow.index_to_lps(np.argwhere(labels > 0)[:, ::-1].mean(0))
        assert np.linalg.norm(centroid - case["truth"]) < CENTROID_TOL_MM
        manifest = json.loads((folder / "manifest.json").read_text())
        assert {"lesion.nrrd", "lesion.seg.nrrd", "lesion.json"} <= set(manifest["outputs"])
    assert json.loads((tmp_path / "out" / "point" / "lesion.json").read_text())["lesion"]["radius_mm"] == 6.0
