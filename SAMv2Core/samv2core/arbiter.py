"""The third opinion of the refined click-to-match: the pair's arbiter, and the vote.

The refined match has two answers for a click: the SAM answer (a broad, 50 mm regional affine
of the pair's fixed points) and the refined answer (a local intensity registration started
from it). Where they disagree, or the refinement cannot run (no structure in the window, a
point at the edge of an image), something independent of both must decide.

The arbiter is the pair's dense fixed-point field: the same cycle-consistent embedding matches
on a 12 mm grid over the template body that the SAM answer uses (computed once per pair), fitted
*locally* around the click (Gaussian reach 25 mm, widened to 35 / 50 mm only where too few
matches are near; Tukey IRLS). A 50 mm fit cannot follow a deformation that bends within a few
centimetres (the SAM answer's 10-17 mm misses); a 25 mm fit does, and it uses embeddings only,
so it does not follow changed intensities the way the refined answer can (a grown lesion).

The vote (:func:`arbitrate`): the refined answer where the arbiter or the SAM answer agrees
with it; the arbiter's estimate where the refinement gave nothing and the SAM answer agrees with it;
otherwise the match is flagged (see there for which answer is then reported). Confident = two
independent opinions agree and the embedding similarity is high. SAM + arbiter agreeing
against a refinement that ran is not enough: both rest on the same fixed points.

The pair's fixed points are kept with the pair: in memory (matching's per-pair state) and,
when the embeddings came through a session with a cache folder, on disk (:class:`PairDiskCache`,
keyed by the SHA-1 of both model-grid volumes, the model and the settings). The disk cache is
best effort: an unreadable or mismatching entry is recomputed, never trusted or fatal.

All points are LPS millimetres.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .checked_tensors import CorruptFileError, discard_cache_entry, load_keyed_entry, save_checked
from .fitting import RegionalFit, regional_map

_log = logging.getLogger(__name__)

ANSWERS = ("refined", "sam", "arbiter", "registration")  # the values of MatchResult.answer


@dataclass(frozen=True)
class ArbiterOptions:
    """Settings of the arbiter and of the vote."""

    enabled: bool = True  # False: the refined match without a third opinion (SAM vs refined only)
    sigmas_mm: tuple = (25.0, 35.0, 50.0)  # Gaussian reach of the local fit, widened in turn where support is thin
    min_support: float = 6.0  # effective number of fixed points a fit needs
    agree_mm: float = 5.0  # an answer within this of the arbiter agrees with it
    trust_lncc: float = 0.5  # a refined answer this similar locally outweighs SAM + arbiter agreeing against it

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ArbiterEstimate:
    """Where the arbiter sends a template point, and on how much support."""

    point: np.ndarray  # LPS (3,)
    sigma_mm: float  # the reach of the fit that was used
    support: float
    residual_mm: float

    def to_dict(self) -> dict:
        return {"point": [round(float(v), 2) for v in self.point], "sigma_mm": self.sigma_mm,
                "support": round(self.support, 1), "residual_mm": round(self.residual_mm, 2)}


class PairArbiter:
    """The arbiter of one template / query pair, built from the pair's fixed points."""

    def __init__(self, template_pts: np.ndarray, query_pts: np.ndarray, options: Optional[ArbiterOptions] = None):
        self.template_pts = np.asarray(template_pts, float).reshape(-1, 3)
        self.query_pts = np.asarray(query_pts, float).reshape(-1, 3)
        self.opt = options or ArbiterOptions()

    def estimate(self, point) -> Optional[ArbiterEstimate]:
        """The arbiter's answer for template ``point`` (LPS (3,)); None where no fit has support."""
        for sigma in self.opt.sigmas_mm:
            fit: Optional[RegionalFit] = regional_map(self.template_pts, self.query_pts, point, sigma,
                                                      self.opt.min_support)
            if fit is not None:
                return ArbiterEstimate(np.asarray(fit.point, float), float(sigma), fit.support, fit.residual_mm)
        return None


@dataclass(frozen=True)
class Verdict:
    """The vote's outcome: the answer to report, which one it is, why, and whether to trust it."""

    point: np.ndarray  # LPS (3,)
    answer: str  # one of ANSWERS
    answer_reason: str
    agreed: bool  # two independent opinions agree on it
    flag: Optional[str]  # why it is not trusted (None when agreed)


