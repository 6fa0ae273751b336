"""SAMv2Slicer logic against slicer-core's real MRML (no Slicer application, no Qt).

Geometry is checked against independent references: SimpleITK, and files written by Slicer's
own storage nodes (NRRD volumes, .mrk.json point lists, ITK transform files). Matching runs
the untrained *lite* network on a small crop of a real CT with a simulated follow-up: these
tests check plumbing and geometry, not model accuracy.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("not available: this 'slicer' package has no MRML (install slicer-core)", allow_module_level=True)
import vtk  # noqa: E402

from repo_paths import REPO, SHARED  # noqa: E402

sys.path.insert(0, str(REPO / "SAMv2Slicer"))

from samv2core.coords import lps_to_ras, ras_to_lps  # noqa: E402
from samv2core.errors import CheckpointError, DeviceError, InputError, SAMv2Error  # noqa: E402
from samv2core import registration as reg  # noqa: E402
from samv2core.volume import Volume  # noqa: E402
from SAMv2SlicerLib import logic as L  # noqa: E402
from SAMv2SlicerLib import nodes  # noqa: E402
from SAMv2SlicerLib.cancellation import Cancelled  # noqa: E402


def shared_data() -> Path:
    return SHARED


def rotation(ax, ay, az) -> np.ndarray:
    t = sitk.Euler3DTransform()
    t.SetRotation(*np.deg2rad([ax, ay, az]))
    return np.asarray(t.GetMatrix()).reshape(3, 3)


DIRECTIONS = {
    "identity": np.eye(3),
    "ras_like": np.diag([-1.0, -1.0, 1.0]),  # a NIfTI-style RAS-stored scan, seen in LPS
    "left_handed": np.diag([1.0, -1.0, 1.0]),  # one flipped axis: det = -1
    "oblique": rotation(20, -35, 50),
    "oblique_left_handed": rotation(20, -35, 50) @ np.diag([1.0, 1.0, -1.0]),
}


def synthetic(direction=np.eye(3), shape=(7, 9, 11), spacing=(0.8, 1.1, 2.5), origin=(10.0, -20.0, 30.0), seed=0):
    rng = np.random.default_rng(seed)
    return Volume(rng.normal(0, 100, shape).astype(np.float32), spacing, origin, direction, "CT", "synthetic")


def scene_state(scene) -> dict:
    """Node IDs with their modification times: equal states mean nothing was added or changed."""
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}


def node_fingerprint(node) -> tuple:
    """What a user would call the node's content: voxels/points, geometry, placement, name."""
    parts = [node.GetName(), node.GetTransformNodeID() if hasattr(node, "GetTransformNodeID") else None]
    if node.IsA("vtkMRMLVolumeNode"):
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        from vtk.util import numpy_support

        arr = numpy_support.vtk_to_numpy(node.GetImageData().GetPointData().GetScalars())
        parts += [nodes.np_from_vtk_matrix(m).tobytes(), arr.tobytes()]
    if node.IsA("vtkMRMLMarkupsNode"):
        for i in range(node.GetNumberOfControlPoints()):
            p = [0.0, 0.0, 0.0]
            node.GetNthControlPointPosition(i, p)
            parts += [node.GetNthControlPointLabel(i), tuple(p), node.GetNthControlPointSelected(i)]
    return tuple(parts)


# --------------------------------------------------------------------------------------------
# volumes
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(DIRECTIONS))
def test_volume_node_roundtrip_and_ijk_to_ras(kind):
    vol = synthetic(DIRECTIONS[kind])
    scene = slicer.vtkMRMLScene()
    node = nodes.volume_to_node(vol, scene, "v")
    back = nodes.volume_from_node(node, "CT")
    assert np.array_equal(back.array, vol.array)
    np.testing.assert_allclose(back.spacing, vol.spacing, atol=1e-9)
    np.testing.assert_allclose(back.origin, vol.origin, atol=1e-9)
    np.testing.assert_allclose(back.direction, vol.direction, atol=1e-9)
    # the node's IJK->RAS must put every voxel where SimpleITK puts it (LPS), flipped to RAS
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    ijk = np.random.default_rng(1).uniform(0, 6, (10, 3))
    ras = (nodes.np_from_vtk_matrix(m) @ np.c_[ijk, np.ones(len(ijk))].T).T[:, :3]
    image = vol.to_sitk()
    ref = np.array([image.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    np.testing.assert_allclose(ras, lps_to_ras(ref), atol=1e-9)
    # handedness survives the LPS -> RAS flip (F = diag(-1, -1, 1) has det +1)
    assert np.sign(np.linalg.det(nodes.np_from_vtk_matrix(m)[:3, :3])) == np.sign(np.linalg.det(vol.direction))


@pytest.mark.parametrize("kind", ["left_handed", "oblique_left_handed", "oblique"])
def test_volume_from_node_agrees_with_slicer_nrrd_writer(kind, tmp_path):
    """Independent check: Slicer writes the node (its own RAS->LPS), SimpleITK reads it back."""
    scene = slicer.vtkMRMLScene()
    vol = synthetic(DIRECTIONS[kind], seed=3)
    node = nodes.volume_to_node(vol, scene, "v")
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "v.nrrd"))
    assert storage.WriteData(node)
    written = sitk.ReadImage(str(tmp_path / "v.nrrd"))
    ours = nodes.volume_from_node(node, "CT")
    np.testing.assert_allclose(written.GetOrigin(), ours.origin, atol=1e-6)
    np.testing.assert_allclose(written.GetSpacing(), ours.spacing, atol=1e-6)
    # a voxel's physical position is the invariant (a writer may reorder flipped axes)
    for ijk in ([0, 0, 0], [3, 5, 2], [10, 8, 6]):
        np.testing.assert_allclose(written.TransformContinuousIndexToPhysicalPoint(ijk), ours.index_to_lps(ijk),
                                   atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), ours.array)


