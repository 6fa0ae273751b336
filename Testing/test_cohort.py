"""The cohort runner (samv2core.cohort) behind ``samv2 batch`` and the Slicer batch script:
a run killed half-way resumes (finished cases verified and skipped), one failing case never
stops the others, case names cannot escape the output folder, job-array shards, and cases on a
Dask LocalCluster of 2 workers, one of which is killed mid-case.

Cases are 64 x 64 x 16 crops of the bundled pyradiomics lung CT (PyPI origin) with SIMULATED
follow-ups; the model is the untrained lite network saved as a model file (the tests check the
runner, not matching accuracy).
"""
from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samv2core.batch import ROLES, MatchCaseJob
from samv2core.cohort import read_cases, run_cohort, sanitise_case_name


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    import torch

    from samv2core.model_io import ModelCard, save_model
    from samv2core.network import NetConfig, build_network
    from samv2core.bundled_samples import load_sample
    from samv2core.simulate import simulate_followup
    from samv2core.volume import Volume

    root = tmp_path_factory.mktemp("cohort")
    ct = load_sample("lung1_ct")
    centres = []
    for n, (k0, j0, i0) in enumerate([(16, 40, 40), (12, 30, 50), (18, 50, 30), (14, 36, 44)]):
        crop = Volume(ct.array[k0:k0 + 16, j0:j0 + 64, i0:i0 + 64], ct.spacing,
                      tuple(ct.index_to_lps([i0, j0, k0])), ct.direction, "CT", f"crop{n}")
        sitk.WriteImage(crop.to_sitk(), str(root / f"t{n}.nrrd"), True)
        sitk.WriteImage(simulate_followup(crop, seed=n).followup.to_sitk(), str(root / f"q{n}.nrrd"), True)
        c = crop.index_to_lps((np.asarray(crop.size_xyz) - 1) / 2)
        (root / f"p{n}.csv").write_text("x,y,z,label\n%f,%f,%f,A\n%f,%f,%f,B\n" % (*c, *(c + [8.0, -6.0, 4.0])))
        centres.append(c)
    (root / "far.csv").write_text("x,y,z,label\n9000,0,0,far\n")
    torch.manual_seed(0)
    model = save_model(build_network(NetConfig.lite()), ModelCard(name="lite-untrained-test", architecture={},
                                                                   heads=[]), root / "lite.safetensors")
    return {"root": root, "model": model}


def _csv(root: Path, name: str, rows) -> Path:
    p = root / name
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["case", "template", "query", "points"])
        w.writerows(rows)
    return p


def _summary(path: Path) -> dict:
    return {r["case"]: r for r in csv.DictReader(open(path))}


def _job(cohort, **kw) -> MatchCaseJob:
    return MatchCaseJob(model=str(cohort["model"]), model_id="lite-test", device="cpu", precision="fp32",
                        method="nn", threads=1, **kw)


def test_case_names_are_sanitised():
    assert sanitise_case_name("../x", 1) == "x"
    assert sanitise_case_name("/etc/passwd", 2) == "etc_passwd"
    assert sanitise_case_name("..", 3) == "case003"
    assert sanitise_case_name("pat 1 (follow-up)", 4) == "pat_1_follow-up"


