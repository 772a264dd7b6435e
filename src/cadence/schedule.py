"""Learning-rate schedules as pure functions of the optimizer step.

A schedule never holds state: the rate of step ``s`` (0-based, the step about to be taken) is computed from
``s`` alone, so resuming from a checkpoint needs nothing but the step number. The one exception is
``"plateau"`` (:mod:`cadence.plateau`), which follows the validations; its state is in every checkpoint.

- warm-up: for ``s < warmup_steps`` the rate rises linearly from ``warmup_start_lr`` (at ``s = 0``) towards
  ``lr`` (reached at ``s = warmup_steps``);
- then, with ``p = min((s - warmup_steps) / (decay_steps - warmup_steps), 1)`` (``decay_steps``: default
  ``max_steps``; as nanoGPT's ``lr_decay_iters``, the rate stays at ``min_lr`` after it):
  ``"constant"``: ``lr``; ``"linear"``: ``lr + (min_lr - lr) * p``;
  ``"cosine"``: ``min_lr + (lr - min_lr) * (1 + cos(pi * p)) / 2``;
  ``"multistep"``: ``lr * gamma ** (number of milestones <= s)``; ``"exponential"``: ``lr * gamma ** s``;
  a callable ``f``: ``lr * f(s)``; ``"plateau"``: the rate the :class:`~cadence.plateau.Plateau` holds.
- with ``unit="epoch"``, ``"multistep"``, ``"exponential"`` and a callable take the epoch ``s // steps_per_epoch``
  instead of ``s`` (milestones count epochs): torch's ``MultiStepLR``/``StepLR``/``ExponentialLR``/``LambdaLR``
  stepped once per epoch. Warm-up still counts steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import bad
from .plateau import Plateau

SCHEDULES = ("constant", "linear", "cosine", "multistep", "exponential", "plateau")
UNITS = ("step", "epoch")


def check_warmup(warmup_steps: int, max_steps: int | None) -> None:
    """The one rule for ``warmup_steps``: a whole number of steps >= 0, no longer than the run when its length
    ``max_steps`` is known (given, or counted from ``max_epochs`` or the stages)."""
    if not isinstance(warmup_steps, int) or warmup_steps < 0:
        raise bad("warmup_steps", warmup_steps, "use 0 (no warm-up) or a positive number of steps.")
    if max_steps is not None and warmup_steps > max_steps:
        raise bad("warmup_steps", warmup_steps, f"the run is only {max_steps} steps long (max_steps={max_steps}); "
                  "lower warmup_steps or lengthen the run.")


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
    unit: str = "step"
    steps_per_epoch: int | None = None
    plateau: Plateau | None = None
    decay_steps: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.name) and self.name not in SCHEDULES:
            raise bad("schedule", self.name, f"use one of {', '.join(SCHEDULES)}, or a callable step -> factor.")
        check_warmup(self.warmup_steps, self.max_steps)
        self._check_decay_steps()
        if self.name in ("linear", "cosine") and self.max_steps is None and self.decay_steps is None:
            raise bad("schedule", self.name, "a decaying schedule needs to know the run's length; set max_steps or "
                      "max_epochs, or the steps it decays over with decay_steps.")
        if self.min_lr < 0:
            raise bad("min_lr", self.min_lr, "use a rate >= 0.")
        if self.name == "multistep" and not self.milestones:
            raise bad("milestones", self.milestones, "schedule='multistep' needs at least one milestone step.")
        if list(self.milestones) != sorted(self.milestones):
            raise bad("milestones", self.milestones, "list the milestone steps in increasing order.")
        self._check_unit_and_plateau()

    def _check_decay_steps(self) -> None:
        if self.decay_steps is None:
            return
        if not isinstance(self.decay_steps, int) or isinstance(self.decay_steps, bool) or self.decay_steps < 1:
            raise bad("decay_steps", self.decay_steps, "use a positive number of steps (the step at which the rate "
                      "reaches min_lr), or None for max_steps.")
        if self.name not in ("linear", "cosine"):
            raise bad("decay_steps", self.decay_steps, f"it sets how long 'linear' and 'cosine' decay, and "
                      f"schedule={self.name!r}; pass schedule='cosine' or 'linear', or leave decay_steps out.")
        if self.decay_steps < self.warmup_steps:
            raise bad("decay_steps", self.decay_steps, f"the decay would end before the warm-up does (warmup_steps="
                      f"{self.warmup_steps}); use decay_steps >= warmup_steps.")

    def _check_unit_and_plateau(self) -> None:
        if self.unit not in UNITS:
            raise bad("schedule_unit", self.unit, 'use "step" (the default) or "epoch".')
        if self.unit == "epoch" and (self.name in ("constant", "linear", "cosine", "plateau")):
            raise bad("schedule_unit", self.unit, f"schedule={self.name!r} does not count epochs; per-epoch "
                      "units apply to multistep, exponential and a callable; leave schedule_unit='step'.")
        if self.unit == "epoch" and not self.steps_per_epoch:
            raise bad("schedule_unit", self.unit, "the training data has no known epoch length (an iterable "
                      "without len(), or several sources); use schedule_unit='step'.")
        if self.plateau is not None and self.name != "plateau":
            raise bad("plateau", self.plateau, f"it configures schedule='plateau', and schedule={self.name!r}; "
                      "pass schedule='plateau' too, or leave plateau out.")
        if self.name == "plateau" and self.plateau is None:
            object.__setattr__(self, "plateau", Plateau())  # ReduceLROnPlateau's defaults

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup_steps:
            return self.warmup_start_lr + (self.lr - self.warmup_start_lr) * step / self.warmup_steps
        at = step // self.steps_per_epoch if self.unit == "epoch" else step
        if callable(self.name):
            return self.lr * float(self.name(at))
        if self.name == "constant":
            return self.lr
        if self.name == "plateau":
            return self.plateau.rate(self.lr)
        if self.name == "multistep":
            passed = sum(1 for m in self.milestones if m <= at)
            return self.lr * self.gamma**passed
        if self.name == "exponential":
            return self.lr * self.gamma**at
        end = self.decay_steps if self.decay_steps is not None else self.max_steps
        span = max(end - self.warmup_steps, 1)
        p = min((step - self.warmup_steps) / span, 1.0)
        if self.name == "linear":
            return self.lr + (self.min_lr - self.lr) * p
        return self.min_lr + (self.lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))
