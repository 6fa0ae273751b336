"""The refinement toolkit (samv2core.intensity windows and local NCC) and the regional point-pair
fit (samv2core.fitting.regional_map) on the bundled real chest CT (pyradiomics lung1)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from samv2core.bundled_samples import load_sample
from samv2core.click_refine import intensity_image
from samv2core.fitting import regional_map
from samv2core.intensity import CT_CLICK_WINDOW, CT_REGISTRATION_WINDOW, local_ncc, ncc_loss, percentile_window
from samv2core.preprocess import body_mask
from samv2core.registration.views import intensity_tensor
from samv2core.volume import Volume


@pytest.fixture(scope="module")
def lung():
    v = load_sample("lung1_ct")
    return Volume(v.array, v.spacing, v.origin, v.direction, "CT", "lung1")


def test_ct_windows_map_air_and_bone_where_each_refinement_expects(lung):
    a = np.asarray(lung.array, np.float32)
    reg = CT_REGISTRATION_WINDOW.apply(a)
    click = CT_CLICK_WINDOW.apply(a)
    assert reg.dtype == np.float32 and reg.shape == a.shape
    assert reg.min() >= 0.0 and reg.max() <= 1.0 and click.min() >= -1.0 and click.max() <= 1.0
    air, bone = a <= -1000, a >= 1000
    assert air.any() and bone.any()  # the real scan has both
    assert np.all(reg[air] == 0.0) and np.all(click[air] == -1.0) and np.all(reg[bone] == 1.0)
    soft = (a > -900) & (a < 500)
    np.testing.assert_allclose(reg[soft], (a[soft] + 1000) / 1600, rtol=1e-6)
    np.testing.assert_allclose(click[soft], a[soft] / 1000, rtol=1e-6, atol=1e-7)
    # the registration views and the click refinement read their CT through these windows
    assert torch.equal(intensity_tensor(lung, "CT")[0, 0], torch.from_numpy(reg))
    assert torch.equal(intensity_image(lung)[0][0, 0], torch.from_numpy(click))


def test_mr_percentile_window_maps_its_range_to_unit(lung):
    a = np.asarray(lung.array, np.float32) + 1024.0  # positive intensities as an MR
    w = percentile_window(a.ravel()[::7], 0.5, 99.5)
    out = w.apply(a)
    assert out.min() == 0.0 and out.max() == 1.0
    lo, hi = np.percentile(a.ravel()[::7], (0.5, 99.5))
    inside = (a > lo) & (a < hi)
    np.testing.assert_allclose(out[inside], (a[inside] - lo) / (hi - lo), rtol=1e-5, atol=1e-6)
    scale = percentile_window(a[::7], None, 99)
    assert scale.apply(a).max() > 1.0  # scaled, not clipped
    np.testing.assert_allclose(scale.apply(a), a / np.percentile(a[::7], 99), rtol=1e-6)


def test_local_ncc_is_gain_offset_invariant_and_signed(lung):
    a = torch.from_numpy(CT_REGISTRATION_WINDOW.apply(lung.array[20:24, 100:140, 100:140]))
    patches = a.reshape(-1, 64)  # (P, K) real CT patches
    patches = patches[patches.std(1) > 0.01]
    assert len(patches) > 10
    np.testing.assert_allclose(local_ncc(patches, 3.0 * patches + 0.2).numpy(), 1.0, atol=1e-3)
    np.testing.assert_allclose(local_ncc(patches, -patches).numpy(), -1.0, atol=1e-3)
    other = torch.roll(patches, 1, dims=0)
    assert float(local_ncc(patches, other).abs().mean()) < 0.9
    valid = torch.ones(len(patches))
    assert float(ncc_loss(patches, 2.0 * patches, valid)) < 1e-3
    assert float(ncc_loss(patches, -patches, valid)) < 1e-3  # squared: anti-correlated counts too
    assert float(ncc_loss(patches, other, valid)) > 0.1


def test_regional_map_recovers_a_local_affine_despite_wrong_pairs(lung):
    mask = body_mask(lung)
    kji = np.argwhere(mask[::4, ::8, ::8]) * np.array([4, 8, 8])
    src = lung.index_to_lps(kji[:, ::-1].astype(float))
    a = np.array([[1.02, 0.03, 0.0], [-0.03, 0.99, 0.01], [0.0, -0.01, 1.01]])
    t = np.array([12.0, -7.5, 30.0])
    dst = src @ a.T + t
    rng = np.random.default_rng(0)
    wrong = rng.choice(len(src), len(src) // 5, replace=False)
    dst[wrong] += rng.normal(0, 40, (len(wrong), 3))  # 20% wrong pairs, tens of mm off
    point = src[len(src) // 2]
    fit = regional_map(src, dst, point, sigma_mm=50.0)
    assert fit is not None and fit.support > 12
    assert np.linalg.norm(fit.point - (a @ point + t)) < 0.05
    assert regional_map(src, dst, point + 1e4) is None  # no pairs anywhere near
