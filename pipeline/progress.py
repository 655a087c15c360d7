"""Progress bars (tqdm) for a person at a terminal: shown only when stderr is one, so that
logs, CI output and DVC's stay one line per epoch."""

from __future__ import annotations

import sys


def progress(iterable=None, *, total: int | None = None, desc: str, unit: str = "batch",
             enabled: bool = True):  # fmt: skip
    """A tqdm bar over `iterable` (or updated by hand); inert unless stderr is a terminal
    and `enabled` (rank 0)."""
    from tqdm import tqdm

    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    show = enabled and sys.stderr.isatty()
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, disable=not show)
