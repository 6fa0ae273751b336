"""Embedding inference and matching on real CT crops.

An untrained (deterministic) network is enough to test geometry and plumbing: identical
anatomy stored differently (flipped axes, shifted origin) must give the same embeddings at the
same physical place, so a point must match onto itself. Model accuracy lives in the benchmarks.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samv2core.embed import Embedder
from samv2core.session import EmbeddingSession
from samv2core.errors import DeviceError, InputError, MatchingError
from samv2core.matching import MatchOptions, Matcher, match_points, stable_matches
from samv2core.volume import Volume

from test_volume_geometry import flipped, oblique


@pytest.fixture(scope="module")
def embedder(lite_net):
    return Embedder(lite_net, device="cpu", model_id="untrained-lite-test")


@pytest.fixture(scope="module")
def template(embedder, lung_crop):
    return embedder.embed(lung_crop)


def interior_points(volume: Volume, n=6, seed=0):
    rng = np.random.default_rng(seed)
    size = np.array(volume.size_xyz)
    ijk = rng.uniform(0.3, 0.7, size=(n, 3)) * (size - 1)
    return volume.index_to_lps(ijk)


def test_embeddings_shapes_grids_and_normalisation(template, lung_crop):
    c = template.fine.shape[0]
    assert template.semantic is not None and template.semantic.shape == template.fine.shape
    assert template.fine_grid.spacing == (4.0, 4.0, 4.0)
    norms = template.fine.float().norm(dim=0)
    assert torch.allclose(norms, torch.ones_like(norms), atol=1e-2)
    # the fine grid covers the input's physical extent
    lo = lung_crop.corners_lps().min(0)
    hi = lung_crop.corners_lps().max(0)
    g = template.fine_grid
    assert np.all(g.index_to_lps([0, 0, 0]) <= lo + 4) and np.all(g.index_to_lps(np.array(g.shape[::-1]) - 1) >= hi - 4)
    assert c == 64


def test_cache_returns_same_embeddings_and_disk_cache_round_trips(lite_net, lung_crop, tmp_path):
    e = EmbeddingSession(Embedder(lite_net, device="cpu", model_id="cache-test"), cache_dir=tmp_path)
    a = e.embed(lung_crop)
    assert e.embed(lung_crop) is a
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    e2 = EmbeddingSession(Embedder(lite_net, device="cpu", model_id="cache-test"), cache_dir=tmp_path)
    b = e2.embed(lung_crop)
    assert b.meta.get("from_disk_cache") and torch.equal(a.fine, b.fine) and b.fine_grid == a.fine_grid
    # other content -> other entry
    other = lung_crop.with_array(lung_crop.array + 10)
    assert not torch.equal(e.embed(other).fine, a.fine)


def test_slab_tiling_matches_whole_volume(lite_net, lung_crop):
    whole = Embedder(lite_net, device="cpu", model_id="t1").embed(lung_crop)
    tiled = Embedder(lite_net, device="cpu", model_id="t2", slab_voxels=56, slab_margin_voxels=16).embed(lung_crop)
    assert tiled.meta["slabs"] > 1
    assert tiled.fine.shape == whole.fine.shape and tiled.coarse.shape == whole.coarse.shape
    cos = (tiled.fine.float() * whole.fine.float()).sum(0)
    assert float(cos.median()) > 0.99 and float(cos.mean()) > 0.95


def test_points_match_onto_themselves_and_follow_a_shift(embedder, template, lung_crop):
    pts = interior_points(lung_crop)
    for method in ("nn", "fixed_point"):
        res = match_points(template, template, pts, method=method)
        got = np.array([r.query_point.xyz for r in res])
        assert np.abs(got - pts).max() < 2.5, (method, np.abs(got - pts).max())
        assert all(r.score > 0.95 and r.template_point.system == "LPS" for r in res)
    # the same scan with its origin moved by a whole number of model voxels: matches move with it
    shift = np.array([8.0, -12.0, 6.0])
    moved = Volume(lung_crop.array, lung_crop.spacing, np.asarray(lung_crop.origin) + shift, lung_crop.direction)
    res = match_points(template, embedder.embed(moved), pts, method="nn")
    got = np.array([r.query_point.xyz for r in res])
    assert np.abs(got - (pts + shift)).max() < 2.5


@pytest.mark.parametrize("axis", [0, 2])
def test_flipped_storage_matches_same_physical_point(embedder, template, lung_crop, axis):
    pts = interior_points(lung_crop, seed=axis)
    res = match_points(template, embedder.embed(flipped(lung_crop, axis)), pts, method="nn")
    got = np.array([r.query_point.xyz for r in res])
    assert np.abs(got - pts).max() < 2.5


def test_stable_matches_are_cycle_consistent(template, lung_crop):
    pts = interior_points(lung_crop, n=40, seed=3)
    sm = stable_matches(template, template, pts, passes=5, min_score=0.5)
    assert len(sm.scores) >= 10
    assert np.abs(sm.template_lps - sm.query_lps).max() < 1e-6


def test_confidence_flag_and_reason(template, lung_crop):
    pts = interior_points(lung_crop, n=2)
    res = match_points(template, template, pts, method="nn", options=MatchOptions(min_score=1.01))
    assert not any(r.confident for r in res)
    assert all("below" in r.reason for r in res)
    d = res[0].to_dict("RAS")
    assert d["coordinate_system"] == "RAS" and d["query_point"][0] == pytest.approx(-res[0].query_point.xyz[0])


def test_points_outside_template_and_bad_method_are_refused(template, lung_crop):
    outside = lung_crop.corners_lps().max(0) + 50
    with pytest.raises(InputError, match="outside the template"):
        match_points(template, template, outside[None])
    with pytest.raises(InputError, match="NaN"):
        match_points(template, template, np.array([[np.nan, 0, 0]]))
    with pytest.raises(InputError, match="method"):
        match_points(template, template, interior_points(lung_crop, 1), method="magic")


def test_embeddings_from_different_models_are_refused(template, lung_crop):
    from samv2core.network import NetConfig, build_network

    torch.manual_seed(1)
    other = Embedder(build_network(NetConfig.lite(semantic_head=False)).eval(), device="cpu", model_id="nosem")
    with pytest.raises(MatchingError, match="different models"):
        Matcher(template, other.embed(lung_crop))


def test_constant_volume_and_missing_gpu_are_refused(embedder, lung_crop, lite_net):
    with pytest.raises(InputError, match="constant"):
        embedder.embed(lung_crop.with_array(np.zeros_like(lung_crop.array)))
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA"):
            Embedder(lite_net, device="cuda")


def test_oblique_scan_points_are_checked_against_the_scan_not_its_bounding_box(embedder, lung_crop):
    obl = oblique(lung_crop, degrees=(0, 0, 30))
    emb = embedder.embed(obl)
    box_corner = emb.model_volume.index_to_lps([1, 1, emb.model_volume.size_xyz[2] // 2])
    assert not obl.contains_lps(box_corner)  # inside the model-grid box, outside the oblique scan
    with pytest.raises(InputError, match="outside the template"):
        match_points(emb, emb, box_corner[None], method="nn")
    centre = obl.index_to_lps((np.array(obl.size_xyz) - 1) / 2)
    res = match_points(emb, emb, centre[None], method="nn")[0]
    assert np.linalg.norm(np.array(res.query_point.xyz) - centre) < 2.5


def test_coarse_head_on_fine_grid_equals_trilinear_sampling(template):
    """The separable coarse->fine interpolation equals grid_sample (trilinear, border clamp) at
    every fine voxel centre, on a real embedding's grids."""
    import torch.nn.functional as F

    from samv2core.embed import fill_coarse_on_fine

    fg, cg, coarse = template.fine_grid, template.coarse_grid, template.coarse
    c = coarse.shape[0]
    rows = torch.zeros(tuple(fg.shape) + (c + 2,), dtype=torch.float32)
    fill_coarse_on_fine(rows, 1, coarse.float(), cg, fg, chunk=3)  # chunks that split the z range
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in fg.shape], indexing="ij")
    ijk = np.stack([xx, yy, zz], -1).reshape(-1, 3).astype(float)
    cidx = (np.asarray(fg.origin) + ijk * np.asarray(fg.spacing) - np.asarray(cg.origin)) / np.asarray(cg.spacing)
    norm = (2 * cidx + 1) / np.array(cg.shape[::-1], float) - 1
    grid = torch.as_tensor(norm, dtype=torch.float32).reshape(1, *fg.shape, 3)
    ref = F.grid_sample(coarse[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    assert torch.allclose(rows[..., 1:1 + c], ref[0].permute(1, 2, 3, 0), atol=1e-5)
    assert rows[..., 0].abs().max() == 0 and rows[..., -1].abs().max() == 0  # other columns untouched
    # the stored coarse_on_fine head is the same interpolation (in storage precision)
    assert torch.allclose(template.coarse_on_fine.float(), ref[0], atol=2e-2)


def test_session_cache_is_bounded_and_keyed_by_content(lite_net, lung_crop):
    from samv2core.registration.mind_features import MindEmbedder
    from samv2core.session import Descriptors

    session = EmbeddingSession(Embedder(lite_net, device="cpu", model_id="session-test"), cache_size=2)
    a = session.embed(lung_crop)
    copy = Volume(lung_crop.array, lung_crop.spacing, lung_crop.origin, lung_crop.direction, "CT", "copy")
    assert session.embed(copy) is a  # the same voxels and geometry in another object
    session.embed(lung_crop.with_array(lung_crop.array + 10))
    session.embed(lung_crop.with_array(lung_crop.array + 20))
    assert len(session.cache) == 2
    again = session.embed(lung_crop)  # evicted: computed anew, identical values
    assert again is not a and torch.equal(again.rows, a.rows)
    assert isinstance(session.descriptors, Descriptors) and isinstance(MindEmbedder(), Descriptors)
