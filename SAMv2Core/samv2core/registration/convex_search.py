"""ConvexAdam-style deformable step for inter-patient pairs (Siebert, Hansen & Heinrich,
MICCAI 2021; Learn2Reg): a coupled convex discrete search over a dense displacement cost volume
of MIND-SSC distances, then Adam instance optimisation of a stationary velocity field (integrated
by scaling and squaring, so the map stays diffeomorphic) with a diffusion penalty.

All tensors live on one identity-direction fixed grid (samv2core.grid.Grid, voxel spacing ``s``
mm); displacements are (1, 3, z, y, x) in millimetres with (x, y, z) = LPS components, applied
to fixed points: the moving features were already resampled through the linear map, so the
complete fixed -> moving map is linear(x + u(x)).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..grid import Grid
from .svf import diffusion, integrate_svf


@dataclass(frozen=True)
class ConvexAdamOptions:
    """Knobs of the deformable step (defaults: ConvexAdam's, scaled to a 3 mm working grid)."""

    search_radius: int = 4  # discrete displacements -r..r cells per axis of the pooled grid (+-24 mm at 3 mm x 2)
    cost_pool: int = 2  # the search runs on features pooled by this factor (ConvexAdam: half resolution)
    coupling: tuple = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)  # coupled convex weights, increasing
    iterations: int = 80  # Adam instance optimisation steps
    learning_rate: float = 1.0  # mm per step scale of the velocity
    smoothness: float = 0.05  # weight of the velocity field's diffusion (mean squared gradient, mm per mm)
    fine_iterations: int = 30  # then Adam on the full working grid (finer structures: ribs, vertebrae); 0: none
    fine_smoothness: float = 0.05  # diffusion weight at the fine level (0.02 folded on one CT-CT pair)
    fine_learning_rate: float = 0.5
    mask_weight: float = 1.0  # weight of the body-mask channel in the distance

    def to_dict(self) -> dict:
        return asdict(self)


def _shift_stack(moving: torch.Tensor, radius: int, z_radius: int):
    """Yield (offset (dx, dy, dz) voxels, moving shifted so voxel v holds moving(v + offset))."""
    pad = (radius, radius, radius, radius, z_radius, z_radius)
    mp = F.pad(moving, pad, mode="replicate")
    z, y, x = moving.shape[2:]
    for dz in range(-z_radius, z_radius + 1):
        for dy in range(-radius, radius + 1):
            for dx in range(-radius, radius + 1):
                yield (dx, dy, dz), mp[..., z_radius + dz:z_radius + dz + z, radius + dy:radius + dy + y,
                                       radius + dx:radius + dx + x]


