"""What ``cadence fit`` writes as ``config.yaml`` (or prints with ``--print_config``) reads back to the same run:
one non-default value of every kind each ``Trainer`` option takes, printed, read back and printed again."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest
import yaml

from cadence.cli.main import fit_parser, main

pytestmark = pytest.mark.usefixtures("one_thread")

# option -> a value of each form it takes, as typed on the command line (labels as a list and as a function,
# classes as class_path + init_args, callables as dotted paths)
VALUES: dict[str, list[str]] = {
    "batch_size": ["16"], "max_steps": ["7"], "max_epochs": ["2"],
    "optimizer": ["sgd", "torch.optim.SGD"], "optimizer_options": ['{"momentum": 0.9, "betas": [0.9, 0.99]}'],
    "fused": ["false"], "lr": ["0.01"], "weight_decay": ["0.1"], "warmup_steps": ["2"], "warmup_start_lr": ["0.001"],
    "schedule": ["multistep", "math.cos"], "min_lr": ["0.0001"], "milestones": ["[3, 5]"], "gamma": ["0.5"],
    "schedule_unit": ["epoch"], "plateau": ['{"class_path": "cadence.Plateau", "init_args": {"patience": 3}}'],
    "grad_accum": ["2"], "max_grad_norm": ["1.0"], "clip_per_group": ["true"], "precision": ["bf16"],
    "val_every": ["5"], "val_batch_size": ["8"], "val_at_start": ["true"], "valid_frac": ["0.25"],
    "split_by": ["[a, b, a, b]", "[0, 1, 0, 1]", "[[1, 2], [3]]", "[1.5, true, null]", "builtins.len"],
    "split_seed": ["3"], "split_mode": ["stratified"], "collate_fn": ["torch.utils.data.default_collate"],
    "num_workers": ["1"], "drop_last": ["true"], "item_seeding": ["false"], "shuffle": ["false"],
    "log_every": ["3"], "seed": ["9"], "seed_at_fit": ["false"], "device": ["cpu"], "progress": ["false"],
    "checkpoint_every": ["4"], "forward": ["builtins.getattr"], "forward_kwargs": ['{"flag": true, "k": [1, 2]}'],
    "val_forward_kwargs": ['{"flag": false}'], "part_names": ["[recon, commit]"],
    "keep_last": ["2"], "keep_best": ["[val/loss, min]"], "async_checkpoint": ["true"], "on_nonfinite": ["skip"],
    "max_nonfinite": ["4"], "ema": ['{"class_path": "cadence.EMA", "init_args": {"beta": 0.99}}'],
    "validate_on": ["both"],
    "early_stopping": ['[{"class_path": "cadence.EarlyStopping", "init_args": {"monitor": "val/loss"}}]'],
    "stop_when": ["all"], "param_groups": ['{"*.bias": {"weight_decay": 0.0}}'],
    "stages": ['[{"class_path": "cadence.Stage", "init_args": {"steps": 3, "lr": 0.1}}]'],
    "mix": ["sample"], "source_weights": ['{"a": 1.0, "b": 2.0}'],
    "sampler": ["balanced", '{"a": balanced, "b": null}'],
    "balance_by": ["[0, 1, 1]", "[x, y]", "builtins.len", '{"a": [0, 1, 1], "b": builtins.len}'],
    "inputs": ["[x, y]"], "loss_weights": ['{"recon": 2.0}'], "strategy": ["single"],
    "find_unused_parameters": ["true"], "loggers": ["[jsonl, tensorboard]"], "profile": ["[2, 3]"],
    "compile": ["max", "true"], "compile_options": ['{"mode": "max-autotune-no-cudagraphs"}'],
    "decay_steps": ["5"], "val_indices": ["[0, 3]", "builtins.len"], "loss_index": ["1"], "val_mean": ["true"],
    "tokens_per_item": ["128"], "flops_per_item": ["1000.0", "count"], "peak_flops": ["1e12"],
    "new_global_batch": ["true"], "metrics": ['{"n": builtins.len}'],
}
# only from Python: objects with methods (the CLI has no form for them)
NOT_ON_THE_COMMAND_LINE = {"callbacks"}


def printed(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        main(["fit", *args, "--print_config"])
    assert done.value.code == 0
    return out.getvalue()


def test_every_trainer_option_has_values_here() -> None:
    options = {a.dest.split(".", 1)[1] for a in fit_parser()._actions
               if a.dest.startswith("trainer.") and a.dest.count(".") == 1}
    assert options - NOT_ON_THE_COMMAND_LINE == set(VALUES)


@pytest.mark.parametrize("name,value", [(n, v) for n, vs in VALUES.items() for v in vs])
def test_a_printed_config_reads_back_the_same(tmp_path: Path, name: str, value: str) -> None:
    first = printed(f"--trainer.{name}", value)
    assert "Unable to serialize" not in first
    given = yaml.safe_load(first)["trainer"][name]
    assert given != fit_parser().get_defaults()["trainer"][name]  # the value was taken, not dropped
    path = tmp_path / "config.yaml"
    path.write_text(first)
    assert printed("--config", str(path)) == first


def test_a_run_split_by_a_label_list_replays_and_resumes(tmp_path: Path) -> None:
    labels = [i % 7 for i in range(1797)]  # one group label per digit
    run = tmp_path / "run"
    common = ["--trainer.max_epochs", "null", "--trainer.warmup_steps", "0", "--trainer.val_every", "2",
              "--trainer.checkpoint_every", "2", "--trainer.progress", "false", "--trainer.valid_frac", "0.3"]
    assert main(["fit", *common, "--trainer.max_steps", "2", "--trainer.split_by", json.dumps(labels),
                 "--run-dir", str(run)]) == 0
    stored = yaml.safe_load((run / "config.yaml").read_text())["trainer"]
    assert stored["split_by"] == labels
    assert main(["fit", "--resume", str(run), "--trainer.max_steps", "4"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4


TINY = ["--trainer.max_steps", "2", "--trainer.max_epochs", "null", "--trainer.warmup_steps", "0",
        "--trainer.progress", "false", "--data.n", "64", "--trainer.valid_frac", "null", "--trainer.val_every", "null"]


def test_a_users_config_yaml_in_the_run_folder_is_never_replaced_silently(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("my: notes\n")
    assert main(["fit", *TINY, "--run-dir", str(run)]) == 2
    err = capsys.readouterr().err
    assert "config.yaml that cadence fit did not write" in err and "--overwrite" in err
    assert (run / "config.yaml").read_text() == "my: notes\n"
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml"]
    assert main(["fit", *TINY, "--run-dir", str(run), "--overwrite"]) == 0
    assert "replaced config.yaml (not written by cadence fit)" in capsys.readouterr().err
    assert yaml.safe_load((run / "config.yaml").read_text())["trainer"]["max_steps"] == 2


def test_cadence_fits_own_config_yaml_is_replayed_in_its_folder(tmp_path: Path) -> None:
    """A config.yaml cadence fit wrote (a run that failed before its first record) is its own: used again."""
    run = tmp_path / "run"
    assert main(["fit", *TINY, "--run-dir", str(run)]) == 0
    for name in ("metrics.jsonl", "final", "checkpoints"):
        path = run / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    assert main(["fit", "--config", str(run / "config.yaml"), "--run-dir", str(run)]) == 0
