"""CrossSAM: learn modality-independent embeddings from unpaired CT-MRI of one subject.

Stage 1 is ordinary SAM training with the aggressive intensity profile (``augment.profile:
crosssam``: random intensity curves, inversion, blur, affine), run on CT and MR volumes.
Stage 2 is the iterative loop of the paper, run by :func:`run_crosssam`: for each round

1. register every user-supplied (fixed, moving) pair with the *current* model - rigid from
   stable embedding matches (Kabsch inside RANSAC), crop to the overlapping field of view
   with the round's margin, then a deformable refinement when available (AdaReg);
2. train ``crosssam.iterations_per_round`` steps in which, with probability
   ``crosssam.pair_prob``, the batch is a registered pair: positives at corresponding points
   inside the overlap, negatives from the other image plus extra negatives from the part of
   the fixed (large field of view) image outside the overlap; other steps are SAM steps;
3. shrink the margin (``crosssam.margins_mm``) and repeat.

Registrations are saved per round in RUN_DIR/crosssam/round_XX.npz (plain arrays), so a
resumed run reuses exactly the registration its interrupted round trained on.
No same-subject CT-MRI pair exists in ../shared/data: the tests run the loop on a pair
simulated from a real CT (known motion + MR-like contrast), and say so.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import map_coordinates

from samv2core.embed import Embedder
from samv2core.errors import RegistrationError
from samv2core.fitting import robust_fit
from samv2core.matching import stable_matches
from samv2core.outputs import atomic_write
from samv2core.preprocess import body_mask
from samv2core.registration import register
from samv2core.registration.fov import overlap_crop
from samv2core.registration.sampling import grid_points_in_mask
from samv2core.session import EmbeddingSession
from samv2core.volume import Volume, load_volume

from .augment import View, augment_intensity, extract_mask, extract_patch, random_view
from .config import TrainConfig
from .data import TrainVolume, load_label_map, prepare_volume
from .view_pairs import ViewPair
from .trainer import Trainer


@dataclass
class PairRegistration:
    """fixed LPS -> moving LPS, as a 4x4 linear part plus an optional displacement grid."""

    fixed_to_moving: np.ndarray  # (4, 4)
    box_lo: np.ndarray  # fixed LPS box of the overlap (with margin)
    box_hi: np.ndarray
    method: str
    n_matches: int
    # optional deformable refinement: displacement (mm, LPS) added after the linear map,
    # sampled on an identity-direction grid in fixed space
    disp: "np.ndarray | None" = None  # (Z, Y, X, 3)
    disp_origin: "np.ndarray | None" = None
    disp_spacing: float = 0.0

    def map(self, lps: np.ndarray) -> np.ndarray:
        """Fixed LPS (N, 3) -> moving LPS (N, 3)."""
        lps = np.asarray(lps, float)
        out = lps @ self.fixed_to_moving[:3, :3].T + self.fixed_to_moving[:3, 3]
        if self.disp is not None:
            idx = (lps - self.disp_origin) / self.disp_spacing  # (x, y, z) index
            coords = idx[:, ::-1].T  # (z, y, x)
            for c in range(3):
                out[:, c] += map_coordinates(self.disp[..., c], coords, order=1, mode="nearest")
        return out

    def save(self, path: Path) -> None:
        arrays = {"fixed_to_moving": self.fixed_to_moving, "box_lo": self.box_lo, "box_hi": self.box_hi,
                  "method": np.array(self.method), "n_matches": np.array(self.n_matches)}
        if self.disp is not None:
            arrays.update(disp=self.disp, disp_origin=self.disp_origin, disp_spacing=np.array(self.disp_spacing))
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays))

    @classmethod
    def load(cls, path: Path) -> "PairRegistration":
        with np.load(path, allow_pickle=False) as z:
            disp = z["disp"] if "disp" in z.files else None
            return cls(z["fixed_to_moving"], z["box_lo"], z["box_hi"], str(z["method"]), int(z["n_matches"]), disp,
                       z["disp_origin"] if disp is not None else None,
                       float(z["disp_spacing"]) if disp is not None else 0.0)


def _eval_copy(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model).cpu().float()
    m.eval()
    return m


def register_pair(model: torch.nn.Module, fixed: Volume, moving: Volume, margin_mm: float,
                  deformable: bool = True, log=print) -> PairRegistration:
    """AdaReg with the current model: rigid from stable matches, FOV crop, deformable refinement.

    Uses ``samv2core.registration.register``; when it refuses the pair, a rigid RANSAC/Kabsch
    fit of SAME++ stable matches (samv2core.matching) and no deformable step.
    """
    # a fresh session per call: the model's weights change between rounds
    embedder = EmbeddingSession(Embedder(_eval_copy(model), device="cpu", precision="fp32",
                                         storage_dtype=torch.float32,
                                         model_id=f"crosssam-{id(model)}-{np.random.randint(1 << 30)}"))
    try:
        res = register(fixed, moving, mode="rigid", deformable=deformable, embedder=embedder)
        m4 = np.asarray(res.linear_matrix, float).reshape(4, 4)
        rep = getattr(res, "report", {}) or {}
        n = rep.get("inliers", rep.get("matches", 0))
        reg = PairRegistration(m4, *_box(fixed, moving, m4, margin_mm), "register(rigid"
                               + (",deformable)" if deformable else ")"), int(n) if isinstance(n, (int, float)) else 0)
        if deformable and getattr(res, "displacement", None) is not None:
            reg = _with_displacement(reg, res.transform_points, fixed)
        log(f"  registered {fixed.name} -> {moving.name} with samv2core.registration.register ({reg.method})")
        return reg
    except RegistrationError as exc:
        log(f"  register() refused this pair ({str(exc)[:160]}); trying a rigid fit of stable matches")
    except (AttributeError, TypeError, ValueError) as exc:
        log(f"  samv2core.registration.register not usable here ({str(exc)[:120]}); "
            "falling back to a rigid fit of stable matches")
    return _rigid_from_matches(embedder, fixed, moving, margin_mm, log)


def _box(fixed: Volume, moving: Volume, m4: np.ndarray, margin_mm: float):
    crop = overlap_crop(fixed, moving, m4, margin_mm=margin_mm)
    return crop.fixed_lo, crop.fixed_hi


def _with_displacement(reg: PairRegistration, map_points, fixed: Volume, spacing: float = 8.0) -> PairRegistration:
    """Tabulate a registration's point map as linear part + displacement grid over the box."""
    lo, hi = reg.box_lo, reg.box_hi
    n = np.maximum(2, np.ceil((hi - lo) / spacing).astype(int) + 1)
    axes = [lo[d] + spacing * np.arange(n[d]) for d in range(3)]
    zz, yy, xx = np.meshgrid(axes[2], axes[1], axes[0], indexing="ij")
    pts = np.stack([xx, yy, zz], -1).reshape(-1, 3)
    full = np.asarray(map_points(pts), float)
    lin = pts @ reg.fixed_to_moving[:3, :3].T + reg.fixed_to_moving[:3, 3]
    disp = (full - lin).reshape(n[2], n[1], n[0], 3)
    return PairRegistration(reg.fixed_to_moving, lo, hi, reg.method, reg.n_matches, disp, lo.copy(), spacing)


