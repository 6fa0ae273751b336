"""Qt-free library of the SAMv2Slicer module: MRML <-> samv2core conversions (``nodes``), the
module logic (``logic``), background tasks (``worker``), dependency handling
(``dependencies``) and the sample data pair (``sampledata``).

Importable in plain Python with the ``slicer-core`` package; no Slicer application or Qt.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def _ensure_core_importable() -> None:
    """Make ``import samv2core`` work when running from a source checkout.

    Installed extensions bundle the package next to the module (see the module's
    CMakeLists.txt) and pip installs register it; a source tree only has the SAMv2Core/
    folder, which is loaded here under its import name.
    """
    if "samv2core" in sys.modules or importlib.util.find_spec("samv2core") is not None:
        return
    source = Path(__file__).resolve().parents[2] / "SAMv2Core" / "__init__.py"
    if not source.is_file():
        return
    spec = importlib.util.spec_from_file_location("samv2core", source,
                                                  submodule_search_locations=[str(source.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["samv2core"] = module
    try:
        spec.loader.exec_module(module)
    except Exception:  # e.g. a dependency not installed yet: leave the import to fail later, clearly
        del sys.modules["samv2core"]


_ensure_core_importable()
