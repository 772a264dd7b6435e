"""Evaluation on any data: ``validate(data)``, ``test(data)``, ``val_batch_size`` and ``cadence fit``'s test_data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cadence import ConfigError
from cadence.cli.main import main
from helpers import MLP, IndexedMLP, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


def indexed(n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    x, y = make_data(n, seed)
    return x, y, torch.arange(n)


def test_validate_on_any_data_is_the_mean_loss_and_leaves_the_run_alone():
    model = MLP()
    t = trainer(model, make_data(40), val_data=make_data(16, seed=1), batch_size=8, max_steps=3)
    t.fit()
    run_val, validated_at, records = dict(t.last_val_metrics), t._validated_at, len(t.history)
    x, y = make_data(50, seed=2)
    with torch.no_grad():
        want = F.cross_entropy(model.net(x), y).item()
    got = t.validate((x, y))
    assert set(got) == {"val/loss"} and got["val/loss"] == pytest.approx(want, rel=1e-5)
    assert (t.last_val_metrics, t._validated_at) == (run_val, validated_at)  # not the run's validation
    assert t.history[records]["split"] == "val" and t.history[records]["loss"] == got["val/loss"]
    test = t.test((x, y))
    assert test == {"test/loss": got["val/loss"]} and test["loss"] == test["test/loss"]
    assert t.history["test/loss"] == [got["val/loss"]]
    assert model.training


def test_val_batch_size_sets_the_validation_batches():
    model = IndexedMLP()
    t = trainer(model, indexed(40), val_data=indexed(50, seed=1), batch_size=8, val_batch_size=16, max_steps=5,
                val_every=5)
    t.fit()
    assert [len(i) for i in model.seen_eval] == [16, 16, 16, 2]
    assert torch.equal(torch.cat(model.seen_eval), torch.arange(50))
    model.seen_eval.clear()
    t.test(indexed(20, seed=2))
    assert [len(i) for i in model.seen_eval] == [16, 4]
    model.seen_eval.clear()
    trainer(model, indexed(40), val_data=indexed(20, seed=1), batch_size=8, max_steps=1).validate()
    assert [len(i) for i in model.seen_eval] == [8, 8, 4]  # default: batch_size


def test_test_after_fit_appends_test_records_to_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    t = trainer(MLP(), make_data(40), val_data=make_data(16, seed=1), batch_size=8, max_steps=4, run_dir=run)
    t.fit()
    before = (run / "metrics.jsonl").read_text().splitlines()
    metrics = t.test(make_data(24, seed=3))
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == len(before) + 1
    assert lines[-1]["split"] == "test" and lines[-1]["step"] == 4
    assert lines[-1]["loss"] == metrics["test/loss"] == t.history[-1]["loss"]


def test_bad_val_batch_size():
    with pytest.raises(ConfigError, match="val_batch_size=0"):
        trainer(MLP(), make_data(40), batch_size=8, max_steps=1, val_batch_size=0)


def test_cli_fit_runs_test_data_after_training(tmp_path: Path, capsys):
    run = tmp_path / "run"
    code = main(["fit", "--run-dir", str(run), "--trainer.max_steps", "6", "--trainer.warmup_steps", "2",
                 "--trainer.progress", "false", "--test_data", "{class_path: cadence.demo.Digits}"])
    assert code == 0
    summary = capsys.readouterr().out.strip().splitlines()[-1]
    assert "test_loss=" in summary and "test_acc=" in summary
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["split"] == "test" and records[-1]["step"] == 6 and "acc" in records[-1]["parts"]
    assert "test_data:" in (run / "config.yaml").read_text()
