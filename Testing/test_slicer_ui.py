"""Static checks of the Slicer module's GUI, CMake and dependency handling.

No Slicer application (and so no Qt) is available here, so the widget code and the .ui file
are checked for consistency by parsing them: every ``self.ui.<name>`` the code uses exists in
the .ui, every parameter of the parameter node has a widget that parameterNodeWrapper can
connect to its type, MRML widgets get the scene, and the signals the code connects exist on
the widget classes used. The extension CMake files are checked for the Extension Wizard
conventions and configured with cmake against stand-in Slicer macros.
"""
from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SAMv2Slicer"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "SAMv2Slicer.ui"
MODULE_FILE = MODULE_DIR / "SAMv2Slicer.py"
sys.path.insert(0, str(MODULE_DIR))

from SAMv2SlicerLib import constants, dependencies  # noqa: E402

QT_CLASSES = {"QWidget", "QLabel", "QPushButton", "QCheckBox", "QComboBox", "QDoubleSpinBox", "QSpinBox",
              "QProgressBar", "QTableWidget", "QLineEdit", "QSlider", "QGroupBox", "QFrame"}
# Signals (as connected with widget.connect("signal(args)", slot)) of the classes the module uses.
SIGNALS = {
    "QPushButton": {"clicked(bool)", "clicked()", "toggled(bool)"},
    "QCheckBox": {"toggled(bool)", "stateChanged(int)", "clicked(bool)"},
    "QComboBox": {"currentIndexChanged(int)", "activated(int)"},
    "QTableWidget": {"cellDoubleClicked(int,int)", "cellClicked(int,int)", "itemSelectionChanged()"},
    "qMRMLNodeComboBox": {"currentNodeChanged(vtkMRMLNode*)", "currentNodeChanged(bool)", "nodeAdded(vtkMRMLNode*)"},
    "qMRMLSegmentSelectorWidget": {"currentSegmentChanged(QString)", "currentNodeChanged(vtkMRMLNode*)"},
    "ctkPathLineEdit": {"currentPathChanged(QString)"},
    "QDoubleSpinBox": {"valueChanged(double)"},
}


# --------------------------------------------------------------------------------------------
# parsing helpers
# --------------------------------------------------------------------------------------------
def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI_FILE).getroot()
    widgets = {}
    for w in root.iter("widget"):
        name = w.get("name")
        assert name not in widgets, f"duplicate widget name {name} in the .ui"
        widgets[name] = w
    return widgets


def widget_property(widget: ET.Element, name: str):
    for p in widget.findall("property"):
        if p.get("name") == name:
            child = list(p)[0]
            if child.tag == "stringlist":
                return [s.text for s in child.findall("string")]
            return child.text
    return None


def module_ast() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text())


def ui_attributes_used() -> set[str]:
    """Names X in every ``self.ui.X`` of the module file."""
    used = set()
    for node in ast.walk(module_ast()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            used.add(node.attr)
    return used


def parameters() -> dict[str, dict]:
    """Parameters of the @parameterNodeWrapper class: {name: {type, choices, range, default}}."""
    namespace = {name: getattr(constants, name) for name in dir(constants) if name.isupper()}
    namespace["list"] = list
    for node in module_ast().body:
        if isinstance(node, ast.ClassDef) and any(
                isinstance(d, ast.Name) and d.id == "parameterNodeWrapper" for d in node.decorator_list):
            params = {}
            for stmt in node.body:
                if not isinstance(stmt, ast.AnnAssign):
                    continue
                info = {"default": ast.literal_eval(stmt.value) if stmt.value is not None else None}
                ann = stmt.annotation
                if isinstance(ann, ast.Subscript) and getattr(ann.value, "id", "") == "Annotated":
                    base, *extras = ann.slice.elts
                    info["type"] = ast.unparse(base)
                    for extra in extras:
                        kind = extra.func.id
                        args = [eval(compile(ast.Expression(a), "<ann>", "eval"), namespace) for a in extra.args]
                        info["choices" if kind == "Choice" else "range"] = args[0] if kind == "Choice" else args
                else:
                    info["type"] = ast.unparse(ann)
                params[stmt.target.id] = info
            return params
    raise AssertionError("no @parameterNodeWrapper class in SAMv2Slicer.py")


def connected_signals() -> list[tuple[str, str]]:
    """(widget name, signal) for every ``self.ui.<w>.connect("signal", ...)``."""
    out = []
    for node in ast.walk(module_ast()):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"
                and isinstance(node.func.value, ast.Attribute) and isinstance(node.func.value.value, ast.Attribute)
                and node.func.value.value.attr == "ui" and node.args and isinstance(node.args[0], ast.Constant)):
            out.append((node.func.value.attr, node.args[0].value))
    return out


