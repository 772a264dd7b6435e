"""Learning-rate schedules: the rate used at every optimizer step equals the closed form in ``schedule.py``."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from cadence import ConfigError
from cadence.schedule import Schedule
from helpers import MLP, Events, make_data, trainer

pytestmark = pytest.mark.usefixtures("one_thread")

LR, MIN_LR, START = 0.1, 0.01, 0.02


def closed_form(s: int, *, name, lr: float, warmup_steps: int = 0, warmup_start_lr: float = 0.0,
                max_steps: int | None = None, min_lr: float = 0.0, milestones=(), gamma: float = 0.1) -> float:
    """Written from the module docstring of ``cadence/schedule.py``, independently of the implementation."""
    if s < warmup_steps:
        return warmup_start_lr + (lr - warmup_start_lr) * s / warmup_steps
    if callable(name):
        return lr * name(s)
    if name == "constant":
        return lr
    if name == "multistep":
        return lr * gamma ** len([m for m in milestones if m <= s])
    p = (s - warmup_steps) / (max_steps - warmup_steps)
    if name == "linear":
        return lr + (min_lr - lr) * p
    if name == "cosine":
        return min_lr + (lr - min_lr) * (1 + math.cos(math.pi * p)) / 2
    raise AssertionError(name)


def halving(step: int) -> float:
    return 0.5 ** (step // 4)


CASES = [
    ("constant", {}),
    ("linear", {"min_lr": MIN_LR}),
    ("linear", {}),
    ("cosine", {"min_lr": MIN_LR}),
    ("cosine", {}),
    ("multistep", {"milestones": (5, 9, 13), "gamma": 0.5}),
    (halving, {}),
]
CASE_IDS = ["constant", "linear_min_lr", "linear_to_zero", "cosine_min_lr", "cosine_to_zero", "multistep",
            "callable"]


@pytest.mark.parametrize("warmup", [0, 4], ids=["no_warmup", "warmup"])
@pytest.mark.parametrize("name,extra", CASES, ids=CASE_IDS)
def test_rate_at_every_step_is_the_closed_form(name, extra, warmup):
    """The pure function of the step against the closed form written from the docstring: no training needed."""
    steps = 16
    kw = dict(warmup_steps=warmup, warmup_start_lr=START if warmup else 0.0, max_steps=steps, **extra)
    sched = Schedule(LR, name, **kw)
    expected = [closed_form(s, name=name, lr=LR, **kw) for s in range(steps)]
    assert [sched(s) for s in range(steps)] == pytest.approx(expected, rel=1e-12, abs=1e-15)
    # the schedule really changes the rate (except the constant one), so the comparison is not vacuous
    if name != "constant" or warmup:
        assert len({round(v, 12) for v in expected}) > 1


@pytest.mark.parametrize("grad_accum", [1, 3], ids=["accum1", "accum3"])
def test_a_run_takes_the_schedules_rate_once_per_optimizer_step(grad_accum):
    """End to end: the rate of every optimizer step (never per micro-step) is the schedule's, the same in every
    parameter group, and the lr logged at a log point is the rate of the step just taken."""
    steps, kw = 16, dict(warmup_steps=4, warmup_start_lr=START, min_lr=MIN_LR)
    events = Events()
    t = trainer(MLP(), make_data(40), batch_size=4, grad_accum=grad_accum, max_steps=steps, optimizer="sgd",
                lr=LR, schedule="cosine", log_every=5, callbacks=[events], **kw)
    t.fit()
    expected = [closed_form(s, name="cosine", lr=LR, max_steps=steps, **kw) for s in range(steps)]
    assert len(events.lrs) == steps
    for s, (group_lrs, want) in enumerate(zip(events.lrs, expected)):
        assert all(g == pytest.approx(want, rel=1e-12, abs=1e-15) for g in group_lrs), (s, group_lrs, want)
    logged = [(r["step"], r["lr"]) for r in t.history if r["split"] == "train"]
    assert [s for s, _ in logged] == [1, 5, 10, 15, 16]  # step 1 is a log point too
    for step, lr in logged:
        assert lr == pytest.approx(expected[step - 1], rel=1e-12, abs=1e-15)


def test_warmup_starts_at_warmup_start_lr_and_reaches_lr():
    lrs = [Schedule(LR, warmup_steps=4, warmup_start_lr=START, max_steps=8)(s) for s in range(8)]
    assert lrs[0] == pytest.approx(START)
    assert lrs[4] == pytest.approx(LR)
    assert lrs[:5] == pytest.approx([START + (LR - START) * s / 4 for s in range(5)])
    assert lrs[4:] == pytest.approx([LR] * 4)


def test_schedule_with_max_epochs_uses_the_run_length():
    events = Events()
    # 40 items, batch 8: 5 steps per epoch, 3 epochs -> 15 steps
    t = trainer(MLP(), make_data(40), batch_size=8, max_epochs=3, optimizer="sgd", lr=LR, schedule="linear",
                callbacks=[events])
    t.fit()
    assert t.step == 15
    assert [g[0] for g in events.lrs] == pytest.approx([LR * (1 - s / 15) for s in range(15)])


def test_rate_applies_to_every_param_group_of_an_optimizer_instance():
    model = MLP()
    opt = torch.optim.SGD([{"params": model.net[0].parameters()}, {"params": model.net[2].parameters()}], lr=LR)
    events = Events()
    t = trainer(model, make_data(40), batch_size=4, max_steps=6, optimizer=opt, lr=LR, schedule="linear",
                callbacks=[events])
    assert t.optimizer is opt
    t.fit()
    for s, group_lrs in enumerate(events.lrs):
        assert group_lrs == pytest.approx([LR * (1 - s / 6)] * 2)


def test_rate_really_drives_the_update():
    """With SGD and the rate of step 1 at zero, step 1 leaves the weights unchanged."""
    model = MLP()
    snapshots: list[list[torch.Tensor]] = []

    class Snap:
        def on_step_end(self, trainer):
            snapshots.append([p.detach().clone() for p in trainer.model.parameters()])

    trainer(model, make_data(40), batch_size=4, max_steps=3, optimizer="sgd", lr=LR,
            schedule=lambda s: 0.0 if s == 1 else 1.0, callbacks=[Snap()]).fit()
    assert all(torch.equal(a, b) for a, b in zip(snapshots[0], snapshots[1]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[1], snapshots[2]))


# ----------------------------------------------------------------------------------------------- Schedule itself
def test_schedule_unit_values():
    lin = Schedule(1.0, "linear", max_steps=10)
    assert [lin(s) for s in (0, 5, 9)] == pytest.approx([1.0, 0.5, 0.1])
    assert lin(10) == pytest.approx(0.0)
    assert lin(25) == pytest.approx(0.0)  # past the end it stays at min_lr

    cos = Schedule(1.0, "cosine", max_steps=10, min_lr=0.2)
    assert cos(0) == pytest.approx(1.0)
    assert cos(5) == pytest.approx(0.6)
    assert cos(10) == pytest.approx(0.2)
    assert cos(100) == pytest.approx(0.2)

    warm = Schedule(1.0, "cosine", warmup_steps=4, warmup_start_lr=0.2, max_steps=14)
    assert [warm(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert warm(9) == pytest.approx(0.5)

    multi = Schedule(2.0, "multistep", milestones=(3, 6), gamma=0.5)
    assert [multi(s) for s in range(8)] == pytest.approx([2.0, 2.0, 2.0, 1.0, 1.0, 1.0, 0.5, 0.5])

    const = Schedule(0.3)
    assert [const(s) for s in (0, 1, 1000)] == [0.3, 0.3, 0.3]

    calls: list[int] = []

    def factor(s: int) -> float:
        calls.append(s)
        return 1.0 / (s + 1)

    fn = Schedule(1.0, factor, warmup_steps=2)
    assert [fn(s) for s in range(5)] == pytest.approx([0.0, 0.5, 1 / 3, 1 / 4, 1 / 5])
    assert calls == [2, 3, 4]  # the callable is not consulted during warm-up, and gets the absolute step


def test_schedule_is_stateless_and_frozen():
    sched = Schedule(1.0, "cosine", max_steps=10)
    forward = [sched(s) for s in range(10)]
    backward = [sched(s) for s in reversed(range(10))][::-1]
    assert forward == backward
    with pytest.raises(dataclasses.FrozenInstanceError):
        sched.lr = 2.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs,pieces",
    [
        ({"name": "exp"}, ["schedule='exp'", "constant", "cosine"]),
        ({"name": "linear"}, ["schedule='linear'", "max_steps"]),
        ({"name": "cosine"}, ["schedule='cosine'", "max_steps"]),
        ({"name": "cosine", "max_steps": 10, "min_lr": -1.0}, ["min_lr=-1.0"]),
        ({"name": "multistep"}, ["milestones=()"]),
        ({"name": "multistep", "milestones": (5, 2)}, ["milestones=(5, 2)", "increasing"]),
        ({"warmup_steps": -1}, ["warmup_steps=-1"]),
        ({"warmup_steps": 11, "max_steps": 10}, ["warmup_steps=11", "max_steps=10"]),
        ({"name": "cosine", "decay_steps": 0}, ["decay_steps=0", "positive"]),
        ({"name": "constant", "decay_steps": 8}, ["decay_steps=8", "schedule='constant'"]),
        ({"name": "linear", "decay_steps": 3, "warmup_steps": 4}, ["decay_steps=3", "warmup_steps=4"]),
    ],
)
def test_schedule_bad_arguments(kwargs, pieces):
    with pytest.raises(ConfigError) as info:
        Schedule(1.0, **kwargs)
    for piece in pieces:
        assert piece in str(info.value)


# ----------------------------------------------------------------------------------------------- decay_steps
def nanogpt_lr(it: int, warmup_iters: int, lr_decay_iters: int, learning_rate: float, min_lr: float) -> float:
    """nanoGPT's ``get_lr`` after its warm-up (its warm-up formula differs; cadence's is tested above)."""
    if it > lr_decay_iters:
        return min_lr
    decay_ratio = (it - warmup_iters) / (lr_decay_iters - warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * decay_ratio))
    return min_lr + coeff * (learning_rate - min_lr)


@pytest.mark.parametrize("warmup", [0, 4], ids=["no_warmup", "warmup"])
def test_cosine_over_decay_steps_is_nanogpts_lr_decay_iters(warmup):
    sched = Schedule(LR, "cosine", warmup_steps=warmup, max_steps=40, min_lr=MIN_LR, decay_steps=25)
    rates = [sched(s) for s in range(40)]
    assert rates[warmup:] == pytest.approx([nanogpt_lr(s, warmup, 25, LR, MIN_LR) for s in range(warmup, 40)],
                                           rel=1e-12)
    assert rates[25:] == [MIN_LR] * 15  # decayed, then kept at min_lr to the end of the run
    linear = Schedule(LR, "linear", warmup_steps=warmup, min_lr=MIN_LR, decay_steps=25)  # no run length needed
    assert [linear(s) for s in (warmup, 25, 39)] == pytest.approx([LR, MIN_LR, MIN_LR])
    # the default is max_steps
    assert Schedule(LR, "cosine", max_steps=25, min_lr=MIN_LR)(12) == Schedule(LR, "cosine", max_steps=40,
                                                                                min_lr=MIN_LR, decay_steps=25)(12)


def test_decay_steps_drives_a_runs_rate():
    events = Events()
    trainer(MLP(), make_data(64), batch_size=8, max_steps=12, lr=LR, schedule="cosine", min_lr=MIN_LR,
            decay_steps=6, callbacks=[events]).fit()
    rates = [group_lrs[0] for group_lrs in events.lrs]
    assert rates == pytest.approx([nanogpt_lr(s, 0, 6, LR, MIN_LR) for s in range(12)], rel=1e-12)
    assert rates[6:] == [MIN_LR] * 6


# ----------------------------------------------------------------------------------------------- per-epoch units
def torch_epoch_rates(make, epochs: int, steps_per_epoch: int, lr: float = LR) -> list[float]:
    """The rate of every step when torch's scheduler ``make(opt)`` is stepped once per epoch."""
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    sched = make(opt)
    rates = []
    for _ in range(epochs):
        rates += [opt.param_groups[0]["lr"]] * steps_per_epoch
        opt.step()
        sched.step()
    return rates


