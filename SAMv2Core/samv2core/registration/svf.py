"""Stationary velocity fields: integration by scaling and squaring (a diffeomorphism for a
smooth velocity), the diffusion regulariser and Jacobian-determinant / folding statistics.

Fields are (1, 3, z, y, x) tensors in millimetres with components in (x, y, z) = LPS order,
defined on a :class:`~samv2core.grid.Grid`.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..grid import Grid


def integrate_svf(velocity: torch.Tensor, grid: Grid, steps: int = 7) -> torch.Tensor:
    """exp(velocity) by scaling and squaring: returns the displacement field (mm), same shape.

    The velocity is divided by 2**steps and the small displacement composed with itself
    ``steps`` times; differentiable, so it can sit inside an optimisation loop. Works in
    grid_sample's normalised units internally (one resampling per step, no other copies).
    """
    size = torch.tensor(grid.size_xyz, dtype=velocity.dtype, device=velocity.device)
    spacing = torch.tensor(grid.spacing, dtype=velocity.dtype, device=velocity.device)
    scale = (2.0 / ((size - 1).clamp_min(1) * spacing)).view(1, 3, 1, 1, 1)
    theta = torch.eye(3, 4, dtype=velocity.dtype, device=velocity.device)[None]
    ident = F.affine_grid(theta, [1, 3, *grid.shape], align_corners=True)
    disp = velocity * scale / (2 ** steps)
    for _ in range(steps):
        disp = disp + F.grid_sample(disp, ident + disp.permute(0, 2, 3, 4, 1), mode="bilinear",
                                    padding_mode="border", align_corners=True)
    return disp / scale


def jacobian_determinant(displacement, spacing) -> np.ndarray:
    """det(I + grad u) at every voxel of a displacement field (3, z, y, x) in mm -> (z, y, x).

    Central differences inside, one-sided at the border (numpy.gradient).
    """
    u = np.asarray(displacement.detach().cpu().numpy() if torch.is_tensor(displacement) else displacement,
                   dtype=np.float64)
    if u.ndim == 5:
        u = u[0]
    sx, sy, sz = (float(s) for s in spacing)
    jac = np.empty(u.shape[1:] + (3, 3))
    for c in range(3):
        dz, dy, dx = _safe_gradient(u[c], (sz, sy, sx))
        jac[..., c, 0], jac[..., c, 1], jac[..., c, 2] = dx, dy, dz
    jac += np.eye(3)
    return np.linalg.det(jac)


def _safe_gradient(a, spacing):
    return [np.gradient(a, s, axis=i) if a.shape[i] > 1 else np.zeros_like(a) for i, s in enumerate(spacing)]


def jacobian_stats(det: np.ndarray, mask: np.ndarray | None = None) -> dict:
    """Summary of a Jacobian determinant map: min / max / mean / std, std of log|J|, % folding (J <= 0)."""
    d = det if mask is None else det[np.asarray(mask, bool)]
    if d.size == 0:
        return {"voxels": 0}
    pos = np.clip(d, 1e-9, None)
    return {"voxels": int(d.size), "min": round(float(d.min()), 5), "max": round(float(d.max()), 5),
            "mean": round(float(d.mean()), 5), "std": round(float(d.std()), 5),
            "std_log": round(float(np.log(pos).std()), 5),
            "folding_percent": round(100.0 * float(np.count_nonzero(d <= 0)) / d.size, 5)}


def diffusion(field: torch.Tensor, spacing) -> torch.Tensor:
    """Mean squared spatial gradient (dimensionless: mm per mm) of a (1, 3, z, y, x) field in mm."""
    sx, sy, sz = (float(s) for s in spacing)
    dz = (field[:, :, 1:] - field[:, :, :-1]) / sz
    dy = (field[:, :, :, 1:] - field[:, :, :, :-1]) / sy
    dx = (field[..., 1:] - field[..., :-1]) / sx
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean())
