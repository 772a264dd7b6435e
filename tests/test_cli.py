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
# in-process runs of tiny models (the subprocess ones keep torch's threads)
pytestmark = pytest.mark.usefixtures("one_thread")
# the demo config cut to 2 steps: what these tests check needs no more (the full demo: the slow test below)
SHORT = ["--trainer.max_steps", "2", "--trainer.warmup_steps", "1", "--trainer.progress", "false"]


def fit(*args: str) -> int:
    return main(["fit", *args])


def test_examples_digits_is_the_demo_config() -> None:
    assert (ROOT / "examples" / "digits.yaml").read_text() == CONFIG.read_text()


@pytest.mark.slow  # the one full demo run (about 10 s on 2 idle cores); CI runs it
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
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert summary.startswith("done: step=2 ") and "val_acc=" in summary and f"run={run}" in summary
    train = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][0]
    assert {"step", "epoch", "split", "loss", "parts", "lr", "samples_per_s", "elapsed_s"} <= set(train)


def test_config_round_trip_reproduces_the_run(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit) as stop:
        fit(*SHORT, "--print_config")
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    (tmp_path / "resolved.yaml").write_text(printed)
    assert "trainer:" in printed and "max_steps: 2" in printed and "class_path: cadence.demo.DigitsMLP" in printed
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


# ----------------------------------------------------------------------------------------------- the run folder
TINY = '''
import os
import time

import torch
from torch import nn
from torch.utils.data import TensorDataset


class Data(TensorDataset):
    def __init__(self, n: int = 64) -> None:
        x = torch.randn(n, 4, generator=torch.Generator().manual_seed(0))
        super().__init__(x, x.sum(1, keepdim=True))


class Net(nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x, y):
        time.sleep(float(os.environ.get("TINY_DELAY", "0")))
        return nn.functional.mse_loss(self.net(x), y)
'''
TINY_YAML = """model:
  class_path: tiny.Net
  init_args:
    hidden: 8
data:
  class_path: tiny.Data
val_data:
  class_path: tiny.Data
  init_args:
    n: 16
trainer:
  batch_size: 8
  max_steps: 2
  log_every: 1
  val_every: 1
  checkpoint_every: 1
  progress: false
  device: cpu
"""


@pytest.fixture
def tiny(tmp_path: Path, monkeypatch) -> Path:
    """A 2-step training config (tiny.yaml, classes in tiny.py) in the working directory ``tmp_path``."""
    (tmp_path / "tiny.py").write_text(TINY)
    (tmp_path / "tiny.yaml").write_text(TINY_YAML)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "tiny.yaml"


