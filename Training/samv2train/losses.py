"""Losses: voxel-wise InfoNCE for appearance embeddings (fine and coarse), prototypical
supervised contrastive loss for semantic embeddings, and the optional Alice cross-volume
positives. All sampling uses a numpy Generator passed in, so a step is reproducible.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import LossSection
from .view_pairs import ViewPair, output_grid_centres, patch_to_output


@dataclass
class LevelSpec:
    stride: tuple[int, int, int]
    n_pos: int
    n_candidates: int  # 0 = every voxel of the other view is a candidate
    n_hard: int
    n_random: int
    ignore_mm: float


def fine_spec(cfg: LossSection) -> LevelSpec:
    return LevelSpec((2, 2, 2), cfg.fine_positives, cfg.fine_candidates, cfg.fine_hard_negatives,
                     cfg.fine_random_negatives, cfg.fine_ignore_mm)


def coarse_spec(cfg: LossSection) -> LevelSpec:
    return LevelSpec((4, 16, 16), cfg.coarse_positives, 0, cfg.coarse_negatives, 0, cfg.coarse_ignore_mm)


def sample_features(feat: torch.Tensor, coords: np.ndarray) -> torch.Tensor:
    """Trilinear samples of ``feat`` (C, D, H, W) at output-grid coords (N, 3) (z, y, x); unit norm (N, C)."""
    shape = np.asarray(feat.shape[1:], float)
    n = 2.0 * coords / np.maximum(shape - 1, 1) - 1.0
    grid = torch.from_numpy(n[:, ::-1].copy()).to(feat.device, feat.dtype).view(1, -1, 1, 1, 3)
    out = F.grid_sample(feat[None], grid, mode="bilinear", padding_mode="border", align_corners=True)
    return F.normalize(out.view(feat.shape[0], -1).t(), dim=1)


def _lookup(mask: torch.Tensor, p: np.ndarray) -> np.ndarray:
    """Nearest-voxel values of a (D, H, W) map at patch coords (N, 3); outside -> 0."""
    idx = np.rint(p).astype(int)
    shape = np.asarray(mask.shape)
    inside = np.all((idx >= 0) & (idx < shape), axis=1)
    out = np.zeros(len(p), dtype=np.float64)
    if inside.any():
        i = idx[inside]
        out[inside] = mask[i[:, 0], i[:, 1], i[:, 2]].double().cpu().numpy()
    return out


def _infonce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             neg_mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean InfoNCE: anchor (P, C), positive (P, C), negatives (P, K, C) with validity mask (P, K)."""
    pos = (anchor * positive).sum(1, keepdim=True)
    neg = torch.einsum("pc,pkc->pk", anchor, negatives)
    neg = neg.masked_fill(~neg_mask, float("-inf"))
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def appearance_loss(feat_a: torch.Tensor, feat_b: torch.Tensor, pair: ViewPair, spec: LevelSpec,
                    cfg: LossSection, rng: np.random.Generator,
                    extra_negatives: "torch.Tensor | None" = None,
                    fov_negatives: "torch.Tensor | None" = None,
                    reverse: bool = False) -> "tuple[torch.Tensor, dict] | None":
    """InfoNCE from view A anchors to view B at one level; None when the overlap is empty.

    Positives: anchor voxels of A inside the body whose corresponding point lies inside B
    (feature of B trilinearly sampled there). Negatives: from a random candidate subset of
    B's voxels, excluding those closer than ``spec.ignore_mm`` to the positive, the
    ``n_hard`` most similar (hard) plus ``n_random`` random ones (diverse); optional extra
    negatives (other volumes of the batch, or non-overlapping field of view) are added to
    every anchor. With ``cfg.prune_false_negatives`` (Adam/Eden) negatives whose similarity to
    the anchor exceeds ``cfg.prune_threshold`` are dropped as probable false negatives.

    ``reverse``: the same correspondences seen from B - anchors are B's features at the
    corresponding points, positives A's voxels, negatives drawn from A. Used for registered
    cross-modality pairs, whose B -> A map is not available (only A -> B is).
    """
    D, H, W = pair.patch_a.shape
    ca = output_grid_centres(feat_a.shape[1:], spec.stride)
    pb = pair.a_to_b_patch(ca)
    ok = _lookup(pair.body_a, ca) > 0.5
    ok &= np.all((pb >= 0) & (pb <= np.asarray(pair.patch_b.shape) - 1), axis=1)
    ok &= _lookup(pair.body_b, pb) > 0.5
    if pair.a_valid is not None:
        ok &= pair.a_valid(pair.view_a.to_volume(ca))
    cand_idx = np.flatnonzero(ok)
    if len(cand_idx) < 2:
        return None
    sel = rng.choice(cand_idx, size=min(spec.n_pos, len(cand_idx)), replace=False)
    C = feat_a.shape[0]
    anchors = feat_a.reshape(C, -1).t()[torch.from_numpy(sel)]
    positives = sample_features(feat_b, patch_to_output(pb[sel], spec.stride))
    neg_src, pos_pos, neg_view = feat_b, pb[sel], pair.view_b
    if reverse:
        anchors, positives = positives, anchors
        neg_src, pos_pos, neg_view = feat_a, ca[sel], pair.view_a

    flat_b = neg_src.reshape(C, -1).t()
    cb_all = output_grid_centres(neg_src.shape[1:], spec.stride)
    nb = len(cb_all)
    cand = np.arange(nb) if spec.n_candidates <= 0 or spec.n_candidates >= nb else \
        rng.choice(nb, size=spec.n_candidates, replace=False)
    cand_t = torch.from_numpy(cand)
    neg_feats = flat_b[cand_t]  # (K, C)
    # physical distance between each candidate and each positive (mm), via the view's matrix
    diff = (cb_all[cand][None, :, :] - pos_pos[:, None, :]) @ neg_view.matrix.T
    dist = np.linalg.norm(diff, axis=2) * pair.spacing_mm
    valid = torch.from_numpy(dist >= spec.ignore_mm).to(anchors.device)
    sims = anchors @ neg_feats.t()  # (P, K)
    if cfg.prune_false_negatives:
        valid &= sims.detach() <= cfg.prune_threshold
    k_hard = min(spec.n_hard, len(cand))
    chosen, chosen_mask = [], []
    if k_hard > 0:
        hard_idx = sims.detach().masked_fill(~valid, float("-inf")).topk(k_hard, dim=1).indices
        chosen.append(hard_idx)
        chosen_mask.append(torch.gather(valid, 1, hard_idx))
    if spec.n_random > 0:
        keys = torch.from_numpy(rng.random((len(sel), len(cand)))).to(anchors.device)
        rand_idx = keys.masked_fill(~valid, -1.0).topk(min(spec.n_random, len(cand)), dim=1).indices
        chosen.append(rand_idx)
        chosen_mask.append(torch.gather(valid, 1, rand_idx))
    idx = torch.cat(chosen, 1)
    negs = neg_feats[idx]  # (P, K, C)
    mask = torch.cat(chosen_mask, 1)
    for extra in (extra_negatives, fov_negatives):
        if extra is not None and len(extra):
            e = extra.to(anchors.dtype)
            emask = torch.ones(len(sel), len(e), dtype=torch.bool, device=anchors.device)
            if cfg.prune_false_negatives:
                emask &= (anchors.detach() @ e.detach().t()) <= cfg.prune_threshold
            negs = torch.cat([negs, e[None].expand(len(sel), -1, -1)], 1)
            mask = torch.cat([mask, emask], 1)
    loss = _infonce(anchors, positives, negs, mask, cfg.temperature)
    with torch.no_grad():
        pos_sim = (anchors * positives).sum(1)
        hardest = sims.masked_fill(~valid, float("-inf")).max(1).values
        acc = float((pos_sim > hardest).float().mean())
    return loss, {"n_pos": len(sel), "acc": acc, "pos_sim": float(pos_sim.mean())}


