"""Which linear result a registration may build on: the policies that run and judge the stages.

A policy decides which descriptors are tried and in which order (SAM, MIND-SSC), with which
similarity terms the results are refined and verified, and which result is kept; pipeline.py
asks its policy for one :class:`LinearOutcome` and builds the nonlinear stages on it.

* :class:`SamePatientPolicy` (``RegistrationOptions(verify=True)``, the default): for each
  similarity term in order (``verification_terms``), a candidate per descriptor set
  (``descriptor_order``): matches + fit, intensity refinement, verification against the images
  (verify.py: a local similarity optimum, distinct from alternative placements, better than
  scanner coordinates; a fit the refinement disagrees with is refused and the refinement's end
  point verified instead); the best verified candidate must be inverse-consistent
  (``inverse_consistency``); several verified ones are compared on the same points (``choose``).
* :class:`UnverifiedPolicy` (``verify=False``): the first descriptor set whose fit stands,
  refined, not verified.

A new policy (e.g. inter-patient: similarity improvement over alternative starts, inverse
consistency, folding and body overlap instead of a distinct optimum) implements
:class:`LinearPolicy`; subclassing :class:`SamePatientPolicy` and overriding ``terms``,
``verify`` or ``consistent`` reuses the candidate loop. All maps are 4x4 fixed LPS -> moving
LPS (mm).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np

from ..errors import RegistrationError
from ..progress import Progress
from ..volume import Modality
from .candidate import LABEL, Candidate, candidate, inverse_consistency
from .mind_features import MindEmbedder
from .options import RegistrationOptions
from .preflight import CheckedPair
from .stages import EmbeddedPair, LinearStage, RefineStage, embed_pair, match_and_fit, mind_pair, quiet, refine_stage
from .verify import SimilarityProbe, Verification, choose, verify_linear


@dataclass(eq=False)
class LinearOutcome:
    """What a policy hands the pipeline: the linear result to build on and why it was kept."""

    linear: LinearStage  # the matches and fit of the kept descriptors
    refined: RefineStage  # its refined 4x4 map (fixed LPS -> moving LPS, mm) and common field of view
    model_id: Optional[str]  # the descriptors' model id (the report's 'model_id')
    report: Optional[dict] = None  # the report's 'verification' entry; None when not verified
    term: Optional[str] = None  # the similarity term it verified with ('lncc' | 'mind'), None when not verified
    warnings: list = field(default_factory=list)  # the policy's own (the stages' ride on their results)
    candidates: list = field(default_factory=list)  # the Candidates tried with the last term


class LinearPolicy(Protocol):
    """Runs stages 2-4 for a checked pair and keeps one linear result, or raises
    RegistrationError with a one-line reason why none can be trusted."""

    name: str

    def linear(self, checked: CheckedPair, embedder, mode: str, opts: RegistrationOptions,
               progress: Progress = None, timing: Optional[dict] = None) -> LinearOutcome:
        """Args: the preflight's pair, the SAM EmbeddingSession (None when only MIND-SSC is
        used), 'rigid' | 'affine', the options, a progress callback and a dict the policy fills
        with stage seconds. Returns: the kept LinearOutcome."""
        ...


def claims_cross_modality(embedder) -> bool:
    """True when the model card says the model was validated across modalities (CT-MRI)."""
    descriptors = getattr(embedder, "descriptors", embedder)  # an EmbeddingSession or the descriptors
    card = getattr(descriptors, "card", None)
    training = getattr(card, "training", None) or {}
    return bool(training.get("cross_modality_validated", False))


def descriptor_order(checked: CheckedPair, opts: RegistrationOptions, embedder=None,
                     verified: bool = True) -> tuple[list[str], bool]:
    """The descriptor sets to try, in order, and whether to try all of them (the SAM-to-MIND
    fallback, in one place).

    Args:
        checked: the preflight's pair (its modality pair).
        opts: ``opts.features``: 'sam' / 'mind' (that one only) or 'auto'.
        embedder: the SAM EmbeddingSession (its model card says whether it claims CT-MRI).
        verified: whether results are verified. Verified, 'auto' tries SAM and then MIND-SSC
            when SAM's result fails; unverified, only a cross-modality pair falls back (when
            SAM's matches cannot support a fit at all).

    Returns:
        (order, try_all): e.g. (['sam', 'mind-ssc'], False); ``try_all`` is True for a
        cross-modality pair whose model card does not claim cross-modality validation (both
        are verified and the better kept).
    """
    if opts.features != "auto":
        return ({"sam": ["sam"], "mind": ["mind-ssc"]}[opts.features]), False
    if not verified:
        return (["sam", "mind-ssc"] if checked.modality_pair == "cross" else ["sam"]), False
    return ["sam", "mind-ssc"], (checked.modality_pair == "cross" and not claims_cross_modality(embedder))



def verification_terms(checked: CheckedPair, opts: RegistrationOptions) -> list[str]:
    """The similarity terms to refine and verify with, in order of trial: the deformable option's
    term when it names one; else 'lncc' within one modality and 'mind' across; for two MR images
    'lncc', then 'mind' when nothing verifies with it (two MR sequences of different contrast,
    e.g. T2 and DWI, do not agree in local NCC; MIND-SSC is less precise on one contrast)."""
    if opts.deformable.intensity in ("lncc", "mind"):
        return [opts.deformable.intensity]
    if checked.modality_pair == "cross":
        return ["mind"]
    both_mr = checked.fixed.volume.modality is Modality.MR and checked.moving.volume.modality is Modality.MR
    return ["lncc", "mind"] if both_mr else ["lncc"]


class SamePatientPolicy:
    """Same-patient registration (CT-CT, MR-MR, CT-MRI of one patient): the verified linear
    result, or RegistrationError naming why none verified.

    For each term of ``terms`` in order: one candidate per descriptor set of
    ``descriptor_order`` ('auto': SAM, and MIND-SSC when SAM's fails; both for a cross-modality
    pair whose model does not claim CT-MRI), each checked by ``verify``; the verified ones must
    pass ``consistent``; several verified are compared on the same points (``choose``). Subclass
    and override ``terms``, ``verify`` or ``consistent`` for another policy with this loop.
    """

    name = "same-patient"

    def terms(self, checked: CheckedPair, opts: RegistrationOptions) -> list[str]:
        """The similarity terms to refine and verify with, in order of trial."""
        return verification_terms(checked, opts)

    def verify(self, probe: SimilarityProbe, matrix4: np.ndarray, refine_stats: Optional[dict]) -> Verification:
        """The image evidence for one refined 4x4 map (verify.verify_linear)."""
        return verify_linear(probe, matrix4, refine_stats)

    def consistent(self, passed: list, checked: CheckedPair, mode: str, opts: RegistrationOptions,
                   probe: SimilarityProbe) -> list:
        """The verified candidates left once the best of them is inverse-consistent: the best (by
        similarity) is checked; one that fails is refused (its verification says why) and the
        next best is checked. Without the refinement (``opts.refine`` off) there is no check."""
        while passed and opts.refine:
            k = choose(probe, [(c.features, c.refined.matrix) for c in passed])[0] if len(passed) > 1 else 0
            best = passed[k]
            t = time.perf_counter()
            backward = inverse_consistency(checked, best.linear.embedded, best.refined.matrix, mode, opts, probe.term)
            best.linear.seconds["inverse_consistency_s"] = round(time.perf_counter() - t, 3)
            best.verification.details["inverse_consistency"] = backward
            if backward["passed"]:
                break
            best.verification.passed, best.verification.reason = False, backward["reason"]
            best.error = backward["reason"]
            passed = [c for c in passed if c.passed]
        return passed

    def linear(self, checked: CheckedPair, embedder, mode: str, opts: RegistrationOptions,
               progress: Progress = None, timing: Optional[dict] = None) -> LinearOutcome:
        """Linear candidates from the descriptors ``opts.features`` allows, each verified against
        the images; the best verified one is kept.

        Args:
            checked: the preflight's pair.
            embedder: the SAM EmbeddingSession (None when ``opts.features`` is 'mind').
            mode: 'rigid' | 'affine'; opts: the registration options.
            progress: callback(fraction, message); timing: dict filled with stage seconds.

        Returns:
            LinearOutcome: the kept candidate's stages, its verification report and term.

        Raises:
            RegistrationError: no candidate verified (one line naming each one's reason).
        """
        report_progress = progress or quiet
        timing = {} if timing is None else timing
        order, both = descriptor_order(checked, opts, embedder)
        embeddings: dict = {}
        fits: dict = {}

        def embedded_for(features: str) -> EmbeddedPair:
            if features not in embeddings:
                t = time.perf_counter()
                if features == "sam":
                    embeddings[features] = embed_pair(checked, embedder, "sam", report_progress)
                    timing["embedding_s"] = round(time.perf_counter() - t, 3)
                else:
                    report_progress(0.6, "MIND-SSC descriptors")
                    embeddings[features], timing["mind_descriptors_s"] = mind_pair(checked, "mind-ssc")
                    timing.setdefault("embedding_s", timing["mind_descriptors_s"])
            return embeddings[features]

        earlier: dict = {}  # term -> the candidates' reports with that term, when none verified
        refusals: list[str] = []
        for term in self.terms(checked, opts):
            probe = SimilarityProbe(checked.fixed.model_volume, checked.fixed.mask, checked.moving.model_volume, term,
                                    opts.verify_options)
            candidates: list[Candidate] = []
            for features in order:
                if candidates and candidates[-1].passed and not both:
                    break
                embedded = embedded_for(features)
                report_progress(0.62, f"stable matching and fit ({LABEL[features]}, {term})")
                t = time.perf_counter()
                candidates.append(candidate(checked, embedded, mode, opts, probe, report_progress, fits, self.verify))
                timing[f"linear_{features}_s"] = round(timing.get(f"linear_{features}_s", 0.0)
                                                       + time.perf_counter() - t, 3)
            passed = self.consistent([c for c in candidates if c.passed], checked, mode, opts, probe)
            if passed:
                break
            earlier[term] = {c.features: c.report() for c in candidates}
            refusals.append("; ".join(f"{LABEL[c.features]} ({term}): {c.error}" for c in candidates))
        tried = {c.features: c.report() for c in candidates}
        if not passed:
            raise RegistrationError(f"the {mode} result could not be verified against the images "
                                    f"({'; '.join(refusals)})")
        warnings = []
        comparison = None
        if len(passed) > 1:
            k, comparison = choose(probe, [(c.features, c.refined.matrix) for c in passed])
            chosen = passed[k]
            why = (f"{LABEL[chosen.features]} kept: both verified, its {probe.term} similarity is higher "
                   f"({comparison['similarity']}; the fits differ by up to {comparison['max_disagreement_mm']} mm)")
        else:
            chosen = passed[0]
            failed = [c for c in candidates if not c.passed]
            why = f"{LABEL[chosen.features]} verified" + "".join(
                f"; {LABEL[c.features]} not: {c.error}" for c in failed)
            if failed:
                warnings.append(f"{LABEL[failed[0].features]} result refused ({failed[0].error}); "
                                f"used {LABEL[chosen.features]} instead")
        if chosen.fit_refused:
            why += f" ({chosen.fit_refused})"
        if earlier:
            why += (f" with {probe.term} (nothing verified with {', '.join(earlier)}: the images' local intensities "
                    "do not correspond, e.g. two MR contrasts)")
            warnings.append(f"no result verified with {', '.join(earlier)}; refined and verified with {probe.term}")
        report = {"summary": why, "chosen": chosen.features, "term": probe.term, "candidates": tried,
                  "cross_modality_model": claims_cross_modality(embedder)}
        if earlier:
            report["earlier_terms"] = earlier
        if comparison is not None:
            report["comparison"] = comparison
        timing.update(chosen.linear.seconds)
        descriptors = MindEmbedder if chosen.linear.embedded.features == "mind-ssc" else embedder
        return LinearOutcome(chosen.linear, chosen.refined, getattr(descriptors, "model_id", None), report,
                             probe.term, warnings, candidates)


class UnverifiedPolicy:
    """``RegistrationOptions(verify=False)``: the first descriptor set of ``descriptor_order``
    whose matches support a fit, refined; nothing checks it against the images."""

    name = "unverified"

    def linear(self, checked: CheckedPair, embedder, mode: str, opts: RegistrationOptions,
               progress: Progress = None, timing: Optional[dict] = None) -> LinearOutcome:
        """Args and Returns as :meth:`SamePatientPolicy.linear` (``report`` and ``term`` None).

        Raises:
            RegistrationError: no descriptor set's matches support a fit.
        """
        report_progress = progress or quiet
        timing = {} if timing is None else timing
        order, _ = descriptor_order(checked, opts, embedder, verified=False)
        t = time.perf_counter()
        if order[0] == "mind-ssc":
            embedded, _ = mind_pair(checked, "mind-ssc")
            model_id = MindEmbedder.model_id
        else:
            embedded = embed_pair(checked, embedder, "sam", report_progress)
            model_id = getattr(embedder, "model_id", None)
        timing["embedding_s"] = round(time.perf_counter() - t, 3)
        linear = self.fit(checked, embedded, order, mode, opts, report_progress)
        timing.update(linear.seconds)
        t = time.perf_counter()
        refined = refine_stage(checked, linear, mode, opts, report_progress)
        if refined.stats is not None:
            timing["refine_s"] = round(time.perf_counter() - t, 3)
        return LinearOutcome(linear, refined, model_id)

    @staticmethod
    def fit(checked: CheckedPair, embedded: EmbeddedPair, order: list[str], mode: str, opts: RegistrationOptions,
            progress: Progress = None) -> LinearStage:
        """Stable matches + robust fit on ``embedded``; when they cannot support a transform and
        ``order`` names MIND-SSC next, the same on MIND-SSC descriptors (said in the warnings)."""
        report = progress or quiet
        report(0.60, "stable matching")
        try:
            return match_and_fit(embedded, mode, opts)
        except RegistrationError as exc:
            if len(order) < 2:
                raise
            sam_error = exc
        # a model not trained across modalities: retry on modality-independent descriptors
        report(0.62, "SAM matches disagree across modalities: MIND-SSC descriptors")
        mind, seconds = mind_pair(checked, "mind-ssc (cross-modality fallback)")
        try:
            stage = match_and_fit(mind, mode, opts)
        except RegistrationError as again:
            raise RegistrationError(f"{again} (MIND-SSC descriptors; SAM embeddings failed too: {sam_error})") from None
        stage.seconds["mind_descriptors_s"] = seconds
        stage.warnings.insert(0, f"SAM embeddings: {sam_error}; used training-free MIND-SSC descriptors instead")
        return stage


def policy_for(opts: RegistrationOptions) -> LinearPolicy:
    """The policy the options ask for: verified same-patient, or unverified (``verify=False``)."""
    return SamePatientPolicy() if opts.verify else UnverifiedPolicy()
