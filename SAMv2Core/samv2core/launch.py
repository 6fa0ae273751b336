"""Console-script entry point of ``samv2``: importing the command line loads torch, SimpleITK
and numpy (seconds); a Ctrl-C during that start-up is reported like any other interruption
(one line, exit code 130), never as a traceback."""
from __future__ import annotations

import sys


def samv2() -> int:
    try:
        from .cli import main  # noqa: PLC0415 - imported here so a Ctrl-C during it is caught
    except KeyboardInterrupt:
        print("samv2: interrupted", file=sys.stderr)
        return 130
    return main()
