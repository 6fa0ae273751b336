"""Settings of the registration pipeline (defaults follow SAME++ / CrossSAM, see the
reference notes; every value is written into the JSON report)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from ..errors import InputError
from .deformable import DeformableOptions
from .linear_intensity_refine import LinearRefineOptions
from .matches import QUERY_SIDES
from .verify import VerifyOptions

MODALITY_PAIRS = ("auto", "same", "cross")
UNVERIFIED_MIN_INLIER_FRACTION = 0.15
FEATURES = ("auto", "sam", "mind")


@dataclass
class RegistrationOptions:
    """All knobs of :func:`samv2core.registration.register`."""

    # --- SAM-affine / SAM-rigid --------------------------------------------------------
    # descriptors to match: 'sam' (the model), 'mind' (training-free MIND-SSC), 'auto' (SAM, and
    # MIND-SSC when SAM's result fails verification; for a cross-modality pair and a model whose card
    # does not claim cross-modality validation, both, keeping the better verified one)
    features: str = "auto"
    grid_spacing_mm: float = 16.0  # query points every 16 mm (8 voxels at 2 mm) inside the moving body
    max_query_points: int = 600  # evenly thinned beyond this (600 vs 1500: same errors on the benchmark pairs, 40% less matching time)
    min_score: float = 0.7  # similarity threshold of a stable match
    stable_passes: int = 5  # forward-backward passes of the cycle-consistency check
    min_inliers: int = 12  # fewer inliers than this: refuse
    # fewer inliers than this fraction of the matches: refuse (random matches can agree by chance).
    # Verified results (verify=True) are checked against the images, which is the stronger evidence,
    # so the floor is low: MIND-SSC CT->MR-like fits with 10-15% inliers were correct and verified.
    # Without verification the floor is UNVERIFIED_MIN_INLIER_FRACTION.
    min_inlier_fraction: float = 0.05
    inlier_threshold_mm: float = 8.0  # RANSAC / IRLS inlier distance (two fine embedding voxels)
    ransac_iterations: int = 1000
    max_scale: float = 2.0  # affine scalings outside [1/2, 2] are refused as implausible
    mask_margin_mm: float = 4.0  # both ends of a match must lie within this distance of the body masks
    query_side: str = "auto"  # sample query points in: 'auto' (smaller body), 'moving' (SAME++), 'fixed'
    subvoxel: bool = True  # refine the matched end of each stable match below the 4 mm embedding grid
    affine_min_spread_mm: float = 15.0  # thinner match clouds (std) get a similarity instead of an affine
    refine: bool = True  # intensity refinement of the linear map (LNCC / MIND-SSC) started from the SAM fit
    refine_options: LinearRefineOptions = field(default_factory=LinearRefineOptions)
    # verify every linear result against the images (verify.py) before calling it a success; a
    # result that fails is refused, or with features 'auto' the other descriptors are tried
    verify: bool = True
    verify_options: VerifyOptions = field(default_factory=VerifyOptions)
    # --- inputs ---------------------------------------------------------------------------
    modality_pair: str = "auto"  # 'same' / 'cross': refuse when the volumes' modality flags disagree
    require_physical_overlap: bool = True  # refuse images whose scanner coordinates are far apart
    # ... further apart than this (gap between the scanner boxes): a small field of view moved with
    # the patient or the table by up to ~the benchmark's 60-120 mm can lie just beside the other box
    physical_gap_mm: float = 200.0
    min_body_volume_ml: float = 20.0  # less body than this in an image: "all background"
    # --- field of view, SAM-coarse, deformable ------------------------------------------
    fov_margin_mm: float = 20.0  # safety margin when cropping to the common field of view
    coarse_spacing_mm: float = 32.0
    coarse_smoothness: float = 1.0
    coarse_max_residual_mm: float = 30.0  # matches further than this from the linear fit are not used
    coarse_tukey_sigmas: float = 3.0  # robust IRLS cutoff of the coarse fit (robust standard deviations)
    deformable: DeformableOptions = field(default_factory=DeformableOptions)
    device: str = "auto"
    seed: int = 0

    def __post_init__(self):
        """InputError (one line, naming the option) for a value the pipeline cannot use."""
        if self.modality_pair not in MODALITY_PAIRS:
            raise InputError(f"modality_pair must be one of {MODALITY_PAIRS}, got {self.modality_pair!r}")
        if self.features not in FEATURES:
            raise InputError(f"features must be one of {FEATURES}, got {self.features!r}")
        if self.query_side not in QUERY_SIDES:
            raise InputError(f"query_side must be one of {QUERY_SIDES}, got {self.query_side!r}")
        if not 0.0 <= self.min_inlier_fraction <= 1.0:
            raise InputError(f"min_inlier_fraction must be in [0, 1], got {self.min_inlier_fraction}")
        if not 0.0 <= self.min_score <= 1.0:
            raise InputError(f"min_score must be in [0, 1], got {self.min_score}")
        for name in ("grid_spacing_mm", "inlier_threshold_mm", "max_scale", "coarse_spacing_mm"):
            if not getattr(self, name) > 0:
                raise InputError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("min_inliers", "max_query_points", "stable_passes", "ransac_iterations"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.fov_margin_mm < 0 or self.mask_margin_mm < 0:
            raise InputError("fov_margin_mm and mask_margin_mm must not be negative")

    @property
    def inlier_fraction_floor(self) -> float:
        """The inlier-fraction floor in force: the option, raised to 15% for unverified results."""
        return self.min_inlier_fraction if self.verify else max(self.min_inlier_fraction,
                                                                UNVERIFIED_MIN_INLIER_FRACTION)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deformable"] = self.deformable.to_dict()
        d["refine_options"] = self.refine_options.to_dict()
        d["verify_options"] = self.verify_options.to_dict()
        return d
