"""MRML node <-> samv2core conversions (volumes, point lists, transforms, segments).

Slicer's world coordinates are RAS; samv2core works in LPS. The two differ by the sign of
x and y, so a 4x4 matrix converts as ``M_ras = F @ M_lps @ F`` with ``F = diag(-1, -1, 1, 1)``.

Transforms: a samv2core / SimpleITK registration transform maps FIXED points to MOVING
points (the ITK resampling convention). A Slicer transform node that places the moving
volume onto the fixed one holds exactly that mapping as its "from parent" transform
(world = fixed space -> node's children = moving space); Slicer's own ITK transform
reader stores ITK files the same way. So results go in with ``Set...FromParent``.

Only vtk, numpy and SimpleITK are used here, and only MRML classes that the Qt-free
``slicer-core`` package provides, so everything is testable outside the application.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

import slicer
from samv2core.coords import lps_to_ras, ras_to_lps
from samv2core.errors import InputError
from samv2core.volume import Modality, Volume, guess_modality

_F4 = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- matrices -------------------------------------------------------------------------
def np_from_vtk_matrix(matrix: vtk.vtkMatrix4x4) -> np.ndarray:
    """4x4 numpy copy of a vtkMatrix4x4."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def vtk_matrix_from_np(array) -> vtk.vtkMatrix4x4:
    """New vtkMatrix4x4 holding a 4x4 numpy array."""
    a = np.asarray(array, dtype=np.float64).reshape(4, 4)
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(a[r, c]))
    return m


def lps_matrix_to_ras(matrix_lps) -> np.ndarray:
    """A 4x4 homogeneous map written for LPS points -> the same map for RAS points."""
    return _F4 @ np.asarray(matrix_lps, dtype=np.float64) @ _F4


# --- volumes --------------------------------------------------------------------------

def _apply_parent_transform(node, ijk_to_ras: np.ndarray) -> np.ndarray:
    """``ijk_to_ras`` composed with the node's parent transform to world (linear only)."""
    parent = node.GetParentTransformNode()
    if parent is None:
        return ijk_to_ras
    if not parent.IsTransformToWorldLinear():
        raise InputError(f"{node.GetName()}: is under a non-linear transform; harden it before use")
    to_world = vtk.vtkMatrix4x4()
    parent.GetMatrixTransformToWorld(to_world)
    return np_from_vtk_matrix(to_world) @ ijk_to_ras

def world_to_local(node, ras) -> np.ndarray:
    """World RAS point(s) (..., 3) -> the node's own RAS space (its parent transforms undone,
    linear or not), where a volume read with ``world=False`` lives."""
    parent = node.GetParentTransformNode()
    return np.asarray(ras, dtype=np.float64) if parent is None else node_from_world_point(parent, ras)


def node_modality(node) -> str:
    """'CT' / 'MR' from the node attribute ``SAMv2.Modality`` or the DICOM series modality that
    Slicer's DICOM plugins store on the node's subject hierarchy item; else 'auto'."""
    values = [node.GetAttribute("SAMv2.Modality")]
    scene = node.GetScene()
    # looked up, not created: reading a volume adds nothing to the scene
    shn = scene.GetFirstNodeByClass("vtkMRMLSubjectHierarchyNode") if scene is not None else None
    if shn is not None:
        item = shn.GetItemByDataNode(node)
        if item:
            name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
            values.append(shn.GetItemAttribute(item, name))
    for value in values:
        if value and value.strip().upper() in ("CT", "MR", "MRI"):
            return "MR" if value.strip().upper() == "MRI" else value.strip().upper()
    return "auto"


