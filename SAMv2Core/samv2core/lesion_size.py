"""Lesion size on one scan, and the lesion found again on a follow-up by its contrast.

``measure`` gives a segment's volume and longest axial diameter (in the spirit of RECIST 1.1:
the longest in-plane extent on any axial slice, edge to edge). ``resegment`` finds a
baseline lesion on the follow-up: the propagated segment says where, the lesion's contrast
against its surroundings (baseline median inside vs a ring outside) says what to look for; a
follow-up whose contrast at that place has faded is reported as the lesion being absent.
Sizes are a measurement aid for the reader, not a diagnosis. Arrays are (z, y, x) as in
``Volume``; the axial plane is the (i, j) index plane.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError
from scipy.spatial.distance import pdist

from .volume import Volume

RING_MM = (3.0, 8.0)  # the surroundings: a ring this far outside the segment
MIN_CONTRAST_RATIO = 0.4  # follow-up contrast below this fraction of the baseline's: lesion absent


@dataclass(frozen=True)
class LesionSize:
    """Volume (mL) and longest axial diameter (mm) of a segment."""

    volume_ml: float
    longest_axial_mm: float

    def to_dict(self) -> dict:
        return {"volume_ml": round(self.volume_ml, 4), "longest_axial_mm": round(self.longest_axial_mm, 2)}


@dataclass(frozen=True, eq=False)
class FollowupSegment:
    """The lesion looked for on the follow-up.

    ``mask``: 0/1 Volume on a crop of the follow-up lattice (None when absent or outside);
    ``contrast_ratio``: follow-up contrast / baseline contrast at the lesion's place;
    ``present``: whether the contrast is still there; ``reason``: why not, else None;
    ``partial_volume_ml``: the lesion's volume counting partial voxels across slices (each by
    its value between the surroundings' and the lesion's median).
    """

    mask: Optional[Volume]
    contrast_ratio: float
    present: bool
    reason: Optional[str]
    partial_volume_ml: Optional[float] = None


def measure(mask: Volume, volume_ml: Optional[float] = None) -> LesionSize:
    """Volume and longest axial diameter of the voxels above 0.5.

    Args:
        mask: 0/1 Volume (any lattice).
        volume_ml: the volume when known better than by counting voxels (partial voxels).
    Returns:
        LesionSize; zeros for an empty mask. The diameter is measured between voxel centres
        plus one in-plane voxel (edge to edge).
    """
    inside = mask.array > 0.5
    n = int(np.count_nonzero(inside))
    if n == 0:
        return LesionSize(0.0, 0.0)
    sx, sy, _ = mask.spacing
    best = 0.0
    for k in np.unique(np.nonzero(inside)[0]):
        jj, ii = np.nonzero(inside[k])
        pts = np.column_stack([ii * sx, jj * sy]).astype(np.float64)
        if len(pts) > 64:
            try:
                pts = pts[ConvexHull(pts).vertices]
            except QhullError:  # collinear voxels: all points are candidates
                pass
        if len(pts) > 1:
            best = max(best, float(pdist(pts).max()))
    count_ml = n * float(np.prod(mask.spacing)) / 1000.0
    return LesionSize(count_ml if volume_ml is None else float(volume_ml), best + 0.5 * (sx + sy))


def crop(volume: Volume, lo_kji, hi_kji) -> Volume:
    """The box [lo, hi) (z, y, x indices, clipped) of ``volume`` with its geometry."""
    lo = np.maximum(np.asarray(lo_kji, int), 0)
    hi = np.minimum(np.asarray(hi_kji, int), volume.array.shape)
    arr = volume.array[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
    origin = volume.index_to_lps(lo[::-1].astype(np.float64))
    return Volume(arr, volume.spacing, tuple(origin), volume.direction, volume.modality, volume.name)


def mask_box(mask: Volume, margin_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """(lo, hi) z, y, x indices of the mask's bounding box grown by ``margin_mm``."""
    zyx = np.argwhere(mask.array > 0.5)
    pad = np.ceil(margin_mm / np.asarray(mask.spacing)[::-1]).astype(int)
    return zyx.min(0) - pad, zyx.max(0) + 1 + pad


