"""A bad value for every ``Trainer`` argument and ``cadence fit`` option, and every pair of arguments that
contradict each other: one ``ConfigError`` (one ``cadence: error:`` line), naming the argument and the value,
before anything trains. Each row: the argument, the value, the words the message must contain.
(tests/test_errors.py holds the older rows; these add every argument they left out.)"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cadence import ConfigError, EarlyStopping, Plateau, Trainer
from cadence.cli.main import main
from helpers import MLP, assert_weights_equal, clone, make_data

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = "RUN"  # replaced by a fresh folder in the test

# (argument, value, words of the message); the other arguments: batch_size=8, max_steps=4
BAD_VALUES: list[tuple[str, Any, list[str]]] = [
    ("val_data", 3, ["val_data='int'", "map-style Dataset"]),
    ("batch_size", 0, ["batch_size=0"]),
    ("max_steps", -1, ["max_steps=-1"]),
    ("max_epochs", 1.5, ["max_epochs=1.5"]),
    ("optimizer", 3, ["optimizer=3", "adamw"]),
    ("optimizer_options", 3, ["optimizer_options=3", "mapping"]),
    ("fused", "yes", ["fused='yes'", "true"]),
    ("lr", "x", ["lr='x'"]),
    ("weight_decay", "x", ["weight_decay='x'"]),
    ("warmup_steps", 1.5, ["warmup_steps=1.5"]),
    ("warmup_start_lr", "x", ["warmup_start_lr='x'", "rate >= 0"]),
    ("schedule", 3, ["schedule=3", "cosine"]),
    ("min_lr", "x", ["min_lr='x'", "rate >= 0"]),
    ("min_lr", -1.0, ["min_lr=-1.0"]),
    ("milestones", 3, ["milestones=3", "list of step"]),
    ("gamma", -1.0, ["gamma=-1.0", "factor >= 0"]),
    ("gamma", "x", ["gamma='x'"]),
    ("schedule_unit", "day", ["schedule_unit='day'", "epoch"]),
    ("plateau", 3, ["plateau=3", "cadence.Plateau"]),
    ("grad_accum", 0, ["grad_accum=0"]),
    ("max_grad_norm", -1, ["max_grad_norm=-1"]),
    ("clip_per_group", "yes", ["clip_per_group='yes'", "true or false"]),
    ("precision", "8", ["precision='8'", "bf16"]),
    ("val_every", 0, ["val_every=0"]),
    ("val_batch_size", 0, ["val_batch_size=0"]),
    ("val_at_start", "yes", ["val_at_start='yes'", "true or false"]),
    ("valid_frac", 1.5, ["valid_frac=1.5"]),
    ("split_by", 3, ["split_by=3", "valid_frac"]),
    ("split_seed", 1.5, ["split_seed=1.5", "whole number"]),
    ("split_seed", 2**70, [f"split_seed={2**70}", "64 bits"]),
    ("split_mode", "x", ["split_mode='x'", "stratified"]),
    ("collate_fn", 3, ["collate_fn=3", "callable"]),
    ("num_workers", 1.5, ["num_workers=1.5"]),
    ("drop_last", "yes", ["drop_last='yes'", "true or false"]),
    ("item_seeding", "yes", ["item_seeding='yes'", "true or false"]),
    ("shuffle", "yes", ["shuffle='yes'", "true or false"]),
    ("log_every", 1.5, ["log_every=1.5"]),
    ("seed", "x", ["seed='x'", "whole number"]),
    ("seed", 2**70, [f"seed={2**70}", "64 bits"]),
    ("seed_at_fit", "yes", ["seed_at_fit='yes'"]),
    ("device", 3, ["device=3", "cpu"]),
    ("run_dir", 3, ["run_dir=3", "folder path"]),
    ("overwrite", "yes", ["overwrite='yes'", "true or false"]),
    ("progress", "yes", ["progress='yes'", "true or false"]),
    ("checkpoint_every", 0, ["checkpoint_every=0"]),
    ("callbacks", 3, ["callbacks=3", "on_step_end"]),
    ("callbacks", [3], ["callbacks=[3]", "on_step_end"]),
    ("forward", 3, ["forward=3", "callable"]),
    ("forward_kwargs", 3, ["forward_kwargs=3", "mapping"]),
    ("val_forward_kwargs", 3, ["val_forward_kwargs=3", "mapping"]),
    ("part_names", "ab", ["part_names='ab'", "list of distinct names"]),
    ("metrics", 3, ["metrics=3", "callable(output, batch)"]),
    ("metrics", {"acc": 3}, ["metrics={'acc': 3}", "callable(output, batch)"]),
    ("resume", 3, ["resume=3", "folder path"]),
    ("keep_last", 0, ["keep_last=0"]),
    ("keep_best", ("val/loss", "lowest"), ["keep_best=('val/loss', 'lowest')", '"min"']),
    ("async_checkpoint", "yes", ["async_checkpoint='yes'", "true or false"]),
    ("on_nonfinite", "x", ["on_nonfinite='x'", "skip"]),
    ("max_nonfinite", 0, ["max_nonfinite=0"]),
    ("ema", 3, ["ema=3", "cadence.EMA"]),
    ("validate_on", "x", ["validate_on='x'", "both"]),
    ("early_stopping", 3, ["early_stopping=3", "EarlyStopping"]),
    ("stop_when", "x", ["stop_when='x'", "all"]),
    ("param_groups", 3, ["param_groups=3", "glob"]),
    ("stages", 3, ["stages=3", "cadence.Stage"]),
    ("stages", [3], ["stages[0]=3", "cadence.Stage"]),
    ("mix", "each", ["mix='each'", "several training sources"]),
    ("source_weights", {"a": 1.0}, ["source_weights={'a': 1.0}", "several training sources"]),
    ("sampler", "x", ["sampler='x'", "balanced"]),
    ("balance_by", 3, ["balance_by=3", "callable(item) -> label"]),
    ("inputs", 3, ["inputs=3", "field names"]),
    ("loss_weights", 3, ["loss_weights=3", "weight"]),
    ("strategy", "x", ["strategy='x'", "ddp"]),
    ("find_unused_parameters", "yes", ["find_unused_parameters='yes'", "true or false"]),
    ("loggers", ["x"], ["loggers=['x']", "tensorboard"]),
    ("profile", (5, 2), ["profile=(5, 2)", "start < end"]),
    ("compile", "x", ["compile='x'", '"max"']),
    ("compile_options", 3, ["compile_options=3", "mode"]),
    ("decay_steps", 0, ["decay_steps=0", "min_lr"]),
    ("val_indices", "x", ["val_indices=", "indices of the items"]),
    ("loss_index", 1.5, ["loss_index=1.5", "(logits, loss)"]),
    ("val_mean", "yes", ["val_mean='yes'", "true or false"]),
    ("tokens_per_item", -1, ["tokens_per_item=-1", "tokens in one item"]),
    ("flops_per_item", "x", ["flops_per_item='x'", '"count"']),
    ("peak_flops", 0, ["peak_flops=0", "peak FLOPs"]),
    ("new_global_batch", "yes", ["new_global_batch='yes'", "true or false"]),
]

# Arguments that contradict each other (or one makes the other meaningless): the message names both.
CONTRADICTIONS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("min_lr_above_lr", {"lr": 1e-3, "min_lr": 1e-2, "schedule": "cosine"}, ["min_lr=0.01", "lr=0.001", "cosine"]),
    ("part_named_loss", {"part_names": ["loss", "other"]}, ["part_names=['loss', 'other']", "total loss"]),
    ("resume_and_overwrite", {"resume": "auto", "overwrite": True, "run_dir": RUN}, ["overwrite=True", "resume"]),
    ("overwrite_without_run_dir", {"overwrite": True}, ["overwrite=True", "run_dir"]),
    ("milestones_without_multistep", {"milestones": [3]}, ["milestones=[3]", "multistep", "'constant'"]),
    ("gamma_without_its_schedule", {"gamma": 0.5, "schedule": "cosine"}, ["gamma=0.5", "exponential", "'cosine'"]),
    ("warmup_start_lr_without_warmup", {"warmup_start_lr": 1e-4}, ["warmup_start_lr=0.0001", "warmup_steps=0"]),
    ("warmup_start_lr_above_lr", {"warmup_start_lr": 0.1, "warmup_steps": 2}, ["warmup_start_lr=0.1", "lr=0.001"]),
    ("schedule_unit_epoch_constant", {"schedule_unit": "epoch"}, ["schedule_unit='epoch'", "'constant'"]),
    ("split_seed_without_valid_frac", {"split_seed": 5}, ["split_seed=5", "valid_frac"]),
    ("max_nonfinite_with_raise", {"max_nonfinite": 3}, ["max_nonfinite=3", 'on_nonfinite="raise"']),
    ("inputs_with_forward", {"inputs": ["x", "y"], "forward": lambda m, b: m(*b)}, ["inputs=['x', 'y']", "forward"]),
    ("profile_after_the_run", {"profile": (10, 12), "run_dir": RUN}, ["profile=(10, 12)", "max_steps=4"]),
    ("split_mode_without_valid_frac", {"split_mode": "random"}, ["split_mode='random'", "valid_frac"]),
    ("valid_frac_and_val_data", {"valid_frac": 0.2, "val_data": make_data(10)}, ["valid_frac=0.2", "val_data"]),
    ("clip_per_group_without_norm", {"clip_per_group": True}, ["clip_per_group=True", "max_grad_norm"]),
    ("compile_options_without_compile", {"compile_options": {"mode": "default"}}, ["compile_options=", "compile="]),
    ("balance_by_without_balanced", {"balance_by": [0, 1] * 25}, ["balance_by=", "sampler='balanced'"]),
    ("validate_on_ema_without_ema", {"validate_on": "ema"}, ["validate_on='ema'", "ema=EMA"]),
    ("plateau_floor_twice", {"schedule": "plateau", "min_lr": 0.1, "valid_frac": 0.2},
     ["min_lr=0.1", "Plateau(min_lr"]),
    ("plateau_without_schedule", {"plateau": Plateau()}, ["plateau=", "schedule"]),
    ("early_stopping_without_validation", {"early_stopping": [EarlyStopping(monitor="val/loss")]},
     ["early_stopping=", "validation data"]),
]


def build(model: nn.Module, overrides: dict[str, Any], tmp_path: Path, data: Any = None) -> Trainer:
    kw: dict[str, Any] = {"batch_size": 8, "max_steps": 4, "progress": False}
    kw.update({k: (str(tmp_path / "run") if v == RUN else v) for k, v in overrides.items()})
    return Trainer(model, make_data(50) if data is None else data, **kw)


def test_every_trainer_argument_has_a_bad_value() -> None:
    arguments = set(inspect.signature(Trainer).parameters) - {"model", "train_data"}
    assert arguments - {name for name, _, _ in BAD_VALUES} == set()


@pytest.mark.parametrize("name,value,words", BAD_VALUES, ids=[f"{n}={v!r}"[:40] for n, v, _ in BAD_VALUES])
def test_a_bad_value_is_named_before_training(tmp_path: Path, name: str, value: Any, words: list[str]) -> None:
    model = MLP()
    before = clone(model)
    overrides = {name: value}
    if name in ("keep_last", "keep_best", "async_checkpoint", "checkpoint_every", "profile"):
        overrides["run_dir"] = RUN
    if name == "keep_best":
        overrides["valid_frac"] = 0.2
    with pytest.raises(ConfigError) as info:
        build(model, overrides, tmp_path).fit()
    for piece in words:
        assert piece in str(info.value), f"{piece!r} missing from {str(info.value)!r}"
    assert_weights_equal(model, before)
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir())


@pytest.mark.parametrize("overrides,words", [c[1:] for c in CONTRADICTIONS], ids=[c[0] for c in CONTRADICTIONS])
def test_contradicting_arguments_are_refused_naming_both(tmp_path: Path, overrides: dict, words: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        build(MLP(), overrides, tmp_path)  # refused when the Trainer is built
    for piece in words:
        assert piece in str(info.value), f"{piece!r} missing from {str(info.value)!r}"


def test_part_names_for_a_model_that_returns_no_parts_stop_the_first_step(tmp_path: Path) -> None:
    model = MLP()
    before = clone(model)
    t = build(model, {"part_names": ["recon", "commit"]}, tmp_path)
    with pytest.raises(ConfigError, match=r"part_names=\['recon', 'commit'\].*returns no tuple of parts"):
        t.fit()
    assert t.step == 0
    assert_weights_equal(model, before)


# ----------------------------------------------------------------------------------------------- unusual input
class AnyWidth(nn.Module):
    """A model that takes rows of any width (it averages them), for sources of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x.mean(1, keepdim=True) * self.scale, y)


