"""Label overlap of a registration: the moving label map warped onto the fixed grid (nearest
neighbour, through the complete transform) and Dice per label the two maps share.

Dice is reported twice: over the whole fixed grid, and inside the moving image's field of view
as the transform maps it (``fov``): when one scan covers a thinner slab than the other, a label
cut off by the field of view cannot overlap whatever the registration does, and the ``fov``
figure shows the alignment itself. Label maps are read with SimpleITK (NIfTI / NRRD, including a
Slicer segmentation exported as a labelmap .seg.nrrd with one layer).
"""
from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from ..volume import Volume

WARPED_LABELS_FILE = "moving_labels_warped.nii.gz"


def load_labels(path, role: str) -> sitk.Image:
    """A 3D integer label map; InputError (one line) when it cannot be one."""
    try:
        img = sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise InputError(f"{role} labels {path}: cannot be read ({str(exc).strip().splitlines()[-1]})") from None
    if img.GetDimension() != 3:
        raise InputError(f"{role} labels {path}: a 3D label map is needed, got {img.GetDimension()}D")
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{role} labels {path}: one label per voxel is needed (a segmentation with overlapping "
                         "layers: export it as a labelmap first)")
    arr = sitk.GetArrayViewFromImage(img)
    if not np.issubdtype(arr.dtype, np.integer) and not np.all(np.mod(arr, 1) == 0):
        raise InputError(f"{role} labels {path}: values are not integer labels")
    return sitk.Cast(img, sitk.sitkInt32)


def warp_labels(moving_labels: sitk.Image, fixed: Volume, transform: sitk.Transform) -> sitk.Image:
    """Moving labels on the fixed grid through ``transform`` (fixed -> moving), nearest neighbour."""
    return sitk.Resample(moving_labels, fixed.to_sitk(), transform, sitk.sitkNearestNeighbor, 0, sitk.sitkInt32)


def moving_fov_mask(moving: Volume, fixed: Volume, transform: sitk.Transform) -> np.ndarray:
    """(z, y, x) bool on the fixed grid: fixed voxels the transform maps inside the moving image."""
    ones = sitk.Image(moving.to_sitk().GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving.to_sitk())
    return sitk.GetArrayFromImage(sitk.Resample(ones, fixed.to_sitk(), transform, sitk.sitkNearestNeighbor, 0)) > 0


def dice_table(fixed_labels: np.ndarray, warped_labels: np.ndarray, region: np.ndarray | None = None,
               labels=None) -> dict:
    """Dice per label present in both maps (or ``labels``), and their mean; inside ``region`` if given."""
    f, w = np.asarray(fixed_labels), np.asarray(warped_labels)
    if region is not None:
        f, w = f[region], w[region]
    if labels is None:
        labels = sorted(set(np.unique(fixed_labels).tolist()) & set(np.unique(warped_labels).tolist()) - {0})
    out = {}
    for lab in labels:
        a, b = f == lab, w == lab
        s = int(a.sum()) + int(b.sum())
        out[str(int(lab))] = round(2.0 * int((a & b).sum()) / s, 4) if s else None
    vals = [v for v in out.values() if v is not None]
    return {"per_label": out, "mean": round(float(np.mean(vals)), 4) if vals else None, "labels": len(vals)}


def label_report(fixed_labels: sitk.Image, moving_labels: sitk.Image, fixed: Volume, moving: Volume,
                 transform: sitk.Transform) -> tuple[dict, sitk.Image]:
    """(report entry, warped moving labels) for a fixed -> moving ``transform``.

    The shared labels are those present in the fixed map and in the moving map (before warping).
    """
    fixed_on_grid = sitk.Resample(fixed_labels, fixed.to_sitk(), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                  sitk.sitkInt32)
    warped = warp_labels(moving_labels, fixed, transform)
    fa, wa = sitk.GetArrayFromImage(fixed_on_grid), sitk.GetArrayFromImage(warped)
    shared = sorted(set(np.unique(fa).tolist()) & set(np.unique(sitk.GetArrayViewFromImage(moving_labels)).tolist())
                    - {0})
    if not shared:
        raise InputError("the fixed and moving label maps share no label value")
    fov = moving_fov_mask(moving, fixed, transform)
    report = {"shared_labels": shared, "dice": dice_table(fa, wa, None, shared),
              "dice_in_moving_fov": dice_table(fa, wa, fov, shared),
              "note": "Dice on the fixed grid; 'dice_in_moving_fov' counts only fixed voxels mapped inside the "
                      "moving image"}
    return report, warped

