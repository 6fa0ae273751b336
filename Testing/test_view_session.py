"""The browser view's computing side (samv2view.session) without a browser, on a real chest CT
crop and a follow-up SIMULATED from it; the view package beside the core keeps trame/Slicer out
of the core's import graph and the core never imports it; `samv2 view` refuses bad options with a
one-line error."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
from samv2core.cli import main
from samv2core.errors import InputError
from samv2core.session import EmbeddingSession
from samv2core.simulate import simulate_followup
from samv2view.files import AllowedFiles
from samv2view.session import ViewSession


def test_session_matches_on_a_simulated_followup_and_names_bad_input(lung_crop, tmp_path):
    pair = simulate_followup(lung_crop, seed=1, deformation_mm=3.0)
    (tmp_path / "scans").mkdir()
    sitk.WriteImage(lung_crop.to_sitk(), str(tmp_path / "baseline.nrrd"))
    sitk.WriteImage(pair.followup.to_sitk(), str(tmp_path / "followup.nrrd"))
    files = AllowedFiles.from_command_line([str(tmp_path / "baseline.nrrd")], [str(tmp_path / "scans")])
    session = ViewSession(EmbeddingSession.open(device="cpu"), files=files)
    centre = lung_crop.corners_lps().mean(0)
    with pytest.raises(InputError, match="open a baseline and a follow-up"):
        session.match(centre)
    with pytest.raises(InputError, match="no such scan among the ones this view may open"):
        session.open(tmp_path / "baseline.nrrd", tmp_path / "scans" / "missing.nii.gz")
    with pytest.raises(InputError, match="no such scan among the ones this view may open"):
        session.open(tmp_path / "baseline.nrrd", tmp_path / "followup.nrrd")  # exists, not allowed
    assert session.template is None  # nothing changes unless both scans could be read
    (tmp_path / "followup.nrrd").rename(tmp_path / "scans" / "followup.nrrd")
    session.open(tmp_path / "baseline.nrrd", "  followup.nrrd  ")  # a pasted name in --data-dir, spaces around
    steps = []
    result = session.match(centre, progress=lambda f, m: steps.append(f))
    truth = pair.map_points(centre[None])[0]
    assert np.linalg.norm(np.asarray(result.query_point.to("LPS").xyz) - truth) < 5.0
    assert steps and steps[-1] == 1.0 and all(0.0 <= f <= 1.0 for f in steps)
    with pytest.raises(InputError, match="outside the baseline"):
        session.match(centre + [0.0, 0.0, 500.0])


def test_view_package_keeps_trame_and_slicer_out_of_the_core_import_graph():
    code = ("import sys, samv2core.cli; core = 'samv2view' in sys.modules; "
            "import samv2view, samv2view.session, samv2view.cli; "
            "print(core, [m for m in ('trame', 'trame_slicer', 'slicer', 'vtk', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False []"


def test_the_core_command_line_lists_view_and_hands_it_over():
    out = subprocess.run([sys.executable, "-m", "samv2core.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "view" in out.stdout and "samv2view" in out.stdout
    out = subprocess.run([sys.executable, "-m", "samv2core.cli", "view", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("usage: samv2 view") and "--template" in out.stdout


@pytest.mark.parametrize("args, named", [
    (["--port", "70000"], "--port"),
    (["--data-dir", "/no/such/folder"], "--data-dir /no/such/folder: no such folder"),
    (["--token", "short"], "--token must be"),
    (["--host", "0.0.0.0", "--token", "a" * 20, "--insecure-no-token"], "contradict"),
])
def test_view_refuses_bad_options_with_one_line(capsys, args, named):
    pytest.importorskip("trame_slicer", reason="the 'view' extra is checked first")
    assert main(["view", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and err[0].startswith("samv2 view: error:")


def test_session_propagates_a_lesion_ball_onto_a_simulated_followup(lung_crop, tmp_path):
    pair = simulate_followup(lung_crop, seed=2, deformation_mm=3.0)
    sitk.WriteImage(lung_crop.to_sitk(), str(tmp_path / "baseline.nrrd"))
    sitk.WriteImage(pair.followup.to_sitk(), str(tmp_path / "followup.nrrd"))
    files = AllowedFiles.from_command_line([], [str(tmp_path)])
    session = ViewSession(EmbeddingSession.open(device="cpu"), files=files)
    session.open("baseline.nrrd", "followup.nrrd")
    centre = lung_crop.corners_lps().mean(0)
    lesion, label_map = session.propagate(centre, 8.0)
    truth = pair.map_points(centre[None])[0]
    assert np.linalg.norm(lesion.centre.query_point.to("LPS").as_array() - truth) < 5.0
    assert label_map.array.shape == pair.followup.array.shape
    assert np.allclose(label_map.origin, pair.followup.origin) and np.allclose(label_map.spacing, pair.followup.spacing)
    ball_ml = 4.0 / 3.0 * np.pi * 8.0 ** 3 / 1000.0
    inside_ml = float((label_map.array > 0.5).sum()) * float(np.prod(label_map.spacing)) / 1000.0
    assert abs(inside_ml - ball_ml) < 0.25 * ball_ml and abs(lesion.followup_volume_ml - inside_ml) < 1e-6
    marked = pair.followup.index_to_lps(np.argwhere(label_map.array > 0.5)[:, ::-1]).mean(0)
    assert np.linalg.norm(marked - lesion.centre.query_point.to("LPS").as_array()) < 1.5  # the ball is where it matched
    with pytest.raises(InputError, match="radius"):
        session.propagate(centre, -1.0)
    with pytest.raises(InputError, match="outside the baseline"):
        session.propagate(centre + [0.0, 0.0, 500.0], 8.0)