def test_killed_cohort_resumes_and_failures_do_not_stop_others(cohort, tmp_path):
    """A real kill -9 of ``samv2 batch`` in the middle of its second case (seen by its staging
    folder; a named pipe no longer blocks a case, it fails it at once), then a restart: the
    finished case is verified and skipped, the rest run, the failing case is reported with its
    reason, and nothing lands outside --output."""
    root = cohort["root"]
    fifo = tmp_path / "slow_points.csv"
    fifo.write_text((root / "p1.csv").read_text())
    cases = _csv(tmp_path, "cases.csv", [("first", root / "t0.nrrd", root / "q0.nrrd", root / "p0.csv"),
                                         ("../second", root / "t1.nrrd", root / "q1.nrrd", fifo),
                                         ("bad", root / "t2.nrrd", root / "q2.nrrd", root / "far.csv"),
                                         ("fourth", root / "t3.nrrd", root / "q3.nrrd", root / "p3.csv")])
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "samv2core.cli", "batch", str(cases), "-o", str(out), "--workers", "0",
           "--model", str(cohort["model"]), "--device", "cpu", "--precision", "fp32", "--method", "nn",
           "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "first" / "manifest.json").exists() or not list(out.glob(".partial-*-second")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.01)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".partial-")) == ["first"]
    first_manifest = (out / "first" / "manifest.json").read_text()

    from samv2core.cli import main

    assert main(cmd[3:]) == 1  # the bad case fails, the others are done
    summary = _summary(out / "summary.csv")
    assert [summary[c]["status"] for c in ("first", "second", "bad", "fourth")] == ["skipped", "ok", "failed", "ok"]
    assert "outside the template" in summary["bad"]["message"]
    assert (out / "first" / "manifest.json").read_text() == first_manifest
    assert sorted(p.name for p in out.iterdir()) == ["first", "fourth", "second", "summary.csv"]  # no leftovers
    assert not (tmp_path / "x").exists() and not (tmp_path / "second").exists()
    manifest = json.loads((out / "second" / "manifest.json").read_text())
    assert set(manifest["outputs"]) == {"matches.json", "matched.mrk.json", "matched.csv"}
    doc = json.loads((out / "second" / "matches.json").read_text())
    assert [m["label"] for m in doc["matches"]] == ["A", "B"]

    # a finished case whose output was damaged is redone, not trusted
    (out / "fourth" / "matched.csv").write_text("damaged")
    assert main(cmd[3:]) == 1
    summary = _summary(out / "summary.csv")
    assert summary["fourth"]["status"] == "ok" and summary["first"]["status"] == "skipped"
    assert "damaged" not in (out / "fourth" / "matched.csv").read_text()


def test_shards_split_a_cohort(cohort, tmp_path):
    root = cohort["root"]
    cases = read_cases(_csv(tmp_path, "c.csv", [(f"c{n}", root / f"t{n}.nrrd", root / f"q{n}.nrrd",
                                                   root / f"p{n}.csv") for n in range(3)]), ROLES)
    seen = []
    for i in range(2):
        s = run_cohort(cases, tmp_path / "out", _job(cohort), shard=(i, 2), report=lambda o: None)
        assert s.summary_path.name == f"summary.shard-{i}-of-2.csv" and s.exit_code == 0
        seen += [o.case for o in s.outcomes]
    assert sorted(seen) == ["c0", "c1", "c2"]
    # the whole cohort afterwards: everything verified and skipped, one summary
    s = run_cohort(cases, tmp_path / "out", _job(cohort), report=lambda o: None)
    assert [o.status for o in s.outcomes] == ["skipped"] * 3


@dataclass(frozen=True)
class KillWorkerOnce:
    """Test job: the first attempt at ``victim`` kills its own Dask worker process mid-case
    (after writing part of its output); every other call is the real match job."""

    inner: MatchCaseJob
    victim: str
    flag: str

    @property
    def settings(self) -> dict:
        return self.inner.settings

    def __call__(self, case, out_dir: Path) -> dict:
        if case.name == self.victim and not Path(self.flag).exists():
            Path(self.flag).write_text(str(os.getpid()))
            (out_dir / "matches.json").write_text("{half")
            os.kill(os.getpid(), signal.SIGKILL)
        info = self.inner(case, out_dir)
        info["pid"] = os.getpid()
        return info


def test_dask_local_cluster_of_two_workers_survives_a_killed_worker(cohort, tmp_path):
    pytest.importorskip("distributed", reason="dask.distributed is not installed")
    root = cohort["root"]
    cases = read_cases(_csv(tmp_path, "c.csv", [(f"case{n}", root / f"t{n}.nrrd", root / f"q{n}.nrrd",
                                                   root / f"p{n}.csv") for n in range(4)]), ROLES)
    flag = tmp_path / "killed.txt"
    job = KillWorkerOnce(_job(cohort), "case1", str(flag))
    s = run_cohort(cases, tmp_path / "out", job, workers=2, report=lambda o: None)
    assert [o.status for o in s.outcomes] == ["ok"] * 4, [o.message for o in s.outcomes]
    killed_pid = int(flag.read_text())
    victim = next(o for o in s.outcomes if o.case == "case1")
    assert victim.attempts == 2 and victim.info["pid"] != killed_pid  # resubmitted to a live worker
    assert len({o.info["pid"] for o in s.outcomes}) >= 2  # the cases were spread over processes
    assert os.getpid() not in {o.info["pid"] for o in s.outcomes}
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == ["case0", "case1", "case2", "case3", "summary.csv"]
    assert json.loads((out / "case1" / "matches.json").read_text())["case"] == "case1"
