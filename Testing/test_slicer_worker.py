"""The Slicer module's worker process, driven in plain Python through its JSON-lines protocol.

The worker is the real server module started with this Python (as Slicer starts it with
PythonSlicer); the node side uses slicer-core's MRML. An untrained lite network saved as a
real weights file and small crops of a real CT keep it fast: these tests check plumbing
(progress, results, cancel, crashes, no partial nodes), not accuracy.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
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
from SAMv2SlicerLib import logic as L  # noqa: E402
from SAMv2SlicerLib import nodes, ops, protocol, steps  # noqa: E402
from SAMv2SlicerLib.worker import TaskState, WorkerProcess, find_python  # noqa: E402


def scene_state(scene) -> dict:
    return {scene.GetNthNode(i).GetID(): scene.GetNthNode(i).GetMTime() for i in range(scene.GetNumberOfNodes())}


@pytest.fixture(scope="module")
def scene_pair(lung_crop):
    """A scene with a small real CT crop (baseline), its simulated follow-up and lesion points."""
    from samv2core.simulate import simulate_followup

    base = Volume.from_sitk(lung_crop.to_sitk()[20:84, 10:74, 4:26], "CT", name="crop")
    follow = simulate_followup(base, seed=5, deformation_mm=0.0).followup
    scene = slicer.vtkMRMLScene()
    bnode = nodes.volume_to_node(base, scene, "baseline")
    fnode = nodes.volume_to_node(follow, scene, "followup")
    centre = base.index_to_lps((np.asarray(base.size_xyz) - 1) / 2)
    lesions = np.array([centre, centre + [8.0, 6.0, 3.0]])
    points = nodes.new_point_list(scene, "Lesions", lps_to_ras(lesions), ["T1", "T2"])
    return {"scene": scene, "base": bnode, "follow": fnode, "points": points, "lesions_lps": lesions}


@pytest.fixture(scope="module")
def worker(lite_model_file, tmp_path_factory):
    w = WorkerProcess(workdir=tmp_path_factory.mktemp("worker"), env={"OMP_NUM_THREADS": "1"})
    w.set_model(str(lite_model_file), "cpu")
    yield w
    w.close()
    assert not w.running


def _logic(scene_pair, worker, lite_model_file):
    """The logic as the controller makes it: its volume files go into the worker's private folder."""
    logic = L.SAMv2Logic(scene_pair["scene"], workdir=worker.workdir)
    logic.set_model(str(lite_model_file), "cpu")
    return logic


def _volume_file(worker, volume: Volume, name: str) -> ops.VolumeRef:
    path = worker.volume_folder / f"{name}.nrrd"
    protocol.write_image(volume.to_sitk(), path)
    return ops.VolumeRef(str(path), volume.modality.value, name)


def test_find_python(tmp_path):
    assert find_python() == sys.executable  # plain Python: this interpreter
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    (tmp_path / name).write_text("")
    assert find_python(str(tmp_path)) == str(tmp_path / name)  # next to the Slicer executable
    if shutil.which("PythonSlicer") is None:
        with pytest.raises(OSError, match="PythonSlicer"):  # WorkerStartError: reported, never a traceback
            find_python(str(tmp_path / "elsewhere"))


def test_progress_then_result_matches_in_process(worker, scene_pair, lite_model_file):
    s = scene_pair
    logic = _logic(s, worker, lite_model_file)
    job = logic.prepare_match(s["base"], s["follow"], s["points"], method="fixed_point")
    logic.export(job)
    for ref in (job.request.template, job.request.query):  # the node's own voxel type, not a float copy
        assert sitk.ReadImage(ref.path).GetPixelID() == sitk.sitkFloat32  # volume_to_node made float32 nodes
    embed = worker.submit(ops.EmbedRequest((job.request.template, job.request.query)))
    fractions = []
    while not embed.finished:
        worker.poll()
        fractions.append(embed.progress.fraction)
        time.sleep(0.005)
    assert embed.state == TaskState.DONE, embed.error_message
    assert embed.result == ["baseline", "followup"] and embed.device == "cpu"  # the worker reports its device
    distinct = sorted(set(fractions))
    assert len(distinct) >= 3 and distinct[-1] == pytest.approx(1.0), distinct  # progress streamed
    pid = worker.pid
    # the click: the worker's embeddings are reused, the result equals the in-process run
    task = worker.submit_job(job)
    assert worker.wait(task, 120) == TaskState.DONE, task.error_message
    assert worker.pid == pid
    reference = steps.match(logic.session(), logic._load(job.request.template), logic._load(job.request.query),
                            job.request.points_lps, "fixed_point")
    for got, want in zip(task.result, reference):
        np.testing.assert_allclose(got.query_point.as_array(), want.query_point.as_array(), atol=1e-6)
        assert got.score == pytest.approx(want.score, abs=1e-6) and got.confident == want.confident
    before = set(scene_state(s["scene"]))
    outcome = logic.finish(job, task.result)  # main thread: the nodes appear only now
    assert outcome.node.GetNumberOfControlPoints() == 2 and outcome.node.GetID() not in before
    assert not protocol.result_folder(worker.workdir, task.id).exists()  # result files removed once read