def test_a_training_dict_with_one_source_trains(tmp_path: Path) -> None:
    t = build(MLP(), {"max_steps": 3}, tmp_path, data={"only": make_data(50)})
    t.fit()
    assert t.step == 3 and "only/loss" in t.history.last("train")["parts"]


def test_concat_of_sources_of_different_widths_is_named(tmp_path: Path) -> None:
    x, y = make_data(50)
    data = {"a": (x, y), "b": (torch.randn(50, 6), y)}
    with pytest.raises(ConfigError, match=r"mix='concat'.*different shapes.*a: \[8\], b: \[6\].*pad"):
        build(AnyWidth(), {"mix": "concat"}, tmp_path, data=data).fit()


@pytest.mark.parametrize("name", ["seed", "split_seed"])
def test_seeds_at_the_edges_of_64_bits_train(tmp_path: Path, name: str) -> None:
    for value in (2**63 - 1, -(2**63)):
        t = build(MLP(), {name: value, "max_steps": 2, "valid_frac": 0.2}, tmp_path)
        t.fit()
        assert t.step == 2


def test_compile_without_a_cpp_compiler_is_refused_at_once(tmp_path: Path) -> None:
    from torch._inductor import config

    with config.patch({"cpp.cxx": ("/nonexistent/c++",)}):
        with pytest.raises(ConfigError, match=r"compile=True: .*no C\+\+ compiler.*aot_eager"):
            build(MLP(), {"compile": True}, tmp_path)
        build(MLP(), {"compile": True, "compile_options": {"backend": "aot_eager"}}, tmp_path)  # no C++ needed


