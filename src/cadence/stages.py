"""Staged training (STEP's ``init_optimizer(stage, tune_lr)``): each stage sets what trains and at what rate.

``stages=[Stage(steps=500, trainable=["encoder.*"]), Stage(epochs=2, lr=1e-4, param_groups={...})]`` run in
order; without ``max_steps`` their sum is the run's length. Which stage a step belongs to is a pure function of
the step, so a resumed run enters the right stage by itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Any

from torch import nn

from .errors import bad
from .optim import check_globs, options_for
from .weights import strip_compiled


@dataclass(frozen=True)
class Stage:
    """One stage: its length (``steps`` or ``epochs``), the parameters that train (globs; None: all), its
    peak ``lr`` (None: the Trainer's) and ``param_groups`` overrides by glob."""

    steps: int | None = None
    epochs: int | None = None
    trainable: Sequence[str] | None = None
    lr: float | None = None
    param_groups: Mapping[str, Mapping[str, Any]] | None = None


class StagePlan:
    """Where each stage starts, in optimizer steps."""

    def __init__(self, stages: Sequence[Stage], steps_per_epoch: int | None, model: nn.Module,
                 param_groups: Mapping[str, Mapping[str, Any]] | None = None) -> None:
        self.stages = list(stages)
        self.ends: list[int] = []
        total = 0
        for i, stage in enumerate(self.stages):
            if not isinstance(stage, Stage):
                raise bad(f"stages[{i}]", stage, "give cadence.Stage(steps=... or epochs=..., trainable=..., lr=...).")
            if isinstance(stage.trainable, str):
                raise bad(f"stages[{i}].trainable", stage.trainable, "give a list of globs, e.g. ['head.*'].")
            if (stage.steps is None) == (stage.epochs is None):
                raise bad(f"stages[{i}]", stage, "give exactly one of steps or epochs.")
            if stage.epochs is not None and steps_per_epoch is None:
                raise bad(f"stages[{i}].epochs", stage.epochs, "the data has no known length; give steps instead.")
            length = stage.steps if stage.steps is not None else stage.epochs * steps_per_epoch
            if length <= 0:
                raise bad(f"stages[{i}]", stage, "a stage must last at least one step.")
            if stage.lr is not None and stage.lr <= 0:
                raise bad(f"stages[{i}].lr", stage.lr, "use a positive learning rate.")
            check_globs(model, stage.trainable or (), f"stages[{i}].trainable")
            overrides = {**dict(param_groups or {}), **dict(stage.param_groups or {})}
            check_globs(model, stage.param_groups or (), f"stages[{i}].param_groups")
            for name, _ in model.named_parameters():  # disagreeing globs are refused now, not mid-run
                options_for(strip_compiled(name), overrides)
            total += length
            self.ends.append(total)
        self.total = total
        self._initial = {name: p.requires_grad for name, p in model.named_parameters()}

    def index_at(self, step: int) -> int:
        """The stage that optimizer step ``step`` (0-based) belongs to."""
        for i, end in enumerate(self.ends):
            if step < end:
                return i
        return len(self.ends) - 1

    def apply_trainable(self, model: nn.Module, index: int) -> None:
        """Set ``requires_grad`` for stage ``index``: its globs train, the rest are frozen."""
        globs = self.stages[index].trainable
        for name, p in model.named_parameters():
            clean = strip_compiled(name)
            p.requires_grad_(self._initial[name] if globs is None else any(fnmatch(clean, g) for g in globs))
