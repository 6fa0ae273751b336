"""Progress reporting: a callback ``progress(fraction, message)`` with fraction in [0, 1].

The core reports through such callbacks; the CLI shows them as a tqdm bar on stderr, the
Slicer module as its progress bar.
"""
from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def progress_bar(desc: str, quiet: bool = False) -> Iterator[ProgressCallback]:
    """A tqdm bar on stderr as a progress callback (nothing when ``quiet`` or not a terminal)."""
    if quiet:
        yield no_progress
        return
    bar = tqdm(total=100, desc=desc, unit="%", leave=False, file=sys.stderr, disable=None,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {postfix}")

    def update(fraction: float, message: str) -> None:
        bar.n = int(round(100 * min(max(float(fraction), 0.0), 1.0)))
        bar.set_postfix_str(message[:60])
        bar.refresh()

    try:
        yield update
    finally:
        bar.close()
