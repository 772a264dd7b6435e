"""A stop signal during validation: the pass ends within one batch, is discarded (not logged), the step is
saved and ``fit()`` exits with the signal's code."""

from __future__ import annotations

import json
import signal

import pytest
import torch

from cadence.evaluate import ValidationStopped, evaluate
from cadence.precision import Precision
from cadence.signals import StopSignals
from helpers import MLP, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")


class SignalInValidation(MLP):
    """Counts validation batches; sends ``sig`` to this process during validation batch ``at``."""

    def __init__(self, at: int, sig: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.at, self.sig, self.val_batches = at, sig, 0

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self.training:
            self.val_batches += 1
            if self.val_batches == self.at:
                signal.raise_signal(self.sig)
        return super().forward(x, y)


@pytest.mark.parametrize("sig,code", [(signal.SIGUSR1, 138), (signal.SIGTERM, 143)])
def test_signal_during_validation_stops_within_one_batch_and_saves(tmp_path, sig, code) -> None:
    run = tmp_path / "run"
    model = SignalInValidation(at=2, sig=sig)
    t = trainer(model, make_data(40), val_data=make_data(64, seed=1), batch_size=4, max_steps=20, val_every=3,
                run_dir=run)
    with pytest.raises(SystemExit) as stop:
        t.fit()
    assert stop.value.code == code
    assert model.val_batches == 2  # of 16: the pass ended right after the batch in which the signal came
    assert t.step == 3 and [p.name for p in (run / "checkpoints").iterdir()] == ["step-000000003"]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in records if r["split"] == "val"]  # the partial validation is not logged
    assert not t.last_val_metrics and not [r for r in t.history if r["split"] == "val"]


def test_validation_before_the_signal_is_kept(tmp_path) -> None:
    model = SignalInValidation(at=20)  # validation 1 has 16 batches; the signal comes in validation 2
    t = trainer(model, make_data(40), val_data=make_data(64, seed=1), batch_size=4, max_steps=20, val_every=3,
                run_dir=tmp_path / "run")
    with pytest.raises(SystemExit):
        t.fit()
    assert t.step == 6 and model.val_batches == 20
    assert [r["step"] for r in t.history if r["split"] == "val"] == [3]


def test_evaluate_checks_the_stop_after_each_batch() -> None:
    x, y = make_data(32)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 32, 4)]
    stop = StopSignals()
    seen = []

    def move(batch):
        seen.append(1)
        if len(seen) == 3:
            stop.received = signal.SIGTERM
        return batch

    with pytest.raises(ValidationStopped):
        evaluate(MLP(), batches, Precision("32", torch.device("cpu")), move, None, {}, stop=stop)
    assert len(seen) == 3
    stop.received = None  # no signal: a whole pass, as before
    means = evaluate(MLP(), batches, Precision("32", torch.device("cpu")), lambda b: b, None, {}, stop=stop)
    assert set(means) == {"loss"}
