"""Progress bars for nuq's long-running functions: tqdm when it is installed, else one plain line on
stderr (redrawn in place on a terminal, printed every 10% otherwise so that logs stay short).

Every such function takes ``progress``: True (the default) shows the bar, False shows nothing, and a
callable receives each event as a dict instead (it may raise to stop the work)."""
from __future__ import annotations

import importlib
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple, Union

ProgressEvent = Dict[str, Any]
ProgressArg = Union[bool, Callable[[ProgressEvent], object]]
# What an event means for a bar: (total, done, text shown after the bar).
BarStep = Tuple[int, int, str]


class _PlainBar:
    def __init__(self, desc: str, total: int, unit: str) -> None:
        self.desc, self.total, self.unit, self.n = desc, total, unit, 0
        self.postfix = ""
        self.tty = sys.stderr.isatty()
        self.start = time.monotonic()
        self.shown_tenths = -1
        self.drawn = False

    def update_to(self, n: int, postfix: str = "") -> None:
        self.n, self.postfix = n, postfix
        tenths = (10 * n // self.total) if self.total else 10
        if self.tty:
            sys.stderr.write("\r\033[K" + self.line())
            sys.stderr.flush()
            self.drawn = True
        elif tenths > self.shown_tenths:
            self.shown_tenths = tenths
            sys.stderr.write(self.line() + "\n")

    def line(self) -> str:
        elapsed = time.monotonic() - self.start
        pct = 100.0 * self.n / self.total if self.total else 100.0
        eta = elapsed / self.n * (self.total - self.n) if self.n else float("nan")
        text = f"{self.desc}: {pct:5.1f}% {self.n}/{self.total} {self.unit}  {elapsed:.0f}s"
        if self.n and self.n < self.total:
            text += f"  ETA {eta:.0f}s"
        return text + (f"  {self.postfix}" if self.postfix else "")

    def close(self) -> None:
        if self.tty and self.drawn:
            sys.stderr.write("\n")
            sys.stderr.flush()


class _TqdmBar:
    def __init__(self, desc: str, total: int, unit: str) -> None:
        # Imported by name: tqdm ships no type information, and nuq does not depend on it.
        tqdm = importlib.import_module("tqdm.auto").tqdm
        self.bar = tqdm(total=total, desc=desc, unit=unit, leave=True, dynamic_ncols=True)

    def update_to(self, n: int, postfix: str = "") -> None:
        if postfix:
            self.bar.set_postfix_str(postfix, refresh=False)  # drawn by the update below
        self.bar.update(n - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _new_bar(desc: str, total: int, unit: str) -> Union[_TqdmBar, _PlainBar]:
    try:
        return _TqdmBar(desc, total, unit)
    except ImportError:
        return _PlainBar(desc, total, unit)


Advance = Callable[[ProgressEvent], Optional[BarStep]]


class Reporter:
    """Turns the events of one call into a bar, or hands them to the caller's callable.

    ``advance(event)`` says what an event means for the bar: None (ignore it), or a tuple
    (total, done, postfix); the bar is created on the first such tuple. Use as a context manager so
    that the bar is closed however the call ends (KeyboardInterrupt included)."""

    def __init__(self, fn: str, progress: object, desc: str, unit: str, advance: Advance) -> None:
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"{fn}: progress must be callable, True or False, got {progress!r}")
        self.user: Optional[Callable[[ProgressEvent], object]] = None if isinstance(progress, bool) else progress
        self.show = progress is True
        self.desc, self.unit, self.advance = desc, unit, advance
        self.bar: Union[_TqdmBar, _PlainBar, None] = None

    def __call__(self, event: ProgressEvent) -> None:
        if self.user is not None:
            self.user(event)
            return
        if not self.show:
            return
        step = self.advance(event)
        if step is None:
            return
        total, done, postfix = step
        if self.bar is None:
            self.bar = _new_bar(self.desc, int(total), self.unit)
        self.bar.update_to(int(done), postfix)

    def __enter__(self) -> "Reporter":
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
