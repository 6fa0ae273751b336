"""The module's controller: everything the widget does beyond binding controls, without Qt.

It owns the model choice, the worker process, the background embedding of the selected
pair, the user's step (match / propagate / register), cancel, and the run state the widget
shows. The widget calls :meth:`Controller.poll` from a QTimer while :attr:`Controller.active`;
tests call it in a loop on slicer-core's MRML.

Nothing here imports torch or runs heavy work: requests are prepared from node geometry on
the click, their volumes are exported (native voxel type, once per node state) on the next
poll, and the worker computes. The parameters are read from any object with the parameter
node's attribute names (:class:`Parameters` in plain Python, the parameterNodeWrapper in
Slicer).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from samv2core.errors import InputError, SAMv2Error

from .logic import SAMv2Logic, check_device
from .worker import TaskState, WorkerProcess, WorkerTask

_log = logging.getLogger(__name__)
DISK_CACHE_MAX_BYTES = 2 * 1024**3  # the on-disk embedding cache is pruned to this at each worker start


@dataclass
class Parameters:
    """The parameter node's fields, for plain Python (tests, scripts); same names and defaults."""

    baselineVolume: Any = None
    followupVolume: Any = None
    useBundledModel: bool = True
    modelPath: str = ""
    device: str = "auto"
    modality: str = "auto"
    keepEmbeddingsOnDisk: bool = False
    sourcePoints: Any = None
    matchingMethod: str = "refined"
    matchedPoints: Any = None
    useLesionSegment: bool = False
    lesionSegmentation: Any = None
    lesionSegmentID: str = ""
    lesionRadius: float = 10.0
    registrationMode: str = "affine"
    deformable: bool = False
    refineLinear: bool = True
    registrationFeatures: str = "auto"
    outputLinearTransform: Any = None
    outputGridTransform: Any = None


@dataclass(frozen=True)
class RunState:
    """What the widget shows: the user's step (busy, its progress) and the status line."""

    busy: bool
    fraction: float
    status: str
    error: bool
    cancelling: bool
    embedding: bool  # the background embedding is still running


@dataclass(frozen=True)
class ResultRow:
    label: str
    score: str
    confident: bool
    description: str


def result_rows(node) -> list[ResultRow]:
    """The rows of the results table for a matched point list node (none for None): read from
    the node itself, so the table always shows the node that is selected."""
    if node is None:
        return []
    scores = json.loads(node.GetAttribute("SAMv2.Scores") or "[]")
    confident = json.loads(node.GetAttribute("SAMv2.Confident") or "[]")
    rows = []
    for i in range(node.GetNumberOfControlPoints()):
        ok = confident[i] if i < len(confident) else bool(node.GetNthControlPointSelected(i))
        rows.append(ResultRow(node.GetNthControlPointLabel(i), f"{scores[i]:.2f}" if i < len(scores) else "",
                              bool(ok), node.GetNthControlPointDescription(i)))
    return rows


