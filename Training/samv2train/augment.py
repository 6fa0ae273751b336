"""Augmentations: random view geometry (scale, rotation, offset) and intensity changes.

A *view* is an affine map from a patch's voxel coordinates (z, y, x) to the cached volume's
voxel coordinates. Two views of one volume therefore have an exact, known voxel
correspondence (view_b.to_patch(view_a.to_volume(p))), which is what the contrastive loss
needs. Intensity augmentations act on the patch only and never change geometry.

CrossSAM's aggressive profile adds random monotone-or-not piecewise-linear intensity curves
(5-15 control points), intensity inversion and stronger blur, so CT and MR anatomy become
indistinguishable by intensity alone and the network must learn structure.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import AugmentSection

FILL = -50.0  # network value of air / background (normalize_intensity maps the minimum to -50)
RANGE = 255.0


@dataclass(frozen=True)
class View:
    """Affine patch -> volume voxel map: v = center + matrix @ (p - patch_center), all (z, y, x)."""

    center: np.ndarray  # (3,) volume voxel coords of the patch centre
    matrix: np.ndarray  # (3, 3) rotation @ diag(scale), volume voxels per patch voxel
    patch_size: tuple[int, int, int]

    @property
    def patch_center(self) -> np.ndarray:
        return (np.asarray(self.patch_size, float) - 1) / 2

    def to_volume(self, p: np.ndarray) -> np.ndarray:
        return (np.asarray(p, float) - self.patch_center) @ self.matrix.T + self.center

    def to_patch(self, v: np.ndarray) -> np.ndarray:
        return (np.asarray(v, float) - self.center) @ np.linalg.inv(self.matrix).T + self.patch_center


def rotation_matrix(angles_rad) -> np.ndarray:
    """Rotation about the z, y and x axes (in that order) in (z, y, x) coordinates."""
    az, ay, ax = angles_rad
    cz, sz = math.cos(az), math.sin(az)
    cy, sy = math.cos(ay), math.sin(ay)
    cx, sx = math.cos(ax), math.sin(ax)
    # about z: mixes (y, x); about y: mixes (z, x); about x: mixes (z, y)
    rz = np.array([[1, 0, 0], [0, cz, -sz], [0, sz, cz]])
    ry = np.array([[cy, 0, -sy], [0, 1, 0], [sy, 0, cy]])
    rx = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])
    return rz @ ry @ rx


def random_view(rng: np.random.Generator, center: np.ndarray, patch_size, aug: AugmentSection,
                aggressive: bool = False) -> View:
    """A random view around ``center``: isotropic-ish scale in aug.scale, small rotation."""
    s = rng.uniform(aug.scale[0], aug.scale[1])
    # slight anisotropy (+-5%) so the network does not rely on exact aspect ratios
    scales = s * rng.uniform(0.95, 1.05, size=3)
    deg = aug.rotation_deg + (aug.affine_deg if aggressive else 0.0)
    # in-plane (axial) rotation is the common one in practice; out-of-plane kept smaller
    angles = np.deg2rad([rng.uniform(-deg, deg), rng.uniform(-deg / 3, deg / 3), rng.uniform(-deg / 3, deg / 3)])
    m = rotation_matrix(angles) @ np.diag(scales)
    return View(np.asarray(center, float), m, tuple(int(v) for v in patch_size))


def view_grid(view: View, volume_shape) -> torch.Tensor:
    """grid_sample grid (1, D, H, W, 3) in normalised (x, y, z) order for the whole patch."""
    D, H, W = view.patch_size
    zz, yy, xx = np.meshgrid(np.arange(D), np.arange(H), np.arange(W), indexing="ij")
    p = np.stack([zz, yy, xx], -1).reshape(-1, 3).astype(np.float64)
    v = view.to_volume(p)
    return volume_to_grid(v, volume_shape).reshape(1, D, H, W, 3)


def volume_to_grid(v: np.ndarray, volume_shape) -> torch.Tensor:
    """Volume voxel coords (N, 3) (z, y, x) -> normalised grid_sample coords (N, 3) (x, y, z)."""
    size = np.asarray(volume_shape, float)
    n = 2.0 * v / np.maximum(size - 1, 1) - 1.0
    return torch.from_numpy(n[:, ::-1].copy()).float()


def extract_patch(image: torch.Tensor, view: View, mode: str = "bilinear", fill: float = FILL) -> torch.Tensor:
    """Resample ``image`` (Z, Y, X) through ``view``; outside voxels get ``fill``. Returns (D, H, W)."""
    grid = view_grid(view, image.shape)
    src = (image.float() - fill)[None, None]
    out = F.grid_sample(src, grid, mode=mode, padding_mode="zeros", align_corners=True)
    return out[0, 0] + fill


def extract_mask(mask: torch.Tensor, view: View) -> torch.Tensor:
    """Nearest-neighbour resampling of a bool/int map through ``view`` (outside = 0)."""
    grid = view_grid(view, mask.shape)
    out = F.grid_sample(mask.float()[None, None], grid, mode="nearest", padding_mode="zeros", align_corners=True)
    return out[0, 0]


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (D, H, W) tensor with ``sigma`` voxels (edge-replicated)."""
    if sigma <= 0.05:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    y = x[None, None]
    for dim in range(3):
        shape = [1, 1, 1, 1, 1]
        shape[2 + dim] = k.numel()
        pad = [0] * 6
        pad[2 * (2 - dim)] = r
        pad[2 * (2 - dim) + 1] = r
        y = F.conv3d(F.pad(y, pad, mode="replicate"), k.view(shape))
    return y[0, 0]


