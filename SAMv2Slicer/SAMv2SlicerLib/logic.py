"""Qt-free logic of the SAMv2Slicer module: MRML nodes in, samv2core in the middle, new nodes out.

Every action is split in phases so that the GUI never freezes and never imports torch:

* ``prepare_*`` (main thread, cheap): validate the selected nodes (geometry only, no voxel
  copy) and describe the work as a typed ``ops`` request. Bad input raises a samv2core error
  here, before anything runs or changes.
* ``export`` (main thread, off the click path: the controller does it on its next poll):
  write the volumes the request names, in their own voxel type, into the private folder
  (once per node state).
* the request runs in the worker process (GUI, ``controller``) or in this process
  (:meth:`SAMv2Logic.run`: scripts, tests, the batch script), both through ``ops``.
* ``Job.apply(result)`` (main thread): add the output nodes. Runs in a scene transaction:
  if anything fails, every node it added is removed and input nodes are restored.

Inputs are never modified, except that "Register volumes" places the moving volume under
the new transform (that is its purpose; undone on failure). Synchronous wrappers
(:meth:`SAMv2Logic.match_points` etc.) run the phases in a row.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import shutil
import tempfile
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import vtk

from samv2core.coords import lps_to_ras, ras_to_lps
from samv2core.errors import CheckpointError, InputError, MatchingError, SAMv2Error
from samv2core.volume import Volume

from . import nodes, ops, protocol
from .constants import (
    ATTRIBUTE_PREFIX,
    DEVICES,
    FIXED_REFERENCE_ROLE,
    FLAGGED_SUFFIX,
    METHODS,
    MODALITIES,
    MOVING_REFERENCE_ROLE,
    REGISTRATION_FEATURES,
    REGISTRATION_MODES,
    SOURCE_POINTS_ROLE,
    SOURCE_VOLUME_ROLE,
)
from .cancellation import Cancelled, ProgressCallback, run_sync


@dataclass
class Job:
    """A prepared action: ``request`` (an ``ops`` request) computes without MRML, ``apply``
    writes the scene (main thread). ``exports``: (file, writer) of each volume the request
    names, written by :meth:`SAMv2Logic.export` when missing."""

    name: str
    request: Any
    apply: Callable[[Any], Any]
    exports: list = field(default_factory=list)

    @property
    def op(self) -> str:
        return ops.operation_of(self.request).name


@dataclass
class MatchOutcome:
    """Result of matching a point list: the new point list node and the core results."""

    node: Any  # vtkMRMLMarkupsFiducialNode on the follow-up
    results: list  # list[samv2core MatchResult], in the order of the source points
    labels: tuple[str, ...]

    @property
    def n_confident(self) -> int:
        return sum(1 for r in self.results if r.confident)


@dataclass
class LesionOutcome:
    points_node: Any  # one matched point (the lesion centre) on the follow-up
    segmentation_node: Any  # the propagated region on the follow-up
    match: Any  # MatchResult of the centre
    details: dict = field(default_factory=dict)


@dataclass
class RegistrationOutcome:
    linear_node: Any
    grid_node: Any  # None unless deformable
    result: Any  # ops.RegisterResult
    report: dict = field(default_factory=dict)


def check_device(device: str) -> str:
    """The device name, checked for form only ('auto', 'cpu', 'cuda', 'cuda:N', 'mps'): whether
    the machine has it is decided in the worker, which imports torch (DeviceError there)."""
    name = str(device or "auto").strip().lower()
    base, _, index = name.partition(":")
    if base not in DEVICES or (index and (base != "cuda" or not index.isdigit())):
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps")
    return name


class SAMv2Logic:
    """Module logic working on one vtkMRMLScene: prepares requests, exports their volumes into
    a private folder, applies results. Runs requests in-process for scripts (:meth:`run`)."""

    def __init__(self, scene, cache_dir: "str | Path | None" = None, workdir: "str | Path | None" = None,
                 max_exported: int = 6):
        self.scene = scene
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.status = ""
        if workdir is None:  # private, deleted with this object
            workdir = tempfile.mkdtemp(prefix="samv2-logic-")
            self._cleanup = weakref.finalize(self, shutil.rmtree, workdir, True)
        self.workdir = Path(workdir)
        self.volume_folder = self.workdir / "volumes"
        self._max_exported = max(2, int(max_exported))
        self._exported: "OrderedDict[str, None]" = OrderedDict()  # files written, oldest first
        self._model_spec: tuple = ("bundled", None, "auto")
        self._model_override = None  # a LoadedModel / network given directly (tests, scripts)
        self._session = None

    # --- model ----------------------------------------------------------------------------
    def set_model(self, model_path: "str | Path | None" = None, device: str = "auto", model=None) -> None:
        """Choose the model: a weights file, the bundled default (``model_path=None``), or a
        ready model object (LoadedModel or network; scripts and tests). Nothing loads here and
        torch is not imported: the file and the device name are checked now (CheckpointError,
        InputError), the device itself where the model loads (DeviceError)."""
        device = check_device(device)
        if model is not None:
            spec = ("object", id(model), device)
        elif model_path:
            p = Path(model_path)
            if not p.is_file():
                raise CheckpointError(f"{p}: model file not found")
            spec = ("file", str(p.resolve()), device)
        else:
            spec = ("bundled", None, device)
        if spec != self._model_spec or model is not self._model_override:
            self._model_spec = spec
            self._model_override = model
            self._session = None

    @property
    def model_choice(self) -> tuple[Optional[str], str]:
        """(weights file or None for the bundled model, device) as the worker is told."""
        kind, path, device = self._model_spec
        return (path if kind == "file" else None), device

    def session(self):
        """The in-process embedding session of the current model (scripts and tests; imports
        torch). The model loads on the first embedding (CheckpointError if invalid)."""
        from samv2core.device import select_device  # noqa: PLC0415 - in-process runs only: the GUI never calls this
        from samv2core.session import EmbeddingSession  # noqa: PLC0415 - in-process runs only

        if self._session is None:
            kind, path, device = self._model_spec
            select_device(device)  # DeviceError (one line) for a device this machine lacks
            if kind == "object":
                from samv2core.embed import Embedder  # noqa: PLC0415 - in-process runs only

                model = self._model_override
                label = getattr(getattr(model, "card", None), "name", type(model).__name__)
                self._session = EmbeddingSession(loader=lambda: (Embedder(model, device=device), label, True),
                                                 cache_size=12, cache_dir=self.cache_dir)
            else:
                self._session = EmbeddingSession.open(path if kind == "file" else None, device, cache_size=12,
                                                      cache_dir=self.cache_dir, lazy=True)
        return self._session

    # --- volumes ----------------------------------------------------------------------------
    @staticmethod
    def _node_key(node, world: bool) -> tuple:
        """Changes whenever the voxels, geometry or placement of a volume node change."""
        image = node.GetImageData()
        m = vtk.vtkMatrix4x4()
        node.GetIJKToRASMatrix(m)
        parent = node.GetParentTransformNode() if world else None
        return (node.GetID(), image.GetMTime() if image is not None else 0,
                tuple(nodes.np_from_vtk_matrix(m).ravel().round(9)),
                parent.GetID() if parent is not None else None,
                parent.GetTransformToWorldMTime() if parent is not None else 0, world)

    def volume(self, node, role: str = "volume", world: bool = True, modality: str = "auto") -> Volume:
        """The node as a core Volume (a float32 copy; scripts and tests, never the GUI)."""
        if node is None:
            raise InputError(f"no {role} selected")
        try:
            return nodes.volume_from_node(node, modality, world=world).validated()
        except InputError as exc:
            raise InputError(f"{role}: {exc}") from None

    def _volume_ref(self, node, role: str, world: bool, modality: str, exports: list):
        """(geometry, VolumeRef) of a node, its export added to ``exports``; InputError names the role."""
        if node is None:
            raise InputError(f"no {role} selected")
        if modality not in MODALITIES:
            raise InputError(f"unknown modality {modality!r}: use one of {', '.join(MODALITIES)}")
        try:
            geometry = nodes.volume_geometry(node, world)
        except AttributeError:
            raise InputError(f"{role}: {node.GetName()} is not a volume") from None
        except InputError as exc:
            raise InputError(f"{role}: {exc}") from None
        mod = nodes.node_modality(node) if modality == "auto" else modality
        key = hashlib.sha1(repr((self._node_key(node, world), mod)).encode()).hexdigest()[:24]
        path = self.volume_folder / f"vol-{key}.nrrd"
        node_id, scene = node.GetID(), self.scene

        def write(target: Path) -> None:
            current = scene.GetNodeByID(node_id)
            if current is None:
                raise InputError(f"{role}: the volume was removed from the scene")
            nodes.export_volume(current, target, world)

        exports.append((path, write))
        return geometry, ops.VolumeRef(str(path), mod, geometry.name)

    def export(self, job: Job) -> None:
        """Write the volume files of ``job`` that are not written yet (native voxel type); the
        oldest files beyond ``max_exported`` are deleted (bounded growth)."""
        self.volume_folder.mkdir(parents=True, exist_ok=True)
        for path, write in job.exports:
            key = str(path)
            if key in self._exported and Path(path).is_file():
                self._exported.move_to_end(key)
                continue
            write(Path(path))
            self._exported[key] = None
        keep = {str(p) for p, _ in job.exports}
        for old in list(self._exported):
            if len(self._exported) <= self._max_exported:
                break
            if old not in keep:
                Path(old).unlink(missing_ok=True)
                del self._exported[old]

    def clear_exports(self) -> None:
        """Delete every exported volume file (scene close)."""
        for old in self._exported:
            Path(old).unlink(missing_ok=True)
        self._exported.clear()

    def clear_caches(self) -> None:
        self.clear_exports()
        if self._session is not None:
            self._session.cache.clear()

    def _pair(self, baseline_node, followup_node, exports: list, names=("baseline volume", "follow-up volume"),
              world_first: bool = False, modality: str = "auto"):
        """(geometry, ref) of both volumes; the second is always read in its own voxel space."""
        if baseline_node is None:
            raise InputError(f"no {names[0]} selected")
        if followup_node is None:
            raise InputError(f"no {names[1]} selected")
        if baseline_node is followup_node or baseline_node.GetID() == followup_node.GetID():
            raise InputError(f"the {names[0]} and the {names[1]} are the same volume ({baseline_node.GetName()})")
        return (self._volume_ref(baseline_node, names[0], world_first, modality, exports),
                self._volume_ref(followup_node, names[1], False, modality, exports))

    # --- transactions ---------------------------------------------------------------------
    @contextlib.contextmanager
    def transaction(self):
        """Remove every node added inside the block if the block raises."""
        before = {self.scene.GetNthNode(i).GetID() for i in range(self.scene.GetNumberOfNodes())}
        try:
            yield
        except BaseException:
            added = [self.scene.GetNthNode(i) for i in range(self.scene.GetNumberOfNodes())]
            for node in added:
                if node is not None and node.GetID() not in before and self.scene.IsNodePresent(node):
                    self.scene.RemoveNode(node)
            raise

    def run(self, job: "Job | Callable[[], Job]", progress: Optional[ProgressCallback] = None, name: str = ""):
        """Run a job synchronously in this process: prepare (if given a factory), export, run the
        request through ``ops`` (as the worker does), then apply.

        On any samv2core error or cancel, ``self.status`` says what happened and the scene is
        left as it was; the exception propagates to the caller.
        """
        name = getattr(job, "name", name) or "SAMv2"
        try:
            if not isinstance(job, Job):
                job = job()
                name = job.name
            self.export(job)
            folder = Path(tempfile.mkdtemp(prefix="result-", dir=self.workdir))
            try:
                result = run_sync(lambda p: ops.run_local(self.session(), job.request, self._load, folder, p),
                                  progress)
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return self.finish(job, result)
        except Cancelled:
            self.status = f"{name}: cancelled; nothing was changed"
            raise
        except SAMv2Error as exc:
            self.status = f"{name} failed: {exc}"
            raise

    def _load(self, ref: ops.VolumeRef) -> Volume:
        return protocol.read_volume(ref.path, ref.modality, ref.name, inside=self.workdir)

    def finish(self, job: Job, result):
        """Apply a computed job to the scene (main thread) inside a transaction."""
        with self.transaction():
            return job.apply(result)

    # --- embedding ahead of use ------------------------------------------------------------
    def prepare_embed(self, baseline_node, followup_node, modality: str = "auto") -> Job:
        """Embed both volumes (in their own voxel space, as matching reads them) so that the next
        click only matches. Adds nothing to the scene."""
        exports: list = []
        (_, base), (_, follow) = self._pair(baseline_node, followup_node, exports, modality=modality)
        return Job("Embed volumes", ops.EmbedRequest((base, follow)), lambda names: names, exports)

    # --- matching -------------------------------------------------------------------------
    def prepare_match(self, baseline_node, followup_node, points_node, method: str = "refined",
                      output_name: Optional[str] = None, modality: str = "auto") -> Job:
        """Match every point of ``points_node`` (on the baseline) onto the follow-up."""
        if method not in METHODS:
            raise InputError(f"unknown matching method {method!r}: use one of {', '.join(METHODS)}")
        # Both volumes are read in their own voxel space (parent transforms left out), so a
        # registration placing the follow-up under a linear or grid transform neither blocks
        # matching nor invalidates the embeddings; points cross the transforms instead.
        exports: list = []
        (base_geo, base), (_, follow) = self._pair(baseline_node, followup_node, exports, modality=modality)
        if points_node is None:
            raise InputError("no point list selected")
        pts = nodes.read_points(points_node)
        if len(pts) == 0:
            raise InputError(f"{points_node.GetName()}: the point list has no points; place points on the baseline")
        points_lps = ras_to_lps(nodes.world_to_local(baseline_node, pts.ras))
        inside = base_geo.contains_lps(points_lps)
        if not inside.all():
            bad = [pts.labels[i] for i in np.flatnonzero(~inside)]
            raise InputError(f"point(s) {', '.join(bad)} lie outside the baseline volume {base_geo.name}")
        name = output_name or f"{points_node.GetName()} on {followup_node.GetName()}"
        ids = {"points": points_node.GetID(), "follow": followup_node.GetID()}

        def apply(results):
            node = self._matched_point_list(name, pts.labels, results, method, ids)
            n_ok = sum(r.confident for r in results)
            self.status = (f"matched {len(results)} point(s) into '{node.GetName()}': {n_ok} confident"
                           + (f", {len(results) - n_ok} flagged{FLAGGED_SUFFIX}" if n_ok < len(results) else ""))
            return MatchOutcome(node, list(results), pts.labels)

        return Job("Match points", ops.MatchRequest(base, follow, points_lps, method), apply, exports)

    def match_points(self, baseline_node, followup_node, points_node, method: str = "refined",
                     output_name: Optional[str] = None, progress=None, modality: str = "auto") -> MatchOutcome:
        return self.run(lambda: self.prepare_match(baseline_node, followup_node, points_node, method, output_name,
                                                   modality), progress, "Match points")

    def _matched_point_list(self, name, labels, results, method, ids):
        follow = self.scene.GetNodeByID(ids["follow"])
        if follow is None:
            raise InputError("the follow-up volume was removed from the scene while matching")
        ras = lps_to_ras(np.array([r.query_point.to("LPS").as_array() for r in results]).reshape(-1, 3))
        descriptions = [describe_match(r) for r in results]
        flagged = [not r.confident for r in results]
        node = nodes.new_point_list(self.scene, name, ras, labels, descriptions, flagged, flagged_suffix=FLAGGED_SUFFIX)
        # matches are in the follow-up's voxel space: they sit under its transforms, as it does
        node.SetAndObserveTransformNodeID(follow.GetTransformNodeID())
        for i in range(node.GetNumberOfControlPoints()):
            node.SetNthControlPointAssociatedNodeID(i, ids["follow"])
        node.SetNodeReferenceID(SOURCE_POINTS_ROLE, ids["points"])
        node.SetNodeReferenceID(SOURCE_VOLUME_ROLE, ids["follow"])
        node.SetAttribute(ATTRIBUTE_PREFIX + "Method", method)
        node.SetAttribute(ATTRIBUTE_PREFIX + "Scores", json.dumps([round(float(r.score), 4) for r in results]))
        node.SetAttribute(ATTRIBUTE_PREFIX + "Confident", json.dumps([bool(r.confident) for r in results]))
        node.SetAttribute(ATTRIBUTE_PREFIX + "Answers", json.dumps([r.answer for r in results]))
        node.SetAttribute(ATTRIBUTE_PREFIX + "Volume", follow.GetName())
        return node

    # --- lesion propagation ---------------------------------------------------------------
    def prepare_propagate_lesion(self, baseline_node, followup_node, points_node=None, point_index: int = 0,
                                 radius_mm: float = 10.0, segmentation_node=None, segment_id: Optional[str] = None,
                                 method: str = "refined", output_name: Optional[str] = None,
                                 modality: str = "auto") -> Job:
        """Propagate a lesion to the follow-up: a point + radius (sphere), or a segment.

        Output: a point list with the matched lesion centre and a segmentation with the region.
        A segment is carried over by matching its centre and extreme points and fitting a local
        affine (translation only when too few confident matches or an implausible fit).
        ``point_index`` is the control-point index in ``points_node`` (as Slicer numbers them).
        """
        if method not in METHODS:
            raise InputError(f"unknown matching method {method!r}: use one of {', '.join(METHODS)}")
        exports: list = []
        (base_geo, base), (_, follow) = self._pair(baseline_node, followup_node, exports, modality=modality)
        centre_lps, mask_ref, radius = None, None, None
        if segmentation_node is not None:
            mask = nodes.segment_mask(segmentation_node, segment_id, base_node=baseline_node)
            zyx = np.argwhere(mask.array > 0.5)
            centre_lps = mask.index_to_lps(zyx[:, ::-1].mean(0))  # the centroid, matched first
            label = mask.name or "lesion"
            source_id = segmentation_node.GetID()
            key = hashlib.sha1(mask.content_key.encode()).hexdigest()[:24]
            path = self.volume_folder / f"mask-{key}.nrrd"
            exports.append((path, lambda target: protocol.write_image(
                mask.with_array((mask.array > 0.5).astype(np.uint8)).to_sitk(), target)))
            mask_ref = ops.VolumeRef(str(path), "CT", label)
        else:
            if points_node is None:
                raise InputError("select a lesion point (point list) or a segment")
            pts = nodes.read_points(points_node)
            if point_index not in pts.indices:
                raise InputError(f"{points_node.GetName()}: no placed point number {point_index + 1} (it has "
                                 f"{points_node.GetNumberOfControlPoints()} control point(s), {len(pts)} placed)")
            if not (np.isfinite(radius_mm) and radius_mm > 0):
                raise InputError(f"the lesion radius must be positive, got {radius_mm}")
            row = pts.indices.index(point_index)
            centre_lps = ras_to_lps(nodes.world_to_local(baseline_node, pts.ras[row:row + 1]))
            label = pts.labels[row]
            source_id = points_node.GetID()
            radius = float(radius_mm)
        if not base_geo.contains_lps(centre_lps).all():
            raise InputError(f"lesion {label} lies outside the baseline volume {base_geo.name}")
        name = output_name or f"{label} on {followup_node.GetName()}"
        follow_id = followup_node.GetID()

        def apply(result: ops.PropagateResult):
            centre, region, details = result.centre, result.region, result.details
            follow_node = self.scene.GetNodeByID(follow_id)
            pnode = self._matched_point_list(name, (label,), [centre], method,
                                             {"points": source_id, "follow": follow_id})
            if region is None or not np.any(region.array > 0.5):
                raise MatchingError(f"the propagated region of {label} falls outside the follow-up volume")
            snode = nodes.new_segmentation_node(self.scene, region, name, label + " (propagated)", follow_node)
            snode.SetAndObserveTransformNodeID(follow_node.GetTransformNodeID())  # drawn where the follow-up is
            snode.SetNodeReferenceID(SOURCE_VOLUME_ROLE, follow_id)
            snode.SetAttribute(ATTRIBUTE_PREFIX + "Propagation", json.dumps(details))
            self.status = (f"lesion {label} propagated: {describe_match(centre)}"
                           + ("" if centre.confident else " - check it, the match is not confident"))
            return LesionOutcome(pnode, snode, centre, details)

        request = ops.PropagateRequest(base, follow, method, None if mask_ref is not None else centre_lps, radius,
                                       mask_ref)
        return Job("Propagate lesion", request, apply, exports)

    def propagate_lesion(self, *args, progress=None, **kwargs) -> LesionOutcome:
        return self.run(lambda: self.prepare_propagate_lesion(*args, **kwargs), progress, "Propagate lesion")

    # --- registration ---------------------------------------------------------------------
    def prepare_register(self, fixed_node, moving_node, mode: str = "affine", deformable: bool = False,
                         apply_to_moving: bool = True, output_name: Optional[str] = None, options=None,
                         refine: bool = True, features: str = "auto", modality: str = "auto") -> Job:
        """Register moving onto fixed; outputs a linear (and optionally a grid) transform node.

        The moving volume is read without its current parent transform (as Slicer's registration
        modules do) and, with ``apply_to_moving``, placed under the new transform(s).
        ``options``: a samv2core.registration.RegistrationOptions (or its fields as a dict); when
        None, the defaults with ``refine`` (intensity refinement of the linear map) and
        ``features`` ('auto', 'sam', 'mind').
        """
        if mode not in REGISTRATION_MODES:
            raise InputError(f"unknown registration mode {mode!r}: use one of {', '.join(REGISTRATION_MODES)}")
        if features not in REGISTRATION_FEATURES:
            raise InputError(f"unknown descriptors {features!r}: use one of {', '.join(REGISTRATION_FEATURES)}")
        if options is None:
            values = {"refine": bool(refine), "features": features}
        else:
            values = dict(options) if isinstance(options, dict) else protocol.plain(dataclasses.asdict(options))
        exports: list = []
        (_, fixed), (_, moving) = self._pair(fixed_node, moving_node, exports, ("fixed volume", "moving volume"),
                                             world_first=True, modality=modality)
        base = output_name or f"{moving_node.GetName()} to {fixed_node.GetName()}"
        ids = {"fixed": fixed_node.GetID(), "moving": moving_node.GetID()}

        def apply(result):
            return self.add_registration_nodes(result, self.scene.GetNodeByID(ids["fixed"]),
                                               self.scene.GetNodeByID(ids["moving"]), mode, base, apply_to_moving)

        return Job("Register volumes", ops.RegisterRequest(fixed, moving, mode, bool(deformable), values), apply,
                   exports)

    def register(self, fixed_node, moving_node, mode: str = "affine", deformable: bool = False,
                 apply_to_moving: bool = True, output_name: Optional[str] = None, options=None,
                 progress=None, refine: bool = True, features: str = "auto",
                 modality: str = "auto") -> RegistrationOutcome:
        return self.run(lambda: self.prepare_register(fixed_node, moving_node, mode, deformable, apply_to_moving,
                                                      output_name, options, refine, features, modality),
                        progress, "Register volumes")

    def add_registration_nodes(self, result, fixed_node, moving_node, mode: str = "affine",
                               name: Optional[str] = None, apply_to_moving: bool = True) -> RegistrationOutcome:
        """Add transform nodes for a registration result (``linear``: fixed->moving ITK transform;
        ``displacement``: optional ITK displacement field on the fixed grid, applied to fixed
        points before ``linear``; ``report``), e.g. an ops.RegisterResult. Call inside :meth:`transaction` (``finish`` does)."""
        if fixed_node is None or moving_node is None:
            raise InputError("the fixed or moving volume was removed from the scene")
        ids = {"fixed": fixed_node.GetID(), "moving": moving_node.GetID()}
        base = name or f"{moving_node.GetName()} to {fixed_node.GetName()}"
        moving = moving_node
        old_parent = moving.GetTransformNodeID()
        try:
            linear = nodes.new_linear_transform_node(self.scene, result.linear, f"{base} ({mode})")
            grid = None
            if getattr(result, "displacement", None) is not None:
                grid = nodes.new_grid_transform_node(self.scene, result.displacement, f"{base} (deformable)")
            report = dict(getattr(result, "report", {}) or {})
            for node in (linear, grid):
                if node is None:
                    continue
                node.SetNodeReferenceID(FIXED_REFERENCE_ROLE, ids["fixed"])
                node.SetNodeReferenceID(MOVING_REFERENCE_ROLE, ids["moving"])
                node.SetAttribute(ATTRIBUTE_PREFIX + "Registration", mode)
                node.SetAttribute(ATTRIBUTE_PREFIX + "Report", json.dumps(report, default=str)[:20000])
            # Order of the maps from the fixed (world) frame to the moving volume: the grid
            # displacement acts on fixed points first, then the linear map (samv2core composite
            # = linear o (x + d(x))). A child's from-world map applies its ancestors first, so the
            # grid node is the parent and the moving volume sits under the linear node.
            if grid is not None:
                linear.SetAndObserveTransformNodeID(grid.GetID())
            if apply_to_moving:
                moving.SetAndObserveTransformNodeID(linear.GetID())
        except BaseException:
            moving.SetAndObserveTransformNodeID(old_parent)
            raise
        features = report.get("features", "sam")
        self.status = (f"registered {base}: linear transform '{linear.GetName()}'"
                       + (f" and grid transform '{grid.GetName()}'" if grid is not None else "")
                       + (f" (matched on {features} descriptors)" if features != "sam" else "")
                       + "".join(f" - note: {w}" for w in report.get("warnings", [])))
        return RegistrationOutcome(linear, grid, result, report)


# --- pure helpers (no scene) ------------------------------------------------------------------
def describe_match(result) -> str:
    """Control point description: score, which answer was used and why (refined match), and the
    reason when the match is not confident."""
    text = f"score {result.score:.2f}"
    if getattr(result, "answer_reason", None):
        text += f"; {result.answer_reason}"
    if not result.confident:
        text += f"; NOT CONFIDENT: {result.reason or 'low score'}"
    return text
