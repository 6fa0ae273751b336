"""Building training samples: two overlapping augmented views of one volume with their exact
voxel correspondence, label maps carried through the same geometry, and the geometry of the
network's output grids (fine, coarse) in patch coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .augment import View, augment_intensity, extract_mask, extract_patch, random_view
from .config import AugmentSection
from .data import TrainVolume


def output_grid_centres(shape, stride) -> np.ndarray:
    """Patch-voxel coordinates (N, 3) of the centres of an output grid ``shape`` with ``stride``.

    An output voxel of a stride-s convolution covers input voxels s*i .. s*i+s-1, whose
    centre is s*i + (s-1)/2.
    """
    axes = [np.arange(n) * s + (s - 1) / 2.0 for n, s in zip(shape, stride)]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij")
    return np.stack([zz, yy, xx], -1).reshape(-1, 3)


def patch_to_output(p: np.ndarray, stride) -> np.ndarray:
    """Patch-voxel coords -> continuous output-grid coords (inverse of output_grid_centres)."""
    s = np.asarray(stride, float)
    return (np.asarray(p, float) - (s - 1) / 2.0) / s


@dataclass
class ViewPair:
    """Two augmented patches of one volume and everything needed to pair their voxels."""

    volume_index: int
    patch_a: torch.Tensor  # (D, H, W)
    patch_b: torch.Tensor
    view_a: View
    view_b: View
    body_a: torch.Tensor  # (D, H, W) float 0/1 (outside the volume = 0)
    body_b: torch.Tensor
    labels_a: "torch.Tensor | None" = None  # (D, H, W) int64 (nearest), 0 outside
    labels_b: "torch.Tensor | None" = None
    label_set: str = ""
    spacing_mm: float = 2.0
    # for registered cross-modality pairs the two views come from different volumes:
    # b_from_a maps volume-A voxel coords to volume-B voxel coords (identity for one volume)
    b_from_a: "callable | None" = None
    a_valid: "callable | None" = None  # optional: volume-A voxel coords -> bool (inside overlap)
    # CrossSAM: a patch of volume A from outside the overlap (its voxels are extra negatives)
    patch_fov: "torch.Tensor | None" = None

    def a_to_b_patch(self, p_a: np.ndarray) -> np.ndarray:
        """Patch-A voxel coords -> patch-B voxel coords (exact, from the two views)."""
        v = self.view_a.to_volume(p_a)
        if self.b_from_a is not None:
            v = self.b_from_a(v)
        return self.view_b.to_patch(v)


def pick_centre(rng: np.random.Generator, vol: TrainVolume, tries: int = 20) -> np.ndarray:
    """A random body voxel (z, y, x) of ``vol`` (any voxel if the mask is empty)."""
    body = vol.body
    shape = np.asarray(body.shape)
    for _ in range(tries):
        c = rng.integers(0, shape)
        if bool(body[tuple(int(v) for v in c)]):
            return c.astype(float) + rng.uniform(-0.5, 0.5, 3)
    idx = torch.nonzero(body)
    if len(idx):
        return idx[int(rng.integers(len(idx)))].numpy().astype(float)
    return rng.uniform(0, shape - 1)


def offset_centre(rng: np.random.Generator, centre: np.ndarray, patch_size, frac: float, vol_shape) -> np.ndarray:
    """Second view's centre: shifted by up to ``frac`` of the patch extent on each axis,
    so the two views always overlap by at least (1 - frac) along each axis."""
    ext = np.asarray(patch_size, float)
    c = centre + rng.uniform(-frac, frac, 3) * ext / 2.0
    return np.clip(c, 0, np.asarray(vol_shape, float) - 1)


def make_view_pair(rng: np.random.Generator, vol: TrainVolume, index: int, patch_size, aug: AugmentSection,
                   aggressive: "bool | None" = None, with_labels: bool = True) -> ViewPair:
    """Two overlapping, independently augmented views of ``vol``."""
    if aggressive is None:
        aggressive = aug.profile == "crosssam" or (aug.crosssam_prob > 0 and rng.random() < aug.crosssam_prob)
    ca = pick_centre(rng, vol)
    cb = offset_centre(rng, ca, patch_size, aug.max_offset_frac, vol.shape)
    va = random_view(rng, ca, patch_size, aug, aggressive)
    vb = random_view(rng, cb, patch_size, aug, aggressive)
    pa = augment_intensity(extract_patch(vol.image, va), rng, aug, aggressive)
    pb = augment_intensity(extract_patch(vol.image, vb), rng, aug, aggressive)
    la = lb = None
    if with_labels and vol.labels is not None:
        la = extract_mask(vol.labels, va).long()
        lb = extract_mask(vol.labels, vb).long()
    return ViewPair(index, pa, pb, va, vb, extract_mask(vol.body, va), extract_mask(vol.body, vb),
                    la, lb, vol.label_set, vol.spacing_mm)


def fixed_view_pair(seed: int, vol: TrainVolume, index: int, patch_size, aug: AugmentSection) -> ViewPair:
    """A reproducible pair for validation: geometric augmentation only (no intensity change)."""
    rng = np.random.default_rng(seed)
    ca = pick_centre(rng, vol)
    cb = offset_centre(rng, ca, patch_size, aug.max_offset_frac, vol.shape)
    va = random_view(rng, ca, patch_size, aug)
    vb = random_view(rng, cb, patch_size, aug)
    return ViewPair(index, extract_patch(vol.image, va), extract_patch(vol.image, vb), va, vb,
                    extract_mask(vol.body, va), extract_mask(vol.body, vb), None, None, vol.label_set,
                    vol.spacing_mm)
