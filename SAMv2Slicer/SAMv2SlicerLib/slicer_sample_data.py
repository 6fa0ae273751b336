"""The sample pair offered in Slicer's Sample Data module: a bundled chest CT with a lung
tumour mask, and a follow-up of it.

No real same-patient follow-up can be redistributed, so the follow-up is *simulated* from the
bundled CT (samv2core.simulate: known rigid motion + smooth deformation + noise), written once
to a cache folder and reused. The bundled scans are PyPI-origin (pyradiomics test data, see
samv2core/data/NOTICE.txt).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

SAMPLE_CATEGORY = "SAMv2"
SAMPLE_NAME = "SAMv2 lung CT pair"
BASELINE_NODE_NAME = "SAMv2 baseline CT"
FOLLOWUP_NODE_NAME = "SAMv2 follow-up CT (simulated)"
TUMOR_NODE_NAME = "SAMv2 baseline tumour"
BASELINE_SAMPLE = "lung1_ct"
TUMOR_SAMPLE = "lung1_tumor_label"
SIMULATION_SEED = 7


@dataclass(frozen=True)
class SamplePair:
    baseline: Path
    followup: Path
    tumor_label: Optional[Path]  # label map of the tumour on the baseline (for "Propagate lesion")
    simulated: bool


def bundled_baseline() -> Path:
    """Path of the bundled baseline CT (samv2core InputError if the package has none)."""
    from samv2core.bundled_samples import sample_path  # noqa: PLC0415 - Slicer loads this at start-up, before the module's pip dependencies

    return sample_path(BASELINE_SAMPLE)


def sample_pair(cache_dir: "str | os.PathLike", seed: int = SIMULATION_SEED) -> SamplePair:
    """Paths of the sample pair; the simulated follow-up is written to ``cache_dir`` on first use."""
    from samv2core.bundled_samples import sample_path  # noqa: PLC0415 - Slicer loads this at start-up, before the module's pip dependencies

    baseline = bundled_baseline()
    try:
        tumor = sample_path(TUMOR_SAMPLE)
    except Exception:
        tumor = None
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    target = cache / f"{BASELINE_SAMPLE}_simulated_followup_seed{seed}.nrrd"
    if not target.is_file() or target.stat().st_mtime < baseline.stat().st_mtime:
        import SimpleITK as sitk  # noqa: PLC0415 - Slicer loads this at start-up, before the module's pip dependencies

        from samv2core.outputs import atomic_write  # noqa: PLC0415 - Slicer loads this at start-up, before the module's pip dependencies
        from samv2core.simulate import simulate_followup  # noqa: PLC0415 - Slicer loads this at start-up, before the module's pip dependencies
        from samv2core.volume import load_volume  # noqa: PLC0415 - Slicer loads this at start-up, before the module's pip dependencies

        pair = simulate_followup(load_volume(baseline, "CT"), seed=seed)
        # atomic: a half-written file is never picked up
        atomic_write(target, lambda tmp: sitk.WriteImage(pair.followup.to_sitk(), str(tmp), True))
    return SamplePair(baseline, target, tumor, True)
