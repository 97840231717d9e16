"""Progress for long work: a tqdm bar on a terminal, plain lines in a log.

A job log (Ray job, CI, a file) is not a terminal: a redrawn bar would write thousands of
carriage-return fragments into it. There one line is printed every `every` of the total
(10% by default) but at most one per `min_interval_s`, and one at the end, so `ray job logs`
reads as a short history.

    with Progress("world scenes", total=len(rows), unit="rows") as progress:
        for row in rows:
            ...
            progress.update()
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, description: str, total: int | None, unit: str = "items", every: float = 0.1,
                 stream: TextIO | None = None, min_interval_s: float = 2.0):
        self.description = description
        self.total = total
        self.unit = unit
        self.done = 0
        self.stream = stream or sys.stderr
        self.started = time.perf_counter()
        self.min_interval_s = min_interval_s
        self._last_line = float("-inf")
        self._every = max(1, int((total or 0) * every)) if total else None
        self._next_line = self._every
        self._bar = None
        if self.stream.isatty():
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, desc=description, unit=f" {unit}", file=self.stream, leave=True)

    def update(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.update(count)
        elif self._next_line is not None and self.done >= self._next_line and self.done < (self.total or 0):
            if time.perf_counter() - self._last_line >= self.min_interval_s:
                self._line()
            while self._next_line <= self.done:
                self._next_line += self._every

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        else:
            self._line(final=True)

    def _line(self, final: bool = False) -> None:
        self._last_line = time.perf_counter()
        seconds = self._last_line - self.started
        of = f"/{self.total}" if self.total else ""
        rate = f", {self.done / seconds:.1f} {self.unit}/s" if seconds > 0 and self.done else ""
        ending = " done" if final else ""
        print(f"[{self.description}] {self.done}{of} {self.unit}{ending} ({seconds:.0f} s{rate})",
              file=self.stream, flush=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
