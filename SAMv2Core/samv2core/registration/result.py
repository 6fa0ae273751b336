"""The result of a registration: ITK transforms plus a JSON-ready report."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk


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
        m = np.eye(4)
        m[:3, :3] = np.asarray(self.linear.GetMatrix()).reshape(3, 3)
        centre = np.asarray(self.linear.GetCenter())
        m[:3, 3] = np.asarray(self.linear.GetTranslation()) + centre - m[:3, :3] @ centre
        return m

    def transform_points(self, fixed_lps) -> np.ndarray:
        """Map fixed LPS points (N, 3) to the moving image (N, 3) with the complete transform."""
        pts = np.asarray(fixed_lps, dtype=np.float64).reshape(-1, 3)
        return np.array([self.composite.TransformPoint(tuple(p)) for p in pts])
