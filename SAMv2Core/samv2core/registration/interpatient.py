"""Inter-patient registration: two different people, no shared scanner coordinates.

The same-patient pipeline (pipeline.py) asks for a distinct millimetre-level optimum and physical
overlap; between two people neither exists. This pipeline instead:

1. resamples both images to an isotropic working grid (3 mm) and describes them with MIND-SSC
   (modality independent, training free) plus the body mask as one more channel;
2. **start without scanner overlap**: body centres of mass aligned, then an exhaustive
   translation search over the MIND distance on a 6 mm grid (every slab position of one image
   along the other, +-48 mm across), keeping the best distinct starts (and the scanner-coordinate
   start when the boxes intersect);
3. **robust affine**: Adam on the 12 parameters from every start, the mean distance over the
   fixed body with a "chance" cost where the map leaves the moving image (so shrinking the overlap
   never pays), and a penalty on the linear part's departure from the identity;
4. **deformable** (convex_search.py): ConvexAdam-style coupled convex search + Adam on a
   diffeomorphic velocity field;
5. the inter-patient verification policy (interpatient_verify.py) decides; a result that fails is
   refused (RegistrationError, one line).

Returns the same RegistrationResult as the same-patient pipeline: fixed LPS -> moving LPS, the
displacement applied to fixed points before the linear map.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..affine import sitk_affine
from ..device import torch_threads
from ..errors import RegistrationError
from ..grid import Grid
from ..preprocess import body_mask, normalize_intensity, resample_to_model_grid
from ..progress import Progress
from ..volume import Modality, Volume
from .convex_search import ConvexAdamOptions, convex_adam, warp_on_grid
from .interpatient_verify import InterPatientVerifyOptions, pose_gap_mm, verify_interpatient
from .mind import mind_ssc
from .preflight import scanner_gap_mm
from .result import RegistrationResult, displacement_image
from .svf import jacobian_determinant, jacobian_stats

PAIR_KINDS = ("same-patient", "inter-patient")
MASK_CHANNEL = 12  # after the 12 MIND-SSC channels
HU_WINDOW = (-150.0, 250.0)  # fat ~0.1, organs ~0.5, enhanced vessels ~0.9, bone 1
BONE_WINDOW = (200.0, 1000.0)  # cortical / trabecular bone only: ribs and vertebrae, not contrast vessels


@dataclass(frozen=True)
class InterPatientOptions:
    """Knobs of :func:`register_interpatient` (all written into the report)."""

    spacing_mm: float = 3.0  # working grid (ConvexAdam works at half resolution too)
    search_step_mm: float = 6.0  # the translation search's grid (features pooled 2x)
    search_across_mm: float = 48.0  # +- range of the search in x and y around the body centres
    starts: int = 2  # distinct best search poses refined to an affine
    start_separation_mm: float = 15.0  # two starts closer than this are one
    affine_iterations: tuple = (40, 20)  # Adam steps on the 6 mm and the 3 mm grid
    affine_penalty: float = 4.0  # weight of |A - I|^2 relative to the chance distance
    coarse_points: int = 3000  # fixed body points the 6 mm distance samples
    fine_points: int = 8000  # ... and the 3 mm one
    mask_weight: float = 1.0  # body-mask channel weight among the 12 MIND-SSC channels
    ct_intensity_weight: float = 2.0  # weight of the windowed-HU channel when both images are CT
    ct_bone_weight: float = 0.0  # weight of the bone-window channel when both images are CT
    deformable: ConvexAdamOptions = field(default_factory=ConvexAdamOptions)
    verify: InterPatientVerifyOptions = field(default_factory=InterPatientVerifyOptions)
    prealigned_mm: float = 3.0  # scanner boxes intersect and the affine moves < this (mean): keep scanner coordinates
    threads: int = 1  # torch CPU threads (small ops: one thread is fastest and robust on shared cores)
    seed: int = 0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deformable"] = self.deformable.to_dict()
        d["verify"] = self.verify.to_dict()
        return d


@dataclass(eq=False)
class WorkImage:
    """One image on its identity-direction working grid: features (MIND-SSC + body) and mask."""

    volume: Volume
    grid: Grid
    features: torch.Tensor  # (1, C, z, y, x)
    mask: torch.Tensor  # (1, 1, z, y, x) float body mask

    @property
    def centroid(self) -> np.ndarray:
        """LPS centre of mass of the body."""
        kji = np.argwhere(self.mask[0, 0].numpy() > 0.5)
        return self.grid.index_to_lps(kji[:, ::-1].mean(0))

    def pooled(self, k: int) -> "WorkImage":
        """Features and mask averaged over k^3 cells (the coarse search grid)."""
        if k == 1:
            return self
        feats = F.avg_pool3d(self.features, k, stride=k, ceil_mode=True)
        mask = F.avg_pool3d(self.mask, k, stride=k, ceil_mode=True)
        sp = np.asarray(self.grid.spacing)
        origin = np.asarray(self.grid.origin) + sp * (k - 1) / 2
        grid = Grid(tuple(float(v) for v in origin), tuple(float(v) for v in sp * k), tuple(feats.shape[2:]))
        return WorkImage(self.volume, grid, feats, mask)


def _window(array: np.ndarray, window: tuple) -> torch.Tensor:
    lo, hi = window
    return torch.from_numpy(np.clip((array.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0))[None, None]


def work_image(volume: Volume, spacing_mm: float, mask_weight: float, intensity_weight: float = 0.0,
               bone_weight: float = 0.0) -> WorkImage:
    """Resample ``volume`` to the working grid: MIND-SSC (offsets of one voxel), the body mask and,
    with ``intensity_weight`` > 0 (two CTs), the soft-tissue window of the Hounsfield units: they
    are calibrated across scanners and people, so fat, organ, contrast and bone keep their values
    between patients where MIND-SSC only sees edges."""
    mv = resample_to_model_grid(volume, spacing_mm)
    mask = body_mask(mv)
    if mask.sum() < 100:
        raise RegistrationError(f"{volume.name or 'image'}: too little body to register between patients")
    img = torch.from_numpy(normalize_intensity(mv.array, volume.modality))[None, None]
    m = torch.from_numpy(mask.astype(np.float32))[None, None]
    channels = [mind_ssc(img, 1, 1), mask_weight * m]
    if intensity_weight > 0:
        channels.append(intensity_weight * _window(mv.array, HU_WINDOW))
    if bone_weight > 0:
        channels.append(bone_weight * _window(mv.array, BONE_WINDOW))
    feats = torch.cat(channels, 1)
    grid = Grid(tuple(float(v) for v in mv.origin), (float(spacing_mm),) * 3, tuple(mv.array.shape))
    return WorkImage(volume, grid, feats, m)


# --- the distance of a linear pose ----------------------------------------------------------------
class PoseDistance:
    """Mean feature distance over the fixed body of a fixed -> moving linear map.

    Fixed body points whose image falls outside the moving image cost ``chance`` (the distance
    between unrelated body voxels), so a pose cannot improve by leaving the moving field of view.
    """

    def __init__(self, fixed: WorkImage, moving: WorkImage, max_points: int, seed: int):
        kji = np.argwhere(fixed.mask[0, 0].numpy() > 0.5)
        rng = np.random.default_rng(seed)
        if len(kji) > max_points:
            kji = kji[np.sort(rng.choice(len(kji), max_points, replace=False))]
        self.points = torch.as_tensor(fixed.grid.index_to_lps(kji[:, ::-1].astype(float)), dtype=torch.float32)
        z, y, x = kji.T
        self.fixed_feats = fixed.features[0][:, z, y, x]  # (C, N)
        self.moving = moving
        # the moving image with a channel that is 1 inside it (zero padding makes it fall off at the border)
        self.moving_stack = torch.cat([moving.features, torch.ones_like(moving.mask)], 1)
        mk = np.argwhere(moving.mask[0, 0].numpy() > 0.5)
        pick = mk[rng.choice(len(mk), min(len(mk), self.fixed_feats.shape[1]), replace=True)]
        unrelated = moving.features[0][:, pick[:, 0], pick[:, 1], pick[:, 2]]
        n = min(unrelated.shape[1], self.fixed_feats.shape[1])
        self.chance = float((self.fixed_feats[:, :n] - unrelated[:, :n]).square().mean())

    def sample_moving(self, pts: torch.Tensor) -> torch.Tensor:
        """(C + 1, ...) moving features and inside-ness at LPS points (..., 3)."""
        offset, scale = self.moving.grid.normalizer(dtype=pts.dtype)
        norm = ((pts - offset) * scale).reshape(1, 1, 1, -1, 3)
        out = F.grid_sample(self.moving_stack, norm, mode="bilinear", padding_mode="zeros", align_corners=True)
        return out[0, :, 0, 0].reshape(self.moving_stack.shape[1], *pts.shape[:-1])

    def __call__(self, matrices: torch.Tensor) -> torch.Tensor:
        """Distances of a batch of 4x4 fixed -> moving maps (B, 4, 4) -> (B,)."""
        pts = torch.einsum("bij,nj->bni", matrices[:, :3, :3], self.points) + matrices[:, None, :3, 3]
        s = self.sample_moving(pts)  # (C + 1, B, N)
        inside = s[-1]
        d = (s[:-1] - self.fixed_feats[:, None, :]).square().mean(0)
        return (inside * d + (1.0 - inside) * self.chance).mean(1)

    def inside_fraction(self, matrix: np.ndarray) -> float:
        m = torch.as_tensor(matrix, dtype=torch.float32)
        pts = self.points @ m[:3, :3].T + m[:3, 3]
        return float(self.sample_moving(pts)[-1].gt(0.5).float().mean())


def _translation(t) -> np.ndarray:
    m = np.eye(4)
    m[:3, 3] = t
    return m


def search_starts(dist: PoseDistance, fixed: WorkImage, moving: WorkImage, opts: InterPatientOptions,
                  scanner_boxes_intersect: bool) -> list[tuple[str, np.ndarray, float]]:
    """The starting poses: [(name, 4x4, distance)], best first.

    Body centres of mass aligned, then every translation on the search grid (the full slab range in
    z, +-search_across_mm in x and y); the best ``opts.starts`` poses at least
    ``start_separation_mm`` apart; plus the centre-of-mass start and, when the scanner boxes
    intersect, the identity (scanner coordinates)."""
    base = moving.centroid - fixed.centroid
    step = opts.search_step_mm
    ext_f = fixed.grid.upper - np.asarray(fixed.grid.origin)
    ext_m = moving.grid.upper - np.asarray(moving.grid.origin)
    zr = 0.5 * (ext_f[2] + ext_m[2])
    zs = np.arange(-np.floor(zr / step), np.floor(zr / step) + 1) * step
    xstep = 2 * step  # across the body: coarser, the affine refines it
    xs = np.arange(-np.floor(opts.search_across_mm / xstep), np.floor(opts.search_across_mm / xstep) + 1) * xstep
    offs = np.stack(np.meshgrid(xs, xs, zs, indexing="ij"), -1).reshape(-1, 3)
    mats = np.repeat(np.eye(4)[None], len(offs), 0)
    mats[:, :3, 3] = base + offs
    scores = []
    with torch.no_grad():
        for i in range(0, len(mats), 64):
            scores.append(dist(torch.as_tensor(mats[i:i + 64], dtype=torch.float32)))
    scores = torch.cat(scores).numpy()
    starts: list[tuple[str, np.ndarray, float]] = []
    for i in np.argsort(scores):
        t = mats[i, :3, 3]
        if all(np.linalg.norm(t - s[1][:3, 3]) >= opts.start_separation_mm for s in starts):
            starts.append((f"search {len(starts) + 1}", mats[i], float(scores[i])))
        if len(starts) == opts.starts:
            break
    with torch.no_grad():
        com = _translation(base)
        starts.append(("centres of mass", com, float(dist(torch.as_tensor(com[None], dtype=torch.float32))[0])))
        if scanner_boxes_intersect:
            starts.append(("scanner coordinates", np.eye(4),
                           float(dist(torch.as_tensor(np.eye(4)[None], dtype=torch.float32))[0])))
    return starts


def optimise_affine(dist: PoseDistance, start: np.ndarray, centre: np.ndarray, iterations: int,
                    penalty: float) -> tuple[np.ndarray, float]:
    """Adam on q = (I + dA)(p - c) + c + t from ``start`` -> (4x4, final distance)."""
    a0 = torch.as_tensor(start[:3, :3], dtype=torch.float32)
    c = torch.as_tensor(centre, dtype=torch.float32)
    t0 = torch.as_tensor(start[:3, 3], dtype=torch.float32) + a0 @ c - c  # translation about the centre
    da = torch.zeros(3, 3, requires_grad=True)
    dt = torch.zeros(3, requires_grad=True)
    adam = torch.optim.Adam([{"params": [da], "lr": 0.004}, {"params": [dt], "lr": 1.0}])

    def matrix():
        a = a0 + da
        m = torch.eye(4)
        m = m.clone()
        m[:3, :3] = a
        m[:3, 3] = c + t0 + dt - a @ c
        return m

    for _ in range(iterations):
        adam.zero_grad()
        m = matrix()
        loss = dist(m[None])[0] + penalty * dist.chance * (a0 + da - torch.eye(3)).square().sum()
        loss.backward()
        adam.step()
    with torch.no_grad():
        m = matrix()
        return m.numpy().astype(np.float64), float(dist(m[None])[0])


@dataclass(eq=False)
class AffineCandidate:
    name: str
    start: np.ndarray
    start_distance: float
    matrix: np.ndarray
    distance: float  # on the working grid


def affine_candidates(fixed: WorkImage, moving: WorkImage, opts: InterPatientOptions) -> tuple[list, PoseDistance]:
    """Every start refined to an affine on the coarse then the working grid; best first."""
    k = max(1, int(round(opts.search_step_mm / opts.spacing_mm)))
    cf, cm = fixed.pooled(k), moving.pooled(k)
    coarse = PoseDistance(cf, cm, opts.coarse_points, opts.seed)
    fine = PoseDistance(fixed, moving, opts.fine_points, opts.seed)
    centre = fixed.centroid
    starts = search_starts(coarse, cf, cm, opts, scanner_gap_mm(fixed.volume, moving.volume) == 0.0)
    out = []
    for name, m0, _ in starts:
        with torch.no_grad():  # the start's distance on the grid the result is measured on
            d0 = float(fine(torch.as_tensor(m0[None], dtype=torch.float32))[0])
        m1, _ = optimise_affine(coarse, m0, centre, opts.affine_iterations[0], opts.affine_penalty)
        m2, d2 = optimise_affine(fine, m1, centre, opts.affine_iterations[1], opts.affine_penalty)
        out.append(AffineCandidate(name, m0, d0, m2, d2))
    out.sort(key=lambda c: c.distance)
    return out, fine


def inverse_affine_error(fixed: WorkImage, moving: WorkImage, matrix: np.ndarray, opts: InterPatientOptions,
                         points: np.ndarray) -> dict:
    """Inverse consistency: the affine refined from the moving image's side, started at the inverse
    of ``matrix``; returns the distances (mm) |B(A(p)) - p| over fixed body points ``points``."""
    back = PoseDistance(moving, fixed, opts.fine_points, opts.seed + 1)
    inv = np.linalg.inv(matrix)
    b, _ = optimise_affine(back, inv, moving.centroid, opts.affine_iterations[1], opts.affine_penalty)
    p = np.c_[points, np.ones(len(points))]
    err = np.linalg.norm((p @ matrix.T @ b.T)[:, :3] - points, axis=1)
    return {"median_mm": round(float(np.median(err)), 2), "p90_mm": round(float(np.percentile(err, 90)), 2),
            "max_mm": round(float(err.max()), 2)}


def _warp_linear(moving: WorkImage, fixed_grid: Grid, matrix: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Moving features on the fixed grid through ``matrix`` and the inside-the-moving-image weight."""
    pts = fixed_grid.points_torch() @ torch.as_tensor(matrix[:3, :3].T, dtype=torch.float32) \
        + torch.as_tensor(matrix[:3, 3], dtype=torch.float32)
    stack = torch.cat([moving.features, torch.ones_like(moving.mask)], 1)
    offset, scale = moving.grid.normalizer()
    out = F.grid_sample(stack, (pts - offset) * scale, mode="bilinear", padding_mode="zeros", align_corners=True)
    return out[:, :-1], out[:, -1:]


