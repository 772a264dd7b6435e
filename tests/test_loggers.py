"""Loggers: names and errors, and each tracker's files read back by that tracker's own reader.

A short real training run feeds its records, at its log points, to ``build_loggers``; each test then reads
the tracker's output back and checks it holds the same numbers cadence wrote to ``metrics.jsonl``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cadence import ConfigError
from cadence.loggers.build import build_loggers, check_loggers, flatten, scalars
from cadence.runs import read_records
from helpers import MLP, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {"model": {"class_path": "test_loggers.PartsMLP"},
          "trainer": {"lr": 0.003, "max_steps": 30, "milestones": [10, 20], "max_grad_norm": None}}


class PartsMLP(MLP):
    """Returns the loss and an accuracy part, so records carry ``parts``."""

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:  # type: ignore[override]
        logits = self.net(x)
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}


class ToLoggers:
    """A callback doing what the Trainer does with ``loggers=``: build at fit start, log each record, close."""

    def __init__(self, names: list[str], folder: Path) -> None:
        self.names, self.folder, self.loggers = names, folder, []

    def on_fit_start(self, trainer: Any) -> None:
        self.loggers = build_loggers(self.names, self.folder, CONFIG)

    def on_log(self, trainer: Any, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def on_fit_end(self, trainer: Any) -> None:
        for logger in self.loggers:
            logger.close()


def train(names: list[str], folder: Path) -> list[dict[str, Any]]:
    """30 steps, logged every 5, validated every 10; returns the records cadence wrote to metrics.jsonl."""
    t = trainer(PartsMLP(), make_data(80), valid_frac=0.25, batch_size=8, max_steps=30, log_every=5,
                val_every=10, lr=3e-3, warmup_steps=5, schedule="cosine", max_grad_norm=1.0,
                callbacks=[ToLoggers(names, folder)])
    t.fit()
    records = read_records(folder)
    assert {"train", "val"} <= {r["split"] for r in records}
    assert all("acc" in r["parts"] for r in records if "loss" in r)
    return records


def expected(records: list[dict[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Every tracker series as (step, value), built from the records."""
    series: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        for name, value in scalars(r).items():
            series.setdefault(name, []).append((r["step"], value))
    return series


# ------------------------------------------------------------------------------------------ names and errors
def test_jsonl_is_always_first_and_names_are_deduplicated() -> None:
    assert check_loggers([]) == ("jsonl",)
    assert check_loggers("jsonl") == ("jsonl",)
    assert check_loggers(["jsonl", "jsonl"]) == ("jsonl",)


def test_unknown_name_is_one_clear_error() -> None:
    with pytest.raises(ConfigError) as err:
        check_loggers(["jsonl", "tensorbord"])
    message = str(err.value)
    assert message.startswith("loggers=['jsonl', 'tensorbord']: 'tensorbord' is not a logger")
    assert "'tensorboard'" in message and "--trainer.loggers" in message


@pytest.mark.parametrize("name,package", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                          ("mlflow", "sqlalchemy")])
def test_missing_package_names_the_extra(name: str, package: str, monkeypatch, tmp_path: Path) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == package else real(n, *a))
    with pytest.raises(ConfigError, match=rf'needs the package\(s\) {package}.*pip install "cadence\[{name}\]"'):
        build_loggers([name], tmp_path)
    assert not any(tmp_path.iterdir())  # nothing was written


def test_trackers_need_a_run_folder() -> None:
    assert build_loggers(["jsonl"], None) == []
    pytest.importorskip("tensorboard")
    with pytest.raises(ConfigError, match=r"^loggers=\['tensorboard'\]: trackers write into the run folder; pass "
                       r"run_dir=\.\.\. \(--run-dir\), or leave out tensorboard\.$"):
        check_loggers(["tensorboard"], has_run_dir=False)
    with pytest.raises(ConfigError, match="trackers write into the run folder"):
        build_loggers(["tensorboard"], None)


