"""How the intensity refinements see an image: its intensities (normalised by the intensity
toolkit, samv2core.intensity), body mask and embeddings on the model grid, cropped to the common
field of view, and which intensity term compares two of them.

Shared by the linear refinement (linear_intensity_refine.py), the verification (verify.py,
candidate.py), the stages (stages.py) and the deformable step (deformable.py). All boxes and
points are LPS millimetres on identity-direction (model-grid) volumes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from scipy import ndimage

from ..errors import InputError, RegistrationError
from ..grid import Grid
from ..intensity import CT_REGISTRATION_WINDOW, percentile_window
from ..volume import Volume
from .fov import crop_volume
from .grid import sample

INTENSITY_TERMS = ("auto", "lncc", "mind", "none")


@dataclass
class DeformableImage:
    """One image as the intensity refinements (linear, deformable) see it: intensities and
    (optionally) body mask and embeddings.

    ``intensity`` is (1, 1, z, y, x) on ``intensity_grid`` scaled to about [0, 1]; ``mask``
    (optional, same grid) marks the body; ``features`` (1, C, z, y, x) on ``feature_grid``.
    """

    intensity: torch.Tensor
    intensity_grid: Grid
    modality: str
    mask: Optional[torch.Tensor] = None
    features: Optional[torch.Tensor] = None
    feature_grid: Optional[Grid] = None


def intensity_tensor(volume, modality: str) -> torch.Tensor:
    """(1, 1, z, y, x) float32 intensities scaled to about [0, 1] for the registration's
    intensity terms (linear refinement, verification, deformable step).

    Args:
        volume: anything with a (z, y, x) ``array``; modality: 'CT' | 'MR' (or a Modality).

    Returns:
        CT through ``CT_REGISTRATION_WINDOW`` ([-1000, 600] HU, air to dense bone, keeping
        soft-tissue contrast); MR through its 0.5-99.5 percentile range.
    """
    a = np.asarray(volume.array, dtype=np.float32)
    if str(getattr(modality, "value", modality)).upper() == "CT":
        return CT_REGISTRATION_WINDOW.tensor(a)
    return percentile_window(a.ravel()[:: max(1, a.size // 1_000_000)], 0.5, 99.5).tensor(a)


def make_deformable_image(model_volume, mask: Optional[np.ndarray] = None, embeddings=None,
                          mask_margin_voxels: int = 2) -> DeformableImage:
    """The deformable step's view of an identity-direction (model-grid) Volume.

    ``mask`` (z, y, x) bool is dilated by ``mask_margin_voxels`` so the body outline counts;
    ``embeddings`` (samv2core.embed.Embeddings) adds the fine embedding head and its grid.
    """
    if not np.allclose(model_volume.direction, np.eye(3), atol=1e-6):
        raise ValueError("the deformable step works on identity-direction (model-grid) volumes")
    grid = Grid(model_volume.origin, model_volume.spacing, tuple(model_volume.array.shape))
    m = None
    if mask is not None:
        mk = ndimage.binary_dilation(mask, iterations=mask_margin_voxels) if mask_margin_voxels > 0 else mask
        m = torch.from_numpy(np.asarray(mk, dtype=np.float32))[None, None]
    feats = fgrid = None
    if embeddings is not None:
        eg = embeddings.fine_grid
        feats = embeddings.fine[None]
        fgrid = Grid(tuple(float(v) for v in eg.origin), tuple(float(v) for v in eg.spacing), tuple(int(v) for v in eg.shape))
    return DeformableImage(intensity_tensor(model_volume, model_volume.modality.value), grid,
                           model_volume.modality.value, m, feats, fgrid)


def resolve_intensity_term(term: str, fixed_modality: str, moving_modality: str) -> str:
    """'auto' -> 'lncc' for the same modality, 'mind' across modalities; others unchanged."""
    if term not in INTENSITY_TERMS:
        raise InputError(f"intensity term must be one of {INTENSITY_TERMS}, got {term!r}")
    if term == "auto":
        return "lncc" if str(fixed_modality) == str(moving_modality) else "mind"
    return term


def candidate_points(fixed: DeformableImage, lo, hi, spacing: float) -> np.ndarray:
    """LPS points (N, 3) on a ``spacing`` grid in the box [lo, hi] and inside the fixed mask."""
    g = Grid.covering(lo, hi, spacing)
    pts = g.points().reshape(-1, 3)
    if fixed.mask is not None:
        m = sample(fixed.mask.float(), fixed.intensity_grid, torch.as_tensor(pts, dtype=torch.float32)[None])
        pts = pts[m.reshape(-1).numpy() > 0.5]
    return pts


def crop_view(model_volume: Volume, mask: np.ndarray, lo, hi, emb):
    """The refinements' view (DeformableImage) of one image cropped to the LPS box [lo, hi] mm
    (the CrossSAM field-of-view crop).

    Args:
        model_volume: the image on its identity-direction 2 mm model grid.
        mask: (z, y, x) bool body mask on that grid.
        lo, hi: (3,) LPS corners of the box, mm.
        emb: the image's Embeddings (adds the fine embedding head) or None (intensities only).
    """
    cropped = crop_volume(model_volume, lo, hi)
    i0 = np.rint(model_volume.lps_to_index(np.asarray(cropped.origin))).astype(int)
    z, y, x = cropped.array.shape
    sub_mask = mask[i0[2]:i0[2] + z, i0[1]:i0[1] + y, i0[0]:i0[0] + x]
    return make_deformable_image(cropped, sub_mask, emb)


def valid_box(model_volume: Volume, mask: np.ndarray, fov) -> tuple[np.ndarray, np.ndarray]:
    """LPS box (lo (3,), hi (3,), mm) where the refinements measure similarity: the fixed side
    of the common field of view ``fov``, limited to the body's bounding box of ``mask``
    ((z, y, x) bool on ``model_volume``'s grid). RegistrationError when it is under 16 mm."""
    kji = np.argwhere(mask)
    body_pts = model_volume.index_to_lps(kji[[kji[:, d].argmin() for d in range(3)] +
                                             [kji[:, d].argmax() for d in range(3)]][:, ::-1].astype(float))
    lo = np.maximum(fov.fixed_lo, body_pts.min(0))
    hi = np.minimum(fov.fixed_hi, body_pts.max(0))
    if np.any(hi - lo < 16.0):
        raise RegistrationError("the common field of view contains too little of the fixed body to refine the transform")
    return lo, hi
