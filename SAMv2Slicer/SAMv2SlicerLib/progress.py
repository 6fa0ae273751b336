"""Progress reporting and cancel for the long steps (embedding, matching, registration).

A step receives ``progress(fraction, message)``; whoever runs it may make that callback
raise :class:`Cancelled` to stop the step at its next report. The same callbacks serve the
in-process logic (scripts, tests) and the worker process (``server``).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """Raised inside a step when the user pressed Cancel."""


def no_progress(fraction: float, message: str) -> None:
    return None


def sub_progress(progress: ProgressCallback, lo: float, hi: float) -> ProgressCallback:
    """A progress callback mapping [0, 1] onto [lo, hi] of ``progress``."""
    return lambda f, m: progress(lo + (hi - lo) * float(f), m)


def run_sync(fn: Callable[[ProgressCallback], Any], progress: Optional[ProgressCallback] = None) -> Any:
    """Run a step function in the calling thread (batch scripts, tests)."""
    return fn(progress or no_progress)
