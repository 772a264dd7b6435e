"""The public surface, pinned: every ``Trainer`` argument with its default, and every ``cadence fit`` option
(the launcher's included). Adding, renaming or re-defaulting one must change this file on purpose: users'
configs and scripts rely on these names. (``cadence.__all__`` is pinned in test_imports.py.)"""

from __future__ import annotations

import inspect

from cadence import Trainer

REQUIRED = "REQUIRED"

TRAINER_ARGUMENTS = {
    "model": REQUIRED,
    "train_data": REQUIRED,
    "val_data": None,
    "batch_size": 32,
    "max_steps": None,
    "max_epochs": None,
    "optimizer": "adamw",
    "optimizer_options": None,
    "fused": None,
    "lr": 0.001,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "warmup_start_lr": 0.0,
    "schedule": "constant",
    "min_lr": 0.0,
    "decay_steps": None,
    "milestones": (),
    "gamma": 0.1,
    "schedule_unit": "step",
    "plateau": None,
    "grad_accum": 1,
    "max_grad_norm": None,
    "clip_per_group": False,
    "precision": "32",
    "val_every": None,
    "val_batch_size": None,
    "val_at_start": False,
    "val_mean": False,
    "valid_frac": None,
    "split_by": None,
    "split_seed": 0,
    "split_mode": None,
    "val_indices": None,
    "collate_fn": None,
    "num_workers": 0,
    "drop_last": False,
    "item_seeding": True,
    "shuffle": True,
    "log_every": 50,
    "tokens_per_item": None,
    "flops_per_item": None,
    "peak_flops": None,
    "seed": 0,
    "seed_at_fit": True,
    "device": "auto",
    "run_dir": None,
    "overwrite": False,
    "progress": True,
    "checkpoint_every": None,
    "callbacks": (),
    "forward": None,
    "forward_kwargs": None,
    "val_forward_kwargs": None,
    "part_names": None,
    "loss_index": None,
    "metrics": None,
    "resume": None,
    "new_global_batch": False,
    "keep_last": None,
    "keep_best": None,
    "async_checkpoint": False,
    "on_nonfinite": "raise",
    "max_nonfinite": 10,
    "ema": None,
    "validate_on": "model",
    "early_stopping": (),
    "stop_when": "any",
    "param_groups": None,
    "stages": None,
    "mix": None,
    "source_weights": None,
    "sampler": None,
    "balance_by": None,
    "inputs": None,
    "loss_weights": None,
    "strategy": "auto",
    "find_unused_parameters": False,
    "loggers": ("jsonl",),
    "profile": None,
    "compile": False,
    "compile_options": None,
}

FIT_OPTIONS = [
    "--config", "--data", "--help", "--model", "--model.help", "--name", "--no_overwrite", "--overwrite",
    "--print_config", "--resume", "--run-dir", "--run_dir", "--test_data", "--trainer",
    "--trainer.async_checkpoint", "--trainer.balance_by", "--trainer.balance_by+",
    "--trainer.batch_size", "--trainer.callbacks", "--trainer.callbacks+", "--trainer.callbacks.help",
    "--trainer.checkpoint_every", "--trainer.clip_per_group", "--trainer.collate_fn", "--trainer.compile",
    "--trainer.compile_options", "--trainer.decay_steps", "--trainer.device", "--trainer.device.help",
    "--trainer.drop_last",
    "--trainer.early_stopping", "--trainer.early_stopping+", "--trainer.early_stopping.help", "--trainer.ema",
    "--trainer.ema.help", "--trainer.find_unused_parameters", "--trainer.flops_per_item", "--trainer.forward",
    "--trainer.forward_kwargs",
    "--trainer.fused", "--trainer.gamma", "--trainer.grad_accum", "--trainer.inputs", "--trainer.inputs+",
    "--trainer.item_seeding", "--trainer.keep_best", "--trainer.keep_last", "--trainer.log_every",
    "--trainer.loggers", "--trainer.loggers+", "--trainer.loss_index", "--trainer.loss_weights",
    "--trainer.lr", "--trainer.max_epochs",
    "--trainer.max_grad_norm", "--trainer.max_nonfinite", "--trainer.max_steps", "--trainer.metrics",
    "--trainer.milestones", "--trainer.milestones+", "--trainer.min_lr",
    "--trainer.mix", "--trainer.new_global_batch", "--trainer.num_workers", "--trainer.on_nonfinite",
    "--trainer.optimizer",
    "--trainer.optimizer.help", "--trainer.optimizer_options", "--trainer.param_groups", "--trainer.part_names",
    "--trainer.part_names+", "--trainer.peak_flops", "--trainer.plateau", "--trainer.plateau.help",
    "--trainer.precision",
    "--trainer.profile", "--trainer.progress", "--trainer.sampler", "--trainer.schedule",
    "--trainer.schedule_unit", "--trainer.seed", "--trainer.seed_at_fit", "--trainer.shuffle",
    "--trainer.source_weights", "--trainer.split_by", "--trainer.split_by+",
    "--trainer.split_mode", "--trainer.split_seed", "--trainer.stages", "--trainer.stages+",
    "--trainer.stages.help", "--trainer.stop_when", "--trainer.strategy", "--trainer.tokens_per_item",
    "--trainer.val_at_start", "--trainer.val_batch_size", "--trainer.val_every", "--trainer.val_forward_kwargs",
    "--trainer.val_indices", "--trainer.val_indices+", "--trainer.val_mean", "--trainer.valid_frac",
    "--trainer.validate_on", "--trainer.warmup_start_lr", "--trainer.warmup_steps", "--trainer.weight_decay",
    "--val_data", "-h",
]

LAUNCHER_OPTIONS = [
    "--nproc", "--nnodes", "--node-rank", "--master-addr", "--master-port", "--rdzv-endpoint", "--rdzv-id",
    "--max-restarts",
]


def test_trainer_arguments_and_defaults_are_pinned() -> None:
    now = {n: (p.default if p.default is not inspect.Parameter.empty else REQUIRED)
           for n, p in inspect.signature(Trainer).parameters.items()}
    assert list(now) == list(TRAINER_ARGUMENTS)  # names and their order
    assert now == TRAINER_ARGUMENTS


def test_cadence_fit_options_are_pinned() -> None:
    from cadence.cli.main import fit_parser

    parser = fit_parser()
    assert sorted({o for a in parser._actions for o in a.option_strings}) == FIT_OPTIONS


def test_launcher_options_are_pinned_and_in_the_help() -> None:
    from cadence.cli.help import LAUNCHER, fit_help
    from cadence.cli.main import fit_parser

    assert [n.split()[0] for n, _ in LAUNCHER] == LAUNCHER_OPTIONS
    text = fit_help(fit_parser())
    assert all(option in text for option in LAUNCHER_OPTIONS)

