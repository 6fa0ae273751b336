"""The correspondences SAM-rigid / SAM-affine fit: evenly spaced query points in one body
mask, cycle-consistent stable matches (SAME++), both ends inside the body masks, and a
sub-voxel refinement of the matched end.

Query side: by default the image with the smaller body volume (CrossSAM: sample the smaller
field of view, whose points all have a counterpart in the larger scan); 'moving' follows
SAME++ literally.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from ..errors import InputError, RegistrationError
from ..matching import nn_query_points, stable_matches
from ..volume import Volume
from .sampling import grid_points_in_mask

QUERY_SIDES = ("auto", "moving", "fixed")


@dataclass
class PointPairs:
    """Matched points: fixed LPS (N, 3), moving LPS (N, 3), similarity scores (N,), and a report."""

    fixed: np.ndarray
    moving: np.ndarray
    scores: np.ndarray
    report: dict = field(default_factory=dict)


def _mask_lookup(volume: Volume, mask: np.ndarray, points: np.ndarray) -> np.ndarray:
    ijk = np.rint(volume.lps_to_index(points)).astype(int)
    size = np.asarray(volume.size_xyz)
    ok = np.all((ijk >= 0) & (ijk < size), axis=1)
    out = np.zeros(len(points), bool)
    out[ok] = mask[ijk[ok, 2], ijk[ok, 1], ijk[ok, 0]]
    return out


def _inside_fov(emb, points: np.ndarray, margin_mm: float) -> np.ndarray:
    """True where a point is at least ``margin_mm`` inside the field of view of the scan ``emb``
    was computed from (its own voxel grid: an oblique or rotated scan's model grid is a larger
    box whose corners hold no data).

    The margin shrinks to a quarter of the extent along thin axes (a 40 mm slab keeps its
    middle 20 mm rather than nothing).
    """
    geo = emb.meta.get("source")
    if geo is None:
        mv = emb.model_volume
        m4, size, spacing = mv.index_to_lps_matrix, np.asarray(mv.size_xyz, float), np.asarray(mv.spacing)
    else:
        m4, size = np.asarray(geo["index_to_lps"]), np.asarray(geo["size_xyz"], float)
        spacing = np.linalg.norm(m4[:3, :3], axis=0)
    pts = np.asarray(points, float).reshape(-1, 3)
    ijk = (pts - m4[:3, 3]) @ np.linalg.inv(m4[:3, :3]).T
    m = np.minimum(margin_mm / spacing, (size - 1) / 4.0)
    return np.all((ijk >= m) & (ijk <= size - 1 - m), axis=1)


def _min_extent(volume: Volume) -> float:
    return float(((np.asarray(volume.size_xyz) - 1) * np.asarray(volume.spacing)).min())


def _subvoxel(template_emb, query_emb, template_pts: np.ndarray, query_pts: np.ndarray,
              max_shift_mm: float) -> tuple[np.ndarray, int]:
    """Refine the query end of each match to sub-voxel precision (NN search with a parabolic
    peak fit from the same template point); keeps the voxel answer when the refinement moves
    further than ``max_shift_mm`` (a different peak, not a refinement)."""
    # forward search only: the NN round trip's backward search would be thrown away here
    refined, _ = nn_query_points(template_emb, query_emb, template_pts)
    close = np.linalg.norm(refined - query_pts, axis=1) <= max_shift_mm
    out = query_pts.copy()
    out[close] = refined[close]
    return out, int(close.sum())


def registration_matches(emb_f, emb_m, mask_f: np.ndarray, mask_m: np.ndarray, *, spacing_mm: float = 16.0,
                         max_points: int = 1500, passes: int = 5, min_score: float = 0.7,
                         mask_margin_mm: float = 4.0, query_side: str = "auto", subvoxel: bool = True,
                         edge_margin_mm: float = 16.0, min_points: int = 12,
                         min_query_points: int = 200) -> PointPairs:
    """Stable matches between two embedded volumes, as fixed / moving LPS point pairs.

    ``mask_f`` / ``mask_m`` are body masks on the embeddings' model volumes. Matches with an
    end closer than ``edge_margin_mm`` to its image's field-of-view border are dropped: the
    network sees no context beyond a cut, and those embeddings are biased. Fewer than
    ``min_query_points`` queries at ``spacing_mm`` (a small crop) halve the spacing, down to
    the 4 mm embedding grid. Raises
    RegistrationError when the query body mask is too small to sample.
    """
    if query_side not in QUERY_SIDES:
        raise InputError(f"query_side must be one of {QUERY_SIDES}, got {query_side!r}")
    mv_f, mv_m = emb_f.model_volume, emb_m.model_volume
    vol_f = float(mask_f.sum()) * float(np.prod(mv_f.spacing))
    vol_m = float(mask_m.sum()) * float(np.prod(mv_m.spacing))
    side = query_side if query_side != "auto" else ("fixed" if vol_f < vol_m else "moving")
    if side == "moving":
        t_emb, q_emb, t_mv, t_mask, q_mv, q_mask = emb_m, emb_f, mv_m, mask_m, mv_f, mask_f
    else:
        t_emb, q_emb, t_mv, t_mask, q_mv, q_mask = emb_f, emb_m, mv_f, mask_f, mv_m, mask_m
    used_spacing = float(spacing_mm)
    while True:
        queries = grid_points_in_mask(t_mv, t_mask, used_spacing, max_points=max_points, min_levels=4,
                                      border_mm=min(8.0, 0.125 * _min_extent(t_mv)))
        queries = queries[_inside_fov(t_emb, queries, edge_margin_mm)]
        # small images (crops): sample more densely, down to the 4 mm embedding grid
        if len(queries) >= min_query_points or used_spacing <= 4.0:
            break
        used_spacing = max(4.0, used_spacing / 2.0)
    if len(queries) < min_points:
        raise RegistrationError(
            f"the {side} body mask holds only {len(queries)} sample points at {used_spacing:g} mm: too small to register")
    sm = stable_matches(t_emb, q_emb, queries, passes=passes, min_score=min_score)
    it_t = max(1, int(round(mask_margin_mm / max(t_mv.spacing))))
    it_q = max(1, int(round(mask_margin_mm / max(q_mv.spacing))))
    keep = (_mask_lookup(t_mv, ndimage.binary_dilation(t_mask, iterations=it_t), sm.template_lps)
            & _mask_lookup(q_mv, ndimage.binary_dilation(q_mask, iterations=it_q), sm.query_lps)
            & _inside_fov(t_emb, sm.template_lps, edge_margin_mm) & _inside_fov(q_emb, sm.query_lps, edge_margin_mm))
    t_pts, q_pts, scores = sm.template_lps[keep], sm.query_lps[keep], sm.scores[keep]
    refined = 0
    if subvoxel and len(t_pts):
        voxel = float(max(q_emb.fine_grid.spacing))
        q_pts, refined = _subvoxel(t_emb, q_emb, t_pts, q_pts, max_shift_mm=voxel)
    fixed_pts, moving_pts = (q_pts, t_pts) if side == "moving" else (t_pts, q_pts)
    report = {"query_side": side, "query_spacing_mm": used_spacing, "query_points": int(len(queries)), "stable_matches": int(len(sm.scores)),
              "inside_masks": int(keep.sum()), "subvoxel_refined": int(refined), "min_score": min_score,
              "passes": passes, "score_median": round(float(np.median(scores)), 4) if len(scores) else None}
    return PointPairs(fixed_pts, moving_pts, scores, report)
