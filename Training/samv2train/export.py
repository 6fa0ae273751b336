"""Export a training run's weights in the product format (samv2core.model_io: safetensors +
JSON model card), so the trained model loads everywhere the bundled one does."""
from __future__ import annotations

from pathlib import Path

from samv2core.errors import CheckpointError, InputError
from samv2core.model_io import ModelCard, save_model
from samv2core.network import NetConfig, build_network

from . import checkpoint as ck
from .config import load_config
from .data import list_entries


def load_run_model(run_dir: Path, which: str = "best"):
    """(SAMv2Net in eval mode, info dict) from a run's best.pt or newest valid step checkpoint."""
    run_dir = Path(run_dir)
    if which not in ("best", "last"):
        raise InputError(f"which must be 'best' or 'last', got {which!r}")
    obj = None
    if which == "best" and (run_dir / "best.pt").is_file():
        obj = ck.load_checked(run_dir / "best.pt")
        src = run_dir / "best.pt"
    if obj is None:
        found = ck.latest_valid(run_dir / "checkpoints")
        if found is None:
            raise CheckpointError(f"{run_dir}: no valid checkpoint to export")
        obj, src = found
    net = build_network(NetConfig.from_dict(obj["net_config"]))
    net.load_state_dict(obj["model"])
    net.eval()
    return net, {"step": int(obj["step"]), "source": str(src), "metric": obj.get("metric"),
                 "config_hash": obj.get("config_hash", "")}


def _short(path: str) -> str:
    """Paths inside a shared data folder as 'shared/data/...', so cards hold no machine paths."""
    p = str(path)
    marker = "/shared/data/"
    return "shared/data/" + p.split(marker, 1)[1] if marker in p else Path(p).name


def export_run(run_dir: Path, out: Path, which: str = "best", name: str = "", modality: str = "",
               training_extra: "dict | None" = None, notes: str = "", fp16: bool = True,
               matching_heads: "list | None" = None) -> Path:
    """Write ``out`` (.safetensors) + card from a run; returns the weights path.

    ``matching_heads``: the heads the matcher should average (default: all heads).
    """
    run_dir = Path(run_dir)
    net, info = load_run_model(run_dir, which)
    cfg = load_config(run_dir / "config.yaml")
    mods = set()

    for e in list_entries(cfg.data):
        m = (e.get("modality") or "auto").upper()
        mods.add("MR" if m in ("MR", "MRI") else m)
    modality = modality or ("CT+MR" if {"CT", "MR"} <= mods else ("MR" if mods == {"MR"} else "CT"))
    training = {
        "run": cfg.run.name, "config_hash": info["config_hash"], "exported_step": info["step"],
        "iterations_planned": cfg.run.iterations, "seed": cfg.run.seed,
        "patch_size_zyx": cfg.data.patch_size, "batch_size": cfg.data.batch_size,
        "optimizer": cfg.optim.optimizer, "lr": cfg.optim.lr, "temperature": cfg.loss.temperature,
        "volumes": [_short(e["path"]) + (f" (labels: {_short(e['labels'])})" if e.get("labels") else "")
                    for e in list_entries(cfg.data)],
        "held_out": [_short(p) for p in cfg.data.exclude],
    }
    training.update(training_extra or {})
    card = ModelCard(name=name or cfg.run.name, architecture=net.config.to_dict(), heads=list(net.config.heads),
                     modality=modality, spacing_mm=cfg.data.spacing_mm, training=training, notes=notes,
                     matching_heads=list(matching_heads or []))
    return save_model(net, card, Path(out), fp16=fp16)
