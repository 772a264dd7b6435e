"""Early stopping on any logged validation metric, one stopper per metric (as STEP keeps per loss)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import bad


class EarlyStopping:
    """Stop when ``monitor`` has not improved by more than ``min_delta`` for ``patience`` validations.

    ``monitor`` is a logged name such as ``"val/loss"`` or ``"val/recon"``; ``mode`` is ``"min"`` or ``"max"``.
    """

    def __init__(self, monitor: str = "val/loss", patience: int = 3, min_delta: float = 0.0,
                 mode: str = "min") -> None:
        if mode not in ("min", "max"):
            raise bad("EarlyStopping mode", mode, 'use "min" (lower is better) or "max".')
        if not isinstance(patience, int) or patience < 1:
            raise bad("EarlyStopping patience", patience, "use a positive number of validations, e.g. 3.")
        if min_delta < 0:
            raise bad("EarlyStopping min_delta", min_delta, "use 0 or a positive improvement threshold.")
        self.monitor, self.patience, self.min_delta, self.mode = monitor, patience, float(min_delta), mode
        self.best: float | None = None
        self.bad_validations = 0

    @property
    def triggered(self) -> bool:
        return self.bad_validations >= self.patience

    def observe(self, metrics: Mapping[str, float]) -> bool:
        """Take one validation's metrics; True when this stopper now asks to stop."""
        if self.monitor not in metrics:
            raise bad("EarlyStopping monitor", self.monitor,
                      f"it is never logged; the logged names are {', '.join(sorted(metrics))}.")
        value = float(metrics[self.monitor])
        better = self.best is None or (
            value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta)
        if better and not math.isnan(value):
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        return self.triggered

    def reason(self) -> str:
        return (f"{self.monitor} did not improve by more than {self.min_delta:g} for {self.patience} "
                f"validations (best {self.best:.6g})")

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad_validations": self.bad_validations}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.best, self.bad_validations = state["best"], int(state["bad_validations"])


def should_stop(stoppers: Sequence[EarlyStopping], metrics: Mapping[str, float], stop_when: str) -> str | None:
    """Feed a validation to every stopper; the reason to stop, or None."""
    if not stoppers:
        return None
    fired = [s.observe(metrics) for s in stoppers]
    if (stop_when == "any" and any(fired)) or (stop_when == "all" and all(fired)):
        return "early stopping: " + "; ".join(s.reason() for s, f in zip(stoppers, fired) if f)
    return None
