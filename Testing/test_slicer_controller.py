"""The Slicer module's controller, driven in plain Python on slicer-core's MRML: the whole GUI
flow without Qt (parameters in, poll until done, nodes out), cancel, a worker crash, results that
follow the selected node, scene close, the modality control, and the GUI process staying free
of torch. The worker is the real server process; an untrained lite network saved as a real
weights file and small crops of a real CT keep it fast (plumbing, not accuracy).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("not available: this 'slicer' package has no MRML (install slicer-core)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "SAMv2Slicer"))

from samv2core.coords import lps_to_ras  # noqa: E402
from samv2core.volume import Volume  # noqa: E402
from SAMv2SlicerLib import controller as C  # noqa: E402
from SAMv2SlicerLib import nodes  # noqa: E402
from SAMv2SlicerLib.worker import TaskState  # noqa: E402

GUI_MODULES = ("cancellation", "constants", "controller", "corepath", "dependencies", "logic", "nodes", "ops",
               "protocol", "slicer_sample_data", "worker")


def scene_state(scene) -> dict:
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}


def _int16_node(volume: Volume, scene, name: str):
    """A volume node holding int16 voxels, as a CT loaded in Slicer does."""
    from vtk.util import numpy_support

    node = nodes.volume_to_node(volume, scene, name)
    arr = np.clip(np.round(volume.array), -32768, 32767).astype(np.int16)
    node.GetImageData().GetPointData().SetScalars(numpy_support.numpy_to_vtk(arr.ravel(), deep=True))
    node.GetImageData().Modified()
    return node


@pytest.fixture
def gui(lung_crop, lite_model_file, tmp_path):
    """A scene with a real CT crop and its simulated follow-up, parameters as the widget holds
    them, and a controller with its worker (this Python, one thread)."""
    from samv2core.simulate import simulate_followup

    base = Volume.from_sitk(lung_crop.to_sitk()[20:84, 10:74, 4:26], "CT", name="crop")
    follow = simulate_followup(base, seed=5, deformation_mm=0.0).followup
    scene = slicer.vtkMRMLScene()
    bnode, fnode = _int16_node(base, scene, "baseline"), _int16_node(follow, scene, "followup")
    label = nodes.volume_to_node(base.with_array((base.array > 0).astype(np.float32)), scene, "mask", label_map=True)
    centre = base.index_to_lps((np.asarray(base.size_xyz) - 1) / 2)
    points = nodes.new_point_list(scene, "Lesions", lps_to_ras(np.array([centre, centre + [8.0, 6.0, 3.0]])),
                                  ["T1", "T2"])
    p = C.Parameters(useBundledModel=False, modelPath=str(lite_model_file), device="cpu", sourcePoints=points,
                     matchingMethod="nn")
    p.baselineVolume, p.followupVolume = C.default_pair(scene)
    ctl = C.Controller(scene, python=lambda: sys.executable, temp_root=tmp_path / "slicer-temp",
                       cache_dir=tmp_path / "cache", worker_env={"OMP_NUM_THREADS": "1"})
    yield {"scene": scene, "p": p, "ctl": ctl, "base": bnode, "follow": fnode, "label": label, "points": points}
    ctl.close()
    assert not ctl.workdir.exists()  # the private folder (patient volumes) is deleted


def _run(ctl, action, p, **kw):
    done = []
    assert ctl.start(action, p, done.append, **kw), ctl.status
    ctl.wait(300)
    assert not ctl.status_error, ctl.status
    assert len(done) == 1
    return done[0]


def test_whole_gui_flow_without_qt(gui):
    """Selection -> background embedding -> match -> propagate -> register, as the widget drives
    it (poll from a timer), with every output node made on this thread."""
    ctl, p, scene = gui["ctl"], gui["p"], gui["scene"]
    assert (p.baselineVolume, p.followupVolume) == (gui["base"], gui["follow"])  # never the label map (defect 11)
    assert ctl.workdir.parent.name == "slicer-temp"  # under Slicer's temporary folder, not the system's (defect 8)
    assert oct(ctl.workdir.stat().st_mode & 0o777) == "0o700"  # private: patient volumes go through it
    ctl.selection_changed(p)
    assert ctl.worker is None and ctl.active  # nothing started inside the selection event
    ctl.poll()
    assert ctl.state().embedding and ctl.worker.running
    files = sorted(ctl.logic.volume_folder.glob("*.nrrd"))
    assert len(files) == 2 and {sitk.ReadImage(str(f)).GetPixelID() for f in files} == {sitk.sitkInt16}  # native
    ctl.wait(300)
    assert "Both volumes are embedded (cpu)" in ctl.status
    before = set(scene_state(scene))
    match = _run(ctl, "match", p)
    p.matchedPoints = match.node  # what the widget's on-done does
    assert match.node.GetNumberOfControlPoints() == 2 and match.node.GetID() not in before
    assert "computed on cpu" in ctl.status
    rows = C.result_rows(p.matchedPoints)
    assert [r.label[:2] for r in rows] == ["T1", "T2"]
    lesion = _run(ctl, "propagate", p, point_index=1)
    assert lesion.points_node.GetNthControlPointLabel(0).startswith("T2")
    assert lesion.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    p.registrationMode = "rigid"
    reg = _run(ctl, "register", p)
    assert reg.linear_node.IsA("vtkMRMLLinearTransformNode") and gui["follow"].GetTransformNodeID() == reg.linear_node.GetID()
    assert ctl.worker.starts == 1  # one process served the whole session
    assert len(list(ctl.logic.volume_folder.glob("*.nrrd"))) <= 6 + 1  # exports are bounded (defect 8)


def test_results_follow_the_selected_node(gui):
    """Defect 3: the rows shown are read from the node the parameter node selects, whichever it is."""
    ctl, p = gui["ctl"], gui["p"]
    first = _run(ctl, "match", p).node
    gui["points"].SetNthControlPointLabel(0, "renamed")
    second = _run(ctl, "match", p).node
    for node in (first, second, first):
        p.matchedPoints = node
        rows = C.result_rows(p.matchedPoints)
        assert [r.label for r in rows] == [node.GetNthControlPointLabel(i) for i in range(2)]
        assert [r.description for r in rows] == [node.GetNthControlPointDescription(i) for i in range(2)]
    assert C.result_rows(None) == []


def test_cancel_keeps_the_background_embedding_and_the_loaded_model(gui):
    """Defect 5: cancelling a match queued behind the background embedding ends the match at
    once; the embedding finishes and the same worker, with its model loaded, serves on."""
    ctl, p = gui["ctl"], gui["p"]
    ctl.selection_changed(p)
    ctl.poll()
    embedding = ctl._embed_task
    while embedding.state != TaskState.RUNNING and not embedding.finished:
        ctl.poll()
        time.sleep(0.002)
    done = []
    assert ctl.start("match", p, done.append)
    ctl.poll()  # exported and sent: queued behind the embedding
    pid = ctl.worker.pid
    ctl.cancel()
    t0 = time.monotonic()
    while ctl.busy:
        ctl.poll()
        time.sleep(0.005)
    assert time.monotonic() - t0 < ctl.worker.cancel_timeout and "cancelled" in ctl.status and done == []
    ctl.wait(300)
    assert embedding.state == TaskState.DONE and ctl.worker.pid == pid and ctl.worker.starts == 1
    info = ctl.worker.run("ping", timeout=30)
    assert info["model_loaded"] and info["embeddings"] >= 2
    _run(ctl, "match", p)  # the next click only matches, in the same process
    assert ctl.worker.pid == pid


def test_worker_crash_is_reported_and_the_next_run_restarts_it(gui):
    ctl, p, scene = gui["ctl"], gui["p"], gui["scene"]
    before = scene_state(scene)
    done = []
    assert ctl.start("match", p, done.append)
    ctl.poll()
    os.kill(ctl.worker.pid, signal.SIGKILL)
    state = ctl.wait(60)
    assert state.error and "stopped unexpectedly" in state.status and "nothing was added" in state.status
    assert done == [] and scene_state(scene) == before
    _run(ctl, "match", p)
    assert ctl.worker.starts == 2


def test_a_worker_that_cannot_start_is_a_message(gui):
    """Defect 9: no PythonSlicer next to Slicer is one status line, never a traceback."""
    from SAMv2SlicerLib.worker import find_python

    ctl = C.Controller(gui["scene"], python=lambda: find_python("/nonexistent/Slicer/bin"),
                       temp_root=gui["ctl"].workdir.parent)
    try:
        assert ctl.start("match", gui["p"], lambda o: None)
        state = ctl.wait(10)
        assert state.error and "could not start" in state.status and "PythonSlicer" in state.status
    finally:
        ctl.close()


def test_scene_close_stops_the_step_and_applies_nothing(gui):
    ctl, p, scene = gui["ctl"], gui["p"], gui["scene"]
    ctl.selection_changed(p)
    ctl.poll()
    done = []
    assert ctl.start("register", p, done.append)
    ctl.poll()
    before = scene_state(scene)
    ctl.scene_closing()  # StartCloseEvent: waits until every step has ended
    assert not ctl.active and not ctl.busy
    for _ in range(20):
        ctl.poll()
    assert done == [] and scene_state(scene) == before
    assert list(ctl.logic.volume_folder.glob("*.nrrd")) == []  # the closed scene's volumes are gone
    _run(ctl, "match", p)  # the module works on in the next scene


def test_bad_input_is_said_on_the_click_and_nothing_starts(gui):
    ctl, p = gui["ctl"], gui["p"]
    p.followupVolume = p.baselineVolume
    assert not ctl.start("match", p, lambda o: None)
    assert ctl.status_error and "same volume" in ctl.status and not ctl.active and ctl.worker is None
    p.followupVolume, p.useBundledModel, p.modelPath = gui["follow"], False, ""
    assert not ctl.start("match", p, lambda o: None) and "weights file" in ctl.status


def test_modality_control_reaches_the_worker(gui):
    """Defect 2 (GUI side): the Modality control overrides what the node says; auto keeps the node's."""
    ctl, p = gui["ctl"], gui["p"]
    job = ctl.logic.prepare_match(p.baselineVolume, p.followupVolume, p.sourcePoints, "nn", modality=p.modality)
    assert job.request.template.modality == "CT"  # auto: the node's attribute
    p.modality = "MR"
    assert ctl.start("match", p, lambda o: None)
    ctl.poll()
    request = ctl._job.request
    assert request.template.modality == request.query.modality == "MR"
    from SAMv2SlicerLib import protocol

    assert protocol.read_volume(request.template.path, request.template.modality).modality.value == "MR"
    ctl.wait(300)