# --------------------------------------------------------------------------------------------
# widget file <-> .ui
# --------------------------------------------------------------------------------------------
def test_every_ui_widget_the_code_uses_exists():
    used = ui_attributes_used()
    widgets = ui_widgets()
    assert len(used) >= 15, "the widget code should drive its GUI through self.ui"
    missing = sorted(used - set(widgets))
    assert not missing, f"self.ui.<name> used in SAMv2Slicer.py but absent from the .ui: {missing}"


def module_constant(name: str):
    for node in module_ast().body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"SAMv2Slicer.py has no constant {name}")


def test_segment_parameters_are_kept_in_sync_by_the_widget():
    """parameterNodeWrapper has no connector for qMRMLSegmentSelectorWidget: the widget writes the
    selected segmentation and segment ID into the parameter node and shows them from it."""
    synced = module_constant("SEGMENT_PARAMETERS")
    assert set(synced) == {"lesionSegmentation", "lesionSegmentID"} <= set(parameters())
    written, read = set(), set()
    for node in ast.walk(module_ast()):
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Attribute) and getattr(t.value, "id", None) == "p":
                    written.add(t.attr)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load) and getattr(node.value, "id", "") == "p":
            read.add(node.attr)
    assert set(synced) <= written and set(synced) <= read
    source = MODULE_FILE.read_text()
    assert "setCurrentSegmentID(p.lesionSegmentID)" in source and "setCurrentNode(p.lesionSegmentation)" in source


def test_gui_runs_steps_in_the_worker_process_not_in_threads():
    """The widget binds controls and calls the Qt-free controller, which owns the worker,
    the background embedding, cancel and the run state (issue 20)."""
    source = MODULE_FILE.read_text()
    assert "threading" not in source and "BackgroundTask" not in source and "import torch" not in source
    assert "self.controller.poll()" in source and "self.controller.cancel()" in source
    assert "controller.selection_changed(" in source  # embedding starts when both volumes are selected
    assert "loadFileType=" not in source and "loadFileTypes=" in source  # loadFileType is deprecated
    methods = {n.name: ast.unparse(n) for n in ast.walk(module_ast()) if isinstance(n, ast.FunctionDef)}
    # scene close stops the steps (the controller waits for them); cleanup ends the worker
    assert "self.controller.scene_closing()" in methods["onSceneStartClose"]
    assert "self.controller.close()" in methods["cleanup"]
    # the results table is filled from the parameter node, not from a selector signal (defect 3)
    assert "self._fillResultsTable()" in methods["_onParameterNodeModified"]
    assert "_fillResultsTable" not in methods["setup"]
    # the self-test skips only when torch is absent, checked without importing it (defect 12)
    assert "dependencies.torch_problem()" in methods["runTest"] and "import torch" not in methods["runTest"]


