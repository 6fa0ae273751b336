"""Progress reporting and cancel for the long steps (embedding, matching, registration).

A step receives ``progress(fraction, message)``; whoever runs it may make that callback
raise :class:`Cancelled` to stop the step at its next report. The same callbacks serve the
in-process logic (scripts, tests) and the worker process (``server``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

from samv2core.progress import ProgressCallback, no_progress, sub_progress  # noqa: F401 - the core's, re-exported


class Cancelled(Exception):
    """Raised inside a step when the user pressed Cancel."""


def run_sync(fn: Callable[[ProgressCallback], Any], progress: Optional[ProgressCallback] = None) -> Any:
    """Run a step function in the calling thread (batch scripts, tests)."""
    return fn(progress or no_progress)
