"""Progress reporting: a callback ``progress(fraction, message)`` with fraction in [0, 1].

The core reports through such callbacks; the CLI shows them as a tqdm bar on stderr (one line
per stage with ``--progress``, for piped or logged output), the Slicer module as its progress bar.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
from typing import Callable, Iterator, Optional

from tqdm import tqdm

ProgressCallback = Callable[[float, str], None]
Progress = Optional[ProgressCallback]


def no_progress(fraction: float, message: str) -> None:
    """A progress callback that shows nothing."""


def sub_progress(progress: Progress, lo: float, hi: float, prefix: str = "") -> ProgressCallback:
    """A callback mapping [0, 1] onto [lo, hi] of ``progress`` (messages get ``prefix``)."""
    if progress is None:
        return no_progress
    return lambda f, m: progress(lo + (hi - lo) * float(f), prefix + m)


def _mode() -> str:
    """'lines' (``--progress``), 'bar' (stderr is a terminal) or 'none' (piped or logged: a
    refusal there stays the one line it is, unless ``--progress`` asks for stage lines)."""
    if os.environ.get("SAMV2_PROGRESS", "").lower() == "lines":
        return "lines"
    try:
        return "bar" if sys.stderr.isatty() else "none"
    except (AttributeError, ValueError):
        return "none"


@contextlib.contextmanager
def progress_bar(desc: str, quiet: bool = False) -> Iterator[ProgressCallback]:
    """Progress on stderr as a callback: a tqdm bar on a terminal; one line per stage with
    ``--progress`` (SAMV2_PROGRESS=lines), also when stderr is piped or a log file; nothing
    when ``quiet`` or piped without ``--progress``."""
    mode = _mode()
    if quiet or mode == "none":
        yield no_progress
        return
    if mode == "lines":
        last = [None]

        def line(fraction: float, message: str) -> None:
            stage = re.sub(r"\d+/\d+", "", message)  # "slab 2/5" is the same stage as "slab 1/5"
            if stage != last[0]:
                last[0] = stage
                print(f"{desc}: {message}", file=sys.stderr, flush=True)

        yield line
        return
    # the stage text rides in tqdm's ``unit`` field (shown by no rate here): its ``postfix``
    # field would be printed with a leading ", "
    bar = tqdm(total=100, desc=desc, unit="", leave=False, file=sys.stderr,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {unit}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * min(max(float(fraction), 0.0), 1.0)))
        bar.unit = message[:60]
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