def _rigid_from_matches(embedder, fixed: Volume, moving: Volume, margin_mm: float, log) -> PairRegistration:
    ef, em = embedder.embed(fixed), embedder.embed(moving)
    # query points on the smaller field of view (the moving image in CrossSAM's setting)
    pts = grid_points_in_mask(moving, body_mask(moving), spacing_mm=16.0)
    if len(pts) < 12:
        raise RegistrationError(f"{moving.name}: too few body points ({len(pts)}) to register")
    sm = stable_matches(em, ef, pts)
    if len(sm.template_lps) < 12:
        raise RegistrationError(f"only {len(sm.template_lps)} stable matches between {fixed.name} and {moving.name}")
    fit = robust_fit(sm.query_lps, sm.template_lps, mode="rigid", threshold_mm=10.0, scores=sm.scores)
    m4 = fit.homogeneous()
    log(f"  rigid fit {fixed.name} -> {moving.name}: {fit.n_inliers}/{len(sm.template_lps)} inliers, "
        f"median residual {np.median(fit.residuals_mm[fit.inliers]):.1f} mm (rigid only, no deformable step)")
    return PairRegistration(m4, *_box(fixed, moving, m4, margin_mm), "rigid-from-stable-matches",
                            int(len(sm.template_lps)))


def make_pair_source(fixed: TrainVolume, moving: TrainVolume, reg: PairRegistration, patch_size, aug,
                     index: int = -1):
    """A callable rng -> ViewPair for a registered pair (A = fixed, B = moving).

    View A is a random view of the fixed image centred inside the overlap box; view B covers
    the same anatomy in the moving image (the linear map composed with its own small random
    scale/rotation). Correspondences go through the full registration (deformable included).
    Both views get the aggressive CrossSAM intensity augmentation with probability 0.5.
    """
    lin = reg.fixed_to_moving[:3, :3]
    # fixed voxel (z,y,x) -> moving voxel (z,y,x): P (reverse axes) composed with the LPS map
    flip = np.eye(3)[::-1]
    vox_lin = flip @ lin @ flip  # spacing identical (both on the model grid)
    lo_v = fixed.lps_to_voxel(reg.box_lo[None])[0]
    hi_v = fixed.lps_to_voxel(reg.box_hi[None])[0]
    box_min, box_max = np.minimum(lo_v, hi_v), np.maximum(lo_v, hi_v)

    def b_from_a(v):
        return moving.lps_to_voxel(reg.map(fixed.voxel_to_lps(v)))

    def a_valid(v):
        v = np.asarray(v, float)
        return np.all((v >= box_min - 0.5) & (v <= box_max + 0.5), axis=1)

    def source(rng: np.random.Generator) -> ViewPair:
        aggressive = rng.random() < 0.5
        centre = _overlap_centre(rng, fixed, moving, box_min, box_max, b_from_a)
        va = random_view(rng, centre, patch_size, aug, aggressive)
        cb = b_from_a(centre[None])[0]
        jitter = random_view(rng, cb, patch_size, aug, aggressive).matrix
        vb = View(cb, vox_lin @ jitter, tuple(patch_size))
        pa = augment_intensity(extract_patch(fixed.image, va), rng, aug, aggressive)
        pb = augment_intensity(extract_patch(moving.image, vb), rng, aug, aggressive)
        fov = None
        outside = _outside_centre(rng, fixed, box_min, box_max)
        if outside is not None:
            vf = random_view(rng, outside, patch_size, aug, aggressive)
            fov = augment_intensity(extract_patch(fixed.image, vf), rng, aug, aggressive)
        return ViewPair(index, pa, pb, va, vb, extract_mask(fixed.body, va), extract_mask(moving.body, vb),
                        None, None, "", fixed.spacing_mm, b_from_a=b_from_a, a_valid=a_valid, patch_fov=fov)

    return source


