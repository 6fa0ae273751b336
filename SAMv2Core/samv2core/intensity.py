"""The intensity toolkit of the local intensity refinements: how intensities are normalised
(CT windows, MR percentile scaling) and how local similarity is measured (patch NCC).

One home for the click refinement (click_refine.py), the linear refinement
(registration/linear_intensity_refine.py), the verification probe (registration/verify.py) and
the deformable step (registration/deformable.py). Their thread pinning is
``samv2core.device.torch_threads``.

Two CT windows exist on purpose: the registration terms see [-1000, 600] HU mapped to [0, 1]
(air to dense bone, keeping soft-tissue contrast), the click refinement [-1000, 1000] HU mapped
to [-1, 1] (its texture check reads spreads in units of 1000 HU and pads with air = -1).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class IntensityWindow:
    """Intensities clipped to [lo, hi] and mapped by (x - zero) / unit (in the image's units:
    HU for CT)."""

    lo: float
    hi: float
    zero: float = 0.0
    unit: float = 1.0

    def apply(self, array: np.ndarray) -> np.ndarray:
        """float32 array of the same shape: ``clip((x - zero) / unit)`` to the window's range."""
        a = np.asarray(array, dtype=np.float32)
        return np.clip((a - self.zero) / self.unit, (self.lo - self.zero) / self.unit,
                       (self.hi - self.zero) / self.unit)

    def tensor(self, array: np.ndarray) -> torch.Tensor:
        """(1, 1, z, y, x) float32 tensor of ``apply(array)`` for a (z, y, x) array."""
        return torch.from_numpy(np.ascontiguousarray(self.apply(array)))[None, None]


# registration (linear refinement, verification, deformable): air to dense bone -> [0, 1]
CT_REGISTRATION_WINDOW = IntensityWindow(-1000.0, 600.0, -1000.0, 1600.0)
# click refinement: [-1000, 1000] HU -> [-1, 1] (bone beyond does not dominate LNCC; air is -1)
CT_CLICK_WINDOW = IntensityWindow(-1000.0, 1000.0, 0.0, 1000.0)


def percentile_window(sample: np.ndarray, lo_percentile: float | None, hi_percentile: float) -> IntensityWindow:
    """The MR window of an intensity ``sample`` (a strided subset of the image).

    Args:
        sample: intensities (any shape) the percentiles are read from.
        lo_percentile: None scales by the high percentile only (no clipping, 0 stays 0);
            else the window [p_lo, p_hi] is mapped to [0, 1].
        hi_percentile: e.g. 99 or 99.5.

    Returns:
        IntensityWindow: (-inf, inf, 0, max(p_hi, 1e-6)) or (p_lo, p_hi, p_lo, p_hi - p_lo)
        with p_hi at least p_lo + 1e-3.
    """
    if lo_percentile is None:
        return IntensityWindow(-np.inf, np.inf, 0.0, max(float(np.percentile(sample, hi_percentile)), 1e-6))
    lo, hi = (float(v) for v in np.percentile(sample, (lo_percentile, hi_percentile)))
    hi = max(hi, lo + 1e-3)
    return IntensityWindow(lo, hi, lo, hi - lo)


def local_ncc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Signed normalised cross-correlation of patches along the last axis.

    Args:
        a, b: (..., K) intensities of matching patches of K samples each.

    Returns:
        (...) NCC in [-1, 1]; about 0 where a patch is flat (a 1e-6 floor in the denominator).
    """
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / torch.sqrt((a * a).sum(-1) * (b * b).sum(-1) + 1e-6)


def ncc_loss(fixed_patches: torch.Tensor, moving_patches: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The refinements' loss: 1 - mean squared NCC over the valid patches (squared: a contrast
    inversion between the images still counts as agreement).

    Args:
        fixed_patches, moving_patches: (P, K) patches of K samples.
        valid: (P,) float weights (1 for a patch inside both images, 0 outside).

    Returns:
        scalar tensor in [0, 1] (lower is better).
    """
    f = fixed_patches - fixed_patches.mean(1, keepdim=True)
    m = moving_patches - moving_patches.mean(1, keepdim=True)
    cc = (f * m).sum(1) ** 2 / ((f * f).sum(1) * (m * m).sum(1) + 1e-5)
    return 1.0 - (cc * valid).sum() / valid.sum().clamp_min(1.0)
