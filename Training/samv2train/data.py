"""Training data: every volume resampled once to the model grid, normalised and kept in memory.

Resampling a whole CT costs seconds; a training iteration must cost less, so each volume is
prepared once (canonical LPS grid at ``spacing_mm`` + network intensity range) and patches
are then cut from the cached tensor. Label maps must be on their image's grid (checked) and
are resampled with nearest neighbour onto the same model grid.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from samv2core.errors import InputError
from samv2core.grid import Grid
from samv2core.preprocess import body_mask, model_grid_for, normalize_intensity, resample_to_model_grid
from samv2core.volume import Modality, Volume, load_volume

from .config import DataSection

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


@dataclass
class TrainVolume:
    """One volume on the model grid: normalised intensities, body mask and optional labels."""

    name: str
    source: str
    modality: Modality
    image: torch.Tensor  # (Z, Y, X) float32, network intensity range
    body: torch.Tensor  # (Z, Y, X) bool
    origin: np.ndarray  # LPS of voxel (0,0,0); direction is identity on the model grid
    spacing_mm: float
    labels: "torch.Tensor | None" = None  # (Z, Y, X) int64, 0 = unlabelled
    label_set: str = ""
    weight: float = 1.0
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)

    @property
    def grid(self) -> Grid:
        """The model grid the tensors live on (identity direction)."""
        s = float(self.spacing_mm)
        return Grid(tuple(float(v) for v in self.origin), (s, s, s), self.shape)

    def voxel_to_lps(self, zyx: np.ndarray) -> np.ndarray:
        """Voxel coordinates (N, 3) in (z, y, x) order -> LPS (N, 3)."""
        return self.grid.index_to_lps(np.asarray(zyx, float)[:, ::-1])

    def lps_to_voxel(self, lps: np.ndarray) -> np.ndarray:
        """LPS (N, 3) -> voxel coordinates (N, 3) in (z, y, x) order."""
        return self.grid.lps_to_index(lps)[:, ::-1]

    def classes(self) -> list[int]:
        if self.labels is None:
            return []
        return [int(c) for c in torch.unique(self.labels).tolist() if c != 0]


def same_grid(a: sitk.Image, b: sitk.Image, tol: float = 1e-3) -> bool:
    """True when two images share size, spacing, origin and direction (within ``tol``)."""
    return (a.GetSize() == b.GetSize()
            and np.allclose(a.GetSpacing(), b.GetSpacing(), atol=tol, rtol=tol)
            and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=max(tol, 1e-2))
            and np.allclose(a.GetDirection(), b.GetDirection(), atol=tol))


def load_label_map(path: str, image: Volume) -> sitk.Image:
    """Read a label map and check it lies on ``image``'s grid; raises InputError if not."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: label map not found")
    try:
        lab = sitk.ReadImage(str(p))
    except RuntimeError:
        raise InputError(f"{p}: cannot read as a label map") from None
    if lab.GetDimension() != 3 or lab.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{p}: a label map must be a scalar 3D image")
    ref = image.to_sitk()
    if not same_grid(lab, ref):
        raise InputError(
            f"{p}: label map grid (size {lab.GetSize()}, spacing {tuple(round(s, 3) for s in lab.GetSpacing())}, "
            f"origin {tuple(round(o, 2) for o in lab.GetOrigin())}) does not match its image "
            f"{image.name} (size {ref.GetSize()}, spacing {tuple(round(s, 3) for s in ref.GetSpacing())}, "
            f"origin {tuple(round(o, 2) for o in ref.GetOrigin())})")
    arr = sitk.GetArrayViewFromImage(lab)
    if np.issubdtype(arr.dtype, np.floating) and not np.all(np.equal(np.mod(arr, 1), 0)):
        raise InputError(f"{p}: label map has non-integer values")
    if arr.min() < 0:
        raise InputError(f"{p}: label map has negative labels")
    return lab


