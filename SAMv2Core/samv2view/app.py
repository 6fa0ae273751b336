"""The browser view: trame-slicer (slicer-core MRML + VTK rendered off-screen) over a ViewSession.

Two axial slice views side by side, baseline (template) left and follow-up (query) right.
Clicking on the baseline places a point (Slicer's markups placement); the point is matched on
the follow-up in a worker thread, the match is drawn there (green +, or a red x marked NOT
CONFIDENT), its score and position are shown in the page, and the follow-up view jumps to it.
The follow-up view follows the baseline's slice position and zoom (offset by the last match).
With a lesion radius (mm) set, the click also carries a lesion (a ball of that radius) onto the
follow-up with the core's lesion propagation, drawn in red there, its volume shown in the page.
"Register" registers the follow-up onto the baseline and shows it fused (green) on the baseline.
Every failure is shown in the page; the server keeps running. Who may connect, and how many tabs
at once, is decided by :mod:`samv2view.guard`; which files may be opened by the session's
:class:`~samv2view.files.AllowedFiles`. When the last tab goes (one session per tab) the page's
state and scene are reset and the command line's scans reopened for the next tab.

This module is the only one that imports trame, trame-slicer and slicer-core.
"""
from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from slicer import (
    vtkMRMLAbstractViewNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLMarkupsNode,
)
from trame.app import TrameApp
from trame.widgets import html
from trame.widgets import vuetify3 as v3
from trame_server.utils.asynchronous import create_task
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import (
    Layout,
    LayoutDirection,
    ViewLayoutDefinition,
    ViewProps,
    ViewType,
)
from trame_vuetify.ui.vuetify3 import SinglePageLayout
from vtkmodules.vtkCommonCore import vtkCommand

from samv2core.coords import lps_to_ras, ras_to_lps
from samv2core.errors import SAMv2Error
from samv2core.volume import Modality, Volume

from .access import Exposure
from .guard import Gate
from .session import ViewSession

BASELINE, FOLLOWUP = "Baseline", "Followup"
CT_WINDOW = (1400.0, -300.0)  # window, level: lung and soft tissue


def _error_text(exc: BaseException) -> str:
    if isinstance(exc, SAMv2Error):
        return str(exc)
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else 'unexpected error'}"


