"""Reading and writing point lists: inline text, CSV and 3D Slicer markups (.mrk.json).

Points are returned in LPS (the core's convention) together with the coordinate system the
file used, so outputs can be written back in the user's own convention.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .coords import CoordinateSystem, lps_to_ras, ras_to_lps
from .errors import InputError
from .image_files import check_regular_file
from .outputs import atomic_write, write_text_atomic

MARKUPS_SCHEMA = "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#"


@dataclass(frozen=True)
class PointList:
    lps: np.ndarray  # (N, 3)
    labels: tuple[str, ...]
    source_system: CoordinateSystem = "LPS"


def _to_lps(points: np.ndarray, system: str) -> np.ndarray:
    system = system.upper()
    if system == "LPS":
        return np.asarray(points, float)
    if system == "RAS":
        return ras_to_lps(points)
    raise InputError(f"unknown coordinate system {system!r}: use LPS or RAS")


def parse_inline(text: str, system: str = "LPS") -> np.ndarray:
    """'x,y,z' -> LPS (3,)."""
    try:
        vals = [float(v) for v in text.replace(";", ",").split(",")]
    except ValueError:
        raise InputError(f"point {text!r} is not three numbers 'x,y,z'") from None
    if len(vals) != 3 or not np.all(np.isfinite(vals)):
        raise InputError(f"point {text!r} is not three finite numbers 'x,y,z'")
    return _to_lps(np.array(vals), system)


def read_points(path: "str | Path", system: Optional[str] = None) -> PointList:
    """Points from a .mrk.json (its own coordinate system) or a CSV with x,y,z[,label] columns.

    ``system`` names the CSV's coordinate system (default LPS); it is ignored for .mrk.json,
    whose coordinateSystem field is authoritative.
    """
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: points file not found")
    check_regular_file(p, "points file")
    if p.stat().st_size > MAX_POINTS_FILE_BYTES:
        raise InputError(f"{p}: {p.stat().st_size} bytes is far too large for a points file "
                         f"(at most {MAX_POINTS_FILE_BYTES // 1000000} MB)")
    if p.name.endswith(".json"):
        return _read_markups(p)
    return _read_csv(p, (system or "LPS").upper())


MAX_POINTS_FILE_BYTES = 50_000_000


def _check_units(p: Path, units) -> None:
    """Coordinates must be millimetres: a list in micrometres (or any other unit) is refused,
    never used as if it were mm."""
    values = units if isinstance(units, (list, tuple)) else [units]
    bad = sorted({str(u) for u in values if str(u).strip().lower() not in ("mm", "millimeter", "millimetre")})
    if bad:
        raise InputError(f"{p}: coordinates are in {', '.join(bad)}, not millimetres; convert the point list to mm "
                         "(Slicer: set the markups' units to mm) before using it")


def _read_markups(p: Path) -> PointList:
    try:
        doc = json.loads(p.read_text())
        markups = doc["markups"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{p}: not a Slicer markups .mrk.json file") from None
    pts, labels, systems = [], [], set()
    try:
        for m in markups:
            cs = str(m.get("coordinateSystem", "LPS")).upper()
            if cs not in ("LPS", "RAS"):
                raise InputError(f"{p}: coordinateSystem {cs!r} is not supported (LPS or RAS)")
            _check_units(p, m.get("coordinateUnits", "mm"))
            systems.add(cs)
            for n, cp in enumerate(m.get("controlPoints", [])):
                pos = cp.get("position")
                if pos is None or len(pos) != 3:
                    raise InputError(f"{p}: control point {n} has no 3D position")
                pts.append(_to_lps(np.array(pos, float), cs))
                labels.append(str(cp.get("label") or f"P{len(labels) + 1}"))
    except (AttributeError, TypeError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{p}: not a valid Slicer markups point list ({str(exc)[:80]})") from None
    if not pts:
        raise InputError(f"{p}: contains no control points")
    return PointList(np.array(pts), tuple(labels), "RAS" if systems == {"RAS"} else "LPS")


def _read_csv(p: Path, system: str) -> PointList:
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{p}: not a text CSV of points (x,y,z[,label]): {str(exc)[:80]}") from None
    if not rows:
        raise InputError(f"{p}: no points in the CSV file")
    header = [h.strip().lower() for h in rows[0]]
    if {"x", "y", "z"} <= set(header):
        ix = [header.index(k) for k in ("x", "y", "z")]
        il = header.index("label") if "label" in header else None
        body = rows[1:]
    else:
        ix, il, body = [0, 1, 2], (3 if len(rows[0]) > 3 else None), rows
    for unit_col in ("unit", "units", "coordinateunits"):
        if unit_col in header:
            iu = header.index(unit_col)
            _check_units(p, [r[iu] for r in body if iu < len(r)])
    pts, labels = [], []
    for n, r in enumerate(body):
        try:
            pts.append([float(r[i]) for i in ix])
        except (ValueError, IndexError):
            raise InputError(f"{p}: row {n + 1} is not x,y,z numbers: {str(r)[:80]}") from None
        labels.append(r[il].strip() if il is not None and il < len(r) else f"P{n + 1}")
    arr = np.array(pts, float)
    if not np.all(np.isfinite(arr)):
        raise InputError(f"{p}: contains NaN/Inf coordinates")
    return PointList(_to_lps(arr, system), tuple(labels), system)  # type: ignore[arg-type]


def write_markups(path: "str | Path", points_lps: np.ndarray, labels: Sequence[str],
                  system: CoordinateSystem = "LPS", descriptions: Optional[Sequence[str]] = None,
                  selected: Optional[Sequence[bool]] = None) -> Path:
    """Write a Slicer point list (.mrk.json) in ``system``; returns the path."""
    pts = np.asarray(points_lps, float).reshape(-1, 3)
    out = lps_to_ras(pts) if system == "RAS" else pts
    cps = []
    for n, (pos, label) in enumerate(zip(out, labels)):
        cps.append({"id": str(n + 1), "label": label,
                    "description": descriptions[n] if descriptions else "",
                    "position": [float(v) for v in pos], "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                    "selected": bool(selected[n]) if selected is not None else True, "locked": False,
                    "visibility": True, "positionStatus": "defined"})
    doc = {"@schema": MARKUPS_SCHEMA,
           "markups": [{"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
                        "controlPoints": cps}]}
    return write_text_atomic(path, json.dumps(doc, indent=2))


def write_csv(path: "str | Path", rows: Sequence[dict]) -> Path:
    """Write dict rows (same keys) as CSV; returns the path."""
    if not rows:
        raise InputError("nothing to write")

    def write(tmp: Path) -> None:
        with tmp.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
            w.writeheader()
            w.writerows(rows)

    return atomic_write(path, write)
