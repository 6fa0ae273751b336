"""MIND-SSC: the modality-independent self-similarity context descriptor (Heinrich et al.,
MICCAI 2013), used as the cross-modality (CT-MRI) intensity term of the deformable step.

For the six face neighbours at distance ``dilation`` voxels, the 12 pairs that are not
opposite each other (pairwise distance sqrt(2) * dilation) give 12 channels of patch
distances D = box(I(x + a) - I(x + b))^2; the descriptor is exp(-(D - min D) / V) with V the
(clamped) mean distance. It compares local structure, not intensities, so a CT and an MRI
of the same anatomy give similar descriptors.
"""
from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

_SIX = [(-1, 0, 0), (1, 0, 0), (0, -1, 0), (0, 1, 0), (0, 0, -1), (0, 0, 1)]
# Pairs of face neighbours at right angles: 12 of the 15 pairs (opposite pairs excluded).
PAIRS = [(a, b) for a, b in itertools.combinations(_SIX, 2)
         if sum((x - y) ** 2 for x, y in zip(a, b)) == 2]


def _shifted(xp: torch.Tensor, offset, pad: int, shape) -> torch.Tensor:
    """View of x(v + offset) (offsets in voxels (z, y, x)) from the replicate-padded ``xp``."""
    dz, dy, dx = offset
    d, h, w = shape
    return xp[..., pad + dz:pad + dz + d, pad + dy:pad + dy + h, pad + dx:pad + dx + w]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC of a (1, 1, z, y, x) image -> (1, 12, z, y, x) descriptor in [0, 1]."""
    if image.dim() != 5 or image.shape[:2] != (1, 1):
        raise ValueError(f"expected a (1, 1, z, y, x) tensor, got {tuple(image.shape)}")
    x = image.float()
    pad = dilation
    xp = F.pad(x, (pad,) * 6, mode="replicate")  # once; the 12 pairs are views into it
    shape = x.shape[-3:]
    dist = torch.empty((1, len(PAIRS)) + tuple(shape), dtype=x.dtype, device=x.device)
    for n, (a, b) in enumerate(PAIRS):
        sa = _shifted(xp, tuple(dilation * v for v in a), pad, shape)
        sb = _shifted(xp, tuple(dilation * v for v in b), pad, shape)
        torch.sub(sa, sb, out=dist[:, n:n + 1]).square_()
    k = 2 * radius + 1
    dist = F.avg_pool3d(F.pad(dist, (radius,) * 6, mode="replicate"), k, stride=1)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    m = var.mean()
    # Clamp the local variance so flat regions (air, background) do not blow up the descriptor.
    var = var.clamp(min=float(m) * 1e-3 + 1e-12, max=float(m) * 1e3 + 1e-12)
    return torch.exp(-dist / var)
