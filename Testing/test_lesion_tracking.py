"""Follow-up reading of every lesion at once (samv2core.lesion_tracking) on real data: the
bundled lung CT (pyradiomics lung1) with its real tumour plus lesions inserted with realistic HU,
and SIMULATED follow-ups with a known motion (one lesion vanished, two merged into one, one new).
Checks: the assignment gives a swap back, refuses two lesions on one place (ambiguous) and a
match its neighbours disagree with; statuses found / not found / ambiguous / new; the DICOM SR
(TID 1500) read back with pydicom and highdicom keeps each lesion's tracking UID over two
follow-ups, carries the measurements and references a DICOM source series; ``samv2 track``.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from samv2core.bundled_samples import load_sample, sample_path
from samv2core.lesion_tracking import assign, lesions_from_label_map, track_timepoints
from samv2core.outputs import OutputSet
from samv2core.simulate import body_points, insert_lesion, simulate_followup
from samv2core.tracking_files import write_tracking_outputs
from samv2core.tracking_sr import GENERATED, image_context, measurement_report, tracking_uids
from samv2core.volume import load_volume

from repo_paths import SHARED

DICOM_CT = SHARED / "ct" / "totalseg_dicom" / "dicom"
TOL_MM = 3.0


# --- the assignment on a real scan's geometry ---------------------------------------------------
@pytest.fixture(scope="module")
def geometry():
    ct = load_sample("lung1_ct")
    pair = simulate_followup(ct, seed=3, rotation_deg=4.0, translation_mm=8.0, deformation_mm=0.0)
    base = body_points(ct, 6, seed=4, erode_mm=20)
    return base, pair.map_points(base)


def test_assignment_gives_a_swapped_pair_back(geometry):
    base, truth = geometry
    matched = truth.copy()
    matched[[1, 2]] = truth[[2, 1]]  # lesions 1 and 2 matched onto each other
    plan = assign(base, matched, np.ones(len(base), bool))
    assert plan.taken[1] == 2 and plan.taken[2] == 1
    assert list(plan.taken[[0, 3, 4, 5]]) == [0, 3, 4, 5]
    # the neighbours' motion predicts where each lesion is: truth is rigid, so within a millimetre
    assert max(np.linalg.norm(plan.expected[i] - truth[i]) for i in range(len(base))) < 1.0


def test_two_lesions_on_one_place_are_not_both_assigned(geometry):
    base, truth = geometry
    matched = truth.copy()
    matched[4] = truth[3] + 1.0  # lesion 4's match lands on lesion 3
    # lesion 4 is then placed on 3's spot only if its neighbours agreed; they do not: 3 keeps it
    plan = assign(base, matched, np.ones(len(base), bool))
    assert plan.taken[3] == 3 and plan.taken[4] == -1
    # the same, with lesions 3 and 4 truly next to each other (a merge): they compete for one place
    near = base.copy()
    near[4] = base[3] + [4.0, 0.0, 0.0]
    t_near = truth.copy()
    t_near[4] = truth[3] + [4.0, 0.0, 0.0]
    m_near = t_near.copy()
    m_near[4] = t_near[3]
    plan = assign(near, m_near, np.ones(len(base), bool))
    assert {plan.taken[3], plan.taken[4]} == {3, -1}
    loser = 4 if plan.taken[4] == -1 else 3
    assert plan.rival[loser] == 7 - loser


def test_a_match_its_neighbours_disagree_with_is_refused(geometry):
    base, truth = geometry
    matched = truth.copy()
    matched[0] = truth[0] + [30.0, 0.0, 0.0]
    plan = assign(base, matched, np.ones(len(base), bool))
    assert plan.taken[0] == -1 and plan.rival[0] == -1 and plan.deviation_mm[0] > 25
    assert np.linalg.norm(plan.expected[0] - truth[0]) < 1.0


# --- end to end on the real lung CT ----------------------------------------------------------------
def _spots(ct, tumour_lps) -> list:
    """Three places deep in the body (lung or soft tissue), 40 mm from the tumour and each other."""
    chosen = [tumour_lps]
    for p in body_points(ct, 400, seed=7, erode_mm=25):
        hu = ct.array[tuple(np.rint(ct.lps_to_index(p)[::-1]).astype(int))]
        if (hu < -600 or 0 < hu < 100) and min(np.linalg.norm(p - c) for c in chosen) > 40:
            chosen.append(p)
        if len(chosen) == 4:
            return chosen[1:]
    raise AssertionError("no room for the inserted lesions")


@pytest.fixture(scope="module")
def reading(tmp_path_factory):
    from samv2core.session import EmbeddingSession

    ct = load_sample("lung1_ct")
    tumour = load_volume(sample_path("lung1_tumor_label"), "MR").array > 0.5
    t_c = ct.index_to_lps(np.argwhere(tumour)[:, ::-1].mean(0))
    # inserted lesions: in soft tissue (hypodense) and in lung (a solid nodule), 10-16 mm
    vanishing, merge_a, new_spot = _spots(ct, t_c)
    spots = {"vanishing": vanishing, "merge a": merge_a, "merge b": merge_a + [13.0, 0.0, 0.0]}
    base, follow = ct, ct
    labels = tumour.astype(np.float32)
    for v, (name, c) in enumerate(spots.items(), start=2):
        hu = 30.0 if ct.array[tuple(np.rint(ct.lps_to_index(c)[::-1]).astype(int))] < -500 else -20.0
        base, m = insert_lesion(base, c, [5.0, 5.0, 5.0], hu, seed=v)
        labels[m] = v
        if name != "vanishing":
            follow, _ = insert_lesion(follow, c, [5.0, 5.0, 5.0], hu, seed=v + 10)
    # on the follow-up the two close lesions have grown into one
    follow, _ = insert_lesion(follow, (spots["merge a"] + spots["merge b"]) / 2, [12.0, 7.0, 6.0], hu, seed=20)
    follow, new_mask = insert_lesion(follow, new_spot, [7.0, 7.0, 7.0], 30.0, seed=21)
    pairs = [simulate_followup(follow, seed=s, rotation_deg=3.0, translation_mm=6.0, deformation_mm=0.0)
             for s in (2, 5)]
    session = EmbeddingSession.open(None, device="cpu", precision="fp32")
    lesions = lesions_from_label_map(ct.with_array(labels), split_components=False)
    steps = []
    for pair in pairs:  # the user's candidate regions: the follow-up's true lesions
        cand = sitk.Resample(sitk.Cast(follow.with_array(new_mask.astype(np.float32) + tumour).to_sitk(),
                                       sitk.sitkUInt8), pair.followup.to_sitk(), pair.transform,
                             sitk.sitkNearestNeighbor, 0)
        steps.append((session.embed(pair.followup), pair.followup,
                      pair.followup.with_array(sitk.GetArrayFromImage(cand).astype(np.float32))))
    base_emb = session.embed(base)
    results = track_timepoints(base_emb, base, steps, lesions)
    names = {"label 1": "tumour", "label 2": "vanishing", "label 3": "merge a", "label 4": "merge b"}
    return {"results": results, "pairs": pairs, "names": names, "new_spot": new_spot, "t_c": t_c,
            "steps": steps, "root": tmp_path_factory.mktemp("track"), "base": base, "base_emb": base_emb,
            "lesions": lesions, "session": session}


def _cut_beyond(volume, keep_out, keep_in, beyond_mm: float, inside_mm: float):
    """A crop of ``volume`` along one index axis that leaves ``keep_out`` (LPS) ``beyond_mm`` outside
    its field of view and every point of ``keep_in`` at least ``inside_mm`` inside; (lo, hi) z, y, x."""
    out_ijk = volume.lps_to_index(keep_out)
    in_ijk = volume.lps_to_index(np.asarray(keep_in))
    shape = np.asarray(volume.array.shape)
    for axis in (2, 1, 0):  # z first: a follow-up that stops short of the lesion's slices
        sp = volume.spacing[axis]
        lo, hi = np.zeros(3, int), shape.copy()
        cut = int(np.ceil(out_ijk[axis] + beyond_mm / sp))
        if np.all(in_ijk[:, axis] >= cut + inside_mm / sp):
            lo[2 - axis] = cut
            return lo, hi
        cut = int(np.floor(out_ijk[axis] - beyond_mm / sp)) + 1
        if np.all(in_ijk[:, axis] <= cut - 1 - inside_mm / sp):
            hi[2 - axis] = cut
            return lo, hi
    return None


def test_statuses_found_vanished_merged_new(reading):
    for result, pair in zip(reading["results"], reading["pairs"]):
        by = {reading["names"][t.lesion.name]: t for t in result.lesions}
        assert by["tumour"].status == "found", by["tumour"].reason
        assert np.linalg.norm(np.asarray(by["tumour"].position_lps) - pair.map_points(reading["t_c"][None])[0]) < TOL_MM
        assert by["tumour"].followup_size.volume_ml == pytest.approx(by["tumour"].baseline_size.volume_ml, rel=0.3)
        assert by["vanishing"].status == "not found" and "contrast" in by["vanishing"].reason
        assert by["merge a"].status == by["merge b"].status == "ambiguous"
        assert "merge" in by["merge a"].reason
        assert len(result.new_findings) == 1
        new = result.new_findings[0]
        assert np.linalg.norm(np.asarray(new.position_lps) - pair.map_points(reading["new_spot"][None])[0]) < TOL_MM
    # the new finding keeps its identifier on the second follow-up
    first, second = (r.new_findings[0] for r in reading["results"])
    assert (first.tracking_uid, first.tracking_id) == (second.tracking_uid, second.tracking_id)


def test_a_lesion_its_neighbours_put_beyond_the_followup_is_outside(reading):
    """The follow-up stops short of the tumour (by more than its radius): its neighbours' motion
    puts it beyond the image, so it is `outside the follow-up`, not `not found` nor found elsewhere."""
    from samv2core.lesion_size import crop

    pair, (_, follow, cand) = reading["pairs"][0], reading["steps"][0]
    by = {reading["names"][les.name]: les for les in reading["lesions"]}
    truth = {k: pair.map_points(les.centre[None])[0] for k, les in by.items()}
    box = _cut_beyond(follow, truth["tumour"], [truth[k] for k in ("vanishing", "merge a", "merge b")],
                      beyond_mm=20.0, inside_mm=15.0)
    if box is None:
        pytest.fail("no crop of the follow-up leaves the tumour out and the other lesions in")
    short = crop(follow, *box)
    result = track_timepoints(reading["base_emb"], reading["base"],
                              [(reading["session"].embed(short), short, crop(cand, *box))], reading["lesions"])[0]
    got = {reading["names"][t.lesion.name]: t for t in result.lesions}
    assert got["tumour"].status == "outside the follow-up", got["tumour"].reason
    assert "beyond the follow-up's field of view" in got["tumour"].reason
    assert got["vanishing"].status == "not found"
    assert got["merge a"].status != "outside the follow-up" and got["merge b"].status != "outside the follow-up"


def test_a_lesion_the_constellation_refuses_does_not_also_make_a_new_finding(reading, monkeypatch):
    """The constellation gate refuses the tumour's match and its neighbours' prediction is 12 mm off
    (as under a strong local deformation): the tumour is `not found`, and its follow-up region lies
    within its radius + tolerance of the prediction, so it is not a `new` finding as well."""
    from samv2core import lesion_tracking

    pair, step = reading["pairs"][0], reading["steps"][0]
    real_assign = lesion_tracking.assign
    idx = next(n for n, les in enumerate(reading["lesions"]) if reading["names"][les.name] == "tumour")
    truth = pair.map_points(reading["t_c"][None])[0]

    def refusing(src, dst, use, **kw):
        plan = real_assign(src, dst, use, **kw)
        plan.taken[idx] = -1
        plan.expected[idx] = truth + [12.0, 0.0, 0.0]
        return plan

    monkeypatch.setattr(lesion_tracking, "assign", refusing)
    result = track_timepoints(reading["base_emb"], reading["base"], [step], reading["lesions"])[0]
    tumour = next(t for t in result.lesions if reading["names"][t.lesion.name] == "tumour")
    assert tumour.status == "not found"
    near = [n for n in result.new_findings if np.linalg.norm(np.asarray(n.position_lps) - truth) < 20]
    assert not near, [n.name for n in near]
    # the real new finding is still reported
    new_truth = pair.map_points(reading["new_spot"][None])[0]
    assert any(np.linalg.norm(np.asarray(n.position_lps) - new_truth) < TOL_MM for n in result.new_findings)


def test_sr_reads_back_with_stable_tracking_uids_and_measurements(reading):
    root = reading["root"]
    contexts = [image_context(step[1]) for step in reading["steps"]]
    assert all(c.generated for c in contexts)
    srs = [root / "fu1.dcm", root / "fu2.dcm"]
    with OutputSet() as files:
        doc = write_tracking_outputs(files, reading["results"], contexts, json_out=root / "t.json",
                                     csv_out=root / "t.csv", sr_outs=srs)
    uids = []
    for path in srs:
        ds = pydicom.dcmread(path)
        assert ds.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
        assert GENERATED in ds.SeriesDescription and "CurrentRequestedProcedureEvidenceSequence" not in ds
        sr = hd.sr.Comprehensive3DSR.from_dataset(ds)
        uids.append(tracking_uids(ds))
        planar = sr.content.get_planar_roi_measurement_groups()
        found = [g for g in planar if g.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))]
        assert found, "no volume measurement in the report"
        for g in found:
            names = {m.name.value for m in g.get_measurements()}
            assert {"118565006", "103339001"} <= names  # volume, long axis (and the time point order)
            assert g.roi.GraphicType == "POINT"
        statuses = {g.tracking_identifier: g.get_qualitative_evaluations()[0].value.meaning
                    for g in planar + list(sr.content.get_image_measurement_groups())}
        assert statuses["label 2"] == "Absent" and statuses["label 1"] == "Present"
    lesion_uids = {t.lesion.tracking_id: t.lesion.tracking_uid for t in reading["results"][0].lesions}
    assert uids[0] == uids[1] and all(uids[0][k] == v for k, v in lesion_uids.items())
    assert len(uids[0]) == 5  # four lesions and the new finding
    rows = list(csv.DictReader((root / "t.csv").open()))
    assert len(rows) == 10 and {r["status"] for r in rows} == {"found", "not found", "ambiguous", "new"}
    assert json.loads((root / "t.json").read_text()) == json.loads(json.dumps(doc))


@pytest.mark.skipif(not DICOM_CT.is_dir(), reason="../shared/data/ct/totalseg_dicom is absent")
def test_sr_references_a_dicom_source_series(reading):
    context = image_context(load_volume(DICOM_CT))
    assert not context.generated and len(context.evidence) == len(list(DICOM_CT.iterdir()))
    ds = measurement_report(reading["results"][0], context)
    refs = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    on_disk = {str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.MediaStorageSOPInstanceUID)
               for f in DICOM_CT.iterdir()}
    assert {str(r.ReferencedSOPInstanceUID) for r in refs} == on_disk
    assert GENERATED not in ds.SeriesDescription
    frame = str(pydicom.dcmread(next(DICOM_CT.iterdir()), stop_before_pixels=True).FrameOfReferenceUID)
    planar = hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_planar_roi_measurement_groups()
    assert planar and all(g.roi.ReferencedFrameOfReferenceUID == frame for g in planar)


def test_cli_track_writes_json_csv_and_one_sr_per_followup(reading, tmp_path, capsys):
    from samv2core.cli import main

    root = reading["root"]
    base_path, lab_path = root / "base.nrrd", root / "lesions.nrrd"
    ct = load_sample("lung1_ct")
    sitk.WriteImage(ct.to_sitk(), str(base_path))
    sitk.WriteImage(sitk.Cast(load_volume(sample_path("lung1_tumor_label"), "MR").to_sitk(), sitk.sitkUInt8),
                    str(lab_path))
    follow = root / "follow.nrrd"
    sitk.WriteImage(reading["pairs"][0].followup.to_sitk(), str(follow))
    outs = [tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "r.dcm"]
    code = main(["track", "--baseline", str(base_path), "--followup", str(follow), "--lesions", str(lab_path),
                 "--out", str(outs[0]), "--out-csv", str(outs[1]), "--out-sr", str(outs[2]),
                 "--device", "cpu", "--precision", "fp32"])
    assert code == 0, capsys.readouterr().err
    doc = json.loads(outs[0].read_text())
    lesion = doc["followups"][0]["lesions"][0]
    assert lesion["status"] == "found" and "generated" in doc["followups"][0]["dicom_context"]
    truth = reading["pairs"][0].map_points(reading["t_c"][None])[0]
    assert np.linalg.norm(np.asarray(lesion["followup_position"]) - truth) < TOL_MM
    assert pydicom.dcmread(outs[2]).ContentTemplateSequence[0].TemplateIdentifier == "1500"
    # one SR per follow-up, or nothing is written
    code = main(["track", "--baseline", str(base_path), "--followup", str(follow), "--lesions", str(lab_path),
                 "--out-sr", str(tmp_path / "a.dcm"), str(tmp_path / "b.dcm"), "--device", "cpu"])
    assert code == 2 and "one file per follow-up" in capsys.readouterr().err
    assert not (tmp_path / "a.dcm").exists() and not list(Path(tmp_path).glob(".partial-*"))


def test_cli_track_refuses_unusable_lesions_before_the_model_runs(tmp_path, capsys):
    from samv2core.cli import main

    ct = load_sample("lung1_ct")
    base, empty = tmp_path / "base.nrrd", tmp_path / "empty.nrrd"
    sitk.WriteImage(ct.to_sitk(), str(base))
    sitk.WriteImage(sitk.Cast(ct.with_array(np.zeros(ct.array.shape, np.float32)).to_sitk(), sitk.sitkUInt8), str(empty))
    common = ["track", "--baseline", str(base), "--followup", str(base), "--out", str(tmp_path / "r.json")]
    for extra, message in (([], "give the baseline lesions"),
                           (["--lesions", str(empty), "--point", "0,0,0", "--coords", "LPS"], "not --lesions and --point"),
                           (["--lesions", str(empty)], "constant"),
                           (["--point", "0,0,0"], "--coords"),
                           (["--point", "0,0,0", "--coords", "LPS", "--radius-mm", "-3"], "positive")):
        assert main(common + extra) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "r.json").exists()