def random_global_negatives(feat: torch.Tensor, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random voxel embeddings (n, C) of a (C, D, H, W) map (used as negatives for other volumes)."""
    flat = feat.reshape(feat.shape[0], -1).t()
    idx = rng.choice(len(flat), size=min(n, len(flat)), replace=False)
    return flat[torch.from_numpy(idx)]


def labels_on_grid(labels: torch.Tensor, out_shape, stride) -> np.ndarray:
    """Label of each output voxel (nearest input voxel of its centre), flattened."""
    return _lookup(labels, output_grid_centres(out_shape, stride)).astype(np.int64)


def prototype_supcon(features: list, labels: list, label_sets: list, cfg: LossSection,
                     rng: np.random.Generator) -> "tuple[torch.Tensor, dict] | None":
    """Prototypical supervised contrastive loss (O(n K), not O(n^2)).

    ``features``: semantic maps (C, D, H, W); ``labels``: matching flat label arrays (one per
    output voxel, 0 = unlabelled unless cfg.semantic_background_class); ``label_sets``: the
    namespace of each map's labels. One prototype (mean embedding, re-normalised) per
    (label set, class) present in the batch; each sampled voxel is pulled to its class's
    prototype and pushed from the other prototypes *of the same label set* - classes absent
    from a patch simply have no prototype, and label sets never compete with each other.
    Returns None when no label set has two classes present.
    """
    groups: dict = defaultdict(list)  # (set, class) -> list of (N_i, C) tensors
    for feat, lab, ls in zip(features, labels, label_sets):
        flat = feat.reshape(feat.shape[0], -1).t()
        for c in np.unique(lab):
            if c == 0 and not cfg.semantic_background_class:
                continue
            idx = np.flatnonzero(lab == c)
            if len(idx) < cfg.semantic_min_voxels:
                continue
            if len(idx) > cfg.semantic_voxels_per_class:
                idx = rng.choice(idx, size=cfg.semantic_voxels_per_class, replace=False)
            groups[(ls, int(c))].append(flat[torch.from_numpy(idx)])
    by_set: dict = defaultdict(list)
    for key in sorted(groups, key=lambda k: (str(k[0]), k[1])):
        by_set[key[0]].append(key)
    losses, n_classes, n_vox = [], 0, 0
    for ls, keys in by_set.items():
        if len(keys) < 2:
            continue
        members = [torch.cat(groups[k], 0) for k in keys]
        protos = F.normalize(torch.stack([m.mean(0) for m in members]), dim=1)  # (K, C)
        x = torch.cat(members, 0)
        y = torch.cat([torch.full((len(m),), i, dtype=torch.long) for i, m in enumerate(members)]).to(x.device)
        logits = x @ protos.t() / cfg.semantic_temperature
        # average per class so large organs do not dominate small ones
        per = F.cross_entropy(logits, y, reduction="none")
        cls_mean = torch.zeros(len(keys), device=x.device, dtype=per.dtype).index_add(0, y, per)
        cls_mean = cls_mean / torch.bincount(y, minlength=len(keys)).clamp_min(1)
        losses.append(cls_mean.mean())
        n_classes += len(keys)
        n_vox += len(x)
    if not losses:
        return None
    return torch.stack(losses).mean(), {"classes": n_classes, "voxels": n_vox}


def alice_loss(feat_i: torch.Tensor, feat_j: torch.Tensor, cfg: LossSection, rng: np.random.Generator,
               n: int = 100) -> "tuple[torch.Tensor, dict] | None":
    """Alice-style cross-volume positives between patches of *different* patients.

    Voxels of patch i are matched to patch j by the current (detached) embedding; only
    cycle-consistent matches (i -> j -> i returns to the start voxel) with similarity above
    ``cfg.alice_min_score`` become positives; all other voxels of j are negatives. Returns
    None when no reliable match exists (early in training this is the common case).
    """
    C = feat_i.shape[0]
    fi = feat_i.reshape(C, -1).t()
    fj = feat_j.reshape(C, -1).t()
    idx = rng.choice(len(fi), size=min(4 * n, len(fi)), replace=False)
    idx_t = torch.from_numpy(idx)
    with torch.no_grad():
        s = fi[idx_t].detach() @ fj.detach().t()
        best, j = s.max(1)
        back = (fj[j].detach() @ fi.detach().t()).argmax(1)
        keep = (back == idx_t.to(back.device)) & (best >= cfg.alice_min_score)
    if int(keep.sum()) < 2:
        return None
    a = fi[idx_t[keep.cpu()][:n]]
    jj = j[keep][:n]
    logits = a @ fj.t() / cfg.temperature
    return F.cross_entropy(logits, jj), {"alice_pairs": int(len(a))}
