"""Deformable refinement by instance optimisation (SAME++ / CrossSAM style).

A stationary velocity field v on a coarse control grid over the fixed image's common field
of view is optimised with Adam so that the moving image, seen through
``linear o (id + coarse) o exp(v)``, agrees with the fixed image:

* embedding term: 1 - cosine of fine SAM embeddings (fixed vs. warped moving);
* optional intensity term: local NCC for the same modality, MIND-SSC SSD across modalities;
* diffusion regulariser on the velocity (weight ``smoothness``).

For speed on CPUs the similarity is evaluated on a random subset of sample points inside the
fixed body each iteration (stochastic optimisation, as elastix' random sampler), local NCC on
small random patches, and the gradient is passed through the exponential map with the
small-deformation approximation d exp(v)/dv ~ identity (as in log-domain demons) unless
``exact_gradient`` is set. The exponential itself (scaling and squaring) is always exact, so
the result is a diffeomorphism; coarse-to-fine over the velocity grid spacings ``levels_mm``.
Runs on CUDA / MPS when present, else CPU.

The velocity is tapered to zero at the border of its domain so the field joins the linear
transform continuously outside the common field of view.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..device import select_device, torch_threads
from ..grid import Grid
from ..intensity import ncc_loss
from ..progress import Progress
from .grid import DisplacementField, crop_to_box, sample
from .mind import mind_ssc
from .svf import diffusion, integrate_svf
from .views import DeformableImage, candidate_points, resolve_intensity_term


@dataclass
class DeformableOptions:
    """Settings of the instance optimisation (defaults tuned on 2 CPU cores; see the benchmark)."""

    levels_mm: tuple[float, ...] = (24.0, 12.0)  # velocity control-grid spacing per level
    iterations: tuple[int, ...] = (40, 30)
    learning_rate: float = 0.5  # Adam step on the velocity, in mm
    smoothness: float = 0.5  # weight of the velocity diffusion (dimensionless gradient^2)
    embedding_weight: float = 1.0
    intensity: str = "auto"  # 'auto' (LNCC same modality / MIND cross), 'lncc', 'mind', 'none'
    intensity_weight: float = 1.0
    sample_spacing_mm: float = 4.0  # candidate sample points / patch voxels
    points_per_iteration: int = 12000
    patch_size: int = 3  # local NCC patch (voxels of sample_spacing_mm per side)
    patches_per_iteration: int = 1500
    feature_channels: int = 16  # PCA-reduce embeddings to this many channels (0 = keep all)
    squaring_steps: int = 7
    taper_mm: float = 24.0
    field_spacing_mm: float = 4.0  # spacing of the returned displacement field
    exact_gradient: bool = False
    cpu_threads: Optional[int] = 1  # torch threads for the CPU loop (None: leave torch's setting)
    device: str = "auto"
    seed: int = 0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def taper_window(grid: Grid, taper_mm: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """(1, 1, z, y, x) window: 0 on the grid border, rising (cosine) to 1 at ``taper_mm`` inside."""
    if taper_mm <= 0:
        return torch.ones((1, 1) + tuple(grid.shape), device=device, dtype=dtype)
    ws = []
    for axis, n in zip((2, 1, 0), grid.shape):  # grid.shape is (z, y, x)
        pos = np.arange(n) * grid.spacing[axis]
        t = np.clip(np.minimum(pos, pos[-1] - pos) / taper_mm, 0, 1)
        ws.append(0.5 - 0.5 * np.cos(np.pi * t))
    w = ws[0][:, None, None] * ws[1][None, :, None] * ws[2][None, None, :]
    return torch.as_tensor(w, device=device, dtype=dtype)[None, None]


def _pca_project(a: torch.Tensor, b: torch.Tensor, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project two (1, C, ...) feature maps on the top-``k`` principal axes of both together.

    Cosines between the projected vectors approximate the full cosines (most of the
    embedding variance lives in a few dozen directions) at a fraction of the sampling cost.
    """
    c = a.shape[1]
    if k <= 0 or k >= c:
        return a.float(), b.float()
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for t in (a, b):
        flat = t.reshape(c, -1)
        idx = torch.randint(0, flat.shape[1], (min(20000, flat.shape[1]),), generator=gen).to(flat.device)
        samples.append(flat[:, idx].T.float())
    x = torch.cat(samples)
    mean = x.mean(0, keepdim=True)
    _, _, v = torch.linalg.svd(x - mean, full_matrices=False)
    basis = v[:k].T  # (C, k)

    def proj(t):
        flat = t.reshape(c, -1).T.float() - mean
        return (flat @ basis).T.reshape(1, k, *t.shape[2:]).contiguous()

    return proj(a), proj(b)


