"""The command line end to end: the demo, config round trip, run folders, help, and one error per mistake."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cadence import Trainer
from cadence.cli.main import SKIP, main
from cadence.demo import CONFIG

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["--trainer.max_epochs", "2", "--trainer.warmup_steps", "5", "--trainer.progress", "false"]


def fit(*args: str) -> int:
    return main(["fit", *args])


def test_examples_digits_is_the_demo_config() -> None:
    assert (ROOT / "examples" / "digits.yaml").read_text() == CONFIG.read_text()


def test_demo_trains_to_95_percent_with_a_summary(tmp_path: Path) -> None:
    run = tmp_path / "demo"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "cadence", "fit", "--run-dir", str(run)], capture_output=True,
                          text=True, env=env, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    summary = proc.stdout.strip().splitlines()[-1]
    assert "val_acc=0.9" in summary and str(run) in summary
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if r["split"] == "val"]
    assert val[-1]["parts"]["acc"] >= 0.95
    train = [r for r in records if r["split"] == "train"]
    assert {"step", "epoch", "split", "loss", "parts", "lr", "samples_per_s", "elapsed_s"} <= set(train[0])


def test_run_folder_contents(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *SHORT) == 0
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "final", "metrics.jsonl"]
    from cadence.demo import DigitsMLP

    model = DigitsMLP()
    model.load_state_dict(load_file(run / "final" / "model.safetensors"))
    out = capsys.readouterr().out
    assert f"run={run}" in out.splitlines()[-1]


def test_config_round_trip_reproduces_the_run(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        fit(*SHORT, "--print_config")
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert "trainer:" in printed and "max_epochs: 2" in printed and "class_path: cadence.demo.DigitsMLP" in printed
    assert fit("--run-dir", str(tmp_path / "a"), *SHORT) == 0
    assert fit("--config", str(tmp_path / "resolved.yaml"), "--run-dir", str(tmp_path / "b")) == 0
    a = load_file(tmp_path / "a" / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the run's own config.yaml replays it too
    assert fit("--config", str(tmp_path / "a" / "config.yaml"), "--run-dir", str(tmp_path / "c")) == 0
    c = load_file(tmp_path / "c" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


def test_dotted_overrides_reach_the_trainer(tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *SHORT, "--trainer.max_steps", "7", "--trainer.lr", "3e-4",
               "--trainer.log_every", "7") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 7
    config = (run / "config.yaml").read_text()
    assert "max_steps: 7" in config and "lr: 0.0003" in config


def test_existing_run_folder_is_not_clobbered(tmp_path: Path, capsys) -> None:
    run = tmp_path / "run"
    assert fit("--run-dir", str(run), *SHORT) == 0
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert fit("--run-dir", str(run), *SHORT, "--trainer.lr", "0.1") == 2
    err = capsys.readouterr().err
    assert "--resume" in err and "--overwrite" in err and str(run) in err
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert fit("--run-dir", str(run), *SHORT, "--trainer.max_steps", "6", "--overwrite") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records) == 6


@pytest.mark.parametrize("args,expected", [
    (["--trainer.lrr", "3"], ["trainer.lrr", "did you mean --trainer.lr"]),
    (["--trainer.max_steps", "abc"], ["trainer.max_steps", "'abc'", "int"]),
    (["--model.class_path", "nowhere.Model"], ["model.class_path", "nowhere.Model", "does not import"]),
    (["--config", "missing.yaml"], ["--config", "missing.yaml", "does not exist"]),
    (["--trainer.max_steps", "-1"], ["max_steps=-1", "positive"]),
    (["--trainer.optimizer", "adamz"], ["optimizer='adamz'", "adamw"]),
])
def test_bad_input_gives_one_clear_error(tmp_path: Path, capsys, args: list[str], expected: list[str]) -> None:
    os.chdir(tmp_path)
    assert fit(*args, "--run-dir", str(tmp_path / "run")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cadence: error:") and "Traceback" not in err
    for fragment in expected:
        assert fragment.lower() in err.lower()
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_unknown_key_in_a_config_file(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  max_step: 10\n")
    assert fit("--config", str(path)) == 2
    assert "did you mean --trainer.max_steps" in capsys.readouterr().err


def test_config_that_is_not_yaml(tmp_path: Path, capsys) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    assert fit("--config", str(path)) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "YAML" in err


def test_data_class_path_that_does_not_import(tmp_path: Path, capsys) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  class_path: nowhere.Data\n")
    assert fit("--config", str(CONFIG), "--config", str(path), "--run-dir", str(tmp_path / "r")) == 2
    assert "data.class_path='nowhere.Data'" in capsys.readouterr().err


def test_run_folder_not_writable(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert fit("--run-dir", str(blocker / "run"), *SHORT) == 2
    err = capsys.readouterr().err
    assert "--run-dir" in err and "cannot write" in err


def test_help_lists_every_trainer_argument(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["fit", "--help"])
    text = capsys.readouterr().out
    for name in inspect.signature(Trainer).parameters:
        if name not in SKIP:
            assert f"--trainer.{name}" in text, name
    assert "default: 32" in text and "--run-dir" in text and "--print_config" in text
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "fit" in capsys.readouterr().out


def test_console_script_and_module_are_the_same_command() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    module = subprocess.run([sys.executable, "-m", "cadence", "fit", "--help"], capture_output=True, text=True,
                            env=env, timeout=60)
    assert module.returncode == 0 and "--trainer.batch_size" in module.stdout
    script = Path(sys.executable).with_name("cadence")
    if script.exists():
        direct = subprocess.run([str(script), "fit", "--help"], capture_output=True, text=True, timeout=60)
        assert direct.stdout == module.stdout