def test_every_parameter_has_a_connectable_widget():
    params = {k: v for k, v in parameters().items() if k not in module_constant("SEGMENT_PARAMETERS")}
    widgets = ui_widgets()
    by_param = {}
    for name, w in widgets.items():
        for p in w.findall("property"):
            if p.get("name") == "SlicerParameterName":
                by_param.setdefault(p.find("string").text, []).append((name, w.get("class"), w))
    assert set(params) == set(by_param), (f"parameters without widget: {sorted(set(params) - set(by_param))}; "
                                          f"widgets naming unknown parameters: {sorted(set(by_param) - set(params))}")
    for pname, info in params.items():
        assert len(by_param[pname]) == 1, f"{pname} is bound to several widgets"
        wname, cls, w = by_param[pname][0]
        t = info["type"]
        # the exact widget types parameterNodeWrapper's GUI connectors accept
        if t == "bool":
            assert cls in ("QCheckBox", "QPushButton"), (pname, cls)
        elif t == "float":
            assert cls in ("QDoubleSpinBox", "ctkSliderWidget"), (pname, cls)
            if cls == "ctkSliderWidget":
                assert "range" in info
        elif t == "int":
            assert cls in ("QSpinBox", "QSlider"), (pname, cls)
        elif t == "str":
            assert cls in ("QComboBox", "QLineEdit", "QTextEdit"), (pname, cls)
            if cls == "QComboBox":
                assert "choices" in info, f"{pname}: a QComboBox needs a Choice annotation"
                assert info["default"] in info["choices"], f"{pname}: default {info['default']!r} not a choice"
        elif t.startswith("pathlib."):
            assert cls in ("ctkPathLineEdit", "ctkDirectoryButton"), (pname, cls)
        elif t.startswith("vtkMRML"):
            assert cls == "qMRMLNodeComboBox", (pname, cls)
            assert t in widget_property(w, "nodeTypes"), f"{wname} nodeTypes do not list {t}"
        else:
            raise AssertionError(f"{pname}: type {t} has no known widget connector")
        if "range" in info:
            lo, hi = info["range"]
            assert lo <= (info["default"] if info["default"] is not None else lo) <= hi


def test_choices_come_from_the_logic_constants():
    params = parameters()
    from SAMv2SlicerLib import logic

    assert tuple(params["matchingMethod"]["choices"]) == logic.METHODS
    assert tuple(params["registrationMode"]["choices"]) == logic.REGISTRATION_MODES
    assert tuple(params["device"]["choices"]) == constants.DEVICES
    from samv2core.registration.options import FEATURES

    assert tuple(params["registrationFeatures"]["choices"]) == logic.REGISTRATION_FEATURES == FEATURES


def test_mrml_widgets_receive_the_scene_and_classes_are_declared():
    root = ET.parse(UI_FILE).getroot()
    widgets = ui_widgets()
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "SAMv2Slicer"
    receivers = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
                 and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)" and c.findtext("sender") == "SAMv2Slicer"}
    for name, w in widgets.items():
        if w.get("class").startswith(("qMRML", "qSlicer")) and name != "SAMv2Slicer":
            assert name in receivers, f"{name} ({w.get('class')}) never gets the MRML scene"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    for w in widgets.values():
        cls = w.get("class")
        assert cls in QT_CLASSES or cls in declared, f"widget class {cls} is neither Qt nor declared"


def test_connected_signals_exist_on_the_widget_classes():
    widgets = ui_widgets()
    conns = connected_signals()
    assert len(conns) >= 8
    for name, signal in conns:
        cls = widgets[name].get("class")
        assert signal in SIGNALS.get(cls, set()), f"self.ui.{name} ({cls}) has no signal {signal}"


def test_module_file_follows_the_scripted_module_template():
    tree = module_ast()
    classes = {n.name: [ast.unparse(b) for b in n.bases] for n in tree.body if isinstance(n, ast.ClassDef)}
    assert classes["SAMv2Slicer"] == ["ScriptedLoadableModule"]
    assert classes["SAMv2SlicerWidget"][0] == "ScriptedLoadableModuleWidget"
    assert classes["SAMv2SlicerLogic"] == ["ScriptedLoadableModuleLogic"]
    assert classes["SAMv2SlicerTest"] == ["ScriptedLoadableModuleTest"]
    source = MODULE_FILE.read_text()
    assert 'loadUI(self.resourcePath("UI/SAMv2Slicer.ui"))' in source
    assert "registerCustomSampleDataSource" in source and 'connect("startupCompleted()", registerSampleData)' in source
    # application-only imports sit in one guarded block; outside Slicer the import fails clearly
    assert re.search(r"try:.*from slicer\.ScriptedLoadableModule import.*except ImportError", source, re.S)


def test_module_file_refuses_plain_python_clearly():
    code = f"import sys; sys.path.insert(0, {str(MODULE_DIR)!r}); import SAMv2Slicer"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "SAMv2SlicerLib" in proc.stderr and "Slicer application" in proc.stderr


