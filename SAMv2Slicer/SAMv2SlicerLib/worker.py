"""Client of the worker process that runs every heavy step for the Slicer GUI.

Why a process: Slicer's main thread keeps Python's GIL while it idles in the Qt event loop
(neither Slicer nor CTK enables PythonQt's thread support), so a Python thread started from
the GUI advances only while the GUI itself runs Python. MONAIAuto3DSeg, TotalSegmentator
and SlicerElastix run their heavy work in a child process for this reason; so does this
module.

:class:`WorkerProcess` starts ``<python> -m SAMv2SlicerLib.server`` on first use (Slicer's
``PythonSlicer``, or ``sys.executable`` under plain Python), keeps it alive so the model and
the embeddings stay loaded, and talks JSON lines with it (``protocol``). Nothing here blocks:
:meth:`WorkerProcess.poll` reads what has arrived (non-blocking pipe) and is called from a
QTimer in Slicer or from :meth:`WorkerProcess.wait` in scripts. Cancel asks the worker to
stop at its next progress report; if it has not stopped within ``cancel_timeout`` seconds
the process is killed and started again on next use. A worker that dies fails its requests
with a message that says so (the GUI then adds nothing to the scene).

Requests are the typed requests of ``ops`` (volumes as NRRD files the logic exported into
``volumes/`` of the private folder); results come back as JSON plus files, decoded by the
operation's codec into what the in-process run returns, so ``SAMv2Logic.finish`` applies
either one. The private folder is made under ``temp_root`` (Slicer's temporary folder) and
deleted by :meth:`WorkerProcess.close`.
"""
from __future__ import annotations

import enum
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from . import ops, protocol

SERVER_MODULE = "SAMv2SlicerLib.server"


class TaskState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


@dataclass(frozen=True)
class TaskProgress:
    fraction: float
    message: str


class WorkerTask:
    """One request: its state, latest progress, and result (decoded payload) or error."""

    def __init__(self, request_id: int, op: str, name: str):
        self.id = request_id
        self.op = op
        self.name = name
        self.state = TaskState.QUEUED
        self.progress = TaskProgress(0.0, "waiting for the worker")
        self.result: Any = None
        self.error_kind = ""
        self.error_message = ""
        self.error_traceback = ""
        self.device = ""  # the device the worker ran it on (reported with the result)
        self.cancel_requested_at: Optional[float] = None
        self.submitted_at = time.monotonic()
        self.finished_at: Optional[float] = None

    @property
    def finished(self) -> bool:
        return self.state in (TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED)

    @property
    def cancel_requested(self) -> bool:
        return self.cancel_requested_at is not None

    def _finish(self, state: TaskState, kind: str = "", message: str = "", tb: str = "") -> None:
        if self.finished:
            return
        self.state, self.error_kind, self.error_message, self.error_traceback = state, kind, message, tb
        self.finished_at = time.monotonic()

    def __repr__(self) -> str:
        return f"WorkerTask({self.id}, {self.op}, {self.state.value})"


def find_python(application_dir: "str | None" = None) -> str:
    """The Python to run the worker with: with ``application_dir`` (the folder of the Slicer
    executable) Slicer's ``PythonSlicer`` there or on PATH (Slicer puts it there); else this Python."""
    if not application_dir:
        return sys.executable
    name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
    here = Path(application_dir)
    candidates = [here / name, here.parent / "bin" / name]  # macOS: Contents/MacOS -> Contents/bin
    found = shutil.which("PythonSlicer")
    if found:
        candidates.append(Path(found))
    for c in candidates:
        if c.is_file():
            return str(c)
    raise WorkerStartError(f"PythonSlicer was not found next to the Slicer executable in {application_dir}")


class WorkerStartError(OSError):
    """The worker process cannot be started (no PythonSlicer, or the process failed to launch)."""


