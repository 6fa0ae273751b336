"""Embedding inference: volume -> per-voxel anatomical embeddings on the model grid.

The network runs on the canonical 2 mm LPS grid (see preprocess). Long scans are processed
in overlapping slabs along z so peak memory stays bounded. The Embedder computes; caching
(memory + disk) belongs to the EmbeddingSession (session.py).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Optional

import numpy as np
import torch

from .device import DevicePlan, plan_for, select_device, to_device
from .grid import Grid
from .network import COARSE_STRIDE, FINE_STRIDE, INPUT_MULTIPLE
from .preprocess import normalize_intensity, resample_to_model_grid
from .progress import Progress
from .search import SearchIndex
from .volume import Volume


@dataclass(frozen=True, eq=False)
class Embeddings:
    """Per-voxel embeddings of one volume, stored once, channels-last, for fast matching.

    ``rows[n]`` concatenates the L2-normalised heads at fine voxel n (C order of the fine
    grid's (z, y, x) array): fine appearance, coarse appearance (trilinearly upsampled from its
    own grid, as SAMv2 combines them), then semantic when the model has it. ``fine``,
    ``semantic`` and ``coarse_on_fine`` are (C, z, y, x) views into it; ``coarse`` is the
    coarse head on its own grid.
    """

    rows: torch.Tensor  # (N, D)
    head_dims: tuple  # ((name, channels), ...) in row order
    coarse: torch.Tensor  # (C, z', y', x') coarse head on coarse_grid
    fine_grid: Grid
    coarse_grid: Grid
    model_volume: Volume  # the resampled model-grid volume (raw intensities)
    model_id: str
    meta: dict = field(default_factory=dict)

    def _head(self, name: str) -> Optional[torch.Tensor]:
        start = 0
        for head, dims in self.head_dims:
            if head == name:
                return self.rows[:, start: start + dims].T.reshape(dims, *self.fine_grid.shape)
            start += dims
        return None

    @property
    def fine(self) -> torch.Tensor:
        return self._head("fine")

    @property
    def semantic(self) -> Optional[torch.Tensor]:
        return self._head("semantic")

    @property
    def coarse_on_fine(self) -> torch.Tensor:
        return self._head("coarse")

    @property
    def heads(self) -> tuple[str, ...]:
        return tuple(h for h, _ in self.head_dims)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.rows, self.coarse))

    @cached_property
    def index(self) -> SearchIndex:
        """The search index matching uses, built on first use and kept with the embeddings,
        on the device that computed them (``meta['device']``, default CPU)."""
        return SearchIndex(self, self.meta.get("device", "cpu"))


class Embedder:
    """Runs a SAMv2 network over volumes, in slabs along z (no cache: see EmbeddingSession).

    ``model`` is a ``model_io.LoadedModel`` (or a bare SAMv2Net, then ``model_id`` names it).
    Embeddings are stored on the CPU in bf16 (half the memory of fp32, fast matmuls with
    AMX/AVX512-BF16) unless ``storage_dtype`` says otherwise.
    """

    def __init__(self, model, device: "str | torch.device" = "auto", precision: str = "auto",
                 spacing_mm: Optional[float] = None, slab_voxels: Optional[int] = None,
                 memory_budget_gb: float = 1.5, storage_dtype: torch.dtype = torch.bfloat16, model_id: Optional[str] = None,
                 slab_margin_voxels: int = 32):
        card = getattr(model, "card", None)
        net = getattr(model, "model", model)
        self.net = net
        self.card = card
        self.device = select_device(device)
        self.plan: DevicePlan = plan_for(self.device, precision, cpu_budget_gb=memory_budget_gb)
        self.net.to(self.device).eval()
        # channels-last 3D lets oneDNN/cuDNN pick their fast kernels (about 2x on CPU with bf16)
        self.channels_last = self.plan.channels_last
        if self.channels_last:
            self.net.to(memory_format=torch.channels_last_3d)
        if self.plan.cudnn_benchmark:
            torch.backends.cudnn.benchmark = True  # slabs repeat one shape: time the kernels once
        self.autocast_dtype = self.plan.autocast_dtype
        card_spacing = getattr(card, "spacing_mm", None) if card is not None else None
        self.spacing_mm = float(spacing_mm or card_spacing or 2.0)
        self.model_id = model_id or (getattr(card, "sha256", None) or getattr(card, "name", None) or "unnamed-model")
        self.slab_voxels = slab_voxels
        self.slab_margin = slab_margin_voxels  # context on each side of a slab (64 mm at 2 mm)
        self.storage_dtype = storage_dtype
        self.multiple = tuple(getattr(net, "input_multiple", INPUT_MULTIPLE))
        self.fine_stride = tuple(getattr(net, "fine_stride", FINE_STRIDE))
        self.coarse_stride = tuple(getattr(net, "coarse_stride", COARSE_STRIDE))
        cfg = getattr(net, "config", None)
        self._first_channels = int(cfg.stage_channels[0]) if cfg is not None else 64

    # --- public -----------------------------------------------------------------------
    def embed(self, volume: Volume, progress: Progress = None) -> Embeddings:
        """Embeddings of ``volume``, computed now (an EmbeddingSession caches them)."""
        volume.validated()
        return self._compute(volume, progress)

    # --- computation --------------------------------------------------------------------
    def _compute(self, volume: Volume, progress: Progress) -> Embeddings:
        report = progress or (lambda f, m: None)
        report(0.0, "resampling to the model grid")
        mv = resample_to_model_grid(volume, self.spacing_mm)
        image = normalize_intensity(mv.array, volume.modality)
        z, y, x = image.shape
        mz, my, mx = self.multiple
        py, px = math.ceil(y / my) * my, math.ceil(x / mx) * mx
        pad_value = float(image.min())
        slab = self._slab_depth(py, px)
        # context on each side, but never more than a quarter of the slab: the kept part must
        # stay at least half of what is computed
        margin = max(mz, (min(self.slab_margin, slab // 4) // mz) * mz)
        starts = _slab_starts(z, slab, margin, mz)
        fz, fy, fx = self.fine_stride
        cz = self.coarse_stride[0]
        nfz, nfy, nfx = math.ceil(z / fz), math.ceil(y / fy), math.ceil(x / fx)
        rows = None
        coarse_parts = []
        use_semantic = self.card is None or "semantic" in getattr(self.card, "matching_heads", ["semantic"])
        for n, (keep0, keep1) in enumerate(starts):
            report(0.05 + 0.85 * n / len(starts), f"embedding slab {n + 1}/{len(starts)}")
            lo = max(0, keep0 - margin)
            hi = min(z, keep1 + margin)
            lo = (lo // mz) * mz
            depth = math.ceil((hi - lo) / mz) * mz
            block = np.full((depth, py, px), pad_value, dtype=np.float32)
            block[: min(depth, z - lo), :y, :x] = image[lo: lo + depth][:, :y, :x]
            out = self._run(block)
            if not use_semantic:
                out.pop("semantic", None)  # the model card says this head is not used for matching
            if rows is None:
                c = out["fine"].shape[0]
                head_dims = (("fine", c), ("coarse", out["coarse"].shape[0])) + \
                    ((("semantic", out["semantic"].shape[0]),) if "semantic" in out else ())
                rows = torch.empty((nfz, nfy, nfx, sum(d for _, d in head_dims)), dtype=self.storage_dtype)
            # keep the slab's own slices: fine rows [keep0, keep1) / fz, coarse likewise / cz
            f0, f1 = (keep0 - lo) // fz, (keep1 - lo + fz - 1) // fz
            c0, c1 = (keep0 - lo) // cz, (keep1 - lo + cz - 1) // cz
            g0 = keep0 // fz
            g1 = min(nfz, g0 + f1 - f0)
            rows[g0:g1, ..., :c] = out["fine"][:, f0: f0 + g1 - g0, :nfy, :nfx].permute(1, 2, 3, 0)
            if "semantic" in out:
                rows[g0:g1, ..., -c:] = out["semantic"][:, f0: f0 + g1 - g0, :nfy, :nfx].permute(1, 2, 3, 0)
            coarse_parts.append(out["coarse"][:, c0:c1])
            del out
        coarse = torch.cat(coarse_parts, 1).contiguous()
        fine_grid = cell_grid(mv, self.fine_stride, (nfz, nfy, nfx))
        coarse_grid = cell_grid(mv, self.coarse_stride, tuple(coarse.shape[1:]))
        report(0.92, "combining heads")
        fill_coarse_on_fine(rows, c, coarse, coarse_grid, fine_grid)
        rows = rows.reshape(-1, rows.shape[-1])
        report(1.0, "done")
        return Embeddings(rows, head_dims, coarse, fine_grid, coarse_grid, mv, self.model_id,
                          {"slabs": len(starts), "input_shape": (z, y, x), "source": source_geometry(volume),
                           "device": str(self.device)})

    def _slab_depth(self, py: int, px: int) -> int:
        if self.slab_voxels:
            return max(self.multiple[0], (self.slab_voxels // self.multiple[0]) * self.multiple[0])
        # Peak memory is dominated by the full-resolution first stage (a few live copies);
        # on CUDA the budget follows the device's free memory (DevicePlan).
        bytes_per_slice = py * px * self._first_channels * 4 * 4
        depth = int(self.plan.memory_budget_bytes // bytes_per_slice)
        return max(32, (depth // self.multiple[0]) * self.multiple[0])

    @torch.inference_mode()
    def _run(self, block: np.ndarray) -> dict:
        x = to_device(block, self.plan)[None, None]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last_3d)
        if self.autocast_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.autocast_dtype):
                out = self.net(x)
        else:
            out = self.net(x)
        # the network returns float32 unit vectors (normalised after any reduced-precision
        # compute); store them compactly on the CPU, converted on the device first so that
        # only the compact copy crosses the bus
        return {k: v[0].to(self.storage_dtype).to("cpu") for k, v in out.items()}


def cell_grid(model_volume: Volume, stride_zyx, shape: Optional[tuple] = None) -> Grid:
    """The grid of a stride-``stride_zyx`` output level over ``model_volume``'s (identity
    direction) grid. Output voxel n covers input voxels [s*n, s*n + s): its centre sits at
    s*n + (s - 1)/2 in model-grid index units. ``shape`` (z, y, x) defaults to ceil(n / s)."""
    sp, org = np.asarray(model_volume.spacing, float), np.asarray(model_volume.origin, float)
    k = np.asarray(tuple(stride_zyx)[::-1], float)  # (x, y, z)
    if shape is None:
        shape = tuple(math.ceil(n / s) for n, s in zip(model_volume.array.shape, stride_zyx))
    return Grid(tuple(org + sp * (k - 1) / 2), tuple(sp * k), tuple(int(n) for n in shape))


def source_geometry(volume: Volume) -> dict:
    """The original scan's voxel extent, kept so points can be checked against the real image
    (the model grid is an axis-aligned box that can be larger for oblique scans)."""
    return {"index_to_lps": volume.index_to_lps_matrix.tolist(), "size_xyz": list(volume.size_xyz)}


def inside_source(emb: "Embeddings", lps, slack_voxels: float = 0.5) -> np.ndarray:
    """True where LPS points (N, 3) lie inside the scan ``emb`` was computed from."""
    geo = emb.meta.get("source")
    pts = np.asarray(lps, dtype=np.float64).reshape(-1, 3)
    if geo is None:
        return emb.model_volume.contains_lps(pts, slack_voxels)
    m = np.asarray(geo["index_to_lps"])
    ijk = (pts - m[:3, 3]) @ np.linalg.inv(m[:3, :3]).T
    hi = np.asarray(geo["size_xyz"], float) - 1 + slack_voxels
    return np.all((ijk >= -slack_voxels) & (ijk <= hi), axis=1)


def _slab_starts(z: int, slab: int, margin: int, multiple: int) -> list[tuple[int, int]]:
    """Split [0, z) into kept ranges of at most ``slab - 2*margin`` slices, aligned to ``multiple``."""
    if z <= slab:
        return [(0, z)]
    keep = max(multiple, ((slab - 2 * margin) // multiple) * multiple)
    return [(s, min(z, s + keep)) for s in range(0, z, keep)]


def _linear_weights(positions: np.ndarray, n: int) -> torch.Tensor:
    """(len(positions), n) linear-interpolation matrix at fractional indices, clamped to the
    border (grid_sample's padding_mode='border')."""
    p = np.clip(positions, 0.0, n - 1.0)
    i0 = np.minimum(np.floor(p).astype(int), max(n - 2, 0))
    w1 = p - i0
    w = np.zeros((len(p), n))
    w[np.arange(len(p)), i0] = 1.0 - w1
    if n > 1:
        w[np.arange(len(p)), i0 + 1] += w1
    else:
        w[:, 0] = 1.0
    return torch.as_tensor(w, dtype=torch.float32)


def fill_coarse_on_fine(rows: torch.Tensor, start: int, coarse: torch.Tensor, coarse_grid: Grid,
                         fine_grid: Grid, chunk: int = 16) -> None:
    """Write the coarse head, trilinearly interpolated at every fine voxel centre, into
    ``rows[..., start:start + C]`` (in z-chunks, so no full-size float32 copy is made).

    Both grids are axis-aligned with each other (same model grid), so trilinear
    interpolation separates into one small weight matrix per axis."""
    c = coarse.shape[0]
    nz, ny, nx = fine_grid.shape
    cz, cy, cx = coarse.shape[1:]
    axes = []
    for axis, (nf, nc) in enumerate(zip((nx, ny, nz), (cx, cy, cz))):  # x, y, z
        # fine voxel centres in coarse index units
        t = (fine_grid.origin[axis] + fine_grid.spacing[axis] * np.arange(nf) - coarse_grid.origin[axis]) \
            / coarse_grid.spacing[axis]
        axes.append(_linear_weights(t, nc))
    wx, wy, wz = axes
    for z0 in range(0, nz, chunk):
        z1 = min(nz, z0 + chunk)
        used = torch.nonzero(wz[z0:z1].sum(0)).flatten()  # the coarse slices this chunk needs
        a, b = int(used.min()), int(used.max()) + 1
        part = torch.einsum("Zz,kzyx->kZyx", wz[z0:z1, a:b], coarse[:, a:b].float())
        vals = torch.einsum("kZyx,Yy,Xx->ZYXk", part, wy, wx)
        rows[z0:z1, ..., start: start + c] = vals.to(rows.dtype)
