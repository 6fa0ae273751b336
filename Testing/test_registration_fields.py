"""Displacement fields: SVF integration (diffeomorphic), Jacobian statistics, MIND-SSC, the
field-of-view crop and the deformable instance optimisation on a real CT crop.

The deformable tests use the intensity terms only (LNCC; MIND-SSC for an MR-like remap):
the embedding term's value depends on the trained model and is measured in
Testing/Benchmarks/benchmark_registration.py, not here. Deformations are simulated from a real scan
with a known field (samv2core.simulate), so the ground truth is exact.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samv2core.errors import RegistrationError
from samv2core.grid import Grid
from samv2core.preprocess import body_mask, resample_to_model_grid
from samv2core.registration.deformable import DeformableOptions, refine_deformable
from samv2core.registration.views import make_deformable_image
from samv2core.registration.fov import crop_volume, overlap_crop
from samv2core.registration.grid import sample
from samv2core.registration.mind import PAIRS, mind_ssc
from samv2core.registration.sampling import grid_points_in_mask
from samv2core.registration.svf import integrate_svf, jacobian_determinant, jacobian_stats
from samv2core.simulate import simulate_followup
from samv2core.volume import Volume, load_volume


def _bump(grid: Grid, amplitude: float, sigma: float) -> torch.Tensor:
    pts = grid.points()
    c = pts.reshape(-1, 3).mean(0)
    g = np.exp(-((pts - c) ** 2).sum(-1) / (2 * sigma ** 2))
    v = np.zeros((3,) + grid.shape)
    v[0] = amplitude * g
    return torch.tensor(v[None], dtype=torch.float32)


def test_svf_is_folding_free_where_the_same_field_as_displacement_folds():
    grid = Grid((0.0, 0.0, 0.0), (2.0, 2.0, 2.0), (32, 32, 40))
    v = _bump(grid, amplitude=18.0, sigma=8.0)  # peak gradient ~1.4: x + v(x) folds
    direct = jacobian_stats(jacobian_determinant(v, grid.spacing))
    assert direct["folding_percent"] > 0
    d = integrate_svf(v, grid, steps=7)
    stats = jacobian_stats(jacobian_determinant(d, grid.spacing))
    assert stats["folding_percent"] == 0.0 and stats["min"] > 0
    # still a sizeable deformation, not a collapse to identity
    assert float(d.abs().max()) > 10.0


def test_svf_of_zero_is_identity_and_small_fields_are_almost_additive():
    grid = Grid((-10.0, 5.0, 3.0), (4.0, 4.0, 4.0), (12, 14, 16))
    assert torch.count_nonzero(integrate_svf(torch.zeros((1, 3) + grid.shape), grid)) == 0
    v = _bump(grid, amplitude=0.5, sigma=12.0)
    d = integrate_svf(v, grid)
    assert torch.allclose(d, v, atol=0.02)


def test_jacobian_of_a_linear_displacement_is_its_determinant():
    grid = Grid((0.0, 0.0, 0.0), (3.0, 2.0, 4.0), (10, 12, 14))
    pts = grid.points()
    a = np.array([[0.1, 0.02, 0.0], [0.0, -0.05, 0.03], [0.01, 0.0, 0.2]])
    u = np.moveaxis(pts @ a.T, -1, 0)
    det = jacobian_determinant(u, grid.spacing)
    assert np.allclose(det, np.linalg.det(np.eye(3) + a), atol=1e-9)


def test_mind_ssc_is_contrast_invariant_and_structure_sensitive():
    rng = np.random.default_rng(0)
    base = torch.tensor(rng.random((1, 1, 20, 22, 24)), dtype=torch.float32)
    base = torch.nn.functional.avg_pool3d(base, 3, stride=1, padding=1)
    m = mind_ssc(base)
    assert m.shape == (1, len(PAIRS), 20, 22, 24) and len(PAIRS) == 12
    assert torch.allclose(m, mind_ssc(3.0 * base + 7.0), atol=1e-4)
    shifted = torch.roll(base, 3, dims=4)
    assert (m - mind_ssc(shifted)).abs().mean() > 0.05


def test_fov_crop_keeps_the_common_part_and_refuses_disjoint_images(shared_data):
    ct = load_volume(shared_data / "ct" / "totalseg_example" / "ct_3mm.nii.gz")
    half = crop_volume(ct, ct.corners_lps().min(0), ct.corners_lps().max(0) - np.array([0, 0, 170.0]))
    assert half.array.shape[0] < ct.array.shape[0] and np.array_equal(half.direction, ct.direction)
    # the cropped voxels are the original voxels at the same physical place
    p = half.index_to_lps([5, 7, 3])
    ijk = np.rint(ct.lps_to_index(p)).astype(int)
    assert half.array[3, 7, 5] == ct.array[ijk[2], ijk[1], ijk[0]]
    fov = overlap_crop(ct, half, np.eye(4), margin_mm=20.0)
    assert fov.fixed_kept < 0.7 and fov.moving_kept == pytest.approx(1.0)
    far = np.eye(4)
    far[2, 3] = 2000.0
    with pytest.raises(RegistrationError, match="do not overlap"):
        overlap_crop(ct, half, far)


@pytest.fixture(scope="module")
def abdomen_crop(shared_data):
    """A real CT crop (TotalSegmentator example, 3 mm): 150 x 120 x 120 mm around the upper abdomen."""
    ct = load_volume(shared_data / "ct" / "totalseg_example" / "ct_3mm.nii.gz")
    img = ct.to_sitk()[36:86, 30:70, 50:90]
    return Volume.from_sitk(img, "CT", name="abdomen_crop")


def _deformation_case(volume: Volume, mr: bool, seed: int):
    pair = simulate_followup(volume, seed=seed, rotation_deg=0.0, translation_mm=0.0, deformation_mm=7.0,
                             control_mm=45.0, noise=0.01, mr=mr)
    fixed, moving = pair.followup, volume  # pair.transform maps follow-up (fixed) points to the baseline
    fm, mm = resample_to_model_grid(fixed, 2.0), resample_to_model_grid(moving, 2.0)
    f_mask = body_mask(fm)
    pts = grid_points_in_mask(fm, f_mask, 8.0, border_mm=12.0)
    truth = np.array([pair.transform.TransformPoint(tuple(p)) for p in pts])
    lo = np.asarray(fm.origin) + 8.0
    hi = np.asarray(fm.index_to_lps(np.array(fm.size_xyz) - 1)) - 8.0
    return make_deformable_image(fm, f_mask), make_deformable_image(mm, body_mask(mm)), pts, truth, lo, hi


@pytest.mark.parametrize("mr,term", [(False, "lncc"), (True, "mind")])
def test_deformable_intensity_term_lowers_error_on_simulated_deformation(abdomen_crop, mr, term):
    fixed, moving, pts, truth, lo, hi = _deformation_case(abdomen_crop, mr, seed=2)
    before = np.linalg.norm(truth - pts, axis=1)
    opts = DeformableOptions(intensity=term, embedding_weight=0.0, levels_mm=(12.0, 6.0), iterations=(40, 30),
                             sample_spacing_mm=3.0, taper_mm=12.0, device="cpu")
    res = refine_deformable(fixed, moving, np.eye(4), lo, hi, options=opts)
    d = sample(res.displacement, res.grid, torch.tensor(pts, dtype=torch.float32)[None])[0].T.numpy()
    after = np.linalg.norm(truth - (pts + d), axis=1)
    assert res.stats["intensity_term"] == term and not res.stats["embedding_term"]
    assert after.mean() < 0.75 * before.mean(), (before.mean(), after.mean())
    stats = jacobian_stats(jacobian_determinant(res.displacement, res.grid.spacing))
    assert stats["folding_percent"] == 0.0


def test_deformable_refuses_without_any_similarity_term(abdomen_crop):
    fm = resample_to_model_grid(abdomen_crop, 2.0)
    img = make_deformable_image(fm, body_mask(fm))
    lo, hi = np.asarray(fm.origin) + 8, np.asarray(fm.origin) + 60
    with pytest.raises(ValueError, match="both are disabled"):
        refine_deformable(img, img, np.eye(4), lo, hi, options=DeformableOptions(intensity="none"))