def register_interpatient(fixed: Volume, moving: Volume, mode: str = "affine", deformable: bool = True,
                          options: Optional[InterPatientOptions] = None,
                          progress: Progress = None) -> RegistrationResult:
    """Register ``moving`` (another patient) onto ``fixed``: fixed LPS -> moving LPS transforms.

    ``mode`` 'affine' (default) or 'rigid' is accepted for the CLI's sake; between patients the
    linear step is always a penalised affine (said in the report). Raises RegistrationError (one
    line) when the inter-patient verification fails.
    """
    opts = options or InterPatientOptions()
    with torch_threads(opts.threads, torch.device("cpu")):
        return _register(fixed, moving, mode, deformable, opts, progress or (lambda f, m: None))


def _body_distance(fixed: WorkImage, warped: torch.Tensor, inside: torch.Tensor, chance: float) -> float:
    """Mean feature distance over the fixed body of moving features already on the fixed grid;
    ``chance`` where the map left the moving image (as PoseDistance)."""
    d = (fixed.features - warped).square().mean(1, keepdim=True)
    valid = inside.gt(0.99).float()  # half-inside border voxels would compare padding, not anatomy
    per_voxel = valid * d + (1.0 - valid) * chance
    return float((per_voxel * fixed.mask).sum() / fixed.mask.sum().clamp_min(1.0))


