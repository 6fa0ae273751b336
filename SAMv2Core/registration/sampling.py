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
    if border_mm > 0:
        # Erode by distance (in mm, honouring anisotropic spacing) and cut the image border.
        sampling = (volume.spacing[2], volume.spacing[1], volume.spacing[0])
        padded = np.pad(mask, 1, constant_values=False)
        dist = ndimage.distance_transform_edt(padded, sampling=sampling)[1:-1, 1:-1, 1:-1]
        inner = dist >= border_mm
        if inner.sum() >= 8:  # a thin mask keeps its points rather than losing all of them
            mask = inner
    kji = np.argwhere(mask)
    lps = volume.index_to_lps(kji[:, ::-1].astype(np.float64))
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
    grid = grid[mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]]]
    if max_points is not None and len(grid) > max_points:
        grid = grid[np.linspace(0, len(grid) - 1, max_points).round().astype(int)]
    return grid
