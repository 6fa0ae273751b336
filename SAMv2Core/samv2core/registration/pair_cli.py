"""``samv2 register`` options of the inter-patient pipeline and the label overlap report.

    --pair same-patient|inter-patient   (default same-patient: the verified SAME++ pipeline)
    --fixed-labels F --moving-labels M  label maps: warped moving labels + Dice in report.json

Kept beside registration/cli.py, which calls these three functions.
"""
from __future__ import annotations

import argparse

from ..errors import InputError
from ..volume import Volume
from .interpatient import PAIR_KINDS, register_interpatient
from .label_overlap import WARPED_LABELS_FILE, label_report, load_labels

LABEL_OUTPUT_FILES = (WARPED_LABELS_FILE,)


def add_pair_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", default="same-patient", choices=list(PAIR_KINDS),
                        help="same-patient (default: follow-ups, CT-MRI of one person; needs a distinct optimum) or "
                             "inter-patient (another person: no scanner overlap needed, MIND-SSC start search, "
                             "penalised affine, ConvexAdam-style deformable, inter-patient verification)")
    parser.add_argument("--fixed-labels", default=None,
                        help="label map on the fixed image (NIfTI / NRRD; a Slicer segmentation exported as labelmap)")
    parser.add_argument("--moving-labels", default=None,
                        help="label map on the moving image: warped onto the fixed grid (nearest neighbour) into "
                             f"{WARPED_LABELS_FILE}, Dice per shared label in report.json")


def read_label_args(args):
    """(fixed labels, moving labels) as sitk images, or (None, None); both or neither."""
    fl, ml = getattr(args, "fixed_labels", None), getattr(args, "moving_labels", None)
    if (fl is None) != (ml is None):
        raise InputError("--fixed-labels and --moving-labels go together: give both label maps or neither")
    if fl is None:
        return None, None
    return load_labels(fl, "fixed"), load_labels(ml, "moving")


def register_pair(args, fixed: Volume, moving: Volume, progress):
    """The inter-patient registration for ``--pair inter-patient`` (RegistrationResult)."""
    return register_interpatient(fixed, moving, mode=args.mode, deformable=bool(args.deformable),
                                 progress=progress)


def add_label_report(result, labels, fixed: Volume, moving: Volume):
    """Dice of the warped labels into ``result.report['labels']``; returns the warped label image."""
    if labels[0] is None:
        return None
    entry, warped = label_report(labels[0], labels[1], fixed, moving, result.composite)
    entry["folding_percent"] = result.report.get("folding_percent")
    result.report["labels"] = entry
    return warped


__all__ = ["LABEL_OUTPUT_FILES", "add_label_report", "add_pair_arguments", "read_label_args", "register_pair"]
