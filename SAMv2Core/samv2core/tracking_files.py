"""Files of a follow-up reading: one JSON for all follow-ups, one CSV row per lesion and
follow-up, and one DICOM SR (TID 1500) per follow-up, written together through an ``OutputSet``
(all or none)."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Optional, Sequence

from .lesion_tracking import NOTE, TrackingResult
from .outputs import OutputSet
from .tracking_sr import ImageContext, measurement_report

CSV_COLUMNS = ("timepoint", "tracking_id", "tracking_uid", "name", "status", "reason", "x", "y", "z",
               "baseline_volume_ml", "followup_volume_ml", "volume_change_ml", "volume_change_percent",
               "baseline_diameter_mm", "followup_diameter_mm", "diameter_change_mm", "diameter_change_percent")


def csv_rows(results: Sequence[TrackingResult], system: str = "LPS") -> list[dict]:
    """One row per lesion (and new finding) per follow-up, positions in ``system``."""
    rows = []
    for k, result in enumerate(results, start=1):
        doc = result.to_dict(system)
        for item in doc["lesions"] + doc["new_findings"]:
            pos = item.get("followup_position") or [None] * 3
            base, follow = item.get("baseline_size") or {}, item.get("followup_size") or {}
            change = item.get("change") or {}
            rows.append({"timepoint": f"follow-up {k}", "tracking_id": item["tracking_id"],
                         "tracking_uid": item["tracking_uid"], "name": item["name"], "status": item["status"],
                         "reason": item["reason"], "x": pos[0], "y": pos[1], "z": pos[2],
                         "baseline_volume_ml": base.get("volume_ml"), "followup_volume_ml": follow.get("volume_ml"),
                         "volume_change_ml": (change.get("volume_ml") or {}).get("absolute"),
                         "volume_change_percent": (change.get("volume_ml") or {}).get("percent"),
                         "baseline_diameter_mm": base.get("longest_axial_mm"),
                         "followup_diameter_mm": follow.get("longest_axial_mm"),
                         "diameter_change_mm": (change.get("longest_axial_mm") or {}).get("absolute"),
                         "diameter_change_percent": (change.get("longest_axial_mm") or {}).get("percent")})
    return rows


def tracking_document(results: Sequence[TrackingResult], contexts: Sequence[ImageContext], system: str = "LPS",
                      extra: Optional[dict] = None) -> dict:
    """The JSON document of a reading over one or more follow-ups."""
    return dict(extra or {}, coordinate_system=system.upper(), note=NOTE,
                followups=[dict(r.to_dict(system), timepoint=f"follow-up {k}",
                                dicom_context=("generated (the follow-up was not read from DICOM)" if c.generated
                                               else "the follow-up's DICOM series"),
                                dicom_notes=list(c.notes))
                           for k, (r, c) in enumerate(zip(results, contexts), start=1)])


def write_tracking_outputs(files: OutputSet, results: Sequence[TrackingResult], contexts: Sequence[ImageContext], *,
                           json_out=None, csv_out=None, sr_outs: Sequence = (), system: str = "LPS",
                           extra: Optional[dict] = None) -> dict:
    """Stage the JSON, CSV and SR files of a reading in ``files``; returns the JSON document."""
    doc = tracking_document(results, contexts, system, extra)
    if json_out:
        files.write_text(json_out, json.dumps(doc, indent=2) + "\n")
    if csv_out:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(csv_rows(results, system))
        files.write_text(csv_out, buf.getvalue())
    for k, (result, context, target) in enumerate(zip(results, contexts, sr_outs), start=1):
        if target:
            sr = measurement_report(result, context, time_point=f"follow-up {k}", time_point_order=k)
            sr.save_as(str(files.stage(Path(target))), enforce_file_format=True)
    return doc
