"""Robust linear fits (SAM-rigid / SAM-affine) and the SAM-coarse control-grid fit, on
synthetic point sets with a known answer and gross outliers."""
from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from samv2core.errors import RegistrationError
from samv2core.fitting import fit_affine, fit_rigid, huber_affine, robust_fit
from samv2core.registration.coarse import fit_coarse_field


def _points(n=400, seed=0):
    rng = np.random.default_rng(seed)
    # scanner coordinates far from the origin, as real CT points are
    return rng.uniform(-150, 150, (n, 3)) + np.array([20.0, -180.0, 900.0]), rng


def _corrupt(dst, rng, fraction=0.4, noise=0.7):
    dst = dst + rng.normal(0, noise, dst.shape)
    bad = rng.random(len(dst)) < fraction
    dst[bad] += rng.uniform(-90, 90, (bad.sum(), 3))
    return dst, bad


def test_rigid_fit_recovers_rotation_and_translation_with_40_percent_outliers():
    src, rng = _points()
    r = Rotation.from_euler("xyz", [12, -7, 20], degrees=True).as_matrix()
    t = np.array([15.0, -32.0, 9.0])
    dst, bad = _corrupt(src @ r.T + t, rng)
    fit = robust_fit(src, dst, "rigid", threshold_mm=8.0, min_inliers=12)
    assert np.allclose(fit.matrix, r, atol=2e-3)
    assert np.allclose(np.linalg.det(fit.matrix), 1.0, atol=1e-9)
    probe = src[:50] + 5.0
    assert np.linalg.norm(fit.apply(probe) - (probe @ r.T + t), axis=1).max() < 1.0
    # the outliers are the ones rejected (a few random outliers may land within the threshold)
    # outliers rejected; the Tukey cutoff (2.5 robust sigmas) keeps ~90% of Gaussian inliers
    assert fit.inliers[~bad].mean() > 0.85 and fit.inliers[bad].mean() < 0.05
    rep = fit.report()
    assert rep["inliers"] == fit.n_inliers and rep["residual_mm_inliers"]["median"] < 2.0
    assert abs(rep["rotation_deg"] - np.degrees(Rotation.from_matrix(r).magnitude())) < 0.2


def test_affine_fit_recovers_scaling_and_shear_with_outliers():
    src, rng = _points(seed=1)
    a = Rotation.from_euler("zyx", [5, 3, -4], degrees=True).as_matrix() @ np.array(
        [[1.08, 0.03, 0.0], [0.0, 0.94, 0.02], [0.01, 0.0, 1.05]])
    t = np.array([-6.0, 11.0, 25.0])
    dst, _ = _corrupt(src @ a.T + t, rng, fraction=0.3)
    fit = robust_fit(src, dst, "affine")
    assert np.allclose(fit.matrix, a, atol=3e-3)
    probe = src[:50]
    assert np.linalg.norm(fit.apply(probe) - (probe @ a.T + t), axis=1).max() < 1.0


def test_plain_fits_are_exact_without_noise_and_rigid_never_reflects():
    src, _ = _points(30, seed=2)
    r = Rotation.from_euler("xyz", [30, 10, -45], degrees=True).as_matrix()
    m, t = fit_rigid(src, src @ r.T + 3.0)
    assert np.allclose(m, r, atol=1e-9)
    assert np.allclose(src @ m.T + t, src @ r.T + 3.0, atol=1e-6)
    # a mirrored target: the best proper rotation, never a reflection
    mirrored = src * np.array([-1.0, 1.0, 1.0])
    m, _ = fit_rigid(src, mirrored)
    assert np.linalg.det(m) > 0
    a = np.diag([1.1, 0.9, 1.2])
    m, t = fit_affine(src, src @ a.T - 7.0)
    assert np.allclose(m, a, atol=1e-9) and np.allclose(t, -7.0, atol=1e-6)


def test_refuses_too_few_pairs_and_too_few_inliers():
    src, rng = _points(8, seed=3)
    with pytest.raises(RegistrationError, match="too few confident matches"):
        robust_fit(src, src + 1.0, "affine", min_inliers=12)
    # enough pairs, but random: no consensus of 12
    src, rng = _points(40, seed=4)
    dst = rng.uniform(-300, 300, src.shape)
    with pytest.raises(RegistrationError, match="too few matches agree|implausible"):
        robust_fit(src, dst, "rigid", min_inliers=12)


