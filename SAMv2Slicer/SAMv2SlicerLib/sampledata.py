"""The sample pair offered in Slicer's Sample Data module: a bundled CT and its follow-up.

No real same-patient follow-up can be redistributed, so the follow-up is *simulated* from the
bundled CT (samv2core.simulate: known rigid motion + smooth deformation + noise), written
once to a cache folder and reused. A bundled follow-up file is used instead when present.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SAMPLE_CATEGORY = "SAMv2"
SAMPLE_NAME = "SAMv2 CT pair"
SAMPLE_DESCRIPTION = "SAMv2 CT + simulated follow-up"
BASELINE_NODE_NAME = "SAMv2 baseline CT"
FOLLOWUP_NODE_NAME = "SAMv2 follow-up CT (simulated)"
SIMULATION_SEED = 7
_SUFFIXES = (".nrrd", ".nii.gz", ".nii", ".mha")


@dataclass(frozen=True)
class SamplePair:
    baseline: Path
    followup: Path
    simulated: bool


def data_folder() -> Path:
    """The samv2core package's bundled data folder."""
    import samv2core

    return Path(samv2core.__file__).resolve().parent / "data"


def _volumes(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    files = [p for p in sorted(folder.iterdir()) if p.is_file() and p.name.lower().endswith(_SUFFIXES)]
    # label maps / masks are not images to register
    return [p for p in files if not any(k in p.name.lower() for k in ("label", "mask", "seg"))]


def find_bundled_ct(folder: Optional[Path] = None) -> Path:
    """The bundled sample CT (InputError if the package has none)."""
    from samv2core.errors import InputError

    folder = folder or data_folder()
    files = _volumes(folder)
    base = [p for p in files if "follow" not in p.name.lower()]
    if not base:
        raise InputError(f"no sample CT found in {folder}")
    return base[0]


def sample_pair(cache_dir: "str | os.PathLike", folder: Optional[Path] = None) -> SamplePair:
    """Paths of the sample pair; the simulated follow-up is written to ``cache_dir`` on first use."""
    folder = folder or data_folder()
    baseline = find_bundled_ct(folder)
    bundled_follow = [p for p in _volumes(folder) if "follow" in p.name.lower()]
    if bundled_follow:
        return SamplePair(baseline, bundled_follow[0], "sim" in bundled_follow[0].name.lower())
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    stem = baseline.name.split(".")[0]
    target = cache / f"{stem}_simulated_followup_seed{SIMULATION_SEED}.nrrd"
    if not target.is_file() or target.stat().st_mtime < baseline.stat().st_mtime:
        import SimpleITK as sitk

        from samv2core.simulate import simulate_followup
        from samv2core.volume import load_volume

        pair = simulate_followup(load_volume(baseline), seed=SIMULATION_SEED)
        tmp = target.with_name(target.name + ".part.nrrd")
        sitk.WriteImage(pair.followup.to_sitk(), str(tmp), True)
        os.replace(tmp, target)
    return SamplePair(baseline, target, True)
