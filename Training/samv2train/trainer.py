"""The training loop: SAM appearance InfoNCE (fine + coarse), Semantic-SAM prototypical
SupCon on label maps, optional CrossSAM registered pairs, resumable and deterministic.

Determinism: every step draws its randomness from ``np.random.default_rng([seed, step, rank])``
and a torch generator seeded the same way, so a resumed run reproduces exactly the steps an
uninterrupted run would have taken (given the same model/optimizer state from the checkpoint).
"""
from __future__ import annotations

import csv
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from samv2core.device import select_device
from samv2core.errors import CheckpointError, InputError
from samv2core.model_io import load_model
from samv2core.network import FINE_STRIDE, NetConfig, build_network
from samv2core.outputs import atomic_write

from . import checkpoint as ck
from .config import TrainConfig, load_config, save_config
from .data import TrainVolume, load_dataset
from .losses import (
    alice_loss,
    appearance_loss,
    coarse_spec,
    fine_spec,
    labels_on_grid,
    prototype_supcon,
    random_global_negatives,
)
from .view_pairs import ViewPair, fixed_view_pair, make_view_pair, output_grid_centres

LOG_FIELDS = ["step", "wall_s", "lr", "loss", "fine", "coarse", "semantic", "alice", "pair", "fine_acc",
              "val_median_mm", "val_mean_mm", "val_cpm10"]


