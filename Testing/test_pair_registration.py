"""The refined match's independent opinion, the pair's verified registration
(samv2core.pair_registration), on a follow-up SIMULATED from a real CT with the hard protocol:
clicks whose first vote is not confident are decided by it and say so, it is built once per
pair (lazily, or by prepare_pair in the background), it round-trips through the disk cache next
to the pair's fixed points, and a refused registration gives no opinion.

Data: the bundled pyradiomics lung CT (PyPI origin); exact truth from the known transform.
"""
from __future__ import annotations

import numpy as np
import pytest
from samv2core import pair_registration
from samv2core.click_refine import RefineOptions
from samv2core.matching import Matcher, match_points, prepare_pair
from samv2core.pair_registration import RegistrationSource
from samv2core.registration import RegistrationOptions
from samv2core.registration.verify import VerifyOptions
from samv2core.session import EmbeddingSession

STRICT = RefineOptions(agree_mm=1.0)  # a strict SAM / refined gate: more first votes left unconfident


@pytest.fixture(scope="module")
def case(hard_lung_case):
    return hard_lung_case


class Counting:
    """A registration builder that counts its calls (the real one underneath)."""

    def __init__(self, source=None):
        self.source, self.calls = source or RegistrationSource(), 0

    def __call__(self, template, query):
        self.calls += 1
        return self.source(template, query)


def _err(results, truth):
    return np.linalg.norm(np.array([r.query_point.xyz for r in results]) - truth, axis=1)


def test_unconfident_clicks_are_decided_by_the_registration_which_is_built_once(case):
    _, _, pts, truth, te, qe = case
    first = match_points(te, qe, pts, refine_options=STRICT)
    builder = Counting()
    decided = match_points(te, qe, pts[:12], refine_options=STRICT, registration=builder)
    decided += match_points(te, qe, pts[12:], refine_options=STRICT, registration=builder)
    assert builder.calls == 1, "the pair's registration is built once per pair"
    unconfident = np.array([not r.confident for r in first])
    assert unconfident.sum() >= 2, "the strict gate should leave some first votes unconfident on this pair"
    state = Matcher(te, qe, refine_options=STRICT).pair_state()
    assert state.registration is not None and state.registration.available
    for r0, r, u in zip(first, decided, unconfident):
        if not u:  # a confident first vote keeps its answer; a registration already built may only veto it
            assert r.query_point.xyz == r0.query_point.xyz and r.answer == r0.answer
            if "registration" in r.details:
                d = r.details["registration"]["distance_mm"]
                assert r.confident == (d <= 5.0) and (r.confident or "pair registration disagrees" in r.reason)
            continue
        reg = np.asarray(r.details["registration"]["point"])
        assert "pair registration" in r.answer_reason and r.to_dict()["answer"] == r.answer
        d = float(np.linalg.norm(r.query_point.as_array() - reg))
        if r.answer == "registration":
            assert not r.confident and d < 0.01 and "no answer agrees" in r.reason
        else:
            assert d <= 5.0 + 0.01 and "agrees within" in r.answer_reason
    e0, e1 = _err(first, truth), _err(decided, truth)
    assert (e1 < 10.0).sum() >= (e0 < 10.0).sum()
    assert sum(r.confident for r in decided) > sum(r.confident for r in first)
    assert not any(r.confident and e >= 10.0 for r, e in zip(decided, e1))


def test_prepare_pair_builds_the_registration_in_the_background(case):
    _, _, pts, _, te, qe = case
    options = RefineOptions(agree_mm=1.0, fixed_point_grid_mm=13.0)  # a pair state of its own
    builder = Counting()
    prepare_pair(te, qe, options, registration=builder)
    assert builder.calls == 1
    match_points(te, qe, pts[:6], refine_options=options, registration=builder)
    assert builder.calls == 1


def test_registration_round_trips_from_disk_and_a_bad_entry_is_recomputed(case, bundled_embedder, tmp_path, monkeypatch):
    lung, pair, pts, _, _, _ = case
    folder = tmp_path / "cache"
    s1 = EmbeddingSession(bundled_embedder, cache_dir=folder)
    te, qe = s1.embed(lung), s1.embed(pair.followup)
    opinion = RegistrationSource()(te, qe)
    assert opinion.available
    entries = sorted(folder.glob("pairreg-*.safetensors"))
    assert len(entries) == 1

    s2 = EmbeddingSession(bundled_embedder, cache_dir=folder)  # a new process: the registration comes from disk
    te2, qe2 = s2.embed(lung), s2.embed(pair.followup)

    def never(*args, **kwargs):
        raise AssertionError("the pair's registration was recomputed instead of read from disk")

    with monkeypatch.context() as m:
        m.setattr(pair_registration, "compute_opinion", never)
        loaded = RegistrationSource()(te2, qe2)
    np.testing.assert_allclose([loaded.map(p) for p in pts[:6]], [opinion.map(p) for p in pts[:6]], atol=1e-3)

    entries[0].write_bytes(b"not a tensor file")  # best effort: reported, removed, recomputed
    calls = []
    real = pair_registration.compute_opinion
    with monkeypatch.context() as m:
        m.setattr(pair_registration, "compute_opinion", lambda *a, **k: calls.append(1) or real(*a, **k))
        again = RegistrationSource()(te2, qe2)
    assert calls == [1] and again.available
    assert entries[0].exists() and entries[0].read_bytes() != b"not a tensor file"


def test_a_refused_registration_gives_no_opinion(case, bundled_embedder, tmp_path):
    lung, pair, pts, _, _, _ = case
    # no verification can pass (it needs more overlapping sample points than the images have)
    refusing = RegistrationSource(RegistrationOptions(verify_options=VerifyOptions(min_points=10 ** 9)))
    session = EmbeddingSession(bundled_embedder, cache_dir=tmp_path)
    te, qe = session.embed(lung), session.embed(pair.followup)
    opinion = refusing(te, qe)
    assert not opinion.available and opinion.refused and opinion.map(pts[0]) is None
    assert not refusing(te, qe).available  # the refusal is kept on disk too (not retried per click)

    first = match_points(te, qe, pts[:8], refine_options=STRICT)
    builder = Counting(refusing)
    res = match_points(te, qe, pts[:8], refine_options=STRICT, registration=builder)
    assert builder.calls == (1 if any(not r.confident for r in first) else 0)
    for r0, r in zip(first, res):  # the first vote stands, and the result says the registration was refused
        assert r.query_point.xyz == r0.query_point.xyz and r.answer == r0.answer and r.confident == r0.confident
        if not r0.confident:
            assert r.details["registration"]["refused"]
