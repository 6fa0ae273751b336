"""The architecture as the tools see it: the import-linter contracts (pyproject.toml for the core and
training, SAMv2Slicer/.importlinter for the Slicer library: layers,
no cycles between layers, the core importing neither training nor Slicer) and ruff (imports at
the top of modules, no other module's private names, pyflakes) must pass on the whole tree; and
the public API (what ``samv2core`` exports) documents its arguments and results."""
from __future__ import annotations

import functools
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = [REPO / "SAMv2Core", REPO / "Training", REPO / "SAMv2Slicer"]


def _run(args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(p) for p in SOURCES] + [env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("config", ["pyproject.toml", "SAMv2Slicer/.importlinter"])
def test_import_contracts_are_kept(config):
    pytest.importorskip("importlinter", reason="import-linter is in the 'test' extra")
    out = _run(["-c", "import sys; from importlinter.cli import lint_imports; "
                      f"sys.exit(lint_imports(config_filename={config!r}, no_logo=True, no_cache=True))"])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "broken" in out.stdout and " 0 broken" in out.stdout


def test_ruff_is_clean():
    pytest.importorskip("ruff", reason="ruff is in the 'test' extra")
    out = _run(["-m", "ruff", "check", "--no-cache", "SAMv2Core", "Training", "SAMv2Slicer", "Testing"])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]


def _public_members(obj, name: str):
    yield name, obj
    if inspect.isclass(obj) and not issubclass(obj, BaseException):
        for attr, member in vars(obj).items():
            if not attr.startswith("_") and (inspect.isfunction(member) or isinstance(member, (
                    property, functools.cached_property, classmethod, staticmethod))):
                yield f"{name}.{attr}", member


def test_public_api_says_what_it_takes_and_returns():
    """Everything ``samv2core`` exports has a docstring; its functions and methods name their
    arguments (``Args:``) and what they return (``Returns:``), as MONAI documents its API."""
    import samv2core

    missing = []
    for name in samv2core.__all__:
        for label, member in _public_members(getattr(samv2core, name), name):
            func = getattr(member, "__func__", member)
            doc = inspect.getdoc(func) or ""
            if not doc:
                missing.append(f"{label}: no docstring")
            if not inspect.isfunction(func):
                continue  # classes, properties: the docstring is enough
            sig = inspect.signature(func)
            params = [p for p in sig.parameters if p not in ("self", "cls")]
            if params and "Args:" not in doc:
                missing.append(f"{label}: no Args:")
            if sig.return_annotation not in (None, "None") and "Returns:" not in doc:
                missing.append(f"{label}: no Returns:")
    assert not missing, missing