def refine_deformable(fixed: DeformableImage, moving: DeformableImage, fixed_to_moving: np.ndarray,
                      valid_lo, valid_hi, init=None, options: Optional[DeformableOptions] = None,
                      progress: Progress = None) -> DisplacementField:
    """Optimise the deformable refinement and return the total nonlinear displacement.

    ``fixed_to_moving`` is the 4x4 linear map (fixed LPS -> moving LPS). The similarity is
    measured inside the LPS box [valid_lo, valid_hi] (the common field of view) and where
    the warped point lies inside the moving image; the field's domain is that box grown by
    ``taper_mm``. ``init`` is an optional callable mapping (1, ..., 3) LPS point tensors to
    their initial displacement (e.g. SAM-coarse); it is applied after the optimised flow:
    total(x) = d(x) + init(x + d(x)). Returns a DisplacementField on a ``field_spacing_mm`` grid.
    """
    opt = options or DeformableOptions()
    dev = select_device(opt.device)
    with torch_threads(opt.cpu_threads, dev):
        return _refine(fixed, moving, fixed_to_moving, valid_lo, valid_hi, init, opt, progress, dev)


def _refine(fixed, moving, fixed_to_moving, valid_lo, valid_hi, init, opt, progress, dev) -> DisplacementField:
    if len(opt.levels_mm) != len(opt.iterations):
        raise ValueError("levels_mm and iterations must have the same length")
    report = progress or (lambda f, m: None)
    dt = torch.float32
    gen = torch.Generator().manual_seed(opt.seed)
    term = resolve_intensity_term(opt.intensity, fixed.modality, moving.modality)
    use_emb = opt.embedding_weight > 0 and fixed.features is not None and moving.features is not None
    use_int = opt.intensity_weight > 0 and term != "none"
    if not use_emb and not use_int:
        raise ValueError("the deformable step needs embeddings or an intensity term: both are disabled")
    t0 = time.perf_counter()
    valid_lo, valid_hi = np.asarray(valid_lo, float), np.asarray(valid_hi, float)
    dom_lo, dom_hi = valid_lo - opt.taper_mm, valid_hi + opt.taper_mm
    lin = torch.as_tensor(np.asarray(fixed_to_moving, float), dtype=dt, device=dev)
    m_lo = torch.as_tensor(np.asarray(moving.intensity_grid.origin), dtype=dt, device=dev)
    m_hi = torch.as_tensor(moving.intensity_grid.upper, dtype=dt, device=dev)

    # --- fixed side: sample points and their descriptors, computed once -----------------
    cand = candidate_points(fixed, valid_lo, valid_hi, opt.sample_spacing_mm)
    if len(cand) < 50:
        raise ValueError(f"only {len(cand)} sample points inside the fixed body and the common field of view")
    cand_t = torch.as_tensor(cand, dtype=dt, device=dev)[None]
    # Moving-side maps, cropped to the part the fixed box can reach (keeps memory small).
    reach = np.array([[a, b, c] for a in (dom_lo[0], dom_hi[0]) for b in (dom_lo[1], dom_hi[1])
                      for c in (dom_lo[2], dom_hi[2])]) @ np.asarray(fixed_to_moving)[:3, :3].T + np.asarray(fixed_to_moving)[:3, 3]
    r_lo, r_hi = reach.min(0) - 40.0, reach.max(0) + 40.0
    pool = max(1, int(round(opt.sample_spacing_mm / max(moving.intensity_grid.spacing))))
    m_int, m_int_grid = crop_to_box(moving.intensity.to(dev, dt), moving.intensity_grid, r_lo, r_hi, pool)
    f_int, f_int_grid = crop_to_box(fixed.intensity.to(dev, dt), fixed.intensity_grid, dom_lo - 8, dom_hi + 8, pool)

    f_emb = m_emb_map = None
    if use_emb:
        fe, fe_grid = crop_to_box(fixed.features.to(dev), fixed.feature_grid, dom_lo - 8, dom_hi + 8)
        me, me_grid = crop_to_box(moving.features.to(dev), moving.feature_grid, r_lo, r_hi)
        fe, m_emb_map = _pca_project(fe, me, opt.feature_channels, opt.seed)
        f_emb = sample(fe, fe_grid, cand_t)[0].T  # (N, C)
        m_emb_grid = me_grid
    f_mind = m_mind = None
    if use_int and term == "mind":
        # radius 1, dilation 1 on the (pooled) sample grid: tuned on simulated CT -> MR-like pairs
        f_mind_map, m_mind = mind_ssc(f_int, 1, 1), mind_ssc(m_int, 1, 1)
        f_mind = sample(f_mind_map, f_int_grid, cand_t)[0].T  # (N, 12)
    patch_off = None
    if use_int and term == "lncc":
        h = opt.patch_size // 2
        r = np.arange(-h, h + 1) * opt.sample_spacing_mm
        patch_off = torch.as_tensor(np.stack(np.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3), dtype=dt, device=dev)

    def warp(points: torch.Tensor, disp_map: torch.Tensor, grid: Grid) -> torch.Tensor:
        d = sample(disp_map, grid, points)[0].T[None]  # (1, N, 3)
        p = points + d
        if init is not None:
            p = p + init(p)
        return p @ lin[:3, :3].T + lin[:3, 3]

    def inside_moving(p: torch.Tensor) -> torch.Tensor:
        return torch.all((p >= m_lo) & (p <= m_hi), dim=-1).to(dt)[0]

    velocity, prev_grid, history = None, None, []
    n_levels = len(opt.levels_mm)
    for level, (spacing, iters) in enumerate(zip(opt.levels_mm, opt.iterations)):
        g = Grid.covering(dom_lo, dom_hi, spacing)
        taper = taper_window(g, opt.taper_mm, dev, dt)
        if velocity is None:
            velocity = torch.zeros((1, 3) + tuple(g.shape), device=dev, dtype=dt)
        else:
            velocity = sample(velocity.detach(), prev_grid, g.points_torch(dev, dt))
        velocity = velocity.detach().requires_grad_(True)
        adam = torch.optim.Adam([velocity], lr=opt.learning_rate)
        for it in range(int(iters)):
            adam.zero_grad(set_to_none=True)
            if opt.exact_gradient:
                disp = integrate_svf(velocity * taper, g, opt.squaring_steps)
                leaf = disp
            else:
                with torch.no_grad():
                    disp = integrate_svf(velocity * taper, g, opt.squaring_steps)
                leaf = disp.requires_grad_(True)
            loss = leaf.new_zeros(())
            parts = {}
            if use_emb or term == "mind":
                sel = torch.randint(0, cand_t.shape[1], (min(opt.points_per_iteration, cand_t.shape[1]),),
                                    generator=gen).to(dev)
                pm = warp(cand_t[:, sel], leaf, g)
                ok = inside_moving(pm)
                if use_emb:
                    mf = sample(m_emb_map, m_emb_grid, pm)[0].T
                    cos = F.cosine_similarity(f_emb[sel], mf, dim=1, eps=1e-6)
                    parts["embedding"] = 1.0 - (cos * ok).sum() / ok.sum().clamp_min(1.0)
                    loss = loss + opt.embedding_weight * parts["embedding"]
                if use_int and term == "mind":
                    mm = sample(m_mind, m_int_grid, pm)[0].T
                    ssd = ((f_mind[sel] - mm) ** 2).mean(1)
                    # MIND SSD is ~0.1-0.3: scaled so weight 1 balances the regulariser (tuned on simulated pairs)
                    parts["mind"] = 2.0 * (ssd * ok).sum() / ok.sum().clamp_min(1.0)
                    loss = loss + opt.intensity_weight * parts["mind"]
            if use_int and term == "lncc":
                sel = torch.randint(0, cand_t.shape[1], (min(opt.patches_per_iteration, cand_t.shape[1]),),
                                    generator=gen).to(dev)
                centres = cand_t[0, sel]
                pts = (centres[:, None, :] + patch_off[None]).reshape(1, -1, 3)
                fi = sample(f_int, f_int_grid, pts).reshape(len(sel), -1)
                pm = warp(pts, leaf, g)
                mi = sample(m_int, m_int_grid, pm).reshape(len(sel), -1)
                ok = inside_moving(pm).reshape(len(sel), -1).min(1).values
                parts["lncc"] = ncc_loss(fi, mi, ok)
                loss = loss + opt.intensity_weight * parts["lncc"]
            reg = diffusion(velocity * taper, g.spacing)
            if opt.exact_gradient:
                (loss + opt.smoothness * reg).backward()
            else:
                loss.backward()
                grad_disp = leaf.grad
                (opt.smoothness * reg).backward()
                # small-deformation approximation: d exp(v) / dv ~ identity (times the taper)
                velocity.grad = velocity.grad + grad_disp * taper
            adam.step()
            if it in (0, iters - 1):
                history.append({"level_mm": spacing, "iteration": it, "regulariser": round(float(reg.detach()), 6),
                                **{k: round(float(v.detach()), 5) for k, v in parts.items()}})
            report((level + (it + 1) / max(iters, 1)) / n_levels, f"deformable level {spacing:g} mm: {it + 1}/{iters}")
        prev_grid = g

    with torch.no_grad():
        disp = integrate_svf(velocity.detach() * taper, g, opt.squaring_steps)
        out_grid = Grid.covering(dom_lo, dom_hi, opt.field_spacing_mm)
        pts = out_grid.points_torch(dev, dt)
        total = sample(disp, g, pts)
        if init is not None:
            flat = (pts + total.permute(0, 2, 3, 4, 1)).reshape(1, -1, 3)
            total = total + init(flat).reshape(1, *out_grid.shape, 3).permute(0, 4, 1, 2, 3)
    stats = {"intensity_term": term if use_int else "none", "embedding_term": bool(use_emb),
             "device": str(dev), "velocity_grid": g.to_dict(), "field_grid": out_grid.to_dict(),
             "sample_points": int(len(cand)), "history": history,
             "seconds": round(time.perf_counter() - t0, 3), "options": opt.to_dict()}
    return DisplacementField(out_grid, total.detach().to("cpu", torch.float32), stats)
