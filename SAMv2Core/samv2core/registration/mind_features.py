"""Training-free MIND-SSC descriptors shaped like SAM embeddings, so the same stable matching
and robust fit can run on them.

Why: a model that was not trained across modalities (the bundled lite model) finds too few
agreeing CT-MRI matches; MIND-SSC compares local self-similarity rather than intensities and
is modality independent by construction (Heinrich et al., MICCAI 2013). It is less
distinctive than a trained embedding, so it is the cross-modality fallback, not the default.

Layout, as the network's output: a "fine" head (MIND-SSC at dilations 2 and 4 mm, averaged
over each 4 mm fine cell) and a "coarse" head (dilations 8 and 16 mm of a smoothed image,
averaged over coarse cells (8 mm by default) and interpolated onto the fine grid). Channels are centred on each
volume's own mean before L2 normalisation: raw MIND values are all positive, and the
per-volume centring removes the modality-dependent offset.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..embed import Embeddings, cell_grid, fill_coarse_on_fine, source_geometry
from ..errors import InputError
from ..network import FINE_STRIDE  # fine cells as the network's fine head
from ..preprocess import normalize_intensity, resample_to_model_grid
from ..volume import Volume
from .mind import mind_ssc

MODEL_ID = "mind-ssc"


def _pooled(desc: torch.Tensor, shape: tuple, stride: tuple) -> torch.Tensor:
    """(C, *shape) cell means of a (1, C, z, y, x) descriptor, centred and unit length."""
    target = [n * k for n, k in zip(shape, stride)]
    z, y, x = desc.shape[2:]
    desc = F.pad(desc, (0, max(0, target[2] - x), 0, max(0, target[1] - y), 0, max(0, target[0] - z)),
                 mode="replicate")[:, :, :target[0], :target[1], :target[2]]
    out = F.avg_pool3d(desc, stride)[0]
    out = out - out.mean(dim=(1, 2, 3), keepdim=True)
    return F.normalize(out, dim=0)


def mind_embeddings(volume: Volume, spacing_mm: float = 2.0, coarse_stride: tuple = (4, 4, 4),
                    coarse_downsample: int = 2) -> Embeddings:
    """MIND-SSC descriptors of ``volume`` as an Embeddings object (heads 'fine', 'coarse').

    ``coarse_stride``: model voxels (z, y, x) per coarse cell (the network's coarse head uses
    (4, 16, 16); isotropic 8 mm cells keep more of the coarse structure). ``coarse_downsample``
    2: the coarse descriptor (8 and 16 mm offsets) is computed on a 2x averaged image, 8x fewer
    voxels for the same physical offsets; 1: on the full model grid (smoothed 3^3)."""
    mv = resample_to_model_grid(volume, spacing_mm)
    img = torch.from_numpy(normalize_intensity(mv.array, volume.modality))[None, None]
    fine_grid, coarse_grid = cell_grid(mv, FINE_STRIDE), cell_grid(mv, tuple(coarse_stride))
    fine = _pooled(torch.cat([mind_ssc(img, 1, 1), mind_ssc(img, 1, 2)], 1), fine_grid.shape, FINE_STRIDE)
    k = int(coarse_downsample)
    if k not in (1, 2) or any(s % k for s in coarse_stride):
        raise InputError(f"coarse_downsample must be 1 or 2 and divide the coarse stride {tuple(coarse_stride)}")
    if k == 1:
        smooth = F.avg_pool3d(F.pad(img, (1,) * 6, mode="replicate"), 3, stride=1)
        coarse_d = torch.cat([mind_ssc(smooth, 2, 4), mind_ssc(smooth, 2, 8)], 1)
    else:
        z, y, x = img.shape[2:]
        even = F.pad(img, (0, x % 2, 0, y % 2, 0, z % 2), mode="replicate")
        small = F.avg_pool3d(even, 2)  # cell m covers model voxels [2m, 2m + 2): cells stay aligned
        coarse_d = torch.cat([mind_ssc(small, 1, 2), mind_ssc(small, 1, 4)], 1)
    coarse = _pooled(coarse_d, coarse_grid.shape, tuple(s // k for s in coarse_stride))
    cf, cc = fine.shape[0], coarse.shape[0]
    rows = torch.empty((*fine_grid.shape, cf + cc), dtype=torch.float32)
    rows[..., :cf] = fine.permute(1, 2, 3, 0)
    fill_coarse_on_fine(rows, cf, coarse, coarse_grid, fine_grid)
    rows[..., cf:] = F.normalize(rows[..., cf:], dim=-1)
    return Embeddings(rows.reshape(-1, cf + cc), (("fine", cf), ("coarse", cc)), coarse, fine_grid, coarse_grid,
                      mv, MODEL_ID, {"source": source_geometry(volume)})


class MindEmbedder:
    """An embedder (``embed(volume, progress)``, as samv2core.embed.Embedder) returning
    MIND-SSC descriptors, so register() can use them in place of a model."""

    model_id = MODEL_ID

    def __init__(self, spacing_mm: float = 2.0):
        self.spacing_mm = spacing_mm

    def embed(self, volume: Volume, progress: Optional[Callable[[float, str], None]] = None) -> Embeddings:
        if progress:
            progress(0.0, "MIND-SSC descriptors")
        emb = mind_embeddings(volume, self.spacing_mm)
        if progress:
            progress(1.0, "done")
        return emb
