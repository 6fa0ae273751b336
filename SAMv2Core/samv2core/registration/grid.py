"""An axis-aligned LPS sampling grid (identity direction) for displacement fields and the
deformable optimisation, the conversions torch's ``grid_sample`` needs, and a displacement
field on such a grid."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
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

    def rescaled(self, spacing_mm: float) -> "Grid":
        """A grid over the same box at another spacing."""
        lo = np.asarray(self.origin)
        hi = lo + np.asarray(self.spacing) * (np.asarray(self.shape[::-1]) - 1)
        return Grid.covering(lo, hi, spacing_mm)

    @property
    def size_xyz(self) -> tuple[int, int, int]:
        return self.shape[::-1]

    @property
    def upper(self) -> np.ndarray:
        return np.asarray(self.origin) + np.asarray(self.spacing) * (np.asarray(self.size_xyz) - 1)

    def index_to_lps(self, ijk) -> np.ndarray:
        return np.asarray(ijk, float) * np.asarray(self.spacing) + np.asarray(self.origin)

    def lps_to_index(self, lps) -> np.ndarray:
        return (np.asarray(lps, float) - np.asarray(self.origin)) / np.asarray(self.spacing)

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

    def sitk_reference(self) -> sitk.Image:
        """An empty SimpleITK image with this geometry (for resampling onto the grid)."""
        img = sitk.Image(list(self.size_xyz), sitk.sitkUInt8)
        img.SetOrigin(self.origin)
        img.SetSpacing(self.spacing)
        return img

    def to_dict(self) -> dict:
        return {"origin_lps": [round(v, 4) for v in self.origin], "spacing_mm": list(self.spacing),
                "shape_zyx": list(self.shape)}


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