def default_pair(scene, baseline=None, followup=None) -> tuple:
    """Baseline and follow-up to preselect: the first two image volumes (never a label map)."""
    volumes = [scene.GetNthNodeByClass(i, "vtkMRMLScalarVolumeNode")
               for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"))]
    images = [v for v in volumes if not v.IsA("vtkMRMLLabelMapVolumeNode")]
    if baseline is None and images:
        baseline = images[0]
    if followup is None:
        others = [v for v in images if v is not baseline]
        followup = others[0] if others else None
    return baseline, followup


def prune_cache(folder: "str | Path", max_bytes: int) -> int:
    """Delete the oldest files of ``folder`` until it holds at most ``max_bytes``; returns bytes freed."""
    files = []
    for p in Path(folder).glob("*"):
        try:
            if p.is_file() and not p.is_symlink():
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
        except OSError:
            continue
    total, freed = sum(f[1] for f in files), 0
    for _, size, p in sorted(files):
        if total - freed <= max_bytes:
            break
        p.unlink(missing_ok=True)
        freed += size
    return freed


class Controller:
    """See the module docstring. ``scene``: the MRML scene; ``python``: the interpreter of the
    worker (a callable, so that a missing PythonSlicer is reported on use, not at start-up);
    ``dependencies_ready``: True when torch and the requirements are installed (checked without
    importing torch); ``ensure_dependencies``: asks to install them (on a button press only)."""

    def __init__(self, scene, python: Callable[[], str], cache_dir: "str | Path | None" = None,
                 temp_root: "str | Path | None" = None,
                 dependencies_ready: Callable[[], bool] = lambda: True,
                 ensure_dependencies: Callable[[], bool] = lambda: True, worker_env: "dict | None" = None):
        self.scene = scene
        self._python = python
        self.cache_dir = Path(cache_dir) if cache_dir else None
        if temp_root is not None:
            Path(temp_root).mkdir(parents=True, exist_ok=True)
        self.workdir = Path(tempfile.mkdtemp(prefix="samv2-", dir=temp_root))  # private: patient volumes
        self.logic = SAMv2Logic(scene, workdir=self.workdir)
        self._dependencies_ready = dependencies_ready
        self._ensure_dependencies = ensure_dependencies
        self._worker_env = dict(worker_env or {})
        self.worker: Optional[WorkerProcess] = None
        self.status, self.status_error = "", False
        self.device_used = ""  # what the worker reported with its last result
        self._task: Optional[WorkerTask] = None
        self._job = None
        self._on_done: Optional[Callable[[Any], None]] = None
        self._pending = None  # (job, on_done): exported and submitted on the next poll
        self._embed_task: Optional[WorkerTask] = None
        self._embed_wanted = None  # (key, job) of a background embedding to start on the next poll
        self._embedded_key = None

    # --- state ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._task is not None or self._pending is not None

    @property
    def active(self) -> bool:
        """True while :meth:`poll` has work to do (the widget's timer runs)."""
        return self.busy or self._embed_task is not None or self._embed_wanted is not None

    def _say(self, text: str, error: bool = False) -> None:
        self.status, self.status_error = text, error
        (_log.warning if error else _log.info)("SAMv2Slicer: %s", text)

    def state(self) -> RunState:
        task = self._task
        fraction = task.progress.fraction if task is not None else 0.0
        embedding = self._embed_task is not None and not self._embed_task.finished
        return RunState(self.busy, fraction, self.status, self.status_error,
                        bool(task is not None and task.cancel_requested), embedding)

    # --- model and worker -------------------------------------------------------------------
    def _model(self, p) -> tuple[Optional[str], str]:
        """(weights file or None for the bundled model, device) of the parameters; SAMv2Error if unusable."""
        path = str(p.modelPath) if p.modelPath and str(p.modelPath) not in ("", ".") else None
        if not p.useBundledModel and path is None:
            raise InputError("select a weights file, or check 'Bundled model'")
        path = None if p.useBundledModel else path
        self.logic.set_model(path, check_device(p.device))
        return self.logic.model_choice

    def _worker(self, p) -> WorkerProcess:
        """The worker (created on first use; OSError when it cannot start) with the model of ``p``."""
        cache = self.cache_dir if (self.cache_dir and p.keepEmbeddingsOnDisk) else None
        if self.worker is not None and self.worker.cache_dir != (str(cache) if cache else None):
            self._stop_worker()  # the disk-cache setting changed: the next process uses the new one
        if self.worker is None:
            if cache is not None:
                cache.mkdir(parents=True, exist_ok=True)
                prune_cache(cache, DISK_CACHE_MAX_BYTES)
            self.worker = WorkerProcess(python=self._python(), workdir=self.workdir, cache_dir=cache,
                                        env=self._worker_env)
        self.worker.set_model(*self._model(p))
        return self.worker

    def clear_disk_cache(self) -> None:
        """Delete the embeddings kept on disk (the worker is restarted when it used them)."""
        if self.worker is not None and self.worker.cache_dir:
            self._stop_worker()
        if self.cache_dir is not None:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self._say("The embeddings kept on disk were deleted.")

    # --- background embedding ------------------------------------------------------------------
    def selection_changed(self, p) -> None:
        """The volumes or model may have changed: embed the selected pair in the background (on
        the next poll, never inside the selection event). Bad input is said on a button press."""
        if self.busy or self._embed_task is not None or not (p.baselineVolume and p.followupVolume):
            return
        if p.baselineVolume is p.followupVolume or not self._dependencies_ready():
            return
        try:
            model = self._model(p)
            job = self.logic.prepare_embed(p.baselineVolume, p.followupVolume, p.modality)
        except SAMv2Error as exc:  # e.g. a 2D or RGB volume: said when a button is pressed
            _log.info("SAMv2Slicer: no background embedding (%s)", exc)
            return
        key = (tuple(v.path for v in job.request.volumes), model, bool(p.keepEmbeddingsOnDisk))
        if key != self._embedded_key:
            self._embed_wanted = (key, job, p)

    def _start_embedding(self) -> None:
        key, job, p = self._embed_wanted
        self._embed_wanted = None
        try:
            worker = self._worker(p)
            self.logic.export(job)
            self._embed_task = worker.submit_job(job)
            self._embedded_key = key
            self._say("Embedding the volumes in the background.")
        except (SAMv2Error, OSError) as exc:  # said again when a button is pressed
            _log.warning("SAMv2Slicer: background embedding not started (%s)", exc)

    # --- the user's steps ------------------------------------------------------------------------
    def start(self, action: str, p, on_done: Callable[[Any], None], point_index: int = 0) -> bool:
        """Prepare ``action`` ('match', 'propagate' or 'register') from the parameters; it is
        exported and sent on the next poll. False (with the reason in ``status``) when it cannot."""
        if self.busy:
            return False
        if not self._ensure_dependencies():
            self._say("SAMv2 needs PyTorch and its Python packages; nothing was run.", error=True)
            return False
        try:
            self._model(p)
            job = self._prepare(action, p, point_index)
        except SAMv2Error as exc:  # bad input: nothing started, scene unchanged
            self._say(str(exc), error=True)
            return False
        self._pending = (job, on_done, p)
        self._say(f"{job.name}: started")
        return True

    def _prepare(self, action: str, p, point_index: int):
        logic, b, f = self.logic, p.baselineVolume, p.followupVolume
        if action == "match":
            return logic.prepare_match(b, f, p.sourcePoints, p.matchingMethod, modality=p.modality)
        if action == "propagate":
            if p.useLesionSegment:
                return logic.prepare_propagate_lesion(b, f, segmentation_node=p.lesionSegmentation,
                                                      segment_id=p.lesionSegmentID, method=p.matchingMethod,
                                                      modality=p.modality)
            return logic.prepare_propagate_lesion(b, f, p.sourcePoints, int(point_index), radius_mm=p.lesionRadius,
                                                  method=p.matchingMethod, modality=p.modality)
        if action == "register":
            return logic.prepare_register(b, f, p.registrationMode, p.deformable, refine=p.refineLinear,
                                          features=p.registrationFeatures, modality=p.modality)
        raise ValueError(f"unknown action {action!r}")

    def _submit_pending(self) -> None:
        job, on_done, p = self._pending
        self._pending = None
        try:
            worker = self._worker(p)
            self.logic.export(job)  # off the click path: the volumes are written here, once per node state
            self._task, self._job, self._on_done = worker.submit_job(job), job, on_done
        except SAMv2Error as exc:
            self._say(f"{job.name} failed: {exc}", error=True)
        except OSError as exc:  # no PythonSlicer, no space for the volumes, ...
            self._say(f"{job.name} failed: the SAMv2 worker process could not start: {exc}", error=True)

    def cancel(self) -> None:
        """Cancel the user's step only: the background embedding and the loaded model stay."""
        if self._pending is not None:
            name = self._pending[0].name
            self._pending = None
            self._say(f"{name}: cancelled; nothing was added to the scene.")
        elif self._task is not None and self.worker is not None:
            self.worker.cancel(self._task)
            self._say("Cancelling...")

    # --- the poll (the widget's QTimer) ------------------------------------------------------------
    def poll(self) -> RunState:
        """Send what is pending, read what the worker sent, apply a finished result (main thread).
        Never blocks for long: exports are the only file writes and happen once per node state."""
        if self._pending is not None:
            self._submit_pending()
        elif self._embed_wanted is not None and self._task is None:
            self._start_embedding()
        if self.worker is not None:
            self.worker.poll()
        embed = self._embed_task
        if embed is not None and embed.finished:
            self._embed_task = None
            if embed.state == TaskState.DONE:
                self.device_used = embed.device or self.device_used
                if self._task is None:
                    self._say(f"Both volumes are embedded ({self.device_used}): a click now only matches.")
            else:
                self._embedded_key = None  # try again on the next selection change
                if embed.state == TaskState.FAILED:
                    _log.warning("SAMv2Slicer: background embedding failed: %s", embed.error_message)
        task = self._task
        if task is not None and not task.finished:
            waiting = task.state == TaskState.QUEUED and self._embed_task is not None
            if not task.cancel_requested:
                self.status = (f"{task.name}: waiting for the background embedding" if waiting
                               else f"{task.name}: {task.progress.message}")
        elif task is not None:
            self._finish(task)
        return self.state()

    def _finish(self, task: WorkerTask) -> None:
        job, on_done = self._job, self._on_done
        self._task = self._job = self._on_done = None
        if task.state == TaskState.DONE:
            self.device_used = task.device or self.device_used
            try:
                outcome = self.logic.finish(job, task.result)  # scene transaction
            except Exception as exc:  # nothing partial stays in the scene (transaction)
                if not isinstance(exc, SAMv2Error):
                    _log.exception("SAMv2Slicer: applying the result failed")
                self._say(f"{job.name} failed: {exc}", error=True)
                return
            self._say(self.logic.status + (f" (computed on {self.device_used})" if self.device_used else ""))
            if on_done is not None:
                on_done(outcome)
        elif task.state == TaskState.CANCELLED:
            extra = f" ({task.error_message})" if task.error_message else ""
            self._say(f"{job.name}: cancelled; nothing was added to the scene.{extra}")
        else:
            if task.error_traceback:
                _log.error(task.error_traceback)
            detail = " (details in the Python console)" if task.error_traceback else ""
            self._say(f"{job.name} failed: {task.error_message}{detail}; nothing was added to the scene.",
                      error=True)

    def wait(self, timeout: float = 300.0, interval: float = 0.01) -> RunState:
        """Poll until nothing is active (scripts, tests; the GUI polls from its timer)."""
        import time  # noqa: PLC0415 - scripts and tests only

        end = time.monotonic() + timeout
        while self.active:
            if time.monotonic() > end:
                raise TimeoutError(f"SAMv2: still running after {timeout} s")
            self.poll()
            time.sleep(interval)
        return self.state()

    # --- scene and module life ------------------------------------------------------------------------
    def scene_closing(self) -> None:
        """Results of a closed scene must not land in the next one: stop every step, wait until
        each has ended (the worker is killed if it does not stop in time), forget exported volumes.
        The worker and its model stay loaded for the next scene."""
        self._pending = self._embed_wanted = None
        worker = self.worker
        tasks = [t for t in (self._task, self._embed_task) if t is not None and not t.finished]
        if worker is not None:
            for t in tasks:
                worker.cancel(t)
            for t in tasks:
                try:
                    worker.wait(t, timeout=worker.cancel_timeout + 5.0)  # killed after cancel_timeout
                except TimeoutError:
                    worker.kill("the worker was stopped")
        self._task = self._job = self._on_done = self._embed_task = None
        self._embedded_key = None
        self.logic.clear_caches()
        self._say("")

    def _stop_worker(self) -> None:
        if self.worker is not None:
            self.worker.close()
            self.worker = None
        self._embed_task = self._embedded_key = None

    def close(self) -> None:
        """End the worker and delete the private folder (module cleanup, application exit)."""
        self.scene_closing()
        self._stop_worker()
        shutil.rmtree(self.workdir, ignore_errors=True)
