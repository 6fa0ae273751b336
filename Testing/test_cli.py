"""The `samv2` command line on real data: match on a CT pair simulated from a real scan,
points in and out in the stated coordinate system, bad input -> one-line error + non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from samv2core.cli import main
from samv2core.coords import lps_to_ras
from samv2core.markups import read_points, write_markups
from samv2core.model_io import ModelCard, save_model
from samv2core.network import NetConfig, build_network
from samv2core.simulate import simulate_followup


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, lung_crop):
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    net = build_network(NetConfig.lite()).eval()
    cfg = net.config
    save_model(net, ModelCard(name="test-lite-untrained", architecture=cfg.to_dict(), heads=list(cfg.heads),
                              sha256=""), d / "model.safetensors")
    pair = simulate_followup(lung_crop, seed=3, deformation_mm=3.0)
    sitk.WriteImage(sitk.Cast(lung_crop.to_sitk(), sitk.sitkInt16), str(d / "baseline.nrrd"))
    sitk.WriteImage(sitk.Cast(pair.followup.to_sitk(), sitk.sitkInt16), str(d / "followup.nii.gz"))
    size = np.array(lung_crop.size_xyz)
    pts = lung_crop.index_to_lps(np.array([[0.5, 0.5, 0.5], [0.4, 0.6, 0.5]]) * (size - 1))
    return d, pts


def run(argv, capsys):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_match_inline_points_json_in_lps(workdir, capsys):
    d, pts = workdir
    before = (d / "baseline.nrrd").read_bytes()
    args = ["match", "--template", d / "baseline.nrrd", "--query", d / "followup.nii.gz", "--model", d / "model.safetensors",
            "--method", "nn", "--device", "cpu"]
    for p in pts:
        args += ["--point", ",".join(f"{v:.3f}" for v in p)]
    code, out, err = run(args, capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["coordinate_system"] == "LPS" and len(doc["matches"]) == 2
    m = doc["matches"][0]
    assert set(m) >= {"label", "template_point", "query_point", "score", "confident", "reason", "coordinate_system"}
    assert np.allclose(m["template_point"], pts[0], atol=2.5)
    assert all(np.isfinite(m["query_point"])) and -1.0 <= m["score"] <= 1.0
    assert (d / "baseline.nrrd").read_bytes() == before  # inputs never modified


def test_match_figure_writes_a_picture_per_point_and_an_overview(workdir, capsys, tmp_path):
    pytest.importorskip("matplotlib", reason="--figure needs the 'figures' extra (matplotlib)")
    d, pts = workdir
    args = ["match", "--template", d / "baseline.nrrd", "--query", d / "followup.nii.gz", "--model", d / "model.safetensors",
            "--method", "nn", "--device", "cpu", "--figure", tmp_path / "figs"]
    for p in pts:
        args += ["--point", ",".join(f"{v:.3f}" for v in p)]
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert len(json.loads(out)["matches"]) == 2
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["01_P1.png", "02_P2.png", "overview.png"]


def test_match_markups_in_ras_writes_ras_outputs(workdir, capsys, tmp_path):
    d, pts = workdir
    write_markups(tmp_path / "in.mrk.json", pts, ["lesionA", "lesionB"], "RAS")
    assert json.loads((tmp_path / "in.mrk.json").read_text())["markups"][0]["controlPoints"][0]["position"][0] == \
        pytest.approx(-pts[0][0])
    code, out, err = run(["match", "--template", d / "baseline.nrrd", "--query", d / "baseline.nrrd",
                          "--points", tmp_path / "in.mrk.json", "--model", d / "model.safetensors", "--method", "fixed_point",
                          "--out", tmp_path / "res.json", "--out-markups", tmp_path / "out.mrk.json",
                          "--out-csv", tmp_path / "out.csv"], capsys)
    assert code == 0, err
    doc = json.loads((tmp_path / "res.json").read_text())
    assert doc["coordinate_system"] == "RAS"
    assert [m["label"] for m in doc["matches"]] == ["lesionA", "lesionB"]
    # self-match: the answer is the input point, in RAS
    got = np.array([m["query_point"] for m in doc["matches"]])
    assert np.abs(got - lps_to_ras(pts)).max() < 2.5
    back = read_points(tmp_path / "out.mrk.json")
    assert back.source_system == "RAS" and np.abs(back.lps - pts).max() < 2.5
    assert "score" in (tmp_path / "out.csv").read_text().splitlines()[0]


def test_embed_writes_embeddings(workdir, capsys, tmp_path):
    d, _ = workdir
    code, out, err = run(["embed", d / "baseline.nrrd", "--model", d / "model.safetensors", "--out", tmp_path / "e.safetensors"],
                         capsys)
    assert code == 0, err
    from safetensors import safe_open

    with safe_open(str(tmp_path / "e.safetensors"), "pt") as f:
        assert set(f.keys()) >= {"fine", "coarse", "semantic"}
        assert f.metadata()["coordinate_system"] == "LPS"
    assert json.loads(out)["fine_grid_spacing_mm"] == [4.0, 4.0, 4.0]


@pytest.mark.parametrize("case,message", [
    ("missing_image", "no such file"),
    ("outside_point", "outside the template image"),
    ("bad_point", "is not three"),
    ("bad_model", "model card"),
    ("no_gpu", "CUDA"),
    ("no_points", "no points"),
])
def test_bad_input_gives_one_line_error_and_exit_2(workdir, capsys, tmp_path, case, message):
    d, pts = workdir
    if case == "no_gpu" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    base = ["match", "--template", d / "baseline.nrrd", "--query", d / "followup.nii.gz", "--model", d / "model.safetensors",
            "--point", ",".join(map(str, pts[0]))]
    if case == "missing_image":
        base[2] = tmp_path / "nope.nii.gz"
    elif case == "outside_point":
        base[-1] = "9999,9999,9999"
    elif case == "bad_point":
        base[-1] = "1,2"
    elif case == "bad_model":
        (tmp_path / "m.safetensors").write_bytes(b"\x00" * 64)
        base[6] = tmp_path / "m.safetensors"
    elif case == "no_gpu":
        base += ["--device", "cuda"]
    elif case == "no_points":
        base = base[:-2]
    code, out, err = run(base, capsys)
    assert code == 2
    lines = [l for l in err.strip().splitlines() if l.startswith("samv2: error:")]
    assert len(lines) == 1 and message in lines[0], err


def test_convert_checkpoint_cli_fails_loudly_on_garbage(tmp_path, capsys):
    (tmp_path / "x.pth").write_bytes(b"garbage")
    code, _, err = run(["convert-checkpoint", tmp_path / "x.pth", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "samv2: error:" in err
    assert not (tmp_path / "x.safetensors").exists()


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "samv2core.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "match" in out.stdout and "demo" in out.stdout
