"""Early stopping at the exact expected step on scripted validation curves: patience, min_delta, mode="max",
several stoppers with stop_when="any"/"all", the logged reason, a monitor that is never logged, resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cadence import ConfigError, EarlyStopping, Trainer
from helpers import CrashAt

pytestmark = pytest.mark.usefixtures("one_thread")

VAL_EVERY = 2


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.lin(x).squeeze(-1) - y).pow(2).mean()


class Scripted:
    """A validation metric whose value at the k-th scheduled validation (step k * VAL_EVERY) is ``curve[k - 1]``.

    A pure function of the trainer's step, so a resumed run sees the same curve. Values are exact in float32.
    """

    def __init__(self, curve: list[float]) -> None:
        self.curve = curve
        self.trainer: Trainer | None = None

    def __call__(self, output: Any, batch: Any) -> torch.Tensor:
        k = self.trainer.step // VAL_EVERY - 1
        return torch.tensor(self.curve[min(k, len(self.curve) - 1)])


def build(curves: dict[str, list[float]], stoppers: list[EarlyStopping], max_steps: int = 40,
          **kw: Any) -> Trainer:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 4, generator=g), torch.randn(32, generator=g)
    metrics = {name: Scripted(curve) for name, curve in curves.items()}
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    t = Trainer(Net(), (x, y), val_data=(x[:12], y[:12]), batch_size=8, max_steps=max_steps, val_every=VAL_EVERY,
                metrics=metrics, early_stopping=stoppers, **kw)
    for m in metrics.values():
        m.trainer = t
    return t


def stop_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in history if r.get("event") == "stop"]


def test_patience_stops_at_the_expected_step():
    # validations at steps 2, 4, 6, 8, 10: best 0.5 at step 4, then three without a strict improvement
    t = build({"s": [1.0, 0.5, 0.75, 0.5, 0.625, 0.25, 0.125]}, [EarlyStopping("val/s", patience=3)])
    t.fit()
    assert t.step == 10
    assert t.history["val/s"] == [1.0, 0.5, 0.75, 0.5, 0.625]  # no validation after the stop
    assert t.stop_reason is not None and "val/s" in t.stop_reason and "3 validations" in t.stop_reason
    assert "0.5" in t.stop_reason  # the best value
    (record,) = stop_records(t.history)
    assert record["step"] == 10 and record["reason"] == t.stop_reason


def test_no_stop_when_the_curve_keeps_improving():
    t = build({"s": [1.0 - i / 16 for i in range(20)]}, [EarlyStopping("val/s", patience=1)], max_steps=12)
    t.fit()
    assert t.step == 12 and t.stop_reason is None and stop_records(t.history) == []


def test_min_delta_counts_small_improvements_as_none():
    curve = [1.0 - i / 16 for i in range(20)]  # improves by 0.0625 per validation
    t = build({"s": curve}, [EarlyStopping("val/s", patience=2, min_delta=0.2)])
    t.fit()
    assert t.step == 6  # 0.9375 and 0.875 are not below 1.0 - 0.2
    t = build({"s": curve}, [EarlyStopping("val/s", patience=2, min_delta=0.05)], max_steps=20)
    t.fit()
    assert t.step == 20 and t.stop_reason is None


def test_mode_max():
    curve = [0.5, 0.75, 0.625, 0.75, 0.875]
    t = build({"acc": curve}, [EarlyStopping("val/acc", patience=2, mode="max")])
    t.fit()
    assert t.step == 8  # best 0.75 at step 4; 0.625 and 0.75 (not strictly higher) are bad
    t = build({"acc": curve}, [EarlyStopping("val/acc", patience=2, mode="min")])
    t.fit()
    assert t.step == 6  # the same curve read as a loss: 0.75 and 0.625 don't beat 0.5


A = [1.0, 2.0, 0.5, 0.25, 0.125, 2.0, 2.0]  # fires at validation 2, then improves
B = [1.0, 0.5, 2.0, 0.25, 0.125, 4.0, 4.0]  # fires at validation 3, then improves; both fire at 6


def two_stoppers() -> list[EarlyStopping]:
    return [EarlyStopping("val/a", patience=1), EarlyStopping("val/b", patience=1)]


def test_stop_when_any():
    t = build({"a": A, "b": B}, two_stoppers(), stop_when="any")
    t.fit()
    assert t.step == 4
    assert "val/a" in t.stop_reason and "val/b" not in t.stop_reason


def test_stop_when_all():
    t = build({"a": A, "b": B}, two_stoppers(), stop_when="all")
    t.fit()
    assert t.step == 12
    assert "val/a" in t.stop_reason and "val/b" in t.stop_reason
    (record,) = stop_records(t.history)
    assert record["step"] == 12


def test_a_monitor_never_logged_raises_at_the_first_validation_listing_the_names():
    t = build({"s": [1.0]}, [EarlyStopping("val/acc")])
    with pytest.raises(ConfigError, match="val/acc") as err:
        t.fit()
    assert "val/loss" in str(err.value) and "val/s" in str(err.value)
    assert t.step == VAL_EVERY


def test_bad_stopping_arguments_are_refused():
    with pytest.raises(ConfigError, match="mode"):
        EarlyStopping(mode="lowest")
    with pytest.raises(ConfigError, match="patience"):
        EarlyStopping(patience=0)
    with pytest.raises(ConfigError, match="min_delta"):
        EarlyStopping(min_delta=-1.0)
    with pytest.raises(ConfigError, match="stop_when"):
        build({"s": [1.0]}, [EarlyStopping("val/s")], stop_when="first")


def test_stopping_state_round_trips():
    s = EarlyStopping("val/loss", patience=3)
    for v in (1.0, 0.5, 0.75):
        s.observe({"val/loss": v})
    fresh = EarlyStopping("val/loss", patience=3)
    fresh.load_state_dict(json.loads(json.dumps(s.state_dict())))
    assert (fresh.best, fresh.bad_validations) == (0.5, 1)
    assert fresh.observe({"val/loss": 0.75}) is False and fresh.observe({"val/loss": 0.75}) is True


CURVE = [1.0, 0.5, 0.75, 0.75, 0.75, 0.25, 0.125]  # patience 3: stops at step 10


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_stopping_state_survives_resume(tmp_path):
    def make(run: Path, **kw: Any) -> Trainer:
        return build({"s": CURVE}, [EarlyStopping("val/s", patience=3)], run_dir=run, checkpoint_every=3, **kw)

    reference = make(tmp_path / "ref")
    reference.fit()
    assert reference.step == 10

    # the checkpoint at step 6 holds one bad validation (at step 6); a stopper that forgot it would stop at 14
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path / "run", callbacks=[CrashAt(7)]).fit()
    resumed = make(tmp_path / "run", resume="auto")
    resumed.fit()
    assert resumed.step == 10
    assert resumed.stop_reason == reference.stop_reason
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    (record,) = stop_records(records(tmp_path / "run"))
    assert record["step"] == 10 and record["reason"] == reference.stop_reason


def test_resuming_a_run_that_stopped_early_does_not_train_further(tmp_path):
    def make(**kw: Any) -> Trainer:
        return build({"s": CURVE}, [EarlyStopping("val/s", patience=3)], run_dir=tmp_path / "run", **kw)

    first = make()
    first.fit()
    assert first.step == 10
    again = make(resume="auto")
    again.fit()
    assert again.step == 10 and again.should_stop
    assert again.stop_reason == first.stop_reason
    assert len(stop_records(records(tmp_path / "run"))) == 1


def test_early_stopping_without_validation_data_is_refused():
    x, y = torch.randn(16, 4), torch.randn(16)
    with pytest.raises(ConfigError, match="early_stopping"):
        Trainer(Net(), (x, y), max_steps=2, early_stopping=[EarlyStopping("val/loss")], device="cpu",
                progress=False)