def test_collinear_points_are_refused_and_a_single_plane_gives_a_similarity():
    src, rng = _points(60, seed=5)
    line = src.copy()
    line[:, 1:] = line[:, :1] * np.array([0.5, -0.2]) + np.array([-180.0, 900.0])  # all on one line
    for mode in ("rigid", "affine"):
        with pytest.raises(RegistrationError, match="collinear"):
            robust_fit(line, line + 2.0, mode)
    plane = src.copy()
    plane[:, 2] = 900.0  # every match in one slice: the slice-normal scaling is undetermined
    fit = robust_fit(plane, plane + 2.0, "affine")
    assert fit.stats["fitted_model"] == "similarity" and np.allclose(fit.matrix, np.eye(3), atol=1e-6)


def test_refuses_reflecting_affine():
    src, rng = _points(60, seed=6)
    with pytest.raises(RegistrationError, match="implausible|agree"):
        robust_fit(src, src * np.array([-1.0, 1.0, 1.0]), "affine")


def test_coarse_field_fits_a_smooth_deformation_robustly_without_folding():
    rng = np.random.default_rng(0)
    lo, hi = np.array([-150.0, -150.0, 0.0]), np.array([150.0, 150.0, 200.0])
    x = rng.uniform(lo, hi, (600, 3))

    def u(p):
        return np.stack([8 * np.sin(p[:, 2] / 60), 6 * np.cos(p[:, 0] / 70), 5 * np.sin(p[:, 1] / 80)], 1)

    y = x + u(x) + rng.normal(0, 1.0, x.shape)
    bad = rng.random(len(x)) < 0.15
    y[bad] += rng.uniform(-40, 40, (bad.sum(), 3))
    cf = fit_coarse_field(x, y, lo, hi, spacing_mm=32.0, smoothness=1.0)
    probe = rng.uniform(lo + 20, hi - 20, (300, 3))
    err = np.linalg.norm(cf.at(probe) - u(probe), axis=1)
    assert err.mean() < 0.25 * np.linalg.norm(u(probe), axis=1).mean()
    assert cf.stats["control_jacobian"]["folding_percent"] == 0.0
    assert cf.stats["downweighted_points"] >= int(0.8 * bad.sum())


def test_coarse_field_stiffens_until_it_does_not_fold():
    rng = np.random.default_rng(1)
    lo, hi = np.zeros(3), np.full(3, 128.0)
    x = rng.uniform(lo, hi, (200, 3))
    y = x.copy()
    # neighbouring points pulled in opposite directions: an unregularised fit would fold
    y[:, 0] += np.where((x[:, 0] // 16) % 2 == 0, 20.0, -20.0)
    cf = fit_coarse_field(x, y, lo, hi, spacing_mm=16.0, smoothness=1e-4, huber_mm=100.0)
    assert cf.stats["control_jacobian"]["folding_percent"] == 0.0
    assert cf.stats["refits"] >= 1


def test_coarse_field_refuses_too_few_points():
    with pytest.raises(RegistrationError, match="too few matches"):
        fit_coarse_field(np.zeros((3, 3)), np.ones((3, 3)), [-10, -10, -10], [10, 10, 10])


def test_affine_on_a_thin_slab_of_matches_falls_back_to_a_similarity_and_says_so():
    rng = np.random.default_rng(7)
    src = np.column_stack([rng.uniform(-150, 150, 300), rng.uniform(-120, 120, 300), rng.uniform(0, 30, 300)])
    m = 1.07 * Rotation.from_euler("xyz", [3, -2, 9], degrees=True).as_matrix()
    dst, _ = _corrupt(src @ m.T + [5.0, -3.0, 12.0], rng, fraction=0.2, noise=0.5)
    fit = robust_fit(src, dst, "affine")
    assert fit.mode == "affine" and fit.stats["fitted_model"] == "similarity" and "similarity" in fit.stats["warning"]
    assert np.allclose(fit.matrix, m, atol=5e-3)


def test_huber_affine_resists_a_few_gross_outliers():
    """The fixed-point map of one click: few points (a 5^3 cube), some of them wrong."""
    src, rng = _points(n=40, seed=3)
    a = np.array([[1.05, 0.02, 0.0], [-0.03, 0.97, 0.04], [0.01, 0.0, 1.02]])
    t = np.array([4.0, -7.0, 2.5])
    dst = src @ a.T + t + rng.normal(0, 0.3, src.shape)
    dst[:4] += 40.0  # 10% gross outliers
    m, tt, r = huber_affine(src, dst)
    probe = src.mean(0) + 10.0
    assert np.linalg.norm(m @ probe + tt - (a @ probe + t)) < 1.5
    plain_m, plain_t = fit_affine(src, dst)
    assert np.linalg.norm(plain_m @ probe + plain_t - (a @ probe + t)) > 2.0  # least squares is pulled away
    assert np.median(r) < 1.0 and r[:4].min() > 30.0
