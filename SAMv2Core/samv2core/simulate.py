"""Simulated follow-up scans with an exactly known ground truth.

No real same-patient follow-up pairs are bundled: a follow-up is made from a real scan by a
known small rigid motion, a smooth random deformation, intensity/contrast change and noise
(optionally a field-of-view crop or an MR-like intensity remapping). Every result produced on
such pairs must be reported as "on simulated follow-ups".
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .volume import Modality, Volume


@dataclass(frozen=True, eq=False)
class SimulatedPair:
    baseline: Volume
    followup: Volume
    transform: sitk.Transform  # maps follow-up LPS points to baseline LPS points (resampling direction)
    params: dict

    def map_points(self, baseline_lps) -> np.ndarray:
        """Ground truth: where baseline LPS points (N, 3) lie in the follow-up, LPS (N, 3)."""
        pts = np.asarray(baseline_lps, dtype=np.float64).reshape(-1, 3)
        out = np.empty_like(pts)
        for n, b in enumerate(pts):
            p = b.copy()
            for _ in range(50):  # fixed-point inversion of p -> T(p); T is a small perturbation of identity
                err = np.asarray(self.transform.TransformPoint(tuple(p))) - b
                p -= err
                if np.linalg.norm(err) < 1e-4:
                    break
            out[n] = p
        return out


def _random_field(volume: Volume, rng: np.random.Generator, amplitude_mm: float, control_mm: float) -> sitk.Image:
    corners = volume.corners_lps()
    lo, hi = corners.min(0) - 20, corners.max(0) + 20
    spacing = 4.0
    size = [int(np.ceil((h - l) / spacing)) + 1 for l, h in zip(lo, hi)]
    coarse_size = [max(2, int(np.ceil((h - l) / control_mm)) + 1) for l, h in zip(lo, hi)]
    coarse = rng.normal(size=coarse_size[::-1] + [3])
    img = sitk.GetImageFromArray(coarse, isVector=True)
    img.SetOrigin(tuple(lo))
    img.SetSpacing(tuple((h - l) / (c - 1) for l, h, c in zip(lo, hi, coarse_size)))
    field = sitk.Resample(img, size, sitk.Transform(), sitk.sitkBSpline, tuple(lo), (spacing,) * 3,
                          (1, 0, 0, 0, 1, 0, 0, 0, 1), 0.0, sitk.sitkVectorFloat64)
    arr = sitk.GetArrayFromImage(field)
    peak = np.linalg.norm(arr, axis=-1).max()
    arr *= amplitude_mm / max(peak, 1e-9)
    out = sitk.GetImageFromArray(arr, isVector=True)
    out.CopyInformation(field)
    return out


def mr_like(array: np.ndarray) -> np.ndarray:
    """Map CT HU to a T1-like contrast (fat bright, soft tissue mid, fluid/bone/air dark)."""
    hu = np.asarray(array, dtype=np.float32)
    xp = [-1024, -900, -200, -100, 0, 40, 80, 300, 1000, 3071]
    fp = [0, 5, 350, 420, 120, 250, 300, 90, 40, 30]
    return np.interp(hu, xp, fp).astype(np.float32)


def simulate_followup(volume: Volume, seed: int = 0, rotation_deg: float = 4.0, translation_mm: float = 8.0,
                      deformation_mm: float = 5.0, control_mm: float = 60.0, noise: float = 0.02,
                      contrast: float = 0.05, crop_fraction: float | None = None, mr: bool = False) -> SimulatedPair:
    """A follow-up of ``volume`` with known motion. Returns a SimulatedPair; the input is untouched.

    rotation_deg / translation_mm: maximum rigid motion; deformation_mm: peak smooth displacement;
    noise: Gaussian noise std as a fraction of the intensity range; contrast: max relative gain
    change; crop_fraction: keep this fraction of the z extent (a smaller field of view);
    mr: remap a CT to an MR-like contrast (for cross-modality tests).
    """
    if crop_fraction is not None and not 0.1 <= crop_fraction <= 1.0:
        raise InputError(f"crop_fraction must be in [0.1, 1], got {crop_fraction}")
    rng = np.random.default_rng(seed)
    centre = volume.corners_lps().mean(0)
    rigid = sitk.Euler3DTransform()
    rigid.SetCenter(tuple(centre))
    rigid.SetRotation(*np.deg2rad(rng.uniform(-rotation_deg, rotation_deg, 3)))
    rigid.SetTranslation(tuple(rng.uniform(-translation_mm, translation_mm, 3)))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(rigid)
    if deformation_mm > 0:
        composite.AddTransform(sitk.DisplacementFieldTransform(_random_field(volume, rng, deformation_mm, control_mm)))

    ref = volume.to_sitk()
    if crop_fraction is not None and crop_fraction < 1.0:
        z = volume.array.shape[0]
        keep = max(1, int(round(z * crop_fraction)))
        start = int(rng.integers(0, z - keep + 1))
        ref = ref[:, :, start: start + keep]
    fill = float(volume.array.min())
    moved = sitk.Resample(volume.to_sitk(), ref, composite, sitk.sitkLinear, fill, sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(moved)
    lo, hi = np.percentile(volume.array[:: max(1, volume.array.shape[0] // 16)], [1, 99])
    gain = 1.0 + rng.uniform(-contrast, contrast)
    arr = (arr - lo) * gain + lo + rng.normal(0, noise * (hi - lo), arr.shape).astype(np.float32)
    modality = volume.modality
    if mr:
        arr = mr_like(arr)
        modality = Modality.MR
    out = Volume(arr.astype(np.float32), moved.GetSpacing(), moved.GetOrigin(),
                 np.array(moved.GetDirection()).reshape(3, 3), modality, f"{volume.name}_simfollowup{seed}")
    params = {"seed": seed, "rotation_deg_max": rotation_deg, "translation_mm_max": translation_mm,
              "deformation_mm_peak": deformation_mm, "noise": noise, "contrast": contrast,
              "crop_fraction": crop_fraction, "mr_like": mr, "simulated": True}
    return SimulatedPair(volume, out, composite, params)