# ----------------------------------------------------------------------------------------------- cadence fit
TINY = ["--trainer.max_steps", "2", "--trainer.max_epochs", "null", "--trainer.warmup_steps", "0",
        "--trainer.progress", "false", "--data.n", "64"]

# (options, words of the one error line)
CLI_BAD_VALUES: list[tuple[list[str], list[str]]] = [
    (["--trainer.batch_size", "0"], ["batch_size=0"]),
    (["--trainer.batch_size", "x"], ["trainer.batch_size", "x"]),
    (["--trainer.lr", "-1"], ["lr=-1"]),
    (["--trainer.min_lr", "0.1", "--trainer.lr", "0.01"], ["min_lr=0.1", "lr=0.01", "cosine"]),
    (["--trainer.seed", str(2**70)], [f"seed={2**70}", "64 bits"]),
    (["--trainer.split_seed", "5", "--trainer.valid_frac", "null", "--trainer.val_every", "null"],
     ["split_seed=5", "valid_frac"]),
    (["--trainer.milestones", "[3]"], ["milestones=[3]", "multistep"]),
    (["--trainer.gamma", "0.5"], ["gamma=0.5", "exponential"]),
    (["--trainer.part_names", "[loss]"], ["part_names=['loss']", "total loss"]),
    (["--trainer.compile", "maybe"], ["compile='maybe'", '"max"']),
    (["--trainer.schedule_unit", "epoch", "--trainer.schedule", "constant"], ["schedule_unit='epoch'"]),
    (["--trainer.profile", "[50, 60]", "--trainer.warmup_steps", "0"], ["profile=(50, 60)", "max_steps=2"]),
    (["--trainer.split_by", "[0, 1]"], ["split_by", "2"]),
    (["--resume", "RUN", "--overwrite"], ["overwrite=True", "resume"]),
    (["--run-dir", "FILE"], ["--run-dir", "a file"]),
]