def cli(cwd: Path, *args: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "TINY_DELAY": str(delay)}
    return subprocess.Popen([sys.executable, "-m", "cadence", "fit", *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_checkpoint(run: Path, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not list((run / "checkpoints").glob("step-*")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint in time"
        time.sleep(0.1)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_six_concurrent_default_runs_make_six_intact_folders(tiny: Path) -> None:
    procs = [cli(tiny.parent, "--config", "tiny.yaml") for _ in range(6)]
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    runs = sorted((tiny.parent / "runs").iterdir())
    assert len(runs) == 6 and all(r.name.split("-", 2)[2].startswith("tiny") for r in runs)
    for run in runs:
        assert (run / "final" / "model.safetensors").is_file() and (run / "config.yaml").is_file()
        assert f"run_dir: {Path('runs') / run.name}" in (run / "config.yaml").read_text()
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 1, 2, 2]  # train and val at each step: one run's records, not two merged


def test_a_fit_on_a_folder_in_training_is_refused_and_sigkill_leaves_no_lock(tiny: Path, capsys) -> None:
    import signal

    run = tiny.parent / "run"
    proc = cli(tiny.parent, "--config", "tiny.yaml", "--run-dir", "run", "--trainer.max_steps", "100000", delay=0.05)
    try:
        wait_for_checkpoint(run, proc)
        assert fit("--resume", str(run)) == 2
        err = capsys.readouterr().err
        assert str(run) in err and f"PID {proc.pid}" in err
        assert fit("--config", str(tiny), "--run-dir", str(run), "--overwrite") == 2
        assert f"PID {proc.pid}" in capsys.readouterr().err
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.communicate()
    step = int(sorted((run / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    assert fit("--resume", str(run), "--trainer.max_steps", str(step + 1)) == 0
    assert not (run / ".lock").exists()


def test_a_stop_signal_says_how_to_resume(tiny: Path) -> None:
    import signal

    run = tiny.parent / "run"
    proc = cli(tiny.parent, "--config", "tiny.yaml", "--run-dir", "run", "--trainer.max_steps", "100000", delay=0.05)
    try:
        wait_for_checkpoint(run, proc)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, err
    step = int(sorted((run / "checkpoints").glob("step-*"))[-1].name.split("-")[1])
    assert f"stopped at step {step}, checkpoint saved: resume with `cadence fit --resume run`" in err
    assert "Traceback" not in err


def test_a_failed_resume_leaves_config_yaml_byte_for_byte(tiny: Path, capsys) -> None:
    run = tiny.parent / "run"
    assert fit("--config", str(tiny), "--run-dir", str(run)) == 0
    before = snapshot(run)
    assert fit("--resume", str(run), "--trainer.batch_size", "16", "--trainer.max_steps", "4") == 2
    assert "batch_size 8 -> 16" in capsys.readouterr().err
    assert fit("--resume", str(run), "--model.init_args.hidden", "16", "--trainer.max_steps", "4") == 2
    assert "mis-shaped" in capsys.readouterr().err
    assert fit("--resume", str(run), "--trainer.lr", "-1") == 2
    assert snapshot(run) == before
    assert fit("--resume", str(run)) == 0  # a plain retry works (the run is already at max_steps)
    assert fit("--resume", str(run), "--trainer.max_steps", "3") == 0
    assert "max_steps: 3" in (run / "config.yaml").read_text()


def test_bad_input_on_an_existing_run_with_overwrite_changes_nothing(tiny: Path, capsys) -> None:
    run = tiny.parent / "run"
    assert fit("--config", str(tiny), "--run-dir", str(run)) == 0
    before = snapshot(run)
    assert fit("--config", str(tiny), "--run-dir", str(run), "--overwrite", "--trainer.lr", "-1") == 2
    assert fit("--config", str(tiny), "--run-dir", str(run), "--overwrite", "--model.class_path", "tiny.Nope") == 2
    assert snapshot(run) == before
    fresh = tiny.parent / "fresh"
    assert fit("--config", str(tiny), "--run-dir", str(fresh), "--trainer.lr", "-1") == 2
    assert fit("--config", str(tiny), "--trainer.lr", "-1") == 2  # a default folder
    assert not fresh.exists() and not list((tiny.parent / "runs").glob("*"))


def test_overwrite_keeps_a_users_file_under_checkpoints(tiny: Path, capsys) -> None:
    run = tiny.parent / "run"
    assert fit("--config", str(tiny), "--run-dir", str(run), "--trainer.max_steps", "3") == 0
    (run / "checkpoints" / "my-notes.txt").write_text("mine")
    (run / "README.md").write_text("mine too")
    capsys.readouterr()
    assert fit("--config", str(tiny), "--run-dir", str(run), "--overwrite") == 0
    err = capsys.readouterr().err
    assert "removed" in err and "checkpoints/step-000000003" in err
    assert (run / "checkpoints" / "my-notes.txt").read_text() == "mine"
    assert (run / "README.md").read_text() == "mine too"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["my-notes.txt", "step-000000001",
                                                                       "step-000000002"]


def test_a_folder_holding_no_run_is_used(tiny: Path) -> None:
    run = tiny.parent / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert fit("--config", str(tiny), "--run-dir", str(run)) == 0
    assert (run / "notes.txt").read_text() == "mine"


def test_resume_mistakes_are_named(tiny: Path, capsys) -> None:
    assert fit("--resume", str(tiny.parent / "missing")) == 2
    err = capsys.readouterr().err
    assert err.startswith("cadence: error: --resume=") and "--config" not in err
    run = tiny.parent / "run"
    assert fit("--config", str(tiny), "--run-dir", str(run), "--trainer.max_steps", "3") == 0
    capsys.readouterr()
    assert fit("--resume", str(run), "--run-dir", str(tiny.parent / "other")) == 2
    assert "--run-dir" in capsys.readouterr().err and not (tiny.parent / "other").exists()
    assert fit("--resume", str(run), "--trainer.max_steps", "2") == 2
    err = capsys.readouterr().err
    assert "max_steps=2" in err and "step 3" in err
    for folder in (run / "checkpoints").iterdir():
        (folder / "manifest.json").unlink()  # no usable checkpoint left
    assert fit("--resume", str(run), "--trainer.max_steps", "3") == 0
    err = capsys.readouterr().err
    assert "no usable checkpoint" in err and "step 0" in err


def test_disk_and_name_errors_are_one_sentence(tiny: Path, capsys, monkeypatch) -> None:
    import errno

    assert fit("--config", str(tiny), "--run-dir", "a" * 300) == 2
    err = capsys.readouterr().err
    assert err.startswith("cadence: error:") and "shorter" in err and "Traceback" not in err
    run = tiny.parent / "run"
    assert fit("--config", str(tiny), "--run-dir", str(run)) == 0
    before = snapshot(run / "checkpoints")

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr("cadence.checkpoint.format._write", full)
    capsys.readouterr()
    assert fit("--resume", str(run), "--trainer.max_steps", "4") == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("cadence: error:") and "No space left" in last and "Traceback" not in err
    assert snapshot(run / "checkpoints") == before


def test_export_best(tiny: Path, capsys) -> None:
    run = tiny.parent / "run"
    assert fit("--config", str(tiny), "--run-dir", str(run), "--trainer.max_steps", "4", "--trainer.keep_last", "1",
               "--trainer.keep_best", "[val/loss, max]") == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["loss"] for r in records if r["split"] == "val"}
    worst = max(val, key=val.get)
    assert main(["export", str(run), "--best", "-o", str(tiny.parent / "best.safetensors")]) == 0
    assert f"step-{worst:09d}" in capsys.readouterr().out
    assert load_file(tiny.parent / "best.safetensors").keys() == load_file(run / "final" / "model.safetensors").keys()
