"""Evenly spaced sample points inside a body mask (the SAM-affine query points)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..volume import Volume


def grid_points_in_mask(volume: Volume, mask: np.ndarray, spacing_mm: float = 16.0,
                        border_mm: float = 8.0, max_points: int | None = 4000, min_levels: int = 1) -> np.ndarray:
    """LPS points (N, 3) on a regular ``spacing_mm`` grid that fall inside ``mask``.

    With ``min_levels`` > 1 the spacing shrinks along thin axes so that the mask's extent
    holds at least that many grid planes (a 40 mm slab still gets points at several depths).

    ``mask`` is a boolean (z, y, x) array on ``volume``'s grid. Points closer than
    ``border_mm`` to the mask edge or the image edge are dropped: embeddings there see
    padding and match poorly. The grid is axis-aligned in LPS and centred on the mask's
    bounding box, so the same volume always yields the same points. When more than
    ``max_points`` fall inside, a deterministic evenly strided subset is returned.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != volume.array.shape:
        raise ValueError(f"mask shape {mask.shape} does not match the volume {volume.array.shape}")
    if not mask.any():
        return np.zeros((0, 3))
    inner, f = (_inner(mask, volume.spacing, border_mm) if border_mm > 0 else (mask, 1))
    k = np.argwhere(inner.any(axis=(1, 2)))[[0, -1], 0], np.argwhere(inner.any(axis=(0, 2)))[[0, -1], 0], \
        np.argwhere(inner.any(axis=(0, 1)))[[0, -1], 0]
    # LPS box of the sampling region: the 8 corners of its index box (exact for axis-aligned grids)
    centre = (f - 1) / 2.0
    corners = np.array([[k[2][a], k[1][b], k[0][c]] for a in (0, 1) for b in (0, 1) for c in (0, 1)]) * f + centre
    lps = volume.index_to_lps(corners.astype(np.float64))
    lo, hi = lps.min(0), lps.max(0)
    step = np.minimum(float(spacing_mm), np.maximum((hi - lo) / max(min_levels, 1), 1e-3))
    if min_levels <= 1:
        step = np.full(3, float(spacing_mm))
    n = np.floor((hi - lo) / step + 1e-9).astype(int) + 1
    start = (lo + hi) / 2 - (n - 1) * step / 2
    axes = [start[d] + step[d] * np.arange(n[d]) for d in range(3)]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
    ijk = np.rint(volume.lps_to_index(grid)).astype(int)
    size = np.asarray(volume.size_xyz)
    ok = np.all((ijk >= 0) & (ijk < size), axis=1)
    grid, ijk = grid[ok], ijk[ok]
    c = np.minimum(ijk // f, np.asarray(inner.shape[::-1]) - 1)
    grid = grid[mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]] & inner[c[:, 2], c[:, 1], c[:, 0]]]
    if max_points is not None and len(grid) > max_points:
        grid = grid[np.linspace(0, len(grid) - 1, max_points).round().astype(int)]
    return grid


def _inner(mask: np.ndarray, spacing_xyz, border_mm: float) -> tuple[np.ndarray, int]:
    """The part of ``mask`` at least ``border_mm`` from its edge and the image edge, on a grid
    coarsened by the returned factor f (index // f). Coarsening (a cell is inside when all
    its voxels are) keeps the distance transform cheap; the threshold grows by half a coarse
    cell so the approximation errs on the safe side. A mask too thin to keep 8 cells is
    returned whole (it keeps its points rather than losing all of them)."""
    sp = np.asarray(spacing_xyz, float)[::-1]  # (z, y, x)
    f = int(max(1, border_mm // (2.0 * sp.max())))
    if f > 1:
        pad = [(0, (-n) % f) for n in mask.shape]
        m = np.pad(mask, pad, constant_values=False)
        z, y, x = (n // f for n in m.shape)
        coarse = m.reshape(z, f, y, f, x, f).all(axis=(1, 3, 5))
    else:
        coarse = mask
    dist = ndimage.distance_transform_edt(np.pad(coarse, 1, constant_values=False), sampling=sp * f)[1:-1, 1:-1, 1:-1]
    inner = dist >= border_mm + 0.5 * (f - 1) * sp.max()
    if inner.sum() >= 8:
        return inner, f
    return mask, 1
