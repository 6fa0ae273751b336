"""samv2core: self-supervised anatomical embeddings (SAM / SAMv2 / CrossSAM) and
embedding-driven registration. Pure Python (torch, SimpleITK, numpy, scipy); no Slicer or Qt.

Coordinate convention: every physical point handled by this package is in LPS millimetres
(the ITK / DICOM convention) unless a function or field says otherwise. 3D Slicer works in
RAS; convert explicitly with :func:`samv2core.coords.ras_to_lps` / :func:`lps_to_ras`.
"""
from .errors import SAMv2Error, InputError, CheckpointError, DeviceError
from .volume import Volume, Modality, load_volume
from .coords import PhysicalPoint, ras_to_lps, lps_to_ras

__version__ = "0.1.0"
__all__ = [
    "SAMv2Error", "InputError", "CheckpointError", "DeviceError",
    "Volume", "Modality", "load_volume",
    "PhysicalPoint", "ras_to_lps", "lps_to_ras",
]