def cost_volume(fixed: torch.Tensor, moving: torch.Tensor, radius: int, pool: int,
                z_radius: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense matching cost of every discrete displacement on the grid pooled by ``pool``.

    ``fixed`` / ``moving``: (1, C, z, y, x) features on the same grid (moving already through the
    linear map), averaged over pool^3 cells first. Returns (cost (K, z', y', x'), offsets (K, 3)
    in pooled cells (dx, dy, dz)): the squared feature distance, smoothed over 3^3 cells.
    """
    zr = radius if z_radius is None else z_radius
    fp = F.avg_pool3d(fixed, pool, stride=pool, ceil_mode=True)
    mp = F.avg_pool3d(moving, pool, stride=pool, ceil_mode=True)
    costs, offsets = [], []
    for off, shifted in _shift_stack(mp, radius, zr):
        d = (fp - shifted).square().mean(1, keepdim=True)
        costs.append(F.avg_pool3d(F.pad(d, (1,) * 6, mode="replicate"), 3, stride=1)[0, 0])
        offsets.append(off)
    return torch.stack(costs), torch.tensor(offsets, dtype=torch.float32)


def _smooth(field: torch.Tensor, k: int = 3, passes: int = 2) -> torch.Tensor:
    for _ in range(passes):
        field = F.avg_pool3d(F.pad(field, (k // 2,) * 6, mode="replicate"), k, stride=1)
    return field


def coupled_convex(cost: torch.Tensor, offsets: torch.Tensor, coupling) -> torch.Tensor:
    """Coupled convex optimisation of a discrete cost volume: alternately the per-cell
    argmin of cost + theta * |offset - smooth field|^2 and the smoothing of the chosen offsets,
    theta increasing (ConvexAdam's global regularisation without a graph).

    Returns (1, 3, z', y', x') displacements in voxels ((dx, dy, dz) channels)."""
    k, shape = cost.shape[0], cost.shape[1:]
    flat = cost.reshape(k, -1)
    flat = (flat - flat.min(0, keepdim=True).values) / (flat.std(0, keepdim=True) + 1e-6)
    r2 = offsets.square().sum(1, keepdim=True)  # (K, 1)
    flat = flat + 1e-3 * r2 / r2.max().clamp_min(1.0)  # ties (cells without information) pick no motion
    best = flat.argmin(0)
    disp = offsets[best].T.reshape(1, 3, *shape)
    for theta in coupling:
        smooth = _smooth(disp).reshape(3, -1)  # (3, N)
        # |o - s|^2 = |o|^2 - 2 o.s + |s|^2 (the last term is the same for every o)
        penalty = r2 - 2.0 * offsets @ smooth
        best = (flat + theta * penalty).argmin(0)
        disp = offsets[best].T.reshape(1, 3, *shape)
    return _smooth(disp)


def warp_on_grid(moving: torch.Tensor, displacement_mm: torch.Tensor, grid: Grid) -> torch.Tensor:
    """``moving`` (1, C, z, y, x) on ``grid`` sampled at x + u(x) (u in LPS mm), border padding."""
    size = torch.tensor(grid.size_xyz, dtype=moving.dtype)
    spacing = torch.tensor(grid.spacing, dtype=moving.dtype)
    scale = (2.0 / ((size - 1).clamp_min(1) * spacing)).view(1, 3, 1, 1, 1)
    theta = torch.eye(3, 4, dtype=moving.dtype)[None]
    ident = F.affine_grid(theta, [1, 1, *grid.shape], align_corners=True)
    return F.grid_sample(moving, ident + (displacement_mm * scale).permute(0, 2, 3, 4, 1), mode="bilinear",
                         padding_mode="border", align_corners=True)


def convex_adam(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, grid: Grid,
                opt: ConvexAdamOptions = ConvexAdamOptions()) -> tuple[torch.Tensor, dict]:
    """The deformable step on one grid: returns (displacement (1, 3, z, y, x) mm, stats).

    ``fixed`` / ``moving``: (1, C, z, y, x) features (moving through the linear map);
    ``weight``: (1, 1, z, y, x) where the distance counts (fixed body inside the moving field
    of view), 0 elsewhere.
    """
    spacing = float(grid.spacing[0])
    zr = opt.search_radius
    cost, offsets = cost_volume(fixed * weight, moving * weight, opt.search_radius, opt.cost_pool, zr)
    coarse = coupled_convex(cost, offsets, opt.coupling) * (spacing * opt.cost_pool)  # mm on the pooled grid
    # instance optimisation on the pooled grid too (ConvexAdam: half resolution), of a velocity field
    # started at the convex displacement (v ~ u for a smooth u); the result is upsampled at the end
    k = opt.cost_pool
    fp = F.avg_pool3d(fixed, k, stride=k, ceil_mode=True)
    mp = F.avg_pool3d(moving, k, stride=k, ceil_mode=True)
    wp = F.avg_pool3d(weight, k, stride=k, ceil_mode=True)
    sp = spacing * k
    pgrid = Grid(tuple(float(o + spacing * (k - 1) / 2) for o in grid.origin), (sp,) * 3, tuple(fp.shape[2:]))
    velocity = torch.nn.Parameter(coarse.clone())
    adam = torch.optim.Adam([velocity], lr=opt.learning_rate)
    wsum = wp.sum().clamp_min(1.0)

    def loss_of(v):
        u = integrate_svf(v, pgrid)
        warped = warp_on_grid(mp, u, pgrid)
        return ((fp - warped).square().mean(1, keepdim=True) * wp).sum() / wsum

    with torch.no_grad():
        start_sim = float(((fp - mp).square().mean(1, keepdim=True) * wp).sum() / wsum)
        convex_sim = float(loss_of(coarse))
    for _ in range(opt.iterations):
        adam.zero_grad()
        sim = loss_of(velocity)
        loss = sim + opt.smoothness * diffusion(velocity, pgrid.spacing)
        loss.backward()
        adam.step()
    with torch.no_grad():
        final_sim = loss_of(velocity.detach())
        v_full = F.interpolate(velocity.detach(), size=grid.shape, mode="trilinear", align_corners=False)
    stats = {"distance_linear": round(start_sim, 6), "distance_convex": round(convex_sim, 6),
             "distance_final": round(float(final_sim), 6), "cost_volume_offsets": int(offsets.shape[0])}
    if opt.fine_iterations > 0:
        v_full, fine = _fine_level(fixed, moving, weight, grid, v_full, opt)
        stats.update(fine)
    with torch.no_grad():
        u = integrate_svf(v_full, grid)
    stats["max_displacement_mm"] = round(float(u.norm(dim=1).max()), 2)
    return u.detach(), stats


def _fine_level(fixed: torch.Tensor, moving: torch.Tensor, weight: torch.Tensor, grid: Grid,
                velocity: torch.Tensor, opt: ConvexAdamOptions) -> tuple[torch.Tensor, dict]:
    """Adam on the velocity at the full working resolution (the pooled level cannot see ribs or
    vertebral borders), a less stiff diffusion weight; returns (velocity, distances at this level)."""
    v = torch.nn.Parameter(velocity.clone())
    adam = torch.optim.Adam([v], lr=opt.fine_learning_rate)
    wsum = weight.sum().clamp_min(1.0)

    def sim_of(vel):
        warped = warp_on_grid(moving, integrate_svf(vel, grid), grid)
        return ((fixed - warped).square().mean(1, keepdim=True) * weight).sum() / wsum

    with torch.no_grad():
        before = float(sim_of(v))
    for _ in range(opt.fine_iterations):
        adam.zero_grad()
        loss = sim_of(v) + opt.fine_smoothness * diffusion(v, grid.spacing)
        loss.backward()
        adam.step()
    with torch.no_grad():
        after = float(sim_of(v))
    return v.detach(), {"distance_fine_start": round(before, 6), "distance_fine_final": round(after, 6)}
