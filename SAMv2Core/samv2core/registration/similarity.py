"""Terms of the intensity refinements (linear and deformable): patch NCC for the same
modality, and the diffusion regulariser of a displacement / velocity field."""
from __future__ import annotations

import torch


def patch_ncc(fixed_patches: torch.Tensor, moving_patches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """1 - mean squared NCC over patches (P, K) with per-patch validity (P,)."""
    f = fixed_patches - fixed_patches.mean(1, keepdim=True)
    m = moving_patches - moving_patches.mean(1, keepdim=True)
    cc = (f * m).sum(1) ** 2 / ((f * f).sum(1) * (m * m).sum(1) + 1e-5)
    return 1.0 - (cc * valid).sum() / valid.sum().clamp_min(1.0)


def diffusion(field: torch.Tensor, spacing) -> torch.Tensor:
    """Mean squared spatial gradient (dimensionless: mm per mm) of a (1, 3, z, y, x) field in mm."""
    sx, sy, sz = (float(s) for s in spacing)
    dz = (field[:, :, 1:] - field[:, :, :-1]) / sz
    dy = (field[:, :, :, 1:] - field[:, :, :, :-1]) / sy
    dx = (field[..., 1:] - field[..., :-1]) / sx
    return (dz.pow(2).mean() + dy.pow(2).mean() + dx.pow(2).mean())
