"""Building a ``Trainer``'s parts from its (already checked) arguments, in order: the backend (device, process
group, strategy), the data, the training (schedule, step parts, the optimizer of the first stage, validation,
EMA, stoppers), the run (folder, loggers, checkpoints, records). ``sync_stage`` builds the optimizer again when a
stage begins."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING

from .checkpoint import Checkpoints
from .checkpoint.saver import Saver
from .compiling import Compiler, check_compiler
from .data.build import DataSettings, prepare
from .data.identity import order_arguments
from .data.valsets import check_watched
from .device import mover, resolve_device
from .distributed import init_distributed, make_strategy
from .distributed.env import read_env
from .errors import bad
from .extra_state import stateful_datasets
from .loggers.build import check_loggers
from .optim import build_optimizer, carry_state, trained_params
from .precision import Precision
from .profiling import StepProfiler
from .progress import Progress
from .records import Records
from .rundir import RunFolder, notice
from .schedule import Schedule
from .signals import StopSignals
from .stages import StagePlan
from .step import StepParts
from .throughput import Throughput, check_throughput
from .validation import Validator

if TYPE_CHECKING:
    from .trainer import Trainer


def build_backend(t: Trainer, a: SimpleNamespace) -> None:
    """The device, the process group and the strategy; the precision; the model on its device."""
    t.device = resolve_device(a.device, read_env().local_device)
    t.env = init_distributed(t.device)
    t.strategy = make_strategy(a.strategy, t.env, t.device, a.find_unused_parameters)
    t.strategy.check(vars(a))
    t.is_main, t.world_size, t.rank = t.env.is_main, t.env.world_size, t.env.rank
    t.precision = Precision(a.precision, t.device)
    t.model = a.model.to(t.device)


def build_data(t: Trainer, a: SimpleNamespace) -> None:
    """The step stream and the validation data (the data order contract), the run's length."""
    t.batch_size, t.grad_accum, t.seed, t.seed_at_fit = a.batch_size, a.grad_accum, a.seed, a.seed_at_fit
    t.collate_fn, t.num_workers = a.collate_fn, a.num_workers
    settings = DataSettings(batch_size=a.batch_size, grad_accum=a.grad_accum, seed=a.seed, shuffle=a.shuffle,
                            drop_last=a.drop_last, collate_fn=a.collate_fn, num_workers=a.num_workers,
                            pin_memory=t.device.type == "cuda", sampler=a.sampler, balance_by=a.balance_by,
                            world_size=t.world_size, rank=t.rank, item_seeding=a.item_seeding)
    options = dict(valid_frac=a.valid_frac, split_by=a.split_by, split_seed=a.split_seed, mix=a.mix,
                   source_weights=a.source_weights, split_mode=a.split_mode, val_indices=a.val_indices)
    data = prepare(a.train_data, a.val_data, settings, **options)
    t._data_inputs = (a.train_data, a.val_data, settings, options)  # regroup() prepares the stream again
    t.stream, t.val_data, t.data_length = data.stream, data.val_data, data.length
    t._datasets = stateful_datasets(a.train_data)
    t._order_arguments = order_arguments(vars(a))  # checked against a checkpoint's on resume
    t.steps_per_epoch = t.stream.steps_per_epoch
    if a.max_epochs is not None and not t.stream.single:
        raise bad("max_epochs", a.max_epochs, "with several training sources an epoch is not defined; use "
                  "max_steps.")
    t.stage_plan = StagePlan(a.stages, t.steps_per_epoch, a.model, a.param_groups) if a.stages else None
    t.max_epochs = a.max_epochs
    t.max_steps = total_steps(a.max_steps, a.max_epochs, t.steps_per_epoch, t.stage_plan)


def regroup(t: Trainer, grad_accum: int) -> None:
    """The step stream again with another ``grad_accum`` (a resume at another world size keeps the global batch
    by it): the same items per step, split anew among this rank's micro-batches."""
    train_data, val_data, settings, options = t._data_inputs
    settings = replace(settings, grad_accum=grad_accum)
    t.stream.close()
    t.stream = prepare(train_data, val_data, settings, **options).stream
    t._data_inputs = (train_data, val_data, settings, options)
    t.grad_accum = grad_accum