def arbitrate(sam_point, refined_point, refined_lncc: float, refined_missing: Optional[str],
              estimate: ArbiterEstimate, options: Optional[ArbiterOptions] = None,
              sam_agree_mm: float = 8.0, confident_lncc: float = 0.5) -> Verdict:
    """Decide between the refined answer (None when the refinement gave none, with the reason
    ``refined_missing``; ``refined_lncc`` its local similarity) and the SAM answer, with the
    arbiter's ``estimate``:

    1. refined within ``agree_mm`` of the arbiter, or within ``sam_agree_mm`` of the SAM answer
       with a local similarity of at least ``confident_lncc`` (the two-opinion gate of the
       refined match, samv2core.click_refine.RefineOptions): the refined answer, agreed (intensities
       and embeddings agree; the arbiter and SAM are each independent of the refinement);
    2. SAM within ``agree_mm`` of the arbiter and no refined answer: the arbiter's estimate,
       agreed when the arbiter's fit kept its first (local) reach (SAM confirms it, and the local
       fit follows bent anatomy better than SAM's); a widened fit is not a second opinion;
    3. SAM within ``agree_mm`` of the arbiter but the refinement points elsewhere: not agreed
       (both embedding opinions share the pair's fixed points, the intensities contradict
       them); the refined answer when its local similarity is high (``trust_lncc``) or the
       arbiter had to widen, else the arbiter's;
    4. no agreement: the refined answer where there is one, else the arbiter's; not agreed.
    """
    opt = options or ArbiterOptions()
    a = estimate.point
    # widened beyond its first reach, the arbiter is close to the SAM answer's own 50 mm fit of
    # the same fixed points: its agreement with SAM is then no second opinion
    local = estimate.sigma_mm <= opt.sigmas_mm[0]
    sam = np.asarray(sam_point, float)
    d_sam = float(np.linalg.norm(sam - a))
    ref = None if refined_point is None else np.asarray(refined_point, float)
    if ref is not None:
        d_ref = float(np.linalg.norm(ref - a))
        d_rs = float(np.linalg.norm(ref - sam))
        if d_ref <= opt.agree_mm:
            return Verdict(ref, "refined", f"refined: the arbiter agrees within {d_ref:.1f} mm (the SAM answer is "
                                           f"{d_rs:.1f} mm away)", True, None)
        if d_rs <= sam_agree_mm and refined_lncc >= confident_lncc:
            return Verdict(ref, "refined", f"refined: within {d_rs:.1f} mm of the SAM answer, local similarity "
                                           f"{refined_lncc:.2f} (the arbiter is {d_ref:.1f} mm away)", True, None)
        why_ref = f"the refined point is {d_ref:.1f} mm from the arbiter (local similarity {refined_lncc:.2f})"
    else:
        why_ref = f"refinement not used ({refined_missing})"
    reach = "" if local else f" (the arbiter's fit had to reach {estimate.sigma_mm:g} mm)"
    if d_sam <= opt.agree_mm:
        if ref is None:
            if local:
                return Verdict(a, "arbiter", f"arbiter: the SAM answer agrees within {d_sam:.1f} mm; {why_ref}", True,
                               None)
            return Verdict(a, "arbiter", f"arbiter: the SAM answer agrees within {d_sam:.1f} mm{reach}; {why_ref}",
                           False, f"not confirmed: the SAM answer and a wide arbiter fit rest on the same matches{reach}")
        flag = f"the refined answer and the arbiter disagree ({why_ref}){reach}"
        if refined_lncc >= opt.trust_lncc or not local:
            return Verdict(ref, "refined", f"refined (contradicts the arbiter and the SAM answer, which agree within "
                                           f"{d_sam:.1f} mm{reach}); {why_ref}", False, flag)
        return Verdict(a, "arbiter", f"arbiter: the SAM answer agrees within {d_sam:.1f} mm; {why_ref}", False, flag)
    flag = f"the SAM answer and the arbiter disagree by {d_sam:.1f} mm; {why_ref}"
    if ref is not None:
        return Verdict(ref, "refined", f"refined (unconfirmed: no two answers agree); {why_ref}", False, flag)
    return Verdict(a, "arbiter", f"arbiter (unconfirmed: no two answers agree); {why_ref}", False, flag)