def test_volume_under_parent_transform_uses_world_geometry():
    scene = slicer.vtkMRMLScene()
    node = nodes.volume_to_node(synthetic(DIRECTIONS["oblique"]), scene, "v")
    parent = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(parent)
    to_parent = np.eye(4)
    to_parent[:3, :3] = rotation(0, 0, 30)
    to_parent[:3, 3] = [5.0, -7.0, 11.0]  # RAS
    parent.SetMatrixTransformToParent(nodes.vtk_matrix_from_np(to_parent))
    node.SetAndObserveTransformNodeID(parent.GetID())
    local = nodes.volume_from_node(node, "CT", world=False)
    world = nodes.volume_from_node(node, "CT", world=True)
    ijk = np.array([2.0, 3.0, 4.0])
    expected = (to_parent @ np.r_[lps_to_ras(local.index_to_lps(ijk)), 1.0])[:3]
    np.testing.assert_allclose(lps_to_ras(world.index_to_lps(ijk)), expected, atol=1e-9)
    grid = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(grid)
    node.SetAndObserveTransformNodeID(grid.GetID())
    with pytest.raises(InputError, match="non-linear"):
        nodes.volume_from_node(node, "CT", world=True)


def test_bad_volume_nodes_are_refused():
    scene = slicer.vtkMRMLScene()
    flat = nodes.volume_to_node(Volume(np.ones((1, 20, 20), np.float32), (1, 1, 1), (0, 0, 0), np.eye(3)), scene, "flat")
    with pytest.raises(InputError, match="2D"):
        nodes.volume_from_node(flat)
    rgb = slicer.vtkMRMLVectorVolumeNode()
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 8)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    scene.AddNode(rgb)
    with pytest.raises(InputError, match="RGB|vector"):
        nodes.volume_from_node(rgb)
    empty = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(empty)
    with pytest.raises(InputError, match="no voxel data"):
        nodes.volume_from_node(empty)
    with pytest.raises(InputError, match="no volume"):
        nodes.volume_from_node(None)


# --------------------------------------------------------------------------------------------
# points
# --------------------------------------------------------------------------------------------
def test_points_ras_in_and_out_and_mrk_json_is_lps(tmp_path):
    scene = slicer.vtkMRMLScene()
    ras = np.array([[10.0, -20.0, 30.0], [-5.5, 7.25, -100.0]])
    node = nodes.new_point_list(scene, "pts", ras, ["A", "B"], ["d1", "d2"], flagged=[False, True])
    pts = nodes.read_points(node)
    np.testing.assert_allclose(pts.ras, ras)
    np.testing.assert_allclose(pts.lps, ras_to_lps(ras))
    assert pts.labels == ("A", "B (?)")
    assert node.GetNthControlPointSelected(0) and not node.GetNthControlPointSelected(1)
    # defect 10: flagged matches are the ones a user drags into place: never locked
    assert not node.GetNthControlPointLocked(1) and not node.GetNthControlPointLocked(0)
    nodes.write_point_list(node, str(tmp_path / "p.mrk.json"))
    doc = json.loads((tmp_path / "p.mrk.json").read_text())
    markup = doc["markups"][0]
    assert markup["coordinateSystem"] == "LPS"
    np.testing.assert_allclose([cp["position"] for cp in markup["controlPoints"]], ras_to_lps(ras), atol=1e-9)
    assert [cp["description"] for cp in markup["controlPoints"]] == ["d1", "d2"]
    again = nodes.read_points(nodes.read_point_list_file(str(tmp_path / "p.mrk.json"), scene))
    np.testing.assert_allclose(again.ras, ras, atol=1e-9)
    # world positions honour a parent transform
    parent = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(parent)
    shift = np.eye(4)
    shift[:3, 3] = [1.0, 2.0, 3.0]
    parent.SetMatrixTransformToParent(nodes.vtk_matrix_from_np(shift))
    node.SetAndObserveTransformNodeID(parent.GetID())
    np.testing.assert_allclose(nodes.read_points(node).ras, ras + [1.0, 2.0, 3.0])
    np.testing.assert_allclose(nodes.read_points(node, world=False).ras, ras)
    # points without a defined position ("skipped" while placing) are not input
    node.AddControlPoint(vtk.vtkVector3d(0.0, 0.0, 0.0), "C")
    node.SetNthControlPointPositionMissing(2)
    assert nodes.read_points(node).labels == ("A", "B (?)")