# --------------------------------------------------------------------------------------------
# the .ui loaded by a real Qt (PySide6 from PyPI)
# --------------------------------------------------------------------------------------------
REAL_QT_LOAD = r"""
import json, os, re, sys, tempfile
os.environ["QT_QPA_PLATFORM"] = "offscreen"
from PySide6.QtCore import QObject, Qt, Signal, Slot, qInstallMessageHandler
from PySide6.QtUiTools import QUiLoader
from PySide6.QtWidgets import QApplication, QFormLayout, QWidget

messages = []
qInstallMessageHandler(lambda mode, context, text: messages.append(text))
app = QApplication([])
text = open(sys.argv[1]).read()
custom = re.findall(r"<customwidget>\s*<class>(\w+)</class>", text)
# Stand-ins for Slicer's classes: QWidgets with the scene signal/slot the .ui connects, typed
# QObject* (vtkMRMLScene* is unknown here), and without the CTK-only set property 'filters'.
text = text.replace("vtkMRMLScene*", "QObject*")
text = re.sub(r'<property name="filters">\s*<set>ctkPathLineEdit::[^<]*</set>\s*</property>', "", text)
received = []

class Placeholder(QWidget):
    mrmlSceneChanged = Signal(QObject)

    @Slot(QObject)
    def setMRMLScene(self, scene):
        received.append(self.objectName())

classes = [type(name, (Placeholder,), {}) for name in custom]  # kept alive: the loader holds no reference
loader = QUiLoader()
for cls in classes:
    loader.registerCustomWidget(cls)
with tempfile.NamedTemporaryFile("w", suffix=".ui", delete=False) as handle:
    handle.write(text)
top = loader.load(handle.name)
os.unlink(handle.name)
top.mrmlSceneChanged.emit(QObject())
outside = []  # widgets of a form whose layout does not hold them (drawn on top of the others)
for form in top.findChildren(QFormLayout):
    for child in form.parentWidget().findChildren(QWidget, options=Qt.FindDirectChildrenOnly):
        if form.indexOf(child) < 0:
            outside.append(child.objectName())
print(json.dumps({"class": type(top).__name__, "messages": messages, "received": received, "outside": outside}))
"""