def prepare_volume(volume: Volume, spacing_mm: float, labels: "sitk.Image | None" = None,
                   label_set: str = "") -> TrainVolume:
    """Resample a Volume (and its labels) to the model grid and normalise; returns a TrainVolume."""
    res = resample_to_model_grid(volume, spacing_mm)
    img = normalize_intensity(res.array, volume.modality)
    body = body_mask(res)
    lab_t = None
    if labels is not None:
        origin, size = model_grid_for(volume, spacing_mm)
        lab = sitk.Resample(labels, size, sitk.Transform(), sitk.sitkNearestNeighbor, tuple(origin),
                            (spacing_mm,) * 3, (1, 0, 0, 0, 1, 0, 0, 0, 1), 0, sitk.sitkInt32)
        lab_t = torch.from_numpy(sitk.GetArrayFromImage(lab).astype(np.int64))
        if tuple(lab_t.shape) != res.array.shape:
            raise InputError(f"{volume.name}: internal error, resampled labels {tuple(lab_t.shape)} "
                             f"!= image {res.array.shape}")
    return TrainVolume(
        name=volume.name, source=str(volume.meta.get("source", volume.name)), modality=volume.modality,
        image=torch.from_numpy(np.ascontiguousarray(img)), body=torch.from_numpy(np.ascontiguousarray(body)),
        origin=np.asarray(res.origin, float), spacing_mm=float(spacing_mm), labels=lab_t,
        label_set=label_set or (str(Path(volume.meta.get("source", volume.name))) + "#labels"))


def _is_image_file(p: Path) -> bool:
    n = p.name.lower()
    return p.is_file() and any(n.endswith(s) for s in IMAGE_SUFFIXES)


def _looks_like_dicom_dir(p: Path) -> bool:
    return p.is_dir() and any(f.suffix.lower() in (".dcm", "") and f.is_file() for f in list(p.iterdir())[:20])


def list_entries(data: DataSection) -> list[dict]:
    """Expand data.volumes + data.folders into volume entries, minus data.exclude.

    Folder contents: image files (NIfTI/NRRD/MHA) and DICOM series sub-folders; other files
    are ignored, but a listed image that cannot be read raises InputError later (load).
    """
    entries = [dict(v) for v in data.volumes]
    for folder in data.folders:
        f = Path(folder)
        if not f.is_dir():
            raise InputError(f"{f}: data folder not found")
        found = 0
        for p in sorted(f.iterdir()):
            if _is_image_file(p) or _looks_like_dicom_dir(p):
                entries.append({"path": str(p), "modality": data.folder_modality, "labels": "", "label_set": "",
                                "weight": 1.0})
                found += 1
        if not found:
            raise InputError(f"{f}: no image files (.nii/.nii.gz/.nrrd/.mha or DICOM folders) in this data folder")
    excluded = {str(Path(e).resolve()) for e in data.exclude}
    kept = [e for e in entries if str(Path(e["path"]).resolve()) not in excluded]
    if not kept:
        raise InputError("data: every listed volume is excluded; nothing to train on")
    return kept


def load_entry(entry: dict, spacing_mm: float) -> TrainVolume:
    """Load one volume entry (image + optional label map) onto the model grid."""
    vol = load_volume(entry["path"], entry.get("modality") or "auto")
    if min(vol.array.shape) < 2:
        raise InputError(f"{entry['path']}: a training volume needs at least 2 voxels along every axis, "
                         f"got shape {vol.array.shape}")
    labels = load_label_map(entry["labels"], vol) if entry.get("labels") else None
    tv = prepare_volume(vol, spacing_mm, labels, entry.get("label_set", ""))
    tv.weight = float(entry.get("weight", 1.0))
    return tv


def load_dataset(data: DataSection, log=print) -> list[TrainVolume]:
    """Load and cache every training volume; all problems are reported before training starts."""
    entries = list_entries(data)
    out = []
    for e in entries:
        tv = load_entry(e, data.spacing_mm)
        log(f"  loaded {tv.name:<32s} {tv.modality.value} grid {tv.shape} (z,y,x) @ {data.spacing_mm} mm"
            + (f", {len(tv.classes())} label classes" if tv.labels is not None else ""))
        out.append(tv)
    return out


def shared_data_dir() -> Path:
    """../shared/data next to the repository (or $SAMV2_SHARED_DATA)."""
    env = os.environ.get("SAMV2_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"
