"""Progress for long work: a tqdm bar on a terminal, a plain line every 10% in logs (a batch job's output file).

Why both: tqdm's carriage-return redraws are unreadable in a log file and it shows nothing between a job's
``--log-interval`` lines, so a scheduler log used to stay silent for an hour of validation; one line per tenth
keeps logs short and still says that the job is alive and how far it got.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    """``with Progress(total, "eval valid") as bar: bar.update(n)``; ``enabled=False`` shows nothing."""

    def __init__(
        self,
        total: int,
        desc: str,
        enabled: bool = True,
        initial: int = 0,
        unit: str = "it",
        stream: TextIO | None = None,
    ) -> None:
        self.total, self.desc, self.n, self.unit = max(0, int(total)), desc, int(initial), unit
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.total > 0
        self.bar: Any = None
        self.t0 = time.time()
        self.next_tenth = self._tenth(self.n) + 1
        if self.enabled and self.stream.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=False, file=self.stream)

    def _tenth(self, n: int) -> int:
        return (10 * n) // self.total if self.total else 10

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.n += n
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(**postfix)
            return
        tenth = self._tenth(self.n)
        if tenth >= self.next_tenth and self.n < self.total:
            self.next_tenth = tenth + 1
            rate = self.n / max(time.time() - self.t0, 1e-9)
            extra = "".join(f", {k} {v}" for k, v in postfix.items())
            done = f"{self.n:,}/{self.total:,} {self.unit}, {rate:,.1f} {self.unit}/s{extra}"
            self.stream.write(f"{self.desc}: {10 * tenth}% ({done})\n")  # stderr, like tqdm: never mixed with results
            self.stream.flush()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
