"""Volumes and geometry: loading, RAS/LPS, index <-> physical, model-grid resampling with
flipped, left-handed and oblique direction matrices, intensity normalisation, bad input."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from samv2core.coords import PhysicalPoint, lps_to_ras, ras_to_lps
from samv2core.errors import InputError
from samv2core.preprocess import body_mask, normalize_intensity, resample_to_model_grid
from samv2core.volume import Modality, Volume, load_volume


def flipped(volume: Volume, axis_xyz: int) -> Volume:
    """Same physical content, stored with index axis ``axis_xyz`` reversed (direction column negated)."""
    arr = np.flip(volume.array, axis=2 - axis_xyz)
    d = volume.direction.copy()
    n = volume.size_xyz[axis_xyz]
    origin = np.asarray(volume.origin) + d[:, axis_xyz] * volume.spacing[axis_xyz] * (n - 1)
    d[:, axis_xyz] *= -1
    return Volume(arr, volume.spacing, origin, d, volume.modality, volume.name + "_flip")


def rotation(ax, ay, az):
    return sitk.Euler3DTransform((0, 0, 0), np.deg2rad(ax), np.deg2rad(ay), np.deg2rad(az)).GetMatrix()


def oblique(volume: Volume, degrees=(10.0, -7.0, 25.0), spacing=None) -> Volume:
    """The content of ``volume`` resampled onto a rotated (oblique) grid covering it."""
    r = np.array(rotation(*degrees)).reshape(3, 3)
    d = r @ volume.direction
    sp = spacing or volume.spacing
    corners = volume.corners_lps()
    local = (corners - corners.mean(0)) @ d  # corner coordinates along the new axes
    lo, hi = local.min(0), local.max(0)
    size = [int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(lo, hi, sp)]
    origin = corners.mean(0) + d @ lo
    out = sitk.Resample(volume.to_sitk(), size, sitk.Transform(), sitk.sitkLinear, tuple(origin), tuple(sp),
                        tuple(d.ravel()), float(volume.array.min()), sitk.sitkFloat32)
    return Volume.from_sitk(out, volume.modality, name=volume.name + "_oblique")


def test_ras_lps_round_trip():
    p = np.array([[10.0, -20.0, 30.0], [0.5, 1.5, -2.5]])
    assert np.allclose(ras_to_lps(p), [[-10, 20, 30], [-0.5, -1.5, -2.5]])
    assert np.allclose(lps_to_ras(ras_to_lps(p)), p)
    pt = PhysicalPoint((1.0, 2.0, 3.0), "RAS")
    assert pt.to("LPS").xyz == (-1.0, -2.0, 3.0) and pt.to("LPS").to("RAS") == pt


@pytest.mark.parametrize("degrees", [(0, 0, 0), (10, -7, 25), (90, 0, 180)])
def test_index_to_lps_matches_simpleitk_for_oblique_directions(lung_crop, degrees):
    d = np.array(rotation(*degrees)).reshape(3, 3) @ np.diag([1, -1, 1])  # includes a left-handed case
    v = Volume(lung_crop.array, (0.7, 1.3, 2.9), (5.0, -12.0, 40.0), d)
    img = v.to_sitk()
    ijk = np.array([[0, 0, 0], [3.5, 7.25, 1.0], [119, 99, 29]], float)
    ours = v.index_to_lps(ijk)
    ref = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    assert np.allclose(ours, ref, atol=1e-6)
    assert np.allclose(v.lps_to_index(ours), ijk, atol=1e-6)


def test_volume_is_an_immutable_copy(lung_crop):
    src = np.array(lung_crop.array)
    v = Volume(src, (1, 1, 1), (0, 0, 0), np.eye(3))
    src[0, 0, 0] = 12345
    assert v.array[0, 0, 0] != 12345
    with pytest.raises(ValueError):
        v.array[0, 0, 0] = 1


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_flipped_storage_gives_identical_model_grid(lung_crop, axis):
    ref = resample_to_model_grid(lung_crop, 2.0)
    flip = flipped(lung_crop, axis)
    assert np.linalg.det(flip.direction) < 0  # left-handed
    # the same physical point reads the same voxel value in both storages
    ijk = np.array([17.0, 33.0, 11.0])
    p = lung_crop.index_to_lps(ijk)
    q = np.round(flip.lps_to_index(p)).astype(int)
    assert flip.array[q[2], q[1], q[0]] == lung_crop.array[11, 33, 17]
    res = resample_to_model_grid(flip, 2.0)
    assert res.array.shape == ref.array.shape
    assert np.allclose(res.origin, ref.origin) and np.allclose(res.direction, np.eye(3))
    assert np.allclose(res.array, ref.array, atol=1e-2)


def test_oblique_scan_resamples_onto_the_same_anatomy(lung_crop):
    ref = resample_to_model_grid(lung_crop, 2.0)
    obl = oblique(lung_crop)
    assert not np.allclose(obl.direction, np.eye(3))
    res = resample_to_model_grid(obl, 2.0)
    # compare on the reference grid, in the interior covered by both
    img = sitk.Resample(res.to_sitk(), ref.to_sitk(), sitk.Transform(), sitk.sitkLinear, -2000.0)
    a, b = ref.array, sitk.GetArrayFromImage(img)
    inner = (b > -1500) & body_mask(ref)
    inner[:, :6], inner[:, -6:], inner[:, :, :6], inner[:, :, -6:] = False, False, False, False
    assert inner.sum() > 5000
    corr = np.corrcoef(a[inner], b[inner])[0, 1]
    assert corr > 0.95, corr


def test_model_grid_is_lps_identity_at_requested_spacing(lung_crop):
    res = resample_to_model_grid(lung_crop, 2.0)
    assert res.spacing == (2.0, 2.0, 2.0)
    assert np.allclose(res.direction, np.eye(3))
    # extent covers the input's physical box
    lo, hi = lung_crop.corners_lps().min(0), lung_crop.corners_lps().max(0)
    assert np.all(np.asarray(res.origin) <= lo + 1e-6)
    assert np.all(res.index_to_lps(np.array(res.size_xyz) - 1) >= hi - 2.0 - 1e-6)
    assert lung_crop.array.shape == (30, 100, 120)  # input untouched


def test_ct_and_mr_intensity_normalisation():
    ct = np.array([-2000.0, -1024.0, 0.0, 3071.0, 5000.0])
    out = normalize_intensity(ct, "CT")
    assert np.allclose(out, [-50, -50, 1024 / 4095 * 255 - 50, 205, 205], atol=1e-3)
    rng = np.random.default_rng(0)
    mr = rng.gamma(2.0, 100.0, size=100000).astype(np.float32)
    out = normalize_intensity(mr, "MR")
    assert out.min() == pytest.approx(-50) and out.max() == pytest.approx(205)
    lo, hi = np.percentile(mr, [0.2, 99.8])
    assert np.mean(out >= 204.999) == pytest.approx(0.002, abs=0.001)
    assert mr.dtype == np.float32 and mr.max() > hi  # input untouched


@pytest.mark.parametrize("ext", [".nii.gz", ".nrrd", ".mha"])
def test_load_formats_keep_geometry(tmp_path, lung_crop, ext):
    d = np.array(rotation(5, 0, -12)).reshape(3, 3)
    v = Volume(lung_crop.array, (0.8, 0.9, 2.5), (-3.0, 7.0, 11.0), d, Modality.CT)
    path = tmp_path / f"scan{ext}"
    sitk.WriteImage(sitk.Cast(v.to_sitk(), sitk.sitkInt16), str(path))
    before = path.read_bytes()
    back = load_volume(path)
    assert path.read_bytes() == before
    assert back.modality is Modality.CT
    assert np.allclose(back.spacing, v.spacing, atol=1e-5) and np.allclose(back.origin, v.origin, atol=1e-4)
    assert np.allclose(back.direction, v.direction, atol=1e-5)
    assert np.array_equal(back.array, np.round(v.array))


def test_load_dicom_series(shared_data):
    folder = shared_data / "ct" / "totalseg_dicom" / "dicom"
    v = load_volume(folder)
    assert v.modality is Modality.CT
    assert v.array.shape == (20, 512, 512)
    assert v.spacing[2] == pytest.approx(2.0, abs=0.05)
    reader = sitk.ImageSeriesReader()
    ref = sitk.ReadImage(reader.GetGDCMSeriesFileNames(str(folder)))
    assert np.allclose(v.origin, ref.GetOrigin()) and np.allclose(v.direction.ravel(), ref.GetDirection())


def test_mr_sample_with_flipped_direction_loads_as_mr():
    from samv2core.bundled_samples import load_sample

    v = load_sample("brain1_mr")
    assert v.modality is Modality.MR
    assert v.direction[1, 1] == -1.0


@pytest.mark.parametrize("make,message", [
    (lambda t: sitk.Image([8, 8], sitk.sitkFloat32), "3D"),
    (lambda t: sitk.Image([8, 8, 8], sitk.sitkFloat32), "constant"),
    (lambda t: sitk.Image([8, 8, 8], sitk.sitkVectorUInt8, 3), "scalar"),
])
def test_bad_images_are_refused(tmp_path, make, message):
    path = tmp_path / "bad.nrrd"
    sitk.WriteImage(make(tmp_path), str(path))
    with pytest.raises(InputError, match=message):
        load_volume(path)


def test_nan_missing_and_corrupt_files(tmp_path):
    arr = np.random.default_rng(0).normal(size=(6, 7, 8)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    img = sitk.GetImageFromArray(arr)
    sitk.WriteImage(img, str(tmp_path / "nan.nrrd"))
    with pytest.raises(InputError, match="NaN"):
        load_volume(tmp_path / "nan.nrrd")
    with pytest.raises(InputError, match="no such file"):
        load_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "garbage.nii.gz").write_bytes(b"not an image at all")
    with pytest.raises(InputError, match="cannot read"):
        load_volume(tmp_path / "garbage.nii.gz")
    with pytest.raises(InputError, match="modality"):
        load_volume(tmp_path / "nan.nrrd", modality="PET")
