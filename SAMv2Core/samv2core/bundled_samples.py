"""Small real scans bundled with the package (PyPI origin, see data/NOTICE.txt)."""
from __future__ import annotations

from pathlib import Path

import SimpleITK as sitk

from .errors import InputError
from .volume import Volume, load_volume

DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLES = {
    "lung1_ct": ("lung1_ct.nrrd", "CT"),
    "lung1_tumor_label": ("lung1_tumor_label.nrrd", None),
    "lung2_ct": ("lung2_ct.nrrd", "CT"),
    "lung2_tumor_label": ("lung2_tumor_label.nrrd", None),
    "brain1_mr": ("brain1_mr.nrrd", "MR"),
    "brain1_label": ("brain1_label.nrrd", None),
}


def sample_path(name: str) -> Path:
    """Path of a bundled sample file by name (see SAMPLES)."""
    if name not in SAMPLES:
        raise InputError(f"unknown sample {name!r}; available: {', '.join(SAMPLES)}")
    path = DATA_DIR / SAMPLES[name][0]
    if not path.exists():
        raise InputError(f"bundled sample {path} is missing: reinstall samv2core")
    return path


def load_sample(name: str) -> Volume:
    """A bundled scan (or label map) as a Volume."""
    fname, modality = SAMPLES.get(name, (None, None))
    path = sample_path(name)
    if modality is None:
        return Volume.from_sitk(sitk.ReadImage(str(path)), "MR", name=name)
    return load_volume(path, modality)
