"""The bad-input catalogue (issue 13): every case is refused cleanly.

For each case: the exit code (or exception type), ONE line on stderr naming the problem, no
traceback, every file of the workspace (inputs) byte-identical afterwards (SHA-256), and no
output or temporary file left behind. Surfaces: the ``samv2`` CLI (in-process ``main(argv)``),
the Python API, the Slicer batch script (in-process ``main``; a subprocess only where the
process boundary matters) and ``samv2-train``.

Data: a 64 x 64 x 16 crop of the bundled pyradiomics lung CT (PyPI origin), a simulated
follow-up of it, and broken variants made from it; where a model must run, the untrained lite
network saved as a model file (this checks refusals, not accuracy).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from samv2core.errors import CheckpointError, DeviceError, InputError, SAMv2Error

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "SAMv2Slicer" / "Scripts" / "samv2_batch.py"
SAMPLE = REPO / "SAMv2Core" / "samv2core" / "data" / "lung1_ct.nrrd"


# --- workspace ----------------------------------------------------------------------------------
def _write(img: sitk.Image, path: Path, compress: bool = True) -> None:
    sitk.WriteImage(img, str(path), compress)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    import torch

    from samv2core.markups import write_markups
    from samv2core.model_io import ModelCard, save_model
    from samv2core.network import NetConfig, build_network
    from samv2core.bundled_samples import load_sample
    from samv2core.simulate import simulate_followup
    from samv2core.volume import Volume

    root = tmp_path_factory.mktemp("bad_input")
    ct = load_sample("lung1_ct")
    k0, j0, i0 = 16, 40, 40
    crop = Volume(ct.array[k0:k0 + 16, j0:j0 + 64, i0:i0 + 64], ct.spacing, tuple(ct.index_to_lps([i0, j0, k0])),
                  ct.direction, "CT", "crop")
    img = crop.to_sitk()
    _write(img, root / "v.nrrd")
    _write(img, root / "v.nii.gz")
    _write(img, root / "v.nii", False)
    _write(img, root / "v.mha", False)
    _write(simulate_followup(crop, seed=1).followup.to_sitk(), root / "q.nrrd")
    for name in ("v.nii.gz", "v.nii", "v.nrrd", "v.mha"):  # cut in half while "copying"
        data = (root / name).read_bytes()
        (root / f"cut_{name}").write_bytes(data[: len(data) // 2])
    (root / "notgzip.nii.gz").write_bytes(b"this is not a gzip stream at all" * 10)
    (root / "empty.nrrd").write_bytes(b"")
    text = (root / "v.nrrd").read_bytes()
    (root / "zero_spacing.nrrd").write_bytes(text.replace(b"space directions: (", b"space directions: (0,0,0) (", 1)
                                              .replace(b"(0,0,0) (" + text.split(b"space directions: (")[1].split(b")")[0]
                                                       + b") ", b"(0,0,0) ", 1))
    sheared = sitk.Image(img)
    sheared.SetDirection((1, 0.5, 0, 0, 1, 0, 0, 0, 1))  # determinant 1, not orthonormal
    _write(sheared, root / "sheared.mha", False)
    _write(sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(40, 50)).astype(np.float32)), root / "2d.nrrd")
    frames = [sitk.GetImageFromArray(np.random.default_rng(n).normal(size=(8, 20, 20)).astype(np.float32))
              for n in range(3)]
    _write(sitk.JoinSeries(frames), root / "4d.nrrd")
    _write(sitk.GetImageFromArray(np.random.default_rng(0).integers(0, 255, (8, 20, 20, 3)).astype(np.uint8),
                                  isVector=True), root / "rgb.nrrd")
    nan = crop.array.copy()
    nan[3, 4, 5] = np.nan
    _write(crop.with_array(nan).to_sitk(), root / "nan.nrrd")
    _write(crop.with_array(np.full_like(crop.array, -1000)).to_sitk(), root / "constant.nrrd")
    big = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(20, 20, 20)).astype(np.float32) * 100)
    big.SetSpacing((100.0, 100.0, 100.0))
    _write(big, root / "spacing100.nrrd")
    (root / "nodicom").mkdir()
    (root / "nodicom" / "readme.txt").write_text("no DICOM here")

    centre = crop.index_to_lps((np.asarray(crop.size_xyz) - 1) / 2)
    (root / "points.csv").write_text("x,y,z,label\n%f,%f,%f,A\n" % tuple(centre))
    write_markups(root / "points.mrk.json", centre[None], ["A"], "RAS")
    (root / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (root / "text.csv").write_text("x,y,z\none,two,three\n")
    (root / "nanpts.csv").write_text("x,y,z\nnan,1,2\n")
    (root / "empty.csv").write_text("")
    (root / "garbage.mrk.json").write_text("{not json")
    (root / "nopoints.mrk.json").write_text(json.dumps({"markups": [{"controlPoints": []}]}))
    (root / "badshape.mrk.json").write_text(json.dumps({"markups": 5}))
    torch.manual_seed(0)
    save_model(build_network(NetConfig.lite()), ModelCard(name="lite-untrained-test", architecture={}, heads=[]),
               root / "lite.safetensors")
    (root / "garbage.safetensors").write_bytes(b"\x00" * 64)
    (root / "garbage.json").write_text("{}")
    (root / "weights.pth").write_bytes(b"\x80\x04\x95 pickle bytes")
    (root / "afile").write_text("a file, not a folder")
    os.symlink(root / "v.nrrd", root / "link_to_v.nrrd")
    os.link(root / "v.nrrd", root / "hard_v.nrrd")
    (root / "regdir").mkdir()
    _write(img, root / "regdir" / "moving_resampled.nii.gz")  # the moving image, named like an output
    (root / "bad.yaml").write_text("run: [unclosed\n")
    cases = root / "cohort"
    cases.mkdir()
    (cases / "nocol.csv").write_text("baseline,points\n../v.nrrd,../points.csv\n")
    (cases / "binary.csv").write_bytes(bytes(range(256)) * 4)
    (cases / "dupes.csv").write_text("case,baseline,followup,points\na/b,../v.nrrd,../q.nrrd,../points.csv\n"
                                     "a_b,../v.nrrd,../q.nrrd,../points.csv\n")
    (cases / "good.csv").write_text("case,baseline,followup,points\none,../v.nrrd,../q.nrrd,../points.csv\n")
    (cases / "empty.csv").write_text("case,baseline,followup,points\n")
    (cases / "bare.csv").write_text("case,baseline,followup,points,lesion\none,../v.nrrd,../q.nrrd,,\n")
    (cases / "one").mkdir()
    _write(img, cases / "one" / "v.nrrd")  # an input inside the folder case "one" would replace
    (cases / "inside.csv").write_text("case,baseline,followup,points\none,one/v.nrrd,../q.nrrd,../points.csv\n")
    lesion = np.zeros(crop.array.shape, np.float32)
    lesion[6:10, 28:36, 28:36] = 2
    _write(sitk.Cast(crop.with_array(lesion).to_sitk(), sitk.sitkUInt8), root / "lesion.nrrd")
    lesion[6:8, 28:30, 28:30] = 5
    _write(sitk.Cast(crop.with_array(lesion).to_sitk(), sitk.sitkUInt8), root / "lesions.nrrd")
    return {"root": root, "centre": centre, "crop": crop}


def _snapshot(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
        elif p.is_dir() or p.is_symlink():
            out[str(p.relative_to(root))] = "dir" if p.is_dir() and not p.is_symlink() else "link"
    return out


def _check_clean(ws, before: dict, err: str, needle: str, errors_only: bool = False) -> None:
    """One line on stderr (``errors_only``: one error line; progress/warning lines allowed)."""
    lines = [line for line in err.splitlines() if line.strip() and (not errors_only or "error" in line)]
    assert len(lines) == 1, f"expected one line on stderr, got: {err!r}"
    assert "Traceback" not in err and ".cxx" not in err and ".hxx" not in err
    assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    after = _snapshot(ws["root"])
    assert after == before, f"workspace changed: {set(after.items()) ^ set(before.items())}"


def _abs(ws, args: list) -> list:
    """'@name' -> an absolute path in the workspace."""
    return [str(ws["root"] / a[1:]) if isinstance(a, str) and a.startswith("@") else a for a in args]


# --- samv2 CLI, in-process ----------------------------------------------------------------------
LITE = ["--model", "@lite.safetensors", "--device", "cpu", "--precision", "fp32"]
MATCH = ["match", "--template", "@v.nrrd", "--query", "@q.nrrd", "--method", "nn", *LITE]
PROPAGATE = ["propagate", "--baseline", "@v.nrrd", "--followup", "@q.nrrd", "--method", "nn", *LITE]

CLI_CASES = [
    # embed: unreadable / incomplete / impossible images
    ("embed-missing", ["embed", "@nope.nii.gz"], "no such file"),
    ("embed-cut-nii-gz", ["embed", "@cut_v.nii.gz"], "incomplete"),
    ("embed-cut-nii", ["embed", "@cut_v.nii"], "incomplete"),
    ("embed-cut-nrrd-gzip", ["embed", "@cut_v.nrrd"], "incomplete"),
    ("embed-cut-mha", ["embed", "@cut_v.mha"], "incomplete"),
    ("embed-not-gzip", ["embed", "@notgzip.nii.gz"], "not a gzip"),
    ("embed-empty-file", ["embed", "@empty.nrrd"], "cannot read"),
    ("embed-zero-spacing", ["embed", "@zero_spacing.nrrd"], "Zero-valued spacing"),
    ("embed-sheared", ["embed", "@sheared.mha"], "not orthonormal"),
    ("embed-2d", ["embed", "@2d.nrrd"], "3D"),
    ("embed-4d", ["embed", "@4d.nrrd"], "3D"),
    ("embed-rgb", ["embed", "@rgb.nrrd"], "scalar"),
    ("embed-nan", ["embed", "@nan.nrrd"], "NaN"),
    ("embed-constant", ["embed", "@constant.nrrd"], "constant"),
    ("embed-spacing-100mm", ["embed", "@spacing100.nrrd", *LITE], "too large"),
    ("embed-no-dicom", ["embed", "@nodicom"], "no DICOM series"),
    ("embed-bad-modality", ["embed", "@v.nrrd", "--modality", "PET"], "unknown modality"),
    # embed: outputs that would overwrite an input or cannot be written
    ("embed-out-is-input", ["embed", "@v.nrrd", "--out", "@v.nrrd"], "overwrite the input"),
    ("embed-out-symlink", ["embed", "@v.nrrd", "--out", "@link_to_v.nrrd"], "overwrite the input"),
    ("embed-out-hardlink", ["embed", "@v.nrrd", "--out", "@hard_v.nrrd"], "overwrite the input"),
    ("embed-out-is-model", ["embed", "@v.nrrd", *LITE, "--out", "@lite.safetensors"], "overwrite the input"),
    ("embed-out-folder", ["embed", "@v.nrrd", "--out", "@nodicom"], "is a folder"),
    ("embed-out-under-file", ["embed", "@v.nrrd", "--out", "@afile/e.safetensors"], "is a file"),
    ("embed-out-kernel-fs", ["embed", "@v.nrrd", *LITE, "--out", "/proc/samv2-no/e.safetensors"], "/proc"),
    # models and devices
    ("embed-model-missing", ["embed", "@v.nrrd", "--model", "@nope.safetensors"], "not found"),
    ("embed-model-garbage", ["embed", "@v.nrrd", "--model", "@garbage.safetensors"], "garbage"),
    ("embed-model-pickle", ["embed", "@v.nrrd", "--model", "@weights.pth"], "convert-checkpoint"),
    ("embed-cuda-missing", ["embed", "@v.nrrd", "--model", "@lite.safetensors", "--device", "cuda"], "cuda"),
    ("embed-bad-precision", ["embed", "@v.nrrd", "--precision", "fp8"], "invalid choice"),
    ("no-command", [], "required"),
    # match: outputs
    ("match-out-is-template", [*MATCH, "--point", "0,0,0", "--out", "@v.nrrd"], "overwrite the input"),
    ("match-markups-is-points", [*MATCH, "--points", "@points.mrk.json", "--out-markups", "@points.mrk.json"],
     "overwrite the input"),
    ("match-csv-is-points", [*MATCH, "--points", "@points.csv", "--out-csv", "@points.csv"], "overwrite the input"),
    ("match-two-outputs-one-file", [*MATCH, "--points", "@points.csv", "--out", "@o.json", "--out-csv", "@o.json"],
     "same file"),
    ("match-csv-unwritable", [*MATCH, "--points", "@points.csv", "--out", "@o.json", "--out-csv", "@afile/o.csv"],
     "is a file"),
    # match: points
    ("match-no-points", MATCH, "no points given"),
    ("match-binary-csv", [*MATCH, "--points", "@binary.csv"], "not a text CSV"),
    ("match-text-csv", [*MATCH, "--points", "@text.csv"], "not x,y,z numbers"),
    ("match-nan-csv", [*MATCH, "--points", "@nanpts.csv"], "NaN"),
    ("match-empty-csv", [*MATCH, "--points", "@empty.csv"], "no points"),
    ("match-garbage-mrk", [*MATCH, "--points", "@garbage.mrk.json"], "not a Slicer markups"),
    ("match-no-control-points", [*MATCH, "--points", "@nopoints.mrk.json"], "no control points"),
    ("match-markups-not-list", [*MATCH, "--points", "@badshape.mrk.json"], "not a valid"),
    ("match-points-missing", [*MATCH, "--points", "@nope.csv"], "not found"),
    ("match-point-two-numbers", [*MATCH, "--point", "1,2"], "1,2"),
    ("match-point-words", [*MATCH, "--point", "a,b,c"], "a,b,c"),
    ("match-point-far-outside", [*MATCH, "--point", "9000,0,0"], "outside the template"),
    ("match-bad-coords", [*MATCH, "--point", "1,2,3", "--coords", "XYZ"], "invalid choice"),
    ("match-bad-method", ["match", "--template", "@v.nrrd", "--query", "@q.nrrd", "--method", "magic",
                          "--point", "1,2,3"], "invalid choice"),
    ("match-template-cut", ["match", "--template", "@cut_v.nii.gz", "--query", "@q.nrrd", "--point", "0,0,0", *LITE],
     "incomplete"),
    ("match-query-2d", ["match", "--template", "@v.nrrd", "--query", "@2d.nrrd", "--point", "0,0,0", *LITE], "3D"),
    # propagate: the lesion and the outputs are checked before the model runs
    ("propagate-no-lesion", [*PROPAGATE, "--out-seg", "@o.seg.nrrd"], "give the lesion"),
    ("propagate-point-and-label", [*PROPAGATE, "--point", "0,0,0", "--coords", "LPS", "--label", "@lesion.nrrd",
                                   "--out-seg", "@o.seg.nrrd"], "not --point and --label"),
    ("propagate-point-no-coords", [*PROPAGATE, "--point", "0,0,0", "--radius-mm", "5", "--out-seg", "@o.seg.nrrd"],
     "--coords"),
    ("propagate-point-no-radius", [*PROPAGATE, "--points", "@points.csv", "--out-seg", "@o.seg.nrrd"], "--radius-mm"),
    ("propagate-negative-radius", [*PROPAGATE, "--points", "@points.csv", "--radius-mm", "-4",
                                   "--out-seg", "@o.seg.nrrd"], "positive"),
    ("propagate-radius-with-label", [*PROPAGATE, "--label", "@lesion.nrrd", "--radius-mm", "4",
                                     "--out-seg", "@o.seg.nrrd"], "own shape"),
    ("propagate-nothing-to-write", [*PROPAGATE, "--label", "@lesion.nrrd", "--out", "@o.json"], "nothing to write"),
    ("propagate-seg-not-seg-nrrd", [*PROPAGATE, "--label", "@lesion.nrrd", "--out-seg", "@o.nii.gz"], ".seg.nrrd"),
    ("propagate-out-is-label", [*PROPAGATE, "--label", "@lesion.nrrd", "--out-label", "@lesion.nrrd"],
     "overwrite the input"),
    ("propagate-label-value-absent", [*PROPAGATE, "--label", "@lesion.nrrd", "--label-value", "7",
                                      "--out-seg", "@o.seg.nrrd"], "no voxel has label value 7"),
    ("propagate-several-labels", [*PROPAGATE, "--label", "@lesions.nrrd", "--out-seg", "@o.seg.nrrd"],
     "--label-value"),
    ("propagate-label-is-ct", [*PROPAGATE, "--label", "@v.nrrd", "--out-seg", "@o.seg.nrrd"], "--label-value"),
    ("propagate-label-empty", [*PROPAGATE, "--label", "@constant.nrrd", "--out-seg", "@o.seg.nrrd"], "constant"),
    ("propagate-label-cut", [*PROPAGATE, "--label", "@cut_v.nrrd", "--out-seg", "@o.seg.nrrd"], "incomplete"),
    ("propagate-point-outside", [*PROPAGATE, "--point", "9000,0,0", "--coords", "LPS", "--radius-mm", "5",
                                 "--out-seg", "@o.seg.nrrd"], "outside"),
    # register: output folder checked before the registration runs
    ("register-out-is-file", ["register", "--fixed", "@v.nrrd", "--moving", "@q.nrrd", "--out", "@afile"],
     "is a file"),
    ("register-out-holds-moving", ["register", "--fixed", "@v.nrrd", "--moving", "@regdir/moving_resampled.nii.gz",
                                   "--out", "@regdir"], "overwrite the input"),
    ("register-fixed-missing", ["register", "--fixed", "@nope.nrrd", "--moving", "@q.nrrd", "--out", "@reg_out"],
     "no such file"),
    ("register-moving-cut", ["register", "--fixed", "@v.nrrd", "--moving", "@cut_v.nii", "--out", "@reg_out"],
     "incomplete"),
    ("register-bad-mode", ["register", "--fixed", "@v.nrrd", "--moving", "@q.nrrd", "--mode", "elastic",
                           "--out", "@reg_out"], "invalid choice"),
    # convert-checkpoint
    ("convert-src-missing", ["convert-checkpoint", "@nope.pth", "@out.safetensors"], "nope.pth"),
    ("convert-bad-variant", ["convert-checkpoint", "@weights.pth", "@out.safetensors", "--variant", "sam3"],
     "variant"),
    ("convert-dst-is-src", ["convert-checkpoint", "@weights.pth", "@weights.pth"], "overwrite the input"),
    ("demo-out-is-file", ["demo", "--out", "@afile"], "is a file"),
    # batch (core runner)
    ("batch-bad-shard", ["batch", "@cohort/good.csv", "-o", "@cohort_out", "--shard", "4/2", *LITE], "--shard"),
    ("batch-bad-workers", ["batch", "@cohort/good.csv", "-o", "@cohort_out", "--workers", "-1", *LITE], "--workers"),
    ("batch-missing-column", ["batch", "@cohort/nocol.csv", "-o", "@cohort_out", *LITE], "missing column"),
    ("batch-binary-csv", ["batch", "@cohort/binary.csv", "-o", "@cohort_out", *LITE], "not a text CSV"),
    ("batch-duplicate-names", ["batch", "@cohort/dupes.csv", "-o", "@cohort_out", *LITE], "used by row"),
    ("batch-no-cases", ["batch", "@cohort/empty.csv", "-o", "@cohort_out", *LITE], "no cases"),
    ("batch-bad-model", ["batch", "@cohort/good.csv", "-o", "@cohort_out", "--model", "@garbage.safetensors"],
     "garbage"),
    ("batch-input-in-case-folder", ["batch", "@cohort/inside.csv", "-o", "@cohort", *LITE], "lies in the output"),
    ("batch-output-is-file", ["batch", "@cohort/good.csv", "-o", "@afile", *LITE], "is a file"),
    ("batch-case-without-points-or-lesion", ["batch", "@cohort/bare.csv", "-o", "@cohort_out", *LITE],
     "neither points nor a lesion"),
    ("batch-bad-lesion-radius", ["batch", "@cohort/good.csv", "-o", "@cohort_out", "--lesion-radius-mm", "0", *LITE],
     "--lesion-radius-mm"),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in CLI_CASES], ids=[c[0] for c in CLI_CASES])
def test_cli_refuses_cleanly(ws, capsys, args, needle):
    from samv2core.cli import main

    before = _snapshot(ws["root"])
    capsys.readouterr()
    try:
        code = main(_abs(ws, args))
    except SystemExit as exc:  # argparse usage errors
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    _check_clean(ws, before, err, needle)


def test_point_outside_but_inside_as_ras_gets_a_hint(ws, capsys):
    from samv2core.cli import main

    ras = ws["centre"] * [-1, -1, 1]  # the centre written as RAS, given as LPS
    before = _snapshot(ws["root"])
    code = main(_abs(ws, [*MATCH, f"--point={ras[0]},{ras[1]},{ras[2]}"]))
    err = capsys.readouterr().err
    assert code == 2
    _check_clean(ws, before, err, "read as RAS it would be inside")


def test_ctrl_c_during_start_up_is_one_line(ws, capsys, monkeypatch):
    from samv2core import cli

    def interrupted(_parser):  # as if Ctrl-C arrived while the sub-commands are being set up
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "add_register_arguments", interrupted)
    before = _snapshot(ws["root"])
    assert cli.main(_abs(ws, ["embed", "@v.nrrd"])) == 130
    _check_clean(ws, before, capsys.readouterr().err, "interrupted")


def test_ctrl_c_while_the_command_line_imports_is_one_line(ws, capsys, monkeypatch):
    """The console script's entry (samv2core.launch) imports the heavy command line itself, so
    a Ctrl-C during those seconds of start-up is one line and exit code 130, not a traceback."""
    from samv2core.launch import samv2

    class InterruptImport:
        def find_spec(self, name, path=None, target=None):
            if name == "samv2core.cli":
                raise KeyboardInterrupt
            return None

    monkeypatch.delitem(sys.modules, "samv2core.cli", raising=False)
    monkeypatch.setattr(sys, "meta_path", [InterruptImport(), *sys.meta_path])
    monkeypatch.setattr(sys, "argv", ["samv2", "embed", str(ws["root"] / "v.nrrd")])
    before = _snapshot(ws["root"])
    assert samv2() == 130
    _check_clean(ws, before, capsys.readouterr().err, "interrupted")


# --- Python API ---------------------------------------------------------------------------------
def _api_cases():
    def load(name):
        from samv2core.volume import load_volume

        return lambda ws: load_volume(ws["root"] / name)

    def sheared(ws):
        from samv2core.volume import Volume

        c = ws["crop"]
        return Volume(c.array, c.spacing, c.origin, np.array([[1, 0.5, 0], [0, 1, 0], [0, 0, 1.0]]), "CT")

    def points(name):
        from samv2core.markups import read_points

        return lambda ws: read_points(ws["root"] / name)

    def model(name):
        from samv2core.model_io import load_model

        return lambda ws: load_model(ws["root"] / name)

    def cuda(ws):
        from samv2core.embed import Embedder
        from samv2core.network import NetConfig, build_network

        return Embedder(build_network(NetConfig.lite()), device="cuda")

    def modality(ws):
        from samv2core.volume import Modality

        return Modality.parse("PET")

    def grid(ws):
        from samv2core.preprocess import resample_to_model_grid
        from samv2core.volume import load_volume

        return resample_to_model_grid(load_volume(ws["root"] / "spacing100.nrrd"))

    def outputs(ws):
        from samv2core.outputs import check_outputs

        return check_outputs([ws["root"] / "hard_v.nrrd"], [ws["root"] / "v.nrrd"])

    def variant(ws):
        from samv2core.model_io import convert_official_checkpoint

        return convert_official_checkpoint(ws["root"] / "weights.pth", ws["root"] / "o.safetensors", variant="x")

    return [
        ("load-cut-nii-gz", load("cut_v.nii.gz"), InputError, "incomplete"),
        ("load-cut-nii", load("cut_v.nii"), InputError, "incomplete"),
        ("load-zero-spacing", load("zero_spacing.nrrd"), InputError, "Zero-valued spacing"),
        ("load-sheared", load("sheared.mha"), InputError, "not orthonormal"),
        ("volume-sheared", sheared, InputError, "not orthonormal"),
        ("load-nan", load("nan.nrrd"), InputError, "NaN"),
        ("points-binary", points("binary.csv"), InputError, "not a text CSV"),
        ("points-garbage-mrk", points("garbage.mrk.json"), InputError, "not a Slicer markups"),
        ("model-garbage", model("garbage.safetensors"), CheckpointError, "garbage"),
        ("model-missing", model("nope.safetensors"), CheckpointError, "not found"),
        ("embedder-cuda", cuda, DeviceError, "cuda"),
        ("modality-pet", modality, InputError, "PET"),
        ("grid-100mm", grid, InputError, "too large"),
        ("output-hardlink", outputs, InputError, "overwrite the input"),
        ("convert-variant", variant, InputError, "variant"),
    ]


API_CASES = _api_cases()


@pytest.mark.parametrize("call,exc_type,needle", [c[1:] for c in API_CASES], ids=[c[0] for c in API_CASES])
def test_api_raises_named_errors(ws, call, exc_type, needle):
    before = _snapshot(ws["root"])
    with pytest.raises(exc_type) as info:
        call(ws)
    text = str(info.value)
    assert len(text.splitlines()) == 1 and needle.lower() in text.lower(), text
    assert isinstance(info.value, SAMv2Error)
    assert _snapshot(ws["root"]) == before


def test_api_match_refuses_nan_points(ws):
    from samv2core.embed import Embedder
    from samv2core.matching import match_points
    from samv2core.models import resolve_model

    emb = Embedder(resolve_model(str(ws["root"] / "lite.safetensors")).model, device="cpu", precision="fp32")
    e = emb.embed(ws["crop"])
    with pytest.raises(InputError, match="NaN"):
        match_points(e, e, [[np.nan, 0.0, 0.0]], method="nn")


# --- the Slicer batch script --------------------------------------------------------------------
def _batch_script():
    pytest.importorskip("slicer", reason="slicer-core is not installed")
    spec = importlib.util.spec_from_file_location("samv2_batch_script", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


SCRIPT_CASES = [
    ("script-bad-model", ["@cohort/good.csv", "-o", "@script_out", "--model", "@garbage.safetensors"], "garbage"),
    ("script-missing-model", ["@cohort/good.csv", "-o", "@script_out", "--model", "@nope.safetensors"],
     "not found"),
    ("script-missing-csv", ["@cohort/nope.csv", "-o", "@script_out"], "no such case file"),
    ("script-missing-column", ["@cohort/nocol.csv", "-o", "@script_out"], "missing column"),
    ("script-binary-csv", ["@cohort/binary.csv", "-o", "@script_out"], "not a text CSV"),
    ("script-duplicate-names", ["@cohort/dupes.csv", "-o", "@script_out"], "used by row"),
    ("script-bad-shard", ["@cohort/good.csv", "-o", "@script_out", "--shard", "x"], "--shard"),
    ("script-deformable-alone", ["@cohort/good.csv", "-o", "@script_out", "--deformable"], "--register"),
    ("script-bad-option", ["@cohort/good.csv", "-o", "@script_out", "--register", "elastic"], "invalid choice"),
    ("script-no-output", ["@cohort/good.csv"], "--output"),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in SCRIPT_CASES], ids=[c[0] for c in SCRIPT_CASES])
def test_batch_script_refuses_cleanly(ws, capsys, args, needle):
    mod = _batch_script()
    before = _snapshot(ws["root"])
    capsys.readouterr()
    code = mod.main(_abs(ws, [*args, "--device", "cpu"]))
    err = capsys.readouterr().err
    assert code == 2, err
    _check_clean(ws, before, err, needle)


def test_batch_script_in_slicer_quits_with_2_when_torch_is_missing(ws, tmp_path):
    """Inside Slicer (--python-script) the application only exits when the script asks: an
    import error before any case must still call slicer.util.exit(2). Emulated with a stand-in
    'slicer' package whose util.exit records the code, and torch made unimportable."""
    fake = tmp_path / "fake"
    (fake / "slicer").mkdir(parents=True)
    record = tmp_path / "exit_code.txt"
    (fake / "slicer" / "__init__.py").write_text(
        "import sys\napp = object()\nclass util:\n    @staticmethod\n    def exit(code):\n"
        f"        open({str(record)!r}, 'w').write(str(code))\n        sys.exit(code)\n")
    (fake / "torch").mkdir()
    (fake / "torch" / "__init__.py").write_text("raise ImportError('No module named torch (blocked by the test)')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), os.environ.get("PYTHONPATH", "")]))
    before = _snapshot(ws["root"])
    proc = subprocess.run([sys.executable, str(SCRIPT), *_abs(ws, ["@cohort/good.csv", "-o", "@script_out"])],
                          capture_output=True, text=True, timeout=120, env=env)
    assert record.read_text() == "2" and proc.returncode == 2, proc.stderr
    _check_clean(ws, before, proc.stderr, "torch")


# --- samv2-train --------------------------------------------------------------------------------
def _train_config(ws, tmp_path, **data) -> Path:
    import yaml

    cfg = {"run": {"name": "bad", "output_dir": str(tmp_path / "runs"), "iterations": 2, "checkpoint_every": 1,
                   "validate_every": 0},
           "data": {"patch_size": [16, 32, 32], "batch_size": 1,
                    "volumes": [{"path": str(ws["root"] / "v.nrrd"), "modality": "CT"}], **data},
           "runtime": {"num_threads": 1, "progress": False}}
    p = tmp_path / "run.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _fake_run(ws, tmp_path, corrupt: int) -> Path:
    """A run folder as a killed run leaves it, with ``corrupt`` checkpoints whose digests fail."""
    from samv2train.config import load_config, save_config

    cfg = load_config(_train_config(ws, tmp_path))
    cfg.run_dir.mkdir(parents=True)
    save_config(cfg, cfg.run_dir / "config.yaml")
    ck = cfg.run_dir / "checkpoints"
    ck.mkdir()
    for step in range(1, corrupt + 1):
        (ck / f"step_{step:08d}.pt").write_bytes(b"corrupt" * 10)
        (ck / f"step_{step:08d}.pt.sha256").write_text("0" * 64 + "\n")
    return cfg.run_dir


def _train_cases():
    return [
        ("train-no-args", lambda ws, t: [], "--config"),
        ("train-config-missing", lambda ws, t: ["--config", str(t / "nope.yaml")], "not found"),
        ("train-config-garbage", lambda ws, t: ["--config", str(ws["root"] / "bad.yaml")], "bad.yaml"),
        ("train-data-missing", lambda ws, t: ["--config", str(_train_config(ws, t, volumes=[
            {"path": str(t / "missing.nrrd"), "modality": "CT"}]))], "missing.nrrd"),
        ("train-data-truncated", lambda ws, t: ["--config", str(_train_config(ws, t, volumes=[
            {"path": str(ws["root"] / "cut_v.nii.gz"), "modality": "CT"}]))], "incomplete"),
        ("train-resume-not-a-run", lambda ws, t: ["--resume", str(t)], "not a run directory"),
        ("train-resume-all-corrupt", lambda ws, t: ["--resume", str(_fake_run(ws, t, 2))], "--restart"),
        ("train-resume-no-checkpoint", lambda ws, t: ["--resume", str(_fake_run(ws, t, 0))], "no checkpoint"),
        ("train-restart-alone", lambda ws, t: ["--config", str(_train_config(ws, t)), "--restart"], "--resume"),
        ("train-export-no-out", lambda ws, t: ["--export", str(t)], "--out"),
        ("train-export-missing-run", lambda ws, t: ["--export", str(t / "norun"), "--out", str(t / "m.safetensors")],
         "norun"),
        ("train-check-config-missing-data", lambda ws, t: ["--check-config", str(_train_config(ws, t, volumes=[
            {"path": str(t / "missing.nrrd"), "modality": "CT"}]))], "missing.nrrd"),
    ]


TRAIN_CASES = _train_cases()


@pytest.mark.parametrize("make_args,needle", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_train_refuses_cleanly(ws, tmp_path, capsys, make_args, needle):
    from samv2train.cli import main

    args = make_args(ws, tmp_path)
    before_run = _snapshot(tmp_path)
    before = _snapshot(ws["root"])
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exc:
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2, err
    _check_clean(ws, before, err, needle, errors_only=True)  # training logs its progress on stderr
    assert _snapshot(tmp_path) == before_run  # no config.yaml, no checkpoint, nothing renamed


def test_catalogue_size():
    n = len(CLI_CASES) + 3 + len(API_CASES) + 1 + len(SCRIPT_CASES) + 1 + len(TRAIN_CASES)
    assert n >= 60, n


# === Hostile inputs and faults (issue 23) ======================================================
# Every case: exit code 2 (or the documented success), ONE line on stderr, no traceback, the
# inputs byte-identical, nothing partial left. Process-level faults (a pipe that could block, a
# name that aborted the process, a full disk, SIGKILL) run the command in a child process.
SAMV2 = [sys.executable, "-c", "import sys; from samv2core.launch import samv2; sys.exit(samv2())"]
TRAIN = [sys.executable, "-c", "import sys; from samv2train.cli import main; sys.exit(main())"]


def _run(args: list, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    env.pop("SAMV2_DEBUG", None)
    return subprocess.run(args, capture_output=True, timeout=timeout, env=env, **kw)


def _one_line(err: "bytes | str", needle: str, errors_only: bool = False) -> str:
    """One line on stderr (``errors_only``: one error line after progress lines, which a
    piped stderr gets one per stage)."""
    text = err.decode("utf-8", "replace") if isinstance(err, bytes) else err
    lines = [line for line in text.splitlines() if line.strip() and (not errors_only or "error" in line)]
    assert len(lines) == 1, f"expected one line on stderr, got: {text!r}"
    assert "Traceback" not in text and ".partial-" not in text
    assert needle.lower() in lines[0].lower(), f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def _no_partial(folder: Path) -> None:
    assert not [p for p in Path(folder).rglob("*") if ".partial-" in p.name], "a .partial- leftover"


class _Unblock:
    """Opens a FIFO for writing after ``after`` s, so a reader wrongly blocked on it returns
    (the test then fails on its assertions instead of hanging the suite)."""

    def __init__(self, fifo: Path, after: float = 60.0):
        import threading

        self.fifo, self.timer = fifo, threading.Timer(after, self._open)
        self.timer.daemon = True

    def _open(self) -> None:
        try:
            os.close(os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass

    def __enter__(self):
        self.timer.start()
        return self

    def __exit__(self, *exc):
        self.timer.cancel()


def _dicom_series(folder: Path, array: np.ndarray, uid: str) -> None:
    """Write ``array`` (z, y, x int16) as a DICOM CT series with series UID ``uid``."""
    for k in range(array.shape[0]):
        s = sitk.GetImageFromArray(array[k])
        s.SetSpacing((1.5, 1.5))
        tags = {"0008|0060": "CT", "0020|000e": uid, "0020|000d": "1.2.826.0.1.3680043.2.1125.77",
                "0020|0032": f"0\\0\\{2.0 * k}", "0020|0037": "1\\0\\0\\0\\1\\0", "0020|0013": str(k + 1),
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2", "0008|0018": f"{uid}.{k + 1}", "0028|0030": "1.5\\1.5"}
        for tag, value in tags.items():
            s.SetMetaData(tag, value)
        w = sitk.ImageFileWriter()
        w.KeepOriginalImageUIDOn()
        w.SetFileName(str(folder / f"{uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"))
        w.Execute(s)


@pytest.fixture(scope="module")
def hw(ws, tmp_path_factory):
    """Hostile files beside the catalogue's workspace (kept apart: a FIFO must never be opened
    by the workspace snapshot)."""
    import torch

    from samv2core.model_io import ModelCard, save_model
    from samv2core.network import NetConfig, build_network

    root = tmp_path_factory.mktemp("hostile")
    crop = ws["crop"]
    os.mkfifo(root / "fifo.nrrd")
    rng = np.random.default_rng(0)
    cplx = (rng.normal(size=(8, 8, 8)) + 1j * rng.normal(size=(8, 8, 8))).astype(np.complex64)
    _write(sitk.GetImageFromArray(cplx), root / "complex.nii.gz")
    _write(sitk.GetImageFromArray(rng.normal(size=(2, 2, 2)).astype(np.float32)), root / "tiny.nrrd")
    _write(sitk.GetImageFromArray(rng.normal(size=(1, 64, 64)).astype(np.float32)), root / "slice.nrrd")
    huge = crop.array.astype(np.float64)
    huge[2, 3, 4] = 1e300
    img = sitk.GetImageFromArray(huge)
    _write(img, root / "huge_value.nrrd")
    # a 185-byte MetaImage header promising a compressed 800^3 float image
    (root / "forged.mha").write_bytes(
        b"ObjectType = Image\nNDims = 3\nDimSize = 800 800 800\nElementType = MET_FLOAT\n"
        b"CompressedData = True\nCompressedDataSize = 16\nElementSpacing = 1 1 1\nElementDataFile = LOCAL\n"
        + b"x\x9c" + b"\x00" * 14)
    dicom = root / "two_series"
    dicom.mkdir()
    arr = (crop.array[:8, :32, :32]).astype(np.int16)
    _dicom_series(dicom, arr, "1.2.826.0.1.3680043.2.1125.7.1")
    _dicom_series(dicom, arr[:6] + 5, "1.2.826.0.1.3680043.2.1125.7.2")
    centre = ws["centre"]
    mrk = json.loads((ws["root"] / "points.mrk.json").read_text())
    for m in mrk["markups"]:
        m["coordinateUnits"] = "um"
        for cp in m["controlPoints"]:
            cp["position"] = [v * 1000 for v in cp["position"]]
    (root / "micrometres.mrk.json").write_text(json.dumps(mrk))
    # model cards that cannot be honoured, and weights with a NaN
    lite = ws["root"] / "lite.safetensors"
    card = json.loads((ws["root"] / "lite.json").read_text())
    for name, change in (("spacing1e9", {"spacing_mm": 1e9}),
                         ("terabytes", {"architecture": {**card["architecture"],
                                                         "stage_channels": [4096, 8192, 16384, 65536]}})):
        (root / f"{name}.safetensors").write_bytes(lite.read_bytes())
        (root / f"{name}.json").write_text(json.dumps({**card, **change}))
    torch.manual_seed(0)
    net = build_network(NetConfig.lite())
    with torch.no_grad():
        next(net.parameters()).view(-1)[0] = float("nan")
    save_model(net, ModelCard(name="nan-weights", architecture={}, heads=[]), root / "nan_weights.safetensors")
    # a YAML alias bomb: 9 levels of 9 aliases (9^9 values) in a few hundred bytes
    levels = ["a: &a [x,x,x,x,x,x,x,x,x]"]
    for n in range(1, 9):
        prev, cur = "abcdefghi"[n - 1], "abcdefghi"[n]
        levels.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    (root / "bomb.yaml").write_text("\n".join(levels) + "\n")
    return {"root": root, "centre": centre}


HOSTILE_CASES = [
    # inputs opened only after checking they are regular files
    ("fifo-as-image", ["embed", "%fifo.nrrd"], "pipe"),
    ("fifo-as-points", [*MATCH, "--points", "%fifo.nrrd"], "pipe"),
    ("fifo-as-model", ["embed", "@v.nrrd", "--model", "%fifo.nrrd"], "not a regular file"),
    ("fifo-as-cases", ["batch", "%fifo.nrrd", "-o", "%batch_out", *LITE], "pipe"),
    # sizes and pixel types checked from the header, before any voxel is allocated
    ("complex-pixels", ["embed", "%complex.nii.gz"], "complex"),
    ("tiny-2x2x2", ["embed", "%tiny.nrrd"], "at least 4"),
    ("single-slice", ["embed", "%slice.nrrd"], "at least 4"),
    ("forged-800-cubed-header", ["embed", "%forged.mha"], "declares"),
    ("finite-1e300", ["embed", "%huge_value.nrrd"], "float32 range"),
    # what cannot be honoured exactly is refused, or needs an explicit choice
    ("dicom-two-series", ["embed", "%two_series"], "--series"),
    ("markups-in-micrometres", [*MATCH, "--points", "%micrometres.mrk.json"], "not millimetres"),
    ("card-spacing-1e9", ["embed", "@v.nrrd", "--model", "%spacing1e9.safetensors"], "spacing_mm"),
    ("card-terabyte-architecture", ["embed", "@v.nrrd", "--model", "%terabytes.safetensors"], "parameters"),
    ("nan-weights", ["embed", "@v.nrrd", "--model", "%nan_weights.safetensors"], "NaN"),
    # a valid output is checked before the work; messages never name internal files
    ("out-name-too-long", ["embed", "@v.nrrd", *LITE, "--out", "%" + "n" * 300 + ".safetensors"], "bytes long"),
    ("embed-out-in-cache", ["embed", "@v.nrrd", *LITE, "--cache-dir", "%cache",
                            "--out", "%cache/0123.safetensors"], "cache"),
]


@pytest.mark.parametrize("args,needle", [c[1:] for c in HOSTILE_CASES], ids=[c[0] for c in HOSTILE_CASES])
def test_hostile_input_refused_cleanly(ws, hw, capsys, args, needle):
    from samv2core.cli import main

    args = [str(hw["root"] / a[1:]) if isinstance(a, str) and a.startswith("%") else a for a in _abs(ws, args)]
    before, before_h = _snapshot(ws["root"]), _snapshot(hw["root"])
    capsys.readouterr()
    with _Unblock(hw["root"] / "fifo.nrrd"):
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2, err
    _check_clean(ws, before, err, needle)
    assert _snapshot(hw["root"]) == before_h
    _no_partial(hw["root"])


def test_dicom_series_chosen_explicitly_and_info_lists_them(hw, capsys):
    from samv2core.cli import main

    folder = hw["root"] / "two_series"
    code = main(["info", str(folder), "--series", "1.2.826.0.1.3680043.2.1125.7.2", "--json"])
    out = capsys.readouterr().out
    assert code == 0
    doc = json.loads(out)
    assert doc["size_xyz"] == [32, 32, 6]  # the chosen series (6 slices), not the larger one
    assert {s["uid"] for s in doc["dicom_series"]} == {"1.2.826.0.1.3680043.2.1125.7.1",
                                                       "1.2.826.0.1.3680043.2.1125.7.2"}


def test_info_gives_extent_and_centre_in_lps_and_ras(ws, capsys):
    from samv2core.cli import main

    assert main(["info", str(ws["root"] / "v.nrrd"), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    crop = ws["crop"]
    centre = crop.index_to_lps((np.asarray(crop.size_xyz) - 1) / 2)
    assert np.allclose(doc["centre_lps"], centre, atol=1e-3)
    assert np.allclose(doc["centre_ras"], centre * [-1, -1, 1], atol=1e-3)
    corners = crop.corners_lps()
    assert np.allclose(doc["extent_lps"]["min"], corners.min(0), atol=1e-3)
    assert np.allclose(doc["extent_ras"]["max"], (corners * [-1, -1, 1]).max(0), atol=1e-3)
    assert doc["modality_assumed"] == "CT" and doc["size_xyz"] == list(crop.size_xyz)
    assert doc["orientation"].startswith("LPS")


def test_yaml_alias_bomb_is_refused_quickly(hw, capsys):
    import time

    from samv2train.cli import main

    t0 = time.perf_counter()
    code = main(["--check-config", str(hw["root"] / "bomb.yaml")])
    seconds = time.perf_counter() - t0
    assert code == 2
    _one_line(capsys.readouterr().err, "alias")
    assert seconds < 20, seconds  # a bound, not a speed target: expanding it takes minutes and gigabytes


def test_strict_json_never_writes_nan():
    from samv2core.outputs import json_text

    text = json_text({"score": float("nan"), "p": [1.0, float("inf")], "ok": 1})
    assert json.loads(text) == {"score": None, "p": [1.0, None], "ok": 1}
    assert "NaN" not in text and "Infinity" not in text


def test_non_utf8_names_long_names_and_a_pipe_in_a_batch(ws, hw, tmp_path):
    """In a child process (an abort would kill the test run): a non-UTF-8 image and output
    name, a 240-byte output name, and a batch whose first case is a pipe and whose second is
    named like the summary file (both runs finish, the second skips the finished case)."""
    root = os.fsencode(tmp_path)
    src = os.path.join(root, b"scan-\xff\xfe.nrrd")
    with open(src, "wb") as f:
        f.write((ws["root"] / "v.nrrd").read_bytes())
    out = os.path.join(root, b"emb-\xff.safetensors")
    lite = [os.fsencode(a) if isinstance(a, str) else a for a in _abs(ws, LITE)]
    proc = _run([*SAMV2, "embed", src, *lite, "--out", out])
    assert proc.returncode == 0, proc.stderr
    assert os.path.isfile(out) and b"Traceback" not in proc.stderr
    long_out = tmp_path / ("e" * 240 + ".safetensors")
    proc = _run([*SAMV2, "info", src])
    assert proc.returncode == 0 and b"centre RAS" in proc.stdout, proc.stderr
    proc = _run([*SAMV2, "embed", str(ws["root"] / "v.nrrd"), *_abs(ws, LITE), "--out", str(long_out)])
    assert proc.returncode == 0, proc.stderr
    assert long_out.is_file()
    _no_partial(tmp_path)
    # batch: a pipe as a case input fails that case only; "summary.csv" as a case name works
    cases = tmp_path / "cases.csv"
    fifo = tmp_path / "pipe.nrrd"
    os.mkfifo(fifo)
    v, q, pts = (ws["root"] / n for n in ("v.nrrd", "q.nrrd", "points.csv"))
    cases.write_text(f"case,baseline,followup,points\npiped,{fifo},{q},{pts}\nsummary.csv,{v},{q},{pts}\n")
    for attempt in range(2):
        proc = _run([*SAMV2, "batch", str(cases), "-o", str(tmp_path / "cohort"), "--method", "nn",
                     *_abs(ws, LITE)], timeout=400)
        assert proc.returncode == 1, proc.stderr  # one case failed, the other did not
        rows = {r["case"]: r for r in __import__("csv").DictReader((tmp_path / "cohort" / "summary.csv").open())}
        assert rows["piped"]["status"] == "failed" and "pipe" in rows["piped"]["message"]
        assert rows["case_summary.csv"]["status"] == ("ok" if attempt == 0 else "skipped")
    _no_partial(tmp_path / "cohort")


def _full_disk(tmp_path):
    """(folder, preexec_fn): a folder on a full file system (a 256 KiB tmpfs, when this
    process may mount one), else a folder where the child may write at most 64 KiB per file
    (RLIMIT_FSIZE: the write fails the same way, with EFBIG instead of ENOSPC)."""
    import resource

    folder = tmp_path / "full"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    if mounted:
        return folder, None, lambda: subprocess.run(["umount", "-l", str(folder)], capture_output=True)

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    return folder, limit, lambda: None


def test_full_disk_is_one_line_and_the_cache_never_fails_a_command(ws, tmp_path):
    folder, preexec, cleanup = _full_disk(tmp_path)
    try:
        before = _snapshot(ws["root"])
        out = folder / "e.safetensors"
        proc = _run([*SAMV2, "embed", str(ws["root"] / "v.nrrd"), *_abs(ws, LITE), "--out", str(out)],
                    preexec_fn=preexec)
        assert proc.returncode == 2
        _one_line(proc.stderr, "e.safetensors", errors_only=True)
        assert not out.exists()
        # the cache on the full disk: a warning, the command succeeds
        proc = _run([*SAMV2, "embed", str(ws["root"] / "v.nrrd"), *_abs(ws, LITE), "--cache-dir",
                     str(folder / "cache")], preexec_fn=preexec)
        assert proc.returncode == 0, proc.stderr
        assert b"Traceback" not in proc.stderr and json.loads(proc.stdout)["fine_shape"]
        # training checkpoints on the full disk
        cfg = _train_config(ws, tmp_path)
        text = cfg.read_text().replace(str(tmp_path / "runs"), str(folder / "runs"))
        cfg.write_text(text)
        proc = _run([*TRAIN, "--config", str(cfg)], timeout=400, preexec_fn=preexec)
        assert proc.returncode == 2, proc.stderr
        errors = [line for line in proc.stderr.decode().splitlines() if "error" in line]
        assert len(errors) == 1 and "Traceback" not in proc.stderr.decode(), proc.stderr
        # register: its folder does not fit
        proc = _run(_register(ws, folder / "reg", "q.nrrd"), timeout=500, preexec_fn=preexec)
        assert proc.returncode == 2, proc.stderr
        _one_line(proc.stderr, "could not write the registration", errors_only=True)
        assert not (folder / "reg").exists()
        assert _snapshot(ws["root"]) == before
        _no_partial(folder)
    finally:
        cleanup()


def test_cache_never_replaces_or_trusts_a_file_it_did_not_write(ws, tmp_path, caplog):
    import torch

    from samv2core.cache import EmbeddingDiskCache
    from samv2core.checked_tensors import save_checked

    cache = EmbeddingDiskCache(tmp_path)
    key = "some-key"
    save_checked(cache.path(key), {"fine": torch.zeros(2, 2)}, {"coordinate_system": "LPS"})  # an embed --out
    digest = hashlib.sha256(cache.path(key).read_bytes()).hexdigest()
    assert cache.load(key, ws["crop"], 2.0, "m") is None
    cache.save(key, type("E", (), {"rows": torch.zeros(1, 1), "coarse": torch.zeros(1, 1, 1, 1),
                                   "fine_grid": type("G", (), {"__dict__": {}})(),
                                   "coarse_grid": type("G", (), {"__dict__": {}})(), "head_dims": ()})())
    assert hashlib.sha256(cache.path(key).read_bytes()).hexdigest() == digest  # left as it was
    # an unwritable cache folder (a file) never fails
    bad = EmbeddingDiskCache(ws["root"] / "afile")
    assert bad.load(key, ws["crop"], 2.0, "m") is None


def _register(ws, out: Path, moving: str) -> list:
    return [*SAMV2, "register", "--fixed", str(ws["root"] / "v.nrrd"), "--moving", str(ws["root"] / moving),
            "--out", str(out), "--features", "mind", "--mode", "rigid", "--quiet"]


def _folder_digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def test_sigkill_while_register_writes_leaves_the_previous_result(ws, tmp_path):
    """All-or-nothing commit: a register killed (SIGKILL) while it writes its folder leaves
    the previous result exactly, never a mix; the next write there removes the leftover."""
    import signal
    import time

    from samv2core.outputs import OutputSet

    out = tmp_path / "reg"
    first = _run(_register(ws, out, "q.nrrd"), timeout=500)
    assert first.returncode == 0, first.stderr
    summary = json.loads(first.stdout)
    assert "verified" in summary and "not the registration's accuracy" in summary["residual_mm_median_is"]
    previous = _folder_digest(out)
    assert {"linear.tfm", "report.json", "moving_resampled.nii.gz"} <= set(previous)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.Popen(_register(ws, out, "v.nii.gz"), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 500
    while proc.poll() is None and time.monotonic() < deadline:
        if any(p.name.startswith(".partial-") for p in tmp_path.iterdir()):  # the new folder is being written
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    killed = proc.returncode == -signal.SIGKILL
    now = _folder_digest(out)
    if killed:
        assert now == previous, "a killed run changed the previous result"
    else:  # it finished before we saw it write: then the new result is complete
        assert json.loads((out / "report.json").read_text())["moving"]["name"] == "v"
    with OutputSet(folder=tmp_path / "other") as files:  # the next write in that folder cleans up
        files.write_text(tmp_path / "other" / "a.txt", "x")
    _no_partial(tmp_path)


def test_output_folder_commit_survives_sigkill_at_any_point(tmp_path):
    """A child process writes a folder result slowly and is killed at several instants: the
    folder always holds the previous result or the complete new one."""
    import signal
    import time

    from samv2core.outputs import OutputSet, clean_leftovers

    out = tmp_path / "result"
    with OutputSet(folder=out) as files:
        for name in ("a.txt", "b.txt", "report.json"):
            files.write_text(out / name, "old")
    (out / "user_notes.txt").write_text("mine")  # not an output: kept across runs
    script = ("import sys, time; from pathlib import Path; from samv2core.outputs import OutputSet\n"
              "out = Path(sys.argv[1])\n"
              "with OutputSet(folder=out, replaces=['a.txt', 'b.txt', 'report.json']) as f:\n"
              "    for n in ('a.txt', 'b.txt', 'report.json'):\n"
              "        f.write_text(out / n, 'new'); time.sleep(0.2)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    for delay in (0.05, 0.3, 0.5):
        proc = subprocess.Popen([sys.executable, "-c", script, str(out)], env=env)
        time.sleep(delay + 0.3)  # the interpreter's start-up, then part of the writing
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        contents = {p.name: p.read_text() for p in out.iterdir()}
        assert contents.pop("user_notes.txt") == "mine"
        assert set(contents.values()) in ({"old"}, {"new"}) and len(contents) == 3, contents
        clean_leftovers(tmp_path)
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".partial-")]


def test_native_library_dumps_never_precede_the_error_line(tmp_path):
    """A refusal in a child process with a real stderr: the one line, nothing printed by C++
    libraries before it (ITK prints a WARNING block for this NIfTI's sheared sform)."""
    import struct

    path = tmp_path / "shear.nii"
    _write(sitk.GetImageFromArray(np.zeros((8, 20, 20), np.float32)), path, False)
    header = bytearray(path.read_bytes())
    header[252:256] = struct.pack("<hh", 0, 1)  # qform_code 0, sform_code 1
    header[280:328] = struct.pack("<12f", 2, 1, 0, 0, 0, 2, 0, 0, 0, 0, 2, 0)  # a sheared sform
    path.write_bytes(bytes(header))
    proc = _run([*SAMV2, "embed", str(path)])
    assert proc.returncode == 2
    _one_line(proc.stderr, "orthonormal")
    debug = subprocess.run([*SAMV2, "embed", str(path)], capture_output=True, timeout=300,
                           env={**os.environ, "SAMV2_DEBUG": "1",
                                "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)})
    assert b"WARNING" in debug.stderr  # the dump exists, and SAMV2_DEBUG shows it


def test_rough_edges_of_the_readme_commands(ws, tmp_path, capsys, monkeypatch):
    """match --out says what it wrote; progress is one line per stage when piped, without a
    stray comma on a terminal; the CSV has the answer and the template point; --seed has help."""
    import io

    from samv2core import progress
    from samv2core.cli import main

    out, csv_out = tmp_path / "m.json", tmp_path / "m.csv"
    c = ws["centre"]
    monkeypatch.delenv("SAMV2_PROGRESS", raising=False)
    code = main([*_abs(ws, MATCH), "--point", f"{c[0]},{c[1]},{c[2]}", "--out", str(out), "--out-csv", str(csv_out),
                 "--progress"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"wrote {out}" in err
    stages = [line for line in err.splitlines() if line.startswith("embedding ")]  # piped + --progress: lines
    assert stages and len(stages) == len(set(stages))
    header = csv_out.read_text().splitlines()[0].split(",")
    assert {"answer", "template_x", "template_y", "template_z"} <= set(header)
    json.loads(out.read_text())
    monkeypatch.setenv("SAMV2_PROGRESS", "")
    monkeypatch.setattr(progress, "_mode", lambda: "bar")
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stderr", buf)
    with progress.progress_bar("embedding x") as update:
        update(0.5, "slab 1/2")
    assert "|  slab" not in buf.getvalue() and "| slab 1/2" in buf.getvalue() and ", slab" not in buf.getvalue()
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "seed of the simulated" in capsys.readouterr().out


def test_figure_titles_name_the_files(ws):
    from samv2core.figures import display_name
    from samv2core.volume import load_volume

    vol = load_volume(ws["root"] / "v.nrrd")
    assert display_name(vol) == "v.nrrd"


def test_errors_name_the_output_never_the_staged_file(tmp_path):
    import errno

    from samv2core.outputs import OutputSet, atomic_write

    target = tmp_path / "points.csv"

    def full(tmp):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))

    with pytest.raises(OSError) as caught:
        atomic_write(target, full)
    assert caught.value.filename == str(target) and caught.value.errno == errno.ENOSPC
    with pytest.raises(OSError) as caught:
        with OutputSet() as files:
            full(files.stage(target))
    assert caught.value.filename == str(target) and ".partial-" not in str(caught.value)
    _no_partial(tmp_path)
