"""``schedule="plateau"``: the rate follows ``torch.optim.lr_scheduler.ReduceLROnPlateau`` step for step.

The rule itself is checked as a pure function (no model); two short trainings check that the loop feeds it
each validation's metric after warm-up, and that a resume continues it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from cadence import ConfigError, Plateau
from helpers import MLP, Events, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LR = 0.1


def torch_rates(values: list[float], lr: float = LR, **options) -> list[float]:
    """The rate after each ``ReduceLROnPlateau.step(value)``, on a one-parameter SGD."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **options)
    out = []
    for v in values:
        sched.step(v)
        out.append(opt.param_groups[0]["lr"])
    return out


def plateau_rates(values: list[float], lr: float = LR, plateau: Plateau | None = None, **options) -> list[float]:
    plateau = plateau if plateau is not None else Plateau(**options)
    out = []
    for v in values:
        plateau.observe({"val/loss": v}, lr)
        out.append(plateau.rate(lr))
    return out


def noisy_values(n: int, seed: int) -> list[float]:
    """A loss that falls, then wanders: improvements, plateaus, ties and a rise."""
    g = torch.Generator().manual_seed(seed)
    trend = [1.0 / (1 + 0.3 * i) if i < n // 3 else 1.0 / (1 + 0.1 * n) for i in range(n)]
    return [round(t + 0.02 * float(torch.randn((), generator=g)), 3) for t in trend]


OPTIONS = [
    {},
    {"patience": 0},
    {"patience": 2, "factor": 0.5},
    {"patience": 1, "factor": 0.25, "cooldown": 2},
    {"patience": 1, "factor": 0.5, "min_lr": 0.02},
    {"patience": 1, "threshold": 0.05, "threshold_mode": "abs"},
    {"patience": 1, "threshold": 0.1},
    {"mode": "max", "patience": 1, "factor": 0.5},
    {"mode": "max", "patience": 0, "threshold": 0.01, "threshold_mode": "abs", "cooldown": 1},
    {"patience": 0, "factor": 0.5, "eps": 0.03},
]


@pytest.mark.parametrize("options", OPTIONS, ids=[str(i) for i in range(len(OPTIONS))])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rates_equal_reduce_lr_on_plateau(options, seed):
    values = noisy_values(40, seed)
    expected = torch_rates(values, **options)
    assert plateau_rates(values, **options) == expected  # exactly: the same float operations
    if options:
        assert len(set(expected)) > 1  # the sequence really reduces the rate


def test_nan_and_infinite_values_count_as_no_improvement_like_torch():
    values = [1.0, math.nan, 0.5, math.inf, math.nan, math.nan, 0.4, -math.inf, 3.0, 2.0]
    for options in ({"patience": 0}, {"patience": 1, "mode": "max"}, {"patience": 0, "threshold_mode": "abs"}):
        assert plateau_rates(values, **options) == torch_rates(values, **options)


@pytest.mark.parametrize("cut", [1, 7, 13, 20])
def test_state_round_trip_through_json_continues_exactly(cut):
    options = {"patience": 1, "factor": 0.5, "cooldown": 1, "min_lr": 0.001}
    values = noisy_values(30, 3)
    first = Plateau(**options)
    head = plateau_rates(values[:cut], plateau=first)
    second = Plateau(**options)
    second.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert second.state_dict() == first.state_dict()
    assert head + plateau_rates(values[cut:], plateau=second) == torch_rates(values, **options)


def test_monitor_must_be_logged():
    with pytest.raises(ConfigError, match="val/acc.*never logged.*val/loss"):
        Plateau(monitor="val/acc").observe({"val/loss": 1.0}, LR)


@pytest.mark.parametrize("kwargs,piece", [
    ({"mode": "best"}, "mode='best'"),
    ({"threshold_mode": "pct"}, "threshold_mode='pct'"),
    ({"factor": 1.0}, "factor=1.0"),
    ({"patience": -1}, "patience=-1"),
    ({"cooldown": 1.5}, "cooldown=1.5"),
    ({"min_lr": -1.0}, "min_lr=-1.0"),
])
def test_bad_options(kwargs, piece):
    with pytest.raises(ConfigError, match=piece.replace("(", r"\(")):
        Plateau(**kwargs)


# ----------------------------------------------------------------------------------------------- in the loop
LOOP = {"patience": 1, "factor": 0.5, "threshold": 0.1, "cooldown": 1}

def run(run_dir=None, max_steps=24, warmup=0, **kw):
    events = Events()
    t = trainer(MLP(), make_data(64), val_data=make_data(32, seed=1), batch_size=8, max_steps=max_steps,
                optimizer="sgd", lr=LR, schedule="plateau", val_every=3, warmup_steps=warmup,
                plateau=Plateau(**LOOP), run_dir=run_dir,
                callbacks=[events], **kw)
    t.fit()
    return t, events


def expected_rates(events: Events, steps: int, warmup: int) -> list[float]:
    """Each step's rate from a ReduceLROnPlateau stepped with the metric of every validation after warm-up."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, **LOOP)
    by_step = dict(zip(events.steps_of("on_validation_end"), events.val_metrics))
    rates = []
    for s in range(steps):  # step s is taken at the rate set by the validations after steps <= s
        if s in by_step and s >= warmup:
            sched.step(by_step[s]["val/loss"])
        rates.append(warmup_rate(s, warmup) if s < warmup else opt.param_groups[0]["lr"])
    return rates


def warmup_rate(s: int, warmup: int) -> float:
    return LR * s / warmup


@pytest.mark.parametrize("warmup", [0, 5])
def test_fit_steps_the_plateau_at_each_validation(warmup):
    _, events = run(warmup=warmup)
    rates = [g[0] for g in events.lrs]
    assert rates == pytest.approx(expected_rates(events, 24, warmup), rel=1e-15, abs=0)
    assert min(rates[warmup:]) < LR / 2  # it did reduce, twice or more


def test_resume_continues_the_plateau_exactly(tmp_path):
    full, full_events = run(tmp_path / "full")
    half, half_events = run(tmp_path / "cut", max_steps=12, checkpoint_every=6)
    state = json.loads((tmp_path / "cut" / "checkpoints" / "step-000000012" / "trainer.json").read_text())
    assert state["plateau"] == half.schedule.plateau.state_dict()
    assert state["plateau"]["lr"] is not None or state["plateau"]["bad_validations"] > 0  # mid-plateau state
    resumed, resumed_events = run(tmp_path / "cut", resume="auto")
    rates = [g[0] for g in half_events.lrs + resumed_events.lrs]
    assert rates == [g[0] for g in full_events.lrs]
    assert len(set(rates[12:])) > 1  # the rate changes after the resume point, so the comparison bites
    assert resumed.schedule.plateau.state_dict() == full.schedule.plateau.state_dict()
    for a, b in zip(resumed.model.parameters(), full.model.parameters()):
        assert torch.equal(a, b)


def test_plateau_arguments_are_checked():
    data, val = make_data(32), make_data(16, seed=1)
    with pytest.raises(ConfigError, match="plateau=.*schedule='plateau'"):
        trainer(MLP(), data, val_data=val, max_steps=4, plateau=Plateau())
    with pytest.raises(ConfigError, match="min_lr=0.1.*Plateau\\(min_lr"):
        trainer(MLP(), data, val_data=val, max_steps=4, schedule="plateau", min_lr=0.1)
    with pytest.raises(ConfigError, match="schedule='plateau'.*no validation data"):
        trainer(MLP(), data, max_steps=4, schedule="plateau")
    with pytest.raises(ConfigError, match="Plateau monitor='val/nope'"):
        trainer(MLP(), data, val_data=val, max_steps=4, val_every=2, schedule="plateau",
                plateau=Plateau(monitor="val/nope")).fit()
