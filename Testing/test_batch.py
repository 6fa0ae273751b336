"""The headless batch script (SAMv2Slicer/Scripts/samv2_batch.py) under plain Python + slicer-core.

Cases are crops of the bundled PyPI-origin lung CT with simulated follow-ups; the model is
the untrained lite network saved as a regular model file: the test checks the files the
script writes and its exit codes, not matching accuracy.
"""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip("not available: this 'slicer' package has no MRML (install slicer-core)", allow_module_level=True)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "SAMv2Slicer" / "Scripts" / "samv2_batch.py"
sys.path.insert(0, str(REPO / "SAMv2Slicer"))

from samv2core.coords import lps_to_ras  # noqa: E402
from samv2core.volume import Volume  # noqa: E402


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """Volumes, point files, a model file and case CSVs in a temporary folder."""
    import torch

    from samv2core.model_io import ModelCard, save_model
    from samv2core.network import NetConfig, build_network
    from samv2core.bundled_samples import load_sample
    from samv2core.simulate import simulate_followup
    from SAMv2SlicerLib import nodes

    root = tmp_path_factory.mktemp("batch")
    ct = load_sample("lung1_ct")
    k0, j0, i0 = 16, 40, 40  # 64 x 64 x 16 voxels = 128 x 128 x 80 mm of the chest
    crop = Volume(ct.array[k0:k0 + 16, j0:j0 + 64, i0:i0 + 64], ct.spacing, tuple(ct.index_to_lps([i0, j0, k0])),
                  ct.direction, "CT", "lung1_crop")
    sitk.WriteImage(crop.to_sitk(), str(root / "baseline.nrrd"), True)
    for seed in (1, 2):
        sitk.WriteImage(simulate_followup(crop, seed=seed).followup.to_sitk(), str(root / f"followup{seed}.nrrd"), True)
    centre = crop.index_to_lps((np.asarray(crop.size_xyz) - 1) / 2)
    lesions = np.array([centre, centre + [12.0, -8.0, 10.0]])
    scene = slicer.vtkMRMLScene()
    nodes.write_point_list(nodes.new_point_list(scene, "lesions", lps_to_ras(lesions), ["nodule", "vessel"]),
                           str(root / "points.mrk.json"))
    with open(root / "points.csv", "w", newline="") as f:  # samv2core's CSV format, here in RAS
        w = csv.writer(f)
        w.writerow(["x", "y", "z", "label"])
        for label, p in zip(("A1", "A2", "A3"), lps_to_ras(np.vstack([lesions, centre - [10.0, 10.0, 0.0]]))):
            w.writerow([*p, label])
    with open(root / "outside.csv", "w", newline="") as f:
        f.write("x,y,z,label\n9000,0,0,far\n")
    torch.manual_seed(0)
    model = save_model(build_network(NetConfig.lite()),
                       ModelCard(name="lite-untrained-test", architecture={}, heads=[]), root / "lite.safetensors")
    rows = [("json_case", "baseline.nrrd", "followup1.nrrd", "points.mrk.json"),
            ("csv_case", "baseline.nrrd", "followup2.nrrd", "points.csv")]
    for name, extra in (("good.csv", []), ("mixed.csv", [("bad_case", "baseline.nrrd", "followup1.nrrd", "outside.csv")])):
        with open(root / name, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["case", "baseline", "followup", "points"])
            w.writerows(rows + extra)
    (root / "broken.csv").write_text("baseline,points\nbaseline.nrrd,points.csv\n")
    return {"root": root, "model": model}