EPOCH_CASES = [
    ("multistep", {"milestones": (2, 4), "gamma": 0.5},
     lambda opt: torch.optim.lr_scheduler.MultiStepLR(opt, milestones=[2, 4], gamma=0.5)),
    ("exponential", {"gamma": 0.7}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.7)),
    ("exponential", {"gamma": 0.9}, lambda opt: torch.optim.lr_scheduler.ExponentialLR(opt, gamma=0.9)),
    (lambda e: 0.3 ** (e // 2), {}, lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.3)),
]


@pytest.mark.parametrize("name,extra,make", EPOCH_CASES, ids=["multistep", "steplr", "exponential", "callable"])
def test_epoch_unit_equals_torch_schedulers_stepped_per_epoch(name, extra, make):
    sched = Schedule(LR, name, unit="epoch", steps_per_epoch=3, **extra)
    expected = torch_epoch_rates(make, epochs=7, steps_per_epoch=3)
    assert [sched(s) for s in range(21)] == pytest.approx(expected, rel=1e-12, abs=0)
    assert len(set(expected)) > 2


def test_exponential_per_step_and_warmup_before_epoch_units():
    exp = Schedule(2.0, "exponential", gamma=0.5)
    assert [exp(s) for s in range(4)] == [2.0, 1.0, 0.5, 0.25]
    # warm-up counts steps; after it, the milestones count epochs of 4 steps
    warm = Schedule(1.0, "multistep", warmup_steps=2, milestones=(1, 3), gamma=0.1, unit="epoch", steps_per_epoch=4)
    assert [warm(s) for s in range(14)] == pytest.approx([0.0, 0.5, 1.0, 1.0] + [0.1] * 8 + [0.01] * 2)


def test_epoch_unit_in_a_run_is_steplr_per_epoch():
    events = Events()
    # 40 items, batch 8: 5 steps per epoch; StepLR(step_size=1, gamma=0.5) stepped at each epoch end
    trainer(MLP(), make_data(40), batch_size=8, max_epochs=4, optimizer="sgd", lr=LR, schedule="exponential",
            gamma=0.5, schedule_unit="epoch", callbacks=[events]).fit()
    expected = torch_epoch_rates(lambda opt: torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5), 4, 5)
    assert [g[0] for g in events.lrs] == pytest.approx(expected, rel=1e-12, abs=0)


@pytest.mark.parametrize(
    "kwargs,pieces",
    [
        ({"unit": "day"}, ["schedule_unit='day'", "epoch"]),
        ({"name": "cosine", "max_steps": 10, "unit": "epoch", "steps_per_epoch": 2}, ["schedule_unit='epoch'"]),
        ({"name": "multistep", "milestones": (1,), "unit": "epoch"}, ["schedule_unit='epoch'", "no known epoch"]),
        ({"name": "constant", "plateau": "x"}, ["plateau='x'", "schedule='plateau'"]),
    ],
)
def test_unit_and_plateau_bad_arguments(kwargs, pieces):
    with pytest.raises(ConfigError) as info:
        Schedule(1.0, **kwargs)
    for piece in pieces:
        assert piece in str(info.value)
