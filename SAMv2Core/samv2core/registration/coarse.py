"""SAM-coarse: a displacement field on a coarse control grid (32 mm by default) fitted to the
matched point pairs left over after the linear step, with a diffusion (smoothness)
regulariser so that the few mismatches that survive do not fold the field.

The field is trilinear between control points, so the fit is a sparse linear least-squares
problem, solved exactly (no learning rate to tune) and made robust by IRLS (Huber weights
by default; the pipeline uses Tukey biweights, ``tukey_sigmas``). If the result still
folds, the smoothness weight is raised until it does not.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla
import torch

from ..errors import RegistrationError
from ..grid import Grid
from .grid import DisplacementField
from .svf import jacobian_determinant, jacobian_stats


def _interp_matrix(grid: Grid, points: np.ndarray) -> sp.csr_matrix:
    """Sparse (N, nodes) trilinear weights of ``points`` on ``grid`` (clamped to the box)."""
    nx, ny, nz = grid.size_xyz
    idx = np.clip(grid.lps_to_index(points), 0, np.array([nx, ny, nz]) - 1 - 1e-9)
    i0 = np.floor(idx).astype(int)
    i0 = np.minimum(i0, np.array([nx, ny, nz]) - 2).clip(0)
    f = idx - i0
    rows, cols, vals = [], [], []
    n = len(points)
    for dx in (0, 1):
        for dy in (0, 1):
            for dz in (0, 1):
                w = (f[:, 0] if dx else 1 - f[:, 0]) * (f[:, 1] if dy else 1 - f[:, 1]) * (f[:, 2] if dz else 1 - f[:, 2])
                ii = np.minimum(i0 + [dx, dy, dz], [nx - 1, ny - 1, nz - 1])
                rows.append(np.arange(n))
                cols.append((ii[:, 2] * ny + ii[:, 1]) * nx + ii[:, 0])  # (z, y, x) C order
                vals.append(w)
    return sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                         shape=(n, nx * ny * nz))


def _diffusion_matrix(grid: Grid) -> sp.csr_matrix:
    """Sparse forward differences between neighbouring control points along x, y and z."""
    nz, ny, nx = grid.shape
    ids = np.arange(nx * ny * nz).reshape(nz, ny, nx)
    pairs = [(ids[:, :, 1:], ids[:, :, :-1]), (ids[:, 1:, :], ids[:, :-1, :]), (ids[1:], ids[:-1])]
    a = np.concatenate([p[0].ravel() for p in pairs])
    b = np.concatenate([p[1].ravel() for p in pairs])
    m = len(a)
    rows = np.concatenate([np.arange(m), np.arange(m)])
    return sp.csr_matrix((np.concatenate([np.ones(m), -np.ones(m)]), (rows, np.concatenate([a, b]))),
                         shape=(m, nx * ny * nz))


def fit_coarse_field(source, target, box_lo, box_hi, spacing_mm: float = 32.0, smoothness: float = 1.0,
                     huber_mm: float = 5.0, irls_iterations: int = 5, min_points: int = 8,
                     max_refits: int = 8, tukey_sigmas: float | None = None) -> DisplacementField:
    """Fit u on a ``spacing_mm`` control grid over [box_lo, box_hi] so that source + u(source) ~= target.

    ``source`` / ``target`` are (N, 3) LPS points in the same (fixed) space: the fixed end of
    each match and the moving end mapped back through the inverse linear transform.
    Minimises mean_i w_i |u(x_i) - (y_i - x_i)|^2 + smoothness * mean_edges |u_a - u_b|^2 with
    robust weights w_i (IRLS): Huber with scale ``huber_mm``, or with ``tukey_sigmas`` set,
    Tukey's biweight with a cutoff of that many robust standard deviations of the current
    residuals (rejects wrong matches entirely). Returns a DisplacementField; raises
    RegistrationError with fewer than ``min_points`` pairs inside the box.
    """
    src = np.asarray(source, float).reshape(-1, 3)
    dst = np.asarray(target, float).reshape(-1, 3)
    lo, hi = np.asarray(box_lo, float), np.asarray(box_hi, float)
    inside = np.all((src >= lo) & (src <= hi), axis=1)
    src, dst = src[inside], dst[inside]
    if len(src) < min_points:
        raise RegistrationError(
            f"too few matches inside the common field of view for SAM-coarse: {len(src)}, at least {min_points}")
    grid = Grid.covering(lo, hi, spacing_mm)
    w_mat = _interp_matrix(grid, src)
    d_mat = _diffusion_matrix(grid)
    r = dst - src
    n, e = len(src), max(d_mat.shape[0], 1)
    reg = (d_mat.T @ d_mat) / e
    lam = float(smoothness)
    for attempt in range(max_refits + 1):
        weights = np.ones(n)
        for _ in range(max(1, irls_iterations)):
            wd = sp.diags(weights / weights.sum())
            lhs = (w_mat.T @ wd @ w_mat + lam * reg + 1e-9 * sp.eye(w_mat.shape[1])).tocsc()
            solve = spla.factorized(lhs)
            u = np.stack([solve(w_mat.T @ (wd @ r[:, c])) for c in range(3)], axis=1)
            res = np.linalg.norm(w_mat @ u - r, axis=1)
            if tukey_sigmas:
                cut = tukey_sigmas * max(float(np.median(res)) / 1.538, 1e-3)  # 3D Gaussian: median = 1.538 sigma
                weights = np.where(res < cut, (1.0 - (res / cut) ** 2) ** 2, 0.0) + 1e-6
            else:
                weights = np.where(res <= huber_mm, 1.0, huber_mm / np.maximum(res, 1e-9))
        field_np = u.T.reshape(3, *grid.shape)
        det = jacobian_determinant(field_np, grid.spacing)
        jstats = jacobian_stats(det)
        if jstats["folding_percent"] == 0 and jstats["min"] > 0.05:
            break
        lam *= 10.0  # stiffen until the control field is invertible
    residual_before = np.linalg.norm(r, axis=1)
    stats = {"control_spacing_mm": spacing_mm, "control_shape_zyx": list(grid.shape), "points_used": int(n),
             "smoothness": lam, "refits": attempt, "robust": f"tukey {tukey_sigmas} sigma" if tukey_sigmas else f"huber {huber_mm} mm",
             "residual_mm_before": round(float(np.median(residual_before)), 3),
             "residual_mm_after": round(float(np.median(res)), 3),
             "downweighted_points": int(np.count_nonzero(weights < 0.5)),
             "control_jacobian": jstats}
    return DisplacementField(grid, torch.as_tensor(field_np[None], dtype=torch.float32), stats)
