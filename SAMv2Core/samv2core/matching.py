"""Point matching between two embedded volumes.

* NN: the query voxel whose combined similarity to the template point is highest. The combined
  score is the mean of the per-head cosines (fine + coarse + semantic, as available), as in SAMv2.
* Fixed-point (SAMv2): iterate forward/backward NN from every point of an L^3 cube around the
  template point, keep the fixed points (exact round trips with a high score), fit a robust affine
  between the template and query fixed points and map the template point through it.
* Stable matches (SAME++): fixed points of a point set, used by registration.
* Refined (the default): the SAM answer from the pair's fixed points around the template
  point (a weighted robust affine of cycle-consistent matches on a 12 mm grid over the
  template body, computed once per pair; the cube
  fixed-point answer where too few are near), made precise by a local registration of a
  window around the point (samv2core.click_refine), and a third opinion that decides (the arbiter:
  a 25 mm local fit of the same fixed points, samv2core.arbiter): the refined point where the
  arbiter or the SAM answer agrees with it, the arbiter's where the refinement cannot run and
  SAM confirms it, otherwise flagged. Without an arbiter estimate (too few fixed points near), the refined
  point is used only where it agrees with the SAM answer, otherwise the SAM answer is kept
  and flagged.


All points in and out are LPS millimetres.
"""
from __future__ import annotations

import time
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from .arbiter import ArbiterOptions, PairArbiter, Verdict, arbitrate, decide_with_registration, pair_store
from .coords import PhysicalPoint
from .embed import Embeddings, inside_source
from .errors import InputError, MatchingError
from .fitting import huber_affine
from .match_result import MatchResult
from .preprocess import body_mask
from .click_refine import LocalRegistration, RefineOptions, regional_map
from .search import unique_search


