"""Choosing the model a command or the Slicer module runs with."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .errors import CheckpointError
from .model_io import LoadedModel, ModelCard, bundled_model_path, load_model
from .network import NetConfig, build_network


@dataclass
class ResolvedModel:
    model: LoadedModel
    label: str  # human-readable: which weights these are
    trained: bool


def resolve_model(path: "Optional[str | Path]" = None, device: str = "cpu",
                  allow_untrained: bool = False) -> ResolvedModel:
    """Load ``path``, else the bundled model; with ``allow_untrained`` fall back to a
    randomly initialised lite network (clearly labelled) when no bundled model exists."""
    if path:
        loaded = load_model(path, device=device)
        return ResolvedModel(loaded, f"{loaded.card.name} ({Path(path).name})", True)
    try:
        bundled = bundled_model_path()
    except CheckpointError:
        if not allow_untrained:
            raise
        cfg = NetConfig.lite()
        card = ModelCard(name="UNTRAINED lite network (random weights, seed 0)", architecture=cfg.to_dict(),
                         heads=list(cfg.heads), sha256="untrained-lite-seed0",
                         notes="No bundled model is installed; results are NOT meaningful.")

        torch.manual_seed(0)
        net = build_network(cfg).eval()
        return ResolvedModel(LoadedModel(model=net, card=card, path=Path("<untrained>")),
                             "UNTRAINED lite network (no bundled model installed)", False)
    loaded = load_model(bundled, device=device)
    return ResolvedModel(loaded, f"bundled model {loaded.card.name}", True)
