"""Local refinement of a click-to-match answer: a small registration in a window around the point.

The SAMv2 fixed-point match localises a template point on the query volume to within a few
millimetres (its embeddings live on a 4 mm grid and the fit is local). This module makes that
answer precise: a cube of the template around the point (``window_mm``) is registered to the
query, started from the SAM answer, on the 2 mm model-grid intensities of both embeddings:

1. capture: exhaustive search of translations on a 4 mm lattice within ``search_mm`` of the
   SAM answer, scored by local normalised cross-correlation (LNCC, 3^3 patches at 4 mm);
2. precision: a local affine map (translation + 3x3 update) optimised with Adam on
   Gaussian-weighted LNCC at 2 mm (5^3 patches), the weight centred on the point.

The refined point is where the local map sends the template point. It is only an answer when
it passes its checks (see :class:`RefineOptions`): enough body in the window, both windows
inside their images, the similarity improved and is high enough. The caller compares it with
the SAM answer (matching.Matcher.refined) and keeps the SAM answer where they disagree.

LNCC compares intensities, so both volumes must have the same modality (CT/CT or MR/MR).
Everything here is LPS millimetres on identity-direction (model-grid) volumes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from .device import torch_threads
from .fitting import RegionalFit, regional_map
from .intensity import CT_CLICK_WINDOW, local_ncc, percentile_window
from .volume import Modality, Volume

# the click's regional SAM answer is a robust point-pair fit (fitting.py), importable from here too
__all__ = ["RefineOptions", "LocalRefinement", "LocalRegistration", "intensity_image", "RegionalFit", "regional_map"]


@dataclass(frozen=True)
class RefineOptions:
    """Settings of the local refinement and of its checks."""

    window_mm: float = 48.0  # side of the template cube registered around the point
    sigma_mm: float = 14.0  # Gaussian weight of the LNCC terms around the point
    search_mm: float = 8.0  # capture: translations tried around the SAM answer (4 mm lattice)
    iterations: int = 24  # Adam steps of the local affine map (fewer when it has converged)
    step_mm: float = 0.5  # Adam step of the translation
    matrix_step: float = 0.01  # Adam step of the 3x3 matrix update
    max_matrix_change: float = 0.25  # a local map further than this from a rotation/scale near I is refused
    agree_mm: float = 8.0  # refined and SAM answers further apart than this disagree
    regional_sigma_mm: float = 50.0  # Gaussian reach of the pair's fixed points in the SAM answer
    fixed_point_grid_mm: float = 12.0  # the pair's fixed points start on this grid over the template body
    max_fixed_points: int = 1200  # evenly thinned beyond this
    fixed_point_cycle_mm: float = 4.5  # NN round trip must return within one 4 mm embedding voxel
    fixed_point_min_score: float = 0.5
    min_texture: float = 20.0  # weighted intensity spread (HU for CT) below this: nothing to register
    min_overlap_fraction: float = 0.6  # share of the (weighted) window that must fall inside the query
    min_lncc: float = 0.3  # weighted LNCC after refinement below this: not used
    confident_lncc: float = 0.5  # a refined answer with a lower local similarity is flagged
    threads: Optional[int] = 1  # torch threads for the small tensor work (None: leave torch's setting)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class LocalRefinement:
    """Outcome of one local registration: the refined query point, or why there is none."""

    point: Optional[np.ndarray]  # LPS (3,), None when the refinement could not run or failed a check
    reason: Optional[str]  # why it is None (a check that failed), else None
    lncc_start: float  # weighted LNCC at the SAM answer
    lncc: float  # weighted LNCC after refinement (nan when not run)
    shift_mm: float  # distance from the SAM answer (nan when not run)
    seconds: float

    def to_dict(self) -> dict:
        return {"refined_point": None if self.point is None else [round(float(v), 2) for v in self.point],
                "reason": self.reason, "lncc_start": _r(self.lncc_start), "lncc": _r(self.lncc),
                "shift_mm": _r(self.shift_mm), "seconds": round(self.seconds, 4)}


def _r(v: float) -> Optional[float]:
    return None if not np.isfinite(v) else round(float(v), 3)


def intensity_image(volume: Volume) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """The click refinement's intensities of an identity-direction volume.

    Args:
        volume: a model-grid Volume (identity direction).

    Returns:
        ((1, 1, z, y, x) float32 intensities, LPS origin (3,) mm, spacing (3,) mm). CT through
        ``CT_CLICK_WINDOW`` ([-1000, 1000] HU -> [-1, 1]: bone beyond does not dominate LNCC); MR
        scaled by its 99th percentile.
    """
    a = np.asarray(volume.array, dtype=np.float32)
    window = CT_CLICK_WINDOW if volume.modality is Modality.CT else percentile_window(a[:: 7], None, 99)
    return window.tensor(a), np.asarray(volume.origin), np.asarray(volume.spacing)


class _Image:
    """An intensity volume ready for sampling at LPS points (grid_sample, align_corners=True)."""

    def __init__(self, volume: Volume):
        if not np.allclose(volume.direction, np.eye(3), atol=1e-6):
            raise ValueError("the local refinement works on identity-direction (model-grid) volumes")
        self.volume = volume
        self.data, self.origin, self.spacing = intensity_image(volume)
        size = np.asarray(volume.size_xyz, float)
        self.upper = self.origin + self.spacing * (size - 1)
        self._scale = torch.as_tensor(2.0 / (np.maximum(size - 1, 1) * self.spacing), dtype=torch.float32)
        self._offset = torch.as_tensor(self.origin + self.spacing * (size - 1) / 2, dtype=torch.float32)
        self.air = -1.0 if volume.modality is Modality.CT else 0.0
        self._shifted = self.data - self.air  # zero padding outside the image then means air
        self.unit, self.unit_name = (1000.0, "HU") if volume.modality is Modality.CT else (100.0, "% of p99")

    def sample(self, pts: torch.Tensor) -> torch.Tensor:
        """Trilinear samples at LPS points (..., 3) -> (...); air outside the image."""
        shape = pts.shape[:-1]
        norm = ((pts - self._offset) * self._scale).reshape(1, 1, 1, -1, 3)
        out = F.grid_sample(self._shifted, norm, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out.reshape(shape) + self.air

    def inside(self, pts: np.ndarray, margin_mm: float = 0.0) -> np.ndarray:
        return np.all((pts >= self.origin + margin_mm) & (pts <= self.upper - margin_mm), axis=-1)


def _cube(n: int, spacing: float) -> np.ndarray:
    """Offsets (n, n, n, 3) of an n^3 cube of points at ``spacing`` centred on 0 (axes z, y, x)."""
    r = (np.arange(n) - (n - 1) / 2) * spacing
    zz, yy, xx = np.meshgrid(r, r, r, indexing="ij")
    return np.stack([xx, yy, zz], -1)


def _blocks(t: torch.Tensor, k: int) -> torch.Tensor:
    """(B, 1, n, n, n) -> (B, (n/k)^3, k^3): the non-overlapping k^3 blocks of each map."""
    b, n = t.shape[0], t.shape[-1]
    m = n // k
    return t.reshape(b, m, k, m, k, m, k).permute(0, 1, 3, 5, 2, 4, 6).reshape(b, m ** 3, k ** 3)


def _block_ncc(a: torch.Tensor, b: torch.Tensor, k: int) -> torch.Tensor:
    """Signed NCC of (B, 1, n, n, n) maps in each non-overlapping k^3 block: (B, (n/k)^3).

    Local NCC on disjoint patches (as elastix' and the registration's patch sampler): as
    robust to the contrast-phase change and gain of a follow-up as a sliding window, and a
    reshape instead of box filters."""
    return local_ncc(_blocks(a, k), _blocks(b, k))


class LocalRegistration:
    """Local registrations between one template and one query model-grid volume (kept per pair)."""

    def __init__(self, template: Volume, query: Volume, options: Optional[RefineOptions] = None):
        if template.modality != query.modality:
            raise ValueError(f"the local refinement compares intensities: template is {template.modality.value}, "
                             f"query {query.modality.value}")
        self.t = _Image(template)
        self.q = _Image(query)
        self.opt = options or RefineOptions()
        # 2 mm cube in 4^3 blocks (8 mm patches); 4 mm cube in 3^3 blocks (12 mm patches)
        nf = max(2, int(round(self.opt.window_mm / 2.0 / self.FINE_K))) * self.FINE_K
        nc = max(2, int(round(self.opt.window_mm / 4.0 / self.COARSE_K))) * self.COARSE_K
        self.fine_off = _cube(nf, 2.0)
        self.coarse_off = _cube(nc, 4.0)
        self.fine_w = self._weights(self.fine_off, self.FINE_K)
        self.coarse_w = self._weights(self.coarse_off, self.COARSE_K)
        s = np.arange(-self.opt.search_mm, self.opt.search_mm + 1e-6, 4.0)
        zz, yy, xx = np.meshgrid(s, s, s, indexing="ij")
        self.shifts = np.stack([xx, yy, zz], -1).reshape(-1, 3)
        # torch builds its first optimiser slowly (it imports torch._dynamo, ~1.7 s on a CPU):
        # pay that here, once per pair and ahead of the clicks, not on the first click.
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])

    FINE_K, COARSE_K = 4, 3

    def _weights(self, off: np.ndarray, k: int) -> torch.Tensor:
        """Gaussian weights (1, blocks) of the k^3 blocks of the cube ``off`` (by block centre)."""
        centres = _blocks(torch.as_tensor(off, dtype=torch.float32).permute(3, 0, 1, 2)[:, None], k).mean(-1).T
        w = np.exp(-0.5 * (np.linalg.norm(centres.numpy(), axis=-1) / self.opt.sigma_mm) ** 2)
        return torch.as_tensor(w / w.sum(), dtype=torch.float32)[None]

    def refine(self, t_point, q_start) -> LocalRefinement:
        """Refine the SAM answer of one click.

        Args:
            t_point: the template point, LPS (3,) mm.
            q_start: its SAM answer on the query, LPS (3,) mm.

        Returns:
            LocalRefinement: the refined query point (LPS (3,) mm) or the check that failed.
        """
        t0 = time.perf_counter()
        with torch_threads(self.opt.threads or None, torch.device("cpu")):
            return self._refine(np.asarray(t_point, float), np.asarray(q_start, float), t0)

    def _fail(self, reason: str, lncc_start: float, t0: float) -> LocalRefinement:
        return LocalRefinement(None, reason, lncc_start, float("nan"), float("nan"), time.perf_counter() - t0)

    def _refine(self, t: np.ndarray, q0: np.ndarray, t0: float) -> LocalRefinement:
        opt = self.opt
        nan = float("nan")
        if not self.q.inside(q0[None])[0]:
            return self._fail("the SAM answer lies outside the query image", nan, t0)
        # --- the template window and its checks -----------------------------------------
        t_pts = t + self.fine_off
        t_in = self.t.inside(t_pts.reshape(-1, 3)).reshape(t_pts.shape[:3])
        tw = self.t.sample(torch.as_tensor(t_pts, dtype=torch.float32))[None, None]
        w = torch.as_tensor(np.exp(-0.5 * (np.linalg.norm(self.fine_off, axis=-1) / opt.sigma_mm) ** 2),
                            dtype=torch.float32)
        mean = float((tw[0, 0] * w).sum() / w.sum())
        texture = float(torch.sqrt(((tw[0, 0] - mean) ** 2 * w).sum() / w.sum())) * self.t.unit
        if texture < opt.min_texture:
            return self._fail(f"no structure around the point to register (intensity spread {texture:.0f} "
                              f"{self.t.unit_name}, need {opt.min_texture:g})", nan, t0)
        if t_in.mean() < opt.min_overlap_fraction:
            return self._fail("the point is at the edge of the template image", nan, t0)
        q_pts0 = q0 + self.fine_off
        q_in = self.q.inside(q_pts0.reshape(-1, 3)).reshape(q_pts0.shape[:3])
        gw = np.exp(-0.5 * (np.linalg.norm(self.fine_off, axis=-1) / opt.sigma_mm) ** 2)
        overlap = float((gw * q_in * t_in).sum() / gw.sum())
        if overlap < opt.min_overlap_fraction:
            return self._fail(f"the point is at the edge of the query's field of view (only {100 * overlap:.0f}% of "
                              f"the window around the SAM answer is inside it)", nan, t0)
        lncc_start = float(self._score(tw, self.fine_w, self._warp(q0, np.zeros(3), torch.zeros(3, 3))))

        # --- 1. capture: translations on a 4 mm lattice ----------------------------------
        tc = self.t.sample(torch.as_tensor(t + self.coarse_off, dtype=torch.float32))[None, None]
        starts = torch.as_tensor(q0 + self.shifts, dtype=torch.float32)  # (S, 3)
        qc = self.q.sample(starts[:, None, None, None, :] + torch.as_tensor(self.coarse_off, dtype=torch.float32)[None])
        scores = (_block_ncc(tc, qc[:, None], self.COARSE_K) * self.coarse_w).sum(1)
        best = int(torch.argmax(scores))
        start = q0 + self.shifts[best]

        # --- 2. precision: local affine on 2 mm intensities --------------------------------
        shift = torch.zeros(3, requires_grad=True)
        mat = torch.zeros(3, 3, requires_grad=True)
        adam = torch.optim.Adam([{"params": [shift], "lr": opt.step_mm}, {"params": [mat], "lr": opt.matrix_step}])
        off = torch.as_tensor(self.fine_off, dtype=torch.float32)
        base = torch.as_tensor(start, dtype=torch.float32)
        last = np.zeros(3)
        for it in range(opt.iterations):
            adam.zero_grad(set_to_none=True)
            qw = self.q.sample(base + shift + off @ (torch.eye(3) + mat).T)[None, None]
            loss = -self._score(tw, self.fine_w, qw)
            loss.backward()
            adam.step()
            now = shift.detach().numpy().copy()
            if it >= 8 and np.abs(now - last).max() < 0.02:  # converged (the step has shrunk to 0.02 mm)
                break
            last = now
        with torch.no_grad():
            lncc = float(self._score(tw, self.fine_w, self._warp(start, shift.detach().numpy(), mat.detach())))
        point = start + shift.detach().numpy().astype(np.float64)
        moved = float(np.linalg.norm(point - q0))
        m = mat.detach().numpy()
        elapsed = time.perf_counter() - t0
        if not np.all(np.isfinite(point)):
            return self._fail("the local registration diverged", lncc_start, t0)
        if float(np.abs(m).max()) > opt.max_matrix_change:
            return LocalRefinement(None, f"implausible local deformation (matrix change {np.abs(m).max():.2f})",
                                   lncc_start, lncc, moved, elapsed)
        if not self.q.inside(point[None])[0]:
            return LocalRefinement(None, "the refined point lies outside the query image", lncc_start, lncc, moved, elapsed)
        if lncc < opt.min_lncc:
            return LocalRefinement(None, f"local similarity {lncc:.2f} below {opt.min_lncc:.2f} after refinement",
                                   lncc_start, lncc, moved, elapsed)
        if lncc < lncc_start:
            return LocalRefinement(None, "the refinement did not improve the local similarity", lncc_start, lncc,
                                   moved, elapsed)
        return LocalRefinement(point, None, lncc_start, lncc, moved, elapsed)

    def _warp(self, start: np.ndarray, shift: np.ndarray, mat: torch.Tensor) -> torch.Tensor:
        off = torch.as_tensor(self.fine_off, dtype=torch.float32)
        base = torch.as_tensor(np.asarray(start) + np.asarray(shift), dtype=torch.float32)
        return self.q.sample(base + off @ (torch.eye(3) + mat).T)[None, None]

    def _score(self, tw: torch.Tensor, w: torch.Tensor, qw: torch.Tensor) -> torch.Tensor:
        return (_block_ncc(tw, qw, self.FINE_K) * w).sum()
