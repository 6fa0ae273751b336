"""Cohort runner timings: the same cases in-process, on a Dask LocalCluster of 1 and 2 workers,
and a rerun where every case is verified and skipped. Prints a table.

Cases: crops (96 x 96 x 24 voxels) of the bundled pyradiomics lung CT (PyPI origin) with
SIMULATED follow-ups (known rigid motion, smooth deformation, noise), 3 points each, matched
with the bundled model and samv2 batch's default method. Absolute times depend on the machine's load; compare
the rows of one run.

    python Testing/Benchmarks/benchmark_cohort.py [--cases 6]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from bench_table import print_machine_load


def make_cases(root: Path, n: int) -> Path:
    from samv2core.bundled_samples import load_sample
    from samv2core.simulate import simulate_followup
    from samv2core.volume import Volume

    ct = load_sample("lung1_ct")
    rows = ["case,template,query,points"]
    rng = np.random.default_rng(0)
    for k in range(n):
        z0, y0, x0 = (int(rng.integers(0, max(1, s - w))) for s, w in zip(ct.array.shape, (24, 96, 96)))
        crop = Volume(ct.array[z0:z0 + 24, y0:y0 + 96, x0:x0 + 96], ct.spacing, tuple(ct.index_to_lps([x0, y0, z0])),
                      ct.direction, "CT", f"crop{k}")
        sitk.WriteImage(crop.to_sitk(), str(root / f"t{k}.nrrd"), True)
        sitk.WriteImage(simulate_followup(crop, seed=k).followup.to_sitk(), str(root / f"q{k}.nrrd"), True)
        c = crop.index_to_lps((np.asarray(crop.size_xyz) - 1) / 2)
        pts = [c, c + [10.0, -8.0, 6.0], c - [12.0, 6.0, 4.0]]
        (root / f"p{k}.csv").write_text("x,y,z\n" + "".join("%f,%f,%f\n" % tuple(p) for p in pts))
        rows.append(f"case{k},t{k}.nrrd,q{k}.nrrd,p{k}.csv")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    return root / "cases.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=6)
    args = ap.parse_args()
    print_machine_load()
    from samv2core.batch import ROLES, MatchCaseJob
    from samv2core.cohort import read_cases, run_cohort

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cases = read_cases(make_cases(root, args.cases), ROLES)
        rows = []
        for label, workers, threads in (("in-process, 2 threads", 0, 2), ("LocalCluster, 1 worker x 2 threads", 1, 2),
                                        ("LocalCluster, 2 workers x 1 thread", 2, 1)):
            job = MatchCaseJob(device="cpu", threads=threads)
            out = root / f"out{workers}"
            t0 = time.perf_counter()
            s = run_cohort(cases, out, job, workers=workers, report=lambda o: None)
            wall = time.perf_counter() - t0
            per_case = [o.seconds for o in s.outcomes]
            t0 = time.perf_counter()
            again = run_cohort(cases, out, job, workers=0, report=lambda o: None)
            rerun = time.perf_counter() - t0
            assert all(o.status == "ok" for o in s.outcomes) and all(o.status == "skipped" for o in again.outcomes)
            rows.append((label, wall, float(np.median(per_case)), max(per_case), rerun))
    print(f"{args.cases} cases, {os.cpu_count()} CPU cores (simulated follow-ups)")
    print("| runner | wall s | case s (median) | case s (max) | rerun, all skipped s |")
    print("|---|---|---|---|---|")
    for label, wall, med, worst, rerun in rows:
        print(f"| {label} | {wall:.1f} | {med:.1f} | {worst:.1f} | {rerun:.2f} |")


if __name__ == "__main__":
    main()