class SAMv2ViewApp(TrameApp):
    """The page, its Slicer scene and the controllers. ``session`` does the computing."""

    def __init__(self, session: ViewSession, template_path: str = "", query_path: str = "", server=None,
                 register_mode: str = "rigid"):
        super().__init__(server, client_type="vue3")
        self.session = session
        self.register_mode = register_mode
        self._tmp = tempfile.TemporaryDirectory(prefix="samv2-view-")
        self._match_offset_ras = np.zeros(3)
        self._volume_nodes: dict[str, object] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._initial_paths = (str(template_path or ""), str(query_path or ""))
        self._generation = 0  # bumped when a tab goes: late results of its work are dropped

        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        views = [ViewLayoutDefinition(BASELINE, ViewType.SLICE_VIEW,
                                      ViewProps(label="Baseline", orientation="Axial", color="#F34A33", group=0)),
                 ViewLayoutDefinition(FOLLOWUP, ViewType.SLICE_VIEW,
                                      ViewProps(label="Follow-up", orientation="Axial", color="#6DAD4A", group=1))]
        self.layout_manager.register_layout("compare", Layout(LayoutDirection.Horizontal, views))
        self.layout_manager.set_layout("compare")
        self.baseline_view = self.slicer.view_manager.get_view(BASELINE)
        self.followup_view = self.slicer.view_manager.get_view(FOLLOWUP)
        for view in (self.baseline_view, self.followup_view):
            view.set_ruler(vtkMRMLAbstractViewNode.RulerTypeThin, vtkMRMLAbstractViewNode.RulerColorWhite)  # mm

        self._points = self._point_list("baseline points", BASELINE, (0.0, 0.8, 1.0))
        self._matches = self._point_list("matches", FOLLOWUP, (0.2, 1.0, 0.2))
        self._points.AddObserver(vtkMRMLMarkupsNode.PointPositionDefinedEvent, self._on_point_placed)
        self.baseline_view.get_view_node().AddObserver(vtkCommand.ModifiedEvent, self._on_baseline_slice_changed)

        self.state.trame__title = "SAMv2 view"
        self.state.update(self._initial_state())
        self.ctrl.open_files = self.open_files
        self.ctrl.register = self.register
        self.ctrl.goto = self.goto
        self.ctrl.on_server_ready.add(self._on_ready)
        self._build_ui()

    def _initial_state(self) -> dict:
        return {"template_path": self._initial_paths[0], "query_path": self._initial_paths[1],
                "busy": False, "progress": 0, "status": "open a baseline and a follow-up scan",
                "error": "", "match": None, "match_lps": "", "n_points": 0, "registered": False,
                "goto_lps": "", "baseline_geometry": "", "followup_geometry": "", "lesion_radius_mm": "",
                "lesion": None,
                "template_name": "", "query_name": ""}

    def reset_for_next_client(self) -> None:
        """The tab went: forget its paths, errors, points and scans; reopen the command line's scans."""
        self._generation += 1
        for node in self._volume_nodes.values():
            self.slicer.scene.RemoveNode(node)
        self._volume_nodes = {}
        self._points.RemoveAllControlPoints()
        self._matches.RemoveAllControlPoints()
        self._match_offset_ras = np.zeros(3)
        for view in (self.baseline_view, self.followup_view):
            self._show(view, None)
        self.session.close()
        self._set(**self._initial_state())
        if all(self._initial_paths):
            create_task(self.open_files())

    # --- scene helpers ---------------------------------------------------------------------
    def _point_list(self, name: str, view_id: str, color) -> vtkMRMLMarkupsFiducialNode:
        node = self.slicer.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        node.CreateDefaultDisplayNodes()
        display = node.GetDisplayNode()
        display.SetViewNodeIDs([self.slicer.view_manager.get_view(view_id).get_view_node_id()])
        display.SetSelectedColor(*color)
        display.SetColor(1.0, 0.1, 0.1)  # unselected = not confident: red
        display.SetGlyphScale(3.0)
        display.SetTextScale(3.5)
        return node

    def _load_node(self, path: Path, volume: Volume):
        """A volume node read by Slicer's reader from the file the core read ``volume`` from."""
        nodes = self.slicer.io_manager.load_volumes(str(path))
        if not nodes:
            raise SAMv2Error(f"{path}: 3D Slicer's reader could not load it")
        node = nodes[0]
        display = node.GetDisplayNode()
        if display is not None and volume.modality == Modality.CT:
            display.AutoWindowLevelOff()
            display.SetWindowLevel(*CT_WINDOW)
        return node

    def _show(self, view, node, foreground=None, opacity: float = 0.0) -> None:
        view.set_background_volume_id(node.GetID() if node is not None else None)
        view.set_foreground_volume_id(foreground.GetID() if foreground is not None else None)
        view.set_foreground_opacity(opacity)

    # --- state -----------------------------------------------------------------------------
    def _set(self, **values) -> None:
        with self.state:
            self.state.update(values)

    def _progress_from_thread(self):
        loop = self._loop or asyncio.get_event_loop()

        def update(fraction: float, message: str) -> None:
            loop.call_soon_threadsafe(lambda: self._set(progress=round(100 * float(fraction)), status=message))

        return update

    def _fail(self, exc: BaseException) -> None:
        self._set(busy=False, error=_error_text(exc), status="failed: see the message above")

    def _publish_geometry(self) -> None:
        """Each view's XY (pixels, origin bottom-left) -> RAS matrix, for pointing at a voxel from outside."""
        for key, view in (("baseline_geometry", self.baseline_view), ("followup_geometry", self.followup_view)):
            node = view.get_view_node()
            m = node.GetXYToRAS()
            self.state[key] = json.dumps({"xy_to_ras": [[m.GetElement(r, c) for c in range(4)] for r in range(4)],
                                          "dimensions": list(node.GetDimensions())})

    # --- controllers -----------------------------------------------------------------------
    def _on_ready(self, **_):
        self._loop = asyncio.get_event_loop()
        if self.state.template_path and self.state.query_path:
            create_task(self.open_files())

    async def open_files(self):
        """Load the two paths in the text fields, show them, and start embedding in the background."""
        self._set(error="", busy=True, progress=0, status="loading the scans")
        generation = self._generation
        try:
            paths = [str(self.state[key] or "").strip() for key in ("template_path", "query_path")]
            for path, what in zip(paths, ("baseline", "follow-up")):
                if not path:
                    raise SAMv2Error(f"no {what} path given")
            template, query = await asyncio.to_thread(self.session.open, *paths)
            if generation != self._generation:
                return
            nodes = {"template": self._load_node(Path(template.meta["source"]), template),
                     "query": self._load_node(Path(query.meta["source"]), query)}
            for node in self._volume_nodes.values():
                self.slicer.scene.RemoveNode(node)
            self._volume_nodes = dict(nodes)
            self._points.RemoveAllControlPoints()
            self._matches.RemoveAllControlPoints()
            self._match_offset_ras = np.zeros(3)
            self._show(self.baseline_view, nodes["template"])
            self._show(self.followup_view, nodes["query"])
            for view in (self.baseline_view, self.followup_view):
                view.fit_view_to_content()
            self.slicer.markups_logic.place_node(self._points, persistent=True)
            self._set(match=None, match_lps="", n_points=0, registered=False,
                      template_name=self.session.template.name, query_name=self.session.query.name,
                      status="embedding the scans (a click on the baseline waits for it)")
            self._publish_geometry()
            await asyncio.to_thread(self.session.embed_both, self._progress_from_thread())
            if generation == self._generation:
                self._set(busy=False, progress=100, status="ready: click on the baseline to place a point")
        except Exception as exc:  # noqa: BLE001 - every failure is shown in the page
            if generation == self._generation:
                self._fail(exc)

    def _on_point_placed(self, caller, _event):
        n = caller.GetNumberOfControlPoints()
        if n == 0:
            return
        ras = np.array(caller.GetNthControlPointPositionWorld(n - 1))
        label = f"P{n}"
        caller.SetNthControlPointLabel(n - 1, label)
        create_task(self._match(ras, label))

    def _lesion_radius_mm(self) -> float:
        """The radius typed in the page: 0 (empty) for a point only."""
        text = str(self.state.lesion_radius_mm or "").strip()
        try:
            radius = float(text) if text else 0.0
        except ValueError:
            radius = -1.0
        if not (np.isfinite(radius) and radius >= 0):
            raise SAMv2Error(f"the lesion radius must be a number of mm (empty or 0: a point only), got {text!r}")
        return radius

    async def _match(self, ras: np.ndarray, label: str) -> None:
        self._set(error="", busy=True, progress=0, status=f"matching {label}")
        generation = self._generation
        try:
            radius = self._lesion_radius_mm()
            if radius > 0:
                lesion, label_map = await asyncio.to_thread(self.session.propagate, ras_to_lps(ras), radius,
                                                            self._progress_from_thread())
                result = lesion.centre
            else:
                lesion = label_map = None
                result = await asyncio.to_thread(self.session.match, ras_to_lps(ras), self._progress_from_thread())
        except Exception as exc:  # noqa: BLE001
            if generation == self._generation:
                self._fail(exc)
            return
        if generation != self._generation:
            return
        self._show_lesion(label, lesion, label_map)
        q_lps = np.asarray(result.query_point.to("LPS").xyz, float)
        q_ras = lps_to_ras(q_lps)
        idx = self._matches.AddControlPointWorld(*q_ras, label if result.confident else f"{label} NOT CONFIDENT")
        self._matches.SetNthControlPointSelected(idx, bool(result.confident))
        self._matches.SetNthControlPointLocked(idx, True)
        self._match_offset_ras = q_ras - ras
        self.followup_view.get_view_node().JumpSliceByCentering(*q_ras)
        self._publish_geometry()
        self._set(busy=False, progress=100, status=f"{label} matched", n_points=int(self._points.GetNumberOfControlPoints()),
                  match={"label": label, "score": round(float(result.score), 3), "confident": bool(result.confident),
                         "reason": result.reason or "", "lps": [round(float(v), 2) for v in q_lps],
                         "template_lps": [round(float(v), 2) for v in ras_to_lps(ras)]},
                  match_lps=", ".join(f"{v:.2f}" for v in q_lps))

    def _show_lesion(self, label: str, lesion, label_map) -> None:
        """Draw a propagated lesion's region in red over the follow-up (or remove the last one)."""
        old = self._volume_nodes.pop("lesion", None)
        if old is not None:
            self.slicer.scene.RemoveNode(old)
        query_node = self._volume_nodes.get("query")
        if lesion is None or label_map is None:
            self._show(self.followup_view, query_node)
            self._set(lesion=None)
            return
        path = Path(self._tmp.name) / "lesion.nrrd"
        sitk.WriteImage(label_map.to_sitk(), str(path), True)
        node = self._load_node(path, label_map)
        display = node.GetDisplayNode()
        display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeRed")
        display.AutoWindowLevelOff()
        display.SetWindowLevel(1.0, 0.5)
        display.SetApplyThreshold(1)  # outside the lesion (0) the foreground is transparent
        display.SetLowerThreshold(0.5)
        self._volume_nodes["lesion"] = node
        self._show(self.followup_view, query_node, node, 0.5)
        self._set(lesion={"label": label, "radius_mm": round(float(lesion.details.get("radius_mm", 0.0)), 2),
                          "followup_ml": round(lesion.followup_volume_ml, 2),
                          "baseline_ml": round(lesion.baseline_volume_ml, 2), "confident": lesion.confident})

    def _on_baseline_slice_changed(self, node, _event) -> None:
        """Link: the follow-up shows the same zoom and the slice through (baseline position + last match offset)."""
        if self._loop is not None:
            self._publish_geometry()
        follow = self.followup_view.get_view_node()
        m = node.GetSliceToRAS()
        centre = np.array([m.GetElement(r, 3) for r in range(3)]) + self._match_offset_ras
        fov = node.GetFieldOfView()
        disable = follow.StartModify()
        follow.SetFieldOfView(fov[0], fov[1], follow.GetFieldOfView()[2])
        follow.JumpSliceByOffsetting(*centre)
        follow.EndModify(disable)

    async def goto(self):
        """Centre the baseline view on the LPS point typed in the page."""
        try:
            lps = [float(v) for v in str(self.state.goto_lps).replace(";", ",").split(",")]
            if len(lps) != 3:
                raise SAMv2Error(f"type a point as x, y, z in LPS millimetres, got {self.state.goto_lps!r}")
            self.baseline_view.get_view_node().JumpSliceByCentering(*lps_to_ras(np.array(lps)))
            self._publish_geometry()
            self._set(error="")
        except ValueError:
            self._fail(SAMv2Error(f"type a point as x, y, z in LPS millimetres, got {self.state.goto_lps!r}"))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    async def register(self):
        """Register the follow-up onto the baseline and show it fused (green) on the baseline view."""
        self._set(error="", busy=True, progress=0, status="registering the follow-up onto the baseline")
        generation = self._generation
        try:
            result, resampled = await asyncio.to_thread(self.session.register, self.register_mode,
                                                        self._progress_from_thread())
            if generation != self._generation:
                return
            path = Path(self._tmp.name) / "followup_registered.nrrd"
            sitk.WriteImage(resampled.to_sitk(), str(path), True)
            old = self._volume_nodes.pop("registered", None)
            if old is not None:
                self.slicer.scene.RemoveNode(old)
            node = self._load_node(path, resampled)
            node.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeGreen")
            self._volume_nodes["registered"] = node
            self._volume_nodes["template"].GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeMagenta")
            self._show(self.baseline_view, self._volume_nodes["template"], node, 0.5)
            lin = result.report.get("linear", {})
            self._set(busy=False, progress=100, registered=True,
                      status=f"registered ({self.register_mode}, {lin.get('inliers', '?')} inlier matches): "
                             "baseline magenta, registered follow-up green, grey where they agree")
        except Exception as exc:  # noqa: BLE001
            if generation == self._generation:
                self._fail(exc)

    # --- page ------------------------------------------------------------------------------
    def _build_ui(self) -> None:
        with SinglePageLayout(self.server, full_height=True) as layout:
            layout.title.set_text("SAMv2 view")
            with layout.toolbar:
                v3.VSpacer()
                v3.VTextField(v_model=("template_path",), label="baseline (path)", density="compact",
                              hide_details=True, id="template-path", style="max-width: 22em", classes="mx-1")
                v3.VTextField(v_model=("query_path",), label="follow-up (path)", density="compact",
                              hide_details=True, id="query-path", style="max-width: 22em", classes="mx-1")
                v3.VBtn("Open", click=self.ctrl.open_files, id="open-button", disabled=("busy",))
                v3.VBtn("Register", click=self.ctrl.register, id="register-button", disabled=("busy",),
                        color="primary")
            with layout.content, html.Div(style="display: flex; flex-direction: column; height: 100%;"):
                with html.Div(style="flex: 0 0 auto; padding: 4px 8px;"):
                    v3.VProgressLinear(model_value=("progress",), height=6, color="primary",
                                       indeterminate=("busy && progress == 0",), id="progress")
                    html.Div("{{ status }}", id="status", style="font-size: 0.9em;")
                    v3.VAlert(v_if="error", type="error", density="compact", closable=True,
                              text=("error",), id="error", click_close="error = ''")
                    with html.Div(style="min-height: 1.9em;"), \
                        html.Div(v_if="match", id="match", style="font-size: 0.95em;"):  # space kept: views stay put
                        html.B("{{ match.label }}: ")
                        html.Span("score {{ match.score }} ", id="match-score")
                        v3.VChip("confident", v_if="match.confident", color="green", size="small",
                                 id="match-confident")
                        v3.VChip("NOT CONFIDENT: {{ match.reason }}", v_if="!match.confident", color="red",
                                 size="small", variant="flat", id="match-not-confident")
                        html.Span(" matched at LPS (", style="margin-left: 6px")
                        html.Span("{{ match_lps }}", id="match-lps")
                        html.Span(") mm, placed at LPS (")
                        html.Span("{{ match.template_lps.join(', ') }}", id="match-template-lps")
                        html.Span(")")
                    with html.Div(style="display: flex; gap: 6px; align-items: center; max-width: 52em;"):
                        v3.VTextField(v_model=("goto_lps",), label="go to baseline point (LPS x, y, z mm)",
                                      density="compact", hide_details=True, id="goto-lps")
                        v3.VBtn("Go", click=self.ctrl.goto, id="goto-button", size="small")
                        v3.VTextField(v_model=("lesion_radius_mm",), label="lesion radius mm (empty: point only)",
                                      density="compact", hide_details=True, id="lesion-radius",
                                      style="max-width: 16em")
                    with html.Div(v_if="lesion", id="lesion", style="font-size: 0.95em;"):
                        html.Span("lesion {{ lesion.label }}: a {{ lesion.radius_mm }} mm ball, "
                                  "{{ lesion.baseline_ml }} mL on the baseline, ")
                        html.Span("{{ lesion.followup_ml }}", id="lesion-followup-ml")
                        html.Span(" mL on the follow-up (red)")
                        v3.VChip("NOT CONFIDENT", v_if="!lesion.confident", color="red", size="small",
                                 variant="flat", classes="ml-1")
                    html.Div("{{ baseline_geometry }}", id="baseline-geometry", style="display: none;")
                    html.Div("{{ followup_geometry }}", id="followup-geometry", style="display: none;")
                with html.Div(style="flex: 0 0 auto; display: flex; font-weight: bold; font-size: 0.9em;"):
                    html.Div("Baseline {{ template_name }} - click to place a point",
                             style="flex: 1; padding: 2px 8px; background: #F34A33; color: white;")
                    html.Div("Follow-up {{ query_name }} - matches: green + confident, red NOT CONFIDENT",
                             style="flex: 1; padding: 2px 8px; background: #6DAD4A; color: white;")
                with html.Div(style="flex: 1 1 auto; position: relative; min-height: 300px;"):
                    self.layout_manager.initialize_layout_grid(layout)


