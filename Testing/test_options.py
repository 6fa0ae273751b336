"""Options: the CLI's defaults are the options dataclasses' defaults, bad values are refused
with the project's own error type (one line, exit 2 on the command line), and every samv2
command that runs a model takes the same --model/--device/--precision/--cache-dir options."""
from __future__ import annotations

import pytest

from samv2core.cli import build_parser, main
from samv2core.errors import InputError
from samv2core.matching import MatchOptions
from samv2core.model_io import OFFICIAL_VARIANTS
from samv2core.registration import RegistrationOptions
from samv2core.registration.cli import options_from_args
from samv2core.registration.deformable import DeformableOptions


def _parse(*argv):
    return build_parser().parse_args([str(a) for a in argv])


def test_register_cli_defaults_are_the_options_defaults():
    args = _parse("register", "--fixed", "f.nrrd", "--moving", "m.nrrd", "--out", "o")
    opts = options_from_args(args)
    ref = RegistrationOptions()
    ref.deformable.device = opts.deformable.device  # the CLI passes --device through
    assert opts.to_dict() == {**ref.to_dict(), "device": args.device}
    assert opts.deformable.to_dict() == DeformableOptions(device=args.device).to_dict()
    assert _parse("match", "--template", "a", "--query", "b").min_score == MatchOptions().min_score


@pytest.mark.parametrize("command", [("embed", "x.nrrd"), ("match", "--template", "a", "--query", "b"),
                                     ("demo",), ("register", "--fixed", "f", "--moving", "m", "--out", "o")])
def test_every_model_command_has_the_same_model_options(command):
    args = _parse(*command, "--model", "w.safetensors", "--device", "cpu", "--precision", "fp32", "--cache-dir", "c")
    assert (args.model, args.device, args.precision, args.cache_dir) == ("w.safetensors", "cpu", "fp32", "c")


@pytest.mark.parametrize("bad", [dict(grid_spacing_mm=0.0), dict(min_inliers=0), dict(features="sift"),
                                 dict(query_side="left"), dict(min_score=1.5), dict(fov_margin_mm=-1.0)])
def test_bad_registration_options_raise_input_error(bad):
    with pytest.raises(InputError):
        RegistrationOptions(**bad)


@pytest.mark.parametrize("bad", [dict(cube_size=4), dict(cube_size=0), dict(iterations=0),
                                 dict(min_fixed_points=0), dict(cycle_tolerance_mm=0.0)])
def test_bad_match_options_raise_input_error(bad):
    with pytest.raises(InputError):
        MatchOptions(**bad)


def test_bad_option_on_the_command_line_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["register", "--fixed", "f.nrrd", "--moving", "m.nrrd", "--out", str(tmp_path / "o"),
                 "--grid-spacing", "0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "grid_spacing_mm must be positive" in err[0]
    assert not (tmp_path / "o").exists()


def test_convert_variant_help_names_the_variants_the_converter_accepts():
    help_text = build_parser()._subparsers._group_actions[0].choices["convert-checkpoint"].format_help()
    assert all(v in help_text for v in OFFICIAL_VARIANTS)
    assert _parse("convert-checkpoint", "a.pth", "b.safetensors", "--variant", "samv2").variant == "samv2"