def node_ijk_to_ras(node, world: bool = True) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a volume node; with ``world`` the parent transforms are included.

    Raises InputError when the node sits under a non-linear transform (harden it first).
    """
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk_to_ras = np_from_vtk_matrix(m)
    return _apply_parent_transform(node, ijk_to_ras) if world else ijk_to_ras


def _voxels(node):
    """The node's voxel scalars (a view, native type) and its name, after the checks every use
    shares: InputError for a missing node, no voxels, label maps, RGB/vector or 2D volumes."""
    if node is None:
        raise InputError("no volume selected")
    label = node.GetName() or node.GetID() or "volume"
    if not node.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"{label}: is a {node.GetClassName()}, not a scalar volume")
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"{label}: is a label map; select an image volume")
    image = node.GetImageData()
    if image is None or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
        raise InputError(f"{label}: the volume has no voxel data")
    ncomp = image.GetNumberOfScalarComponents()
    if ncomp != 1 or node.IsA("vtkMRMLVectorVolumeNode") or node.IsA("vtkMRMLTensorVolumeNode"):
        raise InputError(f"{label}: has {ncomp} components per voxel; RGB/vector volumes are not supported")
    dims = image.GetDimensions()  # (i, j, k)
    if min(dims) < 2:
        raise InputError(f"{label}: is a 2D image (size {dims[0]}x{dims[1]}x{dims[2]}); a 3D volume is needed")
    scalars = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())
    return scalars.reshape(dims[2], dims[1], dims[0]), label


def _lps_geometry(node, label: str, world: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(spacing, origin, direction) in LPS of a volume node; InputError for sheared geometry."""
    lps = _F4 @ node_ijk_to_ras(node, world)  # index side is not flipped: IJK->LPS = F @ IJK->RAS
    # the node's IJK->RAS holds direction * spacing; split it into the ITK parts
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0) or not np.all(np.isfinite(axes)):
        raise InputError(f"{label}: degenerate IJK-to-RAS matrix")
    direction = axes / spacing
    if abs(abs(np.linalg.det(direction)) - 1.0) > 1e-4 or not np.allclose(direction.T @ direction, np.eye(3), atol=1e-4):
        raise InputError(f"{label}: sheared or scaled geometry (a parent transform?); harden or reset it first")
    return spacing, lps[:3, 3].copy(), direction


def _modality(node, modality) -> str:
    return node_modality(node) if str(modality).lower() == "auto" else Modality.parse(modality).value


def volume_from_node(node, modality: "str | Modality" = "auto", world: bool = True) -> Volume:
    """A new core Volume (LPS geometry, float32 copy of the voxels) from a scalar volume node
    (scripts and tests; the GUI exports files instead, see :func:`export_volume`).

    ``world=True`` places the volume where Slicer shows it (parent linear transforms applied).
    ``modality`` 'auto': the node's own (:func:`node_modality`), else guessed from intensities.
    Raises InputError for a missing node, no voxels, label maps, RGB/vector or 2D volumes.
    """
    voxels, label = _voxels(node)
    spacing, origin, direction = _lps_geometry(node, label, world)
    array = np.array(voxels, dtype=np.float32, copy=True)
    mod = _modality(node, modality)
    vol = Volume(array, tuple(spacing), tuple(origin), direction,
                 guess_modality(array) if mod == "auto" else Modality.parse(mod), label)
    vol.meta["node_id"] = node.GetID()
    return vol


