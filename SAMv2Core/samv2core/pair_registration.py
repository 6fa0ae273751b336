"""The refined click-to-match's independent opinion: the pair's verified registration.

The arbiter (samv2core.arbiter) is a local fit of the same embedding matches the SAM answer
rests on; where those matches are wrong over a region, every embedding opinion agrees on the
wrong place. The pair's own affine + deformable registration (samv2core.registration.register,
verified against the images before it is trusted) is an intensity-driven opinion that does not
share that failure. It is slow (seconds), so matching asks for it only when a click's first vote
is not confident, once per pair: :class:`RegistrationSource` builds it (reusing the pair's
embeddings, never embedding again), keeps it in memory with the pair (matching's per-pair state)
and on disk next to the pair's fixed points (samv2core.arbiter.PairDiskCache). A registration
that is refused (verification failed, or any registration error) gives no opinion; the refusal
is cached too, so it is not retried on every click.

``register`` lives above matching in the layer order, so matching takes the source as an
argument (``match_points(..., registration=REGISTRATION)``); the CLI, batch, demo and the
Slicer worker pass it.

All points are LPS millimetres.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch

from .affine import sitk_affine
from .arbiter import pair_store
from .checked_tensors import CorruptFileError, discard_cache_entry, load_keyed_entry, save_checked
from .embed import Embeddings
from .errors import SAMv2Error
from .registration import RegistrationOptions, register
from .session import EmbeddingSession

_log = logging.getLogger(__name__)

SETTINGS = {"registration": "affine+deformable, verified", "version": 1}  # part of the disk key


@dataclass
class RegistrationOpinion:
    """The pair's registration as a point map (template LPS -> query LPS), or its refusal."""

    matrix: Optional[np.ndarray]  # 4x4 linear part, applied after the displacement
    displacement: Optional[np.ndarray]  # (z, y, x, 3) LPS mm on an identity-direction grid, or None
    origin: tuple = (0.0, 0.0, 0.0)
    spacing: tuple = (1.0, 1.0, 1.0)
    refused: Optional[str] = None  # why there is no opinion
    seconds: float = 0.0
    _composite: Optional[sitk.CompositeTransform] = None

    @property
    def available(self) -> bool:
        return self.refused is None and self.matrix is not None

    def _transform(self) -> sitk.CompositeTransform:
        if self._composite is None:
            composite = sitk.CompositeTransform(3)
            composite.AddTransform(sitk_affine(self.matrix))
            if self.displacement is not None:
                img = sitk.GetImageFromArray(self.displacement.astype(np.float64), isVector=True)
                img.SetOrigin(self.origin)
                img.SetSpacing(self.spacing)
                composite.AddTransform(sitk.DisplacementFieldTransform(img))
            self._composite = composite
        return self._composite

    def map(self, point) -> Optional[np.ndarray]:
        """Where the registration sends template ``point`` (LPS (3,)); None when refused."""
        if not self.available:
            return None
        return np.asarray(self._transform().TransformPoint(tuple(float(v) for v in np.ravel(point))), float)


class _KnownEmbeddings:
    """Descriptors that answer with the pair's existing embeddings (register must not embed again)."""

    def __init__(self, *embeddings: Embeddings):
        self.known = {e.model_volume.content_key: e for e in embeddings}
        self.model_id = embeddings[0].model_id
        self.spacing_mm = float(max(embeddings[0].model_volume.spacing))

    def embed(self, volume, progress=None) -> Embeddings:
        try:
            return self.known[volume.content_key]
        except KeyError:
            raise SAMv2Error("the pair registration asked for embeddings of an unexpected volume") from None


def compute_opinion(template: Embeddings, query: Embeddings,
                    options: Optional[RegistrationOptions] = None) -> RegistrationOpinion:
    """Register the pair's model-grid volumes (template = fixed, query = moving; affine +
    deformable, verified) with the embeddings they already have. A refusal is an opinion-less
    result, never an exception."""
    t0 = time.perf_counter()
    session = EmbeddingSession(_KnownEmbeddings(template, query), label=template.model_id)
    try:
        res = register(template.model_volume, query.model_volume, mode="affine", deformable=True,
                       embedder=session, options=options)
    except SAMv2Error as exc:
        reason = (str(exc).splitlines() or ["registration failed"])[0][:200]
        return RegistrationOpinion(None, None, refused=reason, seconds=time.perf_counter() - t0)
    disp = None
    origin, spacing = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if res.displacement is not None:
        disp = sitk.GetArrayFromImage(res.displacement).astype(np.float32)
        origin, spacing = tuple(res.displacement.GetOrigin()), tuple(res.displacement.GetSpacing())
    return RegistrationOpinion(np.asarray(res.linear_matrix, float), disp, origin, spacing,
                               seconds=time.perf_counter() - t0)


# --- with the pair on disk ----------------------------------------------------------------------
def save_opinion(path, opinion: RegistrationOpinion, key: str) -> None:
    tensors = {}
    if opinion.available:
        tensors["matrix"] = torch.as_tensor(opinion.matrix, dtype=torch.float64)
        if opinion.displacement is not None:
            tensors["displacement"] = torch.as_tensor(np.ascontiguousarray(opinion.displacement))
    else:
        tensors["refused"] = torch.zeros(1)
    meta = {"key": key, "origin": ",".join(repr(float(v)) for v in opinion.origin),
            "spacing": ",".join(repr(float(v)) for v in opinion.spacing), "refused": opinion.refused or ""}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checked(path, tensors, meta)
    except (OSError, ValueError, TypeError) as exc:  # a cache that cannot be written only costs time later
        _log.warning("samv2: warning: could not write the pair registration %s (%s)", path, exc)


def load_opinion(path, key: str) -> Optional[RegistrationOpinion]:
    """The opinion stored at ``path`` for ``key``; None when absent or untrustworthy (removed)."""
    try:
        entry = load_keyed_entry(path, key)
        if entry is None:
            return None
        t, meta = entry
        if "refused" in t:
            return RegistrationOpinion(None, None, refused=meta.get("refused") or "refused")
        matrix = t["matrix"].double().numpy()
        disp = t["displacement"].numpy() if "displacement" in t else None
        origin = tuple(float(v) for v in meta["origin"].split(","))
        spacing = tuple(float(v) for v in meta["spacing"].split(","))
        if matrix.shape != (4, 4) or not np.isfinite(matrix).all() or len(origin) != 3 or len(spacing) != 3 or (
                disp is not None and (disp.ndim != 4 or disp.shape[-1] != 3 or not np.isfinite(disp).all())):
            raise CorruptFileError(f"{path}: the stored registration is malformed")
        return RegistrationOpinion(matrix, disp, origin, spacing)
    except (CorruptFileError, KeyError, TypeError, ValueError, OSError) as exc:
        discard_cache_entry(path, "pair registration", exc)
        return None


class RegistrationSource:
    """Builds a pair's :class:`RegistrationOpinion`: from the disk entry next to the pair's fixed
    points when there is one, else by registering (then stored there). Matching keeps the result
    in its per-pair state, so this runs once per pair."""

    def __init__(self, options: Optional[RegistrationOptions] = None):
        self.options = options

    def __call__(self, template: Embeddings, query: Embeddings) -> RegistrationOpinion:
        store = pair_store(template, query, SETTINGS)
        path = store.registration_path() if store is not None else None
        if path is not None:
            cached = load_opinion(path, store.key)
            if cached is not None:
                return cached
        opinion = compute_opinion(template, query, self.options)
        if path is not None:
            save_opinion(path, opinion, store.key)
        return opinion


REGISTRATION = RegistrationSource()  # the default source (verified affine + deformable)