def test_cancel_ends_the_request_and_keeps_the_worker(worker, scene_pair):
    base = nodes.volume_from_node(scene_pair["base"])
    fresh = _volume_file(worker, base.with_array(np.flip(base.array, 2).copy(), name="flipped"), "flipped")
    task = worker.submit(ops.EmbedRequest((fresh,)))  # not embedded yet
    _poll_while(worker, lambda: task.state == TaskState.QUEUED and not task.finished)
    pid = worker.pid
    worker.cancel(task)
    t0 = time.monotonic()
    assert worker.wait(task, 30) == TaskState.CANCELLED
    assert time.monotonic() - t0 < worker.cancel_timeout  # stopped cooperatively, not killed
    assert task.error_kind == "" and task.result is None
    assert worker.run("ping", timeout=30)["pid"] == pid  # same process, still serving


def test_cancel_of_a_queued_request_is_answered_at_once(worker, scene_pair):
    """Defect 5: a request queued behind a long one is cancelled at once by the worker; the long
    one (the background embedding) goes on, and the process with its loaded model stays."""
    base = nodes.volume_from_node(scene_pair["base"])
    slow = worker.submit(ops.EmbedRequest((_volume_file(worker, base.with_array(base.array[::-1, ::-1].copy()),
                                                        "reversed"),)))
    queued = worker.submit("ping")
    _poll_while(worker, lambda: slow.state != TaskState.RUNNING and not slow.finished)
    pid = worker.pid
    worker.cancel(queued)
    t0 = time.monotonic()
    assert worker.wait(queued, 10) == TaskState.CANCELLED and queued.error_kind == ""
    assert time.monotonic() - t0 < 1.0
    assert worker.wait(slow, 120) == TaskState.DONE, slow.error_message
    info = worker.run("ping", timeout=30)
    assert info["pid"] == pid and info["model_loaded"] and info["embeddings"] >= 1


def _poll_while(worker, condition, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while condition():
        assert time.monotonic() < end, "the worker did not get there in time"
        worker.poll()
        time.sleep(0.002)


def _wait_until_stopped(pid: int, timeout: float = 10.0) -> None:
    end = time.monotonic() + timeout
    while Path(f"/proc/{pid}/stat").exists() and time.monotonic() < end:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.01)


def test_unresponsive_worker_is_killed_after_the_cancel_timeout_and_restarted(worker):
    if not hasattr(signal, "SIGSTOP"):
        pytest.skip("not available: needs POSIX SIGSTOP to freeze the worker")
    assert worker.cancel_timeout == 2.0  # the module's default
    pid = worker.pid or worker.run("ping", timeout=30)["pid"]
    starts = worker.starts
    os.kill(pid, signal.SIGSTOP)  # a worker stuck in a step that reports no progress
    _wait_until_stopped(pid)  # (its reader thread would otherwise still answer the cancel at once)
    task = worker.submit("ping")
    worker.cancel(task)
    t0 = time.monotonic()
    assert worker.wait(task, 10) == TaskState.CANCELLED
    waited = time.monotonic() - t0
    assert 1.9 < waited < 5.0, waited
    assert task.error_kind == "Killed" and "did not stop within 2 s" in task.error_message
    assert not worker.running
    assert worker.run("ping", timeout=60)["pid"] != pid  # restarted on next use
    assert worker.starts == starts + 1


