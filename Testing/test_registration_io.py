"""Registration files: what write_registration writes must be read back by SimpleITK and by
3D Slicer's MRML (slicer-core: transform storage nodes) and map test points to the same place.

Conventions checked numerically: ITK transforms map FIXED LPS points to MOVING points; Slicer
stores an ITK file as the node's "from parent" transform in RAS (RAS = LPS with x, y negated);
the displacement acts on fixed points before the linear part, so in a Slicer hierarchy the grid
node is the parent of the linear node and a child of the linear node sees world (fixed) points
through linear o (x + d(x)).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.spatial.transform import Rotation

from samv2core.errors import RegistrationError
from samv2core.grid import Grid
from samv2core.registration import RegistrationResult, write_registration
from samv2core.affine import sitk_affine
from samv2core.registration.result import displacement_image
from samv2core.volume import Volume

slicer = pytest.importorskip("slicer", reason="slicer-core (Qt-free MRML) not installed")

FLIP = np.array([-1.0, -1.0, 1.0])


def _volume(origin, direction, shape=(24, 28, 32), spacing=(2.0, 2.5, 3.0), seed=0, name="v"):
    rng = np.random.default_rng(seed)
    arr = rng.normal(0, 50, shape).astype(np.float32) - 500
    arr[4:-4, 5:-5, 6:-6] += 500  # a "body"
    return Volume(arr, spacing, origin, direction, "CT", name)


@pytest.fixture(scope="module")
def case():
    oblique = Rotation.from_euler("xyz", [10, -5, 20], degrees=True).as_matrix()
    fixed = _volume((-40.0, -50.0, -30.0), np.eye(3), name="fixed")
    moving = _volume((35.0, 30.0, -25.0), oblique, seed=1, name="moving")
    m = np.eye(4)
    m[:3, :3] = Rotation.from_euler("zyx", [7, -4, 3], degrees=True).as_matrix() @ np.diag([1.05, 0.97, 1.02])
    m[:3, 3] = [4.0, -6.0, 2.5]
    grid = Grid((-45.0, -55.0, -35.0), (4.0, 4.0, 4.0), (22, 24, 20))
    p = grid.points()
    # smooth on the scale of the 4 mm grid, as registration fields are
    d = np.stack([4 * np.sin(p[..., 2] / 30), 3 * np.cos(p[..., 0] / 35), 2.5 * np.sin(p[..., 1] / 30)], 0)[None]
    disp = displacement_image(torch.tensor(d, dtype=torch.float32), grid)
    linear = sitk_affine(m)
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(linear)
    comp.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(disp)))
    result = RegistrationResult(linear, disp, comp, {"mode": "affine", "linear": {"inliers": 0}})
    rng = np.random.default_rng(5)
    points = rng.uniform([-30, -40, -20], [30, 30, 30], (12, 3))  # well inside the field's grid
    return fixed, moving, result, points


def _read_node(scene, path, node):
    scene.AddNode(node)
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"MRML could not read {path}"
    return node


def _from_parent_lps(node, lps):
    t = node.GetTransformFromParent()
    return np.array([t.TransformPoint(tuple(p * FLIP)) for p in lps]) * FLIP


def test_written_files_are_read_by_simpleitk_and_map_points_identically(case, tmp_path):
    fixed, moving, result, points = case
    paths = write_registration(result, fixed, moving, tmp_path)
    assert set(paths) == {"linear_tfm", "linear_h5", "displacement", "displacement_h5", "composite",
                          "moving_resampled", "report"}
    assert not list(tmp_path.glob(".partial-*"))
    expect_lin = np.array([result.linear.TransformPoint(tuple(p)) for p in points])
    expect_all = result.transform_points(points)
    for key in ("linear_tfm", "linear_h5"):
        t = sitk.ReadTransform(str(paths[key]))
        assert np.allclose([t.TransformPoint(tuple(p)) for p in points], expect_lin, atol=1e-6)
    comp = sitk.ReadTransform(str(paths["composite"]))
    assert np.allclose([comp.TransformPoint(tuple(p)) for p in points], expect_all, atol=1e-4)
    # the displacement file + the linear file reproduce the composite: linear(x + d(x))
    field = sitk.DisplacementFieldTransform(sitk.Cast(sitk.ReadImage(str(paths["displacement"])), sitk.sitkVectorFloat64))
    field_h5 = sitk.ReadTransform(str(paths["displacement_h5"]))
    for f in (field, field_h5):
        chained = [result.linear.TransformPoint(f.TransformPoint(tuple(p))) for p in points]
        assert np.allclose(chained, expect_all, atol=1e-3)
    # the displacement really is non-trivial at these points
    assert np.linalg.norm(expect_all - expect_lin, axis=1).min() > 0.1
    report = json.loads(paths["report"].read_text())
    assert report["mode"] == "affine" and report["files"]["composite"] == "composite.h5"
    res = sitk.ReadImage(str(paths["moving_resampled"]))
    assert res.GetSize() == fixed.to_sitk().GetSize()
    assert np.allclose(res.GetOrigin(), fixed.origin) and np.allclose(res.GetDirection(), fixed.direction.ravel())
    expected = sitk.Resample(moving.to_sitk(), fixed.to_sitk(), result.composite, sitk.sitkLinear,
                             float(moving.array.min()), sitk.sitkFloat32)
    assert np.allclose(sitk.GetArrayFromImage(res), sitk.GetArrayFromImage(expected), atol=1e-3)


def test_mrml_reads_the_files_and_maps_points_like_simpleitk(case, tmp_path):
    fixed, moving, result, points = case
    paths = write_registration(result, fixed, moving, tmp_path)
    scene = slicer.vtkMRMLScene()
    expect_lin = np.array([result.linear.TransformPoint(tuple(p)) for p in points])
    expect_all = result.transform_points(points)
    field = sitk.DisplacementFieldTransform(sitk.Image(result.displacement))
    expect_field = np.array([field.TransformPoint(tuple(p)) for p in points])

    for key in ("linear_tfm", "linear_h5"):
        node = _read_node(scene, paths[key], slicer.vtkMRMLLinearTransformNode())
        assert node.IsLinear()
        assert np.allclose(_from_parent_lps(node, points), expect_lin, atol=1e-4)
    for key in ("displacement", "displacement_h5"):
        node = _read_node(scene, paths[key], slicer.vtkMRMLGridTransformNode())
        assert not node.IsLinear()
        # Slicer interpolates grid transforms cubically by default, ITK linearly: equal to
        # within hundredths of a millimetre for smooth fields, and exactly in linear mode
        assert np.allclose(_from_parent_lps(node, points), expect_field, atol=0.02)
        node.GetTransformFromParent().SetInterpolationModeToLinear()
        assert np.allclose(_from_parent_lps(node, points), expect_field, atol=1e-3)
    comp = _read_node(scene, paths["composite"], slicer.vtkMRMLTransformNode())
    assert np.allclose(_from_parent_lps(comp, points), expect_all, atol=0.02)

    # Slicer hierarchy: grid node is the parent of the linear node; a volume under the linear
    # node is displayed on the fixed volume: its world -> local map is linear o (x + d(x)).
    grid_node = _read_node(scene, paths["displacement"], slicer.vtkMRMLGridTransformNode())
    lin_node = _read_node(scene, paths["linear_tfm"], slicer.vtkMRMLLinearTransformNode())
    lin_node.SetAndObserveTransformNodeID(grid_node.GetID())
    import vtk

    world_to_moving = vtk.vtkGeneralTransform()
    lin_node.GetTransformFromWorld(world_to_moving)
    mapped = np.array([world_to_moving.TransformPoint(tuple(p * FLIP)) for p in points]) * FLIP
    assert np.allclose(mapped, expect_all, atol=0.02)


def test_write_refuses_non_results_and_leaves_nothing_on_failure(case, tmp_path):
    fixed, moving, result, _ = case
    with pytest.raises(RegistrationError, match="RegistrationResult"):
        write_registration({"linear": None}, fixed, moving, tmp_path / "a")
    blocker = tmp_path / "b"
    blocker.mkdir()
    (blocker / "composite.h5").mkdir()  # a folder where a file must go: the move fails
    with pytest.raises(RegistrationError, match="could not write"):
        write_registration(result, fixed, moving, blocker)
    assert not list(blocker.glob(".partial-*"))
    assert not (blocker / "linear.tfm").exists() and not (blocker / "report.json").exists()
