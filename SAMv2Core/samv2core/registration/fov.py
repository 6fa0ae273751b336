"""Field-of-view handling as in CrossSAM / AdaReg: after the linear step, crop the larger scan
to the smaller one's field of view (plus a safety margin) so the deformable refinement only
works where both images have data."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import RegistrationError
from ..volume import Volume


@dataclass(frozen=True)
class FovCrop:
    """Axis-aligned LPS boxes: the fixed region (fixed space) and moving region (moving space)."""

    fixed_lo: np.ndarray
    fixed_hi: np.ndarray
    moving_lo: np.ndarray
    moving_hi: np.ndarray
    fixed_kept: float  # fraction of the fixed image's box volume kept
    moving_kept: float

    def report(self) -> dict:
        return {"fixed_box_lps": [self.fixed_lo.round(2).tolist(), self.fixed_hi.round(2).tolist()],
                "moving_box_lps": [self.moving_lo.round(2).tolist(), self.moving_hi.round(2).tolist()],
                "fixed_kept_fraction": round(self.fixed_kept, 4), "moving_kept_fraction": round(self.moving_kept, 4)}


def _bbox(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return points.min(0), points.max(0)


def _apply(m4: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m4[:3, :3].T + m4[:3, 3]


def _volume_of(lo, hi) -> float:
    return float(np.prod(np.clip(hi - lo, 0, None)))


def overlap_crop(fixed: Volume, moving: Volume, fixed_to_moving: np.ndarray, margin_mm: float = 20.0,
                 min_overlap_mm: float = 16.0) -> FovCrop:
    """Boxes covering each image's part of the common field of view, grown by ``margin_mm``.

    ``fixed_to_moving`` is the 4x4 linear transform (fixed LPS -> moving LPS). Raises
    RegistrationError when, after the transform, the fields of view do not overlap (less
    than ``min_overlap_mm`` along some axis).
    """
    m = np.asarray(fixed_to_moving, float)
    f_lo, f_hi = _bbox(fixed.corners_lps())
    m_lo, m_hi = _bbox(moving.corners_lps())
    # The moving FOV seen in fixed space, and the fixed FOV seen in moving space.
    mf_lo, mf_hi = _bbox(_apply(np.linalg.inv(m), moving.corners_lps()))
    fm_lo, fm_hi = _bbox(_apply(m, fixed.corners_lps()))
    core_lo, core_hi = np.maximum(f_lo, mf_lo), np.minimum(f_hi, mf_hi)
    if np.any(core_hi - core_lo < min_overlap_mm):
        raise RegistrationError(
            "the images do not overlap physically after alignment (common extent "
            f"{np.clip(core_hi - core_lo, 0, None).round(1).tolist()} mm along x, y, z): nothing to register")
    fixed_lo, fixed_hi = np.maximum(f_lo, mf_lo - margin_mm), np.minimum(f_hi, mf_hi + margin_mm)
    moving_lo, moving_hi = np.maximum(m_lo, fm_lo - margin_mm), np.minimum(m_hi, fm_hi + margin_mm)
    return FovCrop(fixed_lo, fixed_hi, moving_lo, moving_hi,
                   _volume_of(fixed_lo, fixed_hi) / max(_volume_of(f_lo, f_hi), 1e-9),
                   _volume_of(moving_lo, moving_hi) / max(_volume_of(m_lo, m_hi), 1e-9))


def crop_volume(volume: Volume, lo, hi) -> Volume:
    """A new Volume holding the voxels of ``volume`` whose extent meets the LPS box [lo, hi].

    Works in index space, so oblique or flipped directions are honoured; the result keeps
    the input's direction and spacing. The input is untouched.
    """
    lo, hi = np.asarray(lo, float), np.asarray(hi, float)
    corners = np.array([[a, b, c] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
    ijk = volume.lps_to_index(corners)
    size = np.asarray(volume.size_xyz)
    start = np.clip(np.floor(ijk.min(0)).astype(int), 0, size - 1)
    stop = np.clip(np.ceil(ijk.max(0)).astype(int) + 1, start + 1, size)
    arr = volume.array[start[2]:stop[2], start[1]:stop[1], start[0]:stop[0]]
    out = Volume(arr, volume.spacing, tuple(volume.index_to_lps(start.astype(float))), volume.direction,
                 volume.modality, volume.name, dict(volume.meta))
    return out
