"""``samv2 info IMAGE``: what the loader makes of an image, so points can be picked in the
right system: size, spacing, direction and orientation code, the extent and centre of the
voxel grid in LPS (ITK, DICOM, this package) and RAS (3D Slicer), the modality it will assume,
and, for a DICOM folder, its series."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from .volume import Volume, dicom_series, load_volume


def _ras(lps) -> list[float]:
    p = np.asarray(lps, dtype=np.float64)
    return [round(float(-p[0]), 3), round(float(-p[1]), 3), round(float(p[2]), 3)]


def _lps(p) -> list[float]:
    return [round(float(v), 3) for v in p]


def orientation_code(direction: np.ndarray) -> str:
    """Three letters naming where the i, j, k index axes point, in LPS terms ('LPS': i goes
    to the patient's left, j to posterior, k to superior; 'RAI' is ITK's name for the same)."""
    letters = (("L", "R"), ("P", "A"), ("S", "I"))
    out = ""
    for col in np.asarray(direction, dtype=np.float64).reshape(3, 3).T:
        axis = int(np.argmax(np.abs(col)))
        out += letters[axis][0 if col[axis] > 0 else 1]
    return out


def describe(volume: Volume, path: "str | Path", series: "list | None" = None) -> dict:
    """The facts ``samv2 info`` prints, as a dict."""
    corners = volume.corners_lps()
    centre = volume.index_to_lps((np.asarray(volume.size_xyz, dtype=np.float64) - 1) / 2)
    oblique = bool(np.abs(np.abs(volume.direction) - np.round(np.abs(volume.direction))).max() > 1e-6)
    doc = {
        "image": str(path),
        "size_xyz": list(volume.size_xyz),
        "spacing_mm": [round(s, 6) for s in volume.spacing],
        "origin_lps": _lps(volume.origin),
        "direction": np.round(volume.direction, 6).tolist(),
        "orientation": orientation_code(volume.direction) + (" (oblique: nearest axes)" if oblique else ""),
        "extent_lps": {"min": _lps(corners.min(0)), "max": _lps(corners.max(0))},
        "extent_ras": {"min": _ras(np.where([1, 1, 0], corners.max(0), corners.min(0))),
                       "max": _ras(np.where([1, 1, 0], corners.min(0), corners.max(0)))},
        "centre_lps": _lps(centre),
        "centre_ras": _ras(centre),
        "modality_assumed": volume.modality.value,
        "intensity_range": [round(float(volume.array.min()), 3), round(float(volume.array.max()), 3)],
    }
    if series:
        doc["dicom_series"] = [{"uid": uid, "files": n} for uid, n in series]
    return doc


def _text(doc: dict) -> str:
    fmt = lambda v: ", ".join(f"{x:g}" for x in v)  # noqa: E731
    lines = [f"image:        {doc['image']}",
             f"size:         {' x '.join(map(str, doc['size_xyz']))} voxels (x, y, z)",
             f"spacing:      {fmt(doc['spacing_mm'])} mm",
             f"orientation:  {doc['orientation']} (index axes i, j, k point to these patient directions)",
             f"extent LPS:   {fmt(doc['extent_lps']['min'])}  to  {fmt(doc['extent_lps']['max'])} mm (voxel centres)",
             f"extent RAS:   {fmt(doc['extent_ras']['min'])}  to  {fmt(doc['extent_ras']['max'])} mm",
             f"centre LPS:   {fmt(doc['centre_lps'])}   (samv2 --point, the default --coords LPS)",
             f"centre RAS:   {fmt(doc['centre_ras'])}   (3D Slicer; samv2 --coords RAS)",
             f"modality:     {doc['modality_assumed']} (assumed by the loader; override with --modality)",
             f"intensities:  {fmt(doc['intensity_range'])}"]
    for s in doc.get("dicom_series", []):
        lines.append(f"series:       {s['uid']} ({s['files']} files)")
    return "\n".join(lines)


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("image", help="NIfTI / NRRD / MHA file or DICOM series folder")
    parser.add_argument("--modality", default="auto", help="CT, MR or auto")
    parser.add_argument("--series", action="append", metavar="UID",
                        help="the series to read when a DICOM folder holds several")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run_info(args) -> int:
    volume = load_volume(args.image, args.modality, series=args.series)
    series = dicom_series(args.image) if Path(args.image).is_dir() else None
    doc = describe(volume, args.image, series)
    print(json.dumps(doc, indent=2) if args.json else _text(doc))
    return 0


__all__ = ["add_info_arguments", "describe", "orientation_code", "run_info"]
