"""The one axis-aligned LPS grid type (identity direction): the network's fine and coarse
output grids, and the displacement-field and optimisation grids of registration.

Voxel (i, j, k) has its centre at ``origin + spacing * (i, j, k)`` (LPS mm); arrays on the
grid are stored (z, y, x), so ``shape`` is (z, y, x) while ``spacing`` is (x, y, z).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Grid:
    """Identity-direction LPS grid: point(i, j, k) = origin + spacing * (i, j, k)."""

    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    spacing: tuple[float, float, float]  # (x, y, z) mm
    shape: tuple[int, int, int]  # (z, y, x)

    @classmethod
    def covering(cls, lo, hi, spacing_mm: float) -> "Grid":
        """The grid at ``spacing_mm`` whose voxel centres cover the LPS box [lo, hi]."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        n = np.maximum(2, np.ceil((hi - lo) / spacing_mm - 1e-6).astype(int) + 1)
        return cls(tuple(float(v) for v in lo), (float(spacing_mm),) * 3, (int(n[2]), int(n[1]), int(n[0])))

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        return self.shape[::-1]

    @property
    def upper(self) -> np.ndarray:
        """LPS centre of the last voxel."""
        return np.asarray(self.origin) + np.asarray(self.spacing) * (np.asarray(self.size_xyz) - 1)

    def index_to_lps(self, ijk) -> np.ndarray:
        return np.asarray(ijk, dtype=np.float64) * np.asarray(self.spacing) + np.asarray(self.origin)

    def lps_to_index(self, lps) -> np.ndarray:
        return (np.asarray(lps, dtype=np.float64) - np.asarray(self.origin)) / np.asarray(self.spacing)

    def all_index_xyz(self) -> np.ndarray:
        """(N, 3) integer (i, j, k) of every voxel in C order of the (z, y, x) array."""
        z, y, x = np.meshgrid(*(np.arange(s) for s in self.shape), indexing="ij")
        return np.stack([x.ravel(), y.ravel(), z.ravel()], axis=1)

    def points(self) -> np.ndarray:
        """LPS coordinates of every voxel, (z, y, x, 3)."""
        axes = [self.origin[d] + self.spacing[d] * np.arange(self.size_xyz[d]) for d in range(3)]
        zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
        return np.stack([xx, yy, zz], -1)

    # --- torch helpers (align_corners=True everywhere) ---------------------------------
    def normalizer(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, scale) with normalized = (lps - offset) * scale, for grid_sample on this grid."""
        size = np.asarray(self.size_xyz, float)
        scale = 2.0 / (np.maximum(size - 1, 1) * np.asarray(self.spacing))
        offset = np.asarray(self.origin) + np.asarray(self.spacing) * (size - 1) / 2
        return (torch.tensor(offset, device=device, dtype=dtype), torch.tensor(scale, device=device, dtype=dtype))

    def points_torch(self, device=None, dtype=torch.float32) -> torch.Tensor:
        """LPS coordinates of every voxel as a (1, z, y, x, 3) tensor."""
        return torch.as_tensor(self.points(), dtype=dtype, device=device)[None]

    def to_dict(self) -> dict:
        return {"origin_lps": [round(v, 4) for v in self.origin], "spacing_mm": list(self.spacing),
                "shape_zyx": list(self.shape)}
