"""Validation, inside and outside ``fit()``: when it is due, measuring the model (its EMA copy, or both) over
the validation data or a test set, the records it gives, and what a validation in the loop decides (the plateau
schedule's rate, early stopping)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

from torch import nn

from . import callbacks as cbs
from . import killpoints
from .data.loading import eval_batches
from .data.valsets import measure_sources
from .errors import bad
from .evaluate import ValidationStopped, evaluate, stop_check
from .records import Metrics
from .step import StepParts
from .stopping import should_stop

if TYPE_CHECKING:
    from .trainer import Trainer


class Validator:
    """How the validation data is batched and measured: the step's model call, precision and loss reading,
    with the validation's own batch size, metrics and forward keywords."""

    def __init__(self, parts: StepParts, every: int | None, batch_size: int, metric_fns: Mapping[str, Callable],
                 forward_kwargs: Mapping[str, Any] | None, collate_fn: Any, num_workers: int,
                 pin_memory: bool, mean: bool = False) -> None:
        self.parts, self.every, self.batch_size, self.metric_fns = parts, every, batch_size, dict(metric_fns)
        self.mean = mean  # val_mean: with several validation sets, also their mean
        self.forward_kwargs = dict(forward_kwargs or {})
        self.collate_fn, self.num_workers, self.pin_memory = collate_fn, num_workers, pin_memory

    def due(self, val_data: Any, step: int, end_of_epoch: bool) -> bool:
        """Every ``val_every`` steps, else at each epoch end (never without validation data)."""
        if val_data is None:
            return False
        return step % self.every == 0 if self.every is not None else end_of_epoch

    def measure(self, model: nn.Module, data: Any, signals: Any) -> dict[str, dict[str, float]]:
        """The means of the loss, the parts and the metrics over ``data``, by source (``""``: the data itself, or
        with ``mean`` the sources' mean; data/valsets.py)."""
        return measure_sources(data, partial(self._evaluate, model, signals), self.mean)

    def _evaluate(self, model: nn.Module, signals: Any, data: Any) -> dict[str, float]:
        p, strategy = self.parts, self.parts.strategy
        batches = eval_batches(data, self.batch_size, self.collate_fn, self.num_workers, self.pin_memory,
                               strategy.rank, strategy.world_size)
        return evaluate(model, batches, p.precision, p.move, p.forward, self.metric_fns, p.inputs, p.loss_weights,
                        strategy.all_reduce, self.forward_kwargs, p.part_names, *stop_check(signals, strategy),
                        loss_index=p.loss_index)


def validate(trainer: Trainer, data: Any = None, split: str = "val") -> Metrics:
    """:meth:`Trainer.validate`: measure, log as ``<split>/...``, and (for the run's validation data) remember
    the result as the run's last validation."""
    if data is None and trainer.val_data is None:
        raise bad("val_data", None, "there is no validation data; pass val_data or valid_frac.")
    for hook in cbs.bind(trainer.callbacks, "on_validation_start"):
        hook(trainer)
    # (name, the EMA copy?): the module the step calls (wrapped, compiled), or the EMA's
    targets = {"model": [(split, False)], "ema": [(split, True)],
               "both": [(split, False), (f"{split}_ema", True)]}[trainer.validate_on]
    result = Metrics()
    result.split = split
    with trainer.records.outside_fit(trainer.run_dir if trainer.is_main else None):
        try:  # every pass first, then the records: a stop signal mid-way discards them all
            measured = [(name, trainer.validator.measure(trainer.ema.model if ema else trainer._parts.model,
                                                         trainer.val_data if data is None else data,
                                                         trainer._signals))
                        for name, ema in targets]
        except ValidationStopped:
            trainer.model.train()
            return result  # empty: nothing logged, and the loop stops at its next check
        for name, by_source in measured:
            for source, means in by_source.items():  # several validation sets: a record of its own each
                where = f"{name}/{source}" if source else name
                result.update({f"{where}/{k}": v for k, v in means.items()})
                trainer._emit({"step": trainer.step, "epoch": trainer.stream.epoch, "split": where,
                               "loss": means.pop("loss"), "parts": means})
    if killpoints.ACTIVE:
        killpoints.reached("val.end", trainer.step)
    trainer.model.train()
    if data is None:
        trainer._validated_at = trainer.step
        trainer.last_val_metrics = dict(result)
        if trainer.checkpoints is not None:
            trainer.checkpoints.check_best(result)
    trainer.progress.logged(trainer.step, {k.replace("/", "_"): v for k, v in result.items()})
    for hook in cbs.bind(trainer.callbacks, "on_validation_end"):
        hook(trainer, result)
    return result


def decide(trainer: Trainer, metrics: dict[str, float]) -> bool:
    """What a validation in the loop decides: the plateau schedule's rate (after warm-up), early stopping, and
    whether ``keep_best`` must save these weights (True: the best value of its metric so far)."""
    if not metrics:  # a validation that a stop signal cut short decides nothing
        return False
    plateau = trainer.schedule.plateau
    if plateau is not None and trainer.step >= trainer.schedule.warmup_steps and plateau.observe(metrics, trainer.lr):
        trainer.progress.message(f"step {trainer.step}: {plateau.monitor} on a plateau, lr -> {plateau.lr:.3g}")
    reason = should_stop(trainer.early_stopping, metrics, trainer.stop_when)
    if reason is not None:
        trainer.should_stop, trainer.stop_reason = True, reason
        trainer.progress.message(f"step {trainer.step}: {reason}")
        trainer._emit({"step": trainer.step, "epoch": trainer.stream.epoch, "split": "train", "event": "stop",
                       "reason": reason})
    return trainer.checkpoints is not None and trainer.checkpoints.improves(metrics, trainer.step)