def test_ui_loads_in_real_qt_without_warnings():
    """QUiLoader (PySide6, offscreen) builds the whole .ui: no Qt warning (occupied form cells,
    bad properties, failed connections), every widget inside its layout, every MRML widget
    connected to the scene signal. Slicer/CTK classes are QWidget stand-ins."""
    pytest.importorskip("PySide6.QtUiTools", reason="PySide6 (PyPI) is not installed")
    proc = subprocess.run([sys.executable, "-c", REAL_QT_LOAD, str(UI_FILE)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "QT_QPA_PLATFORM": "offscreen"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["class"] == "qMRMLWidget"
    unknown = re.compile(r"unable to create a custom widget of the class")
    warnings = [m for m in out["messages"] if not unknown.search(m)]
    assert warnings == [], warnings
    assert out["outside"] == [], f"widgets outside their form layout: {out['outside']}"
    mrml = {name for name, w in ui_widgets().items()
            if w.get("class").startswith(("qMRML", "qSlicer")) and name != "SAMv2Slicer"}
    assert set(out["received"]) == mrml


# --------------------------------------------------------------------------------------------
# CMake (Extension Wizard layout)
# --------------------------------------------------------------------------------------------
def test_cmake_files_follow_extension_conventions():
    top = (REPO / "CMakeLists.txt").read_text()
    for needle in ("project(SAMv2Slicer)", "find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                   "add_subdirectory(SAMv2Slicer)", "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                   "include(${Slicer_EXTENSION_CPACK})", 'set(EXTENSION_DEPENDS "PyTorch")'):
        assert needle in top, needle
    for var in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert f"set(EXTENSION_{var} " in top
    mod = (MODULE_DIR / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in mod and "NAME ${MODULE_NAME}" in mod
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in mod
    listed = set(re.findall(r"\$\{MODULE_NAME\}Lib/(\w+\.py)", mod))
    on_disk = {p.name for p in (MODULE_DIR / "SAMv2SlicerLib").glob("*.py")}
    assert listed == on_disk, f"SAMv2SlicerLib files not listed in CMake: {sorted(on_disk - listed)}"
    for rel in ("Resources/Icons/${MODULE_NAME}.png", "Resources/UI/${MODULE_NAME}.ui", "requirements.txt",
                "Scripts/samv2_batch.py"):
        assert rel in mod
        assert (MODULE_DIR / rel.replace("${MODULE_NAME}", "SAMv2Slicer")).is_file()


def _cmake_block(text: str, start: str) -> str:
    i = text.index(start)
    return text[i:text.index(")", i)]


def test_cmake_lists_and_package_data_name_the_same_files():
    """The extension ships what the wheel ships: the CMake data globs of the bundled core equal
    pyproject's package-data (weights with NOTICE and model card), and the module's script and
    resource lists name every file of the module folder."""
    import tomllib

    mod = (MODULE_DIR / "CMakeLists.txt").read_text()
    core = REPO / "SAMv2Core" / "samv2core"
    cmake_globs = re.findall(r"\$\{SAMV2CORE_SOURCE_DIR\}/(\S+)", _cmake_block(mod, "file(GLOB SAMV2CORE_RESOURCES"))
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    by_cmake = {p.relative_to(core) for g in cmake_globs for p in core.glob(g)}
    by_wheel = {p.relative_to(core) for g in package_data["samv2core"] for p in core.glob(g)}
    assert by_cmake == by_wheel, (sorted(by_cmake - by_wheel), sorted(by_wheel - by_cmake))
    for needed in ("models/NOTICE.txt", "models/MODEL_CARD.md", "data/NOTICE.txt"):
        assert Path(needed) in by_cmake, needed
    assert any(p.suffix == ".safetensors" for p in by_cmake)

    def listed(block: str) -> set[str]:
        return {entry.replace("${MODULE_NAME}", "SAMv2Slicer")
                for entry in _cmake_block(mod, block).split()[1:]}

    scripts = listed("set(MODULE_PYTHON_SCRIPTS")
    on_disk = {str(p.relative_to(MODULE_DIR)) for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts}
    assert scripts == on_disk, (sorted(scripts - on_disk), sorted(on_disk - scripts))
    resources = listed("set(MODULE_PYTHON_RESOURCES")
    # Resources/Screenshots: README and extension-index pictures (EXTENSION_SCREENSHOTURLS), not installed
    data_files = {str(p.relative_to(MODULE_DIR)) for p in (MODULE_DIR / "Resources").rglob("*")
                  if p.is_file() and "Screenshots" not in p.relative_to(MODULE_DIR).parts}
    data_files.add("requirements.txt")
    assert resources == data_files, (sorted(resources - data_files), sorted(data_files - resources))


STUB_SLICER = r"""
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/empty.cmake)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer/qt-scripted-modules)
set(BUILD_TESTING ON)
"""
STUB_USE = r"""
macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(_C "NO_INSTALL_SUBDIR;GLOBAL_TARGET" "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  if(_C_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "ctkMacroCompilePythonScript: unknown ${_C_UNPARSED_ARGUMENTS}")
  endif()
  if(NOT _C_SOURCE_DIR)
    set(_C_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  foreach(_f IN LISTS _C_SCRIPTS _C_RESOURCES)
    if(NOT EXISTS ${_C_SOURCE_DIR}/${_f})
      message(FATAL_ERROR "missing ${_C_SOURCE_DIR}/${_f}")
    endif()
    get_filename_component(_d "${_C_DESTINATION_DIR}/${_f}" DIRECTORY)
    file(COPY "${_C_SOURCE_DIR}/${_f}" DESTINATION "${_d}")
  endforeach()
endmacro()
macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "slicerMacroBuildScriptedModule: unknown ${MY_UNPARSED_ARGUMENTS}")
  endif()
  ctkMacroCompilePythonScript(TARGET_NAME ${MY_NAME} SCRIPTS "${MY_SCRIPTS}" RESOURCES "${MY_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR} INSTALL_DIR x NO_INSTALL_SUBDIR)
endmacro()
function(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${MY_SCRIPT})
    message(FATAL_ERROR "missing test script ${MY_SCRIPT}")
  endif()
endfunction()
"""


def test_cmake_configures_and_lays_out_the_module(tmp_path):
    cmake = shutil.which("cmake")
    if cmake is None:
        pytest.skip("not available: cmake is not installed")
    stub = tmp_path / "slicer"
    stub.mkdir()
    (stub / "SlicerConfig.cmake").write_text(STUB_SLICER)
    (stub / "UseSlicer.cmake").write_text(STUB_USE)
    (stub / "empty.cmake").write_text("")
    build = tmp_path / "build"
    proc = subprocess.run([cmake, "-S", str(REPO), "-B", str(build), f"-DSlicer_DIR={stub}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lib = build / "lib" / "Slicer" / "qt-scripted-modules"
    for rel in ("SAMv2Slicer.py", "SAMv2SlicerLib/logic.py", "Resources/UI/SAMv2Slicer.ui", "requirements.txt",
                "Scripts/samv2_batch.py", "samv2core/__init__.py", "samv2core/matching.py",
                "samv2core/models/NOTICE.txt", "samv2core/models/MODEL_CARD.md"):
        assert (lib / rel).is_file(), rel
    # the bundled core brings its sample scans along (used by the Sample Data entry)
    assert any((lib / "samv2core" / "data").glob("*.nrrd"))
    # the laid-out folder works on its own: the requirements file sits where the code looks for it
    code = (f"import sys; sys.path.insert(0, {str(lib)!r}); from SAMv2SlicerLib import dependencies as d; "
            "print(d.REQUIREMENTS_FILE)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert Path(out.stdout.strip()) == lib / "requirements.txt"


# --------------------------------------------------------------------------------------------
# dependencies
# --------------------------------------------------------------------------------------------
def test_requirements_file_is_valid_and_never_replaces_slicer_packages():
    from packaging.requirements import Requirement

    lines = dependencies.read_requirements()
    assert lines, "requirements.txt is empty"
    names = {Requirement(line).name.lower() for line in lines}
    assert not names & {p.lower() for p in dependencies.PROTECTED}
    assert dependencies.missing_requirements() == []  # everything is installed in this environment


def test_missing_requirements_and_install_paths(tmp_path, monkeypatch):
    req = tmp_path / "requirements.txt"
    req.write_text("# comment\nscipy>=1.0\nnot-a-real-package-samv2x>=1.0\nsafetensors>=999\n")
    assert dependencies.missing_requirements(req) == ["not-a-real-package-samv2x>=1.0", "safetensors>=999"]

    calls = {}
    fake_slicer = types.SimpleNamespace(util=types.SimpleNamespace(
        pip_install=lambda args: calls.setdefault("pip_install", args)))

    # Slicer < 5.12: confirmation dialog, then pip_install with Slicer's packages pinned
    monkeypatch.setattr(dependencies, "_slicer_packaging", lambda: None)
    assert dependencies.ensure_requirements(fake_slicer, confirm=lambda text: False, path=req) is False
    assert "pip_install" not in calls  # asked first, user said no: nothing installed
    dependencies.ensure_requirements(fake_slicer, confirm=lambda text: True, path=req)
    args = calls["pip_install"]
    assert args[:2] == ["not-a-real-package-samv2x>=1.0", "safetensors>=999"] and args[2] == "-c"
    pins = Path(args[3]).read_text()
    for name in ("numpy", "SimpleITK"):
        assert f"{name}=={importlib.metadata.version(name)}" in pins

    # Slicer 5.12+: slicer.packaging.pip_ensure (it asks and shows progress itself)
    seen = {}

    def pip_ensure(reqs, constraints=None, skip_packages=None, requester=None, **kw):
        seen.update(reqs=[str(r) for r in reqs], skip=skip_packages, requester=requester, constraints=constraints)

    monkeypatch.setattr(dependencies, "_slicer_packaging", lambda: types.SimpleNamespace(pip_ensure=pip_ensure))
    dependencies.ensure_requirements(fake_slicer, confirm=lambda text: pytest.fail("pip_ensure asks itself"), path=req)
    assert seen["reqs"] == ["not-a-real-package-samv2x>=1.0", "safetensors>=999"]
    assert seen["skip"] is None and seen["requester"] == "SAMv2Slicer"  # constraints only (skip_packages is discouraged)
    pins = Path(seen["constraints"]).read_text()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins


@pytest.mark.parametrize("failure", ["declined", "pip failed", "torch install failed"])
def test_declined_or_failed_install_is_reported_not_raised(failure, monkeypatch, tmp_path):
    """slicer.packaging.pip_ensure raises RuntimeError when the user declines and CalledProcessError
    when pip fails; PyTorchUtils.installTorch raises through _executePythonModule. ensure_all turns
    each into one message and False (nothing runs), never a traceback."""
    req = tmp_path / "requirements.txt"
    req.write_text("not-a-real-package-samv2x>=1.0\n")
    monkeypatch.setattr(dependencies, "REQUIREMENTS_FILE", req)
    monkeypatch.setattr(dependencies, "missing_requirements",
                        lambda path=req: ["not-a-real-package-samv2x>=1.0"])

    def pip_ensure(reqs, **kw):
        if failure == "declined":
            raise RuntimeError("User declined package installation")
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install"])

    monkeypatch.setattr(dependencies, "_slicer_packaging", lambda: types.SimpleNamespace(pip_ensure=pip_ensure))
    if failure == "torch install failed":
        monkeypatch.setattr(dependencies, "torch_problem", lambda: "PyTorch is not installed")

        class FailingTorch:
            def torchInstalled(self):
                return False

            def installTorch(self, askConfirmation=True, **kw):
                raise subprocess.CalledProcessError(2, ["PythonSlicer", "-m", "light_the_torch"])

        monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FailingTorch))
    messages = []
    ok = dependencies.ensure_all(None, confirm=lambda text: True, report=messages.append)
    assert ok is False and len(messages) == 1
    expected = {"declined": "declined", "pip failed": "exit code 1", "torch install failed": "exit code 2"}[failure]
    assert expected in messages[0] and "nothing was run" in messages[0]


def test_torch_comes_from_the_pytorch_extension(monkeypatch):
    assert dependencies.ensure_torch(None, confirm=lambda t: pytest.fail("torch is installed: no question")) is True
    state = {"problem": "PyTorch is not installed"}
    monkeypatch.setattr(dependencies, "torch_problem", lambda: state["problem"])
    installs = []

    class FakeLogic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=None, **kw):
            installs.append((askConfirmation, torchVersionRequirement))
            state["problem"] = None
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=FakeLogic))
    said = []
    assert dependencies.ensure_torch(None, confirm=lambda t: False, report=said.append) is False and installs == []
    assert "not installed" in said[0]  # declined: said so, nothing installed
    # defect 6: the install asks the extension for a torch that meets the module's requirement
    assert dependencies.ensure_torch(None, confirm=lambda t: True) is True
    assert installs == [(False, dependencies.TORCH_REQUIREMENT)]
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)  # extension absent: tell the user, install nothing
    state["problem"] = "PyTorch is not installed"
    messages = []
    fake_slicer = types.SimpleNamespace(util=types.SimpleNamespace(errorDisplay=messages.append))
    assert dependencies.ensure_torch(fake_slicer, confirm=lambda t: True) is False
    assert "PyTorch" in messages[0]