def test_crashed_worker_is_reported_and_restarted_without_partial_nodes(worker, scene_pair, lite_model_file):
    s = scene_pair
    logic = _logic(s, worker, lite_model_file)
    follow = nodes.volume_from_node(s["follow"])
    job = logic.prepare_propagate_lesion(s["base"], s["follow"], s["points"], 0, radius_mm=5.0)
    logic.export(job)
    # a step that is still running (a volume it has not embedded yet) when the process dies
    slow = worker.submit(ops.EmbedRequest((_volume_file(worker, follow.with_array(follow.array[::-1].copy()),
                                                        "upside down"),)))
    task = worker.submit_job(job)  # queued behind it
    _poll_while(worker, lambda: slow.state != TaskState.RUNNING and not slow.finished)
    before = scene_state(s["scene"])
    old = worker.pid
    os.kill(old, signal.SIGKILL)
    worker.wait(task, 30)
    for t in (slow, task):
        assert t.state == TaskState.FAILED and t.error_kind == "WorkerStopped"
        assert "stopped unexpectedly" in t.error_message and "exit code" in t.error_message
        assert t.result is None
    assert scene_state(s["scene"]) == before  # nothing was applied: no partial nodes
    again = worker.submit_job(job)
    assert worker.wait(again, 120) == TaskState.DONE, again.error_message
    assert worker.pid != old
    outcome = logic.finish(job, again.result)
    assert outcome.segmentation_node.GetSegmentation().GetNumberOfSegments() == 1
    assert outcome.points_node.GetNthControlPointLabel(0).startswith("T1")


def test_bad_input_in_the_worker_is_an_error_not_a_crash(worker, lite_model_file, scene_pair):
    pid = worker.pid or worker.run("ping", timeout=30)["pid"]
    ref = _volume_file(worker, nodes.volume_from_node(scene_pair["base"]), "base for bad model")
    worker.set_model(str(worker.workdir / "missing.safetensors"), "cpu")
    try:
        task = worker.submit(ops.EmbedRequest((ref,)))
        assert worker.wait(task, 60) == TaskState.FAILED
        assert task.error_kind == "CheckpointError" and "not found" in task.error_message
        assert worker.running and worker.pid == pid
    finally:
        worker.set_model(str(lite_model_file), "cpu")


def test_registration_result_round_trips_through_files(tmp_path):
    """The worker's registration result (ITK .tfm + displacement NRRD + report) decodes to the same maps."""
    from samv2core.registration.result import RegistrationResult

    linear = sitk.AffineTransform(3)
    linear.SetMatrix((1.02, 0.05, 0.0, -0.04, 0.98, 0.01, 0.0, 0.02, 1.01))
    linear.SetTranslation((3.0, -2.0, 5.5))
    linear.SetCenter((10.0, 20.0, -30.0))
    field = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 2, (6, 7, 8, 3)), isVector=True)
    field.SetOrigin((-5.0, 0.0, 4.0))
    field.SetSpacing((6.0, 5.0, 4.0))
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(linear)
    composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(field)))
    result = RegistrationResult(linear, field, composite, {"features": "sam", "inliers": np.int64(42)})
    op = ops.OPERATIONS["register"]
    sent = ops.RegisterResult(result.linear, result.displacement, result.report)
    data = protocol.decode(protocol.encode({"result": op.encode_result(sent, tmp_path)}))
    back = op.decode_result(data["result"], tmp_path)
    pts = np.random.default_rng(1).uniform(0, 30, (20, 3))
    np.testing.assert_allclose(back.transform_points(pts), result.transform_points(pts), atol=1e-9)
    assert back.report == {"features": "sam", "inliers": 42}
    options = protocol.plain(dataclasses.asdict(_options()))
    request = ops.RegisterRequest(ops.VolumeRef("a.nrrd", "CT", "a"), ops.VolumeRef("b.nrrd", "CT", "b"), "rigid",
                                  False, options)
    args = protocol.decode(protocol.encode(ops.encode_request(request)))
    decoded = ops.decode_request("register", args)
    assert decoded == request and ops.registration_options(decoded.options) == _options()  # survive the pipe


def _options():
    from samv2core.registration import DeformableOptions, RegistrationOptions

    return RegistrationOptions(refine=False, features="mind", deformable=DeformableOptions(levels_mm=(16.0,),
                                                                                            iterations=(5,)))


def test_module_session_stays_qt_and_slicer_free():
    """The worker imports neither Qt nor Slicer: it runs with any Python that has samv2core."""
    code = ("import sys; import SAMv2SlicerLib.server, SAMv2SlicerLib.worker; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('slicer', 'qt', 'vtk', 'PySide6', 'PyQt5')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "SAMv2Slicer"), str(REPO / "SAMv2Core"),
                                                       os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                                        env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# the worker protocol under hostile or faulty input (issue 23): ids never become paths, only
# regular files inside the private folder are read, a bad line never kills the reader, and
# the worker exits when stdin closes
# --------------------------------------------------------------------------------------------
class RawServer:
    """The server process driven line by line, as a hostile client could."""

    def __init__(self, workdir: Path):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "SAMv2Slicer"), str(REPO / "SAMv2Core"),
                                                           os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "SAMv2SlicerLib.server", "--workdir", str(workdir)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     env=env)
        assert self.read()["event"] == "ready"

    def send(self, line) -> None:
        self.proc.stdin.write(line if isinstance(line, bytes) else protocol.encode(line))
        self.proc.stdin.flush()

    def read(self, timeout: float = 60.0) -> dict:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        assert sel.select(timeout), "no answer from the worker (hung?)"
        return protocol.decode(self.proc.stdout.readline())

    def ask(self, line) -> dict:
        self.send(line)
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def raw_server(tmp_path):
    workdir = tmp_path / "private"
    workdir.mkdir()
    server = RawServer(workdir)
    yield server, workdir
    server.close()


