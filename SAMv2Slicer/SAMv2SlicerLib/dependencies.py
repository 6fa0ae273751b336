"""Python dependencies of the module, installed the way Slicer users expect.

* torch comes from the PyTorch extension (``PyTorchUtils``), which picks the right CUDA or
  CPU build for the machine; without that extension the user is told to install it. torch is
  never imported here (the GUI process must not load it): it is found with
  ``importlib.util.find_spec`` and its version read from the package metadata, then checked
  against :data:`TORCH_REQUIREMENT` (an older torch is offered an update).
* everything else comes from ``requirements.txt`` next to the module: with
  ``slicer.packaging.pip_ensure`` on Slicer 5.12+ (it asks, installs with progress and
  offers a restart), else with ``slicer.util.pip_install`` after a confirmation dialog.
* Slicer's own SimpleITK, numpy and vtk are never replaced: a constraints file pins them to
  the versions Slicer ships (``skip_packages``, which Slicer documents as a discouraged
  workaround, is not used).
* A declined or failed install never escapes as an exception: ``ensure_all`` returns False
  and the user sees one message saying what is missing and why.

Only ``missing_requirements`` and ``read_requirements`` run outside Slicer (tests); the
install functions need the Slicer application and are called from the widget.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Callable, Optional

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "requirements.txt"
# Packages Slicer ships (or the PyTorch extension manages): never (re)installed from here.
PROTECTED = ("SimpleITK", "numpy", "vtk", "torch")
# The oldest torch the core is written for (safetensors weights, torch.load(weights_only=True));
# only torch 2.13 (CPU) was tested by this project's test suite.
TORCH_REQUIREMENT = ">=2.0"
_NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def read_requirements(path: "str | Path" = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines (comments and blanks dropped)."""
    lines = []
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def requirement_name(line: str) -> str:
    m = _NAME.match(line)
    return m.group(1) if m else line.strip()


def _satisfied(line: str) -> bool:
    name = requirement_name(line)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    try:
        from packaging.requirements import Requirement  # noqa: PLC0415 - optional

        return Requirement(line).specifier.contains(installed, prereleases=True)
    except Exception:  # packaging absent or unusual line: presence is enough
        return True


