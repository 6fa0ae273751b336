"""Pictures (samv2core.figures) on the bundled real chest CT: radiological orientation for any
direction matrix, match / overview / registration PNGs written atomically and readable."""
from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

pytest.importorskip("matplotlib", reason="pictures need the 'figures' extra (matplotlib)")

from matplotlib.image import imread
from samv2core.figures import (
    MatchPicture,
    fusion_panels,
    registration_figure,
    sample_plane,
    write_match_figures,
)
from samv2core.simulate import simulate_followup
from samv2core.volume import Volume

PLANE_NORMAL = {"axial": (0, 0, 1), "coronal": (0, 1, 0), "sagittal": (1, 0, 0)}


def _reoriented(volume: Volume) -> Volume:
    """The same physical image stored with permuted and flipped index axes (another direction matrix)."""
    img = sitk.PermuteAxes(volume.to_sitk(), [1, 0, 2])
    img = sitk.Flip(img, [True, False, True])  # flipAboutOrigin=False: physical positions are kept
    out = Volume.from_sitk(img, volume.modality, name=volume.name)
    assert not np.allclose(out.direction, volume.direction)
    return out


def test_slices_are_radiological_whatever_the_direction_matrix(lung_crop):
    centre = lung_crop.corners_lps().mean(0)
    # a bright cube on the patient's LEFT (+x in LPS), ANTERIOR (-y) and SUPERIOR (+z) of the centre
    target = centre + np.array([15.0, -12.0, 15.0])
    ijk = np.round(lung_crop.lps_to_index(target)).astype(int)
    arr = lung_crop.array.copy()
    arr[ijk[2] - 1: ijk[2] + 2, ijk[1] - 2: ijk[1] + 3, ijk[0] - 2: ijk[0] + 3] = 3000.0
    marked = lung_crop.with_array(arr)
    for vol in (marked, _reoriented(marked)):
        for plane, normal in PLANE_NORMAL.items():
            # through the marker along the plane's normal, centred on the image centre in-plane
            img = sample_plane(vol, np.where(np.array(normal) != 0, target, centre), plane, 40.0, 1.0)
            rows, cols = np.nonzero(img.pixels > 2000)
            assert rows.size, f"{plane}: marker not on the slice"
            mid = (img.pixels.shape[0] - 1) / 2
            r, c = rows.mean(), cols.mean()
            if plane in ("axial", "coronal"):  # radiological: patient left on the image right
                assert c > mid + 10, f"{plane}: patient left should be on the image right (col {c:.0f})"
            else:
                assert c < mid - 8, f"sagittal: anterior should be on the image left (col {c:.0f})"
            assert r < mid - 8, f"{plane}: anterior (axial) / superior should be at the top (row {r:.0f})"
    # the two storages of one physical image give the same pictures
    for plane in PLANE_NORMAL:
        a = sample_plane(marked, centre, plane, 50.0, 1.0).pixels
        b = sample_plane(_reoriented(marked), centre, plane, 50.0, 1.0).pixels
        assert np.abs(a - b).max() < 1e-3


def test_match_pictures_and_overview_are_written_as_pngs(lung_crop, tmp_path):
    pair = simulate_followup(lung_crop, seed=2, deformation_mm=2.0)
    size = np.array(lung_crop.size_xyz)
    pts = lung_crop.index_to_lps(np.array([[0.5, 0.5, 0.5], [0.3, 0.6, 0.4]]) * (size - 1))
    truth = pair.map_points(pts)
    pics = [MatchPicture("tumour", pts[0], truth[0] + 1.0, 0.91, True, None, truth[0]),
            MatchPicture("odd/label", pts[1], truth[1] + 20.0, 0.42, False, "score below 0.5", truth[1])]
    paths = write_match_figures(tmp_path / "figs", lung_crop, pair.followup, pics)
    assert [p.name for p in paths] == ["01_tumour.png", "02_odd_label.png", "overview.png"]
    for p in paths:
        img = imread(p)
        assert img.ndim == 3 and min(img.shape[:2]) > 300 and img[..., :3].std() > 0.05
    assert sorted(x.name for x in (tmp_path / "figs").iterdir()) == sorted(p.name for p in paths)  # no temp files


def test_registration_overlay_agrees_better_after_registration(lung_crop, tmp_path):
    pair = simulate_followup(lung_crop, seed=5, rotation_deg=6.0, translation_mm=10.0, deformation_mm=0.0,
                             noise=0.0, contrast=0.0)
    fixed, moving = pair.baseline, pair.followup
    # the exact registration of the follow-up onto the baseline is the inverse of the simulated motion
    inverse = pair.transform.GetNthTransform(0).GetInverse()
    registered = Volume.from_sitk(sitk.Resample(moving.to_sitk(), fixed.to_sitk(), inverse, sitk.sitkLinear,
                                                float(moving.array.min()), sitk.sitkFloat32), "CT", name="registered")
    panels = fusion_panels(fixed, moving, registered)
    for plane in ("axial", "coronal", "sagittal"):
        before = np.abs(panels["before", plane][0][..., 0] - panels["before", plane][0][..., 1]).mean()
        after = np.abs(panels["after", plane][0][..., 0] - panels["after", plane][0][..., 1]).mean()
        assert after < 0.6 * before, f"{plane}: fusion disagreement {before:.3f} -> {after:.3f}"
    path = registration_figure(fixed, moving, registered, tmp_path / "overlay.png")
    assert imread(path).shape[1] > 600
