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