def test_scalar_names() -> None:
    train = {"step": 5, "split": "train", "loss": 1.5, "parts": {"acc": 0.5}, "lr": 0.1, "grad_norm": 2.0,
             "samples_per_s": 100.0, "elapsed_s": 1.0, "epoch": 0}
    val = {"step": 5, "split": "val", "loss": 1.25, "parts": {"acc": 0.75}, "epoch": 0}
    skipped = {"step": 6, "split": "train", "event": "nonfinite", "value": float("nan"), "skipped_total": 1}
    assert scalars(train) == {"train/loss": 1.5, "train/acc": 0.5, "lr": 0.1, "grad_norm": 2.0,
                              "samples_per_s": 100.0}
    assert scalars(val) == {"val/loss": 1.25, "val/acc": 0.75}
    assert scalars(skipped) == {}


def test_flatten() -> None:
    assert flatten({"trainer": {"lr": 0.1, "milestones": [1, 2], "ema": None, "opt": {"b": True}}, "x": "s"}) == {
        "trainer.lr": 0.1, "trainer.milestones": "[1, 2]", "trainer.ema": "null", "trainer.opt.b": True, "x": "s"}


# ------------------------------------------------------------------------------------------ read back
def test_tensorboard_event_files_hold_the_logged_numbers(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    records = train(["tensorboard"], tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    want = expected(records)
    assert set(events.Tags()["scalars"]) == set(want)
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "lr", "grad_norm", "samples_per_s"} <= set(want)
    for name, points in want.items():
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert got == [(step, float(np.float32(value))) for step, value in points], name  # stored as float32

    start = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["trainer.lr"].number_value == 0.003
    assert start.hparams["trainer.milestones"].string_value == "[10, 20]"
    assert start.hparams["model.class_path"].string_value == "test_loggers.PartsMLP"


def test_tensorboard_hides_what_a_crashed_attempt_logged_after_the_checkpoint(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    first = build_loggers(["tensorboard"], tmp_path)[1]
    for step in (10, 20, 30):
        first.log({"step": step, "split": "train", "loss": float(step)})
    first.close()
    resumed = build_loggers(["tensorboard"], tmp_path, start_step=20)[1]  # resumed from the step-20 checkpoint
    for step in (30, 40):
        resumed.log({"step": step, "split": "train", "loss": step + 0.5})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(10, 10.0), (20, 20.0), (30, 30.5),
                                                                        (40, 40.5)]


def test_wandb_offline_run_holds_the_logged_numbers(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_X_DISABLE_STATS", "true")  # no system-metrics sampler in tests
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run_dir = tmp_path / "run"

    records = train(["wandb"], run_dir)
    [log] = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    # wandb's own reader of the .wandb transaction log (wandb-core), one JSON object per record.
    read = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(log)], cwd=run_dir,
                          capture_output=True, text=True, timeout=120)
    if read.returncode != 0 and "No such command" in read.stderr:
        pytest.skip("this wandb has no `wandb leet inspect` (wandb >= 0.29)")
    assert read.returncode == 0, read.stderr
    rows = [json.loads(line) for line in read.stdout.splitlines() if line.startswith("{")]

    history = {r["history"]["step"]["num"]: {k: v for k, v in r["history"]["item"].items() if not k.startswith("_")}
               for r in rows if r["type"] == "history"}
    want: dict[int, dict[str, float]] = {}
    for record in records:  # W&B merges what is logged at one step into one history row
        want.setdefault(record["step"], {}).update(scalars(record))
    assert history == want
    [run] = [r["run"] for r in rows if r["type"] == "run"]
    config = run["config"]["update"]
    assert config["trainer.lr"] == 0.003 and config["trainer.milestones"] == "[10, 20]"
    assert [r["exit"]["exit_code"] for r in rows if r["type"] == "exit"] == [0]
    assert not any(work.iterdir())  # everything went under the run folder


@pytest.mark.filterwarnings("ignore:The ``noload`` loader strategy is deprecated")  # inside mlflow, SQLAlchemy 2.1
def test_mlflow_store_holds_the_logged_numbers(tmp_path: Path, monkeypatch) -> None:
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    from mlflow.tracking import MlflowClient

    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    run_dir = tmp_path / "run"

    records = train(["mlflow"], run_dir)
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow' / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("cadence").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    for name, points in expected(records).items():
        history = client.get_metric_history(run.info.run_id, name)
        assert [(m.step, m.value) for m in history] == points, name
    assert run.data.params["trainer.lr"] == "0.003" and run.data.params["trainer.max_grad_norm"] == "null"
    assert not any(work.iterdir())  # everything went under the run folder
