"""Embedding-driven registration: SAM-rigid/affine (+ intensity refinement), verified against
the images before it is reported, SAM-coarse, deformable refinement; MIND-SSC descriptors for
CT-MRI pairs the model cannot match.

``register(fixed, moving, mode='rigid'|'affine', deformable=False, coarse=False, ...)`` returns
a :class:`RegistrationResult` whose transforms map FIXED physical LPS points to MOVING points
(the ITK / ``sitk.Resample`` convention); ``write_registration`` saves them (ITK .tfm/.h5,
displacement .nii.gz, composite .h5), the resampled moving image and a JSON report.
``register_interpatient(fixed, moving, ...)`` registers two different people (interpatient.py).
"""
from .deformable import DeformableOptions
from .interpatient import InterPatientOptions, register_interpatient
from .io import write_registration
from .linear_intensity_refine import LinearRefineOptions
from .options import RegistrationOptions
from .pipeline import register
from .result import RegistrationResult

__all__ = ["register", "write_registration", "RegistrationOptions", "RegistrationResult", "DeformableOptions",
           "LinearRefineOptions", "register_interpatient", "InterPatientOptions"]
