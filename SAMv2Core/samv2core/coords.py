"""Physical coordinate systems.

ITK, SimpleITK, DICOM and this package use LPS (x grows to the patient's Left, y to
Posterior, z to Superior). 3D Slicer's world coordinates are RAS. The two differ by the
sign of x and y; nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

CoordinateSystem = Literal["LPS", "RAS"]
_FLIP = np.array([-1.0, -1.0, 1.0])


def ras_to_lps(points) -> np.ndarray:
    """RAS point(s) (..., 3) -> LPS point(s), as a new float64 array."""
    return np.asarray(points, dtype=np.float64) * _FLIP


def lps_to_ras(points) -> np.ndarray:
    """LPS point(s) (..., 3) -> RAS point(s), as a new float64 array."""
    return np.asarray(points, dtype=np.float64) * _FLIP


@dataclass(frozen=True)
class PhysicalPoint:
    """A point in millimetres with its coordinate system named."""

    xyz: tuple[float, float, float]
    system: CoordinateSystem = "LPS"

    def to(self, system: CoordinateSystem) -> "PhysicalPoint":
        if system == self.system:
            return self
        return PhysicalPoint(tuple(float(v) for v in np.asarray(self.xyz) * _FLIP), system)

    def as_array(self) -> np.ndarray:
        return np.asarray(self.xyz, dtype=np.float64)
