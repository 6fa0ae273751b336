"""GPU (and CPU) benchmark: one script, one table for the device it is given.

    python Testing/Benchmarks/benchmark_gpu.py --device cuda        # on a GPU machine
    python Testing/Benchmarks/benchmark_gpu.py --device cpu --quick # the CPU baseline / smoke test

Rows (each measured in a fresh child process, so peak memory and first-use costs are its own):
  embed     lite (bundled weights) and full (reference ResNet-18 width, random weights: the
            time does not depend on the weights) network over a CT built by resampling the
            bundled lung CT onto a 512x512x300 grid at 0.7x0.7x1.0 mm, in fp32 / bf16 / fp16;
  pair      time to the first refined answer for a new pair (imports, model load, both
            embeddings, the pair's precompute, one click) on a 512x512x60 CT at 0.6x0.6x4 mm and
            a simulated follow-up, and the median time of a further click;
  register  affine + deformable registration of that pair;
  train     training steps per second of the lite network with the batch and patch given.

Times are wall-clock seconds after CUDA synchronisation; peak memory is the CUDA allocator's
peak on a GPU and the child process's peak resident memory on a CPU. The device name and the
torch / CUDA versions head the table. Every pair here is SIMULATED from a real scan.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # Testing/ (repo_paths)
sys.path.insert(0, str(HERE))  # bench_table
from bench_table import fitted_table, print_machine_load  # noqa: E402
from repo_paths import REPO  # noqa: E402

PRECISIONS = ("fp32", "bf16", "fp16")


# --- the measurements (run in a child process) ---------------------------------------------------
def _sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_bytes(device) -> int:
    import torch
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: kB


def _ct(size_xyz: tuple[int, int, int], spacing_xyz: tuple[float, float, float]):
    """The bundled lung CT resampled onto a ``size_xyz`` grid of ``spacing_xyz`` mm, centred on
    it (air beyond its box). The network runs on a 2 mm grid, so its cost follows the physical
    extent: the spacing makes the grid the size of a real scan, not just its voxel count."""
    import numpy as np
    import SimpleITK as sitk
    from samv2core.bundled_samples import load_sample
    from samv2core.volume import Volume

    img = load_sample("lung1_ct").to_sitk()
    centre = np.asarray(img.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in img.GetSize()]))
    direction = np.asarray(img.GetDirection()).reshape(3, 3)
    half = (np.asarray(size_xyz, float) - 1) / 2 * np.asarray(spacing_xyz)
    ref = sitk.Image([int(n) for n in size_xyz], sitk.sitkFloat32)
    ref.SetSpacing(tuple(float(v) for v in spacing_xyz))
    ref.SetOrigin(tuple(centre - direction @ half))
    ref.SetDirection(img.GetDirection())
    out = sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, -1024.0, sitk.sitkFloat32)
    return Volume.from_sitk(out, "CT", name=f"lung1_ct_{'x'.join(map(str, size_xyz))}")


EMBED_SPACING = (0.7, 0.7, 1.0)  # 512x512x300 -> 358x358x300 mm, a chest-abdomen CT
PAIR_SPACING = (0.6, 0.6, 4.0)  # 512x512x60 -> 307x307x240 mm, a chest CT


def row_embed(device_name: str, net: str, precision: str, size_xyz) -> dict:
    import torch
    from samv2core.device import select_device
    from samv2core.embed import Embedder
    from samv2core.models import resolve_model
    from samv2core.network import NetConfig, build_network

    device = select_device(device_name)
    volume = _ct(size_xyz, EMBED_SPACING)
    model = resolve_model(None).model if net == "lite" else build_network(NetConfig.full())
    embedder = Embedder(model, device=device, precision=precision, model_id=f"bench-{net}")
    embedder.embed(volume)  # warm-up: kernels chosen, memory pools filled
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    emb = embedder.embed(volume)
    _sync(device)
    seconds = time.perf_counter() - t0
    return {"row": f"embed {net} {precision}", "seconds": seconds, "peak_bytes": _peak_bytes(device),
            "detail": f"{'x'.join(map(str, size_xyz))} CT at {'x'.join(map(str, EMBED_SPACING))} mm, "
                      f"{emb.meta['slabs']} slab(s)"}


def _pair(size_xyz, seed: int = 0):
    from samv2core.simulate import body_points, simulate_hard_followup
    base = _ct(size_xyz, PAIR_SPACING)
    sim = simulate_hard_followup(base, seed=seed)
    points = body_points(base, 11, seed=seed)
    return base, sim, points


def row_pair(device_name: str, size_xyz) -> dict:
    t_start = time.perf_counter()
    import torch  # noqa: F401 - the import is part of the first answer's cost
    from samv2core.matching import match_points
    from samv2core.session import EmbeddingSession
    t_import = time.perf_counter() - t_start
    base, sim, points = _pair(size_xyz)  # data preparation: not part of the timing
    t0 = time.perf_counter()
    session = EmbeddingSession.open(device=device_name)
    device = session.descriptors.device
    t_load = time.perf_counter() - t0
    e_base = session.embed(base)
    e_follow = session.embed(sim.followup)
    _sync(device)
    t_embed = time.perf_counter() - t0 - t_load
    first = match_points(e_base, e_follow, points[:1], method="refined")
    _sync(device)
    t_first = time.perf_counter() - t0
    clicks = []
    for p in points[1:]:
        c0 = time.perf_counter()
        match_points(e_base, e_follow, p[None], method="refined")
        _sync(device)
        clicks.append(time.perf_counter() - c0)
    err = float(((first[0].query_point.to("LPS").as_array() - sim.map_points(points[:1])[0]) ** 2).sum() ** 0.5)
    return {"row": "pair: first refined answer", "seconds": t_import + t_first, "peak_bytes": _peak_bytes(device),
            "detail": f"torch+core import {t_import:.1f} s, model load {t_load:.1f} s, two embeddings {t_embed:.1f} s, "
                      f"precompute + click {t_first - t_load - t_embed:.1f} s; first point {err:.1f} mm off",
            "click_ms": 1000 * statistics.median(clicks)}


def row_register(device_name: str, size_xyz) -> dict:
    from samv2core.registration import register
    from samv2core.session import EmbeddingSession
    base, sim, _points = _pair(size_xyz)
    session = EmbeddingSession.open(device=device_name)
    device = session.descriptors.device
    session.embed(base)
    session.embed(sim.followup)
    _sync(device)
    t0 = time.perf_counter()
    result = register(base, sim.followup, mode="affine", deformable=True, embedder=session)
    _sync(device)
    return {"row": "register affine + deformable", "seconds": time.perf_counter() - t0,
            "peak_bytes": _peak_bytes(device), "detail": f"embeddings ready; {type(result).__name__}"}


def row_train(device_name: str, batch: int, patch_zyx, steps: int) -> dict:
    from samv2train.config import config_from_dict
    from samv2train.trainer import Trainer
    with tempfile.TemporaryDirectory() as tmp:
        volume = str(REPO / "SAMv2Core" / "samv2core" / "data" / "lung1_ct.nrrd")
        cfg = config_from_dict({
            "run": {"name": "bench", "output_dir": tmp, "iterations": steps + 2, "checkpoint_every": 10 ** 6,
                    "validate_every": 0, "seed": 0},
            "data": {"patch_size": list(patch_zyx), "batch_size": batch,
                     "volumes": [{"path": volume, "modality": "CT"}]},
            "runtime": {"device": device_name, "progress": False, "bf16": device_name != "cpu"},
        })
        trainer = Trainer(cfg, log=lambda msg: None)
        for _ in range(2):  # warm-up
            trainer.train_step()
        _sync(trainer.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        _sync(trainer.device)
        seconds = time.perf_counter() - t0
        return {"row": "train lite", "seconds": seconds / steps, "peak_bytes": _peak_bytes(trainer.device),
                "detail": f"{steps / seconds:.2f} steps/s, batch {batch}, patch {'x'.join(map(str, patch_zyx))}"}


def child(args) -> None:
    size = tuple(args.size)
    pair_size = tuple(args.pair_size)
    kind, *rest = args.child.split(":")
    if kind == "embed":
        out = row_embed(args.device, rest[0], rest[1], size)
    elif kind == "pair":
        out = row_pair(args.device, pair_size)
    elif kind == "register":
        out = row_register(args.device, pair_size)
    else:
        out = row_train(args.device, args.batch, tuple(args.patch), args.train_steps)
    print("BENCH " + json.dumps(out), flush=True)


# --- the table (parent process) -----------------------------------------------------------------
def header(device_name: str) -> str:
    import torch
    from samv2core.device import select_device
    device = select_device(device_name)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        cuda = torch.version.cuda
    else:
        name = f"CPU ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"
        cuda = "-"
    return f"device: {name} | torch {torch.__version__} | CUDA {cuda}"


def run_child(args, spec: str) -> dict:
    cmd = [sys.executable, __file__, "--child", spec, "--device", args.device,
           "--size", *map(str, args.size), "--pair-size", *map(str, args.pair_size),
           "--batch", str(args.batch), "--patch", *map(str, args.patch), "--train-steps", str(args.train_steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            return json.loads(line[6:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"row": spec, "error": tail}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    ap.add_argument("--quick", action="store_true",
                    help="CPU smoke test: a 256x256x80 embed CT, lite fp32 and full fp32 only, 3 train steps")
    ap.add_argument("--rows", default="embed,pair,register,train", help="comma-separated subset")
    ap.add_argument("--size", type=int, nargs=3, default=None, metavar=("X", "Y", "Z"),
                    help="embedding CT grid (default 512 512 300)")
    ap.add_argument("--pair-size", type=int, nargs=3, default=[512, 512, 60], metavar=("X", "Y", "Z"))
    ap.add_argument("--precisions", default=None, help="comma-separated of fp32,bf16,fp16")
    ap.add_argument("--nets", default="lite,full", help="comma-separated of lite,full")
    ap.add_argument("--batch", type=int, default=None, help="training batch (default: 4 on CUDA, 1 on CPU)")
    ap.add_argument("--patch", type=int, nargs=3, default=None, metavar=("Z", "Y", "X"),
                    help="training patch (default 32 96 96 on CUDA, 16 64 64 on CPU)")
    ap.add_argument("--train-steps", type=int, default=None)
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per row")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    on_cpu = args.device == "cpu" or (args.device == "auto" and not _cuda_present())
    args.size = args.size or ([256, 256, 80] if args.quick else [512, 512, 300])
    args.batch = args.batch or (1 if on_cpu else 4)
    args.patch = args.patch or ([16, 64, 64] if on_cpu else [32, 96, 96])
    args.train_steps = args.train_steps or (3 if on_cpu else 20)
    if args.child:
        child(args)
        return 0
    precisions = (args.precisions or ("fp32" if args.quick else ",".join(PRECISIONS))).split(",")
    specs = []
    rows = args.rows.split(",")
    if "embed" in rows:
        specs += [f"embed:{net}:{p}" for net in args.nets.split(",") for p in precisions]
    specs += [r for r in ("pair", "register", "train") if r in rows]
    print(header(args.device), flush=True)
    print_machine_load()
    results, table = [], []
    for spec in specs:
        print(f"benchmark_gpu: {spec} ...", file=sys.stderr, flush=True)
        r = run_child(args, spec)
        results.append(r)
        if "error" in r:
            table.append([r["row"], "-", "-", f"failed: {r['error']}"])
            continue
        detail = r["detail"] + (f"; further click {r['click_ms']:.0f} ms" if "click_ms" in r else "")
        table.append([r["row"], f"{r['seconds']:.2f}", f"{r['peak_bytes'] / 2**30:.2f}", detail])
    print("\n".join(fitted_table(["row", "seconds", "peak memory (GiB)", "detail"], table)))
    if args.json:
        args.json.write_text(json.dumps({"header": header(args.device), "rows": results}, indent=1))
    return 0


def _cuda_present() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
