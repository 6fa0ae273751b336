"""The cohort runner: one job per case of a CSV, surviving faults, on one machine or many.

Used by ``samv2 batch`` (core job: match points, optionally register) and by the Slicer batch
script (its job runs the Slicer logic in-process). What it guarantees:

* **Case names are sanitised** (letters, digits, ``.``, ``_``, ``-``; ``../x`` becomes ``x``;
  a name starting with ``summary`` gets ``case_`` before it, so it never takes the summary
  file's place): a case never writes outside the output folder; names must stay unique.
* **Inputs are regular files or folders**: a pipe (FIFO) listed as a case input fails that
  case at once (it would block forever); the other cases run.
* **A case is all-or-nothing**: its files are written in a private staging folder
  ``OUTPUT/.partial-<pid>@<host>-<id>-<case>/``, then a ``manifest.json`` (SHA-256 of every input
  and output file, the job's settings) is written LAST, and the folder is renamed to
  ``OUTPUT/<case>/``. A killed run leaves only staging folders, which are removed on restart.
* **Restart skips finished cases**: a case whose manifest exists, whose outputs still match
  their checksums, and whose inputs and settings are unchanged is reported ``skipped``;
  everything else is redone.
* **One failing case never stops the others**; the summary (``summary.csv``, one row per case:
  status ok / skipped / failed and the one-line reason) says which failed and why.
* **Scale-out**: ``workers=0`` runs in this process; otherwise cases are Dask tasks, on a
  ``LocalCluster`` of ``workers`` processes or on an existing cluster (``scheduler``
  address). A worker that dies mid-case is replaced and its case resubmitted by Dask's
  scheduler (up to ``distributed.scheduler.allowed-failures`` times). ``shard=(i, n)`` keeps
  only cases ``k`` with ``k % n == i`` (for job arrays; each shard writes
  ``summary.shard-i-of-n.csv``).
"""
from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Protocol

from .errors import InputError, SAMv2Error, os_error_message
from .image_files import check_regular_file
from .outputs import atomic_write, check_writable, pid_alive, write_text_atomic

MANIFEST = "manifest.json"
SUMMARY_FIELDS = ["case", "status", "seconds", "attempts", "message", "outputs"]
_NAME_BAD = re.compile(r"[^A-Za-z0-9._-]+")


# --- cases ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    """One row of the cohort CSV: a safe ``name`` and its input files (absolute paths)."""

    name: str
    inputs: dict  # role -> absolute path string ("" when the column is empty)
    row: int  # 1-based data row in the CSV


@dataclass
class CaseOutcome:
    case: str
    status: str  # "ok" | "skipped" | "failed"
    message: str = ""
    seconds: float = 0.0
    attempts: int = 1
    outputs: list = field(default_factory=list)
    info: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"case": self.case, "status": self.status, "seconds": round(self.seconds, 2),
                "attempts": self.attempts, "message": self.message, "outputs": ";".join(self.outputs)}


