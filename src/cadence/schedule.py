"""Learning-rate schedules as pure functions of the optimizer step.

A schedule never holds state: the rate of step ``s`` (0-based, the step about to be taken) is computed from
``s`` alone, so resuming from a checkpoint needs nothing but the step number.

- warm-up: for ``s < warmup_steps`` the rate rises linearly from ``warmup_start_lr`` (at ``s = 0``) towards
  ``lr`` (reached at ``s = warmup_steps``);
- then, with ``p = (s - warmup_steps) / (max_steps - warmup_steps)``:
  ``"constant"``: ``lr``; ``"linear"``: ``lr + (min_lr - lr) * p``;
  ``"cosine"``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``;
  ``"multistep"``: ``lr * gamma ** (number of milestones <= s)``;
  a callable ``f``: ``lr * f(s)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import bad

SCHEDULES = ("constant", "linear", "cosine", "multistep")


@dataclass(frozen=True)
class Schedule:
    """The rate of every step for one base learning rate ``lr``."""

    lr: float
    name: str | Callable[[int], float] = "constant"
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    max_steps: int | None = None
    min_lr: float = 0.0
    milestones: Sequence[int] = ()
    gamma: float = 0.1

    def __post_init__(self) -> None:
        if not callable(self.name) and self.name not in SCHEDULES:
            raise bad("schedule", self.name, f"use one of {', '.join(SCHEDULES)}, or a callable step -> factor.")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", self.warmup_steps, "use 0 (no warm-up) or a positive number of steps.")
        if self.max_steps is not None and self.warmup_steps > self.max_steps:
            raise bad("warmup_steps", self.warmup_steps,
                      f"it is longer than max_steps={self.max_steps}; lower warmup_steps or raise max_steps.")
        if self.name in ("linear", "cosine") and self.max_steps is None:
            raise bad("schedule", self.name,
                      "a decaying schedule needs to know the run's length; set max_steps or max_epochs.")
        if self.min_lr < 0:
            raise bad("min_lr", self.min_lr, "use a rate >= 0.")
        if self.name == "multistep" and not self.milestones:
            raise bad("milestones", self.milestones, "schedule='multistep' needs at least one milestone step.")
        if list(self.milestones) != sorted(self.milestones):
            raise bad("milestones", self.milestones, "list the milestone steps in increasing order.")

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * step / self.warmup_steps
        if callable(self.name):
            return self.lr * float(self.name(step))
        if self.name == "constant":
            return self.lr
        if self.name == "multistep":
            passed = sum(1 for m in self.milestones if m <= step)
            return self.lr * self.gamma**passed
        span = max(self.max_steps - self.warmup_steps, 1)
        p = min((step - self.warmup_steps) / span, 1.0)
        if self.name == "linear":
            return self.lr + (self.min_lr - self.lr) * p
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