@dataclass
class TrainState:
    step: int = 0
    elapsed_s: float = 0.0
    best_metric: float = float("inf")
    best_step: int = -1


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_pref: str) -> DistInfo:
    """Initialise torch.distributed only when launched by torchrun with WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()

    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda", "gpu")
    if use_cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistInfo(rank, world, local)


def select_training_device(pref: str, dist_info: DistInfo) -> torch.device:
    dev = select_device(pref)
    if dev.type == "cuda" and dist_info.world_size > 1:
        return torch.device("cuda", dist_info.local_rank)
    return dev


def build_model(cfg: TrainConfig, log=print) -> torch.nn.Module:
    """Fresh network of cfg.model.variant, or the weights of cfg.model.init (fine-tuning)."""
    if cfg.model.init:
        loaded = load_model(cfg.model.init, device="cpu")
        log(f"  initialised from {cfg.model.init}")
        model = loaded.model
        model.train()
        for p in model.parameters():
            p.requires_grad_(True)
        return model.float()
    net_cfg = NetConfig.full() if cfg.model.variant == "full" else NetConfig.lite()
    return build_network(net_cfg)


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optim.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.optim.lr)
    return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up then cosine decay to 5% (or constant) over run.iterations."""
    o = cfg.optim
    if o.warmup and step < o.warmup:
        return o.lr * (step + 1) / o.warmup
    if o.schedule == "constant":
        return o.lr
    t = min(1.0, (step - o.warmup) / max(1, cfg.run.iterations - o.warmup))
    return o.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def step_rng(seed: int, step: int, rank: int = 0, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([seed, step, rank, stream])


class Trainer:
    """Owns the model, optimizer, data and run directory of one training run."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, log=None, extra_pairs=None, restart: bool = False):
        self.cfg = cfg
        self.dist = init_distributed(cfg.runtime.device)
        self._log = log or (lambda m: print(m, file=sys.stderr, flush=True))
        torch.set_num_threads(cfg.runtime.num_threads)
        self.device = select_training_device(cfg.runtime.device, self.dist)
        self.run_dir = cfg.run_dir
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.state = TrainState()
        # registered cross-modality pairs (CrossSAM loop): list of callables rng -> ViewPair
        self.pair_sources = list(extra_pairs or [])
        self._check_run_dir(resume)
        self.log(f"samv2-train: run {self.run_dir} (config {cfg.identity_hash()}), device {self.device}, "
                 f"{cfg.runtime.num_threads} threads, world size {self.dist.world_size}")
        self.log("loading data ...")
        has_data = bool(cfg.data.volumes or cfg.data.folders)
        # a CrossSAM run may have pairs only; their images are added by the loop
        self.volumes: list[TrainVolume] = load_dataset(cfg.data, log=self.log) if has_data else []
        self.labelled = [i for i, v in enumerate(self.volumes) if v.labels is not None]
        if not resume and self.dist.is_main:  # recorded only once the data was found usable
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / "config.yaml")
        torch.manual_seed(cfg.run.seed)
        self.model = build_model(cfg, self.log).to(self.device)
        self.raw_model = self.model
        if self.dist.world_size > 1:
            if self.device.type == "cuda":
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
                self.raw_model = self.model
                self.model = DDP(self.model, device_ids=[self.device.index], find_unused_parameters=True)
            else:
                # the semantic head only gets gradients on semantic steps
                self.model = DDP(self.model, find_unused_parameters=True)
        self.optimizer = make_optimizer(cfg, self.raw_model)
        if resume:
            self._restore(restart)

    # --- run directory / resume -----------------------------------------------------------
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    def _check_run_dir(self, resume: bool) -> None:
        cfg_file = self.run_dir / "config.yaml"
        if resume:
            if not cfg_file.is_file():
                raise InputError(f"{self.run_dir}: not a run directory (no config.yaml)")
            saved = load_config(cfg_file)
            if saved.identity_hash() != self.cfg.identity_hash():
                raise InputError(f"{self.run_dir}: was created by a different config "
                                 f"({saved.identity_hash()} != {self.cfg.identity_hash()}); refusing to resume")
            if saved.run.iterations != self.cfg.run.iterations and self.dist.is_main:
                save_config(self.cfg, cfg_file)  # a run extended on resume records its new length
            return
        if cfg_file.exists() and ck.list_checkpoints(self.ckpt_dir):
            raise InputError(f"{self.run_dir}: already holds a run with checkpoints; use --resume {self.run_dir} "
                             "or choose another run.name")

    def _restore(self, restart: bool = False) -> None:
        found = ck.latest_valid(self.ckpt_dir, log=self.log)
        if found is None:
            present = ck.list_checkpoints(self.ckpt_dir)
            if not restart:
                what = (f"all {len(present)} checkpoints are corrupt" if present else "it has no checkpoint yet")
                raise CheckpointError(f"{self.run_dir}: cannot resume, {what}; add --restart to start it again "
                                      "from step 0")
            if self.dist.is_main:
                for _, path in present:  # kept for inspection, out of the way of resume and pruning
                    ck.set_aside(path)
            self._truncate_log(0)
            self.log(f"restarting {self.run_dir.name} from step 0 ({len(present)} corrupt checkpoints set aside)")
            return
        obj, path = found
        if obj.get("config_hash") != self.cfg.identity_hash():
            raise CheckpointError(f"{path}: checkpoint belongs to config {obj.get('config_hash')}, "
                                  f"not {self.cfg.identity_hash()}; refusing to resume")
        self.raw_model.load_state_dict(obj["model"])
        self.optimizer.load_state_dict(obj["optimizer"])
        self.state = TrainState(int(obj["step"]), float(obj.get("elapsed_s", 0.0)),
                                float(obj.get("best_metric", float("inf"))), int(obj.get("best_step", -1)))
        self._truncate_log(self.state.step)
        self.log(f"resumed from {path.name} at step {self.state.step}")

    def _truncate_log(self, step: int) -> None:
        """Drop loss-log rows newer than the restored step (they will be recomputed)."""
        path = self.run_dir / "loss_log.csv"
        if not path.is_file() or not self.dist.is_main:
            return
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= step]
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, LOG_FIELDS)
                w.writeheader()
                w.writerows(rows)

        atomic_write(path, write)

    def save_checkpoint(self) -> Path:
        obj = {
            "step": self.state.step, "elapsed_s": self.state.elapsed_s,
            "best_metric": self.state.best_metric, "best_step": self.state.best_step,
            "config_hash": self.cfg.identity_hash(),
            "net_config": self.raw_model.config.to_dict(),
            "model": {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
        }
        path = ck.checkpoint_path(self.ckpt_dir, self.state.step)
        ck.atomic_torch_save(obj, path)
        ck.prune_checkpoints(self.ckpt_dir, self.cfg.run.keep_checkpoints)
        return path

    def save_best(self, metric: float) -> None:
        obj = {"step": self.state.step, "metric": float(metric), "config_hash": self.cfg.identity_hash(),
               "net_config": self.raw_model.config.to_dict(),
               "model": {k: v.detach().cpu() for k, v in self.raw_model.state_dict().items()}}
        ck.atomic_torch_save(obj, self.run_dir / "best.pt")

    # --- one step ---------------------------------------------------------------------------
    def _sample_batch(self, rng: np.random.Generator) -> tuple[list[ViewPair], str]:
        cfg = self.cfg
        if self.pair_sources and rng.random() < cfg.crosssam.pair_prob:
            src = self.pair_sources[int(rng.integers(len(self.pair_sources)))]
            return [src(rng)], "pair"
        if not self.volumes:
            raise InputError("no training volumes: give data.volumes / data.folders (or crosssam.pairs)")
        semantic = bool(self.labelled) and rng.random() < cfg.loss.semantic_prob
        pool = self.labelled if semantic else list(range(len(self.volumes)))
        w = np.array([self.volumes[i].weight for i in pool], float)
        pairs = []
        for _ in range(cfg.data.batch_size):
            i = pool[int(rng.choice(len(pool), p=w / w.sum()))]
            pairs.append(make_view_pair(rng, self.volumes[i], i, cfg.data.patch_size, cfg.augment,
                                        with_labels=semantic))
        return pairs, "semantic" if semantic else "sam"

    def _forward(self, patches: torch.Tensor) -> dict:
        if self.cfg.runtime.bf16:
            with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16):
                return self.model(patches)
        return self.model(patches)

    def compute_loss(self, pairs: list[ViewPair], rng: np.random.Generator) -> tuple[torch.Tensor, dict]:
        """Total loss of a batch of view pairs and its components (floats)."""
        cfg = self.cfg
        n = len(pairs)
        # CrossSAM pairs may carry an extra patch from outside the overlap (FOV negatives)
        fov_index = {}
        extra_patches = []
        for k, p in enumerate(pairs):
            if p.patch_fov is not None:
                fov_index[k] = 2 * n + len(extra_patches)
                extra_patches.append(p.patch_fov)
        x = torch.stack([t for p in pairs for t in (p.patch_a, p.patch_b)] + extra_patches)[:, None].to(self.device)
        out = self._forward(x)
        fine, coarse = out["fine"].float(), out["coarse"].float()
        fs, cs = fine_spec(cfg.loss), coarse_spec(cfg.loss)
        parts = {"fine": [], "coarse": [], "semantic": [], "alice": [], "fine_acc": []}
        for k, pair in enumerate(pairs):
            fa, fb = fine[2 * k], fine[2 * k + 1]
            ca, cb = coarse[2 * k], coarse[2 * k + 1]
            # coarse negatives from the other volumes of the batch (different anatomy/patient)
            others = [coarse[j] for j in range(2 * n) if j // 2 != k and pairs[j // 2].volume_index != pair.volume_index]
            extra = torch.cat([random_global_negatives(o, 64, rng) for o in others]).detach() if others else None
            if pair.b_from_a is None:
                # one volume, two views: both directions by swapping the views
                directions = ((fa, fb, ca, cb, pair, False, None, None), (fb, fa, cb, ca, swap(pair), False, None, None))
            else:
                # registered pair (A -> B map only): A anchors, then B anchors against A negatives
                # plus negatives from A's non-overlapping field of view (CrossSAM N_fov)
                fov_f = fov_c = None
                if k in fov_index and cfg.crosssam.fov_negatives > 0:
                    j = fov_index[k]
                    fov_f = random_global_negatives(fine[j], cfg.crosssam.fov_negatives, rng)
                    fov_c = random_global_negatives(coarse[j], min(cfg.crosssam.fov_negatives, coarse[j][0].numel()), rng)
                directions = ((fa, fb, ca, cb, pair, False, None, None), (fa, fb, ca, cb, pair, True, fov_f, fov_c))
            for (f1, f2, c1, c2, pr, rev, fov_f, fov_c) in directions:
                r = appearance_loss(f1, f2, pr, fs, cfg.loss, rng, fov_negatives=fov_f, reverse=rev)
                if r is not None:
                    parts["fine"].append(r[0])
                    parts["fine_acc"].append(r[1]["acc"])
                r = appearance_loss(c1, c2, pr, cs, cfg.loss, rng, extra_negatives=extra, fov_negatives=fov_c,
                                    reverse=rev)
                if r is not None:
                    parts["coarse"].append(r[0])
        if "semantic" in out and any(p.labels_a is not None for p in pairs):
            feats, labs, sets = [], [], []
            sem = out["semantic"].float()
            for k, pair in enumerate(pairs):
                for j, lab in ((2 * k, pair.labels_a), (2 * k + 1, pair.labels_b)):
                    if lab is None:
                        continue
                    feats.append(sem[j])
                    labs.append(labels_on_grid(lab, sem.shape[2:], FINE_STRIDE))
                    sets.append(pair.label_set)
            r = prototype_supcon(feats, labs, sets, cfg.loss, rng)
            if r is not None:
                parts["semantic"].append(r[0])
        if cfg.loss.alice_cross_volume and n > 1:
            for k in range(n - 1):
                if pairs[k].volume_index != pairs[k + 1].volume_index:
                    r = alice_loss(fine[2 * k], fine[2 * k + 2], cfg.loss, rng)
                    if r is not None:
                        parts["alice"].append(r[0])
        def mean(xs):
            return torch.stack(xs).mean() if xs else None

        total = torch.zeros((), device=self.device)
        comps = {}
        for key, w in (("fine", 1.0), ("coarse", cfg.loss.coarse_weight), ("semantic", cfg.loss.semantic_weight),
                       ("alice", cfg.loss.alice_weight)):
            v = mean(parts[key])
            if v is not None:
                total = total + w * v
                comps[key] = float(v.detach())
        comps["fine_acc"] = float(np.mean(parts["fine_acc"])) if parts["fine_acc"] else float("nan")
        if not any(k in comps for k in ("fine", "coarse", "semantic", "alice")):
            # degenerate batch (no overlap inside the body): a zero loss that still touches
            # every output keeps DDP's gradient all-reduce in step across ranks
            total = sum((v.sum() * 0.0 for v in out.values()), total)
        return total, comps

    def train_step(self) -> dict:
        cfg = self.cfg
        step = self.state.step
        rng = step_rng(cfg.run.seed, step, self.dist.rank)
        torch.manual_seed(int(rng.integers(2 ** 62)))
        lr = lr_at(cfg, step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        pairs, kind = self._sample_batch(rng)
        self.model.train()
        loss, comps = self.compute_loss(pairs, rng)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), cfg.optim.grad_clip)
        self.optimizer.step()
        if not math.isfinite(float(loss.detach())):
            raise FloatingPointError(f"loss became {float(loss)} at step {step}; lower optim.lr")
        self.state.step += 1
        comps.update({"loss": float(loss.detach()), "lr": lr, "kind": kind})
        return comps

    # --- validation -----------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, n_pairs: int = 6) -> dict:
        """Nearest-neighbour matching error (mm) on fixed, reproducible view pairs.

        Pairs come from the training volumes (geometry-only augmentation, fixed seeds), so this
        tracks how well the embedding localises, not generalisation; held-out scans are for
        the benchmark. Score = (fine + upsampled coarse) / 2 as in SAM.
        """
        if not self.volumes:
            return {"val_median_mm": float("nan"), "val_mean_mm": float("nan"), "val_cpm10": float("nan")}
        self.model.eval()
        errs = []
        for k in range(n_pairs):
            vi = k % len(self.volumes)
            pair = fixed_view_pair(self.cfg.run.seed * 1000 + 7919 + k, self.volumes[vi], vi,
                                   self.cfg.data.patch_size, self.cfg.augment)
            out = self.raw_model(torch.stack([pair.patch_a, pair.patch_b])[:, None].to(self.device))
            errs.extend(nn_errors_mm(out, pair, np.random.default_rng(k)))
        self.model.train()
        e = np.asarray(errs) if errs else np.asarray([np.nan])
        return {"val_median_mm": float(np.median(e)), "val_mean_mm": float(np.mean(e)),
                "val_cpm10": float(np.mean(e <= 10.0))}

    # --- main loop ----------------------------------------------------------------------------
    def fit(self, stop_after: "int | None" = None) -> TrainState:
        """Train until run.iterations (or ``stop_after`` more steps: used by tests to simulate a kill)."""
        cfg = self.cfg
        total = cfg.run.iterations
        done_now = 0
        bar = None
        if cfg.runtime.progress and self.dist.is_main:
            bar = tqdm(total=total, initial=self.state.step, desc=cfg.run.name, dynamic_ncols=True, file=sys.stderr)
        t_last = time.time()
        while self.state.step < total:
            if stop_after is not None and done_now >= stop_after:
                break
            comps = self.train_step()
            now = time.time()
            self.state.elapsed_s += now - t_last
            t_last = now
            done_now += 1
            step = self.state.step
            row = {"step": step, "wall_s": round(self.state.elapsed_s, 2), "lr": f"{comps['lr']:.6g}",
                   "loss": f"{comps['loss']:.5f}"}
            for key in ("fine", "coarse", "semantic", "alice", "fine_acc"):
                if key in comps and comps[key] == comps[key]:
                    row[key] = f"{comps[key]:.5f}"
            if comps["kind"] == "pair":
                row["pair"] = row.get("fine", "")
            if cfg.run.validate_every and (step % cfg.run.validate_every == 0 or step == total):
                val = self.validate()
                row.update({k: f"{v:.4f}" for k, v in val.items()})
                if self.dist.is_main and val["val_mean_mm"] < self.state.best_metric:
                    self.state.best_metric = val["val_mean_mm"]
                    self.state.best_step = step
                    self.save_best(val["val_mean_mm"])
                self.log(f"step {step}: validation median {val['val_median_mm']:.2f} mm, "
                         f"mean {val['val_mean_mm']:.2f} mm, CPM@10 {100 * val['val_cpm10']:.1f}%")
            if self.dist.is_main and (step % cfg.run.log_every == 0 or "val_mean_mm" in row):
                self._append_log(row)
            if self.dist.is_main and (step % cfg.run.checkpoint_every == 0 or step == total):
                self.save_checkpoint()
                self.plot()
            if bar is None and self.dist.is_main and step % 25 == 0:
                self.log(f"step {step}/{total}: loss {comps['loss']:.4f} ({comps['kind']}), "
                         f"fine {comps.get('fine', float('nan')):.4f}, coarse {comps.get('coarse', float('nan')):.4f}, "
                         f"semantic {comps.get('semantic', float('nan')):.4f}, {self.state.elapsed_s:.0f} s elapsed")
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=comps["loss"], fine=comps.get("fine", float("nan")), kind=comps["kind"])
        if bar is not None:
            bar.close()
        if self.dist.is_main and not cfg.run.validate_every and self.state.step >= total:
            self.save_best(float("nan"))
        return self.state

    def _append_log(self, row: dict) -> None:
        path = self.run_dir / "loss_log.csv"
        new = not path.is_file()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, LOG_FIELDS)
            if new:
                w.writeheader()
            w.writerow({k: row.get(k, "") for k in LOG_FIELDS})

    def plot(self) -> None:
        try:
            plot_loss_log(self.run_dir / "loss_log.csv", self.run_dir / "loss_curves.png")
        except Exception as exc:  # a plotting problem must never stop training
            self.log(f"warning: could not plot the loss curves ({exc})")


def swap(pair: ViewPair) -> ViewPair:
    """The same pair seen from B (only meaningful for single-volume pairs)."""
    if pair.b_from_a is not None:
        return pair  # registered pairs: A->B direction only (the inverse map is not kept)
    return ViewPair(pair.volume_index, pair.patch_b, pair.patch_a, pair.view_b, pair.view_a, pair.body_b, pair.body_a,
                    pair.labels_b, pair.labels_a, pair.label_set, pair.spacing_mm)


def nn_errors_mm(out: dict, pair: ViewPair, rng: np.random.Generator, n: int = 200) -> list[float]:
    """Errors (mm, in volume space) of NN matching A -> B for random in-body anchors of A."""
    fine, coarse = out["fine"].float(), out["coarse"].float()
    fa, fb = fine[0], fine[1]
    # coarse upsampled to the fine grid and re-normalised, averaged with fine (SAM scoring)
    cb_up = F.normalize(F.interpolate(coarse[1:2], size=fb.shape[1:], mode="trilinear", align_corners=False)[0], dim=0)
    ca_up = F.normalize(F.interpolate(coarse[0:1], size=fa.shape[1:], mode="trilinear", align_corners=False)[0], dim=0)
    centres_a = output_grid_centres(fa.shape[1:], FINE_STRIDE)
    pb = pair.a_to_b_patch(centres_a)
    inside = np.all((pb >= 0) & (pb <= np.asarray(pair.patch_b.shape) - 1), axis=1)
    idx = np.rint(centres_a).astype(int)
    inside &= pair.body_a[idx[:, 0], idx[:, 1], idx[:, 2]].numpy() > 0.5
    cand = np.flatnonzero(inside)
    if not len(cand):
        return []
    sel = rng.choice(cand, size=min(n, len(cand)), replace=False)
    C = fa.shape[0]
    qa = torch.cat([fa.reshape(C, -1).t()[sel], ca_up.reshape(C, -1).t()[sel]], 1)
    kb = torch.cat([fb.reshape(C, -1).t(), cb_up.reshape(C, -1).t()], 1)
    best = (qa @ kb.t()).argmax(1).numpy()
    centres_b = output_grid_centres(fb.shape[1:], FINE_STRIDE)
    found_vol = pair.view_b.to_volume(centres_b[best])
    true_vol = pair.view_a.to_volume(centres_a[sel])
    return list(np.linalg.norm(found_vol - true_vol, axis=1) * pair.spacing_mm)


def plot_loss_log(csv_path: Path, png_path: Path) -> None:
    """PNG of the loss components (and validation error) against the step."""
    import matplotlib  # noqa: PLC0415 - optional (the 'train' extra)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415 - after choosing the Agg backend

    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    steps = np.array([int(r["step"]) for r in rows])
    for key in ("loss", "fine", "coarse", "semantic", "alice"):
        vals = np.array([float(r[key]) if r.get(key) else np.nan for r in rows])
        ok = np.isfinite(vals)
        if ok.sum() == 0:
            continue
        # running mean over 25 logged steps: single steps are very noisy
        v = vals[ok]
        k = min(25, len(v))
        smooth = np.convolve(v, np.ones(k) / k, mode="valid")
        axes[0].plot(steps[ok][k - 1:], smooth, label=key)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("loss (running mean)")
    axes[0].legend()
    vs = [(int(r["step"]), float(r["val_median_mm"]), float(r["val_mean_mm"])) for r in rows if r.get("val_median_mm")]
    if vs:
        a = np.array(vs)
        axes[1].plot(a[:, 0], a[:, 1], "o-", label="median")
        axes[1].plot(a[:, 0], a[:, 2], "s-", label="mean")
        axes[1].set_ylabel("validation NN error (mm)")
        axes[1].set_xlabel("step")
        axes[1].legend()
    fig.tight_layout()
    try:
        atomic_write(png_path, lambda tmp: fig.savefig(tmp, dpi=90))
    finally:
        plt.close(fig)


def train(cfg: TrainConfig, resume: bool = False, stop_after: "int | None" = None, log=None,
          restart: bool = False) -> Trainer:
    """Run (or resume) training for ``cfg``; returns the Trainer (model, state, run_dir).
    ``restart`` (with ``resume``): start again from step 0 when no checkpoint is valid."""
    trainer = Trainer(cfg, resume=resume, log=log, restart=restart)
    trainer.fit(stop_after=stop_after)
    return trainer