@pytest.mark.parametrize("options,words", CLI_BAD_VALUES, ids=[" ".join(o)[:40] for o, _ in CLI_BAD_VALUES])
def test_a_bad_cadence_fit_option_is_one_error_line(tmp_path: Path, capsys, options: list[str],
                                                    words: list[str]) -> None:
    if "RUN" in options:  # a finished run to resume
        assert main(["fit", *TINY, "--run-dir", str(tmp_path / "run")]) == 0
        capsys.readouterr()
    (tmp_path / "file").write_text("x")
    options = [str(tmp_path / "run") if o == "RUN" else str(tmp_path / "file") if o == "FILE" else o
               for o in options]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["fit", *TINY, *options] + ([] if "--run-dir" in options or "--resume" in options
                                            else ["--run-dir", str(tmp_path / "new")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("cadence: error:") and "Traceback" not in err and err.count("\n") == 1, err
    for piece in words:
        assert piece in err, f"{piece!r} missing from {err!r}"
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing made
    shutil.rmtree(tmp_path / "run", ignore_errors=True)


class DataDependent(MLP):
    """A branch on a value of the data: torch.compile cannot trace it as one graph."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = F.cross_entropy(self.net(x), y)
        if loss.item() > 100:
            return loss * 2
        return loss


@pytest.mark.slow
def test_a_data_dependent_branch_under_compile_falls_back_and_says_so_without_progress(tmp_path: Path,
                                                                                         capsys) -> None:
    t = build(DataDependent(), {"compile": True, "max_steps": 2}, tmp_path)
    t.fit()
    err = capsys.readouterr().err
    assert t.step == 2
    assert "cadence: compile: the model's forward does not compile as one graph" in err
    assert "cadence: compile: step 1 took" in err and "fullgraph=False" in err


# ----------------------------------------------------------------------------------------------- export, runs
def test_export_best_says_when_the_best_checkpoint_is_gone(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert main(["fit", *TINY, "--trainer.max_steps", "8", "--trainer.val_every", "2", "--trainer.checkpoint_every",
                 "2", "--trainer.keep_last", "1", "--trainer.keep_best", "[val/loss, max]", "--run-dir", str(run)]) == 0
    kept = sorted((run / "checkpoints").iterdir())
    assert len(kept) == 2  # the newest, and the best (the highest loss: the first)
    assert main(["export", str(run), "--best", "-o", str(tmp_path / "a.safetensors")]) == 0
    assert kept[0].name in capsys.readouterr().out
    shutil.rmtree(kept[0])
    assert main(["export", str(run), "--best", "-o", str(tmp_path / "b.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"the best checkpoint of the run {str(run)!r}, {kept[0].name}" in err and "is gone" in err, err
    assert not (tmp_path / "b.safetensors").exists()


def test_runs_names_a_metric_no_run_logs(tmp_path: Path, capsys) -> None:
    build(MLP(), {"max_steps": 2, "valid_frac": 0.2, "run_dir": RUN}, tmp_path).fit()
    capsys.readouterr()
    assert main(["runs", str(tmp_path), "--metric", "val/acc"]) == 0
    out, err = capsys.readouterr()
    assert "run" in out and "no run here logs 'val/acc'; they log" in err and "val/loss" in err
    assert main(["runs", str(tmp_path), "--metric", "val/loss"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_runs_lists_a_folder_it_cannot_read_and_the_others(tmp_path: Path, capsys, monkeypatch) -> None:
    build(MLP(), {"max_steps": 2, "run_dir": RUN}, tmp_path).fit()
    locked = tmp_path / "locked"
    locked.mkdir()
    real = Path.is_file

    def is_file(self: Path) -> bool:  # what a folder without read/search permission does (tests may run as root)
        if self.parent == locked:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "is_file", is_file)
    with pytest.warns(UserWarning, match="locked: cannot read the run"):
        assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [line.split()[:2] for line in out.splitlines()]
    assert ["locked", "unreadable"] in rows and ["run", "finished"] in rows, out


@pytest.mark.parametrize("options", [
    ["--trainer.ema", '{"class_path": "cadence.EMA", "init_args": {"beta": 0.99}}', "--trainer.validate_on", "both"],
    ["--trainer.schedule", "plateau", "--trainer.plateau", '{"class_path": "cadence.Plateau"}'],
])
def test_the_nproc_launchers_check_takes_classes_given_by_class_path(options: list[str]) -> None:
    from cadence.cli.main import check_launch, root_parser

    check_launch(root_parser(), options)  # the demo's config, with these: no error
    with pytest.raises(ConfigError, match="validate_on='ema'"):
        check_launch(root_parser(), ["--trainer.validate_on", "ema"])