def test_torch_version_is_checked_from_metadata_without_importing_it(monkeypatch):
    """Defect 6: an installed torch is checked against TORCH_REQUIREMENT from its package
    metadata; torch is never imported by the check (the GUI process must not load it)."""

    code = ("import sys; from SAMv2SlicerLib import dependencies as d; "
            "print(d.torch_version(), d.torch_problem(), 'torch' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "SAMv2Slicer"), str(REPO / "SAMv2Core")]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env,
                         check=True).stdout.split()
    assert out == [importlib.metadata.version("torch"), "None", "False"]
    monkeypatch.setattr(dependencies, "torch_version", lambda: "1.12.1+cu113")
    assert dependencies.torch_problem() == f"PyTorch 1.12.1+cu113 is installed; SAMv2 needs torch{dependencies.TORCH_REQUIREMENT}"
    asked = []
    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=lambda: None))
    assert dependencies.ensure_torch(None, confirm=lambda t: asked.append(t) or False, report=lambda t: None) is False
    assert "1.12.1" in asked[0]  # the user is told why an update is offered
    monkeypatch.setattr(dependencies, "torch_version", lambda: None)
    assert dependencies.torch_problem() == "PyTorch is not installed"


# --------------------------------------------------------------------------------------------
# sample data
# --------------------------------------------------------------------------------------------
def test_sample_pair_is_simulated_once_and_cached(tmp_path):
    from samv2core.volume import load_volume
    from SAMv2SlicerLib import slicer_sample_data

    pair = slicer_sample_data.sample_pair(tmp_path)
    assert pair.simulated and pair.baseline.is_file() and pair.followup.is_file()
    assert pair.tumor_label is not None and pair.tumor_label.is_file()
    base, follow = load_volume(pair.baseline, "CT"), load_volume(pair.followup, "CT")
    assert follow.array.shape == base.array.shape
    assert not (follow.array == base.array).all()  # moved, deformed and noisy
    stamp = pair.followup.stat().st_mtime_ns
    assert slicer_sample_data.sample_pair(tmp_path).followup.stat().st_mtime_ns == stamp  # reused, not recomputed
    icon = MODULE_DIR / "Resources" / "Icons" / "SAMv2Slicer.png"
    assert icon.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