@dataclass
class CohortSummary:
    outcomes: list
    summary_path: Path

    @property
    def failed(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0


def sanitise_case_name(raw: str, row: int) -> str:
    """A folder name that cannot leave the output folder: letters, digits, '.', '_', '-'."""
    name = _NAME_BAD.sub("_", str(raw).strip()).strip("._-")[:100]
    if name.lower().startswith("summary"):  # the summary files live beside the case folders
        name = f"case_{name}"
    return name if name else f"case{row:03d}"


def read_cases(csv_path: "str | Path", roles: dict, optional: tuple = ()) -> list:
    """Cases of a CSV. ``roles`` maps each input role to its accepted column names, first
    preferred, e.g. {"template": ("template", "baseline")}; every role is required except those
    in ``optional`` (their column may be absent or a cell empty: input ""). Paths are
    relative to the CSV's folder. InputError when the CSV cannot be used."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise InputError(f"{csv_path}: no such case file")
    check_regular_file(csv_path, "case file")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [str(c or "").strip().lower() for c in (reader.fieldnames or [])]
            raw_rows = [{str(k or "").strip().lower(): (v or "").strip() if isinstance(v, str) else ""
                         for k, v in r.items()} for r in reader]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise InputError(f"{csv_path}: not a text CSV of cases ({str(exc)[:80]})") from None
    columns = {}
    for role, names in roles.items():
        found = next((n for n in names if n in header), None)
        if found is None and role in optional:
            continue
        if found is None:
            raise InputError(f"{csv_path}: missing column {' or '.join(names)} (columns: case, "
                             f"{', '.join(n[0] for n in roles.values())})")
        columns[role] = found
    cases, seen = [], {}
    for n, row in enumerate(raw_rows, start=1):
        if not any(row.values()):
            continue
        inputs = {role: "" for role in optional}
        for role, col in columns.items():
            value = row.get(col, "")
            if not value and role in optional:
                continue
            if not value:
                raise InputError(f"{csv_path}: row {n} has no {col}")
            inputs[role] = str((csv_path.parent / value).resolve())
        name = sanitise_case_name(row.get("case") or f"case{n:03d}", n)
        if name.lower() in seen:
            raise InputError(f"{csv_path}: case name {name!r} of row {n} is used by row {seen[name.lower()]} "
                             "(names are compared after removing characters unsafe in folder names)")
        seen[name.lower()] = n
        cases.append(Case(name, inputs, n))
    if not cases:
        raise InputError(f"{csv_path}: no cases")
    return cases


def parse_shard(text: Optional[str]) -> Optional[tuple]:
    """'i/n' -> (i, n) with 0 <= i < n (a Slurm array's $SLURM_ARRAY_TASK_ID/N)."""
    if not text:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m or int(m.group(2)) < 1 or int(m.group(1)) >= int(m.group(2)):
        raise InputError(f"--shard must be i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return int(m.group(1)), int(m.group(2))


def select_shard(cases: list, shard: Optional[tuple]) -> list:
    if shard is None:
        return list(cases)
    i, n = shard
    return [c for k, c in enumerate(cases) if k % n == i]


# --- checksums and manifests ------------------------------------------------------------------
def file_sha256(path: "str | Path") -> str:
    """SHA-256 of a file, or of a folder's files (names and contents, sorted)."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(os.fsencode(p.relative_to(path)))
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def _inputs_digest(case: Case) -> dict:
    # only regular files and folders: opening a pipe would block
    return {role: file_sha256(p) for role, p in case.inputs.items() if p and (Path(p).is_file() or Path(p).is_dir())}


def finished(case: Case, case_dir: Path, settings: dict) -> Optional[dict]:
    """The manifest of a case finished earlier with the same inputs and settings, when every
    output still matches its checksum; else None."""
    try:
        manifest = json.loads((case_dir / MANIFEST).read_text(encoding="utf-8"))
        if manifest.get("settings") != json.loads(json.dumps(settings)):
            return None
        if manifest.get("inputs") != _inputs_digest(case):
            return None
        for rel, digest in manifest["outputs"].items():
            if file_sha256(case_dir / rel) != digest:
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class CaseJob(Protocol):
    """What the runner runs per case: ``settings`` (a JSON-able dict, part of the manifest) and
    ``__call__(case, out_dir) -> info dict`` writing the case's files into ``out_dir``
    (``info["message"]`` becomes the summary's message). Raise SAMv2Error to refuse a case."""

    settings: dict

    def __call__(self, case: Case, out_dir: Path) -> dict: ...


def run_case(case: Case, out_root: "str | Path", job: CaseJob, attempt: int = 1) -> CaseOutcome:
    """Run one case all-or-nothing (see the module doc); never raises for a case failure."""
    out_root = Path(out_root)
    final = out_root / case.name
    t0 = time.monotonic()
    done = finished(case, final, job.settings)
    if done is not None:
        return CaseOutcome(case.name, "skipped", "finished earlier (outputs verified)", 0.0, attempt,
                           sorted(done["outputs"]), done.get("info", {}))
    attempt += _remove_earlier_attempts(out_root, case.name)
    stage = out_root / f".partial-{os.getpid()}@{_HOST}-{uuid.uuid4().hex[:8]}-{case.name}"
    try:
        stage.mkdir(parents=True)
        missing = [p for p in case.inputs.values() if p and not Path(p).exists()]
        if missing:
            raise InputError(f"{missing[0]}: no such file or folder")
        for p in case.inputs.values():  # a pipe would block the checksum and the reader forever
            if p:
                check_regular_file(p, "case input", folder_ok=True)
        inputs = _inputs_digest(case)
        info = dict(job(case, stage) or {})
        after = _inputs_digest(case)
        if after != inputs:
            raise SAMv2Error("an input file changed while the case ran; outputs discarded")
        outputs = {str(p.relative_to(stage)): file_sha256(p) for p in sorted(stage.rglob("*")) if p.is_file()}
        manifest = {"case": case.name, "settings": job.settings, "inputs": inputs, "outputs": outputs,
                    "info": info, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        write_text_atomic(stage / MANIFEST, json.dumps(manifest, indent=2, default=str))
        if final.exists():  # an older, unverifiable result: replaced as a whole
            old = out_root / f".old-{os.getpid()}-{uuid.uuid4().hex[:8]}-{case.name}"
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(stage, final)
        return CaseOutcome(case.name, "ok", str(info.get("message", "")), time.monotonic() - t0, attempt,
                           sorted(outputs), info)
    except SAMv2Error as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    except OSError as exc:
        message = os_error_message(exc)
    except MemoryError:
        message = "out of memory"
    except Exception as exc:  # an unexpected failure of one case must not stop the cohort
        message = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (unexpected; details above)"
        traceback.print_exc(file=sys.stderr)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
    return CaseOutcome(case.name, "failed", message, time.monotonic() - t0, attempt)


_HOST = re.sub(r"[^A-Za-z0-9_]", "_", socket.gethostname())[:40] or "host"
_STAGE = re.compile(r"^\.partial-(\d+)@(\w+)-[0-9a-f]{8}-(.+)$")
STALE_ELSEWHERE_S = 24 * 3600  # another host's staging folder: only removed when this old


def _remove_stale(out_root: Path, case_name: Optional[str] = None) -> int:
    """Remove staging folders left by killed processes (of one case, or all); returns how
    many. On this host a folder whose process is gone is stale; a folder of another host
    (shared file system: job arrays, Dask workers elsewhere) only after a day untouched."""
    n = 0
    for p in out_root.glob(".partial-*"):
        m = _STAGE.match(p.name)
        if not m or not p.is_dir() or (case_name is not None and m.group(3) != case_name):
            continue
        if m.group(2) == _HOST:
            stale = not pid_alive(int(m.group(1)))
        else:
            try:
                stale = time.time() - p.stat().st_mtime > STALE_ELSEWHERE_S
            except OSError:
                stale = False
        if stale:
            shutil.rmtree(p, ignore_errors=True)
            n += 1
    return n


def _remove_earlier_attempts(out_root: Path, case_name: str) -> int:
    """Earlier attempts at this case whose worker died mid-case (their staging folders)."""
    return _remove_stale(out_root, case_name)



def check_inputs_outside(cases: list, out_root: Path) -> None:
    """Refuse a cohort whose outputs would replace an input: a case folder (replaced as a
    whole when the case is redone) or a summary file holding an input."""
    root = Path(os.path.realpath(out_root))
    folders = {root / c.name: c.name for c in cases}
    for case in cases:
        for p in case.inputs.values():
            if not p:
                continue
            q = Path(os.path.realpath(p))
            hit = next((f for f in (q, *q.parents) if f in folders), None)
            if hit is not None:
                raise InputError(f"{p}: input of case {case.name} lies in the output folder {hit}, "
                                 "which the run replaces; choose another --output")
            if q.parent == root and q.name.startswith("summary"):
                raise InputError(f"{p}: input of case {case.name} would be overwritten by the summary")


def _task(case: Case, out_root: str, job: CaseJob) -> CaseOutcome:
    """The Dask task: one case in a worker process."""
    return run_case(case, out_root, job)


# --- running a cohort -------------------------------------------------------------------------
Report = Callable[[CaseOutcome], None]


def print_outcome(outcome: CaseOutcome) -> None:
    if outcome.status == "failed":
        print(f"[FAILED] {outcome.case}: {outcome.message}", file=sys.stderr, flush=True)
    else:
        extra = f": {outcome.message}" if outcome.message else ""
        print(f"[{outcome.status}] {outcome.case}{extra} ({outcome.seconds:.1f} s)", flush=True)


def run_cohort(cases: list, out_root: "str | Path", job: CaseJob, workers: int = 0,
               scheduler: Optional[str] = None, shard: Optional[tuple] = None,
               report: Report = print_outcome, retries: int = 0) -> CohortSummary:
    """Run ``job`` over ``cases`` (see the module doc) and write the summary CSV.

    ``workers=0`` and no ``scheduler``: in this process, one case after another.
    ``retries``: Dask resubmissions of a task that raised (a case failure does not raise;
    a dead worker is resubmitted by the scheduler regardless)."""
    out_root = Path(out_root)
    check_writable(out_root, folder=True)
    check_inputs_outside(cases, out_root)
    out_root.mkdir(parents=True, exist_ok=True)
    _remove_stale(out_root)
    selected = select_shard(cases, shard)
    if scheduler or workers > 0:
        outcomes = _run_dask(selected, out_root, job, workers, scheduler, report, retries)
    else:
        outcomes = []
        for case in selected:
            outcome = run_case(case, out_root, job)
            report(outcome)
            outcomes.append(outcome)
    order = {c.name: n for n, c in enumerate(selected)}
    outcomes.sort(key=lambda o: order.get(o.case, 0))
    name = "summary.csv" if shard is None else f"summary.shard-{shard[0]}-of-{shard[1]}.csv"
    summary_path = out_root / name

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, SUMMARY_FIELDS)
            w.writeheader()
            w.writerows(o.row() for o in outcomes)

    atomic_write(summary_path, write)
    return CohortSummary(outcomes, summary_path)


def _run_dask(cases: list, out_root: Path, job: CaseJob, workers: int, scheduler: Optional[str],
              report: Report, retries: int) -> list:
    try:
        from distributed import Client, LocalCluster, as_completed  # noqa: PLC0415 - optional ('cohort' extra)
    except ImportError:
        raise InputError("running cases on Dask needs dask.distributed: pip install 'samv2core[cohort]' "
                         "(or use --workers 0)") from None

    cluster = None
    try:
        if scheduler:
            try:
                client = Client(scheduler, timeout="20s")
            except (OSError, TimeoutError) as exc:
                raise InputError(f"cannot reach the Dask scheduler {scheduler}: {str(exc).splitlines()[0]}") from None
        else:
            cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.CRITICAL)
            client = Client(cluster)
        outcomes = []
        with client:
            futures = {client.submit(_task, case, str(out_root), job, key=f"samv2-case-{case.name}-{uuid.uuid4().hex[:6]}",
                                     pure=False, retries=retries): case for case in cases}
            for future in as_completed(futures):
                case = futures[future]
                try:
                    outcome = future.result()
                except Exception as exc:  # e.g. KilledWorker: the case's worker died too often
                    outcome = CaseOutcome(case.name, "failed", f"{type(exc).__name__}: "
                                          f"{str(exc).splitlines()[0][:200] if str(exc) else 'worker lost'}")
                report(outcome)
                outcomes.append(outcome)
        return outcomes
    finally:
        if cluster is not None:
            cluster.close()