def _register(fixed: Volume, moving: Volume, mode: str, deformable: bool, opts: InterPatientOptions,
              report_progress) -> RegistrationResult:
    torch.manual_seed(opts.seed)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    report_progress(0.02, "MIND-SSC descriptors")
    both_ct = fixed.modality is Modality.CT and moving.modality is Modality.CT
    iw = opts.ct_intensity_weight if both_ct else 0.0
    bw = opts.ct_bone_weight if both_ct else 0.0
    fw = work_image(fixed, opts.spacing_mm, opts.mask_weight, iw, bw)
    mw = work_image(moving, opts.spacing_mm, opts.mask_weight, iw, bw)
    timing["descriptors_s"] = round(time.perf_counter() - t0, 3)

    t = time.perf_counter()
    report_progress(0.15, "start search and affine from every start")
    candidates, fine = affine_candidates(fw, mw, opts)
    chosen = candidates[0]
    timing["start_search_affine_s"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    report_progress(0.45, "inverse consistency")
    inverse = inverse_affine_error(fw, mw, chosen.matrix, opts, fine.points.numpy().astype(np.float64))
    timing["inverse_consistency_s"] = round(time.perf_counter() - t, 3)

    # a pair already aligned in scanner coordinates (e.g. both affinely registered to one atlas):
    # an affine change of a few mm between two people is below what the 3 mm grid resolves, so the
    # scanner coordinates stay the linear part
    pts = fine.points.numpy().astype(np.float64)
    scanner = next((c for c in candidates if c.name == "scanner coordinates"), None)
    linear = chosen.matrix
    if scanner is not None and pose_gap_mm(chosen.matrix, np.eye(4), pts) < opts.prealigned_mm:
        linear = np.eye(4)

    displacement = None
    det_stats: dict = {}
    deform_stats: dict = {}
    warped_f, inside = _warp_linear(mw, fw.grid, linear)
    weight = fw.mask * inside.gt(0.99).float()
    if deformable:
        t = time.perf_counter()
        report_progress(0.6, "deformable (convex search + Adam)")
        u, deform_stats = convex_adam(fw.features, warped_f, weight, fw.grid, opts.deformable)
        det = jacobian_determinant(u, fw.grid.spacing)
        det_stats = jacobian_stats(det, (fw.mask[0, 0] > 0.5).numpy())
        warped_f = warp_on_grid(warped_f, u, fw.grid)
        displacement = u
        timing["deformable_s"] = round(time.perf_counter() - t, 3)

    body_fixed = fw.mask[0, 0] > 0.5
    body_warped = warped_f[0, MASK_CHANNEL] / max(opts.mask_weight, 1e-6) > 0.5
    valid = inside[0, 0] > 0.99
    inter = (body_fixed & body_warped & valid).sum().item()
    denom = (body_fixed & valid).sum().item() + (body_warped & valid).sum().item()
    body_dice = 2.0 * inter / max(denom, 1)
    identity = None
    if scanner is not None:  # the result must fit better than simply using the scanner coordinates
        id_warped, id_inside = _warp_linear(mw, fw.grid, np.eye(4))
        identity = {"identity": round(_body_distance(fw, id_warped, id_inside, fine.chance), 6),
                    "result": round(_body_distance(fw, warped_f, inside, fine.chance), 6)}
    verification = verify_interpatient(candidates, inverse, det_stats, deform_stats, body_dice,
                                       fine.inside_fraction(linear), opts.verify, pts, fine.chance, identity)
    if not verification["passed"]:
        raise RegistrationError(f"the inter-patient registration could not be verified: {verification['reason']}")

    linear_tf = sitk_affine(linear)
    composite = sitk.CompositeTransform(3)
    composite.AddTransform(linear_tf)
    disp_img = None
    if displacement is not None:
        disp_img = displacement_image(displacement, fw.grid)
        composite.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(disp_img)))
    timing["total_s"] = round(time.perf_counter() - t0, 3)
    report = {"pair": "inter-patient", "mode": "affine (penalised, inter-patient)", "requested_mode": mode,
              "deformable": bool(deformable), "coarse": False, "features": "mind-ssc + body mask",
              "convention": "fixed LPS -> moving LPS (ITK)",
              "fixed": {"name": fixed.name, "modality": fixed.modality.value, "size_xyz": list(fixed.size_xyz),
                        "spacing_mm": list(fixed.spacing)},
              "moving": {"name": moving.name, "modality": moving.modality.value, "size_xyz": list(moving.size_xyz),
                         "spacing_mm": list(moving.spacing)},
              "starts": [{"name": c.name, "start_translation_mm": np.round(c.start[:3, 3], 1).tolist(),
                          "start_distance": round(c.start_distance, 5), "affine_distance": round(c.distance, 5)}
                         for c in candidates],
              "chosen_start": chosen.name, "linear_matrix": linear.tolist(),
              "linear_kept": "scanner coordinates (pre-aligned pair)" if linear is not chosen.matrix else "affine",
              "linear": {"inliers": None, "matches": None, "residual_mm_inliers": {"median": None}},
              "inverse_consistency_mm": inverse, "body_dice": round(body_dice, 4),
              "deformable_stats": deform_stats, "jacobian": det_stats,
              "folding_percent": det_stats.get("folding_percent") if det_stats else None,
              "verification": verification, "timing": timing, "settings": opts.to_dict(),
              "warnings": ["inter-patient pair: the transform aligns anatomy between two people; "
                           "expect organ-level, not millimetre-level, agreement"]}
    report_progress(1.0, "registration done")
    return RegistrationResult(linear_tf, disp_img, composite, report)

