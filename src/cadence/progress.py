"""A progress bar for a terminal, plain lines elsewhere.

On a terminal one line is redrawn at most ten times a second: ``step/total``, the last logged loss, it/s and
ETA. The loss changes only at log points, so the bar never reads a device value. When the stream is not a
terminal, one plain line is printed per log point instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    def __init__(self, total: int | None, enabled: bool = True, stream: TextIO | None = None) -> None:
        self.total = total
        self.stream = stream or sys.stdout
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.loss: float | None = None
        self._start = self._last_draw = time.perf_counter()
        self._start_step = 0
        self._step = 0

    def start(self, step: int) -> None:
        self._start = self._last_draw = time.perf_counter()
        self._start_step = self._step = step

    def update(self, step: int) -> None:
        self._step = step
        if self.tty:
            now = time.perf_counter()
            if now - self._last_draw >= 0.1:
                self._last_draw = now
                self.stream.write("\r" + self._line(now))
                self.stream.flush()

    def logged(self, step: int, values: dict[str, float]) -> None:
        """A log point: remember the loss, and print a plain line when not drawing a bar."""
        self._step = step
        self.loss = values.get("loss", self.loss)
        if self.enabled and not self.tty:
            extra = " ".join(f"{k}={v:.4g}" for k, v in values.items() if k != "loss")
            self.stream.write(self._line(time.perf_counter()) + (f" {extra}" if extra else "") + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        if self.enabled:
            self.stream.write(("\r\033[K" if self.tty else "") + text + "\n")
            self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line(time.perf_counter()) + "\n")
            self.stream.flush()

    def _line(self, now: float) -> str:
        done = self._step - self._start_step
        rate = done / max(now - self._start, 1e-9)
        total = f"/{self.total}" if self.total else ""
        loss = f" loss={self.loss:.4f}" if self.loss is not None else ""
        eta = ""
        if self.total and rate > 0:
            eta = f" eta={_clock((self.total - self._step) / rate)}"
        return f"step {self._step}{total}{loss} {rate:.1f} it/s{eta}"