def _on_lattice(values: Volume, grid: Volume) -> np.ndarray:
    """``values`` resampled (linear) onto ``grid``'s lattice, (z, y, x)."""
    out = sitk.Resample(values.to_sitk(), grid.to_sitk(), sitk.Transform(), sitk.sitkLinear,
                        float(values.array.min()), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def _contrast(image: np.ndarray, inside: np.ndarray, spacing_zyx) -> tuple[float, float]:
    """(median inside, median of the ring RING_MM outside) of ``image``."""
    dist = ndimage.distance_transform_edt(~inside, sampling=spacing_zyx)
    ring = (dist >= RING_MM[0]) & (dist <= RING_MM[1])
    return float(np.median(image[inside])), float(np.median(image[ring])) if ring.any() else float("nan")


def resegment(baseline: Volume, base_mask: Volume, followup: Volume, region: Optional[Volume],
              margin_mm: Optional[float] = None) -> FollowupSegment:
    """The lesion of ``base_mask`` on the follow-up, where its propagated ``region`` says.

    The baseline lesion's polarity and contrast are its median against a ring RING_MM outside;
    on the follow-up the same is measured with the deep half of ``region`` as the inside.
    Contrast below MIN_CONTRAST_RATIO of the baseline's means the lesion is absent there.
    Otherwise the follow-up segment is the voxels within ``region`` grown by ``margin_mm`` (default max(6 mm, half the lesion's
    equivalent radius)), connected to the deep half of ``region``, whose value is nearer the
    lesion's follow-up median than the surroundings' (on either side of it).

    Args:
        baseline: the baseline scan; base_mask: the lesion's 0/1 mask (any lattice).
        followup: the follow-up scan; region: the propagated segment on a crop of its lattice.
    Returns:
        FollowupSegment.
    """
    if region is None or not np.any(region.array > 0.5):
        return FollowupSegment(None, 0.0, False, "the propagated lesion falls outside the follow-up")
    base_crop = crop(base_mask, *mask_box(base_mask, RING_MM[1] + 2))
    inside_b = base_crop.array > 0.5
    lesion_b, ring_b = _contrast(_on_lattice(baseline, base_crop), inside_b, np.asarray(base_crop.spacing)[::-1])
    contrast_b = lesion_b - ring_b
    if not np.isfinite(contrast_b) or abs(contrast_b) < 1e-3:
        return FollowupSegment(None, 0.0, False, "the baseline lesion has no contrast against its surroundings")
    sign = 1.0 if contrast_b > 0 else -1.0
    r_eq = (3.0 * inside_b.sum() * np.prod(base_crop.spacing) / (4 * np.pi)) ** (1 / 3)
    margin = max(6.0, 0.5 * r_eq) if margin_mm is None else float(margin_mm)

    # the follow-up crop around the region, with room for growth and the ring
    first = np.rint(followup.lps_to_index(region.origin)).astype(int)[::-1]
    pad = np.ceil((margin + RING_MM[1] + 2) / np.asarray(followup.spacing)[::-1]).astype(int)
    lo = np.maximum(first - pad, 0)
    hi = np.minimum(first + np.asarray(region.array.shape) + pad, followup.array.shape)
    f_crop = crop(followup, lo, hi)
    sp = np.asarray(f_crop.spacing)[::-1]
    reg = np.zeros(f_crop.array.shape, bool)
    o = first - lo
    z, y, x = region.array.shape
    reg[o[0]:o[0] + z, o[1]:o[1] + y, o[2]:o[2] + x] = region.array > 0.5
    image = ndimage.gaussian_filter(f_crop.array.astype(np.float32), sigma=0.6 / sp)  # noise, not edges
    depth = ndimage.distance_transform_edt(reg, sampling=sp)
    core = depth >= 0.5 * depth.max()
    lesion_f, ring_f = _contrast(image, reg, sp)
    lesion_f = float(np.median(image[core]))
    ratio = float(sign * (lesion_f - ring_f) / abs(contrast_b)) if np.isfinite(ring_f) else 0.0
    if ratio < MIN_CONTRAST_RATIO:
        return FollowupSegment(None, ratio, False,
                               f"no lesion at the matched place: its contrast is {100 * ratio:.0f}% of the "
                               f"baseline's (below {100 * MIN_CONTRAST_RATIO:.0f}%)")
    zone = ndimage.distance_transform_edt(~reg, sampling=sp) <= margin
    # the lesion's band: nearer the lesion's value than the surroundings', on either side of it
    # (a darker lesion must not spread into fat that is darker still)
    beyond = (np.abs(image - lesion_f) < 0.5 * abs(lesion_f - ring_f)) & zone
    labels, _ = ndimage.label(beyond)
    keep = np.unique(labels[core & beyond])
    seg = np.isin(labels, keep[keep > 0])
    if not seg.any():
        return FollowupSegment(None, ratio, False, "no voxel of the lesion's contrast at the matched place")
    mask = f_crop.with_array(seg.astype(np.float32), name="followup lesion")
    # partial volume across slices (thick slices cut lesions mid-voxel): the segment's first and
    # last voxel along z count by their value between the two medians, the voxels just beyond
    # them too; in-plane the midpoint threshold already splits partial voxels fairly
    fraction = np.clip(sign * (image - ring_f) / (sign * (lesion_f - ring_f)), 0.0, 1.0)
    along_z = np.zeros((3, 1, 1), bool)
    along_z[:, 0, 0] = True
    beyond_z = ndimage.binary_dilation(seg, structure=along_z) & ~seg & zone
    ends_z = seg & ~ndimage.binary_erosion(seg, structure=along_z, border_value=1)
    voxels = seg.sum() + fraction[beyond_z].sum() - (1.0 - fraction[ends_z]).sum()
    volume_ml = float(voxels * np.prod(f_crop.spacing) / 1000.0)
    return FollowupSegment(mask, ratio, True, None, volume_ml)
