"""What the browser view computes, without any UI: two scans, their embeddings, matches and a
registration, with progress callbacks. Slicer/trame-free, so it is tested on its own.

Points are LPS millimetres (the core's convention); the app converts to and from Slicer's RAS.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from samv2core.errors import InputError
from samv2core.matching import MatchResult, match_points
from samv2core.propagate import LesionPropagation, propagate_lesion
from samv2core.registration import register
from samv2core.registration.io import resample_moving
from samv2core.session import EmbeddingSession
from samv2core.volume import Volume, load_volume

from .files import AllowedFiles

Progress = Callable[[float, str], None]


def _quiet(fraction: float, message: str) -> None:
    pass


@dataclass
class ViewSession:
    """The template (baseline) and query (follow-up) scans and the embedding session serving them.

    ``embeddings`` is the core's :class:`~samv2core.session.EmbeddingSession` (the same one the CLI
    opens; it keeps each scan's embeddings). ``files`` says which paths may be opened (nothing by
    default). Calls are serialised by a lock: the app runs them in a worker thread while the page
    stays responsive.
    """

    embeddings: EmbeddingSession
    method: str = "refined"
    files: AllowedFiles = field(default_factory=AllowedFiles)
    template: Volume | None = None
    query: Volume | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def open(self, template_path, query_path, modality: str = "auto") -> tuple[Volume, Volume]:
        """Read both scans (files or DICOM folders that ``files`` allows); the session changes only
        when both could be read."""
        template_file, query_file = self.files.resolve(template_path), self.files.resolve(query_path)
        template, query = load_volume(template_file, modality), load_volume(query_file, modality)
        self.template, self.query = template, query
        return template, query

    def close(self) -> None:
        """Forget the scans (the embedding session keeps its cache): the next page starts afresh."""
        with self._lock:
            self.template = self.query = None

    def _pair(self) -> tuple[Volume, Volume]:
        if self.template is None or self.query is None:
            raise InputError("open a baseline and a follow-up scan first")
        return self.template, self.query

    def embed_both(self, progress: Progress = _quiet) -> None:
        """Embed both scans (cached by the embedder): 0..50% baseline, 50..100% follow-up."""
        template, query = self._pair()
        with self._lock:
            self.embeddings.embed(template, progress=lambda f, m: progress(0.5 * f, f"baseline: {m}"))
            self.embeddings.embed(query, progress=lambda f, m: progress(0.5 + 0.5 * f, f"follow-up: {m}"))
        progress(1.0, "embeddings ready")

    def _inside_template(self, point_lps) -> np.ndarray:
        p = np.asarray(point_lps, dtype=np.float64).reshape(1, 3)
        if not self._pair()[0].contains_lps(p)[0]:
            raise InputError(f"the point {np.round(p[0], 1).tolist()} (LPS) lies outside the baseline scan")
        return p

    def match(self, point_lps, progress: Progress = _quiet) -> MatchResult:
        """Find one template point (LPS mm) on the query scan."""
        template, query = self._pair()
        p = self._inside_template(point_lps)
        with self._lock:
            te = self.embeddings.embed(template, progress=lambda f, m: progress(0.45 * f, f"baseline: {m}"))
            qe = self.embeddings.embed(query, progress=lambda f, m: progress(0.45 + 0.45 * f, f"follow-up: {m}"))
            progress(0.95, "matching")
            result = match_points(te, qe, p, method=self.method)[0]
        progress(1.0, "matched")
        return result

    def propagate(self, point_lps, radius_mm: float,
                  progress: Progress = _quiet) -> tuple[LesionPropagation, Volume]:
        """Carry a lesion, a ball of ``radius_mm`` (mm) around a template point (LPS mm), onto the
        query with the core's :func:`~samv2core.propagate.propagate_lesion`; returns the
        propagation and its 0/1 label map on the query's lattice."""
        template, query = self._pair()
        p = self._inside_template(point_lps)
        with self._lock:
            te = self.embeddings.embed(template, progress=lambda f, m: progress(0.45 * f, f"baseline: {m}"))
            qe = self.embeddings.embed(query, progress=lambda f, m: progress(0.45 + 0.45 * f, f"follow-up: {m}"))
            progress(0.95, "propagating the lesion")
            result = propagate_lesion(te, qe, query, centre_lps=p[0], radius_mm=radius_mm, method=self.method)
        progress(1.0, "propagated")
        return result, result.label_map(query)

    def register(self, mode: str = "rigid", progress: Progress = _quiet):
        """Register the query (moving) onto the template (fixed); returns (result, moving resampled on fixed)."""
        fixed, moving = self._pair()
        with self._lock:
            result = register(fixed, moving, mode=mode, embedder=self.embeddings, progress=progress)
        return result, resample_moving(result, fixed, moving)
