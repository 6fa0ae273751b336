"""Linear fits to matched point pairs, the one home for them: weighted least-squares rigid
(Arun et al. / Kabsch SVD), similarity (Umeyama) and affine maps; ``robust_fit`` (RANSAC,
then IRLS with Tukey biweights on the inliers, a minimum inlier count and a residual report)
for registration; ``huber_affine`` (IRLS with Huber weights) for the few fixed points of one
click in matching; ``regional_map`` (a Gaussian-localised Tukey IRLS affine) for the regional
SAM answer of a click.

Every fit maps ``src`` points onto ``dst`` points: ``dst ~= matrix @ src + translation``. The
registration pipeline fits FIXED -> MOVING (the ITK resampling convention).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from .errors import RegistrationError

MODES = ("rigid", "affine")
# Minimal sample sizes: 3 non-collinear points fix a rotation (and a similarity), 4 non-coplanar an affine map.
_MIN_SAMPLE = {"rigid": 3, "similarity": 3, "affine": 4}


@dataclass
class LinearFit:
    """A fitted linear transform and how well the matches support it (all distances in mm)."""

    mode: str
    matrix: np.ndarray  # (3, 3)
    translation: np.ndarray  # (3,)
    inliers: np.ndarray  # (N,) bool over the input pairs
    residuals_mm: np.ndarray  # (N,) |dst - fit(src)| for every input pair
    threshold_mm: float
    stats: dict = field(default_factory=dict)

    @property
    def n_inliers(self) -> int:
        return int(self.inliers.sum())

    def homogeneous(self) -> np.ndarray:
        """The 4x4 matrix of the fit."""
        m = np.eye(4)
        m[:3, :3] = self.matrix
        m[:3, 3] = self.translation
        return m

    def apply(self, points) -> np.ndarray:
        """Map (N, 3) points with the fit."""
        return np.asarray(points, dtype=np.float64) @ self.matrix.T + self.translation

    def report(self) -> dict:
        """JSON-ready summary: counts, inlier residual statistics, decomposition."""
        r_in = self.residuals_mm[self.inliers]
        return {
            "mode": self.mode,
            "matches": int(self.inliers.size),
            "inliers": self.n_inliers,
            "inlier_fraction": round(self.n_inliers / max(1, self.inliers.size), 4),
            "inlier_threshold_mm": round(float(self.threshold_mm), 3),
            "residual_mm_inliers": _summary(r_in),
            "residual_mm_all": _summary(self.residuals_mm),
            "matrix": self.matrix.round(8).tolist(),
            "translation_mm": self.translation.round(6).tolist(),
            **self.stats,
        }


def _summary(r: np.ndarray) -> dict:
    if r.size == 0:
        return {"mean": None, "median": None, "p90": None, "max": None, "rms": None}
    return {"mean": round(float(r.mean()), 3), "median": round(float(np.median(r)), 3),
            "p90": round(float(np.percentile(r, 90)), 3), "max": round(float(r.max()), 3),
            "rms": round(float(np.sqrt(np.mean(r ** 2))), 3)}


def fit_rigid(src, dst, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares rotation R and translation t with dst ~= R src + t (Arun et al. 1987).

    Uses the SVD of the weighted cross-covariance, with the sign correction that rules out
    reflections (Umeyama), so R is always a proper rotation.
    """
    src, dst, w = _prepare(src, dst, weights)
    cs, cd = w @ src, w @ dst
    h = (src - cs).T @ ((dst - cd) * w[:, None])
    u, _, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    return r, cd - r @ cs


