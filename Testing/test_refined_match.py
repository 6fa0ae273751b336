"""The refined click-to-match (default method) on follow-ups SIMULATED from a real CT with the
hard protocol (samv2core.simulate.simulate_hard_followup), a lesion-change pair, and the
fallbacks (the SAM answer with a reason, never an exception).

Data: the bundled pyradiomics lung CT and its tumour label (PyPI origin); exact truth from the
known transform.
"""
from __future__ import annotations

import numpy as np
import pytest

from samv2core.bundled_samples import load_sample
from samv2core.click_refine import LocalRegistration, regional_map
from samv2core.embed import Embedder
from samv2core.matching import match_points
from samv2core.models import resolve_model
from samv2core.simulate import body_points, change_lesion, simulate_hard_followup
from samv2core.volume import Volume


@pytest.fixture(scope="module")
def embedder():
    return Embedder(resolve_model(None).model, device="cpu")


@pytest.fixture(scope="module")
def lung():
    return load_sample("lung1_ct")


@pytest.fixture(scope="module")
def hard_pair(lung, embedder):
    pair = simulate_hard_followup(lung, seed=0)
    pts = body_points(lung, 400, seed=5)
    truth = pair.map_points(pts)
    ok = pair.followup.contains_lps(truth, -2.0)
    return pair, pts[ok][:16], truth[ok][:16], embedder.embed(lung), embedder.embed(pair.followup)


def _errors(results, truth):
    return np.linalg.norm(np.array([r.query_point.xyz for r in results]) - truth, axis=1)


def test_hard_protocol_follow_up_has_its_own_grid_and_exact_truth(lung, hard_pair):
    pair = hard_pair[0]
    f = pair.followup
    assert not np.allclose(f.spacing, lung.spacing)  # its own voxel grid
    z_extent = lambda v: (v.size_xyz[2] - 1) * v.spacing[2]
    assert z_extent(f) == pytest.approx(0.85 * z_extent(lung), abs=f.spacing[2] + 1e-6)
    # the truth inverts the transform: the follow-up point maps back onto the baseline point
    p = hard_pair[1][:3]
    back = np.array([pair.transform.TransformPoint(tuple(q)) for q in pair.map_points(p)])
    assert np.abs(back - p).max() < 1e-3
    assert pair.params["simulated"] and lung.array.min() < -900  # input untouched, in HU


def test_refined_is_precise_where_fixed_point_is_not(hard_pair):
    _, pts, truth, te, qe = hard_pair
    fp = _errors(match_points(te, qe, pts, method="fixed_point"), truth)
    results = match_points(te, qe, pts)  # the default method is the refined match
    ref = _errors(results, truth)
    assert all(r.method == "refined" for r in results)
    assert {r.answer for r in results} <= {"refined", "sam", "arbiter"} and all(r.answer_reason for r in results)
    assert np.mean([r.answer == "refined" for r in results]) >= 0.6
    assert np.median(ref) < 2.0 and np.median(ref) < 0.6 * np.median(fp)
    # points fixed-point misses by several millimetres, the refined match puts within a few
    missed = fp > 5.0
    assert missed.any() and np.median(ref[missed]) < 3.0
    # the Slicer worker's JSON protocol carries which answer was used and why
    from SAMv2SlicerLib.ops import match_from_dict, match_to_dict

    back = match_from_dict(match_to_dict(results[0]))
    assert (back.answer, back.answer_reason) == (results[0].answer, results[0].answer_reason)


def test_lesion_change_refined_stays_at_the_lesion_centre(lung, embedder):
    label = load_sample("lung1_tumor_label").array > 0
    grown, centre = change_lesion(lung, label, 8.0, seed=1)
    assert (grown.array != lung.array).sum() > label.sum()  # the lesion really grew
    pair = simulate_hard_followup(grown, seed=3)
    truth = pair.map_points(centre[None])[0]
    res = match_points(embedder.embed(lung), embedder.embed(pair.followup), centre[None])[0]
    assert np.linalg.norm(np.asarray(res.query_point.xyz) - truth) < 5.0
    assert res.answer_reason


def test_refinement_that_cannot_run_falls_back_with_a_reason(hard_pair, lung):
    pair, pts, _, te, qe = hard_pair
    local = LocalRegistration(te.model_volume, qe.model_volume)
    outside = local.refine(pts[0], np.asarray(qe.model_volume.corners_lps().max(0)) + 50.0)
    assert outside.point is None and "outside the query" in outside.reason
    corner = qe.model_volume.corners_lps()
    edge = local.refine(pts[0], corner.min(0) + 2.0)
    assert edge.point is None and "edge" in edge.reason
    # a template point whose true position lies outside the follow-up (z coverage is 85%)
    b = body_points(lung, 2000, seed=9)
    gone = b[~pair.followup.contains_lps(pair.map_points(b), 0.0)][:2]
    assert len(gone)
    for r in match_points(te, qe, gone):
        assert r.answer in ("sam", "refined", "arbiter") and r.answer_reason
        if r.answer == "sam":
            assert "SAM answer" in r.answer_reason
        if r.answer == "arbiter":
            assert "refinement not used" in r.answer_reason or "refined point" in r.answer_reason
    # different modalities: the intensities cannot be compared, the SAM answer stands
    mr = Volume(qe.model_volume.array, qe.model_volume.spacing, qe.model_volume.origin, np.eye(3), "MR")
    with pytest.raises(ValueError, match="compares intensities"):
        LocalRegistration(te.model_volume, mr)


def test_regional_map_ignores_wrong_matches():
    rng = np.random.default_rng(0)
    src = rng.uniform(-60, 60, (200, 3))
    dst = src @ np.diag([1.02, 0.98, 1.0]).T + [5.0, -3.0, 2.0]
    dst[:40] += rng.uniform(-40, 40, (40, 3))  # 20% wrong matches
    fit = regional_map(src, dst, np.zeros(3), sigma_mm=45.0)
    assert np.linalg.norm(fit.point - [5.0, -3.0, 2.0]) < 0.5
    assert regional_map(src[:3], dst[:3], np.zeros(3)) is None  # too few to support an answer


def test_refined_is_the_default_everywhere_a_user_clicks():
    import inspect

    from samv2core.matching import METHODS
    from SAMv2SlicerLib.constants import METHODS as SLICER_METHODS
    from SAMv2SlicerLib.logic import SAMv2Logic

    assert SLICER_METHODS == METHODS and METHODS[0] == "refined"
    assert inspect.signature(match_points).parameters["method"].default == "refined"
    assert inspect.signature(SAMv2Logic.match_points).parameters["method"].default == "refined"
