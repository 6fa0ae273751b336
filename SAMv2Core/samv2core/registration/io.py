"""Writing a registration: ITK transform files that SimpleITK and 3D Slicer both read, the
resampled moving image and the JSON report.

Files (all transforms map FIXED LPS points to MOVING points, the ITK convention; Slicer reads
them as "from parent" transforms, so a moving volume placed under them lands on the fixed one):

* ``linear.tfm`` / ``linear.h5``: the rigid or affine part (AffineTransform_double_3_3);
* ``displacement.nii.gz`` / ``displacement.h5``: the nonlinear part d, applied to fixed points
  BEFORE the linear part (vector image in LPS millimetres / ITK DisplacementFieldTransform);
  only when a coarse/deformable stage ran. Slicer reads the .nii.gz correctly but warns that
  its NIfTI intent is 'vector' (1007) rather than 'displacement' (1006): ITK writes vector
  images that way; the .h5 loads without the warning. Slicer interpolates grid transforms
  cubically by default (ITK: linearly), a difference of hundredths of a millimetre on these
  smooth fields (Testing/test_registration_io.py);
* ``composite.h5``: the complete map linear o (x + d(x)) in one file;
* ``moving_resampled.nii.gz``: the moving image on the fixed grid, through ``composite``;
* ``report.json``: inliers, residuals, Jacobian statistics, folding, timings, settings.

Files are written as one ``outputs.OutputSet`` over the whole folder: built in a fresh folder
beside it and swapped in by one atomic rename only when all of them were written, so a failure
or a killed run never leaves a partial result or a mix of two runs.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import RegistrationError
from ..outputs import OutputSet, check_outputs, public_text
from ..volume import Volume
from .result import RegistrationResult


# every file write_registration may write (plus the optional overlay.png of the CLI)
OUTPUT_FILES = ("linear.tfm", "linear.h5", "composite.h5", "moving_resampled.nii.gz", "report.json",
                "displacement.nii.gz", "displacement.h5", "overlay.png", "moving_labels_warped.nii.gz")


def resample_moving(result: RegistrationResult, fixed: Volume, moving: Volume,
                    interpolator=sitk.sitkLinear) -> Volume:
    """The moving image resampled onto the fixed grid through the complete transform."""
    fill = float(moving.array.min())
    out = sitk.Resample(moving.to_sitk(), fixed.to_sitk(), result.composite, interpolator, fill, sitk.sitkFloat32)
    vol = Volume.from_sitk(out, moving.modality, name=f"{moving.name}_registered")
    return vol


def _json_default(obj):
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def write_registration(result: RegistrationResult, fixed: Volume, moving: Volume, out_dir,
                       extra_images: dict | None = None) -> dict:
    """Write the transforms, the resampled moving image and the report into ``out_dir``.

    Returns {"linear_tfm", "linear_h5", "displacement", "displacement_h5" (if any), "composite", "moving_resampled",
    "report"} -> Path, plus one entry per ``extra_images`` {file name: sitk.Image} (e.g. the warped
    moving labels), written in the same all-or-nothing set. Raises InputError if an output would replace an image the inputs were read from, RegistrationError
    if a file cannot be written (nothing is left behind).
    """
    if not isinstance(result, RegistrationResult):
        raise RegistrationError("write_registration needs a RegistrationResult from register()")
    out = Path(out_dir)
    names = {"linear_tfm": "linear.tfm", "linear_h5": "linear.h5", "composite": "composite.h5",
             "moving_resampled": "moving_resampled.nii.gz", "report": "report.json"}
    extra = dict(extra_images or {})
    names.update({name: name for name in extra})
    if result.displacement is not None:
        names["displacement"] = "displacement.nii.gz"
        names["displacement_h5"] = "displacement.h5"
    # the folder must not hold the files the images were read from under an output's name
    check_outputs([], [v.meta.get("source") for v in (fixed, moving)], [(out, names.values())])
    try:
        # all or nothing: the folder is rebuilt beside itself and swapped in by one rename, so a
        # killed run leaves the previous result or this one (never report.json of one beside
        # linear.tfm of the other); files of an earlier run that this one does not write go
        with OutputSet(folder=out, replaces=OUTPUT_FILES) as files:
            tmp = {key: str(files.stage(out / name)) for key, name in names.items() if key != "report"}
            sitk.WriteTransform(result.linear, tmp["linear_tfm"])
            sitk.WriteTransform(result.linear, tmp["linear_h5"])
            if result.displacement is not None:
                sitk.WriteImage(sitk.Cast(result.displacement, sitk.sitkVectorFloat32), tmp["displacement"], True)
                sitk.WriteTransform(sitk.DisplacementFieldTransform(sitk.Image(result.displacement)),
                                    tmp["displacement_h5"])
            sitk.WriteTransform(result.composite, tmp["composite"])
            sitk.WriteImage(resample_moving(result, fixed, moving).to_sitk(), tmp["moving_resampled"], True)
            for name, image in extra.items():
                sitk.WriteImage(image, tmp[name], True)
            report = dict(result.report)
            report["files"] = dict(names)
            files.write_text(out / names["report"], json.dumps(report, indent=2, default=_json_default))
        return {key: out / name for key, name in names.items()}
    except (RuntimeError, OSError) as exc:
        reason = public_text(str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__, out)
        raise RegistrationError(f"could not write the registration to {out}: {reason}") from None