def random_curve(rng: np.random.Generator, n_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Random piecewise-linear intensity curve on [0, 1] with ``n_points`` control points
    (random histogram shift, as in CrossSAM; not necessarily monotone)."""
    xs = np.linspace(0, 1, n_points)
    ys = np.sort(rng.uniform(0, 1, n_points)) if rng.random() < 0.5 else rng.uniform(0, 1, n_points)
    ys[0], ys[-1] = (0.0, 1.0) if rng.random() < 0.7 else (ys[0], ys[-1])
    return xs, ys


def apply_curve(x: torch.Tensor, xs: np.ndarray, ys: np.ndarray) -> torch.Tensor:
    """Piecewise-linear map of values in [0, 1] through control points (xs, ys)."""
    xs_t = torch.as_tensor(xs, dtype=x.dtype)
    ys_t = torch.as_tensor(ys, dtype=x.dtype)
    idx = torch.clamp(torch.bucketize(x.contiguous(), xs_t) - 1, 0, len(xs) - 2)
    x0, x1 = xs_t[idx], xs_t[idx + 1]
    y0, y1 = ys_t[idx], ys_t[idx + 1]
    w = (x - x0) / (x1 - x0).clamp_min(1e-6)
    return y0 + w * (y1 - y0)


def augment_intensity(patch: torch.Tensor, rng: np.random.Generator, aug: AugmentSection,
                      aggressive: bool = False) -> torch.Tensor:
    """Random contrast, blur and noise (plus curve / inversion when ``aggressive``); new tensor."""
    u = (patch - FILL) / RANGE  # -> [0, 1]
    u = u.clamp(0, 1)
    if aggressive:
        if rng.random() < aug.curve_prob:
            n = int(rng.integers(aug.curve_points[0], aug.curve_points[1] + 1))
            u = apply_curve(u, *random_curve(rng, n))
        if rng.random() < aug.invert_prob:
            u = 1.0 - u
    c = rng.uniform(aug.contrast[0], aug.contrast[1])
    m = float(u.mean())
    u = (u - m) * c + m
    blur_hi = aug.blur_sigma[1] * (1.5 if aggressive else 1.0)
    if rng.random() < 0.5:
        u = gaussian_blur(u, float(rng.uniform(aug.blur_sigma[0], blur_hi)))
    if aug.noise_std > 0:
        std = rng.uniform(0, aug.noise_std)
        g = torch.Generator().manual_seed(int(rng.integers(2 ** 31)))
        u = u + std * torch.randn(u.shape, generator=g)
    return u * RANGE + FILL
