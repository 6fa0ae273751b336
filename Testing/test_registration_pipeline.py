"""register() end to end, its refusals, and ``samv2 register``.

End-to-end runs use an ORACLE embedder (a test double, not a model): its "embeddings" are
random Fourier features of each voxel's true position in a common reference frame, known
because the follow-up is simulated from a real scan (bundled pyradiomics lung CT, PyPI
origin). This tests the pipeline's plumbing and conventions (query sampling, stable
matching, robust fit, FOV crop, coarse and deformable stages, fixed -> moving direction)
independently of model quality; the trained model's accuracy is measured in
Testing/Benchmarks/benchmark_registration.py.
"""
from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch

from samv2core.embed import Embeddings
from samv2core.errors import RegistrationError
from samv2core.grid import Grid
from samv2core.preprocess import body_mask, resample_to_model_grid
from samv2core.registration import DeformableOptions, RegistrationOptions, register
from samv2core.registration.cli import add_register_arguments, run_register
from samv2core.registration.sampling import grid_points_in_mask
from samv2core.simulate import simulate_followup
from samv2core.volume import Volume


class OracleEmbedder:
    """Test double: unit "embeddings" = random Fourier features of the reference position.

    ``to_reference[name](lps (N, 3)) -> reference (N, 3)`` says where each volume's voxels
    sit in a common frame; cosine similarity then peaks exactly at true correspondences
    (fine head: ~15 mm kernel, coarse head: ~60 mm).
    """

    model_id = "oracle-test-double"

    def __init__(self, to_reference: dict, channels: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.to_reference = to_reference
        self.heads = {name: (rng.normal(0, 1.0 / sigma, (3, channels)), rng.uniform(0, 2 * np.pi, channels))
                      for name, sigma in (("fine", 15.0), ("coarse", 60.0))}
        self.spacing_mm = 2.0

    def _features(self, name, lps):
        w, b = self.heads[name]
        f = np.cos(lps @ w + b)
        return torch.nn.functional.normalize(torch.tensor(f, dtype=torch.float32), dim=1)

    def embed(self, volume: Volume, progress=None) -> Embeddings:
        mv = resample_to_model_grid(volume, 2.0)
        sp, org = np.asarray(mv.spacing), np.asarray(mv.origin)
        z, y, x = mv.array.shape
        fine = Grid(tuple(org + sp * 0.5), tuple(sp * 2), (-(-z // 2), -(-y // 2), -(-x // 2)))
        cs = np.array([16.0, 16.0, 4.0])
        coarse = Grid(tuple(org + sp * (cs - 1) / 2), tuple(sp * cs),
                               (-(-z // 4), -(-y // 16), -(-x // 16)))
        ref = self.to_reference[volume.name]
        pts = fine.index_to_lps(fine.all_index_xyz())
        rows = torch.cat([self._features("fine", ref(pts)), self._features("coarse", ref(pts))], 1)
        cpts = coarse.index_to_lps(coarse.all_index_xyz())
        c = self._features("coarse", ref(cpts)).T.reshape(-1, *coarse.shape)
        return Embeddings(rows, (("fine", rows.shape[1] // 2), ("coarse", rows.shape[1] // 2)), c, fine, coarse,
                          mv, self.model_id, {})


def _sitk_map(transform):
    return lambda p: np.array([transform.TransformPoint(tuple(q)) for q in np.asarray(p, float)])


@pytest.fixture(scope="module")
def lung():
    from samv2core.bundled_samples import load_sample

    v = load_sample("lung1_ct")
    img = v.to_sitk()[::2, ::2, :]  # 1.1 mm in-plane is plenty here and halves the work
    return Volume.from_sitk(img, "CT", name="lung")


def _case(lung, **sim):
    pair = simulate_followup(lung, **sim)
    fixed, moving = pair.followup, lung  # truth: pair.transform maps fixed (follow-up) points to moving
    oracle = OracleEmbedder({fixed.name: _sitk_map(pair.transform), moving.name: lambda p: p})
    fm = resample_to_model_grid(fixed, 2.0)
    pts = grid_points_in_mask(fm, body_mask(fm), 12.0, border_mm=10.0)
    truth = _sitk_map(pair.transform)(pts)
    return fixed, moving, oracle, pts, truth


def test_rigid_and_affine_recover_simulated_motion_with_fov_crop(lung):
    fixed, moving, oracle, pts, truth = _case(lung, seed=4, rotation_deg=8.0, translation_mm=12.0,
                                              deformation_mm=0.0, crop_fraction=0.6)
    before = np.linalg.norm(pts - truth, axis=1).mean()
    for mode in ("rigid", "affine"):
        res = register(fixed, moving, mode=mode, embedder=oracle)
        err = np.linalg.norm(res.transform_points(pts) - truth, axis=1)
        assert err.mean() < 1.0 and err.max() < 2.5, (mode, before, err.mean(), err.max())
        rep = res.report
        assert rep["linear"]["inliers"] >= 12 and rep["linear"]["mode"] == mode
        assert res.displacement is None and "jacobian" not in rep
        assert set(rep["timing"]) >= {"embedding_s", "matching_s", "linear_fit_s", "refine_s", "total_s"}
        assert rep["linear_refinement"]["term"] == "lncc" and rep["settings"]["refine"] is True
        json.dumps(rep)  # the report is JSON-ready
    m = res.linear_matrix
    assert np.allclose(m[:3, :3], np.asarray(res.linear.GetMatrix()).reshape(3, 3))
    assert before > 5.0


def test_coarse_and_deformable_lower_the_error_of_a_simulated_deformation(lung):
    fixed, moving, oracle, pts, truth = _case(lung, seed=7, rotation_deg=3.0, translation_mm=5.0,
                                              deformation_mm=9.0, control_mm=50.0)
    lin = register(fixed, moving, "affine", embedder=oracle)
    e_lin = np.linalg.norm(lin.transform_points(pts) - truth, axis=1).mean()
    opts = RegistrationOptions(deformable=DeformableOptions(levels_mm=(16.0, 8.0), iterations=(25, 15), device="cpu"))
    full = register(fixed, moving, "affine", coarse=True, deformable=True, embedder=oracle, options=opts)
    e_full = np.linalg.norm(full.transform_points(pts) - truth, axis=1).mean()
    assert e_full < 0.8 * e_lin, (e_lin, e_full)
    rep = full.report
    assert rep["folding_percent"] == 0.0 and rep["jacobian"]["min"] > 0
    assert {"coarse_s", "deformable_s"} <= set(rep["timing"])
    assert rep["deformable_refinement"]["embedding_term"] and rep["deformable_refinement"]["intensity_term"] == "lncc"
    assert full.displacement is not None and full.displacement.GetNumberOfComponentsPerPixel() == 3


# --- refusals ---------------------------------------------------------------------------------
def _ct(shape=(20, 40, 40), spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0), value=None, name="ct", seed=0):
    rng = np.random.default_rng(seed)
    arr = np.full(shape, -1000.0, np.float32) + rng.normal(0, 5, shape).astype(np.float32)
    if value is None:
        body = arr[3:-3, 8:-8, 8:-8]
        body[...] = 40.0 + rng.normal(0, 10, body.shape)
    return Volume(arr, spacing, origin, np.eye(3), "CT", name)


class _NeverCalled:
    model_id = "never"

    def embed(self, *a, **k):
        raise AssertionError("the embedder must not run for inputs that are refused up front")


@pytest.mark.parametrize("fixed,moving,pattern", [
    (_ct(shape=(1, 40, 40)), _ct(), "2D"),
    (_ct(), _ct(value="air"), "all background"),
    (_ct(), _ct(origin=(0.0, 0.0, 5000.0)), "do not overlap physically"),
    (_ct(), Volume(np.abs(_ct().array), (2.0,) * 3, (0.0,) * 3, np.eye(3), "CT", "pos"), "no negative values"),
    (_ct(), Volume(_ct().array, (2.0,) * 3, (0.0,) * 3, np.eye(3), "MR", "ct_as_mr"), "looks like CT"),
])
def test_bad_inputs_are_refused_before_embedding(fixed, moving, pattern):
    with pytest.raises(RegistrationError, match=pattern):
        register(fixed, moving, "affine", embedder=_NeverCalled())


def test_modality_options_that_contradict_the_images_are_refused():
    ct = _ct()
    mr_arr = np.clip(ct.array + 1000.0, 0, None)
    mr = Volume(mr_arr, ct.spacing, ct.origin, ct.direction, "MR", "mr")
    with pytest.raises(RegistrationError, match="modality mismatch"):
        register(ct, mr, "rigid", embedder=_NeverCalled(), options=RegistrationOptions(modality_pair="same"))
    with pytest.raises(RegistrationError, match="modality mismatch"):
        register(ct, ct, "rigid", embedder=_NeverCalled(), options=RegistrationOptions(modality_pair="cross"))
    with pytest.raises(RegistrationError, match="LNCC"):
        register(ct, mr, "rigid", deformable=True, embedder=_NeverCalled(),
                 options=RegistrationOptions(deformable=DeformableOptions(intensity="lncc")))
    with pytest.raises(RegistrationError, match="unknown registration mode"):
        register(ct, ct, "similarity", embedder=_NeverCalled())


def test_too_few_confident_matches_is_refused(lung):
    fixed, moving, _, _, _ = _case(lung, seed=1, rotation_deg=2.0, translation_mm=3.0, deformation_mm=0.0)
    # "embeddings" of unrelated places: nothing is similar enough to match
    oracle = OracleEmbedder({fixed.name: lambda p: p + 3000.0, moving.name: lambda p: p})
    with pytest.raises(RegistrationError, match="too few"):
        register(fixed, moving, "affine", embedder=oracle, options=RegistrationOptions(features="sam"))


# --- CLI ----------------------------------------------------------------------------------------
def _args(*argv):
    p = argparse.ArgumentParser()
    add_register_arguments(p)
    return p.parse_args(list(argv))


def test_cli_writes_outputs_on_success_and_nothing_with_exit_2_on_refusal(lung, tmp_path, capsys):
    fixed, moving, oracle, pts, truth = _case(lung, seed=4, rotation_deg=5.0, translation_mm=8.0, deformation_mm=0.0)
    f, m = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    import SimpleITK as sitk

    sitk.WriteImage(fixed.to_sitk(), str(f))
    sitk.WriteImage(moving.to_sitk(), str(m))
    oracle.to_reference = {"fixed": oracle.to_reference[fixed.name], "moving": oracle.to_reference[moving.name]}
    out = tmp_path / "out"
    code = run_register(_args("--fixed", str(f), "--moving", str(m), "--mode", "rigid", "--out", str(out),
                              "--fixed-modality", "CT", "--moving-modality", "CT", "--quiet"), embedder=oracle)
    assert code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["inliers"] >= 12 and summary["features"] == "sam"
    # the oracle's matches are exact: the intensity refinement may only keep or improve them
    assert all(w.startswith("intensity refinement not applied") for w in summary["warnings"])
    t = sitk.ReadTransform(str(out / "linear.tfm"))
    err = np.linalg.norm(np.array([t.TransformPoint(tuple(p)) for p in pts]) - truth, axis=1)
    assert err.mean() < 1.0
    assert (out / "moving_resampled.nii.gz").exists() and (out / "report.json").exists()
    if importlib.util.find_spec("matplotlib"):  # the before/after picture comes with the 'figures' extra
        assert (out / "overlay.png").stat().st_size > 10_000

    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(fixed.to_sitk()[:, :, 5:6], str(flat))
    bad_out = tmp_path / "bad"
    code = run_register(_args("--fixed", str(flat), "--moving", str(m), "--out", str(bad_out), "--quiet"),
                        embedder=_NeverCalled())
    assert code == 2
    err = capsys.readouterr().err
    assert "73 x 73 x 1 voxels" in err and "single slice" in err and len(err.strip().splitlines()) == 1
    from samv2core.registration.cli import options_from_args

    assert options_from_args(_args("--fixed", "f", "--moving", "m", "--out", "o", "--features", "mind")).features == "mind"
    assert options_from_args(_args("--fixed", "f", "--moving", "m", "--out", "o")).refine is True
    assert options_from_args(_args("--fixed", "f", "--moving", "m", "--out", "o", "--no-refine")).refine is False
    with pytest.raises(SystemExit):
        _args("--fixed", "f", "--moving", "m", "--out", "o", "--features", "sift")
    assert not bad_out.exists() or not any(bad_out.iterdir())


def test_query_points_lie_inside_the_body_and_away_from_its_edge(lung_crop):
    """grid_points_in_mask on a real CT: every point inside the body, at least about
    border_mm (exact distance transform, one voxel of tolerance) from the body edge or the
    image edge, on the requested LPS grid spacing; a mask thinner than the border keeps points."""
    from scipy import ndimage

    fm = resample_to_model_grid(lung_crop, 2.0)
    mask = body_mask(fm)
    border = 10.0
    pts = grid_points_in_mask(fm, mask, 8.0, border_mm=border, max_points=None)
    assert len(pts) > 50
    ijk = np.rint(fm.lps_to_index(pts)).astype(int)
    assert mask[ijk[:, 2], ijk[:, 1], ijk[:, 0]].all()
    dist = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=fm.spacing[::-1])[1:-1, 1:-1, 1:-1]
    assert dist[ijk[:, 2], ijk[:, 1], ijk[:, 0]].min() >= border - max(fm.spacing)
    steps = np.diff(np.unique(np.round(pts[:, 0], 6)))
    assert np.allclose(steps % 8.0, 0.0, atol=1e-6) or np.allclose(steps, 8.0)
    # deeper interior points are not lost: about as many as the exact erosion allows
    exact = grid_points_in_mask(fm, dist >= border, 8.0, border_mm=0.0, max_points=None)
    assert len(pts) >= 0.7 * len(exact)
    thin = np.zeros_like(mask)
    thin[:, 40:44, 30:70] = True  # an 8 mm thick plate: thinner than twice the border
    assert len(grid_points_in_mask(fm, thin, 4.0, border_mm=border)) > 0


# --- cross-modality: MIND-SSC descriptors ---------------------------------------------------------
def _noise_embedder(*volumes):
    """A test double for a model that cannot match: every voxel gets an unrelated random
    position, so no two matches agree on a transform."""
    rng = np.random.default_rng(5)
    return OracleEmbedder({v.name: (lambda p: rng.uniform(-1e4, 1e4, np.shape(p))) for v in volumes})


def test_ct_onto_mr_like_followup_falls_back_to_mind_and_recovers_the_motion(lung):
    """A real CT and an MR-like follow-up simulated from it (known rigid motion, intensities
    remapped): with SAM embeddings that cannot match across modalities, 'auto' uses MIND-SSC,
    says so, and recovers the motion; 'sam' alone is refused."""
    pair = simulate_followup(lung, seed=9, rotation_deg=5.0, translation_mm=10.0, deformation_mm=0.0, mr=True)
    fixed = pair.followup
    assert fixed.modality.value == "MR"
    fm = resample_to_model_grid(fixed, 2.0)
    pts = grid_points_in_mask(fm, body_mask(fm), 12.0, border_mm=10.0)
    truth = _sitk_map(pair.transform)(pts)
    res = register(fixed, lung, "rigid", embedder=_noise_embedder(fixed, lung))
    err = np.linalg.norm(res.transform_points(pts) - truth, axis=1)
    assert err.mean() < 3.0, (np.linalg.norm(pts - truth, axis=1).mean(), err.mean())
    assert res.report["features"] == "mind-ssc"
    assert res.report["verification"]["chosen"] == "mind-ssc"
    assert not res.report["verification"]["candidates"]["sam"]["passed"]
    assert any("MIND-SSC" in w for w in res.report["warnings"])
    # asked for explicitly: the same descriptors, no SAM model needed
    direct = register(fixed, lung, "rigid", embedder=None, options=RegistrationOptions(features="mind"))
    assert direct.report["features"] == "mind-ssc"
    assert np.allclose(direct.transform_points(pts), res.transform_points(pts), atol=1e-6)
    # SAM only: a refusal naming the reason, never a silent change of descriptors
    with pytest.raises(RegistrationError, match="too few"):
        register(fixed, lung, "rigid", embedder=_noise_embedder(fixed, lung), options=RegistrationOptions(features="sam"))
    with pytest.raises(ValueError, match="features"):
        RegistrationOptions(features="sift")


def test_refinement_that_cannot_run_keeps_the_sam_fit_with_a_warning(lung, monkeypatch):
    from samv2core.registration import stages

    fixed, moving, oracle, pts, truth = _case(lung, seed=4, rotation_deg=5.0, translation_mm=8.0, deformation_mm=0.0)
    plain = register(fixed, moving, "rigid", embedder=oracle, options=RegistrationOptions(refine=False))

    def cannot(*args, **kwargs):
        raise ValueError("only 3 sample points inside the fixed body and the common field of view")

    monkeypatch.setattr(stages, "refine_linear", cannot)
    res = register(fixed, moving, "rigid", embedder=oracle)
    assert np.allclose(res.linear_matrix, plain.linear_matrix)
    assert res.report["linear_refinement"]["accepted"] is False
    assert any("refinement not applied: skipped: only 3 sample points" in w for w in res.report["warnings"])


def test_mind_coarse_descriptor_on_the_downsampled_grid_matches_the_full_resolution_one():
    """The fast coarse MIND-SSC (2x averaged image, same physical offsets) lands on the same
    grids as the full-resolution one and points the same way (real CT, bundled)."""
    from samv2core.registration.mind_features import mind_embeddings
    from samv2core.bundled_samples import load_sample

    v = load_sample("lung1_ct")
    full, fast = mind_embeddings(v, coarse_downsample=1), mind_embeddings(v)
    assert full.fine_grid == fast.fine_grid and full.coarse_grid == fast.coarse_grid
    assert torch.equal(full.fine, fast.fine)
    cos = (full.coarse_on_fine.float() * fast.coarse_on_fine.float()).sum(0)
    assert float(cos.median()) > 0.98 and float(cos.mean()) > 0.95
    with pytest.raises(ValueError, match="coarse_downsample"):
        mind_embeddings(v, coarse_downsample=3)
