"""A follow-up reading as a DICOM SR TID 1500 Measurement Report (built with highdicom).

One SR per follow-up. Each baseline lesion and each new finding is a tracked measurement group
(TID 1411 planar ROI with a 3D point at its follow-up position, or TID 1501 when it has no
position) carrying its Tracking Identifier and Tracking UID (the same on every follow-up), a
time point context, its status (found / not found / outside / ambiguous / new) and, when the
lesion was a segment, its volume and longest axial diameter at this time point.

The SR references the follow-up's source series when it was read from DICOM. Otherwise it has
no source to reference: the patient / study / series context is generated, the SR's series
description says so, and no evidence is recorded.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence

import highdicom as hd
import numpy as np
import pydicom
from highdicom.sr import CodedConcept
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, generate_uid

from . import __version__
from .lesion_tracking import TrackingResult
from .volume import Volume

GENERATED = "GENERATED CONTEXT: inputs were not DICOM"
ML = CodedConcept("mL", "UCUM", "milliliter")
STATUS = CodedConcept("33999-4", "LN", "Status")
# SNOMED CT where a code exists; the others in this product's local scheme
STATUS_CODES = {
    "found": codes.SCT.Present,
    "not found": codes.SCT.Absent,
    "ambiguous": codes.SCT.Indeterminate,
    "outside the follow-up": CodedConcept("OUTSIDE_FOV", "99SAMV2", "Outside the follow-up field of view"),
    "new": CodedConcept("NEW_FINDING", "99SAMV2", "New finding without baseline partner"),
}


@dataclass(frozen=True)
class ImageContext:
    """The DICOM context of one scan: the headers of its series (``evidence``), or one generated
    header (``generated`` True) when the scan was not read from DICOM; ``notes`` says what was
    filled in (e.g. identifiers an anonymiser emptied)."""

    evidence: tuple
    generated: bool
    notes: tuple = ()

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.evidence[0].FrameOfReferenceUID)


def image_context(volume: Volume, patient_id: str = "SAMV2-ANON", study_uid: Optional[str] = None) -> ImageContext:
    """The DICOM headers behind ``volume`` (``meta['source']`` a DICOM folder or file), else a
    generated study / series context (a CT header with fresh UIDs, clearly labelled)."""
    src = volume.meta.get("source")
    files = []
    if src:
        p = Path(src)
        candidates = sorted(p.iterdir()) if p.is_dir() else [p]
        for f in candidates:
            if f.is_file() and pydicom.misc.is_dicom(f):
                files.append(pydicom.dcmread(f, stop_before_pixels=True))
    files = [f for f in files if f.get("FrameOfReferenceUID")]
    if files:
        return _repaired(files)
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = generate_uid()
    ds.Modality = "CT"
    ds.PatientID = patient_id
    ds.PatientName = "Anonymous^"
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyDate = datetime.now().strftime("%Y%m%d")
    ds.StudyTime = datetime.now().strftime("%H%M%S")
    ds.SeriesDescription = GENERATED
    return ImageContext((ds,), True)


def _repaired(headers: list) -> ImageContext:
    """Headers whose emptied identifiers are filled: SOP class / instance from the file meta,
    study / series UIDs derived from the instances (the same on every read), with a note."""
    notes, out = [], []
    first = str(headers[0].file_meta.get("MediaStorageSOPInstanceUID", "") or headers[0].get("SOPInstanceUID", ""))
    derived = {"StudyInstanceUID": generate_uid(entropy_srcs=[first, "study"]),
               "SeriesInstanceUID": generate_uid(entropy_srcs=[first, "series"])}
    for ds in headers:
        ds = ds.copy()
        meta = getattr(ds, "file_meta", Dataset())
        if not ds.get("SOPClassUID"):
            ds.SOPClassUID = meta.get("MediaStorageSOPClassUID", CTImageStorage)
        if not ds.get("SOPInstanceUID"):
            ds.SOPInstanceUID = meta.get("MediaStorageSOPInstanceUID") or generate_uid()
        for key, uid in derived.items():
            if not ds.get(key):
                setattr(ds, key, uid)
                notes.append(f"the source series has no {key}: a derived one is used")
        out.append(ds)
    return ImageContext(tuple(out), False, tuple(dict.fromkeys(notes)))


def _measurements(size) -> list:
    if size is None:
        return []
    return [hd.sr.Measurement(codes.SCT.Volume, float(size.volume_ml), ML),
            hd.sr.Measurement(codes.SCT.LongAxis, float(size.longest_axial_mm), codes.UCUM.Millimeter)]


def _group(tracking: hd.sr.TrackingIdentifier, position, status: str, size, frame_uid: str,
           time_point: hd.sr.TimePointContext):
    evaluations = [hd.sr.QualitativeEvaluation(STATUS, STATUS_CODES[status])]
    common = dict(tracking_identifier=tracking, time_point_context=time_point, finding_type=codes.SCT.Lesion,
                  measurements=_measurements(size) or None, qualitative_evaluations=evaluations)
    if position is None:
        return hd.sr.MeasurementsAndQualitativeEvaluations(**common)
    region = hd.sr.ImageRegion3D(hd.sr.GraphicTypeValues3D.POINT,
                                 np.asarray(position, dtype=np.float64).reshape(1, 3), frame_uid)
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(referenced_region=region, **common)


def measurement_report(result: TrackingResult, context: ImageContext, *, time_point: str = "follow-up 1",
                       time_point_order: int = 1, series_number: int = 901) -> hd.sr.Comprehensive3DSR:
    """The TID 1500 Measurement Report of one follow-up reading.

    Args:
        result: the reading (``track_lesions``).
        context: the follow-up's DICOM context (``image_context``).
        time_point, time_point_order: the follow-up's name and place in the time series.
    Returns:
        a highdicom Comprehensive3DSR (a pydicom Dataset), positions in the follow-up's
        frame of reference (LPS mm, the DICOM patient system).
    """
    tp = hd.sr.TimePointContext(time_point, time_point_order=int(time_point_order))
    frame = context.frame_of_reference_uid
    groups = []
    for t in result.lesions:
        tid = hd.sr.TrackingIdentifier(uid=t.lesion.tracking_uid, identifier=t.lesion.tracking_id)
        position = t.position_lps if t.status in ("found", "ambiguous") else None
        groups.append(_group(tid, position, t.status, t.followup_size, frame, tp))
    for n in result.new_findings:
        tid = hd.sr.TrackingIdentifier(uid=n.tracking_uid, identifier=n.tracking_id)
        groups.append(_group(tid, n.position_lps, "new", n.size, frame, tp))
    device = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="SAMv2 lesion tracking", model_name=f"samv2core {__version__}"))
    report = hd.sr.MeasurementReport(observation_context=hd.sr.ObservationContext(observer_device_context=device),
                                     procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
                                     imaging_measurements=groups)
    description = "SAMv2 follow-up reading (measurement aid, not a diagnosis)"
    if context.generated:
        description = f"{GENERATED}; {description}"
    elif context.notes:
        description = f"source DICOM lacked UIDs (derived); {description}"
    sr = hd.sr.Comprehensive3DSR(evidence=list(context.evidence), content=report[0],
                                 series_instance_uid=generate_uid(), series_number=series_number,
                                 sop_instance_uid=generate_uid(), instance_number=1, manufacturer="SAMv2",
                                 series_description=description[:64], record_evidence=not context.generated)
    if context.generated:  # nothing real to point at: no evidence list
        for key in ("CurrentRequestedProcedureEvidenceSequence", "PertinentOtherEvidenceSequence"):
            if key in sr:
                delattr(sr, key)
    sr.ContentDescription = "Measurement aid, not a diagnosis"
    return sr


def tracking_uids(sr: Dataset) -> dict:
    """{tracking identifier: tracking UID} of the measurement groups of a TID 1500 SR read back."""
    parsed = hd.sr.srread(sr) if isinstance(sr, (str, Path)) else hd.sr.Comprehensive3DSR.from_dataset(sr)
    out = {}
    for group in parsed.content.get_planar_roi_measurement_groups() + _image_groups(parsed):
        out[group.tracking_identifier] = group.tracking_uid
    return out


def _image_groups(parsed) -> Sequence:
    return list(parsed.content.get_image_measurement_groups())
