"""The worker process: serves embed / match / propagate / register requests (``protocol``).

Started by ``worker.WorkerProcess`` as ``<python> -m SAMv2SlicerLib.server --workdir DIR``
with Slicer's own Python (PythonSlicer) or any Python that has samv2core. It keeps the
model and the embeddings of recent volumes loaded between requests, runs one request at a
time in the order received, streams progress and stops a request at its next progress
report when asked to cancel. It imports no Qt and no Slicer, and touches no MRML node.

stdout carries only protocol lines; anything else printed (by us or a library) goes to
stderr, which the client sends to a log file. The process exits when stdin closes.
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

from samv2core.errors import CheckpointError, SAMv2Error
from samv2core.session import EmbeddingSession

from . import protocol, steps
from .cancellation import Cancelled

_STOP = object()


class Server:
    """One request at a time from a queue fed by a stdin reader thread (which also takes cancels)."""

    def __init__(self, workdir: "str | Path", out: BinaryIO, cache_dir: "str | None" = None,
                 volume_cache_size: int = 6):
        self.workdir = Path(workdir)
        self.out = out
        self.cache_dir = cache_dir
        self.session: Optional[EmbeddingSession] = None  # model + embeddings, kept between requests
        self._model: Optional[tuple] = None
        self._volumes: "OrderedDict[str, object]" = OrderedDict()
        self._volume_cache_size = volume_cache_size
        self._requests: "queue.Queue" = queue.Queue()
        self._cancelled: set = set()
        self._lock = threading.Lock()
        self._current: Optional[int] = None

    # --- output (main thread only) ----------------------------------------------------------
    def send(self, message: dict) -> None:
        self.out.write(protocol.encode(message))
        self.out.flush()

    # --- input (reader thread) -------------------------------------------------------------
    def read_requests(self, stream: BinaryIO) -> None:
        for line in iter(stream.readline, b""):
            if not line.strip():
                continue
            try:
                message = protocol.decode(line)
            except ValueError as exc:
                self._requests.put({"id": None, "op": "_bad", "args": {"error": str(exc)}})
                continue
            op = message.get("op")
            if op == "cancel":
                with self._lock:
                    self._cancelled.add(message.get("id"))
            elif op == "shutdown":
                break
            else:
                self._requests.put(message)
        with self._lock:  # stdin closed (the client went away) or shutdown: stop what runs
            self._cancelled.add(self._current)
        self._requests.put(_STOP)

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
        rid, op = request.get("id"), request.get("op")
        if self._is_cancelled(rid):
            self.send({"id": rid, "event": "cancelled"})
            return
        with self._lock:
            self._current = rid
        folder = self.workdir / "results" / f"r{rid}"

        def progress(fraction: float, message: str = "") -> None:
            if self._is_cancelled(rid):
                raise Cancelled(f"request {rid} cancelled")
            self.send({"id": rid, "event": "progress", "fraction": round(float(fraction), 4), "message": str(message)})

        try:
            if op not in protocol.OPS:
                raise ValueError(f"unknown operation {op!r}" if op != "_bad" else request["args"]["error"])
            folder.mkdir(parents=True, exist_ok=True)
            result = self.run(op, request.get("args") or {}, progress, folder)
            if self._is_cancelled(rid):
                raise Cancelled(f"request {rid} cancelled")
            self.send({"id": rid, "event": "result", "result": result})
        except Cancelled:
            shutil.rmtree(folder, ignore_errors=True)
            self.send({"id": rid, "event": "cancelled"})
        except SAMv2Error as exc:
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

    def _volume(self, ref: dict):
        key = ref["key"]
        vol = self._volumes.get(key)
        if vol is None:
            vol = protocol.read_volume(ref)
            self._volumes[key] = vol
            while len(self._volumes) > self._volume_cache_size:
                self._volumes.popitem(last=False)
        else:
            self._volumes.move_to_end(key)
        return vol

    def _use_model(self, model: dict) -> EmbeddingSession:
        """The session of the requested model (weights file or the bundled model, and device);
        a new one (empty cache) only when the model changes."""
        spec = (model.get("path") or None, model.get("device") or "auto")
        if self.session is None or spec != self._model:
            if spec[0] and not Path(spec[0]).is_file():
                raise CheckpointError(f"{spec[0]}: model file not found")
            self.session = EmbeddingSession.open(spec[0], spec[1], cache_dir=self.cache_dir, cache_size=12,
                                                 lazy=True)
            self._model = spec
        return self.session

    def run(self, op: str, args: dict, progress, folder: Path):
        s = self._use_model(args.pop("model", None) or {})
        if op == "ping":
            return {"pid": os.getpid()}
        if op == "set_model":
            return {"model_id": s.model_id, "label": s.label}
        a = protocol.decode_inputs(args, self._volume)
        if op == "embed":
            payload = steps.embed_volumes(s, a["volumes"], progress)
        elif op == "match":
            payload = steps.match(s, a["template"], a["query"], a["points_lps"], a["method"], progress)
        elif op == "propagate":
            payload = steps.propagate(s, a["template"], a["query"], a["samples_lps"], a["method"], a["radius_mm"],
                                      a["mask"], progress)
        else:  # register
            payload = steps.register(s, a["fixed"], a["moving"], a["mode"], a["deformable"], a["options"], progress)
        return protocol.encode_result(op, payload, folder)


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
