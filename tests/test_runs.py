"""``cadence runs``: finding run folders, their status, step, best validation value and wall time."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from cadence import ConfigError
from cadence.cli.main import main
from cadence.runs import find_runs, format_duration, read_records, status, summarize, wall_time


def fake_run(path: Path, steps: int = 100, lr: float = 0.01, val_every: int = 50, final: bool = True,
             age_s: float = 0.0, last: dict[str, Any] | None = None) -> Path:
    """A run folder as ``cadence fit`` writes it: config.yaml, metrics.jsonl, and final weights if ``final``.

    The loss falls as ``exp(-lr * step)``; ``age_s`` backdates every file, as for a run that ended long ago.
    """
    path.mkdir(parents=True)
    config = {"model": {"class_path": "cadence.demo.DigitsMLP"}, "trainer": {"lr": lr, "max_steps": steps,
              "val_every": val_every, "batch_size": 64}, "run_dir": str(path)}
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    records = []
    for step in range(10, steps + 1, 10):
        loss = math.exp(-lr * step)
        records.append({"step": step, "epoch": step // 50, "split": "train", "loss": loss, "grad_norm": 1 + loss,
                        "parts": {"acc": 1 - loss / 2}, "lr": lr * (1 - step / (steps + 1)),
                        "samples_per_s": 1000.0 + step, "elapsed_s": step / 100})
        if step % val_every == 0:
            records.append({"step": step, "epoch": step // 50, "split": "val", "loss": loss * 1.1,
                            "parts": {"acc": 1 - loss / 1.8}})
    records += [last] if last else []
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if final:
        (path / "final").mkdir()
        (path / "final" / "model.safetensors").write_bytes(b"")
    then = time.time() - age_s
    for file in path.rglob("*"):
        os.utime(file, (then, then))
    return path


def test_status_of_each_kind_of_run(tmp_path: Path) -> None:
    hour = 3600.0
    finished = fake_run(tmp_path / "finished", age_s=hour)
    running = fake_run(tmp_path / "running", final=False)
    crashed = fake_run(tmp_path / "crashed", final=False, age_s=hour)
    stopped = fake_run(tmp_path / "stopped", final=False, age_s=hour,
                       last={"step": 100, "epoch": 2, "split": "train", "event": "stop", "reason": "signal 15"})
    for run, expected in [(finished, "finished"), (running, "running"), (crashed, "crashed"), (stopped, "stopped")]:
        assert status(run, read_records(run)) == expected, run.name


def test_a_finished_run_continued_later_is_no_longer_finished(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r", age_s=3600)
    with open(run / "metrics.jsonl", "a") as f:  # resumed with a higher max_steps: new records after final/
        f.write(json.dumps({"step": 110, "split": "train", "loss": 0.1}) + "\n")
    assert status(run, read_records(run)) == "running"
    assert status(run, read_records(run), now=time.time() + 3600) == "crashed"


def test_summary_row(tmp_path: Path) -> None:
    row = summarize(fake_run(tmp_path / "a", steps=100, lr=0.01, val_every=50))
    assert (row.name, row.status, row.step, row.max_steps, row.best_step) == ("a", "finished", 100, 100, 100)
    assert row.best == pytest.approx(math.exp(-1.0) * 1.1)
    assert row.wall_s == pytest.approx(1.0)
    best_acc = summarize(tmp_path / "a", metric="val/acc", mode="max")
    assert best_acc.best == pytest.approx(1 - math.exp(-1.0) / 1.8) and best_acc.best_step == 100


def test_wall_time_adds_up_resumed_attempts() -> None:
    records = [{"elapsed_s": 1.0}, {"elapsed_s": 2.0}, {"split": "val"}, {"elapsed_s": 0.5}, {"elapsed_s": 3.0}]
    assert wall_time(records) == 5.0
    assert wall_time([{"split": "val"}]) is None


def test_a_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "r", final=False)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 110, "split": "tr')
    assert read_records(run)[-1]["step"] == 100


def test_find_runs(tmp_path: Path) -> None:
    for name in ("b", "a"):
        fake_run(tmp_path / name)
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("")
    assert [p.name for p in find_runs(tmp_path)] == ["a", "b"]
    assert find_runs(tmp_path / "a") == [tmp_path / "a"]  # a run folder itself
    with pytest.raises(ConfigError, match="it holds no run folders"):
        find_runs(tmp_path / "empty")
    with pytest.raises(ConfigError, match="no such folder"):
        find_runs(tmp_path / "missing")


def test_durations() -> None:
    assert format_duration(None) == "-"
    assert format_duration(8.27) == "8.3 s"
    assert format_duration(3725.2) == "1:02:05"


def test_cli_table(tmp_path: Path, capsys) -> None:
    fake_run(tmp_path / "20260101-a", lr=0.01, age_s=7200)
    fake_run(tmp_path / "20260102-b", lr=0.02, final=False)
    assert main(["runs", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "status", "step", "best", "val/loss", "wall"]
    assert lines[1].split() == ["20260101-a", "finished", "100/100", f"{math.exp(-1) * 1.1:.4g}", "@100", "1.0", "s"]
    assert lines[2].split()[:3] == ["20260102-b", "running", "100/100"]


def test_cli_errors_are_one_line(tmp_path: Path, capsys) -> None:
    assert main(["runs", str(tmp_path / "missing")]) == 2
    assert main(["runs", str(tmp_path), "--mode", "best"]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith("cadence: error: dir=") and "no such folder" in errors[0]
    assert errors[1].startswith("cadence: error: --mode='best': use \"min\"")


def test_damaged_metrics_are_skipped_with_one_warning_and_never_hide_other_runs(tmp_path: Path, capsys) -> None:
    import importlib.util

    good = fake_run(tmp_path / "20260101-good")
    damaged = fake_run(tmp_path / "20260102-damaged")
    with open(damaged / "metrics.jsonl", "ab") as f:
        f.write(b"\x89PNG\r\n\x1a\n\x00\x00\xff binary\n")
        f.write(b'{"step": "ten", "split": "train", "loss": 1.0}\n{"step": 5, "split": "train", "loss": "high"}\n')
    broken = fake_run(tmp_path / "20260103-broken")
    (broken / "config.yaml").write_text("trainer: [unclosed\n")
    with pytest.warns(UserWarning) as caught:
        assert main(["runs", str(tmp_path)]) == 0
    messages = [str(w.message) for w in caught]
    assert sum("metrics.jsonl: skipped" in m and str(damaged) in m for m in messages) == 1
    assert any(str(broken) in m for m in messages)
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert rows[good.name][1] == "finished" and rows[damaged.name][1] == "finished"
    assert rows[damaged.name][2] == "100/100" and rows[broken.name][1] == "unreadable"
    assert len(read_records(damaged)) == len(read_records(good))
    if importlib.util.find_spec("matplotlib") is not None:
        assert main(["report", str(damaged)]) == 0
        assert (damaged / "report.html").is_file()


def test_a_run_whose_lock_a_live_process_holds_is_running(tmp_path: Path) -> None:
    import subprocess
    import sys

    run = fake_run(tmp_path / "r", age_s=7200, final=False)
    assert status(run, read_records(run)) == "crashed"
    (run / ".lock").write_text(f"{os.getpid()}\n")
    assert status(run, read_records(run)) == "running"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(dead.stdout)  # left behind by a killed run: its process is gone
    assert status(run, read_records(run)) == "crashed"