# --------------------------------------------------------------------------------------------
# transforms: nodes must map points exactly as the SimpleITK transforms do
# --------------------------------------------------------------------------------------------
def _probe_points_lps(n=25, seed=0, lo=-60.0, hi=60.0):
    return np.random.default_rng(seed).uniform(lo, hi, (n, 3))


def _linear_transforms():
    euler = sitk.Euler3DTransform((10.0, -5.0, 20.0), 0.1, -0.2, 0.3, (4.0, -6.0, 8.0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple((rotation(5, 10, -15) @ np.diag([1.1, 0.9, 1.05])).ravel()))
    affine.SetTranslation((-3.0, 2.0, 7.5))
    affine.SetCenter((1.0, 2.0, 3.0))
    return {"euler": euler, "affine": affine}


@pytest.mark.parametrize("name", ["euler", "affine"])
def test_linear_transform_node_maps_like_sitk(name, tmp_path):
    t = _linear_transforms()[name]
    scene = slicer.vtkMRMLScene()
    node = nodes.new_linear_transform_node(scene, t, "lin")
    p = _probe_points_lps()
    expected = lps_to_ras(np.array([t.TransformPoint(tuple(q)) for q in p]))
    np.testing.assert_allclose(nodes.node_from_parent_point(node, lps_to_ras(p)), expected, atol=1e-9)
    # a volume under the node is resampled through its from-world map: same mapping
    child = nodes.volume_to_node(synthetic(), scene, "child")
    child.SetAndObserveTransformNodeID(node.GetID())
    np.testing.assert_allclose(nodes.node_from_world_point(node, lps_to_ras(p)), expected, atol=1e-9)
    # Slicer's ITK writer: the file read by SimpleITK is the same fixed->moving transform
    nodes.write_transform_node(node, str(tmp_path / "lin.h5"))
    back = sitk.ReadTransform(str(tmp_path / "lin.h5"))
    np.testing.assert_allclose([back.TransformPoint(tuple(q)) for q in p], [t.TransformPoint(tuple(q)) for q in p],
                               atol=1e-6)


def _displacement(direction=DIRECTIONS["oblique_left_handed"], seed=0) -> sitk.Image:
    rng = np.random.default_rng(seed)
    field = rng.normal(0, 3.0, (10, 9, 8, 3))
    for axis in range(3):  # smooth, as registration fields are
        from scipy.ndimage import gaussian_filter

        field[..., axis] = gaussian_filter(field[..., axis], 1.0)
    img = sitk.GetImageFromArray(field, isVector=True)
    img.SetSpacing((6.0, 7.0, 8.0))
    img.SetOrigin((-20.0, -25.0, -30.0))
    img.SetDirection(tuple(direction.ravel()))
    return img


def _inside_grid_points(img: sitk.Image, n=30, seed=1):
    rng = np.random.default_rng(seed)
    size = np.asarray(img.GetSize()) - 1
    return np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(rng.uniform(0.5, size - 0.5)))
                     for _ in range(n)])


def test_grid_transform_node_maps_like_sitk(tmp_path):
    disp = _displacement()
    ref_t = sitk.DisplacementFieldTransform(sitk.Image(disp))
    scene = slicer.vtkMRMLScene()
    node = nodes.new_grid_transform_node(scene, disp, "grid")
    p = _inside_grid_points(disp)
    expected = lps_to_ras(np.array([ref_t.TransformPoint(tuple(q)) for q in p]))
    np.testing.assert_allclose(nodes.node_from_parent_point(node, lps_to_ras(p)), expected, atol=1e-4)
    # outside the field (beyond a one-voxel band) ITK displaces nothing; the node must not either
    outside = np.array([disp.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in ijk))
                        for ijk in ([-3, 4, 4], [4, 20, 4], [4, 4, -2.5], [12, -2, 15])])
    np.testing.assert_allclose([ref_t.TransformPoint(tuple(q)) for q in outside], outside, atol=1e-9)
    np.testing.assert_allclose(nodes.node_from_parent_point(node, lps_to_ras(outside)), lps_to_ras(outside), atol=1e-6)
    # written by Slicer, read by SimpleITK: same map
    nodes.write_transform_node(node, str(tmp_path / "grid.h5"))
    back = sitk.ReadTransform(str(tmp_path / "grid.h5"))
    np.testing.assert_allclose(lps_to_ras(np.array([back.TransformPoint(tuple(q)) for q in p])), expected, atol=1e-4)
    # written by SimpleITK, read by Slicer: same grid (Slicer's reader picks cubic interpolation;
    # with linear interpolation, as ITK uses, the maps agree)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(disp)), str(tmp_path / "sitk.h5"))
    read = slicer.vtkMRMLGridTransformNode()
    scene.AddNode(read)
    storage = slicer.vtkMRMLTransformStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(tmp_path / "sitk.h5"))
    assert storage.ReadData(read)
    read.GetTransformFromParent().SetInterpolationModeToLinear()
    np.testing.assert_allclose(nodes.node_from_parent_point(read, lps_to_ras(p)), expected, atol=1e-4)


