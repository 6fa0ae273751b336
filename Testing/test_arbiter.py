"""The refined match's third opinion (samv2core.arbiter) on a follow-up SIMULATED from a real CT
with the hard protocol: disagreements and refinements that cannot run are decided by the
arbiter and the result says so; the pair's fixed points are computed once per pair and
round-trip through the disk cache next to the embeddings.

Data: the bundled pyradiomics lung CT (PyPI origin); exact truth from the known transform.
"""
from __future__ import annotations

import numpy as np
import pytest
from samv2core.arbiter import ArbiterOptions
from samv2core.matching import Matcher, match_points, prepare_pair
from samv2core.click_refine import RefineOptions
from samv2core.session import EmbeddingSession


@pytest.fixture(scope="module")
def case(hard_lung_case):
    return hard_lung_case


def _err(results, truth):
    return np.linalg.norm(np.array([r.query_point.xyz for r in results]) - truth, axis=1)


def test_disagreement_is_arbitrated_and_the_result_says_so(case):
    """With a strict two-opinion gate (SAM and refined must agree within 1 mm), most refined
    answers "disagree" with the SAM answer and the gate alone keeps the SAM answer; with the
    arbiter, the third opinion decides, the result says so, and the answers are better."""
    _, _, pts, truth, te, qe = case
    strict = RefineOptions(agree_mm=1.0)
    with_arbiter = match_points(te, qe, pts, refine_options=strict)
    without = match_points(te, qe, pts, refine_options=strict, arbiter_options=ArbiterOptions(enabled=False))
    kept_sam = np.array([r.answer == "sam" and "disagree" in (r.reason or "") for r in without])
    assert kept_sam.sum() >= 2, "the setting should produce SAM / refined disagreements on this pair"
    decided = [r for r, k in zip(with_arbiter, kept_sam) if k]
    for r in decided:
        assert r.answer in ("refined", "arbiter") and "arbiter" in r.answer_reason
        assert "arbiter" in r.details and r.to_dict()["answer"] == r.answer
    e_with, e_without = _err(with_arbiter, truth), _err(without, truth)
    assert np.median(e_with[kept_sam]) < np.median(e_without[kept_sam])
    assert (e_with < 10.0).mean() >= (e_without < 10.0).mean()
    # confident answers are right: none of them 10 mm or more off
    assert not any(r.confident and e >= 10.0 for r, e in zip(with_arbiter, e_with))


def test_refinement_that_cannot_run_is_decided_by_the_arbiter(case):
    _, _, pts, truth, te, qe = case
    no_structure = RefineOptions(min_texture=1e9)  # nothing is ever structured enough to register
    res = match_points(te, qe, pts[:10], refine_options=no_structure)
    assert {r.answer for r in res} <= {"arbiter", "sam"} and "arbiter" in {r.answer for r in res}
    for r in res:
        if r.answer == "arbiter":
            assert "refinement not used (no structure" in r.answer_reason
            assert r.confident == ("agrees within" in r.answer_reason and r.reason is None)
    assert np.median(_err(res, truth[:10])) < 4.0


def test_the_pair_state_is_computed_once_per_pair(case, monkeypatch):
    _, _, pts, _, te, qe = case
    calls = []
    original = Matcher._grid_fixed_points

    def counting(self, grid):
        calls.append(len(grid))
        return original(self, grid)

    monkeypatch.setattr(Matcher, "_grid_fixed_points", counting)
    options = RefineOptions(fixed_point_grid_mm=13.0)  # a pair state of its own (not shared with other tests)
    prepare_pair(te, qe, options)
    first = Matcher(te, qe, refine_options=options).pair_state()
    match_points(te, qe, pts[:3], refine_options=options)
    match_points(te, qe, pts[3:5], refine_options=options)
    assert len(calls) == 1
    assert Matcher(te, qe, refine_options=options).pair_state().arbiter is first.arbiter is not None


def test_pair_cache_round_trips_from_disk_and_a_bad_entry_is_recomputed(case, bundled_embedder, tmp_path, monkeypatch):
    lung, pair, pts, _, _, _ = case
    folder = tmp_path / "cache"
    s1 = EmbeddingSession(bundled_embedder, cache_dir=folder)
    te, qe = s1.embed(lung), s1.embed(pair.followup)
    prepare_pair(te, qe)
    entries = sorted(folder.glob("pair-*.safetensors"))
    assert len(entries) == 1
    first = match_points(te, qe, pts[:4])
    state = Matcher(te, qe).pair_state()

    # a new session (a new process): embeddings and the pair's fixed points come from disk
    s2 = EmbeddingSession(bundled_embedder, cache_dir=folder)
    te2, qe2 = s2.embed(lung), s2.embed(pair.followup)
    assert te2 is not te and te2.meta.get("from_disk_cache")

    def never(self, grid):
        raise AssertionError("the pair's fixed points were recomputed instead of read from disk")

    with monkeypatch.context() as m:
        m.setattr(Matcher, "_grid_fixed_points", never)
        again = match_points(te2, qe2, pts[:4])
    loaded = Matcher(te2, qe2).pair_state()
    np.testing.assert_array_equal(loaded.template_pts, state.template_pts)
    np.testing.assert_array_equal(loaded.query_pts, state.query_pts)
    assert [r.query_point.xyz for r in again] == pytest.approx([r.query_point.xyz for r in first], abs=1e-4)
    assert [r.answer for r in again] == [r.answer for r in first]

    # best effort: a corrupt entry is reported, removed and recomputed, never fatal
    entries[0].write_bytes(b"not a tensor file")
    s3 = EmbeddingSession(bundled_embedder, cache_dir=folder)
    third = match_points(s3.embed(lung), s3.embed(pair.followup), pts[:4])
    assert [r.query_point.xyz for r in third] == pytest.approx([r.query_point.xyz for r in first], abs=1e-4)
    assert entries[0].exists() and entries[0].read_bytes() != b"not a tensor file"  # rewritten
