"""A dependency-free progress line on stderr: redrawn in place on a terminal, and a plain line
every ~10 s otherwise (so logs of batch jobs show progress without megabytes of carriage returns)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, total: int, desc: str = "", enabled: bool = True, unit: str = "img") -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.n = 0
        self.start = self.last = time.perf_counter()
        self.postfix = ""

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        self.n += n
        if postfix is not None:
            self.postfix = postfix
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.last >= (0.25 if self.tty else 10.0):
            self.last = now
            self._draw(now)

    def _draw(self, now: float, end: str = "") -> None:
        el = max(now - self.start, 1e-9)
        rate = self.n / el
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = (self.total - self.n) / rate if rate > 0 else 0.0
        line = (
            f"{self.desc} {pct:5.1f}% {self.n}/{self.total} [{el:.0f}s<{eta:.0f}s, "
            f"{rate:.0f} {self.unit}/s] {self.postfix}"
        )
        sys.stderr.write(("\r" + line + "\x1b[K" + end) if self.tty else (line + "\n"))
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled and self.n:
            self._draw(time.perf_counter(), end="\n" if self.tty else "")