@dataclass
class FakeRegistrationResult:
    """Same fields as samv2core's RegistrationResult (linear, displacement, composite, report)."""

    linear: sitk.Transform
    displacement: "sitk.Image | None"
    composite: sitk.Transform
    report: dict = field(default_factory=dict)


def _composite(linear, displacement):
    comp = sitk.CompositeTransform(3)
    comp.AddTransform(linear)  # ITK applies the last added first: x -> linear(x + d(x))
    if displacement is not None:
        comp.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(displacement)))
    return comp


@pytest.mark.parametrize("deformable", [False, True])
def test_registration_nodes_map_moving_volume_like_the_composite(deformable):
    scene = slicer.vtkMRMLScene()
    fixed = nodes.volume_to_node(synthetic(seed=1), scene, "fixed")
    moving = nodes.volume_to_node(synthetic(seed=2), scene, "moving")
    lin = _linear_transforms()["euler"]
    disp = _displacement(DIRECTIONS["oblique"]) if deformable else None
    result = FakeRegistrationResult(lin, disp, _composite(lin, disp), {"mode": "rigid", "matches": 12})
    logic = L.SAMv2Logic(scene)
    with logic.transaction():
        out = logic.add_registration_nodes(result, fixed, moving, "rigid")
    assert moving.GetTransformNodeID() == out.linear_node.GetID()
    assert (out.grid_node is not None) == deformable
    for node in filter(None, (out.linear_node, out.grid_node)):
        assert node.GetNodeReferenceID("fixedVolume") == fixed.GetID()
        assert node.GetNodeReferenceID("movingVolume") == moving.GetID()
        assert json.loads(node.GetAttribute("SAMv2.Report"))["matches"] == 12
    # world (= fixed) point -> moving-volume coordinates, through the whole node hierarchy
    p = _inside_grid_points(disp) if deformable else _probe_points_lps()
    to_moving = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, moving.GetParentTransformNode(), to_moving)
    got = np.array([to_moving.TransformPoint(tuple(q)) for q in lps_to_ras(p)])
    expected = lps_to_ras(np.array([result.composite.TransformPoint(tuple(q)) for q in p]))
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_registration_nodes_failure_restores_moving_parent(monkeypatch):
    scene = slicer.vtkMRMLScene()
    fixed = nodes.volume_to_node(synthetic(seed=1), scene, "fixed")
    moving = nodes.volume_to_node(synthetic(seed=2), scene, "moving")
    previous = slicer.vtkMRMLLinearTransformNode()
    scene.AddNode(previous)
    moving.SetAndObserveTransformNodeID(previous.GetID())
    before = scene_state(scene)
    lin = _linear_transforms()["affine"]
    disp = _displacement()
    result = FakeRegistrationResult(lin, disp, _composite(lin, disp))

    def broken(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(nodes, "new_grid_transform_node", broken)
    logic = L.SAMv2Logic(scene)
    with pytest.raises(RuntimeError):
        with logic.transaction():
            logic.add_registration_nodes(result, fixed, moving, "affine")
    assert moving.GetTransformNodeID() == previous.GetID()
    assert set(scene_state(scene)) == set(before)  # the linear node made before the failure is gone


# --------------------------------------------------------------------------------------------
# the logic end to end (lite untrained network, real CT crop + simulated follow-up)
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ct_crop() -> Volume:
    path = shared_data() / "ct" / "totalseg_example" / "ct_3mm.nii.gz"
    if not path.is_file():
        pytest.skip(f"shared CT not available: {path} missing")
    from samv2core.volume import load_volume

    v = load_volume(path, "CT")
    k0, j0, i0 = 40, 20, 30  # a 64 x 64 x 24 voxel (192 x 192 x 72 mm) crop of the abdomen
    return Volume(v.array[k0:k0 + 24, j0:j0 + 64, i0:i0 + 64], v.spacing, tuple(v.index_to_lps([i0, j0, k0])),
                  v.direction, "CT", "ct_crop")


@pytest.fixture(scope="module")
def session(ct_crop):
    """One scene + logic for the module: embeddings are computed once and reused by the tests."""
    import torch

    from samv2core.network import NetConfig, build_network
    from samv2core.simulate import simulate_followup

    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    pair = simulate_followup(ct_crop, seed=3)
    scene = slicer.vtkMRMLScene()
    base = nodes.volume_to_node(ct_crop, scene, "baseline")
    follow = nodes.volume_to_node(pair.followup, scene, "followup")
    logic = L.SAMv2Logic(scene)
    net = build_network(NetConfig.lite())
    logic.set_model(model=net, device="cpu")
    centre = ct_crop.index_to_lps((np.asarray(ct_crop.size_xyz) - 1) / 2)
    lesions_lps = np.array([centre, centre + [15.0, 10.0, 5.0], centre - [25.0, -10.0, 10.0]])
    points = nodes.new_point_list(scene, "Lesions", lps_to_ras(lesions_lps), ["T1", "T2", "T3"])
    return {"scene": scene, "base": base, "follow": follow, "points": points, "logic": logic, "pair": pair,
            "lesions_lps": lesions_lps, "net": net}


def test_match_points_creates_named_point_list_on_followup(session):
    s = session
    scene, logic = s["scene"], s["logic"]
    inputs = {k: node_fingerprint(s[k]) for k in ("base", "follow", "points")}
    before = set(scene_state(scene))
    out = logic.match_points(s["base"], s["follow"], s["points"], method="fixed_point")
    node = out.node
    assert node.GetName() == "Lesions on followup"
    assert node.GetNumberOfControlPoints() == 3 and len(out.results) == 3
    for i, r in enumerate(out.results):
        label = node.GetNthControlPointLabel(i)
        assert label.startswith(("T1", "T2", "T3")[i])
        assert label.endswith(" (?)") == (not r.confident)
        assert node.GetNthControlPointSelected(i) == bool(r.confident)
        assert not node.GetNthControlPointLocked(i)  # flagged points stay movable
        assert f"score {r.score:.2f}" in node.GetNthControlPointDescription(i)
        assert node.GetNthControlPointAssociatedNodeID(i) == s["follow"].GetID()
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        np.testing.assert_allclose(p, lps_to_ras(r.query_point.to("LPS").as_array()), atol=1e-6)
        np.testing.assert_allclose(r.template_point.to("LPS").as_array(), s["lesions_lps"][i], atol=1e-6)
    assert node.GetNodeReferenceID("sourcePoints") == s["points"].GetID()
    assert json.loads(node.GetAttribute("SAMv2.Scores")) == [round(float(r.score), 4) for r in out.results]
    assert "matched 3 point(s)" in logic.status
    # outputs are new nodes; inputs are untouched
    assert {k: node_fingerprint(s[k]) for k in ("base", "follow", "points")} == inputs
    added = set(scene_state(scene)) - before
    assert node.GetID() in added and before <= set(scene_state(scene))


def test_embeddings_are_computed_once_per_volume(session, monkeypatch):
    s = session
    logic = s["logic"]
    logic.match_points(s["base"], s["follow"], s["points"], method="nn")  # warm (cached by the test above)
    calls = []
    embedder = logic.session().descriptors
    original = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda *a, **k: calls.append(1) or original(*a, **k))
    logic.match_points(s["base"], s["follow"], s["points"], method="nn")
    assert calls == []
    # a modified node is read again, but the same voxels keep their embeddings
    s["follow"].GetImageData().Modified()
    logic.match_points(s["base"], s["follow"], s["points"], method="nn")
    assert calls == []
    # changing the voxels of a volume invalidates its cached embeddings
    from vtk.util import numpy_support

    scalars = numpy_support.vtk_to_numpy(s["follow"].GetImageData().GetPointData().GetScalars())
    saved = scalars.copy()
    try:
        scalars += 5
        s["follow"].GetImageData().Modified()
        logic.match_points(s["base"], s["follow"], s["points"], method="nn")
        assert len(calls) == 1
    finally:
        scalars[:] = saved
        s["follow"].GetImageData().Modified()


