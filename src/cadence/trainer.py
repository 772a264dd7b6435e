"""The ``Trainer``: checks its arguments, builds the parts, and runs the outer loop.

The outer loop reads like a hand-written one: take the next step's micro-batches, set the learning rate,
run :func:`~cadence.step.train_step`, then, at their points, update the EMA, log, validate and save. The step
itself never calls loggers, callbacks or checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import callbacks as cbs
from .arguments import check_basic, check_strategy
from .callbacks import Callback
from .checkpoint import Checkpoints
from .checkpoint.saver import Saver
from .checkpoint.snapshot import capture, restore
from .checkpoint.store import find_resume
from .compiling import Compiler
from .data.build import DataSettings, prepare
from .data.loading import eval_batches
from .data.valsets import measure_sources
from .device import mover, resolve_device, seed_everything
from .distributed import init_distributed, make_strategy
from .distributed.env import read_env
from .ema import EMA
from .errors import bad
from .evaluate import ValidationStopped, evaluate, stop_check
from .extra_state import has_state, model_extra_state, stateful_datasets
from .history import History, Metrics
from .loggers.build import check_loggers
from .optim import OptimizerSpec, build_optimizer, carry_state
from .outputs import Forward
from .plateau import Plateau
from .precision import Precision
from .profiling import StepProfiler
from .progress import Progress
from .records import Records
from .rundir import RunFolder, check_resume, notice, stop_message
from .runs import read_config
from .schedule import Schedule
from .signals import StopSignals
from .stages import Stage, StagePlan
from .step import StepParts, train_step
from .stopping import EarlyStopping, should_stop
from .weights import save_final


class Trainer:
    """Train ``model`` on ``train_data``: ``fit()`` trains, ``validate()`` measures, ``step`` counts.

    Args:
        model: the module to train; its forward returns the loss (see ``docs/trainer.md``).
        train_data: tensors, a TensorDataset, a map-style Dataset, a DataLoader or an iterable of batches.
        val_data: validation data of the same kinds, or {"name": data} (each logged as val/<name>/...); or
            use valid_frac.
        batch_size: items per micro-batch (per process).
        max_steps: optimizer steps to train for.
        max_epochs: passes over the training data (the run ends at whichever limit comes first).
        optimizer: "adamw", "adam", "sgd", "lion", a callable param_groups -> Optimizer, or an instance.
        optimizer_options: options of an optimizer by name, e.g. {"betas": (0.9, 0.99), "eps": 1e-8}.
        lr: the peak learning rate.
        weight_decay: decoupled weight decay, applied to tensors of 2+ dimensions only.
        warmup_steps: steps of linear warm-up from warmup_start_lr to lr.
        warmup_start_lr: the rate the warm-up starts from.
        schedule: after warm-up: "constant", "linear", "cosine", "multistep", "exponential", "plateau", or a
            callable step -> factor.
        min_lr: the rate "linear" and "cosine" decay to.
        milestones: steps at which "multistep" multiplies the rate by gamma.
        gamma: the factor of "multistep" and "exponential".
        schedule_unit: "step" or "epoch": what "multistep"'s milestones, "exponential" and a callable count.
        plateau: Plateau(...): the options of schedule="plateau" (ReduceLROnPlateau's, one step per validation).
        grad_accum: micro-batches per optimizer step.
        max_grad_norm: clip the gradient norm to this (after unscaling); None to not clip.
        clip_per_group: with max_grad_norm, clip each optimizer param group to it on its own (meshgpt's wrapper).
        precision: "32", "bf16" (autocast) or "16" (autocast + grad scaling, CUDA only).
        val_every: validate every N steps (default: at each epoch end).
        val_batch_size: items per validation batch (default: batch_size).
        val_at_start: also validate before the first step (logged at step 0; not again on resume).
        valid_frac: hold out this fraction of the training data for validation.
        split_by: callable(item) -> group, or one group label per item; with valid_frac, split by group.
        split_seed: seed of the validation split.
        split_mode: "random", "groups" (whole groups held out), "stratified" (valid_frac of every group) or
            "torch" (torch's random_split); default "groups" with split_by, else "random" (docs/features.md).
        collate_fn: how a list of items becomes a batch (map-style datasets).
        num_workers: DataLoader worker processes (map-style datasets).
        drop_last: drop the last, partial global batch of each epoch.
        item_seeding: seed each item's random draws in __getitem__ from (seed, epoch, index), so augmentation
            resumes exactly and is the same with any num_workers (docs/trainer.md, the data order contract).
        shuffle: visit each epoch in a seeded random order (the data order contract).
        log_every: read and log the running means every N steps.
        seed: seeds the data order and, at the start of fit(), torch, numpy and random.
        seed_at_fit: seed torch, numpy and random when a fresh fit() starts (False: leave them as they are).
        device: "auto" (cuda, then mps, then cpu), "cpu", "cuda", "cuda:N" or "mps".
        run_dir: a folder for metrics.jsonl and final/model.safetensors (None: write nothing).
        overwrite: replace what an earlier run wrote into run_dir.
        progress: show a progress bar (plain lines when stdout is not a terminal).
        checkpoint_every: save a checkpoint every N steps.
        callbacks: objects with some of on_fit_start, on_epoch_start, on_step_end, on_log, on_validation_start,
            on_validation_end, on_fit_end (docs/trainer.md gives their order).
        forward: callable(model, batch) -> output, replacing the routing by batch type.
        forward_kwargs: keyword arguments added to every training call of the model, e.g. flags.
        val_forward_kwargs: keyword arguments of every validation call (None: the same as forward_kwargs).
        part_names: names of the entries of a (loss, (part, ...)) tuple (default: part0, part1, ...).
        metrics: {"name": callable(output, batch) -> scalar} computed in validation.
        resume: "auto" (the newest valid checkpoint in run_dir, if any) or a checkpoint or run folder.
        keep_last: keep only the newest N checkpoints (None: keep all).
        keep_best: (metric, "min" or "max"): also keep the checkpoint with the best value of metric.
        async_checkpoint: copy the state off the device and write the files in a background thread.
        on_nonfinite: "raise" at a non-finite loss, or "skip" the step (weights and optimizer untouched).
        max_nonfinite: with "skip", raise after this many non-finite steps in a row.
        ema: an EMA(...) of the weights, updated after every optimizer step.
        validate_on: validate the "model", the "ema" copy, or "both" (the EMA's metrics as val_ema/...).
        early_stopping: EarlyStopping(...) stoppers checked at each validation.
        stop_when: stop when "any" stopper fires, or only when "all" do.
        param_groups: {"glob": {"lr": ..., "weight_decay": ...}} options by parameter name.
        stages: Stage(...) list run in order, each setting what trains and at what rate.
        mix: with several sources (train_data={"name": data}), "each" (a batch from every source per step)
            "sample" (each step from one source, picked by weight) or "concat" (the sources' batches joined
            into one, one forward).
        source_weights: {"name": weight}: loss weights ("each") or draw probabilities ("sample").
        sampler: "random" (the data order contract), "sequential", or "balanced" (with balance_by); with
            several sources also {"source": sampler}.
        balance_by: callable(item) -> label, or one label per item; balanced sampling draws every label equally
            often. With several sources also {"source": either}.
        inputs: names of a tuple batch's fields, passed to forward as keyword arguments.
        loss_weights: {"part": weight}: the loss is the weighted sum of these parts.
        strategy: "auto" (DDP when torchrun started several processes), "single", "ddp" or "fsdp" (FSDP2).
        loggers: where records go besides metrics.jsonl: "tensorboard", "wandb", "mlflow" (docs/tracking.md).
        profile: (start_step, end_step): a torch.profiler trace of those steps in RUN/profile/trace.json.
        compile: True: torch.compile the model's forward and backward; "max": also the clip and optimizer step.
        compile_options: keywords for torch.compile, e.g. {"mode": "max-autotune-no-cudagraphs"}.
    """

    def __init__(
        self,
        model: nn.Module,
        train_data: Any,
        *,
        val_data: Any = None,
        batch_size: int = 32,
        max_steps: int | None = None,
        max_epochs: int | None = None,
        optimizer: OptimizerSpec = "adamw",
        optimizer_options: Mapping[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        warmup_start_lr: float = 0.0,
        schedule: str | Callable[[int], float] = "constant",
        min_lr: float = 0.0,
        milestones: Sequence[int] = (),
        gamma: float = 0.1,
        schedule_unit: str = "step",
        plateau: Plateau | None = None,
        grad_accum: int = 1,
        max_grad_norm: float | None = None,
        clip_per_group: bool = False,
        precision: str = "32",
        val_every: int | None = None,
        val_batch_size: int | None = None,
        val_at_start: bool = False,
        valid_frac: float | None = None,
        split_by: Callable[[Any], Hashable] | Sequence[Hashable] | None = None,
        split_seed: int = 0,
        split_mode: str | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0,
        drop_last: bool = False,
        item_seeding: bool = True,
        shuffle: bool = True,
        log_every: int = 50,
        seed: int = 0,
        seed_at_fit: bool = True,
        device: str | torch.device = "auto",
        run_dir: str | Path | None = None,
        overwrite: bool = False,
        progress: bool = True,
        checkpoint_every: int | None = None,
        callbacks: Sequence[Callback] = (),
        forward: Forward | None = None,
        forward_kwargs: Mapping[str, Any] | None = None,
        val_forward_kwargs: Mapping[str, Any] | None = None,
        part_names: Sequence[str] | None = None,
        metrics: Mapping[str, Callable[[Any, Any], torch.Tensor]] | None = None,
        resume: str | Path | None = None,
        keep_last: int | None = None,
        keep_best: tuple[str, str] | None = None,
        async_checkpoint: bool = False,
        on_nonfinite: str = "raise",
        max_nonfinite: int = 10,
        ema: EMA | None = None,
        validate_on: str = "model",
        early_stopping: Sequence[EarlyStopping] = (),
        stop_when: str = "any",
        param_groups: Mapping[str, Mapping[str, Any]] | None = None,
        stages: Sequence[Stage] | None = None,
        mix: str | None = None,
        source_weights: Mapping[str, float] | None = None,
        sampler: str | Mapping[str, str | None] | None = None,
        balance_by: Callable[[Any], Hashable] | Sequence[Hashable]
        | Mapping[str, Callable[[Any], Hashable] | Sequence[Hashable]] | None = None,
        inputs: Sequence[str] | None = None,
        loss_weights: Mapping[str, float] | None = None,
        strategy: str = "auto",
        loggers: Sequence[str] = ("jsonl",),
        profile: tuple[int, int] | None = None,
        compile: bool | str = False,
        compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._arguments = {k: v for k, v in dict(locals()).items()
                           if k not in ("self", "model", "train_data", "val_data", "callbacks", "forward", "metrics")}
        check_basic(dict(locals()))
        env = read_env()
        self.device = resolve_device(device, env.local_rank if env.distributed else None)
        self.env = init_distributed(self.device)
        self.strategy = make_strategy(strategy, self.env, self.device)
        check_strategy(dict(locals()), self.strategy.name)
        self.is_main = self.env.is_main
        self.precision = Precision(precision, self.device)
        self.model = model.to(self.device)
        self.batch_size, self.grad_accum, self.seed = batch_size, grad_accum, seed
        self.world_size, self.rank = self.env.world_size, self.env.rank
        self.collate_fn, self.num_workers = collate_fn, num_workers
        self.log_every, self.val_every, self.checkpoint_every = log_every, val_every, checkpoint_every
        self.forward, self.metric_fns = forward, dict(metrics or {})
        self.val_batch_size, self.seed_at_fit = val_batch_size or batch_size, seed_at_fit

        settings = DataSettings(batch_size, grad_accum, seed, shuffle, drop_last, collate_fn, num_workers,
                                self.device.type == "cuda", sampler, balance_by, self.world_size, self.rank,
                                item_seeding=item_seeding)
        data = prepare(train_data, val_data, settings, valid_frac=valid_frac, split_by=split_by,
                       split_seed=split_seed, mix=mix, source_weights=source_weights, split_mode=split_mode)
        self.stream, self.val_data, self.data_length = data.stream, data.val_data, data.length
        self._datasets = stateful_datasets(train_data)
        self.steps_per_epoch = self.stream.steps_per_epoch
        if max_epochs is not None and not self.stream.single:
            raise bad("max_epochs", max_epochs, "with several training sources an epoch is not defined; use "
                      "max_steps.")
        self.stage_plan = StagePlan(stages, self.steps_per_epoch, model, param_groups) if stages else None
        self.max_epochs = max_epochs
        self.max_steps = self._total_steps(max_steps, max_epochs)
        self.schedule = Schedule(lr, schedule, warmup_steps, warmup_start_lr, self.max_steps, min_lr,
                                 tuple(milestones), gamma, schedule_unit, self.steps_per_epoch, plateau)

        self.lr, self.weight_decay, self._optimizer_spec = lr, weight_decay, optimizer
        self._optimizer_options, self.val_at_start = dict(optimizer_options or {}), val_at_start
        self._param_overrides = dict(param_groups or {})
        self.optimizer: torch.optim.Optimizer | None = None
        self.stage_index: int | None = None
        self.step = 0
        self._parts = StepParts(model, None, self.precision, [], max_grad_norm, forward, mover(self.device),
                                inputs=tuple(inputs or getattr(train_data, "inputs", None) or ()) or None,
                                loss_weights=dict(loss_weights) if loss_weights else None,
                                strategy=self.strategy if self.env.distributed else None,
                                forward_kwargs=dict(forward_kwargs or {}), clip_per_group=clip_per_group,
                                part_names=tuple(part_names) if part_names is not None else None)
        val_kwargs = forward_kwargs if val_forward_kwargs is None else val_forward_kwargs  # None: as in training
        self._val_forward_kwargs = dict(val_kwargs or {})
        self._compiler = Compiler(compile, compile_options, lambda text: self.progress.message(text))
        self._sync_stage()
        self.on_nonfinite, self.max_nonfinite = on_nonfinite, max_nonfinite
        self.nonfinite_in_a_row = self.nonfinite_total = 0
        self._parts.check_finite = on_nonfinite == "skip" or self.device.type == "cpu"

        self.ema, self.validate_on = ema, validate_on
        if ema is not None:
            ema.attach(model)
        self.early_stopping, self.stop_when = list(early_stopping), stop_when

        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.loggers = check_loggers(loggers, has_run_dir=self.run_dir is not None)
        self.profiler = StepProfiler(tuple(profile), self.run_dir / "profile") if profile is not None else None
        self.resume = resume
        self.run_folder = RunFolder(self.run_dir, overwrite, resume, self.is_main) if self.run_dir else None
        self.checkpoints = Checkpoints(self.run_dir / "checkpoints", keep_last, keep_best) if self.run_dir else None
        self._saver = Saver(self.checkpoints, self.strategy, async_checkpoint) if self.checkpoints else None
        self.callbacks = list(callbacks)
        self.progress = Progress(self.max_steps, enabled=progress and self.is_main)
        self.should_stop = False
        self.stop_reason: str | None = None
        self.records = Records()
        self.history, self.running = self.records.history, self.records.running
        self.last_val_metrics: dict[str, float] = {}
        self._signals = StopSignals()
        self._resumed = False
        self._validated_at: int | None = None
        self.records_at_checkpoint: int | None = None
        self._saved_at: int | None = None
        self._saved_records: int | None = None

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint that ``keep_best`` keeps (the best value of its metric so far), or None."""
        return self.checkpoints.best() if self.checkpoints is not None and self.checkpoints.keep_best else None

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the current optimizer trains."""
        return self._parts.params

    def _total_steps(self, max_steps: int | None, max_epochs: int | None) -> int | None:
        limits = [max_steps]
        if max_epochs is not None and self.steps_per_epoch is not None:
            limits.append(max_epochs * self.steps_per_epoch)
        if self.stage_plan is not None:
            limits.append(self.stage_plan.total)
        limits = [x for x in limits if x is not None]
        return min(limits) if limits else None

    def _sync_stage(self, step: int | None = None) -> None:
        """Build the optimizer for the stage of ``step`` (default: the next one), once or when a stage begins."""
        index = self.stage_plan.index_at(self.step if step is None else step) if self.stage_plan is not None else 0
        if index == self.stage_index:
            return
        lr, overrides = self.lr, self._param_overrides
        if self.stage_plan is not None:
            stage = self.stage_plan.stages[index]
            self.stage_plan.apply_trainable(self.model, index)
            lr = stage.lr if stage.lr is not None else lr
            overrides = {**overrides, **dict(stage.param_groups or {})}
        if self.env.distributed:  # DDP registers the parameters that train: wrap after choosing them
            self._parts.model = self.strategy.wrap(self.model)
        old = self.optimizer
        self.optimizer = build_optimizer(self._optimizer_spec, self.model, lr, self.weight_decay, self.device,
                                         overrides, self._optimizer_options)
        if old is not None:
            carry_state(old, self.optimizer)
        self.stage_index = index
        # Each group's own starting rate; the schedule scales it (a group at cadence's lr gets the schedule's rate).
        self._base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self._parts.optimizer = self.optimizer
        # in the model's order, as a hand-written clip_grad_norm_(model.parameters()) sums the norms; then any
        # tensor an optimizer passed in trains besides the model's
        trained = [p for g in self.optimizer.param_groups for p in g["params"] if p.requires_grad]
        ids, in_model = {id(p) for p in trained}, {id(p) for p in self.model.parameters()}
        self._parts.params = ([p for p in self.model.parameters() if id(p) in ids]
                              + [p for p in trained if id(p) not in in_model])
        self._compiler.attach(self._parts, self.strategy.name)  # compile=...: the module the step calls

    # ----------------------------------------------------------------------------------------- the loop
    def fit(self) -> History:
        """Train until ``max_steps``/``max_epochs``, early stopping or ``should_stop``; returns the history.

        With ``resume``, the newest valid checkpoint is loaded first and training continues bit-for-bit.
        On SIGTERM, SIGINT or SIGUSR1 the current step finishes, a checkpoint is saved (with a ``run_dir``)
        and then SIGINT raises ``KeyboardInterrupt``, the others ``SystemExit(128 + signal number)``.
        While it runs, the run folder is locked (``RUN/.lock``, docs/checkpoints.md).
        """
        if self.run_folder is None:
            return self._fit()
        self.run_folder.lock(self.strategy)
        try:
            return self._fit()
        finally:
            self.run_folder.unlock()

    def _fit(self) -> History:
        self._start()
        on_step_end, on_epoch_start = (cbs.bind(self.callbacks, e) for e in ("on_step_end", "on_epoch_start"))
        on_step_end = [*self._compiler.first_step_hooks(), *on_step_end]  # compile=...: its time, once
        for hook in cbs.bind(self.callbacks, "on_fit_start"):
            hook(self)
        self.model.train()
        with StopSignals() as signals:
            self._signals = signals
            try:
                if self.val_at_start and self.step == 0 and self.val_data is not None:
                    self.validate()  # the untrained model, logged at step 0; a resumed run is past it
                while not self._done():
                    if on_epoch_start and (self.stream.first.position == 0 or self.stream.end_of_epoch):
                        for hook in on_epoch_start:
                            hook(self)
                    draws = self.stream.next_step()
                    if self.stage_plan is not None:
                        self._sync_stage()
                    self._set_lr(self.step)
                    loss, parts, grad_norm, samples, stepped = train_step(self._parts, draws)
                    if not stepped:
                        self._nonfinite(loss)
                        continue
                    self.nonfinite_in_a_row = 0
                    self.step += 1
                    if self.ema is not None:
                        self.ema.update(self.step)
                    self.records.add_step(loss, parts, grad_norm, samples)
                    for hook in on_step_end:
                        hook(self)
                    if self.profiler is not None:
                        self.profiler.after_step(self.step)
                    self.progress.update(self.step)

                    if self.stream.end_of_epoch and self.stream.single:
                        self.running.mark_epoch_end(self.step, self.stream.epoch)
                    if self.step % self.log_every == 0 or self.step == 1:  # step 1: a log shows the run at once
                        self._log_train()
                    if self._validation_due():
                        self._log_train()
                        self._check_stopping(self.validate())
                    if self.checkpoint_every and self.step % self.checkpoint_every == 0:
                        self.save_checkpoint()
                self._log_train()
                if signals.received is not None:
                    self._emit({"step": self.step, "epoch": self.stream.epoch, "split": "train",
                                       "event": "stop", "reason": f"signal {signals.received}"})
                if signals.received is None and self.val_data is not None and self._validated_at != self.step:
                    self.validate()
                if self.checkpoints is not None:
                    if (self._saved_at, self._saved_records) != (self.step, len(self.history)):
                        self.save_checkpoint()  # the end of the run, with its last records
                    self._saver.wait()
            finally:
                if self._saver is not None:
                    try:  # a save in flight finishes (or reports its error) before fit() returns or raises
                        self._saver.wait()
                    except Exception as err:
                        self.progress.message(f"the last checkpoint could not be written: {err}")
                if self.profiler is not None:
                    self.profiler.close()
                self.progress.close()
                self.stream.close()
                self.records.close()
        if signals.received is not None:
            self.stop_reason = f"signal {signals.received}"
            if self.is_main:
                notice(stop_message(self.step, self.run_dir, self.checkpoints is not None))
            signals.raise_stop(f"stopped by signal {signals.received} after step {self.step}"
                               + (" (checkpoint saved)" if self.checkpoints is not None else ""))
        if self.run_dir is not None:
            save_final(self.model, self.run_dir / "final", self.ema.model if self.ema is not None else None,
                       sharded=self.strategy.name == "fsdp", is_main=self.is_main)
        for hook in cbs.bind(self.callbacks, "on_fit_end"):
            hook(self)
        return self.history

    def _start(self) -> None:
        """Resume or seed, open the loggers, start the clocks."""
        folder = None
        if self.resume is not None and not self._resumed:
            folder = find_resume(self.resume, self.checkpoints)
            check_resume(folder, self.resume, self.run_dir, self.max_steps, self.step, self.is_main)
        if folder is not None:
            restore(self, folder)
            self._resumed = True
            if self.is_main:
                notice(f"resumed at step {self.step} from {folder}")
        elif self.step == 0 and self.seed_at_fit:
            seed_everything(self.seed)
        if self.run_dir is not None and self.is_main:
            self.run_folder.start()  # claimed (and config.yaml written) only now that resuming succeeded
            config = read_config(self.run_dir) or {"trainer": self._arguments}  # cadence fit's config.yaml
            self.records.open(self.loggers, self.run_dir, config, self.step, self.records_at_checkpoint,
                              resumed=self.resume is not None)
        self.records.start_clock()
        self.progress.start(self.step)

    # ----------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The training state besides the weights, the optimizer and the random generators (which the
        checkpoint saves from the model, the optimizer and torch): the step and data position, the records,
        the schedule, the EMA weights, the stoppers, and the callbacks', datasets' and model's own state.

        Nested dicts and lists of tensors, numbers, strings and None; see docs/checkpoints.md.
        """
        scaler, plateau = self.precision.scaler, self.schedule.plateau
        return {
            "step": self.step,
            "data": self.stream.state_dict(),
            "validated_at": self._validated_at,
            "metrics": dict(self.last_val_metrics),
            "nonfinite": self.nonfinite_in_a_row,
            "nonfinite_total": self.nonfinite_total,
            "should_stop": self.should_stop,
            "stop_reason": self.stop_reason,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "plateau": plateau.state_dict() if plateau is not None else None,
            "early_stopping": [s.state_dict() for s in self.early_stopping],
            "records": len(self.history),
            "running": self.running.state_dict(),
            "ema": self.ema.state_tensors() if self.ema is not None else None,
            "callbacks": {str(i): cb.state_dict() for i, cb in enumerate(self.callbacks) if has_state(cb)},
            "datasets": {name: d.state_dict() for name, d in self._datasets.items()},
            "model": model_extra_state(self.model),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Put back what :meth:`state_dict` gave (the model's weights and the optimizer are loaded apart: the
        optimizer of the stage of the restored step is rebuilt here, before its state is loaded)."""
        self.step = int(state["step"])
        self._sync_stage(max(self.step - 1, 0))  # the stage of the last step taken; the loop moves on from it
        self.stream.load_state_dict(state["data"])
        self._validated_at = state.get("validated_at")
        self.last_val_metrics = dict(state.get("metrics") or {})
        self.nonfinite_in_a_row = int(state.get("nonfinite", 0))
        self.nonfinite_total = int(state.get("nonfinite_total", 0))
        self.should_stop, self.stop_reason = bool(state.get("should_stop")), state.get("stop_reason")
        if self.precision.scaler is not None and state.get("scaler"):
            self.precision.scaler.load_state_dict(state["scaler"])
        if self.schedule.plateau is not None and state.get("plateau") is not None:
            self.schedule.plateau.load_state_dict(state["plateau"])
        for stopper, saved in zip(self.early_stopping, state.get("early_stopping", [])):
            stopper.load_state_dict(saved)
        self.records_at_checkpoint = state.get("records")
        self._saved_at, self._saved_records = self.step, state.get("records")
        self.running.load_state_dict(state.get("running") or {})
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_tensors(state["ema"])
        for index, saved in (state.get("callbacks") or {}).items():
            self.callbacks[int(index)].load_state_dict(saved)
        for name, saved in (state.get("datasets") or {}).items():
            self._datasets[name].load_state_dict(saved)

    def save_checkpoint(self) -> Path:
        """Save the full training state as ``RUN/checkpoints/step-NNNNNNNNN`` (atomically)."""
        if self._saver is None:
            raise bad("run_dir", None, "checkpoints need a run folder; pass run_dir=... (--run-dir).")
        self._saver.wait()  # a save in flight still reads the staging buffers that capture() refills
        self._saver.save(self.step, capture(self, self._saver.staging))
        self._saved_at, self._saved_records = self.step, len(self.history)
        return self.checkpoints.path(self.step)

    def _nonfinite(self, loss: torch.Tensor) -> None:
        self.nonfinite_in_a_row += 1
        self.nonfinite_total += 1
        where = f"step {self.step + 1} (epoch {self.stream.epoch})"
        if self.on_nonfinite == "raise" or self.nonfinite_in_a_row >= self.max_nonfinite:
            raise FloatingPointError(
                f"the loss is {float(loss)} at {where}"
                + (f", {self.nonfinite_in_a_row} steps in a row" if self.on_nonfinite == "skip" else "")
                + "; the weights were not updated. Lower lr, set max_grad_norm, check the data, or pass "
                "on_nonfinite='skip' to skip such steps.")
        self.progress.message(f"skipped {where}: non-finite loss ({self.nonfinite_total} so far)")
        self._emit({"step": self.step, "epoch": self.stream.epoch, "split": "train", "event": "nonfinite",
                           "value": float(loss), "skipped_total": self.nonfinite_total})

    def _done(self) -> bool:
        if self.env.distributed:  # a stop or a signal on any rank stops every rank at the same step
            stop, signum = self.strategy.max_values([float(self.should_stop), float(self._signals.received or 0)])
            self.should_stop = stop > 0
            self._signals.received = int(signum) or None
        if self.should_stop or self._signals.received is not None:
            return True
        if self.max_steps is not None and self.step >= self.max_steps:
            return True
        epochs_done = self.stream.epoch + (1 if self.stream.end_of_epoch else 0)
        return self.max_epochs is not None and epochs_done >= self.max_epochs

    def _set_lr(self, step: int) -> None:
        lr = self.schedule(step)
        for group, base in zip(self.optimizer.param_groups, self._base_lrs):
            group["lr"] = lr if base == self.lr else base * (lr / self.lr)

    def _validation_due(self) -> bool:
        if self.val_data is None:
            return False
        if self.val_every is not None:
            return self.step % self.val_every == 0
        return self.stream.end_of_epoch

    def _check_stopping(self, metrics: dict[str, float]) -> None:
        """What a validation in the loop decides: the plateau schedule's rate (after warm-up), early stopping."""
        if not metrics:  # a validation that a stop signal cut short decides nothing
            return
        plateau = self.schedule.plateau
        if plateau is not None and self.step >= self.schedule.warmup_steps and plateau.observe(metrics, self.lr):
            self.progress.message(f"step {self.step}: {plateau.monitor} on a plateau, lr -> {plateau.lr:.3g}")
        reason = should_stop(self.early_stopping, metrics, self.stop_when)
        if reason is not None:
            self.should_stop, self.stop_reason = True, reason
            self.progress.message(f"step {self.step}: {reason}")
            self._emit({"step": self.step, "epoch": self.stream.epoch, "split": "train", "event": "stop",
                               "reason": reason})

    def _log_train(self) -> None:
        """Log the running means at a log point (one host transfer), after the summaries of epochs that ended."""
        for record in self.records.log_train(self.step, self.stream.epoch, self.optimizer.param_groups[0]["lr"],
                                             self.strategy.all_reduce if self.env.distributed else None,
                                             self.world_size):
            self._emit(record)
            if record["split"] == "train":
                self.progress.logged(self.step, {"loss": record["loss"], "lr": record["lr"]})

    def _emit(self, record: dict[str, Any]) -> None:
        self.records.emit(record)
        for hook in cbs.bind(self.callbacks, "on_log"):
            hook(self, record)

    # ----------------------------------------------------------------------------------------- validation
    def validate(self, data: Any = None, split: str = "val") -> Metrics:
        """Average loss, parts and metrics over ``data`` (default: the validation data), eval mode, no grad.

        Keyed and logged as ``<split>/...`` (history; with a run folder ``metrics.jsonl``, also outside ``fit()``).
        ``data`` (e.g. a test set) is measured like the validation data, in batches of ``val_batch_size``, and does
        not count as the run's validation. With ``validate_on="ema"`` the EMA copy is measured; with ``"both"``,
        its metrics come as ``<split>_ema/*``.
        """
        if data is None and self.val_data is None:
            raise bad("val_data", None, "there is no validation data; pass val_data or valid_frac.")
        for hook in cbs.bind(self.callbacks, "on_validation_start"):
            hook(self)
        targets = {"model": [(split, self.model)], "ema": [(split, None)],
                   "both": [(split, self.model), (f"{split}_ema", None)]}[self.validate_on]
        result = Metrics()
        result.split = split
        with self.records.outside_fit(self.run_dir if self.is_main else None):
            measured = []
            try:  # every pass first, then the records: a stop signal mid-way discards them all
                for name, model in targets:
                    model = model if model is not None else self.ema.model
                    call = self._parts.model if model is self.model else model
                    measured.append((name, measure_sources(self.val_data if data is None else data,
                                                           partial(self._evaluate, call))))
            except ValidationStopped:
                self.model.train()
                return result  # empty: nothing logged, and the loop stops at its next check
            for name, means in measured:
                result.update({f"{name}/{k}": v for k, v in means.items()})
                self._emit({"step": self.step, "epoch": self.stream.epoch, "split": name,
                            "loss": means.pop("loss"), "parts": means})
        self.model.train()
        if data is None:
            self._validated_at = self.step
            self.last_val_metrics = dict(result)
            if self.checkpoints is not None:
                self.checkpoints.check_best(result)
        self.progress.logged(self.step, {k.replace("/", "_"): v for k, v in result.items()})
        for hook in cbs.bind(self.callbacks, "on_validation_end"):
            hook(self, result)
        return result

    def _evaluate(self, call: nn.Module, data: Any) -> dict[str, float]:
        batches = eval_batches(data, self.val_batch_size, self.collate_fn, self.num_workers,
                               self.device.type == "cuda", self.rank, self.world_size)
        return evaluate(call, batches, self.precision, self._parts.move, self.forward, self.metric_fns,
                        self._parts.inputs, self._parts.loss_weights,
                        self.strategy.all_reduce if self.env.distributed else None,
                        self._val_forward_kwargs, self._parts.part_names,
                        *stop_check(self._signals, self.strategy, self.env.distributed))

    def test(self, data: Any) -> Metrics:
        """The run's metrics on ``data`` (a test set): ``validate(data, split="test")``, logged as ``test/...``."""
        return self.validate(data, split="test")

    def summary(self) -> str:
        """One line: steps, last train loss, last validation metrics, the run folder."""
        parts = [f"done: step={self.step}"]
        train = self.history.last("train")
        if train is not None and "loss" in train:
            parts.append(f"loss={train['loss']:.4f}")
        parts += [f"{k.replace('/', '_')}={v:.4f}" for k, v in self.last_val_metrics.items()]
        if self.stop_reason:
            parts.append(f"stopped=({self.stop_reason})")
        if self.run_dir is not None:
            parts.append(f"run={self.run_dir}")
        return " ".join(parts)
