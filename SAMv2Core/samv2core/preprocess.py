"""Preprocessing as in the SAMv2 reference: resample to an isotropic LPS-aligned grid and map
intensities to the network's range ([0, 255] - 50; air at -50 for CT).

The model grid always has an identity direction in LPS, so array axes (z, y, x) run
inferior->superior, anterior->posterior and right->left whatever the input's direction
matrix (oblique, flipped or left-handed scans all land on the same canonical grid).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from .errors import InputError
from .volume import Modality, Volume

CT_RANGE = (-1024.0, 3071.0)
MR_PERCENTILES = (0.2, 99.8)
OUTPUT_OFFSET = 50.0
# a whole-body scan at 2 mm is about 80 M voxels; far beyond that the header's geometry is wrong
MAX_MODEL_GRID_VOXELS = 250_000_000


def model_grid_for(volume: Volume, spacing_mm: float = 2.0, margin_mm: float = 0.0):
    """(origin, size_xyz) of the identity-direction grid covering ``volume`` at ``spacing_mm``."""
    corners = volume.corners_lps()
    lo = corners.min(axis=0) - margin_mm
    hi = corners.max(axis=0) + margin_mm
    size = np.maximum(1, np.floor((hi - lo) / spacing_mm + 1e-6).astype(np.int64) + 1)
    if float(np.prod(size.astype(float))) > MAX_MODEL_GRID_VOXELS:
        ext = " x ".join(f"{e:.0f}" for e in hi - lo)
        raise InputError(f"{volume.name or 'volume'}: the image spans {ext} mm (spacing "
                         f"{', '.join(f'{s:g}' for s in volume.spacing)} mm): too large for a {spacing_mm:g} mm "
                         "grid; check the spacing in the file header")
    return lo, tuple(int(s) for s in size)


def resample_to_model_grid(volume: Volume, spacing_mm: float = 2.0, fill_value: float | None = None,
                           antialias: bool = True) -> Volume:
    """Resample onto the canonical LPS grid at ``spacing_mm`` (linear, anti-aliased).

    Returns a new Volume; the input is untouched. Voxels outside the source are filled with
    the source minimum (air for CT, background for MR) unless ``fill_value`` is given.
    ``antialias=False`` skips the Gaussian pre-filter (quick looks such as the body check).
    """
    if spacing_mm <= 0:
        raise InputError(f"model spacing must be positive, got {spacing_mm}")
    src = volume.to_sitk()
    if antialias:
        # Anti-aliasing before decimation, one recursive pass per axis that is decimated;
        # axes already near the target spacing stay sharp (and cost nothing).
        for axis, s in enumerate(volume.spacing):
            if s < spacing_mm / 1.5:
                src = sitk.RecursiveGaussian(src, 0.5 * float(np.sqrt(spacing_mm ** 2 - s ** 2)), False,
                                             sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    origin, size = model_grid_for(volume, spacing_mm)
    fill = float(volume.array.min()) if fill_value is None else float(fill_value)
    out = sitk.Resample(src, size, sitk.Transform(), sitk.sitkLinear, tuple(origin),
                        (spacing_mm,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), fill, sitk.sitkFloat32)
    res = Volume.from_sitk(out, volume.modality, name=volume.name)
    res.meta.update(volume.meta)
    return res


def normalize_intensity(array: np.ndarray, modality: "Modality | str") -> np.ndarray:
    """Map raw intensities to the network input range: [0, 255] - 50, float32, new array.

    CT: clip to [-1024, 3071] HU. MR: clip to the 0.2 / 99.8 percentiles (upper >= 1).
    """
    modality = Modality.parse(modality)
    a = np.asarray(array, dtype=np.float32)
    if modality is Modality.CT:
        lo, hi = CT_RANGE
    else:
        sample = a.ravel()[:: max(1, a.size // 2_000_000)]
        lo, hi = (float(v) for v in np.percentile(sample, MR_PERCENTILES))
        hi = max(hi, lo + 1.0, 1.0)
    out = (np.clip(a, lo, hi) - lo) * (255.0 / (hi - lo)) - OUTPUT_OFFSET
    return out.astype(np.float32, copy=False)


def body_mask(volume: Volume, threshold: float | None = None) -> np.ndarray:
    """Boolean (z, y, x) mask of the body: threshold, keep the largest component, fill holes.

    CT default threshold -500 HU; MR default: 10% of the 99th percentile.
    """
    a = volume.array
    if threshold is None:
        threshold = -500.0 if volume.modality is Modality.CT else 0.1 * float(np.percentile(a, 99))
    mask = a > threshold
    mask = ndimage.binary_opening(mask, iterations=1)
    labels, n = ndimage.label(mask)
    if n == 0:
        return np.zeros(a.shape, dtype=bool)
    counts = np.bincount(labels.ravel())
    counts[0] = 0
    mask = labels == int(np.argmax(counts))
    # fill holes slice by slice (lungs, bowel gas are inside the body)
    filled = np.stack([ndimage.binary_fill_holes(s) for s in mask])
    return filled