def test_propagate_lesion_point_and_radius(session):
    s = session
    logic, scene = s["logic"], s["scene"]
    out = logic.propagate_lesion(s["base"], s["follow"], s["points"], 0, radius_mm=12.0)
    assert out.points_node.GetNthControlPointLabel(0).startswith("T1")
    seg = out.segmentation_node.GetSegmentation()
    assert seg.GetNumberOfSegments() == 1
    mask = nodes.segment_mask(out.segmentation_node, seg.GetNthSegmentID(0))
    voxel_mm3 = float(np.prod(mask.spacing))
    volume = mask.array.sum() * voxel_mm3
    assert volume == pytest.approx(4 / 3 * np.pi * 12.0 ** 3, rel=0.2)
    zyx = np.argwhere(mask.array > 0)
    centroid = mask.index_to_lps(zyx[:, ::-1].mean(0))
    np.testing.assert_allclose(centroid, out.match.query_point.to("LPS").as_array(), atol=2.0)
    # the region lies on the follow-up's voxel lattice
    follow = logic.volume(s["follow"], "follow-up")
    np.testing.assert_allclose(mask.direction, follow.direction, atol=1e-9)
    offset = follow.lps_to_index(mask.origin)
    np.testing.assert_allclose(offset, np.round(offset), atol=1e-6)
    assert scene.IsNodePresent(out.segmentation_node)


