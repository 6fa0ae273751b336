"""Click latency of the Slicer module's worker process (issue 11), in plain Python.

Run:  python Testing/Benchmarks/benchmark_worker.py [--model PATH] [--clicks N] [--threads T]

Drives the same worker the Slicer GUI uses (SAMv2SlicerLib.worker -> SAMv2SlicerLib.server,
JSON lines on stdin/stdout, volumes as files) and measures, per volume pair:

* worker start (process up and answering), background embedding of both volumes (the first
  one includes the model load);
* a click after both volumes are embedded: one point matched, from submit to the decoded
  result in the client (what the GUI's QTimer would see, minus its 100 ms poll period);
* the same matching in-process (samv2core session + steps, no protocol) as the peer, click
  by click in alternation, so both see the same load; per matching method.

Follow-ups are SIMULATED from real CTs (samv2core.simulate: known rigid motion + smooth
deformation + noise): no real follow-up pairs exist in the data. The target is a click
<= 300 ms. Timings are wall-clock on this (shared) machine; compare the worker and the
in-process columns of one run rather than absolute numbers.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for repo_paths
from bench_table import print_machine_load, spread
from repo_paths import REPO, SHARED

sys.path.insert(0, str(REPO / "SAMv2Slicer"))
CASES = {
    "lung CT 512x512x48 (bundled lung1)": None,
    "chest-abdomen CT 122x101x112 @ 3 mm (totalseg_example)": "ct/totalseg_example/ct_3mm.nii.gz",
    "chest CT 120x126x164 @ 1.5 mm (totalseg_aorta)": "ct/totalseg_aorta/ct_1.5mm.nii.gz",
}
TARGET_MS = 300.0


def load_case(rel):
    from samv2core.bundled_samples import load_sample
    from samv2core.volume import load_volume

    if rel is None:
        return load_sample("lung1_ct")
    path = SHARED / rel
    return load_volume(path, "CT") if path.exists() else None


def click_points(volume, n, seed=0):
    """Random points inside the body (> -500 HU), away from the border."""
    rng = np.random.default_rng(seed)
    body = np.argwhere(volume.array > -500)
    size = np.asarray(volume.array.shape)
    body = body[np.all((body > 0.1 * size) & (body < 0.9 * size), axis=1)]
    pick = body[rng.choice(len(body), n, replace=False)]
    return volume.index_to_lps(pick[:, ::-1].astype(float))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="weights file (default: the bundled model)")
    parser.add_argument("--clicks", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for torch in both peers")
    parser.add_argument("--methods", default="refined,fixed_point,nn", help="matching methods to time (comma-separated)")
    args = parser.parse_args(argv)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    print_machine_load()
    from samv2core.session import EmbeddingSession
    from samv2core.simulate import simulate_followup
    from SAMv2SlicerLib import ops, protocol, steps
    from SAMv2SlicerLib.worker import TaskState, WorkerProcess

    def volume_ref(volume, name):  # what the module's logic exports: a file in the private folder
        path = worker.volume_folder / f"{name}.nrrd"
        protocol.write_image(volume.to_sitk(), path)
        return ops.VolumeRef(str(path), volume.modality.value, name)

    rows = []
    t0 = time.perf_counter()
    worker = WorkerProcess(env={"OMP_NUM_THREADS": str(args.threads)})
    worker.set_model(args.model, "cpu")
    try:
        worker.run("ping", timeout=600)  # process start (the model loads with the first embedding)
        start_s = time.perf_counter() - t0
        for name, rel in CASES.items():
            base = load_case(rel)
            if base is None:
                print(f"skipped {name}: {SHARED / rel} not available")
                continue
            follow = simulate_followup(base, seed=11).followup  # SIMULATED follow-up (known transform)
            refs = (volume_ref(base, f"base-{len(rows)}"), volume_ref(follow, f"follow-{len(rows)}"))
            t = time.perf_counter()
            embed = worker.submit(ops.EmbedRequest(refs))
            progress_events = set()
            while not embed.finished:
                worker.poll()
                progress_events.add(embed.progress.fraction)
                time.sleep(0.01)
            if embed.state != TaskState.DONE:
                raise RuntimeError(f"{name}: embedding failed: {embed.error_message}")
            embed_s = time.perf_counter() - t
            pts = click_points(base, args.clicks)
            # the peer: the same steps in this process, embeddings already computed
            session = EmbeddingSession.open(args.model, "cpu", cache_size=4)
            steps.embed_volumes(session, [base, follow])
            for method in args.methods.split(","):
                worker_ms, inproc_ms = [], []
                for p in pts:
                    t = time.perf_counter()
                    res = worker.run(ops.MatchRequest(refs[0], refs[1], p[None], method), timeout=120)
                    worker_ms.append(1000 * (time.perf_counter() - t))
                    assert len(res) == 1
                    t = time.perf_counter()
                    steps.match(session, base, follow, p[None], method)
                    inproc_ms.append(1000 * (time.perf_counter() - t))
                rows.append((name, method, embed_s, len(progress_events), worker_ms, inproc_ms))
    finally:
        worker.close()

    print(f"\nworker start: {start_s:.2f} s  (threads={args.threads}, {args.clicks} clicks per pair "
          "and method; follow-ups SIMULATED from real CTs)\n")
    head = ("pair", "method", "embed both + pair precompute (s)", "progress events", "click via worker ms: min/median/p90/max",
            f"> {TARGET_MS:.0f} ms", "in-process ms: median/max", "protocol overhead ms (median)",
            "worker/in-process (median)")
    print(" | ".join(head))
    print(" | ".join("---" for _ in head))
    for name, method, embed_s, n_prog, wms, ims in rows:
        w, i = spread(wms), spread(ims)
        print(f"{name} | {method} | {embed_s:.1f} | {n_prog} | {w[0]:.0f}/{w[1]:.0f}/{w[2]:.0f}/{w[3]:.0f} | "
              f"{sum(m > TARGET_MS for m in wms)}/{len(wms)} | {i[1]:.0f}/{i[3]:.0f} | {w[1] - i[1]:.0f} | "
              f"{w[1] / i[1]:.2f}")
    for method in args.methods.split(","):
        worst = max(max(r[4]) for r in rows if r[1] == method)
        print(f"worst click through the worker, {method}: {worst:.0f} ms (target <= {TARGET_MS:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
