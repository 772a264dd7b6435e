"""The outer loop of ``Trainer.fit()``, read like a hand-written one: resume (or seed), then
``while not done: step; maybe log; maybe validate; maybe save``, then the end of the run (the last records,
validation and checkpoint, the final weights). The step itself is :func:`cadence.step.train_step`."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from . import callbacks as cbs
from . import killpoints
from .checkpoint.snapshot import restore
from .checkpoint.store import find_resume
from .device import seed_everything
from .optim import set_rates
from .records import History
from .rundir import check_resume, notice, stop_message
from .runs import read_config
from .signals import StopSignals
from .step import train_step
from .validation import decide

if TYPE_CHECKING:
    from .trainer import Trainer


def run(t: Trainer) -> History:
    """The body of :meth:`Trainer.fit` (under the run folder's lock)."""
    start(t)
    on_epoch_start = cbs.bind(t.callbacks, "on_epoch_start")
    on_step_end = [*t._compiler.first_step_hooks(), *cbs.bind(t.callbacks, "on_step_end")]
    for hook in cbs.bind(t.callbacks, "on_fit_start"):
        hook(t)
    t.model.train()
    with StopSignals() as signals:
        t._signals = signals
        try:
            if t.val_at_start and t.step == 0 and t.val_data is not None:
                t.validate()  # the untrained model, logged at step 0; a resumed run is past it
            while not done(t):
                if not take_step(t, on_epoch_start, on_step_end):
                    continue  # a non-finite loss: skipped
                if t.step % t.log_every == 0 or t.step == 1:  # step 1: a log shows the run at once
                    log_train(t)
                best = False  # keep_best: this validation is the best so far, so its weights are saved now
                if t.validator.due(t.val_data, t.step, t.stream.end_of_epoch):
                    log_train(t)
                    best = decide(t, t.validate())
                periodic = bool(t.checkpoint_every) and t.step % t.checkpoint_every == 0
                if periodic or best:
                    t._save_checkpoint(None if periodic else "best")
            end_of_run(t, signals.received)
        finally:
            close(t)
    if signals.received is not None:
        t.stop_reason = f"signal {signals.received}"
        if t.is_main:
            notice(stop_message(t.step, t.run_dir, t.checkpoints is not None))
        signals.raise_stop(f"stopped by signal {signals.received} after step {t.step}"
                           + (" (checkpoint saved)" if t.checkpoints is not None else ""))
    if t.run_dir is not None:
        ema = t.ema.model if t.ema is not None else None
        t.strategy.save_final(t.model, t.run_dir / "final", ema)  # FSDP: gathered, a collective
        if killpoints.ACTIVE:
            killpoints.reached("end.final", t.step)
    for hook in cbs.bind(t.callbacks, "on_fit_end"):
        hook(t)
    return t.history


def take_step(t: Trainer, on_epoch_start: list[Callable], on_step_end: list[Callable]) -> bool:
    """One optimizer step and what follows it at every step (EMA, running means, ``on_step_end``); False
    when a non-finite loss skipped it."""
    if on_epoch_start and (t.stream.first.position == 0 or t.stream.end_of_epoch):
        for hook in on_epoch_start:
            hook(t)
    draws = t.stream.next_step()
    if killpoints.ACTIVE:
        killpoints.reached("step.begin", t.step + 1)
    if t.stage_plan is not None:
        t._sync_stage()
    set_rates(t.optimizer, t._base_lrs, t.schedule(t.step), t.lr)
    with t.records.throughput.measure(draws):  # tokens from the shapes; flops_per_item="count": the first step's
        result = train_step(t._parts, draws)
    if killpoints.ACTIVE:
        killpoints.reached("step.optimizer")
    if not result.stepped:
        nonfinite(t, result.loss)
        return False
    t.nonfinite_in_a_row = 0
    t.step += 1
    if t.ema is not None:
        t.ema.update(t.step)
    t.records.add_step(result.loss, result.parts, result.grad_norm, result.samples)
    for hook in on_step_end:
        hook(t)
    if t.profiler is not None:
        t.profiler.after_step(t.step)
    t.progress.update(t.step)
    if t.stream.end_of_epoch and t.stream.single:
        t.running.mark_epoch_end(t.step, t.stream.epoch)
    if killpoints.ACTIVE:
        killpoints.reached("step.end", t.step)
    return True


def end_of_run(t: Trainer, signal: int | None) -> None:
    """The last records, the last validation (unless a signal stopped the run) and checkpoint."""
    log_train(t)
    if signal is not None:
        t._emit({"step": t.step, "epoch": t.stream.epoch, "split": "train", "event": "stop",
                 "reason": f"signal {signal}"})
    if signal is None and t.val_data is not None and t._validated_at != t.step:
        t.validate()
    if killpoints.ACTIVE:
        killpoints.reached("end.validated", t.step)
    if t.checkpoints is not None:
        # rank 0 decides for all: only its records are counted (another rank's history is not restored on resume)
        unsaved = t.is_main and (t._saved_at, t._saved_records) != (t.step, len(t.history))
        if t.strategy.any(unsaved):
            t.save_checkpoint()  # the end of the run, with its last records
        t._saver.wait()
        if killpoints.ACTIVE:
            killpoints.reached("end.checkpoint", t.step)


def close(t: Trainer) -> None:
    if t._saver is not None:
        try:  # a save in flight finishes (or reports its error) before fit() returns or raises
            t._saver.wait()
        except Exception as err:
            t.progress.message(f"the last checkpoint could not be written: {err}")
    if t.profiler is not None:
        t.profiler.close()
    t.progress.close()
    t.stream.close()
    t.records.close()


def start(t: Trainer) -> None:
    """Resume or seed, open the loggers, start the clocks."""
    folder = None
    if t.resume is not None and not t._resumed:
        folder = find_resume(t.resume, t.checkpoints, keep=t.world_size == 1)
        check_resume(folder, t.resume, t.run_dir, t.max_steps, t.step, t.is_main)
        if killpoints.ACTIVE:
            killpoints.reached("resume.found", t.step)
    if folder is not None:
        restore(t, folder)
        t._resumed = True
        if killpoints.ACTIVE:
            killpoints.reached("resume.loaded", t.step)
        if t.is_main:
            if t.checkpoints is not None:  # a kill between a commit and its pruning left the old ones
                t.checkpoints.prune()
            notice(f"resumed at step {t.step} from {folder}")
    elif t.step == 0 and t.seed_at_fit:
        seed_everything(t.seed)
    if t.run_dir is not None and t.is_main:
        t.run_folder.start()  # claimed (and config.yaml written) only now that resuming succeeded
        config = read_config(t.run_dir) or {"trainer": t._arguments}  # cadence fit's config.yaml
        t.records.open(t.loggers, t.run_dir, config, t.step, t.records_at_checkpoint,
                       resumed=t.resume is not None)
    if killpoints.ACTIVE:
        killpoints.reached("started", t.step)
    t.records.start_clock()
    t.progress.start(t.step)


def nonfinite(t: Trainer, loss: torch.Tensor) -> None:
    t.nonfinite_in_a_row += 1
    t.nonfinite_total += 1
    where = f"step {t.step + 1} (epoch {t.stream.epoch})"
    if t.on_nonfinite == "raise" or t.nonfinite_in_a_row >= t.max_nonfinite:
        raise FloatingPointError(
            f"the loss is {float(loss)} at {where}"
            + (f", {t.nonfinite_in_a_row} steps in a row" if t.on_nonfinite == "skip" else "")
            + "; the weights were not updated. Lower lr, set max_grad_norm, check the data, or pass "
            "on_nonfinite='skip' to skip such steps.")
    t.progress.message(f"skipped {where}: non-finite loss ({t.nonfinite_total} so far)")
    t._emit({"step": t.step, "epoch": t.stream.epoch, "split": "train", "event": "nonfinite",
             "value": float(loss), "skipped_total": t.nonfinite_total})


def done(t: Trainer) -> bool:
    # a stop or a signal on any rank stops every rank at the same step (one process: the identity)
    stop, signum = t.strategy.max_values([float(t.should_stop), float(t._signals.received or 0)])
    t.should_stop = stop > 0
    if signum and signum != (t._signals.received or 0):
        t._signals.received = int(signum)
    if t.should_stop or t._signals.received is not None:
        return True
    if t.max_steps is not None and t.step >= t.max_steps:
        return True
    epochs_done = t.stream.epoch + (1 if t.stream.end_of_epoch else 0)
    return t.max_epochs is not None and epochs_done >= t.max_epochs


def log_train(t: Trainer) -> None:
    """Log the running means at a log point (one host transfer), after the summaries of epochs that ended."""
    for record in t.records.log_train(t.step, t.stream.epoch, t.optimizer.param_groups[0]["lr"],
                                      t.strategy.mean):
        t._emit(record)
        if record["split"] == "train":
            t.progress.logged(t.step, {"loss": record["loss"], "lr": record["lr"]})
            if killpoints.ACTIVE:
                killpoints.reached("log", t.step)
