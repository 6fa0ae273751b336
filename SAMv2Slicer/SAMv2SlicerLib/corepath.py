"""Find the core package in a source checkout: the module runs from ``SAMv2Slicer/`` added as
an additional module path, with ``samv2core`` in ``../SAMv2Core`` not installed."""
from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Optional

MODULE_DIR = Path(__file__).resolve().parents[1]


def ensure_core_importable(module_dir: "str | Path" = MODULE_DIR) -> Optional[Path]:
    """Put ``<module_dir>/../SAMv2Core`` on ``sys.path`` when ``samv2core`` is not importable.
    Returns the folder added (None when samv2core was already importable or is not there)."""
    if importlib.util.find_spec("samv2core") is not None:
        return None
    candidate = Path(module_dir).resolve().parent / "SAMv2Core"
    if not (candidate / "samv2core" / "__init__.py").is_file():
        return None
    sys.path.insert(0, str(candidate))
    importlib.invalidate_caches()
    return candidate
