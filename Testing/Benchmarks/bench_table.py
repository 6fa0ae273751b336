"""Tables and timings shared by the benchmark scripts of this folder.

The benchmarks print plain-text tables (markdown where the README quotes them) and time one call
at a time, as a user clicks. Everything here is presentation and measurement: no benchmark logic.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple


def fmt(value, digits: int = 2) -> str:
    """``value`` for a table cell: ``-`` for None, floats with ``digits`` decimals, anything else as str."""
    return "-" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else str(value))


def header(columns: Sequence[tuple[str, str]]) -> list[str]:
    """A fixed-width markdown header and its rule; ``columns`` are (title, format spec such as ``"<44"``)."""
    widths = [int(spec.lstrip("<>^")) for _, spec in columns]
    return ["| " + " | ".join(f"{title:{spec}}" for title, spec in columns) + " |", rule(widths)]


def rule(widths: Iterable[int]) -> str:
    """The markdown rule under a header whose cells are ``widths`` characters wide."""
    return "|" + "|".join("-" * (w + 2) for w in widths) + "|"


def fitted_table(head: Sequence[str], rows: Sequence[Sequence], markdown: bool = True) -> list[str]:
    """A table whose columns are as wide as their widest cell, left-aligned.

    ``markdown=True`` gives ``| a | b |`` rows under a ``|---|`` rule; ``False`` gives columns
    separated by two spaces under a dashed line (for tables too wide to read as markdown).
    """
    cells = [[str(x) for x in r] for r in rows]
    widths = [max(len(r[i]) for r in cells + [list(head)]) for i in range(len(head))]

    def line(r):
        padded = [x.ljust(w) for x, w in zip(r, widths)]
        return "| " + " | ".join(padded) + " |" if markdown else "  ".join(padded)

    return [line(head), rule(widths) if markdown else "  ".join("-" * w for w in widths)] + [line(r) for r in cells]


class Spread(NamedTuple):
    """Order statistics of repeated timings (the unit of the input)."""

    min: float
    median: float
    p90: float
    max: float


def spread(values: Sequence[float]) -> Spread:
    """Min, median, 90th percentile (nearest rank) and max of ``values``."""
    v = sorted(values)
    return Spread(v[0], statistics.median(v), v[min(len(v) - 1, int(round(0.9 * (len(v) - 1))))], v[-1])


def time_each(call: Callable, items: Iterable, warmup: bool = True) -> tuple[list, list[float]]:
    """``call(item)`` for each item, one at a time: (results, wall seconds of each call).

    With ``warmup`` the first item is run once untimed first (lazy initialisation and caches
    would otherwise land on the first timing).
    """
    items = list(items)
    if warmup and items:
        call(items[0])
    results, seconds = [], []
    for item in items:
        t = time.perf_counter()
        results.append(call(item))
        seconds.append(time.perf_counter() - t)
    return results, seconds


def machine_load() -> str:
    """One line on how busy the machine was: timings from a loaded machine are not comparable."""
    one, five, _ = os.getloadavg()
    return f"machine load: {one:.2f} (1 min) / {five:.2f} (5 min) on {os.cpu_count()} CPUs"


def print_machine_load() -> None:
    """:func:`machine_load` on stderr, beside the progress lines (stdout keeps only the tables)."""
    print(machine_load(), file=sys.stderr, flush=True)
