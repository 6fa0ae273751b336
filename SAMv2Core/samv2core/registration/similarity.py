"""Masked similarity terms for the deformable step: embedding cosine, LNCC, MIND SSD.

Each returns a loss to minimise (0 = perfect) averaged over a voxel weight map.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return (x * weight).sum() / weight.sum().clamp_min(1e-6)


def cosine_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity of (1, C, ...) descriptors, averaged with ``weight`` (1, 1, ...)."""
    cos = F.cosine_similarity(fixed, moving, dim=1, eps=1e-6)[:, None]
    return 1.0 - _masked_mean(cos, weight)


def lncc_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, window: int = 5) -> torch.Tensor:
    """1 - squared local normalised cross-correlation (box window of ``window`` voxels)."""
    k = max(3, int(window) | 1)
    pad = k // 2

    def box(t):
        return F.avg_pool3d(F.pad(t, (pad,) * 6, mode="replicate"), k, stride=1)

    mf, mm = box(fixed), box(moving)
    vf = box(fixed * fixed) - mf * mf
    vm = box(moving * moving) - mm * mm
    cov = box(fixed * moving) - mf * mm
    cc = cov * cov / (vf * vm + 1e-5)
    return 1.0 - _masked_mean(cc, weight)


def ssd_loss(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Mean over channels and voxels of squared differences (used on MIND descriptors)."""
    return _masked_mean(((fixed - moving) ** 2).mean(dim=1, keepdim=True), weight)


def diffusion(field: torch.Tensor, spacing) -> torch.Tensor:
    """Mean squared spatial gradient (dimensionless: mm per mm) of a (1, 3, z, y, x) field in mm."""
    sx, sy, sz = (float(s) for s in spacing)
    dz = (field[:, :, 1:] - field[:, :, :-1]) / sz
    dy = (field[:, :, :, 1:] - field[:, :, :, :-1]) / sy
    dx = (field[..., 1:] - field[..., :-1]) / sx
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean())
