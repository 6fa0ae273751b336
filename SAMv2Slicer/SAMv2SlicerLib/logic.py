"""Qt-free logic of the SAMv2Slicer module: MRML nodes in, samv2core in the middle, new nodes out.

Every action is split in three phases so that the GUI never freezes:

* ``prepare_*`` (main thread): validate the selected nodes and copy them into core objects.
  Bad input raises a samv2core error here, before anything runs or changes.
* ``Job.compute(progress)``: embeddings, matching, registration. Touches no MRML node;
  ``progress`` may raise ``cancellation.Cancelled``. In Slicer the same computation runs in the
  worker process instead (``Job.op`` / ``Job.inputs`` name it; see ``worker`` and ``server``):
  both run the functions of ``steps``.
* ``Job.apply(payload)`` (main thread): add the output nodes. Runs in a scene transaction:
  if anything fails, every node it added is removed and input nodes are restored.

Inputs are never modified, except that "Register volumes" places the moving volume under
the new transform (that is its purpose; undone on failure). Synchronous wrappers
(:meth:`SAMv2Logic.match_points` etc.) run the three phases in a row for scripts and tests.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import vtk

from samv2core.coords import lps_to_ras, ras_to_lps
from samv2core.device import select_device
from samv2core.embed import Embedder
from samv2core.errors import CheckpointError, InputError, MatchingError, SAMv2Error
from samv2core.progress import no_progress
from samv2core.registration import RegistrationOptions
from samv2core.session import EmbeddingSession
from samv2core.volume import Volume

from . import nodes, steps
from .constants import (  # noqa: F401
    ATTRIBUTE_PREFIX,
    FIXED_REFERENCE_ROLE,
    FLAGGED_SUFFIX,
    METHODS,
    MOVING_REFERENCE_ROLE,
    REGISTRATION_FEATURES,
    REGISTRATION_MODES,
    SOURCE_POINTS_ROLE,
    SOURCE_VOLUME_ROLE,
)
from .cancellation import Cancelled, ProgressCallback, run_sync
from .steps import sphere_mask, warp_mask  # noqa: F401  (re-exported: part of the logic's API)


@dataclass
class Job:
    """A prepared action: ``compute`` is MRML-free, ``apply`` writes the scene (main thread).

    ``op`` and ``inputs`` describe the same computation for the worker process: the operation
    name and its arguments (core Volumes, numpy arrays, plain values; see ``protocol``).
    """

    name: str
    compute: Callable[[ProgressCallback], Any]
    apply: Callable[[Any], Any]
    op: str = ""
    inputs: dict = field(default_factory=dict)


@dataclass
class MatchOutcome:
    """Result of matching a point list: the new point list node and the core results."""

    node: Any  # vtkMRMLMarkupsFiducialNode on the follow-up
    results: list  # list[samv2core.matching.MatchResult], in the order of the source points
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
    result: Any  # samv2core RegistrationResult
    report: dict = field(default_factory=dict)


class SAMv2Logic:
    """Module logic working on one vtkMRMLScene. Holds the model and per-volume embeddings."""

    def __init__(self, scene, cache_dir: "str | Path | None" = None, embeddings_cache_size: int = 6):
        self.scene = scene
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.status = ""
        self.model_label = ""  # which weights the last run used, for messages
        self._model_spec: tuple = ("bundled", None, "auto")
        self._model_override = None  # a LoadedModel / network given directly (tests, scripts)
        self._cache_size = embeddings_cache_size
        self._session: Optional[EmbeddingSession] = None

    # --- model ----------------------------------------------------------------------------
    def set_model(self, model_path: "str | Path | None" = None, device: str = "auto", model=None) -> None:
        """Choose the model: a weights file, the bundled default (``model_path=None``), or a
        ready model object (LoadedModel or network; used by tests). Loading happens lazily in
        the compute phase; the device is checked now (DeviceError if absent)."""
        device = str(device or "auto").lower()
        select_device(device)  # raises DeviceError now, before any work is queued
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
    def device(self) -> str:
        return self._model_spec[2]

    def session(self) -> EmbeddingSession:
        """The embedding session of the current model: its one cache holds the converted
        volumes and their embeddings. The model itself loads on the first embedding (compute
        phase; CheckpointError if invalid)."""
        if self._session is None:
            kind, path, device = self._model_spec
            size = 2 * self._cache_size  # a volume and its embeddings per entry pair
            if kind == "object":
                model = self._model_override

                def load():
                    label = getattr(getattr(model, "card", None), "name", type(model).__name__)
                    return Embedder(model, device=device), label, True

                self._session = EmbeddingSession(loader=load, cache_size=size, cache_dir=self.cache_dir)
            else:
                self._session = EmbeddingSession.open(path if kind == "file" else None, device, cache_size=size,
                                                      cache_dir=self.cache_dir, lazy=True)
        return self._session

    def model_id(self) -> str:
        return self.session().model_id

    # --- volumes and embeddings -----------------------------------------------------------
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

    def volume(self, node, role: str = "volume", world: bool = True) -> Volume:
        """The node as a core Volume (cached while the node is unchanged); InputError names the role."""
        if node is None:
            raise InputError(f"no {role} selected")
        try:
            key = self._node_key(node, world)
        except AttributeError:
            raise InputError(f"{role}: {node.GetName()} is not a volume") from None

        def convert() -> Volume:
            try:
                vol = nodes.volume_from_node(node, self._modality_of(node), world=world).validated()
            except InputError as exc:
                raise InputError(f"{role}: {exc}") from None
            return vol

        return self.session().cached(("volume", key), convert)

    @staticmethod
    def _modality_of(node) -> str:
        """Modality from our node attribute, else the DICOM series modality that Slicer's DICOM
        plugins store on the node's subject hierarchy item, else 'auto' (guessed from intensities)."""
        return nodes.node_modality(node)

    def embeddings(self, volume: Volume, progress: ProgressCallback = no_progress):
        """Embeddings of a (prepared) volume, computed once per volume content and reused."""
        session = self.session()
        emb = session.embed(volume, progress=progress)
        self.model_label = session.label
        return emb

    def clear_caches(self) -> None:
        if self._session is not None:
            self._session.clear_cache()

    def _pair(self, baseline_node, followup_node, names=("baseline volume", "follow-up volume"),
              world_second: bool = True, world_first: bool = True) -> tuple[Volume, Volume]:
        if baseline_node is None:
            raise InputError(f"no {names[0]} selected")
        if followup_node is None:
            raise InputError(f"no {names[1]} selected")
        if baseline_node is followup_node or baseline_node.GetID() == followup_node.GetID():
            raise InputError(f"the {names[0]} and the {names[1]} are the same volume ({baseline_node.GetName()})")
        return (self.volume(baseline_node, names[0], world=world_first),
                self.volume(followup_node, names[1], world=world_second))

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
        """Run a job synchronously: prepare (if given a factory), compute, then apply.

        On any samv2core error or cancel, ``self.status`` says what happened and the scene is
        left as it was; the exception propagates to the caller.
        """
        name = getattr(job, "name", name) or "SAMv2"
        try:
            if not isinstance(job, Job):
                job = job()
                name = job.name
            payload = run_sync(job.compute, progress)
            return self.finish(job, payload)
        except Cancelled:
            self.status = f"{name}: cancelled; nothing was changed"
            raise
        except SAMv2Error as exc:
            self.status = f"{name} failed: {exc}"
            raise

    def finish(self, job: Job, payload):
        """Apply a computed job to the scene (main thread) inside a transaction."""
        with self.transaction():
            return job.apply(payload)

    # --- embedding ahead of use ------------------------------------------------------------
    def prepare_embed(self, baseline_node, followup_node) -> Job:
        """Embed both volumes (in their own voxel space, as matching reads them) so that the next
        click only matches. Adds nothing to the scene."""
        base, follow = self._pair(baseline_node, followup_node, world_first=False, world_second=False)

        def compute(progress: ProgressCallback):
            return steps.embed_volumes(self.session(), [base, follow], progress)

        return Job("Embed volumes", compute, lambda names: names, "embed", {"volumes": [base, follow]})

    # --- matching -------------------------------------------------------------------------
    def prepare_match(self, baseline_node, followup_node, points_node, method: str = "refined",
                      output_name: Optional[str] = None) -> Job:
        """Match every point of ``points_node`` (on the baseline) onto the follow-up."""
        if method not in METHODS:
            raise InputError(f"unknown matching method {method!r}: use one of {', '.join(METHODS)}")
        # Both volumes are read in their own voxel space (parent transforms left out), so a
        # registration placing the follow-up under a linear or grid transform neither blocks
        # matching nor invalidates the embeddings; points cross the transforms instead.
        base, follow = self._pair(baseline_node, followup_node, world_first=False, world_second=False)
        if points_node is None:
            raise InputError("no point list selected")
        pts = nodes.read_points(points_node)
        if len(pts) == 0:
            raise InputError(f"{points_node.GetName()}: the point list has no points; place points on the baseline")
        points_lps = ras_to_lps(nodes.world_to_local(baseline_node, pts.ras))
        inside = base.contains_lps(points_lps)
        if not inside.all():
            bad = [pts.labels[i] for i in np.flatnonzero(~inside)]
            raise InputError(f"point(s) {', '.join(bad)} lie outside the baseline volume {base.name}")
        name = output_name or f"{points_node.GetName()} on {followup_node.GetName()}"
        ids = {"points": points_node.GetID(), "follow": followup_node.GetID()}

        def compute(progress: ProgressCallback):
            session = self.session()
            results = steps.match(session, base, follow, points_lps, method, progress)
            self.model_label = session.label
            return results

        def apply(results):
            node = self._matched_point_list(name, pts.labels, results, method, ids)
            n_ok = sum(r.confident for r in results)
            self.status = (f"matched {len(results)} point(s) into '{node.GetName()}': {n_ok} confident"
                           + (f", {len(results) - n_ok} flagged{FLAGGED_SUFFIX}" if n_ok < len(results) else ""))
            return MatchOutcome(node, list(results), pts.labels)

        return Job("Match points", compute, apply, "match",
                   {"template": base, "query": follow, "points_lps": points_lps, "method": method})

    def match_points(self, baseline_node, followup_node, points_node, method: str = "refined",
                     output_name: Optional[str] = None, progress=None) -> MatchOutcome:
        return self.run(lambda: self.prepare_match(baseline_node, followup_node, points_node, method, output_name),
                        progress, "Match points")

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
        if follow is not None:
            node.SetAttribute(ATTRIBUTE_PREFIX + "Volume", follow.GetName())
        return node

    # --- lesion propagation ---------------------------------------------------------------
    def prepare_propagate_lesion(self, baseline_node, followup_node, points_node=None, point_index: int = 0,
                                 radius_mm: float = 10.0, segmentation_node=None, segment_id: Optional[str] = None,
                                 method: str = "refined", output_name: Optional[str] = None) -> Job:
        """Propagate a lesion to the follow-up: a point + radius (sphere), or a segment.

        Output: a point list with the matched lesion centre and a segmentation with the region.
        A segment is carried over by matching its centre and extreme points and fitting a local
        affine (translation only when too few confident matches or an implausible fit).
        ``point_index`` is the control-point index in ``points_node`` (as Slicer numbers them).
        """
        base, follow = self._pair(baseline_node, followup_node, world_first=False, world_second=False)
        if segmentation_node is not None:
            mask = nodes.segment_mask(segmentation_node, segment_id, base_node=baseline_node)
            samples, _ = steps.segment_samples(mask)
            label = mask.name or "lesion"
            source_id = segmentation_node.GetID()
            radius = None
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
            samples = ras_to_lps(nodes.world_to_local(baseline_node, pts.ras[row:row + 1]))
            label = pts.labels[row]
            source_id = points_node.GetID()
            radius = float(radius_mm)
            mask = None
        inside = base.contains_lps(samples[:1])
        if not inside.all():
            raise InputError(f"lesion {label} lies outside the baseline volume {base.name}")
        samples = samples[base.contains_lps(samples)]
        name = output_name or f"{label} on {followup_node.GetName()}"
        follow_id = followup_node.GetID()

        def compute(progress: ProgressCallback):
            session = self.session()
            payload = steps.propagate(session, base, follow, samples, method, radius, mask, progress)
            self.model_label = session.label
            return payload

        def apply(payload):
            centre, region, details = payload
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

        return Job("Propagate lesion", compute, apply, "propagate",
                   {"template": base, "query": follow, "samples_lps": samples, "method": method,
                    "radius_mm": radius, "mask": mask})

    def propagate_lesion(self, *args, progress=None, **kwargs) -> LesionOutcome:
        return self.run(lambda: self.prepare_propagate_lesion(*args, **kwargs), progress, "Propagate lesion")

    # --- registration ---------------------------------------------------------------------
    def prepare_register(self, fixed_node, moving_node, mode: str = "affine", deformable: bool = False,
                         apply_to_moving: bool = True, output_name: Optional[str] = None, options=None,
                         refine: bool = True, features: str = "auto") -> Job:
        """Register moving onto fixed; outputs a linear (and optionally a grid) transform node.

        The moving volume is read without its current parent transform (as Slicer's registration
        modules do) and, with ``apply_to_moving``, placed under the new transform(s).
        ``options``: a samv2core.registration.RegistrationOptions; when None, the defaults with
        ``refine`` (intensity refinement of the linear map) and ``features`` ('auto', 'sam', 'mind').
        """
        if mode not in REGISTRATION_MODES:
            raise InputError(f"unknown registration mode {mode!r}: use one of {', '.join(REGISTRATION_MODES)}")
        if features not in REGISTRATION_FEATURES:
            raise InputError(f"unknown descriptors {features!r}: use one of {', '.join(REGISTRATION_FEATURES)}")
        if options is None:
            options = RegistrationOptions(refine=bool(refine), features=features)
        fixed, moving = self._pair(fixed_node, moving_node, ("fixed volume", "moving volume"), world_second=False)
        base = output_name or f"{moving_node.GetName()} to {fixed_node.GetName()}"
        ids = {"fixed": fixed_node.GetID(), "moving": moving_node.GetID()}

        def compute(progress: ProgressCallback):
            session = self.session()
            result = steps.register(session, fixed, moving, mode, deformable, options, progress)
            self.model_label = session.label
            return result

        def apply(result):
            return self.add_registration_nodes(result, self.scene.GetNodeByID(ids["fixed"]),
                                               self.scene.GetNodeByID(ids["moving"]), mode, base, apply_to_moving)

        return Job("Register volumes", compute, apply, "register",
                   {"fixed": fixed, "moving": moving, "mode": mode, "deformable": bool(deformable),
                    "options": options})

    def register(self, fixed_node, moving_node, mode: str = "affine", deformable: bool = False,
                 apply_to_moving: bool = True, output_name: Optional[str] = None, options=None,
                 progress=None, refine: bool = True, features: str = "auto") -> RegistrationOutcome:
        return self.run(lambda: self.prepare_register(fixed_node, moving_node, mode, deformable, apply_to_moving,
                                                      output_name, options, refine, features),
                        progress, "Register volumes")

    def add_registration_nodes(self, result, fixed_node, moving_node, mode: str = "affine",
                               name: Optional[str] = None, apply_to_moving: bool = True) -> RegistrationOutcome:
        """Add transform nodes for a samv2core RegistrationResult (``linear``: fixed->moving ITK
        transform; ``displacement``: optional ITK displacement field on the fixed grid, applied
        to fixed points before ``linear``). Call inside :meth:`transaction` (``finish`` does)."""
        if fixed_node is None or moving_node is None:
            raise InputError("the fixed or moving volume was removed from the scene")
        ids = {"fixed": fixed_node.GetID(), "moving": moving_node.GetID()}
        base = name or f"{moving_node.GetName()} to {fixed_node.GetName()}"
        moving = moving_node
        old_parent = moving.GetTransformNodeID() if moving is not None else None
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
            if apply_to_moving and moving is not None:
                moving.SetAndObserveTransformNodeID(linear.GetID())
        except BaseException:
            if moving is not None:
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
