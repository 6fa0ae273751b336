"""Intensity refinement of the linear transform (registration.linear_intensity_refine) on a real CT.

The follow-up is simulated from the bundled pyradiomics lung CT (PyPI origin) with a known
rigid motion, so the exact fixed -> moving map is known; the refinement starts from that map
perturbed by about 2 mm / 1.5 degrees (what a SAM fit leaves) and must bring it back.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from samv2core.preprocess import body_mask, resample_to_model_grid
from samv2core.registration.linear_intensity_refine import LinearRefineOptions, refine_linear
from samv2core.registration.views import make_deformable_image
from samv2core.registration.sampling import grid_points_in_mask
from samv2core.simulate import simulate_followup
from samv2core.volume import Volume


@pytest.fixture(scope="module")
def lung():
    from samv2core.bundled_samples import load_sample

    v = load_sample("lung1_ct")
    return Volume.from_sitk(v.to_sitk()[::2, ::2, :], "CT", name="lung")


def _setup(lung, mr: bool):
    pair = simulate_followup(lung, seed=3, rotation_deg=5.0, translation_mm=10.0, deformation_mm=0.0, mr=mr)
    fm, mm = resample_to_model_grid(pair.followup, 2.0), resample_to_model_grid(lung, 2.0)
    f_mask = body_mask(fm)
    pts = grid_points_in_mask(fm, f_mask, 10.0, border_mm=10.0)
    truth = np.array([pair.transform.TransformPoint(tuple(p)) for p in pts])  # follow-up -> scan
    # the exact map as a 4x4 matrix (the simulated motion is rigid): least squares on the points
    x = np.hstack([pts, np.ones((len(pts), 1))])
    coef, *_ = np.linalg.lstsq(x, truth, rcond=None)
    exact = np.eye(4)
    exact[:3, :] = coef.T
    assert np.abs(x @ coef - truth).max() < 1e-4
    kji = np.argwhere(f_mask)
    lo = fm.index_to_lps(kji.min(0)[::-1].astype(float)) + 10.0
    hi = fm.index_to_lps(kji.max(0)[::-1].astype(float)) - 10.0
    return (make_deformable_image(fm, f_mask), make_deformable_image(mm, body_mask(mm)), exact, pts, truth, lo, hi)


def _perturbed(exact: np.ndarray, centre: np.ndarray, degrees: float, shift_mm) -> np.ndarray:
    """exact followed by a rotation about the mapped centre q and a shift: R (exact(x) - q) + q + s."""
    r = Rotation.from_rotvec(np.radians(degrees) * np.array([0.6, -0.3, 0.74])).as_matrix()
    q = exact[:3, :3] @ centre + exact[:3, 3]
    out = np.eye(4)
    out[:3, :3] = r @ exact[:3, :3]
    out[:3, 3] = r @ (exact[:3, 3] - q) + q + np.asarray(shift_mm, float)
    return out


def _err(m: np.ndarray, pts, truth) -> np.ndarray:
    return np.linalg.norm(pts @ m[:3, :3].T + m[:3, 3] - truth, axis=1)


@pytest.mark.parametrize("mr,mode", [(False, "rigid"), (False, "affine"), (True, "rigid")])
def test_refinement_removes_a_small_misalignment(lung, mr, mode):
    fixed, moving, exact, pts, truth, lo, hi = _setup(lung, mr)
    start = _perturbed(exact, pts.mean(0), 1.5, (1.5, -1.0, 1.2))
    e0 = _err(start, pts, truth)
    assert e0.mean() > 1.5
    refined, stats = refine_linear(fixed, moving, start, mode, lo, hi)
    e1 = _err(refined, pts, truth)
    assert stats["accepted"] and stats["term"] == ("mind" if mr else "lncc")
    assert e1.mean() < 0.5 and e1.mean() < 0.3 * e0.mean(), (e0.mean(), e1.mean(), stats)
    if mode == "rigid":  # the update stays a rotation
        a = refined[:3, :3]
        assert np.allclose(a @ a.T, np.eye(3), atol=1e-6) and np.isclose(np.linalg.det(a), 1.0, atol=1e-6)
    assert np.array_equal(start, _perturbed(exact, pts.mean(0), 1.5, (1.5, -1.0, 1.2)))  # input untouched


def test_refinement_that_would_move_too_far_is_not_applied(lung):
    fixed, moving, exact, pts, truth, lo, hi = _setup(lung, False)
    start = _perturbed(exact, pts.mean(0), 1.5, (1.5, -1.0, 1.2))
    out, stats = refine_linear(fixed, moving, start, "rigid", lo, hi, options=LinearRefineOptions(max_change_mm=0.2))
    assert not stats["accepted"] and "move body points" in stats["reason"]
    assert np.array_equal(out, start)
    with pytest.raises(ValueError, match="intensity term"):
        refine_linear(fixed, moving, start, "rigid", lo, hi, intensity="none")
