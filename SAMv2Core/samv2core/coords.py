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
    """Slicer's RAS coordinates to the LPS coordinates of ITK, DICOM and this package.

    Args:
        points: RAS mm, shape (3,) or (..., 3).

    Returns:
        LPS mm, a new float64 array of the same shape (x and y negated).
    """
    return np.asarray(points, dtype=np.float64) * _FLIP


def lps_to_ras(points) -> np.ndarray:
    """LPS coordinates (ITK, DICOM, this package) to Slicer's RAS coordinates.

    Args:
        points: LPS mm, shape (3,) or (..., 3).

    Returns:
        RAS mm, a new float64 array of the same shape (x and y negated).
    """
    return np.asarray(points, dtype=np.float64) * _FLIP


@dataclass(frozen=True)
class PhysicalPoint:
    """A point in millimetres with its coordinate system named.

    Args:
        xyz: the coordinates, mm.
        system: 'LPS' (ITK, DICOM, this package; the default) or 'RAS' (3D Slicer).
    """

    xyz: tuple[float, float, float]
    system: CoordinateSystem = "LPS"

    def to(self, system: CoordinateSystem) -> "PhysicalPoint":
        """The same point expressed in another coordinate system.

        Args:
            system: 'LPS' or 'RAS'.

        Returns:
            A PhysicalPoint in ``system`` (``self`` when it already is).
        """
        if system == self.system:
            return self
        return PhysicalPoint(tuple(float(v) for v in np.asarray(self.xyz) * _FLIP), system)

    def as_array(self) -> np.ndarray:
        """The coordinates as an array.

        Returns:
            float64, shape (3,), mm in this point's ``system``.
        """
        return np.asarray(self.xyz, dtype=np.float64)
