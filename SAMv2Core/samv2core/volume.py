"""The typed 3D volume every other part of the package works on, and loading it from disk.

Geometry follows ITK exactly: ``physical = origin + direction @ (spacing * index)``, with
``index = (i, j, k)`` in (x, y, z) order, ``direction`` a 3x3 matrix whose columns are the
index axes expressed in LPS, and all physical coordinates in LPS millimetres. The voxel
array is stored (k, j, i) = (z, y, x), as SimpleITK's ``GetArrayFromImage`` returns it.
"""
from __future__ import annotations

import enum
import hashlib
import json
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import InputError
from .image_files import check_complete, check_regular_file, itk_path, itk_reason, read_header


class Modality(str, enum.Enum):
    """The imaging modality of a volume: it picks intensity normalisation (CT in Hounsfield
    units, MR by percentiles) and the registration similarity term."""

    CT = "CT"
    MR = "MR"

    @classmethod
    def parse(cls, value: "str | Modality") -> "Modality":
        """The modality named by ``value``.

        Args:
            value: a Modality, or 'CT', 'MR' or 'MRI' (any case, surrounding spaces ignored).

        Returns:
            The Modality.

        Raises:
            InputError: for any other name (including 'auto', which only loading resolves).
        """
        if isinstance(value, Modality):
            return value
        key = str(value).strip().upper()
        aliases = {"CT": cls.CT, "MR": cls.MR, "MRI": cls.MR}
        if key not in aliases:
            raise InputError(f"unknown modality {value!r}: use 'CT' or 'MR' (or 'auto' when loading)")
        return aliases[key]