def _overlap_centre(rng, fixed: TrainVolume, moving: TrainVolume, box_min, box_max, b_from_a, tries: int = 30):
    """A fixed-image voxel inside the overlap box, in the body, whose match is in the moving body."""
    c = rng.uniform(box_min, box_max)
    for _ in range(tries):
        c = rng.uniform(box_min, box_max)
        i = np.clip(np.rint(c).astype(int), 0, np.asarray(fixed.shape) - 1)
        if not bool(fixed.body[tuple(i)]):
            continue
        m = np.rint(b_from_a(c[None])[0]).astype(int)
        if np.all((m >= 0) & (m < np.asarray(moving.shape))) and bool(moving.body[tuple(m)]):
            return c
    return c


def _outside_centre(rng, tv: TrainVolume, box_min, box_max, tries: int = 20):
    """A body voxel of ``tv`` outside the overlap box (None when the box covers the body)."""
    shape = np.asarray(tv.shape)
    for _ in range(tries):
        c = rng.integers(0, shape)
        if bool(tv.body[tuple(int(x) for x in c)]) and not np.all((c >= box_min) & (c <= box_max)):
            return c.astype(float)
    return None


def load_pairs(cfg: TrainConfig) -> list[tuple[Volume, Volume, TrainVolume, TrainVolume]]:
    """Load every crosssam.pairs entry: (fixed Volume, moving Volume, cached fixed, cached moving)."""
    out = []
    for p in cfg.crosssam.pairs:
        vols = []
        for side in ("fixed", "moving"):
            e = p[side]
            v = load_volume(e["path"], e.get("modality") or "auto")
            lab = load_label_map(e["labels"], v) if e.get("labels") else None
            vols.append((v, prepare_volume(v, cfg.data.spacing_mm, lab, e.get("label_set", ""))))
        out.append((vols[0][0], vols[1][0], vols[0][1], vols[1][1]))
    return out


