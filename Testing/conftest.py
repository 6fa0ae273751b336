"""Shared pytest fixtures: real data locations and a deterministic small network."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from repo_paths import SHARED


def shared_data_dir() -> Path:
    """../shared/data next to the repository (or $SAMV2_SHARED_DATA)."""
    return SHARED


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if not d.is_dir():
        pytest.skip(f"real-data test: {d} not available (the shared data folder is only present in CI/dev sessions)")
    return d


@pytest.fixture(scope="session", autouse=True)
def _threads():
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def lite_net():
    """An untrained, deterministically initialised lite network (tests geometry/plumbing, not accuracy)."""
    from samv2core.network import NetConfig, build_network

    torch.manual_seed(0)
    return build_network(NetConfig.lite()).eval()


@pytest.fixture(scope="session")
def lung_crop():
    """A real chest CT crop (bundled pyradiomics lung1 sample, PyPI origin): about 120 x 100 x 30 voxels."""
    from samv2core.bundled_samples import load_sample

    v = load_sample("lung1_ct")
    img = v.to_sitk()[13:133, 20:120, 9:39]
    from samv2core.volume import Volume

    return Volume.from_sitk(img, "CT", name="lung1_crop")


def crop_volume(volume, x0, x1, y0, y1, z0, z1):
    from samv2core.volume import Volume

    return Volume.from_sitk(volume.to_sitk()[x0:x1, y0:y1, z0:z1], volume.modality, name=volume.name)


@pytest.fixture(scope="session")
def lite_model_file(tmp_path_factory):
    """A weights file of an untrained lite network (the Slicer worker and controller load it)."""
    from samv2core.model_io import ModelCard, save_model
    from samv2core.network import NetConfig, build_network

    torch.manual_seed(0)
    cfg = NetConfig.lite()
    card = ModelCard(name="lite-untrained-test", architecture=cfg.to_dict(), heads=list(cfg.heads))
    return save_model(build_network(cfg).eval(), card, tmp_path_factory.mktemp("model") / "lite.safetensors")


@pytest.fixture(scope="session")
def bundled_embedder():
    """The bundled model's embedder on the CPU."""
    from samv2core.embed import Embedder
    from samv2core.models import resolve_model

    return Embedder(resolve_model(None).model, device="cpu")


@pytest.fixture(scope="session")
def hard_lung_case(bundled_embedder):
    """The bundled lung CT, a hard simulated follow-up of it (seed 1), 24 body points whose
    truth lies inside the follow-up, their truth, and both embeddings."""
    from samv2core.bundled_samples import load_sample
    from samv2core.simulate import body_points, simulate_hard_followup

    lung = load_sample("lung1_ct")
    pair = simulate_hard_followup(lung, seed=1)
    pts = body_points(lung, 600, seed=11)
    truth = pair.map_points(pts)
    ok = pair.followup.contains_lps(truth, -2.0)
    return (lung, pair, pts[ok][:24], truth[ok][:24], bundled_embedder.embed(lung),
            bundled_embedder.embed(pair.followup))
