"""Where the tests and benchmarks find the repository, its bundled samples and the real data.

The real development volumes live in ``../shared/data`` beside the repository, or wherever
``$SAMV2_SHARED_DATA`` points; tests that need them skip when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SAMPLE_DATA = REPO / "SAMv2Core" / "samv2core" / "data"
SHARED = Path(os.environ.get("SAMV2_SHARED_DATA") or REPO.parent / "shared" / "data")
