"""Progress for long work: a tqdm bar on a terminal, plain periodic lines everywhere else.

Without a terminal (CI, ``nohup``, a cluster log) tqdm's carriage-return refreshes turn into thousands of lines;
:class:`Progress` then prints one line every ``every`` items (or ``min_interval`` seconds) with the count, the
throughput and the ETA, and a last line when done::

    encode N24News: 512/1000 rows (51%), 83.2 rows/s, ETA 6s

``MMEMBED_PROGRESS=bar|lines|off`` forces a mode (``TQDM_DISABLE=1`` is ``off`` too).
"""

from __future__ import annotations

import os
import sys
import time
from typing import IO, Any

__all__ = ["Progress", "progress_mode", "format_eta"]


def progress_mode(stream: IO[str] | None = None) -> str:
    """``bar`` on a terminal, ``lines`` otherwise, unless ``MMEMBED_PROGRESS`` or ``TQDM_DISABLE`` say otherwise."""
    forced = os.environ.get("MMEMBED_PROGRESS", "").lower()
    if forced in ("bar", "lines", "off"):
        return forced
    if os.environ.get("TQDM_DISABLE", "") not in ("", "0", "false", "False"):
        return "off"
    stream = stream if stream is not None else sys.stderr
    return "bar" if getattr(stream, "isatty", lambda: False)() else "lines"


def format_eta(seconds: float) -> str:
    """``42s``, ``3m05s``, ``2h07m``."""
    if seconds != seconds or seconds == float("inf"):  # NaN / unknown
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class Progress:
    """Count work done and show it: ``with Progress(total, "encode", "rows") as p: ... p.update(n)``.

    Args:
        total: items expected (``None``: unknown, no ETA).
        desc: what is running, first on every line.
        unit: what is counted (``rows``, ``steps``, ``samples``).
        every: in ``lines`` mode, print after this many items (default: about 20 lines over ``total``).
        min_interval: in ``lines`` mode, also print when this many seconds passed since the last line.
        initial: items already done (a resumed run).
        enabled: ``False`` shows nothing (e.g. ranks other than 0).
        stream: where to write (default stderr).
    """

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        *,
        every: int | None = None,
        min_interval: float = 30.0,
        initial: int = 0,
        enabled: bool = True,
        stream: IO[str] | None = None,
        mode: str | None = None,
    ) -> None:
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.stream = stream if stream is not None else sys.stderr
        self.mode = "off" if not enabled else (mode or progress_mode(self.stream))
        self.every = every if every else max(1, (total or 0) // 20) if total else 100
        self.min_interval = min_interval
        self.start = time.perf_counter()
        self.initial = initial
        self.last_n, self.last_t = initial, self.start
        self.postfix = ""
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=self.stream)

    def rate(self) -> float:
        elapsed = time.perf_counter() - self.start
        return (self.n - self.initial) / elapsed if elapsed > 0 else 0.0

    def line(self) -> str:
        """The plain progress line as it stands now."""
        rate = self.rate()
        if self.total:
            done = f"{self.n}/{self.total} {self.unit} ({100 * self.n / self.total:.0f}%)"
            eta = format_eta((self.total - self.n) / rate) if rate > 0 else "?"
            tail = f", {rate:.1f} {self.unit}/s, ETA {eta}"
        else:
            done, tail = f"{self.n} {self.unit}", f", {rate:.1f} {self.unit}/s"
        return f"{self.desc}: {done}{tail}" + (f", {self.postfix}" if self.postfix else "")

    def set_postfix(self, text: str) -> None:
        """Extra fields shown after the count (``loss 0.41, lr 2.0e-04``)."""
        self.postfix = text
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.mode == "lines":
            now = time.perf_counter()
            if self.n - self.last_n >= self.every or now - self.last_t >= self.min_interval:
                self._print()

    def write(self, text: str) -> None:
        """A message that does not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.mode != "off":
            print(text, file=self.stream, flush=True)

    def _print(self) -> None:
        print(self.line(), file=self.stream, flush=True)
        self.last_n, self.last_t = self.n, time.perf_counter()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "lines" and self.n != self.last_n:
            self._print()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
