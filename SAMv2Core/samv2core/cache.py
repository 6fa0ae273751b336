"""The one cache of the embedding session: a bounded in-memory LRU, and optionally a folder
of safetensors files that keeps embeddings across runs.

Disk entries are named by the SHA-1 of their key and hold the key, a mark and a checksum in
their metadata; an unreadable, corrupt or mismatching entry is recomputed, never trusted, and
the cache never fails a command.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable, Hashable, Optional, TypeVar

from safetensors import safe_open

from .checked_tensors import CorruptFileError, discard_cache_entry, load_checked, save_checked
from .embed import Embeddings, source_geometry
from .grid import Grid
from .preprocess import resample_to_model_grid
from .volume import Volume

T = TypeVar("T")
_log = logging.getLogger(__name__)


class LRUCache:
    """At most ``maxsize`` entries; the least recently used one is dropped first. Thread-safe
    (the Slicer module reads volumes on the main thread while a worker embeds)."""

    def __init__(self, maxsize: int):
        if maxsize < 1:
            raise ValueError(f"cache size must be at least 1, got {maxsize}")
        self.maxsize = int(maxsize)
        self._data: "OrderedDict[Hashable, object]" = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: Hashable, default=None):
        with self._lock:
            if key not in self._data:
                return default
            self._data.move_to_end(key)
            return self._data[key]

    def put(self, key: Hashable, value) -> None:
        with self._lock:
            self._data[key] = value
            self._data.move_to_end(key)
            while len(self._data) > self.maxsize:
                self._data.popitem(last=False)

    def get_or_create(self, key: Hashable, make: Callable[[], T]) -> T:
        """The cached value of ``key``, else ``make()`` (then cached; made outside the lock)."""
        value = self.get(key, _MISSING)
        if value is _MISSING:
            value = make()
            self.put(key, value)
        return value

    def clear(self) -> None:
        with self._lock:
            self._data.clear()

    def __contains__(self, key: Hashable) -> bool:
        with self._lock:
            return key in self._data

    def __len__(self) -> int:
        return len(self._data)


_MISSING = object()


class EmbeddingDiskCache:
    """Embeddings on disk, one checksummed safetensors file per key, in ``folder``.

    Best effort: a folder that cannot be created, read or written (no rights, full disk, a
    pipe where an entry should be...) costs time, never the command. A file in the folder
    that is not an entry this cache wrote (``samv2 embed --out`` pointed there, say) is left
    as it is: neither trusted, nor removed, nor replaced."""

    MARK = "samv2_embedding_cache"

    def __init__(self, folder: "str | Path"):
        self.folder = Path(folder)
        self._warned = False

    def path(self, key: str) -> Path:
        return self.folder / f"{hashlib.sha1(key.encode()).hexdigest()}.safetensors"

    def _warn(self, text: str, *args) -> None:
        if not self._warned:  # once per session: the cache is an optimisation
            self._warned = True
            _log.warning("samv2: warning: " + text, *args)

    def _ours(self, path: Path) -> bool:
        """True when ``path`` is a regular file carrying this cache's mark (header only)."""
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                return False
            with safe_open(str(path), "pt") as f:
                meta = f.metadata() or {}
            return meta.get(self.MARK) == "1" or {"key", "head_dims"} <= set(meta)  # older entries: no mark
        except Exception:  # unreadable or not safetensors: not ours
            return False

    def save(self, key: str, emb: Embeddings) -> None:
        path = self.path(key)
        meta = {"key": key, self.MARK: "1", "fine_grid": json.dumps(emb.fine_grid.__dict__),
                "coarse_grid": json.dumps(emb.coarse_grid.__dict__), "head_dims": json.dumps(emb.head_dims)}
        try:
            if (path.exists() or path.is_symlink()) and not self._ours(path):
                self._warn("the embedding cache entry %s is a file the cache did not write; left as it is", path)
                return
            save_checked(path, {"rows": emb.rows, "coarse": emb.coarse}, meta)
        except Exception as exc:  # noqa: BLE001 - a cache that cannot be written only costs time later
            self._warn("could not write the embedding cache entry %s (%s)", path, str(exc).splitlines()[0][:160])

    def load(self, key: str, volume: Volume, spacing_mm: float, model_id: str) -> Optional[Embeddings]:
        """The embeddings of ``volume`` stored under ``key``, checked against their checksum;
        None when absent or unusable (a bad entry of this cache is removed and recomputed)."""
        path = self.path(key)
        try:
            if not path.exists():
                return None
            if not self._ours(path):
                self._warn("%s is not an entry of this embedding cache; ignored and left as it is", path)
                return None
            t, meta = load_checked(path)
            if meta.get("key") != key:
                raise CorruptFileError(f"{path}: entry is for another volume or model")
            grids = [Grid(**{k: tuple(v) for k, v in json.loads(meta[g]).items()})
                     for g in ("fine_grid", "coarse_grid")]
            head_dims = tuple((str(h), int(d)) for h, d in json.loads(meta["head_dims"]))
            rows, coarse = t["rows"], t["coarse"]
            if rows.shape != (math.prod(grids[0].shape), sum(d for _, d in head_dims)) \
                    or tuple(coarse.shape[1:]) != grids[1].shape:
                raise CorruptFileError(f"{path}: tensor shapes do not match the entry's grids")
        except (CorruptFileError, KeyError, TypeError, ValueError) as exc:
            discard_cache_entry(path, "embedding cache entry", exc)
            return None
        except OSError as exc:  # unreadable folder or entry: recompute
            self._warn("the embedding cache cannot be read (%s); computing instead", exc)
            return None
        mv = resample_to_model_grid(volume, spacing_mm)
        return Embeddings(rows, head_dims, coarse, grids[0], grids[1], mv, model_id,
                          {"from_disk_cache": True, "source": source_geometry(volume)})
