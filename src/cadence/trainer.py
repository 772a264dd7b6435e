"""The ``Trainer``: its arguments, its explicit state (``state_dict``/``load_state_dict``) and its verbs.

Each verb lives in its own small module: the parts are built from the arguments in :mod:`cadence.build`,
``fit()`` runs the outer loop of :mod:`cadence.loop` (resume, then ``while not done: step; maybe log; maybe
validate; maybe save``) around :func:`cadence.step.train_step`, ``validate()``/``test()`` are
:mod:`cadence.validation`, a checkpoint is :mod:`cadence.checkpoint.snapshot`. The backends (single process,
DDP, FSDP) are the strategy classes of :mod:`cadence.distributed`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from . import callbacks as cbs
from . import killpoints
from .arguments import check_basic
from .build import build_backend, build_data, build_run, build_training, regroup, sync_stage
from .callbacks import Callback
from .checkpoint.snapshot import capture
from .ema import EMA
from .errors import bad
from .extra_state import has_state, model_extra_state
from .loop import run
from .optim import OptimizerSpec
from .outputs import Forward
from .plateau import Plateau
from .records import History, Metrics
from .stages import Stage
from .stopping import EarlyStopping
from .validation import validate


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
        fused: True picks PyTorch's fused kernel of an optimizer by name on the CPU too (not bitwise to the
            default one), False never; None: fused on CUDA only (optimizer_options={"fused": ...} alike).
        lr: the peak learning rate.
        weight_decay: decoupled weight decay, applied to tensors of 2+ dimensions only.
        warmup_steps: steps of linear warm-up from warmup_start_lr to lr.
        warmup_start_lr: the rate the warm-up starts from.
        schedule: after warm-up: "constant", "linear", "cosine", "multistep", "exponential", "plateau", or a
            callable step -> factor.
        min_lr: the rate "linear" and "cosine" decay to.
        decay_steps: the step at which "linear" and "cosine" reach min_lr, then kept (nanoGPT's lr_decay_iters);
            default max_steps.
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
        val_mean: with several validation sets (val_data={"name": data}), also log their mean as val/<name>
            (each set counting once); by default each set is logged on its own only, as val/<set>/<name>.
        valid_frac: hold out this fraction of the training data for validation.
        split_by: callable(item) -> group, or one group label per item; with valid_frac, split by group.
        split_seed: seed of the validation split.
        split_mode: "random", "groups" (whole groups held out), "stratified" (valid_frac of every group) or
            "torch" (torch's random_split); default "groups" with split_by, else "random" (docs/features.md).
        val_indices: the training data's items to hold out for validation, instead of valid_frac: their indices,
            or a callable(train_data) -> indices (or a Subset), e.g. running a seed's own split.
        collate_fn: how a list of items becomes a batch (map-style datasets).
        num_workers: DataLoader worker processes (map-style datasets).
        drop_last: drop the last, partial global batch of each epoch.
        item_seeding: seed each item's random draws in __getitem__ from (seed, epoch, index), so augmentation
            resumes exactly and is the same with any num_workers (docs/trainer.md, the data order contract).
        shuffle: visit each epoch in a seeded random order (the data order contract).
        log_every: read and log the running means every N steps.
        tokens_per_item: tokens in one item, for tokens_per_s (None: counted from the batches when the items are
            token sequences, an integer (batch, length) tensor first; 0: never).
        flops_per_item: the training FLOPs (forward and backward) of one item, or "count" (torch's FlopCounterMode
            over the first step); with peak_flops, the MFU of each log point.
        peak_flops: the device's peak FLOPs per second, for the MFU (docs/tracking.md).
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
        loss_index: which entry of a tuple the model returns is the loss, e.g. 1 for nanoGPT's (logits, loss);
            the other entries that are scalars are parts (named by part_names), the rest go to metrics only.
        metrics: {"name": callable(output, batch) -> scalar} computed in validation.
        resume: "auto" (the newest valid checkpoint in run_dir, if any) or a checkpoint or run folder.
        new_global_batch: resume with another global batch (batch_size * grad_accum * world_size) than the
            checkpoint's, the data position starting over at the beginning of an epoch; by default a resume keeps
            it, adapting grad_accum at another world size (docs/distributed.md).
        keep_last: keep only the newest N checkpoints (None: keep all).
        keep_best: (metric, "min" or "max"): also keep the checkpoint with the best value of metric, saved at that
            validation (the weights measured), also between checkpoint_every saves (docs/checkpoints.md).
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
        loss_weights: {"part": weight}: the loss is the weighted sum of these parts ("loss" names the first entry
            of a (loss, parts) tuple, e.g. {"loss": 1.0, "aux": 0.05} for tf-bind's (loss, aux_loss)).
        strategy: "auto" (DDP when torchrun started several processes), "single", "ddp" or "fsdp" (FSDP2).
        find_unused_parameters: DDP's own option, for a model whose steps leave some parameters without a
            gradient (a branch not taken); it costs a pass over the autograd graph each step. No effect otherwise.
        loggers: where records go besides metrics.jsonl: "tensorboard", "wandb", "mlflow" (docs/tracking.md).
        profile: (start_step, end_step): a torch.profiler trace of those steps in RUN/profile/trace.json.
        compile: True: torch.compile the model's forward and backward; "max": also the clip and optimizer step.
        compile_options: keywords for torch.compile, e.g. {"mode": "max-autotune-no-cudagraphs"}.
    """

    def __init__(
        self, model: nn.Module, train_data: Any, *,
        val_data: Any = None, batch_size: int = 32, max_steps: int | None = None, max_epochs: int | None = None,
        # the optimizer and the schedule
        optimizer: OptimizerSpec = "adamw", optimizer_options: Mapping[str, Any] | None = None,
        fused: bool | None = None, lr: float = 1e-3,
        weight_decay: float = 0.0, warmup_steps: int = 0, warmup_start_lr: float = 0.0,
        schedule: str | Callable[[int], float] = "constant", min_lr: float = 0.0, decay_steps: int | None = None,
        milestones: Sequence[int] = (),
        gamma: float = 0.1, schedule_unit: str = "step", plateau: Plateau | None = None,
        # the step
        grad_accum: int = 1, max_grad_norm: float | None = None, clip_per_group: bool = False, precision: str = "32",
        # validation
        val_every: int | None = None, val_batch_size: int | None = None, val_at_start: bool = False,
        val_mean: bool = False,
        # the data
        valid_frac: float | None = None, split_by: Callable[[Any], Any] | Sequence[Hashable] | None = None,
        split_seed: int = 0, split_mode: str | None = None,
        val_indices: Sequence[int] | Callable[[Any], Any] | None = None,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        num_workers: int = 0, drop_last: bool = False, item_seeding: bool = True, shuffle: bool = True,
        # the run
        log_every: int = 50, tokens_per_item: int | None = None, flops_per_item: float | str | None = None,
        peak_flops: float | None = None, seed: int = 0, seed_at_fit: bool = True, device: str | torch.device = "auto",
        run_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
        checkpoint_every: int | None = None, callbacks: Sequence[Callback] = (),
        # the model's calls and outputs
        forward: Forward | None = None, forward_kwargs: Mapping[str, Any] | None = None,
        val_forward_kwargs: Mapping[str, Any] | None = None, part_names: Sequence[str] | None = None,
        loss_index: int | None = None,
        metrics: Mapping[str, Callable[[Any, Any], Any]] | None = None,
        # checkpoints
        resume: str | Path | None = None, new_global_batch: bool = False, keep_last: int | None = None,
        keep_best: tuple[str, str] | None = None,
        async_checkpoint: bool = False, on_nonfinite: str = "raise", max_nonfinite: int = 10,
        # EMA, early stopping, stages
        ema: EMA | None = None, validate_on: str = "model", early_stopping: Sequence[EarlyStopping] = (),
        stop_when: str = "any", param_groups: Mapping[str, Mapping[str, Any]] | None = None,
        stages: Sequence[Stage] | None = None,
        # several sources
        mix: str | None = None, source_weights: Mapping[str, float] | None = None,
        sampler: str | Mapping[str, str | None] | None = None,
        balance_by: Callable[[Any], Any] | Sequence[Hashable]
        | Mapping[str, Callable[[Any], Any] | Sequence[Hashable]] | None = None,
        inputs: Sequence[str] | None = None, loss_weights: Mapping[str, float] | None = None,
        # engines, loggers, profiling, compiling
        strategy: str = "auto", find_unused_parameters: bool = False, loggers: Sequence[str] = ("jsonl",),
        profile: tuple[int, int] | None = None,
        compile: bool | str = False, compile_options: Mapping[str, Any] | None = None,
    ) -> None:
        self._arguments = {k: v for k, v in dict(locals()).items()
                           if k not in ("self", "model", "train_data", "val_data", "callbacks", "forward", "metrics")}
        check_basic(dict(locals()))
        a = SimpleNamespace(**{k: v for k, v in locals().items() if k != "self"})
        build_backend(self, a)
        build_data(self, a)
        build_training(self, a)
        build_run(self, a)

    @property
    def best_checkpoint(self) -> Path | None:
        """The checkpoint that ``keep_best`` keeps (the best value of its metric so far), or None."""
        return self.checkpoints.best() if self.checkpoints is not None and self.checkpoints.keep_best else None

    @property
    def epoch(self) -> int:
        """The epoch (0-based) that the last step took its batches from: the ``epoch`` of its records; 0 before
        the first step. ``on_epoch_start`` runs before an epoch's first step, so there the epoch beginning is
        ``epoch + 1`` (except for the first). With several sources, the first source's epoch."""
        return self.stream.epoch

    @property
    def params(self) -> list[torch.Tensor]:
        """The parameters the current optimizer trains."""
        return self._parts.params

    def _regroup(self, grad_accum: int) -> None:
        """Split each step's global batch into ``grad_accum`` micro-batches per rank from now on (a resume)."""
        regroup(self, grad_accum)

    def _sync_stage(self, step: int | None = None) -> None:
        """Build the optimizer for the stage of ``step`` (default: the next one), once or when a stage begins."""
        sync_stage(self, step)

    # ----------------------------------------------------------------------------------------- the loop
    def fit(self) -> History:
        """Train until ``max_steps``/``max_epochs``, early stopping or ``should_stop``; returns the history.

        With ``resume``, the newest valid checkpoint is loaded first and training continues bit-for-bit.
        On SIGTERM, SIGINT or SIGUSR1 the current step finishes, a checkpoint is saved (with a ``run_dir``)
        and then SIGINT raises ``KeyboardInterrupt``, the others ``SystemExit(128 + signal number)``.
        While it runs, the run folder is locked (``RUN/.lock``, docs/checkpoints.md).
        """
        if killpoints.ACTIVE:
            killpoints.reached("start", self.step)
        if self.run_folder is None:
            return run(self)
        self.run_folder.lock(self.strategy)
        try:
            if killpoints.ACTIVE:
                killpoints.reached("locked", self.step)
            history = run(self)
            if killpoints.ACTIVE:
                killpoints.reached("end.done", self.step)
            return history
        finally:
            self.run_folder.unlock()

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
            "best": self.checkpoints.best_state() if self.checkpoints is not None else None,
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
        if self.checkpoints is not None:
            self.checkpoints.load_best_state(state.get("best"))
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
        return self._save_checkpoint()

    def _save_checkpoint(self, kept_for: str | None = None) -> Path:
        """``save_checkpoint``; ``kept_for="best"``: saved only because this validation is the best so far."""
        if self._saver is None:
            raise bad("run_dir", None, "checkpoints need a run folder; pass run_dir=... (--run-dir).")
        self._saver.wait()  # a save in flight still reads the staging buffers that capture() refills
        files = capture(self, self._saver.staging)
        if killpoints.ACTIVE:
            killpoints.reached("checkpoint.capture", self.step)
        self._saver.save(self.step, files, kept_for)
        self._saved_at, self._saved_records = self.step, len(self.history)
        return self.checkpoints.path(self.step)

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
        return validate(self, data, split)

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