def test_disk_cache_is_off_by_default_bounded_and_clearable(gui, tmp_path):
    """Defect 8: embeddings (patient-derived) stay on disk only when the user asks; the folder
    is pruned to a bound at each worker start and can be cleared."""
    ctl, p = gui["ctl"], gui["p"]
    _run(ctl, "match", p)
    assert ctl.worker.cache_dir is None and not (tmp_path / "cache").exists()
    p.keepEmbeddingsOnDisk = True
    _run(ctl, "match", p)
    assert ctl.worker.cache_dir == str(tmp_path / "cache") and any((tmp_path / "cache").iterdir())
    ctl.clear_disk_cache()
    assert not (tmp_path / "cache").exists() and ctl.worker is None
    folder = tmp_path / "prune"
    folder.mkdir()
    for i in range(5):
        (folder / f"{i}.safetensors").write_bytes(b"x" * 1000)
        os.utime(folder / f"{i}.safetensors", (1000 + i, 1000 + i))
    assert C.prune_cache(folder, 2500) == 3000
    assert sorted(f.name for f in folder.iterdir()) == ["3.safetensors", "4.safetensors"]  # newest kept


def test_closed_surface_segment_can_be_propagated(gui):
    """Defect 7: a segment with only a closed-surface representation (RTSTRUCT, models) gets a
    binary labelmap made before it is read."""
    import vtk

    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():  # the application's Segmentations module registers these at start-up
        for rule in (slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule,
                     slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule):
            factory.RegisterConverterRule(rule())
    scene = gui["scene"]
    seg = slicer.vtkMRMLSegmentationNode()
    scene.AddNode(seg)
    seg.SetReferenceImageGeometryParameterFromVolumeNode(gui["base"])
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(*nodes.read_points(gui["points"]).ras[0])
    sphere.SetRadius(6.0)
    sphere.Update()
    seg.GetSegmentation().SetSourceRepresentationName("Closed surface")
    segment_id = seg.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "surface lesion")
    mask = nodes.segment_mask(seg, segment_id)
    assert 0.5 * (4 / 3 * np.pi * 6.0 ** 3) < mask.array.sum() * np.prod(mask.spacing) < 1.5 * (4 / 3 * np.pi * 6.0 ** 3)