@dataclass(frozen=True, eq=False)
class Volume:
    """A scalar 3D image with its full ITK geometry. Immutable: the array is a read-only copy.

    ``physical = origin + direction @ (spacing * (i, j, k))`` in LPS millimetres, for the voxel
    at ``array[k, j, i]``.

    Args:
        array: voxel values, shape (z, y, x); stored as a read-only float32 copy.
        spacing: voxel size along the index axes (i, j, k) = (x, y, z), mm, positive.
        origin: LPS position of the centre of voxel (0, 0, 0), mm.
        direction: 3x3 orthonormal matrix whose columns are the index axes (i, j, k) in LPS.
        modality: CT or MR (a Modality or its name).
        name: a label used in messages and output names.
        meta: free-form extras (e.g. ``meta["source"]``, the path it was loaded from).

    Raises:
        InputError: for a non-3D or empty array, a non-positive spacing or a direction
            matrix that is not orthonormal.
    """

    array: np.ndarray  # (z, y, x) float32
    spacing: tuple[float, float, float]  # (x, y, z) mm
    origin: tuple[float, float, float]  # LPS mm of voxel (0, 0, 0)
    direction: np.ndarray  # 3x3, columns = index axes in LPS
    modality: Modality = Modality.CT
    name: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        arr = np.array(self.array, dtype=np.float32, copy=True)
        arr.setflags(write=False)
        d = np.array(self.direction, dtype=np.float64, copy=True).reshape(3, 3)
        d.setflags(write=False)
        object.__setattr__(self, "array", arr)
        object.__setattr__(self, "direction", d)
        object.__setattr__(self, "spacing", tuple(float(s) for s in self.spacing))
        object.__setattr__(self, "origin", tuple(float(o) for o in self.origin))
        object.__setattr__(self, "modality", Modality.parse(self.modality))
        validate_geometry(arr.shape, self.spacing, d, self.name)

    @cached_property
    def content_key(self) -> str:
        """SHA-1 of the voxels, geometry and modality (computed once: the volume is immutable)."""
        h = hashlib.sha1()
        h.update(np.ascontiguousarray(self.array).tobytes())
        h.update(json.dumps([self.spacing, self.origin, self.direction.round(9).tolist(),
                             self.modality.value]).encode())
        return h.hexdigest()

    # --- geometry -------------------------------------------------------------------
    @property
    def size_xyz(self) -> tuple[int, int, int]:
        """Number of voxels along (i, j, k) = (x, y, z): ``array.shape`` reversed."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def index_to_lps_matrix(self) -> np.ndarray:
        """4x4 homogeneous matrix mapping (i, j, k, 1) to (L, P, S, 1)."""
        m = np.eye(4)
        m[:3, :3] = self.direction @ np.diag(self.spacing)
        m[:3, 3] = self.origin
        return m

    def index_to_lps(self, ijk) -> np.ndarray:
        """Physical positions of (continuous) voxel indices.

        Args:
            ijk: indices in (i, j, k) = (x, y, z) order, shape (3,) or (..., 3).

        Returns:
            LPS mm, float64, the same shape as ``ijk``.
        """
        ijk = np.asarray(ijk, dtype=np.float64)
        return ijk @ (self.direction @ np.diag(self.spacing)).T + np.asarray(self.origin)

    def lps_to_index(self, lps) -> np.ndarray:
        """Continuous voxel indices of physical positions (the inverse of :meth:`index_to_lps`).

        Args:
            lps: LPS mm, shape (3,) or (..., 3).

        Returns:
            Indices in (i, j, k) = (x, y, z) order, float64, the same shape as ``lps``.
        """
        lps = np.asarray(lps, dtype=np.float64)
        inv = np.linalg.inv(self.direction @ np.diag(self.spacing))
        return (lps - np.asarray(self.origin)) @ inv.T

    def contains_lps(self, lps, tolerance_voxels: float = 0.5) -> np.ndarray:
        """Which points lie inside the image's voxel extent.

        Args:
            lps: LPS mm, shape (3,) or (..., 3).
            tolerance_voxels: slack beyond the outer voxel centres, in voxels (0.5 = the
                voxels' outer faces; negative values demand a margin inside).

        Returns:
            bool, shape ``lps.shape[:-1]`` (a 0-d array for one point).
        """
        ijk = self.lps_to_index(lps)
        size = np.asarray(self.size_xyz, dtype=np.float64)
        return np.all((ijk >= -tolerance_voxels) & (ijk <= size - 1 + tolerance_voxels), axis=-1)

    def corners_lps(self) -> np.ndarray:
        """The centres of the 8 corner voxels.

        Returns:
            LPS mm, float64, shape (8, 3).
        """
        size = np.asarray(self.size_xyz) - 1
        corners = np.array([[a, b, c] for a in (0, size[0]) for b in (0, size[1]) for c in (0, size[2])], float)
        return self.index_to_lps(corners)

    # --- conversion -----------------------------------------------------------------
    def to_sitk(self) -> sitk.Image:
        """This volume as a SimpleITK image.

        Returns:
            A float32 ``sitk.Image`` with the same voxels, spacing, origin and direction (LPS).
        """
        img = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(self.direction.ravel()))
        return img

    @classmethod
    def from_sitk(cls, image: sitk.Image, modality: "str | Modality" = "auto", name: str = "") -> "Volume":
        """A Volume from a 3D scalar SimpleITK image (its geometry is taken as it is, in LPS).

        Args:
            image: a 3D image with one component per voxel.
            modality: 'CT', 'MR' or 'auto' (guessed from the intensities: CT when the 1st
                percentile is below -500).
            name: the volume's label.

        Returns:
            The Volume; its array is (z, y, x) float32.

        Raises:
            InputError: for a non-3D or a vector (e.g. RGB) image, or an unknown modality.
        """
        if image.GetDimension() != 3:
            raise InputError(f"{name or 'image'}: expected a 3D image, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(
                f"{name or 'image'}: expected a scalar image, got {image.GetNumberOfComponentsPerPixel()} "
                "components per voxel (RGB or vector images are not supported)")
        arr = sitk.GetArrayFromImage(image)
        check_float32_range(arr, name)
        mod = guess_modality(arr) if str(modality).lower() == "auto" else Modality.parse(modality)
        return cls(arr, image.GetSpacing(), image.GetOrigin(),
                   np.array(image.GetDirection()).reshape(3, 3), mod, name)

    def with_array(self, array: np.ndarray, name: str | None = None) -> "Volume":
        """A new volume on the same grid with other voxel values.

        Args:
            array: the new voxel values, shape (z, y, x) equal to ``self.array.shape``.
            name: the new volume's label (default: this one's).

        Returns:
            A Volume with this one's geometry, modality and a copy of its meta.

        Raises:
            InputError: when the shape differs.
        """
        if tuple(array.shape) != self.array.shape:
            raise InputError(f"array shape {array.shape} does not match the volume grid {self.array.shape}")
        return Volume(array, self.spacing, self.origin, self.direction, self.modality,
                      self.name if name is None else name, dict(self.meta))

    def validated(self) -> "Volume":
        """This volume, after checking its voxel values are usable.

        Returns:
            ``self``.

        Raises:
            InputError: when a voxel is NaN or infinite, or all voxels are equal.
        """
        validate_intensities(self.array, self.name)
        return self


def validate_geometry(shape, spacing, direction: np.ndarray, name: str = "") -> None:
    label = name or "volume"
    if len(shape) != 3:
        raise InputError(f"{label}: expected a 3D volume, got {len(shape)} dimensions (shape {tuple(shape)})")
    if min(shape) < 1 or int(np.prod(shape)) == 0:
        raise InputError(f"{label}: the volume is empty (shape {tuple(shape)})")
    if any((not np.isfinite(s)) or s <= 0 for s in spacing):
        raise InputError(f"{label}: spacing must be positive and finite, got {spacing}")
    if not np.all(np.isfinite(direction)) or np.abs(direction.T @ direction - np.eye(3)).max() > 1e-3:
        # a sheared or scaled matrix can still have determinant 1: check every column pair
        raise InputError(f"{label}: direction matrix is not orthonormal (sheared or scaled axes): "
                         f"{np.round(direction, 6).tolist()}")


def validate_intensities(array: np.ndarray, name: str = "") -> None:
    label = name or "volume"
    if not np.all(np.isfinite(array)):
        bad = int(np.count_nonzero(~np.isfinite(array)))
        raise InputError(f"{label}: contains {bad} NaN/Inf voxels")
    if array.size == 0 or float(array.max()) == float(array.min()):
        raise InputError(f"{label}: the image is constant (every voxel = {float(array.flat[0]) if array.size else 'n/a'})")


def check_float32_range(array: np.ndarray, name: str = "") -> None:
    """Refuse finite values float32 (the precision everything runs in) cannot hold: they
    would turn into Inf and be misreported as NaN/Inf voxels."""
    if np.iscomplexobj(array):
        raise InputError(f"{name or 'image'}: complex-valued voxels are not supported (convert to magnitude first)")
    if array.dtype.kind not in "fiu" or array.dtype.itemsize <= 4:
        return
    limit = float(np.finfo(np.float32).max)
    big = np.isfinite(array) & (np.abs(array) > limit)
    if big.any():
        raise InputError(f"{name or 'image'}: {int(big.sum())} voxels hold finite values beyond the float32 range "
                         f"(largest magnitude {float(np.abs(array[big]).max()):.3g}; float32 holds up to 3.4e38): "
                         "rescale the image first")


def guess_modality(array: np.ndarray) -> Modality:
    """CT when a large share of voxels look like Hounsfield air/soft tissue, else MR."""
    sample = array.ravel()[:: max(1, array.size // 200000)]
    lo = float(np.percentile(sample, 1))
    return Modality.CT if lo < -500 else Modality.MR


def _series_files(folder: Path, series: "tuple[str, ...]") -> list[str]:
    """The files of the DICOM series to read from ``folder``: its only series, or the one
    whose UID is in ``series``; several series and no choice is refused (never guessed)."""
    for entry in os.scandir(folder):  # GDCM opens every file it finds: a pipe would block it
        if not (entry.is_file() or entry.is_dir()):
            raise InputError(f"{folder / entry.name}: is not a regular file (a pipe or device) inside the DICOM "
                             "folder; remove it")
    reader = sitk.ImageSeriesReader()
    ids = list(reader.GetGDCMSeriesIDs(str(folder)))
    if not ids:
        raise InputError(f"{folder}: no DICOM series found in this folder")
    chosen = [sid for sid in ids if sid in set(series)]
    if len(ids) > 1 and len(chosen) != 1:
        listing = ", ".join(f"{sid} ({len(reader.GetGDCMSeriesFileNames(str(folder), sid))} files)" for sid in ids)
        raise InputError(f"{folder}: holds {len(ids)} DICOM series ({listing}); choose one with --series UID")
    return list(reader.GetGDCMSeriesFileNames(str(folder), chosen[0] if chosen else ids[0]))


def dicom_series(folder: "str | os.PathLike") -> list[tuple[str, int]]:
    """(series UID, number of files) of every DICOM series in ``folder``."""
    reader = sitk.ImageSeriesReader()
    with itk_path(folder) as name:
        return [(sid, len(reader.GetGDCMSeriesFileNames(name, sid))) for sid in reader.GetGDCMSeriesIDs(name)]


def _read_dicom_series(folder: Path, series: "tuple[str, ...]", label: str) -> tuple[sitk.Image, str | None]:
    files = _series_files(folder, series)
    read_header(files[0], files_bytes=sum(os.stat(f).st_size for f in files), slices=len(files), label=label)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    reader.LoadPrivateTagsOn()
    image = reader.Execute()
    modality = None
    try:
        modality = reader.GetMetaData(0, "0008|0060").strip() or None
    except RuntimeError:
        pass
    return image, modality


def load_volume(path: "str | os.PathLike", modality: "str | Modality" = "auto",
                series: "tuple[str, ...] | list[str] | None" = None) -> Volume:
    """Load an image file (NIfTI, NRRD, MHA, any SimpleITK format) or a DICOM series folder.

    The geometry is kept exactly as stored (spacing, origin, full direction matrix), in LPS;
    a 4D file with one time point is read as 3D. Only a regular file (or a folder) is opened,
    and its header is checked before any voxel is read (pixel type, size, declared vs stored
    bytes). A folder holding several DICOM series is refused unless ``series`` names one.

    Args:
        path: the file, or the folder of a DICOM series.
        modality: 'CT', 'MR' or 'auto' (the DICOM Modality tag, else guessed from the
            intensities).
        series: series UIDs to choose from when a DICOM folder holds several.

    Returns:
        The Volume, with ``meta["source"]`` set to ``path`` and ``name`` the file name
        without its extensions.

    Raises:
        InputError: naming the problem, for a missing, non-regular (pipe, device), incomplete
            or unreadable file, complex or vector voxels, fewer than 4 voxels along an axis, a
            header declaring more data than the file holds, several DICOM series and no
            choice, a non-3D image, a bad geometry, values beyond float32, NaN voxels or a
            constant image.
    """
    p = Path(path)
    check_regular_file(p, "image", folder_ok=True)
    dicom_modality = None
    try:
        if p.is_dir():
            with itk_path(p) as name:
                image, dicom_modality = _read_dicom_series(Path(name), tuple(series or ()), str(p))
        else:
            check_complete(p)
            read_header(p)
            with itk_path(p) as name:
                image = sitk.ReadImage(name)
    except RuntimeError as exc:
        raise InputError(f"{p}: cannot read as an image ({itk_reason(exc)})") from None
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if str(modality).lower() == "auto" and dicom_modality in ("CT", "MR"):
        modality = dicom_modality
    name = p.name.split(".")[0] if p.is_file() else p.name
    vol = Volume.from_sitk(image, modality, name=name)
    vol.meta["source"] = str(p)
    return vol.validated()