def test_request_ids_never_become_paths(raw_server, tmp_path):
    server, workdir = raw_server
    outside = tmp_path / "x"  # where "results/r/../../../x" would land
    outside.mkdir()
    (outside / "keep.txt").write_text("not the worker's")
    for rid in ("/../../../x", "../../x", -1, 1.5, True):
        answer = server.ask({"id": rid, "op": "embed", "args": {"request": {"volumes": {"volumes": []}}}})
        assert answer["event"] == "error" and answer["id"] is None and "request id" in answer["message"]
        server.send({"op": "cancel", "id": rid})
        assert server.read()["event"] == "error"
    assert (outside / "keep.txt").read_text() == "not the worker's"
    assert server.ask({"id": 1, "op": "ping", "args": {}})["result"]["pid"] == server.proc.pid


def test_a_list_or_object_id_is_an_error_and_the_reader_survives(raw_server):
    server, _ = raw_server
    for rid in ([1, 2], {"a": 1}):
        for op in ("ping", "cancel"):
            answer = server.ask({"id": rid, "op": op})
            assert answer["event"] == "error" and answer["id"] is None
    for bad in (b"not json\n", b"[1, 2]\n", b"\xff\xfe\n"):
        assert server.ask(bad)["event"] == "error"
    assert server.ask({"id": 7, "op": "ping"})["id"] == 7  # still reading and serving


def test_worker_reads_only_regular_files_inside_its_private_folder(raw_server, tmp_path, scene_pair):
    server, workdir = raw_server
    outside = tmp_path / "outside.nrrd"
    protocol.write_image(nodes.volume_from_node(scene_pair["base"]).to_sitk(), outside)
    link = workdir / "link.nrrd"
    link.symlink_to(outside)
    fifo = workdir / "fifo.nrrd"
    os.mkfifo(fifo)
    cases = {str(outside): "outside the worker's private folder", str(link): "outside the worker's private folder",
             str(workdir / ".." / "outside.nrrd"): "outside the worker's private folder",
             str(fifo): "not a regular file", str(workdir): "not a regular file",
             str(workdir / "missing.nrrd"): "not found"}
    for i, (path, reason) in enumerate(cases.items()):
        request = {"volumes": {"volumes": [{"path": path, "modality": "CT", "name": "v"}]}}
        t0 = time.monotonic()
        answer = server.ask({"id": i, "op": "embed", "args": {"request": request}})
        assert answer["event"] == "error" and reason in answer["message"], (path, answer)
        assert time.monotonic() - t0 < 30  # never blocks on a FIFO
        assert str(tmp_path) not in answer["message"]  # names the file, not where things are
    answer = server.ask({"id": 50, "op": "match", "args": {"request": {
        "template": "/etc/passwd", "query": {"volume": {"path": 1, "modality": "CT", "name": "q"}},
        "points_lps": {"array": [[0, 0, 0]]}, "method": "nn"}}})
    assert answer["event"] == "error" and "volume reference" in answer["message"]  # checked references only
    answer = server.ask({"id": 51, "op": "match", "args": {"request": {
        "template": "/etc/passwd", "query": "/etc/passwd", "points_lps": {"array": [[0, 0, 0]]}, "method": "nn"}}})
    assert answer["event"] == "error" and "template must be a volume reference" in answer["message"]
    # a model file the client names must be a regular file too (a FIFO would block the load)
    os.mkfifo(tmp_path / "model.safetensors")
    request = {"volumes": {"volumes": [{"path": str(workdir / "missing.nrrd"), "modality": "CT", "name": "v"}]}}
    answer = server.ask({"id": 99, "op": "embed", "args": {"model": {"path": str(tmp_path / "model.safetensors"),
                                                                     "device": "cpu"}, "request": request}})
    assert answer["event"] == "error" and answer["kind"] == "CheckpointError" and "not a regular file" in answer["message"]


def test_worker_exits_when_stdin_closes_even_after_bad_lines(raw_server):
    server, _ = raw_server
    assert server.ask({"id": [1], "op": "ping"})["event"] == "error"
    server.proc.stdin.close()
    assert server.proc.wait(20) == 0
