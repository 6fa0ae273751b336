"""The architecture as the tools see it: the import-linter contracts (pyproject.toml for the core and
training, SAMv2Slicer/.importlinter for the Slicer library: layers,
no cycles between layers, the core importing neither training nor Slicer) and ruff (imports at
the top of modules, no other module's private names, pyflakes) must pass on the whole tree."""
from __future__ import annotations

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
