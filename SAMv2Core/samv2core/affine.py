"""4x4 homogeneous LPS matrices and the ITK affine transforms that carry them: one home for the
conversions both ways and for a seeded random rigid map (simulated motions, verification's
alternative placements)."""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy.spatial.transform import Rotation


def sitk_affine(matrix4: np.ndarray) -> sitk.AffineTransform:
    """The ITK transform of a 4x4 homogeneous LPS matrix (centre at the origin)."""
    m = np.asarray(matrix4, float)
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in m[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in m[:3, 3]))
    return t


def matrix_of(transform: sitk.Transform) -> np.ndarray:
    """4x4 homogeneous LPS matrix of an ITK affine / Euler / similarity transform (its centre honoured)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(transform.GetMatrix()).reshape(3, 3)
    centre = np.asarray(transform.GetCenter())
    m[:3, 3] = np.asarray(transform.GetTranslation()) + centre - m[:3, :3] @ centre
    return m


def random_rigid(rng: np.random.Generator, centre, angle_deg: tuple, offset_mm: tuple) -> np.ndarray:
    """4x4 rigid x -> R (x - c) + c + t: a rotation by an angle drawn from ``angle_deg`` (range)
    about a random axis through ``centre``, and a translation of random direction and a length
    drawn from ``offset_mm`` (range)."""
    centre = np.asarray(centre, float)
    axis = rng.normal(size=3)
    rot = Rotation.from_rotvec(np.deg2rad(rng.uniform(*angle_deg)) * axis / np.linalg.norm(axis)).as_matrix()
    d = rng.normal(size=3)
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = centre - rot @ centre + d / np.linalg.norm(d) * rng.uniform(*offset_mm)
    return m