def test_propagate_lesion_segment(session):
    s = session
    logic, scene = s["logic"], s["scene"]
    base = logic.volume(s["base"], "baseline")
    from samv2core.propagate import sphere_mask

    lesion = sphere_mask(base, s["lesions_lps"][1], 10.0)
    seg_in = nodes.new_segmentation_node(scene, lesion, "Baseline lesion", "tumour", s["base"])
    seg_id = seg_in.GetSegmentation().GetNthSegmentID(0)
    fingerprint = nodes.segment_mask(seg_in, seg_id).array.copy()
    out = logic.propagate_lesion(s["base"], s["follow"], segmentation_node=seg_in, segment_id=seg_id)
    assert out.details["model"] in ("affine", "translation")
    seg_out = out.segmentation_node.GetSegmentation()
    assert seg_out.GetNthSegment(0).GetName() == "tumour (propagated)"
    mask = nodes.segment_mask(out.segmentation_node, seg_out.GetNthSegmentID(0))
    ratio = mask.array.sum() * np.prod(mask.spacing) / (lesion.array.sum() * np.prod(lesion.spacing))
    assert 0.5 < ratio < 2.0
    assert np.array_equal(nodes.segment_mask(seg_in, seg_id).array, fingerprint)  # input segment untouched


def test_register_end_to_end(session):
    s = session
    logic, scene = s["logic"], s["scene"]
    fixed_fp = node_fingerprint(s["base"])
    out = logic.register(s["base"], s["follow"], mode="rigid", deformable=False, apply_to_moving=False)
    assert out.linear_node.IsA("vtkMRMLLinearTransformNode") and out.grid_node is None
    settings = json.loads(out.linear_node.GetAttribute("SAMv2.Report"))["settings"]
    assert settings["refine"] is True and settings["features"] == "auto"  # the module's defaults
    assert s["follow"].GetTransformNodeID() is None  # apply_to_moving=False leaves the moving volume alone
    assert node_fingerprint(s["base"]) == fixed_fp
    p = _probe_points_lps(5, lo=-20, hi=20) + np.asarray(logic.volume(s["base"]).corners_lps().mean(0))
    expected = lps_to_ras(np.array([out.result.linear.TransformPoint(tuple(q)) for q in p]))
    np.testing.assert_allclose(nodes.node_from_parent_point(out.linear_node, lps_to_ras(p)), expected, atol=1e-6)
    scene.RemoveNode(out.linear_node)


# --------------------------------------------------------------------------------------------
# bad input: the scene is left unchanged, with a status message
# --------------------------------------------------------------------------------------------
def _bad_cases(s, tmp_path):
    scene = s["scene"]
    far = nodes.new_point_list(scene, "far", np.array([[5000.0, 0.0, 0.0]]), ["far away"])
    empty = nodes.new_point_list(scene, "empty", np.zeros((0, 3)), [])
    flat = nodes.volume_to_node(Volume(np.random.rand(1, 32, 32).astype(np.float32), (1, 1, 1), (0, 0, 0), np.eye(3)),
                                scene, "flat")
    rgb = slicer.vtkMRMLVectorVolumeNode()
    image = vtk.vtkImageData()
    image.SetDimensions(16, 16, 16)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    rgb.SetName("rgb")
    scene.AddNode(rgb)
    # a real model file whose weights were damaged after it was written
    from samv2core.model_io import ModelCard, save_model

    garbage = save_model(s["net"], ModelCard(name="lite-untrained", architecture={}, heads=[]),
                         tmp_path / "damaged.safetensors")
    data = bytearray(garbage.read_bytes())
    data[-64:] = b"\0" * 64
    garbage.write_bytes(bytes(data))
    b, f, p = s["base"], s["follow"], s["points"]
    return {
        "no baseline": (lambda lg: lg.match_points(None, f, p), InputError, "no baseline"),
        "no follow-up": (lambda lg: lg.match_points(b, None, p), InputError, "no follow-up"),
        "same volume": (lambda lg: lg.match_points(b, b, p), InputError, "same volume"),
        "same volume (register)": (lambda lg: lg.register(b, b), InputError, "same volume"),
        "unknown descriptors": (lambda lg: lg.register(b, f, features="sift"), InputError, "descriptors"),
        "point outside": (lambda lg: lg.match_points(b, f, far), InputError, "outside the baseline"),
        "no points": (lambda lg: lg.match_points(b, f, empty), InputError, "no points"),
        "2D volume": (lambda lg: lg.match_points(flat, f, p), InputError, "2D"),
        "RGB volume": (lambda lg: lg.match_points(b, rgb, p), InputError, "RGB"),
        "lesion outside": (lambda lg: lg.propagate_lesion(b, f, far, 0, radius_mm=5.0), InputError, "outside"),
        "bad radius": (lambda lg: lg.propagate_lesion(b, f, p, 0, radius_mm=-1.0), InputError, "radius"),
        "invalid model file": (lambda lg: (lg.set_model(str(garbage)), lg.match_points(b, f, p)), CheckpointError,
                               "checksum"),
        "missing model file": (lambda lg: lg.set_model(str(tmp_path / "nope.safetensors")), CheckpointError,
                               "not found"),
    }


