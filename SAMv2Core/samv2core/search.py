"""The search index of one volume's embeddings: nearest-descriptor search, coarse to fine.

Built once per Embeddings object (``Embeddings.index``) and shared by every match on it.
The index lives on the device the embeddings were computed on: the search, the candidate
refinement and the sub-voxel fit run there, and only the answers ((Q, 3) indices and (Q,)
scores) come back to the host.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


class SearchIndex:
    """One volume's descriptors as a (N, D) matrix for fast similarity search.

    Row n of ``rows`` concatenates the unit embeddings of every head at fine voxel n, so a
    dot product divided by the number of heads is the SAMv2 combined score (mean of the
    per-head cosines). Search is coarse-to-fine: exhaustive on a
    stride-2 subgrid, then exact in small windows around the best candidates.
    """

    SUB = 2  # subgrid stride of the exhaustive pass
    TOPK = 8  # candidates refined at full resolution

    def __init__(self, emb, device: "str | torch.device" = "cpu"):
        # no reference back to ``emb``: the index is kept on it (Embeddings.index)
        self.grid = emb.fine_grid
        self.shape = tuple(emb.fine_grid.shape)
        self.device = torch.device(device)
        self.rows = emb.rows.to(self.device)  # (N, D); on the CPU shared with the embeddings (no copy)
        self.head_dims = [d for _, d in emb.head_dims]
        self.n_heads = len(self.head_dims)
        s = self.SUB
        sub = self.rows.reshape(*self.shape, -1)[::s, ::s, ::s]
        self.sub_shape = tuple(sub.shape[:3])
        self.sub_rows_t = sub.reshape(-1, sub.shape[-1]).T.contiguous()  # (D, Nsub)

    # --- descriptors --------------------------------------------------------------------------
    def _flat(self, zyx: np.ndarray) -> np.ndarray:
        z, y, x = self.shape
        return (zyx[..., 0] * y + zyx[..., 1]) * x + zyx[..., 2]

    def _gather(self, zyx: np.ndarray) -> torch.Tensor:
        """float32 rows at integer (z, y, x) positions (any leading shape), on the device."""
        return self.rows[torch.from_numpy(self._flat(zyx)).to(self.device)].float()

    def descriptors(self, idx_xyz: np.ndarray) -> torch.Tensor:
        """Trilinearly interpolated, per-head unit descriptors (Q, D) at fine indices.

        Dotted with a row and divided by the number of heads this is the combined score."""
        p = np.asarray(idx_xyz, dtype=np.float64).reshape(-1, 3)[:, ::-1]  # -> (z, y, x)
        hi = np.asarray(self.shape) - 1
        p = np.clip(p, 0, hi)
        if np.all(p == np.round(p)):  # voxel centres (fixed-point iterations): a plain gather
            acc = self._gather(p.astype(np.int64))
            heads = torch.split(acc, self.head_dims, dim=1)
            return torch.cat([F.normalize(h, dim=1) for h in heads], 1)
        base = np.minimum(np.floor(p).astype(np.int64), np.maximum(hi - 1, 0))
        frac = p - base
        acc = 0
        for corner in np.ndindex(2, 2, 2):
            c = np.asarray(corner)
            w = np.prod(np.where(c == 1, frac, 1 - frac), axis=1)
            pos = np.minimum(base + c, hi)
            acc = acc + torch.from_numpy(w).float().to(self.device)[:, None] * self._gather(pos)
        heads = torch.split(acc, self.head_dims, dim=1)
        return torch.cat([F.normalize(h, dim=1) for h in heads], 1)

    # --- search -------------------------------------------------------------------------------
    def search(self, desc: torch.Tensor, subvoxel: bool, chunk_elems: int = 20_000_000):
        """Best fine index (Q, 3) float (i, j, k) and combined score (Q,) per descriptor."""
        q = desc.shape[0]
        idx_out = np.zeros((q, 3))
        score_out = np.zeros(q)
        nsub = self.sub_rows_t.shape[1]
        step = max(1, chunk_elems // nsub)
        desc = desc.to(self.device) / self.n_heads  # dot products become mean per-head cosines
        d_low = desc.to(self.rows.dtype)
        for s in range(0, q, step):
            part = d_low[s: s + step]
            sim = part @ self.sub_rows_t  # low precision is enough to pick candidates
            k = min(self.TOPK, nsub)
            cand = torch.topk(sim, k, dim=1, sorted=False).indices.cpu().numpy()  # (q, k) subgrid flat indices
            zyx = np.stack(np.unravel_index(cand, self.sub_shape), -1) * self.SUB  # (q, k, 3)
            best_zyx, best = self._refine(desc[s: s + step], zyx)
            ijk = best_zyx[:, ::-1].astype(np.float64)
            if subvoxel:
                ijk += self._parabolic(desc[s: s + step], best_zyx, best)
            idx_out[s: s + step] = ijk
            score_out[s: s + step] = best
        return idx_out, score_out

    _WINDOW = np.stack(np.meshgrid(*([np.arange(-1, 2)] * 3), indexing="ij"), -1).reshape(-1, 3)

    def _refine(self, desc: torch.Tensor, cand_zyx: np.ndarray):
        """Exact scores in 3^3 windows around candidates; returns best (q, 3) zyx and scores."""
        q = cand_zyx.shape[0]
        pos = (cand_zyx[:, :, None, :] + self._WINDOW[None, None]).reshape(q, -1, 3)
        pos = np.clip(pos, 0, np.asarray(self.shape) - 1)
        rows = self._gather(pos)  # (q, m, D)
        # float32 here: picking the peak in bf16 was measured to lose accuracy (benchmark_core)
        scores = torch.einsum("qmd,qd->qm", rows, desc.float())
        best, arg = scores.max(dim=1)
        return pos[np.arange(q), arg.cpu().numpy()], best.cpu().numpy().astype(np.float64)

    def _parabolic(self, desc: torch.Tensor, zyx: np.ndarray, f0: np.ndarray) -> np.ndarray:
        """Sub-voxel offsets (q, 3) in (i, j, k) from a parabola through each axis' neighbours."""
        offs = np.zeros((len(zyx), 3))
        hi = np.asarray(self.shape) - 1
        d = desc.float()
        for axis in range(3):  # zyx axis
            step = np.zeros(3, np.int64)
            step[axis] = 1
            ok = (zyx[:, axis] > 0) & (zyx[:, axis] < hi[axis])
            if not ok.any():
                continue
            sel = torch.from_numpy(ok).to(self.device)
            fm = (self._gather(zyx[ok] - step) * d[sel]).sum(1).cpu().numpy()
            fp = (self._gather(zyx[ok] + step) * d[sel]).sum(1).cpu().numpy()
            den = fm - 2 * f0[ok] + fp
            with np.errstate(divide="ignore", invalid="ignore"):
                o = np.where(den < -1e-9, 0.5 * (fm - fp) / den, 0.0)
            offs[ok, 2 - axis] = np.clip(o, -0.5, 0.5)
        return offs


def unique_search(src: SearchIndex, dst: SearchIndex, idx: np.ndarray, subvoxel: bool):
    """Search ``dst`` for the descriptors of ``src`` at ``idx``; identical start voxels (common
    in fixed-point iterations, where many starts converge) are searched once."""
    if len(idx) > 1 and np.all(idx == np.round(idx)):
        uniq, inverse = np.unique(idx, axis=0, return_inverse=True)
        found, score = dst.search(src.descriptors(uniq), subvoxel)
        inverse = inverse.reshape(-1)
        return found[inverse], score[inverse]
    return dst.search(src.descriptors(idx), subvoxel)
