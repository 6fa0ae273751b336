"""One embedding session: the descriptors (a model's Embedder, or MIND-SSC), one bounded
cache (memory LRU + optional disk folder) and progress reporting.

The CLI, the demo, registration, the Slicer logic and training all embed through a session,
so a volume is embedded once per session and model, whoever asks for it:

    session = EmbeddingSession.open()            # the bundled model, device "auto"
    base, follow = session.embed(a), session.embed(b)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Hashable, Optional, Protocol, TypeVar, runtime_checkable

from .cache import EmbeddingDiskCache, LRUCache
from .embed import Embedder, Embeddings
from .models import resolve_model
from .progress import Progress
from .volume import Volume

T = TypeVar("T")


@runtime_checkable
class Descriptors(Protocol):
    """Anything that turns a volume into per-voxel descriptors on the model grid: the SAM
    network (embed.Embedder) or training-free MIND-SSC (registration.mind_features)."""

    model_id: str  # names the descriptors: part of every cache key
    spacing_mm: float  # model grid spacing

    def embed(self, volume: Volume, progress: Progress = None) -> Embeddings: ...


Loader = Callable[[], "tuple[Descriptors, str, bool]"]


class EmbeddingSession:
    """Embeds volumes with ``descriptors`` and keeps the results in one bounded cache.

    ``descriptors`` may be given as a ``loader`` instead (called on first use; returns the
    descriptors, their label and whether they are trained), so a session can hold cached
    values before its model is loaded. ``cache_size``: entries kept in memory (embeddings,
    plus whatever callers keep with :meth:`cached`); ``cache_dir``: also keep embeddings
    there across runs. ``label`` says which weights these are; ``trained`` is False for the
    random-weights fallback.
    """

    def __init__(self, descriptors: Optional[Descriptors] = None, *, loader: Optional[Loader] = None,
                 label: str = "", trained: bool = True, cache_size: int = 4,
                 cache_dir: "str | Path | None" = None):
        if (descriptors is None) == (loader is None):
            raise ValueError("give the descriptors or a loader for them")
        self._descriptors = descriptors
        self._loader = loader
        self._label = label or (descriptors.model_id if descriptors is not None else "")
        self._trained = trained
        self.cache = LRUCache(cache_size)
        self.disk = EmbeddingDiskCache(cache_dir) if cache_dir else None

    @classmethod
    def open(cls, model: "str | Path | None" = None, device: str = "auto", precision: str = "auto", *,
             cache_dir: "str | Path | None" = None, cache_size: int = 4, allow_untrained: bool = False,
             warn: bool = False, lazy: bool = False) -> "EmbeddingSession":
        """A session on the weights file ``model`` (default: the bundled model; with
        ``allow_untrained`` a labelled random-weights network when none is installed).
        ``warn`` prints a warning to stderr for the untrained fallback; ``lazy`` loads the
        model on first use instead of now."""
        def load():
            resolved = resolve_model(model, device=device, allow_untrained=allow_untrained)
            if warn and not resolved.trained:
                print(f"WARNING: {resolved.label}", file=sys.stderr)
            return Embedder(resolved.model, device=device, precision=precision), resolved.label, resolved.trained

        session = cls(loader=load, cache_size=cache_size, cache_dir=cache_dir)
        if not lazy:
            session.descriptors  # noqa: B018 - load now: a bad model fails here
        return session

    @property
    def descriptors(self) -> Descriptors:
        if self._descriptors is None:
            self._descriptors, self._label, self._trained = self._loader()
        return self._descriptors

    @property
    def label(self) -> str:
        """Which weights (or descriptors) these are, for messages and reports."""
        self.descriptors  # noqa: B018
        return self._label

    @property
    def trained(self) -> bool:
        self.descriptors  # noqa: B018
        return self._trained

    # --- the descriptors' identity ----------------------------------------------------------
    @property
    def model_id(self) -> str:
        return self.descriptors.model_id

    @property
    def spacing_mm(self) -> float:
        return self.descriptors.spacing_mm

    @property
    def device(self):
        return getattr(self.descriptors, "device", "cpu")

    @property
    def loaded(self) -> bool:
        """True once the descriptors (the model) are loaded."""
        return self._descriptors is not None

    # --- embedding --------------------------------------------------------------------------
    def embed(self, volume: Volume, progress: Progress = None) -> Embeddings:
        """Embeddings of ``volume``: from memory, else from the disk folder, else computed.

        The search index is built here too, so the first match on them is fast."""
        volume.validated()
        key = f"{volume.content_key}-{self.model_id}-{self.spacing_mm}"

        def make() -> Embeddings:
            emb = self.disk.load(key, volume, self.spacing_mm, self.model_id) if self.disk else None
            if emb is not None:
                emb.meta["device"] = str(self.device)  # the search index runs where the model does
            if emb is None:
                emb = self.descriptors.embed(volume, progress)
                if self.disk:
                    self.disk.save(key, emb)
            emb.index  # noqa: B018 - build the search index now
            if self.disk:  # per-pair precomputes (samv2core.arbiter) are kept next to the embeddings
                emb.meta["cache_dir"] = str(self.disk.folder)
            return emb

        hit = ("embeddings", key) in self.cache
        emb = self.cached(("embeddings", key), make)
        if hit and progress is not None:
            progress(1.0, f"embeddings of {volume.name or 'the volume'} reused")
        return emb

    def cached(self, key: Hashable, make: Callable[[], T]) -> T:
        """A value kept in the session's cache under ``key`` (``make()`` on a miss), e.g. a
        converted volume or a per-pair precompute. Shares the bound with the embeddings."""
        return self.cache.get_or_create(key, make)

    def clear_cache(self) -> None:
        """Drop everything kept in memory (the disk folder stays)."""
        self.cache.clear()