@pytest.mark.parametrize("case", ["no baseline", "no follow-up", "same volume", "same volume (register)",
                                  "unknown descriptors", "point outside", "no points", "2D volume", "RGB volume", "lesion outside",
                                  "bad radius", "invalid model file", "missing model file"])
def test_bad_input_leaves_scene_unchanged(session, tmp_path, case):
    s = session
    cases = _bad_cases(s, tmp_path)
    call, error, message = cases[case]
    logic = L.SAMv2Logic(s["scene"])  # a fresh logic: the invalid model must not stick to the shared one
    logic.set_model(model=s["net"], device="cpu")
    logic._session = s["logic"].session()  # reuse computed embeddings (speed)
    before = scene_state(s["scene"])
    with pytest.raises(error, match=message):
        call(logic)
    assert scene_state(s["scene"]) == before
    if case not in ("missing model file",):
        assert "failed" in logic.status and str(message).lower() in logic.status.lower()


def test_gpu_requested_but_absent_is_refused(session):
    import torch

    if torch.cuda.is_available():
        pytest.skip("not available: this machine has a CUDA GPU, so the refusal cannot be observed")
    logic = L.SAMv2Logic(session["scene"])
    before = scene_state(session["scene"])
    logic.set_model(model=session["net"], device="cuda")  # only the name is checked here: no torch import
    with pytest.raises(DeviceError, match="cuda"):  # the machine is checked where the model loads
        logic.match_points(session["base"], session["follow"], session["points"], method="nn")
    assert scene_state(session["scene"]) == before
    with pytest.raises(InputError, match="unknown device"):
        logic.set_model(device="tpu")


def test_cancel_mid_run_adds_nothing(session):
    s = session
    logic = L.SAMv2Logic(s["scene"])  # fresh caches: the run has to embed, so it can be cancelled
    logic.set_model(model=s["net"], device="cpu")
    before = scene_state(s["scene"])
    seen = []

    def cancel_while_embedding(fraction, message):
        seen.append(fraction)
        if fraction > 0.3:  # the user presses Cancel while the follow-up is being embedded
            raise Cancelled("user")

    with pytest.raises(Cancelled):
        logic.match_points(s["base"], s["follow"], s["points"], method="nn", progress=cancel_while_embedding)
    assert max(seen) < 0.9  # it stopped before matching
    assert "cancelled" in logic.status and scene_state(s["scene"]) == before


def test_failure_while_adding_outputs_removes_partial_nodes(session, monkeypatch):
    s = session
    before = scene_state(s["scene"])

    def broken(*a, **k):
        raise SAMv2Error("cannot create the segmentation")

    monkeypatch.setattr(nodes, "new_segmentation_node", broken)
    with pytest.raises(SAMv2Error):
        s["logic"].propagate_lesion(s["base"], s["follow"], s["points"], 0, radius_mm=8.0)
    assert scene_state(s["scene"]) == before  # the matched point list made first was removed


def test_register_deformable_nodes_map_like_the_core_composite(session):
    s = session
    logic, scene = s["logic"], s["scene"]
    before = set(scene_state(scene))
    # a short optimisation: this checks the node plumbing, not registration quality
    options = reg.RegistrationOptions(deformable=reg.DeformableOptions(levels_mm=(16.0,), iterations=(5,)))
    out = logic.register(s["base"], s["follow"], mode="affine", deformable=True, options=options)
    try:
        assert out.grid_node is not None and out.result.displacement is not None
        assert s["follow"].GetTransformNodeID() == out.linear_node.GetID()
        assert out.linear_node.GetTransformNodeID() == out.grid_node.GetID()
        assert out.grid_node.GetNodeReferenceID("movingVolume") == s["follow"].GetID()
        # fixed (world) points -> moving volume, through Slicer's transform hierarchy
        disp = out.result.displacement
        p = _inside_grid_points(disp, n=20, seed=4)
        to_moving = vtk.vtkGeneralTransform()
        slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(None, out.linear_node, to_moving)
        got = np.array([to_moving.TransformPoint(tuple(q)) for q in lps_to_ras(p)])
        np.testing.assert_allclose(got, lps_to_ras(out.result.transform_points(p)), atol=1e-3)
        assert logic.status.startswith("registered")
    finally:
        s["follow"].SetAndObserveTransformNodeID(None)
        for node in (out.linear_node, out.grid_node):
            scene.RemoveNode(node)
    assert set(scene_state(scene)) == before