def decide_with_registration(first: Verdict, candidates: dict, registered, agree_mm: float) -> Verdict:
    """The vote once the pair's registration (an intensity-driven opinion independent of the
    embedding matches, samv2core.pair_registration) is asked, for a click whose first vote
    (``first``) was not agreed. ``candidates``: answer kind -> point (LPS (3,)) of the opinions
    that exist, in order of preference (the first vote's answer first); ``registered``: where
    the registration sends the point.

    The first candidate within ``agree_mm`` of the registration is the answer, agreed (two
    independent opinions agree); when none is, the registration's own point, not agreed.
    """
    reg = np.asarray(registered, float)
    dists = {kind: float(np.linalg.norm(np.asarray(p, float) - reg)) for kind, p in candidates.items()}
    said = ", ".join(f"{k} {d:.1f} mm" for k, d in dists.items())
    for kind, point in candidates.items():
        if dists[kind] <= agree_mm:
            return Verdict(np.asarray(point, float), kind,
                           f"{kind}: the pair registration agrees within {dists[kind]:.1f} mm (decided by the "
                           f"registration; first vote: {first.answer_reason})", True, None)
    return Verdict(reg, "registration", f"registration: no answer within {agree_mm:g} mm of the pair registration "
                                        f"({said}); first vote: {first.answer_reason}", False,
                   f"no answer agrees with the pair registration within {agree_mm:g} mm ({said})")


# --- the pair's fixed points on disk ------------------------------------------------------------
def pair_key(template_content: str, query_content: str, model_id: str, settings: dict) -> str:
    """The cache key of a pair: both model-grid volumes' content hashes, the model and the
    settings that shaped the fixed points."""
    return json.dumps([template_content, query_content, model_id, settings], sort_keys=True)


class PairDiskCache:
    """A pair's fixed points (template and query LPS points) in a checksummed safetensors file."""

    def __init__(self, folder: "str | Path"):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        return self.folder / f"pair-{hashlib.sha1(key.encode()).hexdigest()}.safetensors"

    def load(self, key: str) -> Optional[tuple[np.ndarray, np.ndarray]]:
        """(template_pts, query_pts) stored under ``key``; None when absent or not trustworthy
        (a bad entry is removed)."""
        path = self.path(key)
        try:
            entry = load_keyed_entry(path, key)
            if entry is None:
                return None
            t = entry[0]
            tp, qp = t["template_pts"].double().numpy(), t["query_pts"].double().numpy()
            if tp.ndim != 2 or tp.shape[1:] != (3,) or tp.shape != qp.shape or not np.isfinite(tp).all() \
                    or not np.isfinite(qp).all():
                raise CorruptFileError(f"{path}: the stored points are malformed")
            return tp, qp
        except (CorruptFileError, KeyError, TypeError, ValueError, OSError) as exc:
            discard_cache_entry(path, "pair cache entry", exc)
            return None

    def save(self, key: str, template_pts: np.ndarray, query_pts: np.ndarray) -> None:
        path = self.path(key)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            save_checked(path, {"template_pts": torch.as_tensor(np.asarray(template_pts, np.float64)).contiguous(),
                                "query_pts": torch.as_tensor(np.asarray(query_pts, np.float64)).contiguous()},
                         {"key": key})
        except (OSError, ValueError, TypeError) as exc:  # a cache that cannot be written only costs time later
            _log.warning("samv2: warning: could not write the pair cache entry %s (%s)", path, exc)


class PairStore:
    """One pair's entry in a :class:`PairDiskCache` (best effort: never raises)."""

    def __init__(self, cache: PairDiskCache, key: str):
        self.cache, self.key = cache, key

    def load(self) -> Optional[tuple[np.ndarray, np.ndarray]]:
        return self.cache.load(self.key)

    def save(self, template_pts: np.ndarray, query_pts: np.ndarray) -> None:
        self.cache.save(self.key, template_pts, query_pts)

    def registration_path(self) -> Path:
        """Where the pair's registration opinion (samv2core.pair_registration) is kept, next to
        its fixed points."""
        path = self.cache.path(self.key)
        return path.with_name("pairreg-" + path.name[len("pair-"):])


def pair_store(template, query, settings: dict) -> Optional[PairStore]:
    """The disk entry of the pair (template, query) (samv2core.embed.Embeddings) with
    ``settings``, in the cache folder their session keeps embeddings in (``meta['cache_dir']``);
    None when they came from no session with a folder."""
    folder = template.meta.get("cache_dir") or query.meta.get("cache_dir")
    if not folder:
        return None
    key = pair_key(template.model_volume.content_key, query.model_volume.content_key, template.model_id, settings)
    return PairStore(PairDiskCache(folder), key)
