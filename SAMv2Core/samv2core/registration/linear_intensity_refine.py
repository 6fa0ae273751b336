"""Intensity refinement of the SAM-rigid / SAM-affine transform (optional, ``refine=True``).

Why: embedding matches live on the 4 mm fine grid, so the fitted linear map is good to about
half a millimetre; a short intensity-based optimisation started from it removes that residual
without the capture-range problems intensity methods have on their own (the start is already
within a few mm). Same modality: local NCC on small patches; across modalities: MIND-SSC SSD.

The map is x -> A (x - c) + c + t + ..., parametrised around the fixed body centre c as an
update of the SAM fit: rigid = rotation vector + translation, affine = 3x3 matrix update +
translation. Sample points are random each iteration (stochastic, as elastix' random
sampler), on the 2 mm model grid inside the fixed body and the common field of view. A round
of Adam steps that moves body points further than the limit is continued from where it ended
(up to ``rounds``): the pipeline then refuses the fit and verifies that end point instead.
It runs on the CPU in float64 parameters: the work is small (about 0.5 s; 3.5 s with MIND-SSC)
and MPS has no float64.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from ..device import torch_threads
from ..intensity import ncc_loss
from .grid import crop_to_box, sample
from .mind import mind_ssc
from .views import DeformableImage, candidate_points, resolve_intensity_term


@dataclass
class LinearRefineOptions:
    """Settings of the intensity refinement of the linear transform."""

    iterations: int = 40
    translation_step_mm: float = 0.2  # Adam step of the translation (mm)
    matrix_step: float = 0.002  # Adam step of the rotation vector (rad) / matrix entries
    sample_spacing_mm: float = 2.0  # candidate points and patch voxels
    patches_per_iteration: int = 2000
    points_per_iteration: int = 10000  # MIND-SSC sample points (cross-modality)
    max_change_mm: float = 8.0  # a refinement that moves body points further is rejected (the SAM inlier distance)
    rounds: int = 3  # a round that moves further than max_change_mm is continued from where it ended
    cpu_threads: Optional[int] = 1
    seed: int = 0

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def _rotation(rotvec: torch.Tensor) -> torch.Tensor:
    """Rodrigues: 3x3 rotation matrix of a rotation vector (differentiable, safe at zero)."""
    theta = torch.sqrt((rotvec * rotvec).sum() + 1e-18)
    k = rotvec / theta
    kx = torch.zeros(3, 3, dtype=rotvec.dtype)
    kx[0, 1], kx[0, 2], kx[1, 0] = -k[2], k[1], k[2]
    kx[1, 2], kx[2, 0], kx[2, 1] = -k[0], -k[1], k[0]
    eye = torch.eye(3, dtype=rotvec.dtype)
    return eye + torch.sin(theta) * kx + (1 - torch.cos(theta)) * (kx @ kx)


def refine_linear(fixed: DeformableImage, moving: DeformableImage, fixed_to_moving: np.ndarray, mode: str,
                  valid_lo, valid_hi, intensity: str = "auto",
                  options: Optional[LinearRefineOptions] = None) -> tuple[np.ndarray, dict]:
    """Refined 4x4 fixed->moving map and statistics; the input map when refining did not help.

    ``fixed`` / ``moving``: intensity views on the model grid (make_deformable_image);
    ``mode``: 'rigid' keeps the update rigid, 'affine' allows a general matrix update.
    """
    opt = options or LinearRefineOptions()
    with torch_threads(opt.cpu_threads, torch.device("cpu")):
        return _refine(fixed, moving, np.asarray(fixed_to_moving, float), mode, valid_lo, valid_hi, intensity, opt)


def _refine(fixed, moving, lin4, mode, valid_lo, valid_hi, intensity, opt):
    t0 = time.perf_counter()
    dt = torch.float64  # parameters and point maps: sub-millimetre updates of ~300 mm coordinates
    term = resolve_intensity_term(intensity, fixed.modality, moving.modality)
    if term == "none":
        raise ValueError("the linear refinement needs an intensity term ('lncc' or 'mind')")
    valid_lo, valid_hi = np.asarray(valid_lo, float), np.asarray(valid_hi, float)
    cand = candidate_points(fixed, valid_lo, valid_hi, opt.sample_spacing_mm)
    if len(cand) < 200:
        raise ValueError(f"only {len(cand)} sample points inside the fixed body and the common field of view")
    centre = cand.mean(0)
    cand_t = torch.as_tensor(cand, dtype=torch.float32)
    f_int, f_grid = crop_to_box(fixed.intensity.float(), fixed.intensity_grid, valid_lo - 8, valid_hi + 8)
    m_int, m_grid = moving.intensity.float(), moving.intensity_grid
    m_lo = torch.as_tensor(np.asarray(m_grid.origin), dtype=torch.float32)
    m_hi = torch.as_tensor(m_grid.upper, dtype=torch.float32)
    if term == "mind":
        f_map, m_map = mind_ssc(f_int, 1, 1), mind_ssc(m_int, 1, 1)
    h = np.arange(-1, 2) * opt.sample_spacing_mm
    patch = torch.as_tensor(np.stack(np.meshgrid(h, h, h, indexing="ij"), -1).reshape(-1, 3), dtype=torch.float32)

    centre_t = torch.as_tensor(centre, dtype=dt)
    n_sel = opt.patches_per_iteration if term == "lncc" else opt.points_per_iteration
    gen = torch.Generator().manual_seed(opt.seed)
    probe = torch.randint(0, len(cand), (min(4 * n_sel, len(cand)),), generator=gen)
    body = cand[:: max(1, len(cand) // 5000)]

    def loss_at(map_points, sel: torch.Tensor) -> torch.Tensor:
        if term == "lncc":
            pts = (cand_t[sel][:, None, :] + patch[None]).reshape(1, -1, 3)
            fi = sample(f_int, f_grid, pts).reshape(len(sel), -1)
            pm = map_points(pts[0])[None]
            mi = sample(m_int, m_grid, pm).reshape(len(sel), -1)
            ok = torch.all((pm >= m_lo) & (pm <= m_hi), dim=-1)[0].float().reshape(len(sel), -1).min(1).values
            return ncc_loss(fi, mi, ok)
        pts = cand_t[sel][None]
        fd = sample(f_map, f_grid, pts)[0].T
        pm = map_points(pts[0])[None]
        md = sample(m_map, m_grid, pm)[0].T
        ok = torch.all((pm >= m_lo) & (pm <= m_hi), dim=-1)[0].float()
        return (((fd - md) ** 2).mean(1) * ok).sum() / ok.sum().clamp_min(1.0)

    def moved_mm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.linalg.norm(body @ (a[:3, :3] - b[:3, :3]).T + (a[:3, 3] - b[:3, 3]), axis=1)

    def one_round(start: np.ndarray) -> tuple[np.ndarray, float, float]:
        """Adam from ``start``: (the map after ``opt.iterations`` steps, loss before, loss after)."""
        a0 = torch.as_tensor(start[:3, :3], dtype=dt)
        t_c0 = torch.as_tensor(start[:3, :3] @ centre + start[:3, 3], dtype=dt)  # where the centre goes
        rot = torch.zeros(3, dtype=dt, requires_grad=True)
        mat = torch.zeros(3, 3, dtype=dt, requires_grad=True)
        shift = torch.zeros(3, dtype=dt, requires_grad=True)
        params = [{"params": [shift], "lr": opt.translation_step_mm}]
        params.append({"params": [rot] if mode == "rigid" else [mat], "lr": opt.matrix_step})
        adam = torch.optim.Adam(params)

        def matrix():
            return (_rotation(rot) @ a0) if mode == "rigid" else (a0 + mat)

        def mapped(points: torch.Tensor) -> torch.Tensor:
            return ((points.to(dt) - centre_t) @ matrix().T + t_c0 + shift).float()

        with torch.no_grad():
            before = float(loss_at(mapped, probe))
        for _ in range(opt.iterations):
            adam.zero_grad(set_to_none=True)
            sel = torch.randint(0, len(cand), (min(n_sel, len(cand)),), generator=gen)
            loss_at(mapped, sel).backward()
            adam.step()
        with torch.no_grad():
            after = float(loss_at(mapped, probe))
            a = matrix().numpy()
            out = np.eye(4)
            out[:3, :3], out[:3, 3] = a, (t_c0 + shift).numpy() - a @ centre
        return out, before, after

    # rounds: one when the optimum is within the limit of the start (the usual case); a round that
    # moves further is followed by another from where it ended, until one stays within the limit
    # (converged) or ``opt.rounds`` are used
    current, first_before, last_after, rounds = lin4, None, None, []
    for _ in range(max(1, opt.rounds)):
        new, before, after = one_round(current)
        first_before = before if first_before is None else first_before
        step = float(moved_mm(new, current).max())
        if after >= before:  # this round did not improve: stay where it started
            rounds.append({"change_mm_max": round(step, 3), "improved": False})
            break
        rounds.append({"change_mm_max": round(step, 3), "improved": True})
        current, last_after = new, after
        if step <= opt.max_change_mm:
            break
    improved = last_after is not None
    converged = not rounds[-1]["improved"] or rounds[-1]["change_mm_max"] <= opt.max_change_mm
    moved = moved_mm(current, lin4)
    accepted = improved and float(moved.max()) <= opt.max_change_mm
    stats = {"term": term, "loss_before": round(first_before, 5),
             "loss_after": round(last_after if improved else first_before, 5),
             "change_mm_mean": round(float(moved.mean()), 3), "change_mm_max": round(float(moved.max()), 3),
             "rounds": rounds, "converged": bool(converged),
             "accepted": bool(accepted), "seconds": round(time.perf_counter() - t0, 3), "options": opt.to_dict()}
    if not accepted:
        stats["reason"] = ("the intensity term did not improve" if not improved
                           else f"it would move body points by up to {moved.max():.1f} mm (limit {opt.max_change_mm:g})")
    if improved and not accepted:
        # the refinement's own end point: the pipeline may verify it as a result in its own right
        stats["end_matrix"] = current.tolist()
    return (current if accepted else lin4), stats
