"""Stop cleanly on SIGTERM, SIGINT and SIGUSR1 (cluster preemption).

The first signal asks the loop to finish the current step and save a checkpoint; then ``fit()`` raises
``KeyboardInterrupt`` for SIGINT (Ctrl-C: Python code can catch it, and ``cadence fit`` exits 130) and
``SystemExit(128 + signal number)`` for the others (SIGTERM 143, SIGUSR1 138). A second SIGINT stops at once.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, NoReturn

STOP_SIGNALS = tuple(s for s in (getattr(signal, n, None) for n in ("SIGTERM", "SIGINT", "SIGUSR1")) if s)


class StopSignals:
    """A context manager that records the first stop signal in ``received``."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without saving
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def active(self) -> bool:
        """Whether the handlers are installed (inside ``with``: during ``fit()``)."""
        return bool(self._previous)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received or 0)

    def raise_stop(self, message: str) -> NoReturn:
        """After the stop was handled: ``KeyboardInterrupt`` for SIGINT, else ``SystemExit(exit_code)``."""
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt(message)
        raise SystemExit(self.exit_code)