def run_batch(ws, cases: str, out: str, *extra):
    cmd = [sys.executable, str(SCRIPT), str(ws["root"] / cases), "--output", str(ws["root"] / out),
           "--model", str(ws["model"]), "--device", "cpu", "--method", "nn", "--threads", "2",
           "--points-system", "RAS", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


def test_batch_writes_points_csv_and_summary_and_reports_failures(workspace):
    ws = workspace
    proc = run_batch(ws, "mixed.csv", "out_mixed")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # one case failed -> non-zero exit
    out = ws["root"] / "out_mixed"
    summary = {r["case"]: r for r in csv.DictReader(open(out / "summary.csv"))}
    assert summary["json_case"]["status"] == "ok" and summary["csv_case"]["status"] == "ok"
    assert summary["bad_case"]["status"] == "failed" and "outside the baseline" in summary["bad_case"]["message"]
    assert not (out / "bad_case" / "matched.mrk.json").exists()
    assert "[FAILED] bad_case" in proc.stderr

    # .mrk.json: a Slicer point list on the follow-up named after the source points
    doc = json.loads((out / "json_case" / "matched.mrk.json").read_text())
    cps = doc["markups"][0]["controlPoints"]
    assert doc["markups"][0]["coordinateSystem"] == "LPS"
    assert [cp["label"].removesuffix(" (?)") for cp in cps] == ["nodule", "vessel"]
    rows = list(csv.DictReader(open(out / "json_case" / "matched.csv")))
    assert [r["label"] for r in rows] == ["nodule", "vessel"]
    for cp, row in zip(cps, rows):
        np.testing.assert_allclose(cp["position"], [float(row[k]) for k in ("matched_L", "matched_P", "matched_S")],
                                   atol=1e-3)
        assert cp["label"].endswith(" (?)") == (row["confident"] == "0")
        assert f"score {float(row['score']):.2f}" in cp["description"]
        assert cp["locked"] is False  # flagged matches stay movable (issue 20, defect 10)
    # CSV points given in RAS come back in LPS with the same labels
    rows = list(csv.DictReader(open(out / "csv_case" / "matched.csv")))
    assert [r["label"] for r in rows] == ["A1", "A2", "A3"]
    src = np.array([[float(r[k]) for k in ("source_L", "source_P", "source_S")] for r in rows])
    ras_in = np.array([[float(v) for v in r[:3]] for r in list(csv.reader(open(ws["root"] / "points.csv")))[1:]])
    np.testing.assert_allclose(src, ras_in * [-1, -1, 1], atol=1e-3)


def test_batch_exit_codes_for_good_and_unusable_input(workspace):
    ws = workspace
    proc = run_batch(ws, "broken.csv", "out_broken")
    assert proc.returncode == 2 and "missing column" in proc.stderr
    proc = run_batch(ws, "missing.csv", "out_missing")
    assert proc.returncode == 2
    bad_model = ws["root"] / "nope.safetensors"
    cmd = [sys.executable, str(SCRIPT), str(ws["root"] / "good.csv"), "-o", str(ws["root"] / "out_nomodel"),
           "--model", str(bad_model), "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "not found" in proc.stderr


def test_batch_registration_writes_itk_transforms(workspace):
    reg = pytest.importorskip("samv2core.registration")
    if not hasattr(reg, "register"):
        pytest.skip("not available: samv2core.registration.register is not implemented yet")
    ws = workspace
    proc = run_batch(ws, "good.csv", "out_reg", "--register", "rigid")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = ws["root"] / "out_reg"
    for case in ("json_case", "csv_case"):
        t = sitk.ReadTransform(str(out / case / "registration_linear.h5"))
        # a rigid transform: orthonormal linear part
        a = np.array([np.asarray(t.TransformPoint(tuple(e))) - np.asarray(t.TransformPoint((0, 0, 0)))
                      for e in np.eye(3)])
        np.testing.assert_allclose(a @ a.T, np.eye(3), atol=1e-4)
        assert (out / case / "matched.mrk.json").is_file()
        # the core's files agree with the transform written from the Slicer node
        composite = sitk.ReadTransform(str(out / case / "registration" / "composite.h5"))
        p = np.array([[0.0, -200.0, -700.0], [30.0, -180.0, -690.0]])
        np.testing.assert_allclose([composite.TransformPoint(tuple(q)) for q in p],
                                   [t.TransformPoint(tuple(q)) for q in p], atol=1e-4)
        report = json.loads((out / case / "registration" / "report.json").read_text())
        assert report


def test_batch_modality_is_honoured_end_to_end(workspace):
    """Issue 20, defect 2: --modality reaches matching (it used to be dropped and guessed again):
    on a CT, MR preprocessing gives other embeddings and so other scores; auto and CT agree."""
    ws = workspace
    (ws["root"] / "one.csv").write_text("case,baseline,followup,points\none,baseline.nrrd,followup1.nrrd,points.mrk.json\n")
    scores = {}
    for modality in ("auto", "CT", "MR"):
        proc = run_batch(ws, "one.csv", f"out_modality_{modality}", "--modality", modality)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = list(csv.DictReader(open(ws["root"] / f"out_modality_{modality}" / "one" / "matched.csv")))
        scores[modality] = [float(r["score"]) for r in rows]
    assert scores["auto"] == scores["CT"]
    assert scores["MR"] != scores["CT"]


def test_batch_loads_the_model_once(workspace, monkeypatch):
    """Issue 20, defect 9: the model checked before the first case is the one the cases use."""
    import importlib.util

    import samv2core.models
    import samv2core.session

    calls = []
    original = samv2core.models.resolve_model

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(samv2core.models, "resolve_model", counting)
    monkeypatch.setattr(samv2core.session, "resolve_model", counting)
    spec = importlib.util.spec_from_file_location("samv2_batch_under_test", SCRIPT)
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    ws = workspace
    (ws["root"] / "one.csv").write_text("case,baseline,followup,points\none,baseline.nrrd,followup1.nrrd,points.mrk.json\n")
    code = batch.main([str(ws["root"] / "one.csv"), "--output", str(ws["root"] / "out_once"), "--model",
                       str(ws["model"]), "--device", "cpu", "--method", "nn"])
    assert code == 0 and len(calls) == 1


def test_batch_missing_package_message_fits_where_it_runs(monkeypatch):
    """Issue 20, defect 9: inside Slicer, torch comes from the PyTorch extension, not from pip."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("samv2_batch_hint", SCRIPT)
    batch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(batch)
    missing = ModuleNotFoundError("No module named 'torch'", name="torch")
    monkeypatch.setattr(batch, "_in_slicer", lambda: True)
    assert "PyTorch extension" in batch._install_hint(missing) and "pip" not in batch._install_hint(missing)
    monkeypatch.setattr(batch, "_in_slicer", lambda: False)
    assert "pip install torch" in batch._install_hint(missing)