def missing_requirements(path: "str | Path" = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of the file that are not satisfied in this Python (torch is checked separately)."""
    return [line for line in read_requirements(path) if not _satisfied(line)]


def torch_version() -> "str | None":
    """The installed torch version from the package metadata (None when torch is not installed);
    torch itself is not imported."""
    try:
        if importlib.util.find_spec("torch") is None:
            return None
        return importlib.metadata.version("torch")
    except (ImportError, ValueError, importlib.metadata.PackageNotFoundError):
        return None


def torch_problem(requirement: str = TORCH_REQUIREMENT) -> "str | None":
    """None when a torch meeting ``requirement`` is installed, else what is wrong (one sentence)."""
    version = torch_version()
    if version is None:
        return "PyTorch is not installed"
    if not _version_meets(version, requirement):
        return f"PyTorch {version} is installed; SAMv2 needs torch{requirement}"
    return None


def _version_meets(version: str, requirement: str) -> bool:
    try:
        from packaging.specifiers import SpecifierSet  # noqa: PLC0415 - optional
        from packaging.version import Version  # noqa: PLC0415 - optional

        return Version(version.split("+")[0]) in SpecifierSet(requirement)
    except Exception:  # packaging absent or an unusual version string: presence is enough
        return True


def torch_available() -> bool:
    """True when a suitable torch is installed (checked without importing it)."""
    return torch_problem() is None


def _constraints_file() -> str:
    """A pip constraints file pinning the protected packages to the versions already installed."""
    pins = []
    for name in PROTECTED:
        try:
            pins.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    handle = tempfile.NamedTemporaryFile("w", suffix="-samv2-constraints.txt", delete=False)
    handle.write("\n".join(pins) + "\n")
    handle.close()
    return handle.name


def ensure_torch(slicer, confirm: Callable[[str], bool], report: Optional[Callable[[str], None]] = None) -> bool:
    """Make a suitable torch importable through the PyTorch extension (installed, or updated
    when older than TORCH_REQUIREMENT). Returns True when torch is ready. ``installTorch``
    returns None when declined and raises when the install fails."""
    problem = torch_problem()
    if problem is None:
        return True
    report = report or (lambda text: slicer.util.errorDisplay(text))
    try:
        import PyTorchUtils  # noqa: PLC0415 - Slicer's PyTorch extension (listed in EXTENSION_DEPENDS)
    except ImportError:
        report("SAMv2 needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, restart Slicer, "
               "then try again.")
        return False
    torch_logic = PyTorchUtils.PyTorchUtilsLogic()
    if not confirm(f"SAMv2 needs PyTorch ({problem}). Install it now (this can take several minutes)?"):
        report(f"SAMv2 needs torch{TORCH_REQUIREMENT} ({problem}); nothing was run.")
        return False
    # raises when the install fails (reported by ensure_all)
    if torch_logic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        report("PyTorch was not installed; nothing was run.")
        return False
    importlib.invalidate_caches()
    problem = torch_problem()
    if problem is not None:
        report(f"{problem} after the install; restart Slicer and try again. Nothing was run.")
        return False
    return True


def ensure_requirements(slicer, confirm: Callable[[str], bool], requester: str = "SAMv2Slicer",
                        path: "str | Path" = REQUIREMENTS_FILE) -> bool:
    """Install missing requirements (asking first). Returns True when all are satisfied."""
    missing = missing_requirements(path)
    if not missing:
        return True
    packaging_api = _slicer_packaging()
    if packaging_api is not None and hasattr(packaging_api, "pip_ensure"):
        # Slicer 5.12+: one call checks, asks, installs with progress and offers a restart.
        from packaging.requirements import Requirement  # noqa: PLC0415 - Slicer 5.12+ only

        reqs = [Requirement(line) for line in missing]
        # raises RuntimeError when the user declines, CalledProcessError when pip fails
        packaging_api.pip_ensure(reqs, constraints=_constraints_file(), requester=requester)
        return not missing_requirements(path)
    if not confirm("SAMv2 needs these Python packages: " + ", ".join(missing) + ". Install them now?"):
        return False
    # a list of arguments: no shell quoting issues with version specifiers such as ">="
    slicer.util.pip_install(list(missing) + ["-c", _constraints_file()])
    importlib.invalidate_caches()
    return not missing_requirements(path)


def _slicer_packaging():
    for name in ("slicer.packaging", "slicer.pydeps"):
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def ensure_all(slicer, confirm: Optional[Callable[[str], bool]] = None,
               report: Optional[Callable[[str], None]] = None) -> bool:
    """torch (PyTorch extension) then requirements.txt; asks before any install.

    Returns True when everything is importable. A declined or failed install returns False
    after ``report`` (default: an error dialog) received one sentence saying what happened.
    """
    confirm = confirm or (lambda text: slicer.util.confirmOkCancelDisplay(text, "SAMv2Slicer"))
    report = report or (lambda text: slicer.util.errorDisplay(text))
    try:
        if not ensure_torch(slicer, confirm, report):
            return False
        if not ensure_requirements(slicer, confirm):
            report("SAMv2 needs these Python packages, which are not installed: "
                   + ", ".join(missing_requirements()) + "; nothing was run.")
            return False
        return True
    except RuntimeError as exc:  # pip_ensure: "User declined package installation"
        report(f"Python packages for SAMv2 were not installed ({exc}); nothing was run.")
    except subprocess.CalledProcessError as exc:
        report(f"Installing Python packages for SAMv2 failed (pip exit code {exc.returncode}; details in the "
               "Python console); nothing was run.")
    except Exception as exc:  # any other installer failure (network, PyTorch extension) is reported too
        report(f"Installing Python packages for SAMv2 failed: {type(exc).__name__}: {exc}; nothing was run.")
    return False
