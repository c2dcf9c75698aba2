"""`progress=True`: a one-line progress bar on stderr for long loads."""

from __future__ import annotations

import sys
import time
from typing import Any, Callable, Optional, TextIO

ProgressCallback = Callable[[int, int], Any]


class ProgressBar:
    """Called as `bar(done, total)`; redraws at most 10 times a second and
    ends the line when `done == total`."""

    WIDTH = 30

    def __init__(self, label: str = "", stream: Optional[TextIO] = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        finished = done >= total
        if not finished and now - self.last_draw < 0.1:
            return
        self.last_draw = now
        filled = self.WIDTH if total <= 0 else self.WIDTH * done // total
        rate = done / max(now - self.start, 1e-9) / 1e9
        bar = "=" * filled + (">" if filled < self.WIDTH else "") + " " * max(0, self.WIDTH - filled - 1)
        self.stream.write(f"\r{self.label}[{bar}] {done / 2**20:.1f}/{total / 2**20:.1f} MiB {rate:.2f} GB/s")
        if finished:
            self.stream.write("\n")
        self.stream.flush()


def resolve(progress: Any, label: str = "") -> Optional[ProgressCallback]:
    """`progress` as the loaders take it: None/False (nothing), True (a bar
    on stderr) or a `progress(done, total)` callable."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressBar(label)
    if not callable(progress):
        raise TypeError(f"progress must be a callable progress(done, total), True or None, not {type(progress).__name__}")
    return progress
