"""``samv2 view``: arguments, runner and entry point (``samv2core.cli`` hands the sub-command's
arguments to :func:`main` by name; ``python -m samv2view`` runs it too).

    samv2 view --template baseline.nii.gz --query followup.nii.gz [--data-dir DIR ...] [--port N]
               [--host H (--token T | --insecure-no-token)] [--shared-session]

Serves the browser view on 127.0.0.1 (a free port unless --port) and prints its address. The
page may open only the scans given here and files inside the --data-dir folders.
trame / trame-slicer / slicer-core are imported only when the command runs.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

from samv2core.cli_options import add_model_arguments, session_from_args
from samv2core.errors import OneLineParser, SAMv2Error, run_cli

from .access import decide_exposure
from .files import AllowedFiles
from .session import ViewSession

VIEW_PACKAGES = ("trame", "trame_slicer", "slicer")


def add_view_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--template", default="", help="baseline scan (the page may open it)")
    parser.add_argument("--query", default="", help="follow-up scan (the page may open it)")
    parser.add_argument("--data-dir", action="append", default=[], metavar="DIR",
                        help="a folder whose scans the page may open by path (repeatable); nothing else can be opened")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to serve on (default 127.0.0.1, this machine only); another address needs "
                             "--token (or uses a generated one, printed) or --insecure-no-token")
    parser.add_argument("--port", type=int, default=0, help="port (default: a free one, printed)")
    parser.add_argument("--token", default=os.environ.get("SAMV2_VIEW_TOKEN"),
                        help="every request must carry this token (16+ characters; or set SAMV2_VIEW_TOKEN, "
                             "which ps does not show); the printed address includes it")
    parser.add_argument("--insecure-no-token", action="store_true",
                        help="serve a non-loopback --host without a token (a warning is printed)")
    parser.add_argument("--shared-session", action="store_true",
                        help="let several browser tabs share one session (default: one tab at a time, "
                             "each starting afresh)")
    parser.add_argument("--method", default="refined", choices=["refined", "fixed_point", "nn"])
    parser.add_argument("--register-mode", default="rigid", choices=["rigid", "affine"],
                        help="linear model of the Register button (default rigid)")
    add_model_arguments(parser)


def run_view(args) -> int:
    missing = [name for name in VIEW_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise SAMv2Error(f"the browser view needs {', '.join(missing)}: pip install 'samv2core[view]'")
    if not 0 <= args.port <= 65535:
        raise SAMv2Error(f"--port must be between 0 and 65535, got {args.port}")
    exposure = decide_exposure(args.host, args.token, args.insecure_no_token)
    # the page shows and reopens them: absolute, as a relative path typed there means one in --data-dir
    template, query = (os.path.abspath(p) if str(p).strip() else "" for p in (args.template, args.query))
    files = AllowedFiles.from_command_line([template, query], args.data_dir)
    from .app import serve  # noqa: PLC0415 - needs the optional 'view' extra (trame)

    embeddings = session_from_args(args)
    print(f"samv2 view: model {embeddings.label}, device {embeddings.device}", file=sys.stderr)
    session = ViewSession(embeddings, method=args.method, files=files)
    serve(session, template, query, exposure, port=args.port, register_mode=args.register_mode,
          shared_session=args.shared_session)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="samv2 view", description="browser view: click on the baseline, see the match "
                                                          "on the follow-up")
    add_view_arguments(parser)
    return parser


def main(argv: list | None = None) -> int:
    """``samv2 view`` with ``argv`` (the arguments after ``view``); returns the exit code."""
    return run_cli("samv2 view", lambda: run_view(build_parser().parse_args(sys.argv[1:] if argv is None else argv)))