def serve(session: ViewSession, template_path: str, query_path: str, exposure: Exposure, port: int = 0,
          register_mode: str = "rigid", shared_session: bool = False) -> None:
    """Build the page and serve it until interrupted (blocking). Port 0 picks a free port.

    Every request passes the :class:`~samv2view.guard.Gate` (token, origin, one tab at a time)."""
    if port == 0:
        family = socket.AF_INET6 if ":" in exposure.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((exposure.host, 0))
            port = s.getsockname()[1]
    if not os.environ.get("DISPLAY"):  # headless: VTK renders with EGL (Mesa) instead of trying an X server first
        os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")
    sys.argv = sys.argv[:1]  # trame parses sys.argv for its own options: ours are parsed already
    app = SAMv2ViewApp(session, template_path, query_path, register_mode=register_mode)
    gate = Gate(exposure, port, shared_session, app.reset_for_next_client)
    app.ctrl.on_server_bind.add(lambda wslink_server: wslink_server.app.middlewares.append(gate.middleware))

    def announce(**_):
        if exposure.warning:
            print(exposure.warning, file=sys.stderr, flush=True)
        print(f"samv2 view: serving on {exposure.url(port)} (Ctrl+C to stop)", flush=True)

    app.ctrl.on_server_ready.add(announce)
    app.server.start(host=exposure.host, port=port, open_browser=False, show_connection_info=False, timeout=0)
