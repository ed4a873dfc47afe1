"""Progress of long work: a tqdm bar on a terminal; when stderr is redirected (a log file, a job
scheduler), plain lines instead, one every `every` seconds and one at the end, with the count, the
rate and, where the total or the budget is known, the share done and an ETA. No carriage returns."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
QUIET_UNDER_S = 5.0  # work shorter than this prints no closing line when redirected


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class Progress:
    def __init__(self, total: int | None, desc: str, unit: str, initial: int = 0, disable: bool = False,
                 every: float = 30.0, fraction: Callable[[], float] | None = None):
        """`fraction`: the share of the work done, where `total` does not tell it (a time budget)."""
        self.tty = sys.stderr.isatty()
        self.enabled = not disable
        self.total, self.desc, self.unit, self.every, self.fraction = total, desc, unit, every, fraction
        self.n = self.start_n = initial
        self.start = self.last = time.perf_counter()
        self.postfix: dict[str, str] = {}
        self.lines = 0
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                        disable=disable or not self.tty)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(summary=exc_type is None)  # work that failed (or was abandoned) reports itself

    def update(self, n: int = 1) -> None:
        self.n += n
        self.bar.update(n)
        if self.enabled and not self.tty and time.perf_counter() - self.last >= self.every:
            self._line()

    def set_postfix(self, **values: str) -> None:
        self.postfix = values
        self.bar.set_postfix(**values)

    def write(self, message: str) -> None:
        """A line of its own (between bar redraws on a terminal)."""
        if self.enabled:
            tqdm.write(message, file=sys.stderr) if self.tty else print(message, file=sys.stderr, flush=True)

    def close(self, summary: bool = True) -> None:
        """The closing line: for work that reported along the way or took a while (a quick job stays silent)."""
        took_a_while = self.lines or time.perf_counter() - self.start >= QUIET_UNDER_S
        if summary and self.enabled and not self.tty and self.n != self.start_n and took_a_while:
            self._line()
        self.bar.close()
        self.enabled = False

    def _line(self) -> None:
        now = time.perf_counter()
        self.last = now
        self.lines += 1
        elapsed = now - self.start
        done = self.fraction() if self.fraction else (self.n / self.total if self.total else None)
        text = f"{self.desc}: {self.n}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"
        if done:
            text += f" ({100 * done:.0f}%)"
        rate = (self.n - self.start_n) / elapsed if elapsed > 0 else 0.0
        text += f", {rate:.1f} {self.unit}/s, {_duration(elapsed)} elapsed"
        if done and 0 < done < 1:
            text += f", ETA {_duration(elapsed * (1 - done) / done)}"
        text += "".join(f", {k} {v}" for k, v in self.postfix.items())
        print(text, file=sys.stderr, flush=True)


def track(items: Iterable[T], total: int | None, desc: str, unit: str, disable: bool = False) -> Iterator[T]:
    """`items`, counted by a Progress."""
    with Progress(total, desc, unit, disable=disable) as bar:
        for item in items:
            yield item
            bar.update()