def build_training(t: Trainer, a: SimpleNamespace) -> None:
    """The schedule, the step's parts and the first stage's optimizer, validation, the EMA and stoppers."""
    t.schedule = Schedule(a.lr, a.schedule, a.warmup_steps, a.warmup_start_lr, t.max_steps, a.min_lr,
                          tuple(a.milestones), a.gamma, a.schedule_unit, t.steps_per_epoch, a.plateau, a.decay_steps)
    t.lr, t.weight_decay, t._optimizer_spec = a.lr, a.weight_decay, a.optimizer
    t._optimizer_options, t._param_overrides = dict(a.optimizer_options or {}), dict(a.param_groups or {})
    if a.fused is not None:
        t._optimizer_options["fused"] = a.fused
    t.optimizer = None
    t.stage_index = None
    t.step = 0
    t._parts = StepParts(
        a.model, None, t.precision, [], a.max_grad_norm, a.forward, mover(t.device), t.strategy,
        check_finite=a.on_nonfinite == "skip" or t.device.type == "cpu",
        inputs=tuple(a.inputs or getattr(a.train_data, "inputs", None) or ()) or None,
        loss_weights=dict(a.loss_weights) if a.loss_weights else None,
        forward_kwargs=dict(a.forward_kwargs or {}), clip_per_group=a.clip_per_group,
        part_names=tuple(a.part_names) if a.part_names is not None else None, loss_index=a.loss_index)
    check_compiler(a.compile, a.compile_options or {}, t.device)
    t._compiler = Compiler(a.compile, a.compile_options, lambda text: say(t, text))
    t._sync_stage()
    t.on_nonfinite, t.max_nonfinite = a.on_nonfinite, a.max_nonfinite
    t.nonfinite_in_a_row = t.nonfinite_total = 0
    t.val_every, t.val_at_start = a.val_every, a.val_at_start
    t.val_batch_size, t.forward, t.metric_fns = a.val_batch_size or a.batch_size, a.forward, dict(a.metrics or {})
    # None: the validation calls take the training's forward_kwargs
    t._val_forward_kwargs = dict((a.forward_kwargs if a.val_forward_kwargs is None else a.val_forward_kwargs) or {})
    t.validator = Validator(t._parts, a.val_every, t.val_batch_size, t.metric_fns,
                            t._val_forward_kwargs, a.collate_fn, a.num_workers, t.device.type == "cuda", a.val_mean)
    plateau = t.schedule.plateau
    check_watched(t.val_data, a.val_mean, [*([("keep_best", a.keep_best[0])] if a.keep_best else []),
                                           *(("EarlyStopping monitor", s.monitor) for s in a.early_stopping),
                                           *([("Plateau monitor", plateau.monitor)] if plateau is not None else [])])
    t.ema, t.validate_on = a.ema, a.validate_on
    if a.ema is not None:
        a.ema.attach(t.model)  # after the strategy wrapped the model (DDP broadcasts rank 0's weights)
    t.early_stopping, t.stop_when = list(a.early_stopping), a.stop_when


def build_run(t: Trainer, a: SimpleNamespace) -> None:
    """The run folder, loggers, checkpoints and their writer; the callbacks, progress and records."""
    t.log_every, t.checkpoint_every = a.log_every, a.checkpoint_every
    check_throughput(a.tokens_per_item, a.flops_per_item, a.peak_flops)
    t.run_dir = Path(a.run_dir) if a.run_dir is not None else None
    t.loggers = check_loggers(a.loggers, has_run_dir=t.run_dir is not None)
    t.profiler = StepProfiler(tuple(a.profile), t.run_dir / "profile") if a.profile is not None else None
    t.resume, t.new_global_batch = a.resume, a.new_global_batch
    t.run_folder = RunFolder(t.run_dir, a.overwrite, a.resume, t.is_main) if t.run_dir else None
    t.checkpoints = Checkpoints(t.run_dir / "checkpoints", a.keep_last, a.keep_best) if t.run_dir else None
    t._saver = Saver(t.checkpoints, t.strategy, a.async_checkpoint) if t.checkpoints else None
    t.callbacks = list(a.callbacks)
    t.progress = Progress(t.max_steps, enabled=a.progress and t.is_main)
    t.should_stop = False
    t.stop_reason = None
    t.records = Records(Throughput(a.tokens_per_item, a.flops_per_item, a.peak_flops))
    t.history, t.running = t.records.history, t.records.running
    t.last_val_metrics = {}
    t._signals = StopSignals()
    t._resumed = False
    t._validated_at = None
    t.records_at_checkpoint = None
    t._saved_at = None
    t._saved_records = None


def say(t: Trainer, text: str) -> None:
    """A line for the user: among the progress lines, or (progress=False) on stderr; the main process only."""
    if t.progress.enabled:
        t.progress.message(text)
    elif t.is_main:
        notice(text)


def total_steps(max_steps: int | None, max_epochs: int | None, steps_per_epoch: int | None,
                stage_plan: StagePlan | None) -> int | None:
    """The run's length: the first limit reached of max_steps, max_epochs and the stages' total."""
    limits = [max_steps]
    if max_epochs is not None and steps_per_epoch is not None:
        limits.append(max_epochs * steps_per_epoch)
    if stage_plan is not None:
        limits.append(stage_plan.total)
    limits = [x for x in limits if x is not None]
    return min(limits) if limits else None


def sync_stage(t: Trainer, step: int | None = None) -> None:
    """Build the optimizer for the stage of ``step`` (default: the next one), once or when a stage begins."""
    index = t.stage_plan.index_at(t.step if step is None else step) if t.stage_plan is not None else 0
    if index == t.stage_index:
        return
    lr, overrides = t.lr, t._param_overrides
    if t.stage_plan is not None:
        stage = t.stage_plan.stages[index]
        t.stage_plan.apply_trainable(t.model, index)
        lr = stage.lr if stage.lr is not None else lr
        overrides = {**overrides, **dict(stage.param_groups or {})}
    t._parts.model = t.strategy.wrap(t.model)  # DDP registers the parameters that train: wrap after
    old = t.optimizer
    t.optimizer = build_optimizer(t._optimizer_spec, t.model, lr, t.weight_decay, t.device,
                                  overrides, t._optimizer_options)
    if old is not None:
        carry_state(old, t.optimizer)
    t.stage_index = index
    # Each group's own starting rate; the schedule scales it (a group at cadence's lr gets the schedule's rate).
    t._base_lrs = [g["lr"] for g in t.optimizer.param_groups]
    t._parts.optimizer = t.optimizer
    t._parts.params = trained_params(t.optimizer, t.model)
    t._compiler.attach(t._parts)  # compile=...: the module the step calls
