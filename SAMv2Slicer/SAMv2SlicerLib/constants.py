"""Choices and names shared by the widget, the parameter node and the logic (no heavy imports)."""

METHODS = ("refined", "fixed_point", "nn")  # = samv2core.matching.METHODS: refined (default), SAMv2 fixed-point, NN
REGISTRATION_MODES = ("rigid", "affine")
REGISTRATION_FEATURES = ("auto", "sam", "mind")  # = samv2core.registration.options.FEATURES (tested)
DEVICES = ("auto", "cpu", "cuda", "mps")
MODALITIES = ("auto", "CT", "MR")  # auto: the node's own (DICOM / SAMv2.Modality), else guessed by the worker
ATTRIBUTE_PREFIX = "SAMv2."
FIXED_REFERENCE_ROLE = "fixedVolume"
MOVING_REFERENCE_ROLE = "movingVolume"
SOURCE_POINTS_ROLE = "sourcePoints"
SOURCE_VOLUME_ROLE = "sourceVolume"
FLAGGED_SUFFIX = " (?)"  # label suffix of matches that are not confident