def run_crosssam(cfg: TrainConfig, resume: bool = False, log=None, pairs=None, restart: bool = False):
    """Run the iterative register-then-learn loop; returns the Trainer.

    ``run.iterations`` is ignored: the loop runs ``rounds x iterations_per_round`` steps on top
    of whatever the model was initialised with (``model.init``: typically a stage-1 model
    trained with the aggressive ``crosssam`` augmentation profile). ``pairs`` may be given
    directly as (fixed Volume, moving Volume) tuples (used by tests); otherwise
    crosssam.pairs of the config are loaded.
    """
    c = cfg.crosssam
    cfg.run.iterations = c.rounds * c.iterations_per_round
    tr = Trainer(cfg, resume=resume, log=log, restart=restart)
    if pairs is None:
        loaded = load_pairs(cfg)
    else:
        loaded = [(f, m, prepare_volume(f, cfg.data.spacing_mm), prepare_volume(m, cfg.data.spacing_mm))
                  for f, m in pairs]
    # the pair images also feed the ordinary intra-volume (SAM) steps, as in the paper
    for _, _, ftv, mtv in loaded:
        tr.volumes.extend([ftv, mtv])
    reg_dir = tr.run_dir / "crosssam"
    start_round = tr.state.step // c.iterations_per_round
    for r in range(start_round, c.rounds):
        margin = float(c.margins_mm[min(r, len(c.margins_mm) - 1)])
        sources = []
        for k, (fv, mv, ftv, mtv) in enumerate(loaded):
            path = reg_dir / f"round_{r:02d}_pair_{k:02d}.npz"
            if path.is_file():
                reg = PairRegistration.load(path)
            else:
                tr.log(f"CrossSAM round {r + 1}/{c.rounds}: registering pair {k + 1} (margin {margin:.0f} mm)")
                try:
                    reg = register_pair(tr.raw_model, fv, mv, margin, c.deformable, log=tr.log)
                except RegistrationError as exc:
                    prev = reg_dir / f"round_{r - 1:02d}_pair_{k:02d}.npz"
                    if r == 0 or not prev.is_file():
                        raise
                    # keep learning from the last registration that worked, with this round's margin
                    old = PairRegistration.load(prev)
                    lo, hi = _box(fv, mv, old.fixed_to_moving, margin)
                    reg = PairRegistration(old.fixed_to_moving, lo, hi, old.method + " (reused)", old.n_matches,
                                           old.disp, old.disp_origin, old.disp_spacing)
                    tr.log(f"  registration failed in round {r + 1} ({exc}); reusing round {r}'s transform")
                if tr.dist.is_main:
                    reg.save(path)
            sources.append(make_pair_source(ftv, mtv, reg, cfg.data.patch_size, cfg.augment, index=-1 - k))
        tr.pair_sources = sources
        tr.fit(stop_after=(r + 1) * c.iterations_per_round - tr.state.step)
    return tr
