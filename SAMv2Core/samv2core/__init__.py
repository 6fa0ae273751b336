"""samv2core: self-supervised anatomical embeddings (SAM / SAMv2 / CrossSAM) and
embedding-driven registration. Pure Python (torch, SimpleITK, numpy, scipy); no Slicer or Qt.

Coordinate convention: every physical point handled by this package is in LPS millimetres
(the ITK / DICOM convention) unless a function or field says otherwise. 3D Slicer works in
RAS; convert explicitly with :func:`samv2core.coords.ras_to_lps` / :func:`lps_to_ras`.
"""
import importlib

from .errors import SAMv2Error, InputError, CheckpointError, DeviceError

# Loaded on first use (PEP 562), so importing the package (e.g. by the command line's entry
# point) is instant and stays interruptible.
_LAZY = {"Volume": "volume", "Modality": "volume", "load_volume": "volume",
         "PhysicalPoint": "coords", "ras_to_lps": "coords", "lps_to_ras": "coords"}


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"
__all__ = [  # noqa: F822 - the volume and coords names are loaded on first use (__getattr__)
    "SAMv2Error", "InputError", "CheckpointError", "DeviceError",
    "Volume", "Modality", "load_volume",
    "PhysicalPoint", "ras_to_lps", "lps_to_ras",
]
