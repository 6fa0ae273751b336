"""The worker process: serves the ``ops.OPERATIONS`` requests of the Slicer module (``protocol``).

Started by ``worker.WorkerProcess`` as ``<python> -m SAMv2SlicerLib.server --workdir DIR``
with Slicer's own Python (PythonSlicer) or any Python that has samv2core. It keeps the
model and the embeddings of recent volumes loaded between requests, runs one request at a
time in the order received, streams progress, answers a cancel of a queued request at once
and stops a running one at its next progress report. It chooses the device (``auto``:
CUDA, then MPS, then CPU) and reports it with each result. It imports no Qt and no Slicer,
and touches no MRML node.

Untrusted input is handled as such: a request id must be a non-negative integer (it names
the result folder), volume files must be regular files inside the private folder, the model
file the client names must be a regular file; anything else is an error answer, never a
crash of the stdin reader. stdout carries only protocol lines; anything else printed goes to
stderr (the client's log file). The process exits when stdin closes.
"""
from __future__ import annotations

import argparse
import os
import queue
import shutil
import sys
import threading
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO, Optional

from samv2core.errors import CheckpointError, InputError, SAMv2Error

from . import ops, protocol
from .cancellation import Cancelled

_STOP = object()


class Server:
    """One request at a time from a queue fed by a stdin reader thread (which also takes cancels)."""

    def __init__(self, workdir: "str | Path", out: BinaryIO, cache_dir: "str | None" = None,
                 volume_cache_size: int = 6):
        self.workdir = Path(workdir).resolve()
        self.out = out
        self.cache_dir = cache_dir
        self.session = None  # model + embeddings (samv2core EmbeddingSession), kept between requests
        self._model: Optional[tuple] = None
        self._volumes: "OrderedDict[tuple, object]" = OrderedDict()
        self._volume_cache_size = volume_cache_size
        self._requests: "queue.Queue" = queue.Queue()
        self._queued: set = set()  # ids waiting in the queue
        self._cancelled: set = set()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._current: Optional[int] = None

    # --- output (both threads) ---------------------------------------------------------------
    def send(self, message: dict) -> None:
        with self._send_lock:
            self.out.write(protocol.encode(message))
            self.out.flush()

    # --- input (reader thread) -------------------------------------------------------------
    def read_requests(self, stream: BinaryIO) -> None:
        """Read requests until stdin closes; a bad line is answered, never fatal."""
        try:
            for line in iter(stream.readline, b""):
                if line.strip() and not self._take(line):
                    break
        except Exception:  # a broken pipe or an unexpected message: stop serving, do not hang
            traceback.print_exc()
        finally:
            with self._lock:  # stdin closed (the client went away) or shutdown: stop what runs
                if self._current is not None:
                    self._cancelled.add(self._current)
            self._requests.put(_STOP)

    def _take(self, line: bytes) -> bool:
        """Queue or act on one line; False on shutdown."""
        try:
            message = protocol.decode(line)
        except ValueError as exc:
            self.send({"id": None, "event": "error", "kind": "ProtocolError", "message": str(exc)})
            return True
        op, rid = message.get("op"), message.get("id")
        if op == "shutdown":
            return False
        if not protocol.valid_request_id(rid):
            self.send({"id": None, "event": "error", "kind": "ProtocolError",
                       "message": f"request id must be a non-negative integer, got {type(rid).__name__}"})
            return True
        if op == "cancel":
            with self._lock:
                self._cancelled.add(rid)
                queued = rid in self._queued
                self._queued.discard(rid)
            if queued:  # answered now: a queued request must not wait for the one running
                self.send({"id": rid, "event": "cancelled"})
            return True
        with self._lock:
            self._queued.add(rid)
        self._requests.put(message)
        return True

    def _is_cancelled(self, request_id) -> bool:
        with self._lock:
            return request_id in self._cancelled

    # --- requests ---------------------------------------------------------------------------
    def serve(self, stream: BinaryIO) -> int:
        reader = threading.Thread(target=self.read_requests, args=(stream,), name="samv2-stdin", daemon=True)
        reader.start()
        self.send({"event": "ready", "pid": os.getpid(), "protocol": protocol.PROTOCOL_VERSION})
        while True:
            request = self._requests.get()
            if request is _STOP:
                return 0
            self.handle(request)

    def handle(self, request: dict) -> None:
        rid, op = request["id"], request.get("op")
        with self._lock:
            if rid not in self._queued:  # cancelled while queued: already answered
                self._cancelled.discard(rid)
                return
            self._queued.discard(rid)
            self._current = rid
        folder = protocol.result_folder(self.workdir, rid)

        def progress(fraction: float, message: str = "") -> None:
            if self._is_cancelled(rid):
                raise Cancelled(f"request {rid} cancelled")
            self.send({"id": rid, "event": "progress", "fraction": round(float(fraction), 4), "message": str(message)})

        try:
            args = request.get("args") if isinstance(request.get("args"), dict) else {}
            if op == "ping":
                result = {"pid": os.getpid(), "model_loaded": self.session is not None and self.session.loaded,
                          "embeddings": len(self.session.cache) if self.session is not None else 0}
            else:
                session = self._use_model(args.get("model"))
                req = ops.decode_request(op, args.get("request"))
                folder.mkdir(parents=True, exist_ok=True)
                result = ops.OPERATIONS[op].encode_result(
                    ops.OPERATIONS[op].step(session, req, self._volume, progress), folder)
            if self._is_cancelled(rid):
                raise Cancelled(f"request {rid} cancelled")
            self.send({"id": rid, "event": "result", "result": protocol.plain(result),
                       "device": str(self.session.device) if self.session is not None and self.session.loaded
                       else ""})
        except Cancelled:
            shutil.rmtree(folder, ignore_errors=True)
            self.send({"id": rid, "event": "cancelled"})
        except (SAMv2Error, ValueError) as exc:  # bad input: one line for the user
            shutil.rmtree(folder, ignore_errors=True)
            self.send({"id": rid, "event": "error", "kind": type(exc).__name__, "message": str(exc)})
        except Exception as exc:  # reported to the user with its traceback in the log, never swallowed
            shutil.rmtree(folder, ignore_errors=True)
            self.send({"id": rid, "event": "error", "kind": type(exc).__name__, "message": str(exc),
                       "traceback": traceback.format_exc()})
        finally:
            with self._lock:
                self._current = None
                self._cancelled.discard(rid)

    def _volume(self, ref: "ops.VolumeRef"):
        """A request's volume, read once (only a regular file inside the private folder)."""
        key = (ref.path, ref.modality)
        vol = self._volumes.get(key)
        if vol is None:
            vol = protocol.read_volume(ref.path, ref.modality, ref.name, inside=self.workdir)
            self._volumes[key] = vol
            while len(self._volumes) > self._volume_cache_size:
                self._volumes.popitem(last=False)
        else:
            self._volumes.move_to_end(key)
        return vol

    def _use_model(self, model) -> object:
        """The session of the requested model (a weights file the client named, or the bundled
        model, and a device); a new one (empty cache) only when the model changes."""
        from samv2core.device import select_device  # noqa: PLC0415 - torch loads with the first request
        from samv2core.session import EmbeddingSession  # noqa: PLC0415 - torch loads with the first request

        model = model if isinstance(model, dict) else {}
        path, device = model.get("path") or None, model.get("device") or "auto"
        if not isinstance(device, str) or (path is not None and not isinstance(path, str)):
            raise ValueError("the model must be given as a path string and a device string")
        if path is not None:
            try:
                path = str(protocol.regular_file(path, what="model file"))
            except InputError as exc:
                raise CheckpointError(str(exc)) from None
        spec = (path, device)
        if self.session is None or spec != self._model:
            select_device(device)  # DeviceError (one line) for a device this machine lacks
            self.session = EmbeddingSession.open(path, device, cache_dir=self.cache_dir, cache_size=12, lazy=True)
            self._model = spec
        return self.session


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="SAMv2Slicer worker process (JSON lines on stdin/stdout)")
    parser.add_argument("--workdir", required=True, help="private folder of the session (volumes, results)")
    parser.add_argument("--cache-dir", default=None, help="disk cache of embeddings (optional)")
    args = parser.parse_args(argv)
    # keep the real stdout for protocol lines; everything else printed goes to stderr (the log)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    sys.stdout = sys.stderr
    return Server(args.workdir, out, args.cache_dir).serve(sys.stdin.buffer)


if __name__ == "__main__":
    sys.exit(main())
