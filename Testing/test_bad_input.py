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