STUBBED_APP = r"""
import sys, types, unittest
sys.path.insert(0, {module_dir!r})
import slicer
def stub(name, **attrs):
    m = types.ModuleType(name); m.__dict__.update(attrs); sys.modules[name] = m; return m
class Base:
    def __init__(self, *a, **k): pass
shown = []
class Test(unittest.TestCase):
    def delayDisplay(self, message, *a): shown.append(message)
stub("qt"); stub("ctk")
stub("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleWidget=Base,
     ScriptedLoadableModuleLogic=Base, ScriptedLoadableModuleTest=Test)
stub("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda c: c, Choice=lambda *a: None,
     WithinRange=lambda *a: None)
stub("slicer.i18n", tr=lambda s: s, translate=lambda ctx, s: s)
slicer.mrmlScene = slicer.vtkMRMLScene()
from SAMv2SlicerLib import dependencies
dependencies.torch_problem = lambda: "PyTorch is not installed"
import SAMv2Slicer
SAMv2Slicer.SAMv2SlicerTest("runTest").runTest()
print(shown)
print("torch" in sys.modules)
"""


def test_module_self_test_follows_the_template_and_skips_only_without_torch():
    """The widget-level self-test (run by ctest inside Slicer via slicer_add_python_unittest, or
    Reload & Test) follows ScriptedLoadableModuleTest's template: setUp clears the scene, runTest
    runs the test methods; it drives the widget (buttons, processEvents) on the sample pair and
    checks against the simulated motion. It cannot run without the application; here it is
    imported with stand-ins for the Qt / application modules and shown to skip, with the
    reason, only when torch is absent, without importing torch."""
    pytest.importorskip("slicer")
    methods = {n.name: ast.unparse(n) for n in ast.walk(module_ast()) if isinstance(n, ast.FunctionDef)}
    assert "slicer.mrmlScene.Clear()" in methods["setUp"]
    assert "self.setUp()" in methods["runTest"] and "self.test_widget_finds_points_and_registers()" in methods["runTest"]
    body = methods["test_widget_finds_points_and_registers"]
    for needle in ("loadSamplePair()", "widgetRepresentation().self()", "ui.matchButton.click()",
                   "ui.registerButton.click()", "simulate_followup(", "map_points(", "assertLess("):
        assert needle in body, needle
    assert "slicer.app.processEvents()" in methods["_waitFor"]
    code = STUBBED_APP.format(module_dir=str(MODULE_DIR))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    shown, torch_loaded = proc.stdout.strip().splitlines()[-2:]
    assert "skipped: PyTorch is not installed" in shown and torch_loaded == "False"
