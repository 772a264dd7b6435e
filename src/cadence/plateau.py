"""``schedule="plateau"``: lower the rate when a validation metric stops improving.

The one schedule with state: it follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` rule for rule, one of
its steps per validation that ``fit()`` runs, so the rates are the same as a hand-written loop that calls
``scheduler.step(val_metric)`` after each validation. Its state (the rate, the best value, the counters) is
saved in every checkpoint, so a resume continues it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .errors import bad


class Plateau:
    """Options of ``schedule="plateau"`` (the defaults are ``ReduceLROnPlateau``'s), and its running state.

    After ``patience`` validations in a row without an improvement of ``monitor`` (better than the best by
    more than ``threshold``: relative with ``threshold_mode="rel"``, absolute with ``"abs"``), the rate is
    multiplied by ``factor``, never below ``min_lr`` (a change smaller than ``eps`` is skipped); then
    ``cooldown`` validations are not counted.
    """

    def __init__(self, monitor: str = "val/loss", mode: str = "min", factor: float = 0.1, patience: int = 10,
                 threshold: float = 1e-4, threshold_mode: str = "rel", cooldown: int = 0, min_lr: float = 0.0,
                 eps: float = 1e-8) -> None:
        if mode not in ("min", "max"):
            raise bad("Plateau mode", mode, 'use "min" (lower is better) or "max".')
        if threshold_mode not in ("rel", "abs"):
            raise bad("Plateau threshold_mode", threshold_mode, 'use "rel" (relative) or "abs" (absolute).')
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0.0 <= factor < 1.0:
            raise bad("Plateau factor", factor, "use a factor in [0, 1), e.g. 0.1 or 0.25.")
        for name, value in (("patience", patience), ("cooldown", cooldown)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise bad(f"Plateau {name}", value, "use 0 or a positive number of validations.")
        for name, value in (("threshold", threshold), ("min_lr", min_lr), ("eps", eps)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise bad(f"Plateau {name}", value, "use 0 or a positive number.")
        self.monitor, self.mode, self.factor, self.patience = monitor, mode, float(factor), patience
        self.threshold, self.threshold_mode, self.cooldown = float(threshold), threshold_mode, cooldown
        self.min_lr, self.eps = float(min_lr), float(eps)
        self.lr: float | None = None  # the current rate; None until the first reduction: the base rate
        self.best: float | None = None  # None: nothing seen yet (ReduceLROnPlateau's +-inf)
        self.bad_validations = 0
        self.cooldown_left = 0

    def __repr__(self) -> str:
        return (f"Plateau(monitor={self.monitor!r}, mode={self.mode!r}, factor={self.factor}, "
                f"patience={self.patience}, threshold={self.threshold}, threshold_mode={self.threshold_mode!r}, "
                f"cooldown={self.cooldown}, min_lr={self.min_lr}, eps={self.eps})")

    def rate(self, base_lr: float) -> float:
        """The rate now: ``base_lr`` until the first reduction."""
        return base_lr if self.lr is None else self.lr

    def improved(self, value: float) -> bool:
        """Better than the best by more than the threshold (ReduceLROnPlateau's comparison, float for float)."""
        best = self.best if self.best is not None else (math.inf if self.mode == "min" else -math.inf)
        if self.mode == "min":
            return value < (best * (1.0 - self.threshold) if self.threshold_mode == "rel" else best - self.threshold)
        return value > (best * (self.threshold + 1.0) if self.threshold_mode == "rel" else best + self.threshold)

    def observe(self, metrics: Mapping[str, float], base_lr: float) -> bool:
        """One validation's metrics (``ReduceLROnPlateau.step``); True when the rate was lowered."""
        if self.monitor not in metrics:
            raise bad("Plateau monitor", self.monitor,
                      f"it is never logged; the logged names are {', '.join(sorted(metrics))}.")
        value = float(metrics[self.monitor])
        if self.improved(value):
            self.best, self.bad_validations = value, 0
        else:
            self.bad_validations += 1
        if self.cooldown_left > 0:
            self.cooldown_left -= 1
            self.bad_validations = 0  # validations in cooldown do not count
        if self.bad_validations <= self.patience:
            return False
        self.cooldown_left, self.bad_validations = self.cooldown, 0
        old = self.rate(base_lr)
        new = max(old * self.factor, self.min_lr)
        if old - new > self.eps:
            self.lr = new
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "best": self.best, "bad_validations": self.bad_validations,
                "cooldown_left": self.cooldown_left}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.lr, self.best = state["lr"], state["best"]
        self.bad_validations, self.cooldown_left = int(state["bad_validations"]), int(state["cooldown_left"])
