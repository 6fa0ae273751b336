"""Run a heavy step off the GUI thread, with progress reporting and cancel.

The Slicer widget starts a :class:`BackgroundTask` and polls it from a QTimer (as
MONAIAuto3DSeg polls its inference process), so the GUI never blocks. The task function
only computes (samv2core: embeddings, matching, registration); it never touches MRML,
which is not thread-safe: the widget applies the result to the scene on the main thread.

Cancel is cooperative: every progress report checks the cancel flag and raises
:class:`Cancelled`, so a cancelled task stops at its next report and its result is
dropped (nothing was written to the scene). Torch releases the GIL in its kernels, so the
GUI thread stays responsive while the network runs.
"""
from __future__ import annotations

import enum
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Optional


class Cancelled(Exception):
    """Raised inside a task when the user pressed Cancel."""


class TaskState(str, enum.Enum):
    PENDING = "pending"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TaskProgress:
    fraction: float
    message: str


ProgressCallback = Callable[[float, str], None]


class BackgroundTask:
    """``fn(progress)`` run in a daemon thread; ``progress(fraction, message)`` raises Cancelled on cancel."""

    def __init__(self, fn: Callable[[ProgressCallback], Any], name: str = "task"):
        self.fn = fn
        self.name = name
        self.state = TaskState.PENDING
        self.result: Any = None
        self.error: Optional[BaseException] = None
        self.error_traceback: str = ""
        self._progress = TaskProgress(0.0, "waiting")
        self._lock = threading.Lock()
        self._cancel = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.started_at: Optional[float] = None
        self.finished_at: Optional[float] = None

    # --- control ------------------------------------------------------------------------
    def start(self) -> "BackgroundTask":
        if self._thread is not None:
            raise RuntimeError(f"{self.name}: already started")
        self.state = TaskState.RUNNING
        self.started_at = time.monotonic()
        self._thread = threading.Thread(target=self._main, name=f"SAMv2-{self.name}", daemon=True)
        self._thread.start()
        return self

    def cancel(self) -> None:
        """Ask the task to stop at its next progress report."""
        self._cancel.set()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel.is_set()

    def wait(self, timeout: Optional[float] = None) -> TaskState:
        """Block until the task ends (for scripts and tests; the GUI polls instead)."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state

    @property
    def finished(self) -> bool:
        return self.state in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)

    @property
    def progress(self) -> TaskProgress:
        with self._lock:
            return self._progress

    # --- inside the thread ------------------------------------------------------------
    def report(self, fraction: float, message: str = "") -> None:
        """The progress callback handed to ``fn``; raises Cancelled once cancel was requested."""
        if self._cancel.is_set():
            raise Cancelled(f"{self.name}: cancelled")
        with self._lock:
            self._progress = TaskProgress(min(1.0, max(0.0, float(fraction))), str(message))

    def _main(self) -> None:
        try:
            result = self.fn(self.report)
            if self._cancel.is_set():
                raise Cancelled(f"{self.name}: cancelled")
            self.result = result
            self.state = TaskState.DONE
        except Cancelled as exc:
            self.error = exc
            self.state = TaskState.CANCELLED
        except BaseException as exc:  # reported to the user by the widget, never swallowed
            self.error = exc
            self.error_traceback = traceback.format_exc()
            self.state = TaskState.FAILED
        finally:
            self.finished_at = time.monotonic()


def run_sync(fn: Callable[[ProgressCallback], Any], progress: Optional[ProgressCallback] = None) -> Any:
    """Run a task function in the calling thread (batch scripts, tests)."""
    return fn(progress or (lambda fraction, message: None))