def test_gui_side_never_imports_torch(lite_model_file, tmp_path, lung_crop):
    """Issue 20: every GUI-side module, and the module file itself (with stand-ins for the Qt /
    application imports), load without torch; a whole match through the controller leaves the
    GUI process without torch (the worker imports it)."""
    crop = tmp_path / "crop.nrrd"
    sitk.WriteImage(lung_crop.to_sitk()[20:84, 10:74, 4:26], str(crop))
    code = f"""
import sys, types
sys.path.insert(0, {str(REPO / 'SAMv2Slicer')!r})
import slicer
def stub(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m
class Base:
    def __init__(self, *a, **k): pass
stub("qt"); stub("ctk")
stub("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
     ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleTest=Base)
stub("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda c: c, Choice=lambda *a: None, WithinRange=lambda *a: None)
stub("slicer.i18n", tr=lambda s: s, translate=lambda ctx, s: s)
import SAMv2Slicer
for name in {GUI_MODULES!r}:
    __import__("SAMv2SlicerLib." + name)
from SAMv2SlicerLib import controller as C, dependencies, nodes
from samv2core.volume import load_volume
from samv2core.coords import lps_to_ras
assert dependencies.torch_available()
scene = slicer.vtkMRMLScene()
v = load_volume({str(crop)!r}, "CT")
b = nodes.volume_to_node(v, scene, "b")
f = nodes.volume_to_node(v.with_array(v.array[:, :, ::-1].copy()), scene, "f")
pts = nodes.new_point_list(scene, "p", lps_to_ras(v.index_to_lps([[30, 30, 10]])), ["A"])
p = C.Parameters(baselineVolume=b, followupVolume=f, sourcePoints=pts, useBundledModel=False,
                 modelPath={str(lite_model_file)!r}, device="auto", matchingMethod="nn")
ctl = C.Controller(scene, python=lambda: sys.executable, temp_root={str(tmp_path)!r},
                   worker_env={{"OMP_NUM_THREADS": "1"}})
done = []
ctl.selection_changed(p)
ctl.wait(300)
assert ctl.start("match", p, done.append), ctl.status
ctl.wait(300)
ctl.close()
assert done and not ctl.status_error, ctl.status
print("device", ctl.device_used)
print("torch loaded:", "torch" in sys.modules)
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "SAMv2Core"), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torch loaded: False" in proc.stdout
    assert "device cpu" in proc.stdout  # 'auto' was resolved by the worker, which reported it


def test_source_checkout_finds_the_core_without_install(tmp_path):
    """Defect 1: with only SAMv2Slicer/ on the path (Slicer's additional module path) and samv2core
    not installed, the module puts ../SAMv2Core on sys.path itself."""
    code = (f"import sys; sys.path.insert(0, {str(REPO / 'SAMv2Slicer')!r}); import importlib.util; "
            "assert importlib.util.find_spec('samv2core') is None, 'samv2core is importable already'; "
            "from SAMv2SlicerLib.corepath import ensure_core_importable; added = ensure_core_importable(); "
            "import samv2core.errors; print(added); print(samv2core.errors.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -S: no site-packages, so an installed samv2core (pip install -e) cannot hide the case
    proc = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, timeout=60, env=env,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    added, found = proc.stdout.split()
    assert Path(added) == REPO / "SAMv2Core" and Path(found).is_relative_to(REPO / "SAMv2Core")