class WorkerProcess:
    """A persistent worker process and the requests sent to it (see the module docstring)."""

    def __init__(self, python: "str | None" = None, workdir: "str | Path | None" = None,
                 cache_dir: "str | Path | None" = None, cancel_timeout: float = 2.0, env: "dict | None" = None,
                 temp_root: "str | Path | None" = None):
        self.python = python or sys.executable
        self._own_workdir = workdir is None
        if workdir is None and temp_root is not None:
            Path(temp_root).mkdir(parents=True, exist_ok=True)
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="samv2-worker-", dir=temp_root))
        os.chmod(self.workdir, 0o700)  # private: volumes of patients go through it
        self.cache_dir = str(cache_dir) if cache_dir else None
        self.cancel_timeout = float(cancel_timeout)
        self.extra_env = dict(env or {})
        self.model: dict = {"path": None, "device": "auto"}
        self.proc: Optional[subprocess.Popen] = None
        self.starts = 0  # how many processes were started (restarts = starts - 1)
        self.last_exit = ""  # why the previous process ended, for messages
        self._tasks: dict[int, WorkerTask] = {}
        self._next_id = 1
        self._buffer = b""
        self._lines: "Optional[queue.Queue]" = None  # only when non-blocking pipes are unavailable
        self._log = None

    # --- process -------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> Optional[int]:
        return self.proc.pid if self.proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.workdir / "worker.log"

    def _environment(self) -> dict:
        import samv2core  # noqa: PLC0415 - the GUI imports this module before the pip dependencies are installed

        paths = [str(Path(__file__).resolve().parents[1]), str(Path(samv2core.__file__).resolve().parents[1])]
        env = dict(os.environ)
        env.update(self.extra_env)
        old = env.get("PYTHONPATH")
        env["PYTHONPATH"] = os.pathsep.join(paths + ([old] if old else []))
        env.setdefault("PYTHONIOENCODING", "utf-8")
        return env

    def start(self) -> None:
        """Start the worker process (done by :meth:`submit` when needed)."""
        if self.running:
            return
        self._close_process()
        cmd = [self.python, "-m", SERVER_MODULE, "--workdir", str(self.workdir)]
        if self.cache_dir:
            cmd += ["--cache-dir", self.cache_dir]
        self._log = open(self.log_path, "ab")
        kwargs: dict = {}
        if os.name == "nt":  # no console window; own group so that the launcher's child is killed too
            kwargs["creationflags"] = subprocess.CREATE_NO_WINDOW | subprocess.CREATE_NEW_PROCESS_GROUP
        else:
            kwargs["start_new_session"] = True  # own process group: kill() reaches PythonSlicer's child
        try:
            self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                         env=self._environment(), cwd=str(self.workdir), bufsize=0, **kwargs)
        except OSError as exc:
            self._close_process()
            raise WorkerStartError(f"the SAMv2 worker process could not start ({self.python}: {exc})") from None
        self.starts += 1
        self._buffer = b""
        self._lines = None
        try:
            os.set_blocking(self.proc.stdout.fileno(), False)
        except (OSError, AttributeError):  # Windows pipes before Python 3.12: a reader thread instead
            self._lines = queue.Queue()
            threading.Thread(target=self._pump, args=(self.proc.stdout, self._lines), daemon=True).start()

    @staticmethod
    def _pump(stream, lines: "queue.Queue") -> None:
        for line in iter(stream.readline, b""):
            lines.put(line)

    def kill(self, reason: str = "stopped") -> None:
        """Kill the worker now (its process group); unfinished requests are failed with ``reason``."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                if os.name == "nt":
                    subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.proc.pid)], capture_output=True,
                                   check=False)
                else:
                    os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError, OSError):
                self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.last_exit = reason
        self._fail_all(reason)
        self._close_process()

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the worker to exit (after cancelling what runs); kill it if it does not."""
        if self.running:
            for task in list(self._tasks.values()):
                self._send({"op": "cancel", "id": task.id})
            self._send({"op": "shutdown"})
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout)
            except (OSError, subprocess.TimeoutExpired):
                pass
        self.kill("the worker was stopped")

    def close(self) -> None:
        """Stop the worker and delete the private folder (if this object made it)."""
        self.stop()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def _close_process(self) -> None:
        if self.proc is not None:
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except (OSError, AttributeError):
                    pass
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def _log_tail(self, lines: int = 6) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    # --- requests ------------------------------------------------------------------------
    def set_model(self, model_path: "str | None" = None, device: str = "auto") -> None:
        """The model sent with every following request (the worker loads it once)."""
        self.model = {"path": str(model_path) if model_path else None, "device": device}

    @property
    def volume_folder(self) -> Path:
        """Where the logic exports the volumes of requests (the worker reads only inside workdir)."""
        return self.workdir / "volumes"

    def submit(self, request, name: str = "") -> WorkerTask:
        """Send an ``ops`` request, or ``"ping"`` (starting the worker if needed); returns its task at once."""
        op = "ping" if request == "ping" else ops.operation_of(request).name
        self.start()
        args = {"model": dict(self.model)}
        if op != "ping":
            args["request"] = ops.encode_request(request)
        task = WorkerTask(self._next_id, op, name or op)
        self._next_id += 1
        self._tasks[task.id] = task
        if not self._send({"id": task.id, "op": op, "args": args}):
            self.poll()  # the process is gone: poll reports it on this task
        return task

    def submit_job(self, job) -> WorkerTask:
        """Run a prepared logic ``Job`` (its request; volumes exported) in the worker."""
        return self.submit(job.request, job.name)

    def cancel(self, task: WorkerTask) -> None:
        """Ask the worker to stop ``task``; it is killed if the task has not ended after ``cancel_timeout``."""
        if task.finished or task.cancel_requested:
            return
        task.cancel_requested_at = time.monotonic()
        self._send({"op": "cancel", "id": task.id})

    def _send(self, message: dict) -> bool:
        if not self.running:
            return False
        try:
            self.proc.stdin.write(protocol.encode(message))
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    # --- events --------------------------------------------------------------------------
    def _read_lines(self) -> list[bytes]:
        if self.proc is None:
            return []
        if self._lines is not None:
            out = []
            while True:
                try:
                    out.append(self._lines.get_nowait())
                except queue.Empty:
                    return out
        chunks = []
        while True:
            try:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
            except BlockingIOError:
                break
            except (OSError, ValueError):
                break
            if not chunk:
                break
            chunks.append(chunk)
        data = self._buffer + b"".join(chunks)
        *lines, self._buffer = data.split(b"\n")
        return lines

    def poll(self) -> list[WorkerTask]:
        """Read what the worker sent; enforce cancel timeouts; detect a dead worker.
        Returns the tasks that finished during this call. Never blocks."""
        done = self._handle(self._read_lines())
        now = time.monotonic()
        late = [t for t in self._tasks.values()
                if t.cancel_requested and not t.finished and now - t.cancel_requested_at > self.cancel_timeout]
        if late:
            for t in late:
                t._finish(TaskState.CANCELLED, "Killed",
                          f"the worker did not stop within {self.cancel_timeout:g} s and was killed; "
                          "it restarts on next use")
            pending = list(self._tasks.values())
            self.kill("the worker was restarted after a cancel")
            done += [t for t in pending if t.finished]
        elif self.proc is not None and self.proc.poll() is not None:
            done += self._handle(self._read_lines())  # what it wrote before it ended
            code = self.proc.returncode
            pending = list(self._tasks.values())
            tail = self._log_tail()
            self.kill(f"the SAMv2 worker process stopped unexpectedly (exit code {code})"
                      + (f"; last log lines: {tail}" if tail else ""))
            done += [t for t in pending if t.finished]
        return done

    def _handle(self, lines: list[bytes]) -> list[WorkerTask]:
        done = []
        for line in lines:
            if not line.strip():
                continue
            try:
                message = protocol.decode(line)
            except ValueError:
                continue  # not a protocol line
            rid = message.get("id")
            task = self._tasks.get(rid) if protocol.valid_request_id(rid) else None
            if task is None:
                continue
            event = message.get("event")
            if event == "progress":
                task.state = TaskState.RUNNING
                task.progress = TaskProgress(float(message.get("fraction", 0.0)), str(message.get("message", "")))
                continue
            if event == "result":
                folder = protocol.result_folder(self.workdir, task.id)
                try:
                    data = message.get("result")
                    task.result = data if task.op == "ping" else ops.OPERATIONS[task.op].decode_result(data, folder)
                    task.device = str(message.get("device") or "")
                    task._finish(TaskState.DONE)
                except Exception as exc:  # an unreadable result file: nothing partial is applied
                    task._finish(TaskState.FAILED, type(exc).__name__, f"could not read the worker's result: {exc}")
                finally:
                    shutil.rmtree(folder, ignore_errors=True)
            elif event == "cancelled":
                task._finish(TaskState.CANCELLED)
            elif event == "error":
                task._finish(TaskState.FAILED, str(message.get("kind", "Error")), str(message.get("message", "")),
                             str(message.get("traceback", "")))
            if task.finished:
                done.append(self._tasks.pop(task.id))
        return done

    def _fail_all(self, reason: str) -> None:
        for task in list(self._tasks.values()):
            if task.cancel_requested:
                task._finish(TaskState.CANCELLED, "Killed", reason)
            else:
                task._finish(TaskState.FAILED, "WorkerStopped", reason)
        self._tasks = {k: t for k, t in self._tasks.items() if not t.finished}

    def wait(self, task: WorkerTask, timeout: "float | None" = None, interval: float = 0.005) -> TaskState:
        """Poll until ``task`` ends (scripts, tests, benchmarks; the GUI polls from a QTimer)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not task.finished:
            self.poll()
            if task.finished:
                break
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"{task.name}: not finished after {timeout} s")
            time.sleep(interval)
        return task.state

    def run(self, request, timeout: "float | None" = None) -> Any:
        """Submit and wait; returns the result or raises RuntimeError with the worker's message."""
        task = self.submit(request)
        self.wait(task, timeout)
        if task.state != TaskState.DONE:
            raise RuntimeError(f"{task.name} {task.state.value}: {task.error_kind}: {task.error_message}")
        return task.result

    @property
    def pending(self) -> list[WorkerTask]:
        return list(self._tasks.values())
