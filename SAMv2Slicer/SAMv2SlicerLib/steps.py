"""The computing steps of the module (no MRML, no Qt, no Slicer): match points, propagate a
lesion, register, embed ahead of use. Each takes the core ``EmbeddingSession`` (model and
embeddings cache) and a progress callback.

The module logic runs them in-process (scripts, tests); the worker process (``server``) runs
the same functions for the Slicer GUI.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from samv2core.matching import match_points, prepare_pair
from samv2core.pair_registration import REGISTRATION
from samv2core.propagate import propagate_lesion
from samv2core.propagate import segment_samples  # noqa: F401 - ops calls it through steps (worker side)
from samv2core.registration import register as core_register
from samv2core.session import EmbeddingSession
from samv2core.volume import Volume

from .cancellation import ProgressCallback, no_progress, sub_progress


def embed_volumes(session: EmbeddingSession, volumes, progress: ProgressCallback = no_progress) -> list[str]:
    """Embed volumes ahead of use (the background 'embed' request); returns their names.

    For a baseline / follow-up pair this also runs the refined match's per-pair precompute
    (kept with the two embeddings), so that it happens while the user places points and the
    first click only matches."""
    steps_total = len(volumes) + (1 if len(volumes) == 2 else 0)
    embs = [session.embed(vol, sub_progress(progress, i / steps_total, (i + 1) / steps_total))
            for i, vol in enumerate(volumes)]
    if len(embs) == 2:
        progress(2 / steps_total, "preparing the pair for matching")
        # the pair's fixed points, then its registration (the clicks' independent opinion, once per pair)
        prepare_pair(*embs, registration=REGISTRATION)
    progress(1.0, "embedded")
    return [v.name for v in volumes]


def match(session: EmbeddingSession, base: Volume, follow: Volume, points_lps, method: str,
          progress: ProgressCallback = no_progress) -> list:
    """Match template points (LPS, in the baseline's voxel space) onto the follow-up."""
    points_lps = np.asarray(points_lps, dtype=np.float64).reshape(-1, 3)
    e_base = session.embed(base, sub_progress(progress, 0.0, 0.45))
    e_follow = session.embed(follow, sub_progress(progress, 0.45, 0.9))
    progress(0.9, f"matching {len(points_lps)} point(s)")
    results = match_points(e_base, e_follow, points_lps, method=method, registration=REGISTRATION)
    progress(1.0, "matched")
    return results


def propagate(session: EmbeddingSession, base: Volume, follow: Volume, samples_lps, method: str,
              radius_mm: Optional[float], mask: Optional[Volume], progress: ProgressCallback = no_progress):
    """Propagate a lesion with the core (``samv2core.propagate``): a ball of ``radius_mm`` around the
    matched centre (``samples_lps[0]``), or ``mask`` carried by a local fit of the samples' matches.
    Returns (centre MatchResult, region Volume or None, details with the 'model')."""
    samples_lps = np.asarray(samples_lps, dtype=np.float64).reshape(-1, 3)
    e_base = session.embed(base, sub_progress(progress, 0.0, 0.45))
    e_follow = session.embed(follow, sub_progress(progress, 0.45, 0.85))
    progress(0.85, "matching the lesion")
    if mask is None:
        out = propagate_lesion(e_base, e_follow, follow, centre_lps=samples_lps[0], radius_mm=radius_mm, method=method)
    else:
        out = propagate_lesion(e_base, e_follow, follow, mask=mask, samples_lps=samples_lps, method=method)
    progress(1.0, "lesion propagated")
    return out.centre, out.region, {"model": out.model, **out.details}


def register(session: EmbeddingSession, fixed: Volume, moving: Volume, mode: str, deformable: bool, options,
             progress: ProgressCallback = no_progress):
    """Register moving onto fixed with the session's model (a samv2core RegistrationResult)."""
    return core_register(fixed, moving, mode=mode, deformable=deformable, embedder=session,
                         options=options, progress=progress)
