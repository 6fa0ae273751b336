"""The result of a registration: ITK transforms plus a JSON-ready report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from ..affine import matrix_of
from .grid import Grid


@dataclass
class RegistrationResult:
    """Transforms mapping FIXED physical LPS points to MOVING points (ITK / sitk.Resample convention).

    ``linear``: the rigid or affine map (sitk.AffineTransform). ``displacement``: optional
    vector image (LPS mm, float64) on an identity-direction grid over the fixed image's
    common field of view, applied to fixed points BEFORE ``linear``; zero outside its grid.
    ``composite``: linear o (x + displacement(x)), the complete fixed -> moving map.
    ``report``: inliers, residuals, Jacobian statistics, folding, timings and settings.
    """

    linear: sitk.Transform
    displacement: Optional[sitk.Image]
    composite: sitk.CompositeTransform
    report: dict = field(default_factory=dict)

    @property
    def linear_matrix(self) -> np.ndarray:
        """4x4 homogeneous LPS matrix of the linear part (fixed -> moving)."""
        return matrix_of(self.linear)

    def transform_points(self, fixed_lps) -> np.ndarray:
        """Map fixed LPS points (N, 3) to the moving image (N, 3) with the complete transform."""
        pts = np.asarray(fixed_lps, dtype=np.float64).reshape(-1, 3)
        return np.array([self.composite.TransformPoint(tuple(p)) for p in pts])


def displacement_image(field: torch.Tensor, grid: Grid) -> sitk.Image:
    """A (1, 3, z, y, x) displacement in LPS mm on ``grid`` as a float64 ITK vector image."""
    arr = field[0].permute(1, 2, 3, 0).numpy().astype(np.float64)  # (z, y, x, 3)
    img = sitk.GetImageFromArray(arr, isVector=True)
    img.SetOrigin(grid.origin)
    img.SetSpacing(grid.spacing)
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return img