# --------------------------------------------------------------------------------------------
# issue 11: point indices, transformed follow-ups, DICOM modality
# --------------------------------------------------------------------------------------------
def test_propagate_uses_the_control_point_index_of_the_node(session):
    """The GUI passes Slicer's control-point index; unplaced (preview/unset) points are skipped by
    read_points, so the index must not be used on the filtered list."""
    s = session
    scene, logic = s["scene"], s["logic"]
    ras = lps_to_ras(s["lesions_lps"])
    points = nodes.new_point_list(scene, "with unset", ras, ["A", "B", "C"])
    points.UnsetNthControlPointPosition(1)
    added = [points]
    try:
        out = logic.propagate_lesion(s["base"], s["follow"], points, 2, radius_mm=6.0)
        added += [out.points_node, out.segmentation_node]
        assert out.points_node.GetNthControlPointLabel(0).startswith("C")
        np.testing.assert_allclose(out.match.template_point.to("LPS").as_array(), s["lesions_lps"][2], atol=1e-6)
        before = scene_state(scene)
        with pytest.raises(InputError, match="no placed point number 2"):
            logic.propagate_lesion(s["base"], s["follow"], points, 1, radius_mm=6.0)
        assert scene_state(scene) == before
    finally:
        for node in added:
            scene.RemoveNode(node)


def test_match_after_registration_under_grid_transform(session, monkeypatch):
    """A follow-up under linear -> grid transforms (what a deformable registration leaves) is
    matched in its own voxel space with its cached embeddings; the matches are shown under the
    same transforms, so their world positions follow the follow-up."""
    s = session
    scene, logic = s["scene"], s["logic"]
    logic.match_points(s["base"], s["follow"], s["points"], method="nn")  # embeddings cached
    local = logic.match_points(s["base"], s["follow"], s["points"], method="nn")
    follow = logic.volume(s["follow"], "follow-up", world=False)
    # a smooth displacement field over the follow-up and a rigid shift on top of it
    size = [12, 12, 8]
    spacing = [float(n * sp / (m - 1)) for n, sp, m in zip(follow.size_xyz, follow.spacing, size)]
    arr = np.zeros(size[::-1] + [3])
    z = np.linspace(0, 1, size[2])[:, None, None]
    arr[..., 0] = 3.0 * np.sin(np.pi * z)
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.SetOrigin(tuple(follow.origin))
    field.SetSpacing(spacing)
    grid = nodes.new_grid_transform_node(scene, field, "test grid")
    shift = sitk.TranslationTransform(3, (4.0, -2.0, 1.0))
    linear = nodes.new_linear_transform_node(scene, shift, "test linear")
    linear.SetAndObserveTransformNodeID(grid.GetID())
    s["follow"].SetAndObserveTransformNodeID(linear.GetID())
    calls, added = [], [grid, linear, local.node]
    embedder = logic.session().descriptors
    original = embedder.embed
    monkeypatch.setattr(embedder, "embed", lambda *a, **k: calls.append(1) or original(*a, **k))
    try:
        out = logic.match_points(s["base"], s["follow"], s["points"], method="nn")
        added.append(out.node)
        assert calls == [], "a transform on the follow-up must not recompute its embeddings"
        assert out.node.GetTransformNodeID() == linear.GetID()
        to_world = vtk.vtkGeneralTransform()
        linear.GetTransformToWorld(to_world)
        for i, r in enumerate(out.results):
            np.testing.assert_allclose(r.query_point.as_array(), local.results[i].query_point.as_array(), atol=1e-6)
            p = [0.0, 0.0, 0.0]
            out.node.GetNthControlPointPositionWorld(i, p)
            expected = to_world.TransformPoint(tuple(lps_to_ras(r.query_point.to("LPS").as_array())))
            np.testing.assert_allclose(p, expected, atol=1e-4)
        lesion = logic.propagate_lesion(s["base"], s["follow"], s["points"], 0, radius_mm=6.0)
        added += [lesion.points_node, lesion.segmentation_node]
        assert lesion.segmentation_node.GetTransformNodeID() == linear.GetID()
        assert calls == []
    finally:
        s["follow"].SetAndObserveTransformNodeID(None)
        for node in added:
            scene.RemoveNode(node)


def test_dicom_modality_is_read_from_the_subject_hierarchy():
    """Slicer's DICOM plugins store the series modality as a subject hierarchy item attribute."""
    scene = slicer.vtkMRMLScene()
    node = nodes.volume_to_node(synthetic(), scene, "dicom series")
    assert nodes.node_modality(node) == "CT"  # volume_to_node keeps the volume's modality
    node.RemoveAttribute("SAMv2.Modality")  # a DICOM-loaded node has only the subject hierarchy's
    assert nodes.node_modality(node) == "auto"
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = shn.CreateItem(shn.GetSceneItemID(), node)  # what DICOMPlugin.addSeriesInSubjectHierarchy does
    shn.SetItemAttribute(item, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(), "MR")
    assert nodes.node_modality(node) == "MR"
    vol = L.SAMv2Logic(scene).volume(node)
    assert vol.modality.value == "MR"
    node.SetAttribute("SAMv2.Modality", "CT")  # the module's own attribute wins
    assert nodes.node_modality(node) == "CT"