@dataclass(frozen=True)
class VolumeGeometry:
    """Where a volume node's voxels are (LPS), without copying them: what validation needs."""

    name: str
    size_xyz: tuple[int, int, int]
    index_to_lps: np.ndarray  # 4x4

    def contains_lps(self, lps, tolerance_voxels: float = 0.5) -> np.ndarray:
        """True where a point lies inside the voxel extent (half a voxel of slack), as Volume.contains_lps."""
        pts = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
        ijk = (np.linalg.inv(self.index_to_lps) @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
        size = np.asarray(self.size_xyz, dtype=np.float64)
        return np.all((ijk >= -tolerance_voxels) & (ijk <= size - 1 + tolerance_voxels), axis=-1)


def volume_geometry(node, world: bool = True) -> VolumeGeometry:
    """The checked geometry of a volume node (same checks as :func:`volume_from_node`; no voxel copy)."""
    voxels, label = _voxels(node)
    spacing, origin, direction = _lps_geometry(node, label, world)
    m = np.eye(4)
    m[:3, :3] = direction * spacing
    m[:3, 3] = origin
    return VolumeGeometry(label, (voxels.shape[2], voxels.shape[1], voxels.shape[0]), m)


def export_volume(node, path, world: bool = True) -> None:
    """Write a volume node's voxels in their own type (no float copy) with its LPS geometry to
    ``path`` (NRRD, atomically): what the worker reads."""
    from samv2core.outputs import atomic_write  # noqa: PLC0415 - light core module, only when writing

    voxels, label = _voxels(node)
    spacing, origin, direction = _lps_geometry(node, label, world)
    image = sitk.GetImageFromArray(voxels)  # one copy, native voxel type
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetDirection(tuple(float(v) for v in direction.ravel()))
    atomic_write(Path(path), lambda tmp: sitk.WriteImage(image, str(tmp), False))


def volume_ijk_to_ras(volume: Volume) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a core Volume (only the physical side flips: F @ M)."""
    return _F4 @ volume.index_to_lps_matrix


def volume_to_node(volume: Volume, scene, name: "str | None" = None, label_map: bool = False):
    """Add a NEW scalar (or label map) volume node holding ``volume`` to ``scene``; returns it.
    The volume's modality is kept on the node (attribute ``SAMv2.Modality``), so a modality
    chosen when loading (``--modality``) is the one matching and registration use."""
    cls = slicer.vtkMRMLLabelMapVolumeNode if label_map else slicer.vtkMRMLScalarVolumeNode
    node = cls()
    node.SetName(scene.GenerateUniqueName(name or volume.name or "Volume"))
    arr = volume.array.astype(np.uint8 if label_map else np.float32)
    image = vtk.vtkImageData()
    x, y, z = volume.size_xyz
    image.SetDimensions(x, y, z)
    vtk_array = numpy_support.numpy_to_vtk(np.ascontiguousarray(arr).ravel(), deep=True)
    image.GetPointData().SetScalars(vtk_array)
    node.SetAndObserveImageData(image)
    node.SetIJKToRASMatrix(vtk_matrix_from_np(volume_ijk_to_ras(volume)))
    if not label_map:
        node.SetAttribute("SAMv2.Modality", volume.modality.value)
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    return node


# --- point lists ----------------------------------------------------------------------
@dataclass(frozen=True)
class PointSet:
    """Control points read from a point list: labels, RAS and LPS positions (N, 3), indices."""

    labels: tuple[str, ...]
    ras: np.ndarray
    indices: tuple[int, ...]  # control-point index in the source node

    @property
    def lps(self) -> np.ndarray:
        return ras_to_lps(self.ras)

    def __len__(self) -> int:
        return len(self.labels)


def read_points(node, world: bool = True) -> PointSet:
    """Defined control points of a markups node, in world RAS (parent transforms applied)."""
    if node is None:
        raise InputError("no point list selected")
    labels, pts, idx = [], [], []
    defined = getattr(slicer.vtkMRMLMarkupsNode, "PositionDefined", 2)
    for i in range(node.GetNumberOfControlPoints()):
        if hasattr(node, "GetNthControlPointPositionStatus") and node.GetNthControlPointPositionStatus(i) != defined:
            continue  # preview / missing points are not user input
        p = [0.0, 0.0, 0.0]
        if world:
            node.GetNthControlPointPositionWorld(i, p)
        else:
            node.GetNthControlPointPosition(i, p)
        labels.append(node.GetNthControlPointLabel(i) or f"P{i + 1}")
        pts.append(p)
        idx.append(i)
    ras = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
    return PointSet(tuple(labels), ras, tuple(idx))


def new_point_list(scene, name: str, ras, labels, descriptions=None, flagged=None,
                   color=(1.0, 0.6, 0.0), flagged_suffix: str = " (?)"):
    """Add a NEW point list node; ``flagged`` points are unselected and suffixed.

    Unselected control points are drawn in the list's "unselected" colour in Slicer, which
    makes low-confidence matches stand out in the views and in the Markups table. They stay
    movable: they are the points a user will want to drag into place.
    """
    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    if display is not None:
        display.SetSelectedColor(*color)
        display.SetColor(0.6, 0.6, 0.6)  # colour of unselected (= flagged) points
    ras = np.asarray(ras, dtype=np.float64).reshape(-1, 3)
    flagged = [False] * len(ras) if flagged is None else list(flagged)
    for i, p in enumerate(ras):
        label = str(labels[i]) + (flagged_suffix if flagged[i] else "")
        n = node.AddControlPoint(vtk.vtkVector3d(*(float(v) for v in p)), label)
        if descriptions is not None:
            node.SetNthControlPointDescription(n, str(descriptions[i]))
        if flagged[i]:
            node.SetNthControlPointSelected(n, False)
    return node


def _write_with_storage(node, storage, path: str, scene=None) -> None:
    """Write ``node`` to ``path`` with a temporary storage node (removed afterwards)."""
    scene = scene or node.GetScene()
    scene.AddNode(storage)
    try:
        storage.SetFileName(str(path))
        if not storage.WriteData(node):
            raise OSError(f"could not write {path}")
    finally:
        scene.RemoveNode(storage)


def write_point_list(node, path: str, scene=None) -> None:
    """Save a point list as .mrk.json (LPS coordinates in the file, as Slicer writes it)."""
    _write_with_storage(node, slicer.vtkMRMLMarkupsJsonStorageNode(), path, scene)


def read_point_list_file(path: str, scene, name: "str | None" = None):
    """Load a .mrk.json / .fcsv point list file into a NEW markups node."""
    node = slicer.vtkMRMLMarkupsFiducialNode()
    node.SetName(scene.GenerateUniqueName(name or "Points"))
    scene.AddNode(node)
    if str(path).lower().endswith(".fcsv"):
        storage = slicer.vtkMRMLMarkupsFiducialStorageNode()
    else:
        storage = slicer.vtkMRMLMarkupsJsonStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    ok = storage.ReadData(node)
    scene.RemoveNode(storage)
    if not ok:
        scene.RemoveNode(node)
        raise InputError(f"{path}: cannot read as a Slicer point list")
    return node


# --- transforms -----------------------------------------------------------------------
def linear_sitk_to_lps_matrix(transform: sitk.Transform) -> np.ndarray:
    """4x4 LPS matrix of a linear SimpleITK transform (any linear type or composite of them).

    Read off from where the transform sends the origin and the unit vectors, then checked on
    other points; raises InputError if the transform is not linear.
    """
    b = np.asarray(transform.TransformPoint((0.0, 0.0, 0.0)))
    a = np.stack([np.asarray(transform.TransformPoint(tuple(e))) - b for e in np.eye(3)], axis=1)
    m = np.eye(4)
    m[:3, :3] = a
    m[:3, 3] = b
    probe = np.array([[100.0, -50.0, 30.0], [-120.0, 80.0, -200.0], [7.0, 300.0, 41.0]])
    for p in probe:
        if not np.allclose(transform.TransformPoint(tuple(p)), a @ p + b, atol=1e-6 * (1 + np.abs(p).max())):
            raise InputError("the registration transform is not linear")
    return m


def new_linear_transform_node(scene, transform: sitk.Transform, name: str):
    """Add a NEW linear transform node whose from-parent map equals the ITK fixed->moving map."""
    node = slicer.vtkMRMLLinearTransformNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.SetMatrixTransformFromParent(vtk_matrix_from_np(lps_matrix_to_ras(linear_sitk_to_lps_matrix(transform))))
    return node


def grid_transform_from_displacement(displacement: sitk.Image) -> "slicer.vtkOrientedGridTransform":
    """vtkOrientedGridTransform (RAS) equal to an ITK displacement field (LPS vectors and grid).

    ITK's field is zero outside its grid, while VTK repeats the edge values there; a border of
    zero vectors (one voxel) makes VTK zero outside too. The two then agree everywhere except
    in that one-voxel band, where VTK ramps linearly to zero (ITK steps).
    """
    if displacement.GetNumberOfComponentsPerPixel() != 3 or displacement.GetDimension() != 3:
        raise InputError("the displacement field must be a 3D image of 3-vectors")
    vectors = sitk.GetArrayFromImage(displacement).astype(np.float64)  # (z, y, x, 3), LPS
    vectors = np.pad(vectors, ((1, 1), (1, 1), (1, 1), (0, 0)))
    vectors[..., 0] *= -1.0
    vectors[..., 1] *= -1.0
    direction_lps = np.asarray(displacement.GetDirection()).reshape(3, 3)
    spacing = np.asarray(displacement.GetSpacing())
    origin_lps = np.asarray(displacement.GetOrigin()) - direction_lps @ spacing  # one voxel before index 0
    image = vtk.vtkImageData()
    image.SetDimensions(*(int(n) + 2 for n in displacement.GetSize()))
    image.SetSpacing(*spacing)
    # origin and direction go into RAS; the grid's index axes stay the same voxels
    image.SetOrigin(*lps_to_ras(origin_lps))
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(vectors).reshape(-1, 3), deep=True,
                                     array_type=vtk.VTK_DOUBLE)
    arr.SetNumberOfComponents(3)
    image.GetPointData().SetScalars(arr)
    direction_ras = np.diag([-1.0, -1.0, 1.0]) @ direction_lps
    m = np.eye(4)
    m[:3, :3] = direction_ras
    grid = slicer.vtkOrientedGridTransform()
    grid.SetDisplacementGridData(image)
    grid.SetGridDirectionMatrix(vtk_matrix_from_np(m))
    grid.SetInterpolationModeToLinear()  # as ITK's DisplacementFieldTransform
    return grid


def new_grid_transform_node(scene, displacement: sitk.Image, name: str):
    """Add a NEW grid transform node whose from-parent map equals ``x + d(x)`` of the ITK field."""
    node = slicer.vtkMRMLGridTransformNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.SetAndObserveTransformFromParent(grid_transform_from_displacement(displacement))
    return node


def node_from_parent_point(node, ras) -> np.ndarray:
    """Apply a transform node's from-parent map to RAS point(s) (..., 3)."""
    pts = np.asarray(ras, dtype=np.float64)
    flat = pts.reshape(-1, 3)
    t = node.GetTransformFromParent()
    out = np.array([t.TransformPoint(tuple(p)) for p in flat])
    return out.reshape(pts.shape)


def node_from_world_point(node, ras) -> np.ndarray:
    """Map world RAS point(s) into the coordinates of a transform node's children."""
    pts = np.asarray(ras, dtype=np.float64)
    flat = pts.reshape(-1, 3)
    t = vtk.vtkGeneralTransform()
    node.GetTransformFromWorld(t)
    out = np.array([t.TransformPoint(tuple(p)) for p in flat])
    return out.reshape(pts.shape)


def write_transform_node(node, path: str, scene=None) -> None:
    """Save a transform node as an ITK transform file (.h5/.tfm/.txt, or .nii.gz for a grid)."""
    _write_with_storage(node, slicer.vtkMRMLTransformStorageNode(), path, scene)


# --- segments -------------------------------------------------------------------------
def segment_mask(segmentation_node, segment_id: str, base_node=None) -> Volume:
    """A segment's binary labelmap as a core Volume (LPS geometry, values 0/1), in world space,
    or with ``base_node`` in that node's own space (its linear parent transforms undone)."""
    if segmentation_node is None:
        raise InputError("no segmentation selected")
    seg = segmentation_node.GetSegmentation()
    if not segment_id or seg.GetSegment(segment_id) is None:
        raise InputError(f"{segmentation_node.GetName()}: has no segment {segment_id!r}")
    # an RTSTRUCT or closed-surface segment has no labelmap until one is made (as Slicer's effects do)
    segmentation_node.CreateBinaryLabelmapRepresentation()
    image = slicer.vtkOrientedImageData()
    if not segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image):
        raise InputError(f"{segmentation_node.GetName()}: segment {segment_id!r} has no binary labelmap")
    dims = image.GetDimensions()
    ext = image.GetExtent()
    if image.GetPointData().GetScalars() is None or min(dims) < 1 or ext[1] < ext[0]:
        raise InputError(f"{segmentation_node.GetName()}: segment {segment_id!r} is empty")
    arr = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
    mask = (arr > 0).astype(np.float32)
    if not mask.any():
        raise InputError(f"{segmentation_node.GetName()}: segment {segment_id!r} is empty")
    m = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(m)  # maps the extent's index (i, j, k) to RAS
    ijk_to_ras = np_from_vtk_matrix(m)
    # shift so that array index 0 is the extent's first voxel
    ijk_to_ras[:3, 3] = ijk_to_ras[:3, :3] @ np.array(ext[0::2], float) + ijk_to_ras[:3, 3]
    ijk_to_ras = _apply_parent_transform(segmentation_node, ijk_to_ras)
    if base_node is not None:
        ijk_to_ras = np.linalg.inv(_apply_parent_transform(base_node, np.eye(4))) @ ijk_to_ras
    lps = _F4 @ ijk_to_ras
    spacing = np.linalg.norm(lps[:3, :3], axis=0)
    return Volume(mask, tuple(spacing), tuple(lps[:3, 3]), lps[:3, :3] / spacing, Modality.CT,
                  seg.GetSegment(segment_id).GetName())


def new_segmentation_node(scene, mask: Volume, name: str, segment_name: str, reference_node=None,
                          color=(1.0, 0.8, 0.0)):
    """Add a NEW segmentation node with one segment from a 0/1 mask Volume (LPS geometry)."""
    node = slicer.vtkMRMLSegmentationNode()
    node.SetName(scene.GenerateUniqueName(name))
    scene.AddNode(node)
    node.CreateDefaultDisplayNodes()
    if reference_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    image = slicer.vtkOrientedImageData()
    x, y, z = mask.size_xyz
    image.SetDimensions(x, y, z)
    arr = numpy_support.numpy_to_vtk(np.ascontiguousarray(mask.array > 0.5).astype(np.uint8).ravel(), deep=True,
                                     array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(arr)
    image.SetImageToWorldMatrix(vtk_matrix_from_np(volume_ijk_to_ras(mask)))
    node.AddSegmentFromBinaryLabelmapRepresentation(image, segment_name, list(color))
    return node