def fit_similarity(src, dst, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares s R and t with dst ~= s R src + t (Umeyama 1991): rotation and isotropic scale."""
    src, dst, w = _prepare(src, dst, weights)
    cs, cd = w @ src, w @ dst
    a, b = src - cs, dst - cd
    h = a.T @ (b * w[:, None])
    u, sv, vt = np.linalg.svd(h)
    d = np.sign(np.linalg.det(vt.T @ u.T)) or 1.0
    r = vt.T @ np.diag([1.0, 1.0, d]) @ u.T
    var = float(w @ np.sum(a * a, axis=1))
    scale = float((sv * np.array([1.0, 1.0, d])).sum() / max(var, 1e-12))
    m = scale * r
    return m, cd - m @ cs


def fit_affine(src, dst, weights=None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted least-squares 3x3 matrix A and translation t with dst ~= A src + t."""
    src, dst, w = _prepare(src, dst, weights)
    cs, cd = w @ src, w @ dst
    sw = np.sqrt(w)[:, None]
    # Centering decouples the translation and keeps the system well conditioned for
    # points far from the origin (scanner coordinates can be ~1 m away).
    sol, *_ = np.linalg.lstsq((src - cs) * sw, (dst - cd) * sw, rcond=None)
    a = sol.T
    return a, cd - a @ cs


def _prepare(src, dst, weights):
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    if src.shape != dst.shape:
        raise ValueError(f"src and dst must have the same shape, got {src.shape} and {dst.shape}")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    if w.sum() <= 0:
        raise ValueError("weights must not all be zero")
    return src, dst, w / w.sum()


def _fit(mode, src, dst, weights=None):
    return {"rigid": fit_rigid, "similarity": fit_similarity, "affine": fit_affine}[mode](src, dst, weights)


def _spread_ok(points: np.ndarray, mode: str, min_extent_mm: float) -> bool:
    """True when points span enough of 3D space to determine the transform.

    Rigid needs a non-degenerate plane (2 axes); affine needs all three axes (points all
    in one thick slice cannot fix the scaling along the slice normal).
    """
    if len(points) < _MIN_SAMPLE[mode]:
        return False
    sv = np.linalg.svd(points - points.mean(0), compute_uv=False) / np.sqrt(len(points))
    need = 3 if mode == "affine" else 2
    return bool(sv[need - 1] >= min_extent_mm)


def robust_fit(src, dst, mode: str = "affine", *, threshold_mm: float = 8.0, min_inliers: int = 12,
               iterations: int = 1000, scores=None, irls_iterations: int = 20, min_extent_mm: float = 5.0,
               max_scale: float = 2.0, affine_min_spread_mm: float = 15.0, tukey_sigmas: float = 2.5,
               min_inlier_fraction: float = 0.15, seed: int = 0) -> LinearFit:
    """Fit ``mode`` ('rigid' | 'affine') to point pairs with RANSAC + Tukey-biweight IRLS.

    RANSAC (MSAC scoring, minimal samples) picks the consensus set within ``threshold_mm``;
    the transform is then refitted by IRLS with Tukey biweights whose cutoff is
    ``tukey_sigmas`` robust standard deviations of the consensus residuals (at most
    ``threshold_mm``); inliers are the matches within that cutoff. ``scores`` (match
    similarities) weight the fit. Fewer than ``min_inliers`` inliers, or fewer than
    ``min_inlier_fraction`` of all pairs, is refused: random matches can agree by chance. An affine fit whose source points spread less than ``affine_min_spread_mm``
    (standard deviation) along some direction, e.g. matches in a thin slab of slices, cannot
    fix the scaling across the slab: a similarity transform (rotation, isotropic scale,
    translation) is fitted instead and ``stats['fitted_model']`` says so.
    Returns a LinearFit; raises RegistrationError when the pairs cannot
    support a transform: too few pairs or inliers, points in a degenerate configuration,
    or an affine map with a reflection / implausible scaling.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    n = len(src)
    min_inliers = max(int(min_inliers), _MIN_SAMPLE[mode])
    if n < min_inliers:
        raise RegistrationError(
            f"too few confident matches for a {mode} fit: {n} pairs, at least {min_inliers} are required "
            "(the images may not share anatomy, or the similarity threshold is too strict)")
    requested = mode
    if mode == "affine":
        spread = np.minimum(np.linalg.svd(src - src.mean(0), compute_uv=False),
                            np.linalg.svd(dst - dst.mean(0), compute_uv=False)) / np.sqrt(n)
        if spread[-1] < affine_min_spread_mm:
            mode = "similarity"
    if not _spread_ok(src, mode, min_extent_mm) or not _spread_ok(dst, mode, min_extent_mm):
        raise RegistrationError(
            f"the {n} matched points are (nearly) {'coplanar' if mode == 'affine' else 'collinear'}: "
            f"they cannot determine a {mode} transform")
    w_score = None if scores is None else np.clip(np.asarray(scores, dtype=np.float64).ravel(), 1e-3, None)
    rng = np.random.default_rng(seed)
    k = _MIN_SAMPLE[mode]
    t2 = threshold_mm ** 2

    best_cost, best_inl = np.inf, None
    for _ in range(int(iterations)):
        idx = rng.choice(n, size=k, replace=False)
        if not _spread_ok(src[idx], mode, min_extent_mm):
            continue
        m, t = _fit(mode, src[idx], dst[idx])
        if mode != "rigid" and not _plausible_affine(m, max_scale):
            continue
        r2 = np.sum((src @ m.T + t - dst) ** 2, axis=1)
        cost = np.minimum(r2, t2).sum()  # MSAC: inliers count by residual, outliers a constant
        if cost < best_cost:
            best_cost, best_inl = cost, r2 < t2
    if best_inl is None or best_inl.sum() < k:
        best_inl = np.ones(n, dtype=bool)  # every sample degenerate: let the checks below decide

    inl = best_inl
    m, t = _fit(mode, src[inl], dst[inl], None if w_score is None else w_score[inl])
    # IRLS with Tukey's biweight: matches a few millimetres off (a wrong but nearby voxel)
    # are down-weighted smoothly instead of counting fully up to the RANSAC threshold.
    cutoff = float(threshold_mm)
    for _ in range(int(irls_iterations)):
        res = np.linalg.norm(src @ m.T + t - dst, axis=1)
        core = res[res < threshold_mm]
        if core.size < k:
            break
        # residual norms of 3D Gaussian errors: median = 1.538 sigma
        # floored at 0.5 mm: matches live on a 4 mm embedding grid, a near-zero spread only
        # means the consensus is a minimal sample that fits itself exactly
        sigma = max(float(np.median(core)) / 1.538, 0.5)
        cutoff = min(float(threshold_mm), tukey_sigmas * sigma)
        sel = res < cutoff
        if sel.sum() < k or not _spread_ok(src[sel], mode, min_extent_mm):
            cutoff = float(threshold_mm)
            break
        w = (1.0 - (res[sel] / cutoff) ** 2) ** 2
        if w_score is not None:
            w = w * w_score[sel]
        m_new, t_new = _fit(mode, src[sel], dst[sel], w)
        converged = np.allclose(m_new, m, atol=1e-7) and np.allclose(t_new, t, atol=1e-4)
        m, t = m_new, t_new
        if converged:
            break

    res = np.linalg.norm(src @ m.T + t - dst, axis=1)
    inl = res < cutoff
    fit = LinearFit(requested, m, t, inl, res, float(cutoff))
    n_in = int(inl.sum())
    if n_in < min_inliers:
        raise RegistrationError(
            f"too few matches agree on one {mode} transform: {n_in} inliers within {cutoff:.1f} mm of "
            f"{n} matches, at least {min_inliers} are required")
    if n_in < min_inlier_fraction * n:
        raise RegistrationError(
            f"the matches do not agree on one {mode} transform: only {n_in} of {n} ({100 * n_in / n:.1f}%) are "
            f"inliers, at least {100 * min_inlier_fraction:.0f}% are required (unrelated images or an unsuitable model?)")
    if not _spread_ok(src[inl], mode, min_extent_mm):
        raise RegistrationError(f"the {n_in} inlier matches are (nearly) coplanar: they cannot determine a {mode} transform")
    det = float(np.linalg.det(m))
    if mode != "rigid" and not _plausible_affine(m, max_scale):
        sv = np.linalg.svd(m, compute_uv=False)
        raise RegistrationError(
            f"the fitted {mode} transform is implausible (determinant {det:.3f}, scalings {sv.round(3).tolist()}; "
            f"allowed 1/{max_scale:g}..{max_scale:g} without reflection): the matches are unreliable")
    sv = np.linalg.svd(m, compute_uv=False)
    fit.stats = {"fitted_model": mode, "determinant": round(det, 6), "scalings": sv.round(6).tolist(),
                 "rotation_deg": round(float(_rotation_angle_deg(m)), 4)}
    if mode != requested:
        fit.stats["warning"] = (f"the matches span only {spread[-1]:.1f} mm (std) along one direction: a full affine "
                                "is undetermined there, so a similarity transform (rotation + isotropic scale) was fitted")
    return fit


def huber_affine(src, dst, iterations: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Affine A, t with dst ~= A src + t by IRLS with Huber weights (threshold 1.345 robust
    standard deviations of the residual norms, at least 1 um); also returns the residuals."""
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    w = np.ones(len(src))
    for _ in range(iterations):
        a, t = fit_affine(src, dst, w)
        r = np.linalg.norm(src @ a.T + t - dst, axis=1)
        delta = max(1.345 * np.median(r) / 0.6745, 1e-3)
        w = np.where(r <= delta, 1.0, delta / np.maximum(r, 1e-12))
    return a, t, r


def _plausible_affine(m: np.ndarray, max_scale: float) -> bool:
    if np.linalg.det(m) <= 0:
        return False
    sv = np.linalg.svd(m, compute_uv=False)
    return bool(sv.max() <= max_scale and sv.min() >= 1.0 / max_scale)


def _rotation_angle_deg(m: np.ndarray) -> float:
    """Angle of the rotation closest to ``m`` (polar decomposition), in degrees."""
    u, _, vt = np.linalg.svd(m)
    r = u @ vt
    if np.linalg.det(r) < 0:
        return float("nan")
    c = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    return float(np.degrees(np.arccos(c)))


# --- a local map pinned at one point (lesion propagation) -------------------------------------
def anchored_affine(src, dst, usable=None, *, anchor: int = 0, min_points: int = 5,
                    scale_range: tuple = (0.7, 1.4)) -> LinearFit:
    """A local map that sends ``src[anchor]`` exactly onto ``dst[anchor]``.

    The linear part is the Huber-robust affine (``huber_affine``) of the usable pairs when at
    least ``min_points`` are usable (the anchor always is) and it has no reflection and all
    singular values within ``scale_range``; otherwise the map is the anchor's translation.

    Args:
        src, dst: (N, 3) matched points, LPS mm; row ``anchor`` is the point that must map exactly.
        usable: (N,) bool, the pairs that may be fitted (e.g. confident matches); default all.
        anchor: index of the pinned pair.
        min_points: fewest usable pairs for an affine linear part.
        scale_range: (lowest, highest) singular value of a plausible local linear part.

    Returns:
        LinearFit with ``mode`` 'affine' or 'translation'; ``inliers`` marks the pairs used.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    if src.shape != dst.shape or not 0 <= anchor < len(src):
        raise ValueError(f"src and dst must be (N, 3) alike with an anchor row, got {src.shape}, {dst.shape}")
    use = np.ones(len(src), bool) if usable is None else np.asarray(usable, bool).ravel().copy()
    use[anchor] = True
    mode, m = "translation", np.eye(3)
    if use.sum() >= max(4, int(min_points)):
        a, _, _ = huber_affine(src[use], dst[use])
        sv = np.linalg.svd(a, compute_uv=False)
        if np.linalg.det(a) > 0 and sv.min() >= scale_range[0] and sv.max() <= scale_range[1]:
            mode, m = "affine", a
    t = dst[anchor] - m @ src[anchor]
    res = np.linalg.norm(src @ m.T + t - dst, axis=1)
    inl = use if mode == "affine" else np.eye(len(src), dtype=bool)[anchor]
    return LinearFit(mode, m, t, inl, res, float(res[inl].max()), {"fitted_model": mode})


@dataclass(frozen=True)
class RegionalFit:
    """Where a weighted robust affine fit of point pairs near a point sends that point."""

    point: np.ndarray  # LPS (3,) mm
    support: float  # effective number of point pairs (sum of final weights)
    residual_mm: float  # weighted median residual of the fit


def regional_map(src_pts: np.ndarray, dst_pts: np.ndarray, point, sigma_mm: float = 50.0,
                 min_support: float = 6.0, iterations: int = 10) -> Optional[RegionalFit]:
    """Map ``point`` through an affine fitted to the point pairs (src -> dst) near it.

    Weights: Gaussian in the distance to ``point`` (``sigma_mm``) times Tukey biweights of the
    residuals (IRLS, cutoff 3 robust sigmas, at least 4 mm), so wrong pairs and far anatomy do
    not pull the answer; a translation when fewer than 12 pairs are near (too few for an affine).

    Args:
        src_pts, dst_pts: (N, 3) LPS mm, e.g. a click pair's template and query fixed points.
        point: (3,) LPS mm in the src space.
        sigma_mm: the Gaussian reach; min_support: the least effective number of pairs.
        iterations: IRLS rounds.

    Returns:
        RegionalFit (the mapped point, LPS (3,) mm), or None when fewer than ``min_support``
        effective pairs support it or the affine reflects.
    """
    p = np.asarray(point, float)
    d = np.linalg.norm(src_pts - p, axis=1)
    prior = np.exp(-0.5 * (d / sigma_mm) ** 2)
    sel = prior > 1e-3
    if prior[sel].sum() < min_support:
        return None
    src, dst, prior = src_pts[sel] - p, dst_pts[sel], prior[sel]
    w = prior.copy()
    affine = len(src) >= 12
    for _ in range(iterations):
        if affine:
            a, t = fit_affine(src, dst, w)
            pred = src @ a.T + t
        else:
            a, t = np.eye(3), (w[:, None] * (dst - src)).sum(0) / max(w.sum(), 1e-9)
            pred = src + t
        r = np.linalg.norm(pred - dst, axis=1)
        cut = max(4.0, 3.0 * 1.4826 * _weighted_median(r, prior))
        w = prior * np.where(r < cut, (1 - (r / cut) ** 2) ** 2, 0.0)
        if w.sum() < min_support:
            return None
    if affine and np.linalg.det(a) <= 0:  # a reflection: not anatomy
        return None
    return RegionalFit(np.asarray(t, float).copy(), float(w.sum()), float(_weighted_median(r, w)))


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values)
    c = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(c, 0.5 * c[-1])]) if c[-1] > 0 else float(np.median(values))


# --- where neighbours put a point (lesion constellations) -------------------------------------
def neighbour_prediction(src, dst, point, *, sigma_mm: float = 60.0, weights=None,
                         iterations: int = 8) -> "np.ndarray | None":
    """Where the neighbours' motion sends ``point``: a distance-weighted, robust rigid fit.

    The pairs are weighted by a Gaussian of their distance to ``point`` (``sigma_mm``) times
    ``weights``. The fit starts from the median displacement (weighted by ``weights`` only:
    almost half the pairs may be wrong without moving it) and is refined by IRLS with Tukey biweights (cutoff 4.685
    robust standard deviations, at least 4 mm), so a neighbour that moved unlike the others,
    e.g. a swapped match, gets no weight. Three or more weighted pairs spread wider than 5 mm
    give a rigid map, fewer a translation.

    Args:
        src, dst: (N, 3) the neighbours' positions before and after, LPS mm.
        point: (3,) the point to predict, LPS mm.
        sigma_mm: the distance at which a neighbour's weight falls to exp(-1/2).
        weights: (N,) non-negative prior weights (e.g. 1 for confident matches, 0 otherwise).
    Returns:
        (3,) the predicted position, or None when no neighbour has weight.
    """
    src = np.asarray(src, dtype=np.float64).reshape(-1, 3)
    dst = np.asarray(dst, dtype=np.float64).reshape(-1, 3)
    point = np.asarray(point, dtype=np.float64).reshape(3)
    conf = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64).ravel()
    near = np.exp(-0.5 * (np.linalg.norm(src - point, axis=1) / sigma_mm) ** 2)
    use = conf * near > 1e-9
    if not use.any():
        return None
    src, dst, conf, near = src[use], dst[use], conf[use], near[use]
    # the start and the cutoff ignore distance: one wrong match next to the point must not lead
    m, t = np.eye(3), np.array([_weighted_median(dst[:, a] - src[:, a], conf) for a in range(3)])
    for _ in range(max(1, iterations)):
        r = np.linalg.norm(src @ m.T + t - dst, axis=1)
        cutoff = max(4.685 * _weighted_median(r, conf) / 0.6745, 4.0)
        w = conf * near * np.clip(1.0 - (r / cutoff) ** 2, 0.0, None) ** 2
        if not w.any():
            break
        keep = w > 0
        if keep.sum() >= 3 and _spread_ok(src[keep], "rigid", 5.0):
            m, t = fit_rigid(src[keep], dst[keep], w[keep])
        else:
            m, t = np.eye(3), (w @ (dst - src)) / w.sum()
    return m @ point + t
