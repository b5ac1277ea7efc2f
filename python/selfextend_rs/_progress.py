"""A dependency-free terminal progress bar for long prefills and evaluations."""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


class ProgressBar:
    """Callable as ``bar(done, total)``; draws one line on a terminal stream.

    Shows the fraction done, throughput in tokens (or items) per second and an ETA,
    and ends the line when ``done == total``.
    """

    def __init__(self, desc: str = "prefill", unit: str = "tokens", stream: Optional[TextIO] = None,
                 width: int = 24) -> None:
        self.desc, self.unit, self.width = desc, unit, width
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.closed = False

    def __call__(self, done: int, total: int) -> None:
        if self.closed:
            return
        elapsed = max(time.monotonic() - self.start, 1e-9)
        frac = done / total if total else 1.0
        filled = int(round(frac * self.width))
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("inf")
        eta_text = "--" if eta == float("inf") else _duration(eta)
        line = (
            f"\r{self.desc} {frac:4.0%} |{'█' * filled}{'░' * (self.width - filled)}| "
            f"{done}/{total} {self.unit}  {rate:,.0f} {self.unit}/s  ETA {eta_text}  "
        )
        self.stream.write(line)
        if done >= total:
            self.stream.write(f"\r{self.desc} done: {total} {self.unit} in {_duration(elapsed)} "
                              f"({rate:,.0f} {self.unit}/s){' ' * 20}\n")
            self.closed = True
        self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes < 60 else f"{minutes // 60}h{minutes % 60:02d}m"
