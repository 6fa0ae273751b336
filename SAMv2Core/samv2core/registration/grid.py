"""Tensors on a samv2core Grid: trilinear sampling at LPS points (torch ``grid_sample``),
cropping to a box, and a displacement field on a grid."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..grid import Grid


def crop_to_box(t: torch.Tensor, grid: Grid, lo, hi, pool: int = 1) -> tuple[torch.Tensor, Grid]:
    """The part of a (1, C, z, y, x) tensor on ``grid`` covering [lo, hi], optionally avg-pooled."""
    i0 = np.clip(np.floor(grid.lps_to_index(lo)).astype(int) - 1, 0, np.asarray(grid.size_xyz) - 1)
    i1 = np.clip(np.ceil(grid.lps_to_index(hi)).astype(int) + 2, i0 + 1, np.asarray(grid.size_xyz))
    sub = t[..., i0[2]:i1[2], i0[1]:i1[1], i0[0]:i1[0]]
    origin = grid.index_to_lps(i0)
    spacing = np.asarray(grid.spacing)
    if pool > 1 and min(sub.shape[2:]) >= pool:
        sub = F.avg_pool3d(sub, pool, stride=pool)
        origin = origin + spacing * (pool - 1) / 2
        spacing = spacing * pool
    return sub.contiguous(), Grid(tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
                                  tuple(int(s) for s in sub.shape[2:]))


def sample(volume: torch.Tensor, grid: Grid, points_lps: torch.Tensor, mode: str = "bilinear",
           padding_mode: str = "border") -> torch.Tensor:
    """Sample a (1, C, z, y, x) tensor defined on ``grid`` at LPS points (1, ..., 3).

    Returns (1, C, ...) (trilinear; 'bilinear' is torch's name for it in 3D).
    """
    offset, scale = grid.normalizer(points_lps.device, points_lps.dtype)
    norm = (points_lps - offset) * scale
    shp = norm.shape
    if norm.dim() != 5:
        norm = norm.reshape(1, 1, 1, -1, 3)
    out = torch.nn.functional.grid_sample(volume, norm, mode=mode, padding_mode=padding_mode, align_corners=True)
    if len(shp) != 5:
        out = out.reshape(out.shape[0], out.shape[1], *shp[1:-1])
    return out


@dataclass
class DisplacementField:
    """A displacement (1, 3, z, y, x) in mm (x, y, z components) on ``grid``, with the
    statistics of the stage that made it (SAM-coarse fit, deformable optimisation)."""

    grid: Grid
    displacement: torch.Tensor
    stats: dict = field(default_factory=dict)

    def resample(self, target: Grid) -> torch.Tensor:
        """The displacement interpolated (trilinearly) onto ``target``: (1, 3, z, y, x)."""
        pts = target.points_torch(dtype=self.displacement.dtype)
        return sample(self.displacement, self.grid, pts)

    def at(self, points_lps: np.ndarray) -> np.ndarray:
        """Displacement (N, 3) at LPS points (N, 3)."""
        pts = torch.as_tensor(np.asarray(points_lps, float), dtype=self.displacement.dtype)[None]
        return sample(self.displacement, self.grid, pts)[0].T.numpy().astype(np.float64)
