"""The registration preflight: every check that needs no model, run once per pair.

3D, usable intensities, modality flags, physical overlap, and the body masks on the 2 mm model
grid (the grid both the SAM embedder and the MIND-SSC descriptors resample to), so the later
stages reuse the masks instead of recomputing them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError, RegistrationError
from ..preprocess import body_mask, resample_to_model_grid
from ..volume import Modality, Volume
from .options import RegistrationOptions

MODEL_SPACING_MM = 2.0  # the model grid of the bundled models and of the MIND-SSC descriptors


@dataclass(frozen=True, eq=False)
class CheckedImage:
    """One checked input: the volume, its model-grid resampling and body mask there."""

    volume: Volume
    model_volume: Volume
    mask: np.ndarray  # (z, y, x) bool on model_volume

    def mask_on(self, model_volume: Volume) -> np.ndarray:
        """The body mask on ``model_volume`` (an embedding's grid): reused when it is this grid."""
        mv = self.model_volume
        if (model_volume.array.shape == mv.array.shape and np.allclose(model_volume.origin, mv.origin)
                and np.allclose(model_volume.spacing, mv.spacing) and np.allclose(model_volume.direction, mv.direction)):
            return self.mask
        return body_mask(model_volume)


@dataclass(frozen=True, eq=False)
class CheckedPair:
    """The preflight's result: both images checked, the modality pair and the body masks."""

    fixed: CheckedImage
    moving: CheckedImage
    modality_pair: str  # 'same' | 'cross'
    scanner_gap_mm: float = 0.0  # distance between the scanner-coordinate boxes (0: they intersect)

    def is_for(self, fixed: Volume, moving: Volume) -> bool:
        return self.fixed.volume is fixed and self.moving.volume is moving


def check_volume(volume: Volume, role: str) -> None:
    """Refuse (RegistrationError) a 2D, constant/NaN or wrongly flagged volume."""
    if not isinstance(volume, Volume):
        raise RegistrationError(f"{role} image: expected a samv2core Volume, got {type(volume).__name__}")
    size = np.asarray(volume.size_xyz)
    extent = (size - 1) * np.asarray(volume.spacing)
    if size.min() < 2 or extent.min() < 8.0:
        raise RegistrationError(
            f"{role} image is 2D or too thin ({'x'.join(map(str, size))} voxels, extent "
            f"{'x'.join(f'{e:.0f}' for e in extent)} mm): registration needs a 3D volume")
    try:
        volume.validated()
    except InputError as exc:
        raise RegistrationError(f"{role} image: {exc}") from None
    a = volume.array
    sub = a.ravel()[:: max(1, a.size // 200_000)]
    p1 = float(np.percentile(sub, 1))
    if volume.modality is Modality.CT and float(a.min()) >= 0.0:
        raise RegistrationError(
            f"{role} image is flagged CT but has no negative values (min {float(a.min()):g}): CT must be in "
            "Hounsfield units (air -1000); if it is an MR image, flag it MR")
    if volume.modality is Modality.MR and p1 < -500.0:
        raise RegistrationError(
            f"{role} image is flagged MR but looks like CT in Hounsfield units (1st percentile {p1:.0f}); flag it CT")


def check_modalities(fixed: Volume, moving: Volume, opts: RegistrationOptions) -> str:
    """'same' or 'cross'; RegistrationError when the flags contradict the options."""
    pair = "same" if fixed.modality == moving.modality else "cross"
    if opts.modality_pair != "auto" and opts.modality_pair != pair:
        raise RegistrationError(
            f"modality mismatch: options say '{opts.modality_pair}' modality but fixed is {fixed.modality.value} "
            f"and moving is {moving.modality.value}")
    if pair == "cross" and opts.deformable.intensity == "lncc":
        raise RegistrationError(
            f"LNCC compares intensities of the same modality; fixed is {fixed.modality.value}, moving "
            f"{moving.modality.value}: use the 'mind' (or 'auto') intensity term")
    return pair


def scanner_gap_mm(a: Volume, b: Volume) -> float:
    """Distance (mm) between the scanner-coordinate bounding boxes of two images; 0 when they intersect."""
    ca, cb = a.corners_lps(), b.corners_lps()
    gap = np.maximum(np.maximum(ca.min(0), cb.min(0)) - np.minimum(ca.max(0), cb.max(0)), 0.0)
    return float(np.linalg.norm(gap))


def body_or_refuse(model_volume: Volume, role: str, opts: RegistrationOptions) -> np.ndarray:
    """The body mask of a model-grid volume; RegistrationError when it is (nearly) all background."""
    mask = body_mask(model_volume)
    ml = float(mask.sum()) * float(np.prod(model_volume.spacing)) / 1000.0
    if ml < opts.min_body_volume_ml:
        raise RegistrationError(
            f"{role} image is all background: only {ml:.1f} ml above the body threshold "
            f"(at least {opts.min_body_volume_ml:g} ml needed)")
    return mask


def preflight(fixed: Volume, moving: Volume, options: RegistrationOptions | None = None) -> CheckedPair:
    """All checks that need no model; returns the CheckedPair the pipeline reuses.

    Raises RegistrationError (one line) for a 2D or unusable image, contradicting modality
    flags, an all-background image or images whose scanner boxes are further apart than
    ``opts.physical_gap_mm`` (a small field of view moved with the patient or the table can
    lie beside the other scan's box; the anatomy decides and the verification checks it).
    """
    opts = options or RegistrationOptions()
    check_volume(fixed, "fixed")
    check_volume(moving, "moving")
    pair = check_modalities(fixed, moving, opts)
    images = []
    for volume, role in ((fixed, "fixed"), (moving, "moving")):
        mv = resample_to_model_grid(volume, MODEL_SPACING_MM)
        images.append(CheckedImage(volume, mv, body_or_refuse(mv, role, opts)))
    gap = scanner_gap_mm(fixed, moving)
    if opts.require_physical_overlap and gap > opts.physical_gap_mm:
        raise RegistrationError(
            f"the fixed and moving images do not overlap physically (their scanner-coordinate boxes are {gap:.0f} mm "
            f"apart, more than {opts.physical_gap_mm:g} mm); if they come from different scanners or patients and "
            "should be matched anatomically anyway, disable the check (require_physical_overlap=False, CLI "
            "--ignore-physical-overlap)")
    return CheckedPair(images[0], images[1], pair, round(gap, 1))