@dataclass(frozen=True)
class MatchOptions:
    min_score: float = 0.5  # below this a match is "not confident"
    cycle_tolerance_mm: float = 10.0  # NN round trip must return this close to the template point
    cube_size: int = 5  # L: fixed-point neighbourhood is L^3 fine voxels
    iterations: int = 4  # forward/backward iterations per start point
    fixed_point_min_score: float = 0.5  # keep fixed points scoring above this
    fixed_point_max_distance_mm: float = 100.0
    min_fixed_points: int = 4
    subvoxel: bool = True  # parabolic refinement of the similarity peak

    def __post_init__(self):
        """InputError (one line, naming the option) for a value matching cannot use."""
        if self.cube_size < 1 or self.cube_size % 2 == 0:
            raise InputError(f"cube_size must be a positive odd number of voxels, got {self.cube_size}")
        for name in ("iterations", "min_fixed_points"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.cycle_tolerance_mm > 0 or not self.fixed_point_max_distance_mm > 0:
            raise InputError("cycle_tolerance_mm and fixed_point_max_distance_mm must be positive")


@dataclass(frozen=True)
class StableMatches:
    template_lps: np.ndarray  # (M, 3)
    query_lps: np.ndarray  # (M, 3)
    scores: np.ndarray  # (M,)



@dataclass
class _PairState:
    """What the refined match computes once per template/query pair."""

    template_pts: np.ndarray  # (M, 3) LPS points of a grid over the template body
    query_pts: np.ndarray  # (M, 3) their cycle-consistent matches on the query
    local: Optional[LocalRegistration]  # None when the intensities cannot be compared
    local_error: Optional[str]
    seconds: float
    body: Optional[np.ndarray] = None  # (z, y, x) body mask of the template's model-grid volume
    arbiter: Optional[PairArbiter] = None  # the third opinion (samv2core.arbiter), None when switched off
    # the pair's registration opinion (samv2core.pair_registration.RegistrationOpinion: ``map(point)``,
    # ``available``, ``refused``), built on the first click that needs it; None until then
    registration: Optional[object] = None
    registration_seconds: float = 0.0


# builds a pair's registration opinion from its two embeddings (samv2core.pair_registration.REGISTRATION);
# registration sits above matching in the layer order, so callers hand it in
RegistrationBuilder = Callable[[Embeddings, Embeddings], object]


_PAIR_CACHE: "weakref.WeakKeyDictionary[Embeddings, weakref.WeakKeyDictionary]" = weakref.WeakKeyDictionary()


def prepare_pair(template: Embeddings, query: Embeddings, refine_options: Optional[RefineOptions] = None,
                 arbiter_options: Optional[ArbiterOptions] = None,
                 registration: Optional[RegistrationBuilder] = None) -> None:
    """Run the refined match's per-pair precompute (the pair's fixed points, the arbiter and the
    local registration's set-up) ahead of the first click, e.g. while the user places points;
    with ``registration`` (samv2core.pair_registration.REGISTRATION) also the pair's
    registration opinion, which clicks otherwise build the first time one needs it. Kept as
    long as both embeddings live, and on disk when they came through a session with a cache
    folder."""
    matcher = Matcher(template, query, refine_options=refine_options, arbiter_options=arbiter_options,
                      registration=registration)
    state = matcher.pair_state()
    if registration is not None:
        matcher.registration_opinion(state)


# --------------------------------------------------------------------------------------------
class Matcher:
    """Matches points of a template volume on a query volume (both already embedded)."""

    def __init__(self, template: Embeddings, query: Embeddings, options: Optional[MatchOptions] = None,
                 refine_options: Optional[RefineOptions] = None, arbiter_options: Optional[ArbiterOptions] = None,
                 registration: Optional[RegistrationBuilder] = None):
        if (template.semantic is None) != (query.semantic is None) or template.fine.shape[0] != query.fine.shape[0]:
            raise MatchingError("template and query were embedded with different models")
        self.template, self.query = template, query
        self.t = template.index
        self.q = query.index
        self.opt = options or MatchOptions()
        self.ropt = refine_options or RefineOptions()
        self.aopt = arbiter_options or ArbiterOptions()
        self.registration = registration

    def _template_index(self, points_lps: np.ndarray) -> np.ndarray:
        pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        if not np.all(np.isfinite(pts)):
            raise InputError("template points contain NaN/Inf coordinates")
        inside = inside_source(self.template, pts)
        if not inside.all():
            bad = pts[~inside][0]
            hint = ""
            if inside_source(self.template, bad * np.array([-1.0, -1.0, 1.0])).all():
                hint = "; read as RAS it would be inside: were the coordinates RAS (--coords RAS)?"
            raise InputError(f"point ({bad[0]:.1f}, {bad[1]:.1f}, {bad[2]:.1f}) LPS mm is outside the template image"
                             + hint)
        return self.t.grid.lps_to_index(pts)

    def _forward(self, t_idx: np.ndarray, subvoxel: bool):
        return unique_search(self.t, self.q, t_idx, subvoxel)

    def _backward(self, q_idx: np.ndarray, subvoxel: bool):
        return unique_search(self.q, self.t, q_idx, subvoxel)

    # --- NN ---------------------------------------------------------------------------------
    def nn(self, points_lps) -> list[MatchResult]:
        t_idx = self._template_index(points_lps)
        q_idx, score = self._forward(t_idx, self.opt.subvoxel)
        back_idx, _ = self._backward(np.round(q_idx), False)
        back_mm = np.linalg.norm(self.t.grid.index_to_lps(back_idx) - self.t.grid.index_to_lps(t_idx), axis=1)
        return [self._result(t_idx[n], q_idx[n], score[n], back_mm[n], "nn", {}) for n in range(len(t_idx))]

    def _result(self, t_i, q_i, score, cycle_mm, method, details) -> MatchResult:
        reasons = []
        if score < self.opt.min_score:
            reasons.append(f"similarity {score:.2f} below {self.opt.min_score:.2f}")
        if cycle_mm > self.opt.cycle_tolerance_mm:
            reasons.append(f"not cycle-consistent (round trip lands {cycle_mm:.1f} mm away)")
        q_mm = self.q.grid.index_to_lps(q_i)
        if not inside_source(self.query, q_mm[None], slack_voxels=1.0)[0]:
            reasons.append("the match lies outside the query image")
        details = dict(details, cycle_error_mm=round(float(cycle_mm), 2))
        return MatchResult(PhysicalPoint(tuple(self.t.grid.index_to_lps(t_i)), "LPS"),
                           PhysicalPoint(tuple(q_mm), "LPS"),
                           float(score), not reasons, "; ".join(reasons) or None, method, details)

    # --- fixed points -------------------------------------------------------------------------
    def fixed_points(self, start_idx: np.ndarray, iterations: int):
        """Iterate t -> NN in query -> NN back in template from integer fine indices.

        Returns (template_idx, query_idx, score, converged) for every start point.
        """
        t_cur = np.round(start_idx).astype(np.float64)
        q_cur = np.zeros_like(t_cur)
        score = np.zeros(len(t_cur))
        converged = np.zeros(len(t_cur), bool)
        active = np.arange(len(t_cur))
        for _ in range(max(1, iterations)):
            if active.size == 0:
                break
            q_i, s = self._forward(t_cur[active], False)
            t_back, _ = self._backward(q_i, False)
            q_cur[active], score[active] = q_i, s
            same = np.all(t_back == t_cur[active], axis=1)
            converged[active[same]] = True
            t_cur[active[~same]] = t_back[~same]
            active = active[~same]
        return t_cur, q_cur, score, converged

    def fixed_point(self, points_lps) -> list[MatchResult]:
        t_idx = self._template_index(points_lps)
        half = self.opt.cube_size // 2
        offs = np.stack(np.meshgrid(*([np.arange(-half, half + 1)] * 3), indexing="ij"), -1).reshape(-1, 3)
        hi = np.asarray(self.t.shape[::-1]) - 1
        results = []
        for t in t_idx:
            starts = np.clip(np.round(t) + offs, 0, hi)
            tp, qp, sc, conv = self.fixed_points(starts, self.opt.iterations)
            tp_mm = self.t.grid.index_to_lps(tp)
            qp_mm = self.q.grid.index_to_lps(qp)
            t_mm = self.t.grid.index_to_lps(t)
            keep = conv & (sc > self.opt.fixed_point_min_score)
            keep &= np.linalg.norm(tp_mm - t_mm, axis=1) <= self.opt.fixed_point_max_distance_mm
            _, uniq = np.unique(tp[keep], axis=0, return_index=True)
            sel = np.flatnonzero(keep)[uniq]
            details = {"fixed_points": int(sel.size)}
            if sel.size >= self.opt.min_fixed_points:
                q_mm, fit = _robust_map(tp_mm[sel], qp_mm[sel], t_mm)
                details["fit"] = fit
                q_i = self.q.grid.lps_to_index(q_mm)
                q_i = np.clip(q_i, 0, np.asarray(self.q.shape[::-1]) - 1)
                score = self._score_at(t, q_i)
                back, _ = self._backward(np.round(q_i)[None], False)
                cyc = float(np.linalg.norm(self.t.grid.index_to_lps(back[0]) - t_mm))
                # a structure-based answer far from any fixed point's NN is still cycle-checked
                results.append(self._result(t, q_i, score, cyc, "fixed_point", details))
            else:
                nn = self.nn(t_mm[None])[0]
                reason = f"only {sel.size} fixed points (need {self.opt.min_fixed_points}); NN fallback"
                results.append(MatchResult(nn.template_point, nn.query_point, nn.score, False,
                                           "; ".join(r for r in (reason, nn.reason) if r), "fixed_point",
                                           dict(nn.details, **details)))
        return results

    def _score_at(self, t_idx: np.ndarray, q_idx: np.ndarray) -> float:
        a = self.t.descriptors(t_idx[None])
        b = self.q.descriptors(q_idx[None])
        return float((a * b).sum() / self.t.n_heads)

    # --- refined: SAM answer + local registration, checked against each other -----------------
    def pair_state(self) -> _PairState:
        """The pair's cycle-consistent matches on a grid over the template body, and the local
        registration of the two model-grid volumes (built once per pair and options)."""
        per_template = _PAIR_CACHE.setdefault(self.template, weakref.WeakKeyDictionary())
        state = per_template.get(self.query)
        if state is not None and state[0] == (self.ropt, self.aopt):
            return state[1]
        t0 = time.perf_counter()
        mv = self.template.model_volume
        mask = body_mask(mv)
        step = max(1, int(round(self.ropt.fixed_point_grid_mm / max(mv.spacing))))
        kji = np.argwhere(mask[step // 2::step, step // 2::step, step // 2::step]) * step + step // 2
        grid = mv.index_to_lps(kji[:, ::-1].astype(np.float64))
        if len(grid) > self.ropt.max_fixed_points:
            grid = grid[np.linspace(0, len(grid) - 1, self.ropt.max_fixed_points).astype(int)]
        store = pair_store(self.template, self.query, {"refine": self.ropt.to_dict(), "grid_points": len(grid)})
        cached = store.load() if store is not None else None
        if cached is not None:
            t_pts, q_pts = cached
        else:
            t_pts, q_pts = self._grid_fixed_points(grid)
            if store is not None:
                store.save(t_pts, q_pts)
        local, error = None, None
        try:
            local = LocalRegistration(mv, self.query.model_volume, self.ropt)
        except ValueError as exc:
            error = str(exc)
        arbiter = PairArbiter(t_pts, q_pts, self.aopt) if self.aopt.enabled else None
        result = _PairState(t_pts, q_pts, local, error, time.perf_counter() - t0, mask, arbiter)
        per_template[self.query] = ((self.ropt, self.aopt), result)
        return result

    def registration_opinion(self, state: _PairState):
        """The pair's registration opinion, built once per pair (None without a builder)."""
        if state.registration is None and self.registration is not None:
            t0 = time.perf_counter()
            state.registration = self.registration(self.template, self.query)
            state.registration_seconds = time.perf_counter() - t0
        return state.registration

    def _grid_fixed_points(self, grid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """NN with a sub-voxel peak from every grid point, kept when the round trip returns to the
        start voxel's neighbourhood with a high score: fixed points of the NN map, placed below
        the 4 mm grid. Returns (template LPS (M, 3), query LPS (M, 3))."""
        if not len(grid):
            return np.zeros((0, 3)), np.zeros((0, 3))
        t_idx = self.t.grid.lps_to_index(grid)
        q_idx, score = self._forward(t_idx, True)
        back, _ = self._backward(np.round(q_idx), False)
        cyc = np.linalg.norm(self.t.grid.index_to_lps(back) - grid, axis=1)
        keep = (cyc <= self.ropt.fixed_point_cycle_mm) & (score > self.ropt.fixed_point_min_score)
        return grid[keep], self.q.grid.index_to_lps(q_idx[keep])

    def refined(self, points_lps) -> list[MatchResult]:
        t_idx = self._template_index(points_lps)
        state = self.pair_state()
        return [self._refined_one(t, state) for t in t_idx]

    def _sam_answer(self, t: np.ndarray, state: _PairState) -> tuple[MatchResult, str]:
        """The SAM answer: the pair's fixed points near the point (regional fit), else the cube fixed point."""
        t_mm = self.t.grid.index_to_lps(t)
        fit = regional_map(state.template_pts, state.query_pts, t_mm, self.ropt.regional_sigma_mm)
        if fit is None:
            return self.fixed_point(t_mm[None])[0], "fixed-point cube (too few of the pair's fixed points nearby)"
        q_i = np.clip(self.q.grid.lps_to_index(fit.point), 0, np.asarray(self.q.shape[::-1]) - 1)
        back, _ = self._backward(np.round(q_i)[None], False)
        cyc = float(np.linalg.norm(self.t.grid.index_to_lps(back[0]) - t_mm))
        details = {"fixed_points_support": round(fit.support, 1), "fit_residual_mm": round(fit.residual_mm, 2)}
        res = self._result(t, self.q.grid.lps_to_index(fit.point), self._score_at(t, q_i), cyc, "refined", details)
        return res, "regional fixed points"

    def _refined_one(self, t: np.ndarray, state: _PairState) -> MatchResult:
        """The first vote; where it is not confident, the pair's registration (when a builder
        was given, built now if not yet) decides between the answers (samv2core.arbiter.
        decide_with_registration); a refused registration leaves the first vote as it is."""
        candidates: dict = {}
        first = self._first_vote(t, state, candidates)
        if not candidates or self.registration is None or not self.aopt.enabled:
            return first
        if first.confident:  # never builds the registration, but a registration already built may veto
            return self._checked_by_registration(first, state.registration)
        opinion = self.registration_opinion(state)
        details = dict(first.details)
        if not opinion.available:
            details["registration"] = {"refused": opinion.refused}
            return MatchResult(first.template_point, first.query_point, first.score, False, first.reason, "refined",
                               details, first.answer, first.answer_reason)
        registered = opinion.map(first.template_point.as_array())
        # the first vote's answer first: where it agrees with the registration it stays
        order = {first.answer: first.query_point.as_array(), **candidates}
        verdict = decide_with_registration(
            Verdict(first.query_point.as_array(), first.answer, first.answer_reason, False, first.reason),
            order, registered, self.aopt.agree_mm)
        details["registration"] = {"point": [round(float(v), 2) for v in registered], "first_answer": first.answer,
                                   "candidates": {k: [round(float(v), 2) for v in p] for k, p in order.items()}}
        reasons = [] if verdict.agreed else [verdict.flag]
        if verdict.agreed and first.score < self.opt.min_score:
            reasons.append(f"similarity {first.score:.2f} below {self.opt.min_score:.2f}")
        return MatchResult(first.template_point, PhysicalPoint(tuple(float(v) for v in verdict.point), "LPS"),
                           first.score, not reasons, "; ".join(reasons) or None, "refined", details, verdict.answer,
                           verdict.answer_reason)

    def _checked_by_registration(self, first: MatchResult, opinion) -> MatchResult:
        """A confident first vote against the pair's registration when it is already built (the
        Slicer worker's background, or an earlier click that needed it): it stays confident only
        where the registration agrees within the bound; otherwise the same answer, flagged (two
        opinions agreed on it, so the registration alone does not replace it)."""
        if opinion is None or not opinion.available:
            return first
        registered = opinion.map(first.template_point.as_array())
        d = float(np.linalg.norm(first.query_point.as_array() - registered))
        details = dict(first.details, registration={"point": [round(float(v), 2) for v in registered],
                                                    "first_answer": first.answer, "distance_mm": round(d, 2)})
        if d <= self.aopt.agree_mm:
            return MatchResult(first.template_point, first.query_point, first.score, True, None, "refined", details,
                               first.answer, f"{first.answer_reason}; the pair registration agrees within {d:.1f} mm")
        flag = f"the pair registration disagrees by {d:.1f} mm (more than {self.aopt.agree_mm:g} mm)"
        return MatchResult(first.template_point, first.query_point, first.score, False, flag, "refined", details,
                           first.answer, f"{first.answer_reason}; {flag}")

    def _first_vote(self, t: np.ndarray, state: _PairState, candidates: dict) -> MatchResult:
        """Confident only when the refined answer is used, agrees with the SAM answer and both
        similarities (embedding at the SAM answer, local intensity after refinement) are high.
        Fills ``candidates`` (answer kind -> query LPS point) with the opinions that exist
        (left empty for a point outside the body)."""
        sam, localiser = self._sam_answer(t, state)
        sam_q = sam.query_point.as_array()
        details = dict(sam.details, sam_point=[round(v, 2) for v in sam_q], sam_localiser=localiser)
        base = dict(template_point=sam.template_point, score=sam.score, method="refined", details=details)

        def keep_sam(why: str, flag: str) -> MatchResult:
            # a SAM reason the flag already gives ("... outside the query image") is said once
            said = flag.replace("the SAM answer", "").replace("not refined:", "").strip()
            reasons = [flag] + [r for r in (sam.reason or "").split("; ")
                                if r and "cycle" not in r and r.replace("the match", "").strip() != said]
            return MatchResult(query_point=sam.query_point, confident=False, reason="; ".join(reasons),
                               answer="sam", answer_reason=why, **base)

        if state.body is not None:
            mv = self.template.model_volume
            ijk = np.rint(mv.lps_to_index(sam.template_point.as_array())).astype(int)
            inside = bool(np.all((ijk >= 0) & (ijk < np.asarray(mv.size_xyz))) and state.body[ijk[2], ijk[1], ijk[0]])
            if not inside:
                return keep_sam("SAM answer: the point lies outside the body (no anatomy to match)",
                                "the point lies outside the body")
        ref = state.local.refine(sam.template_point.as_array(), sam_q) if state.local is not None else None
        if ref is not None:
            details["refinement"] = ref.to_dict()
        estimate = state.arbiter.estimate(sam.template_point.as_array()) if state.arbiter is not None else None
        if ref is not None and ref.point is not None:
            candidates["refined"] = np.asarray(ref.point, float)
        if estimate is not None:
            candidates["arbiter"] = np.asarray(estimate.point, float)
        candidates["sam"] = sam_q
        if estimate is not None:  # the third opinion decides (samv2core.arbiter)
            details["arbiter"] = estimate.to_dict()
            missing = f"the local refinement cannot run: {state.local_error}" if ref is None else ref.reason
            verdict = arbitrate(sam_q, None if ref is None else ref.point, np.nan if ref is None else ref.lncc,
                                missing, estimate, self.aopt, self.ropt.agree_mm, self.ropt.confident_lncc)
            reasons = [] if verdict.agreed else [verdict.flag]
            if sam.score < self.opt.min_score:
                reasons.append(f"similarity {sam.score:.2f} below {self.opt.min_score:.2f}")
            return MatchResult(query_point=PhysicalPoint(tuple(float(v) for v in verdict.point), "LPS"),
                               confident=not reasons, reason="; ".join(reasons) or None, answer=verdict.answer,
                               answer_reason=verdict.answer_reason, **base)
        if ref is None:
            return keep_sam(f"SAM answer: the local refinement cannot run ({state.local_error})", "not refined")
        if ref.point is None:
            return keep_sam(f"SAM answer: refinement not used ({ref.reason})", f"not refined: {ref.reason}")
        if ref.shift_mm > self.ropt.agree_mm:
            return keep_sam(f"SAM answer: the refined point is {ref.shift_mm:.1f} mm away (more than "
                            f"{self.ropt.agree_mm:g} mm); the intensities may follow changed anatomy",
                            f"SAM and refined answers disagree by {ref.shift_mm:.1f} mm")
        reasons = []
        if sam.score < self.opt.min_score:
            reasons.append(f"similarity {sam.score:.2f} below {self.opt.min_score:.2f}")
        if ref.lncc < self.ropt.confident_lncc:
            reasons.append(f"local similarity {ref.lncc:.2f} below {self.ropt.confident_lncc:.2f}")
        why = f"refined: within {ref.shift_mm:.1f} mm of the SAM answer, local similarity {ref.lncc:.2f}"
        return MatchResult(query_point=PhysicalPoint(tuple(float(v) for v in ref.point), "LPS"),
                           confident=not reasons, reason="; ".join(reasons) or None, answer="refined",
                           answer_reason=why, **base)

    # --- stable matches for registration ------------------------------------------------------
    def stable(self, points_lps, iterations: int = 5, min_score: float = 0.7) -> StableMatches:
        pts = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
        start = np.clip(np.round(self.t.grid.lps_to_index(pts)), 0, np.asarray(self.t.shape[::-1]) - 1)
        start = np.unique(start, axis=0)
        tp, qp, sc, conv = self.fixed_points(start, iterations)
        keep = conv & (sc > min_score)
        tp, qp, sc = tp[keep], qp[keep], sc[keep]
        _, uniq = np.unique(tp, axis=0, return_index=True)
        return StableMatches(self.t.grid.index_to_lps(tp[uniq]), self.q.grid.index_to_lps(qp[uniq]), sc[uniq])


def _robust_map(src: np.ndarray, dst: np.ndarray, point: np.ndarray, iterations: int = 10):
    """Map ``point`` by a Huber-IRLS affine fitted src -> dst (translation only when degenerate)."""
    sv = np.linalg.svd(src - src.mean(0), compute_uv=False) if len(src) >= 3 else np.zeros(3)
    if len(src) < 8 or sv[-1] < 1e-3 * max(sv[0], 1e-9) or sv[-1] < 1.0:
        shift = np.median(dst - src, axis=0)
        return point + shift, {"model": "translation", "points": int(len(src))}
    a, t, r = huber_affine(src, dst, iterations)
    return a @ point + t, {"model": "affine", "points": int(len(src)),
                           "residual_mm": round(float(np.median(r)), 2)}


# --------------------------------------------------------------------------------------------
METHODS = ("refined", "fixed_point", "nn")


def match_points(template: Embeddings, query: Embeddings, points_lps, method: str = "refined",
                 options: Optional[MatchOptions] = None,
                 refine_options: Optional[RefineOptions] = None,
                 arbiter_options: Optional[ArbiterOptions] = None,
                 registration: Optional[RegistrationBuilder] = None) -> list[MatchResult]:
    """Match template points (N, 3) LPS onto the query volume. Returns one MatchResult per point.

    ``method``: 'refined' (default: SAM answer made precise by a local registration and checked
    against it), 'fixed_point' (SAMv2 fixed-point match) or 'nn' (nearest neighbour).
    ``registration``: the builder of the pair's registration opinion
    (samv2core.pair_registration.REGISTRATION), asked once per pair when a refined click's
    first vote is not confident; None: no registration opinion."""
    matcher = Matcher(template, query, options, refine_options, arbiter_options, registration)
    if method == "nn":
        return matcher.nn(points_lps)
    if method in ("fixed_point", "fixed-point", "fp"):
        return matcher.fixed_point(points_lps)
    if method == "refined":
        return matcher.refined(points_lps)
    raise InputError(f"unknown matching method {method!r}: use one of {', '.join(METHODS)}")


def nn_query_points(template: Embeddings, query: Embeddings, points_lps, subvoxel: bool = True):
    """Forward NN only, without the cycle check: (query LPS (N, 3), scores (N,))."""
    matcher = Matcher(template, query)
    q_idx, score = matcher._forward(matcher._template_index(points_lps), subvoxel)
    return matcher.q.grid.index_to_lps(q_idx), score


def stable_matches(template: Embeddings, query: Embeddings, points_lps, passes: int = 5,
                   min_score: float = 0.7) -> StableMatches:
    """Cycle-consistent (forward-backward fixed point) matches of ``points_lps`` for registration."""
    return Matcher(template, query).stable(points_lps, passes, min_score)
