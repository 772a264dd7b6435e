"""Parameter groups by glob and training stages: per-parameter options, bad globs, stages in order (what
trains, at what rate, for how long), optimizer state kept across a boundary, exact resume inside a stage."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from cadence import ConfigError, Stage, Trainer
from helpers import CrashAt

pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """encoder (4 -> 8) then head (8 -> 1): parameters encoder.weight, encoder.bias, head.weight, head.bias."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder = nn.Linear(4, 8)
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.head(torch.tanh(self.encoder(x))).squeeze(-1) - y).pow(2).mean()


def data(n: int = 24) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 4, generator=g), torch.randn(n, generator=g)


def build(**kw: Any) -> Trainer:
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    kw.setdefault("batch_size", 8)
    return Trainer(kw.pop("model", None) or Net(), kw.pop("train_data", data()), **kw)


def options_by_name(t: Trainer) -> dict[str, tuple[float, float]]:
    """``name -> (lr, weight_decay)`` from the optimizer's groups."""
    names = {id(p): n for n, p in t.model.named_parameters()}
    return {names[id(p)]: (g["lr"], g["weight_decay"]) for g in t.optimizer.param_groups for p in g["params"]}


def test_param_groups_by_glob():
    t = build(max_steps=2, lr=1e-3, weight_decay=0.1,
              param_groups={"encoder.*": {"lr": 1e-4}, "*.bias": {"weight_decay": 0.0}})
    assert options_by_name(t) == {
        "encoder.weight": (1e-4, 0.1),
        "encoder.bias": (1e-4, 0.0),
        "head.weight": (1e-3, 0.1),
        "head.bias": (1e-3, 0.0),
    }
    # a glob may also give decay to a 1-d tensor, which gets none by default
    t = build(max_steps=2, weight_decay=0.1, param_groups={"head.bias": {"weight_decay": 0.5}})
    assert options_by_name(t)["head.bias"] == (1e-3, 0.5) and options_by_name(t)["encoder.bias"] == (1e-3, 0.0)


class GroupRates:
    def __init__(self) -> None:
        self.rates: list[dict[str, float]] = []

    def on_step_end(self, trainer: Trainer) -> None:
        self.rates.append({n: lr for n, (lr, _) in options_by_name(trainer).items()})


def test_the_schedule_scales_each_group_from_its_own_rate():
    rates = GroupRates()
    t = build(max_steps=6, lr=1e-2, warmup_steps=4, schedule="cosine", param_groups={"encoder.*": {"lr": 1e-3}},
              callbacks=[rates])
    t.fit()
    for step, r in enumerate(rates.rates):
        assert r["head.weight"] == pytest.approx(t.schedule(step), rel=1e-12)
        assert r["encoder.weight"] == pytest.approx(t.schedule(step) / 10, rel=1e-12)


def test_a_glob_that_matches_no_parameter_is_refused_naming_it():
    with pytest.raises(ConfigError, match=r"decoder\.\*") as err:
        build(max_steps=1, param_groups={"decoder.*": {"lr": 1e-4}})
    assert "encoder.weight" in str(err.value)  # the names it could have matched
    with pytest.raises(ConfigError, match=r"stages\[1\]\.trainable.*decoder\.\*"):
        build(stages=[Stage(steps=1), Stage(steps=1, trainable=["decoder.*"])])


def test_two_globs_setting_one_option_differently_are_refused():
    with pytest.raises(ConfigError, match="encoder.weight") as err:
        build(max_steps=1, param_groups={"encoder.*": {"lr": 1e-4}, "*.weight": {"lr": 1e-2}})
    assert "encoder.*" in str(err.value) and "*.weight" in str(err.value)
    # the same value twice is no conflict
    t = build(max_steps=1, param_groups={"encoder.*": {"lr": 1e-4}, "*.weight": {"lr": 1e-4}})
    assert options_by_name(t)["head.weight"][0] == 1e-4
    # a first stage's overlapping globs (merged with the Trainer's) are refused before training
    with pytest.raises(ConfigError, match="encoder.weight"):
        build(param_groups={"encoder.*": {"lr": 1e-4}},
              stages=[Stage(steps=2, param_groups={"*.weight": {"lr": 1e-2}})])


class Trace:
    """After each step: which parameters require grad, the weights, the rates."""

    def __init__(self) -> None:
        self.trainable: list[set[str]] = []
        self.states: list[dict[str, torch.Tensor]] = []
        self.rates: list[set[float]] = []

    def on_fit_start(self, trainer: Trainer) -> None:
        self.states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})

    def on_step_end(self, trainer: Trainer) -> None:
        self.trainable.append({n for n, p in trainer.model.named_parameters() if p.requires_grad})
        self.states.append({k: v.clone() for k, v in trainer.model.state_dict().items()})
        self.rates.append({g["lr"] for g in trainer.optimizer.param_groups})

    def changed(self, step: int) -> set[str]:
        """The weights that optimizer step ``step`` (1-based) changed."""
        before, after = self.states[step - 1], self.states[step]
        return {k for k in before if not torch.equal(before[k], after[k])}


ENCODER, HEAD = {"encoder.weight", "encoder.bias"}, {"head.weight", "head.bias"}


def test_stages_run_in_order():
    trace = Trace()
    stages = [Stage(steps=3, trainable=["encoder.*"]), Stage(steps=2, trainable=["head.*"], lr=0.01), Stage(steps=2)]
    t = build(optimizer="sgd", lr=0.05, stages=stages, callbacks=[trace])
    assert t.max_steps == 7  # no max_steps: the stages' sum
    t.fit()
    assert t.step == 7 and t.stage_index == 2
    expected = [ENCODER] * 3 + [HEAD] * 2 + [ENCODER | HEAD] * 2
    assert trace.trainable == expected
    assert [trace.changed(s) for s in range(1, 8)] == expected
    assert trace.rates == [{0.05}] * 3 + [{0.01}] * 2 + [{0.05}] * 2


def test_max_steps_shorter_than_the_stages_ends_the_run_early():
    t = build(max_steps=4, stages=[Stage(steps=3), Stage(steps=5)])
    t.fit()
    assert t.step == 4 and t.stage_index == 1


def test_stage_param_groups_apply_in_their_stage():
    trace = Trace()
    stages = [Stage(steps=2), Stage(steps=2, param_groups={"head.*": {"lr": 0.5}})]
    t = build(optimizer="sgd", lr=0.05, stages=stages, callbacks=[trace])
    t.fit()
    assert trace.rates == [{0.05}] * 2 + [{0.05, 0.5}] * 2
    assert options_by_name(t)["head.bias"][0] == 0.5 and options_by_name(t)["encoder.bias"][0] == 0.05


class AdamSteps:
    """AdamW's per-parameter step count after every optimizer step (0 when the parameter has no state)."""

    def __init__(self) -> None:
        self.counts: list[dict[str, int]] = []

    def on_step_end(self, trainer: Trainer) -> None:
        state = trainer.optimizer.state
        self.counts.append({n: int(state[p]["step"]) if p in state else 0 for n, p in trainer.model.named_parameters()
                            if p.requires_grad})


def test_optimizer_state_is_kept_for_parameters_that_stay_trainable():
    counts = AdamSteps()
    stages = [Stage(steps=3), Stage(steps=2, trainable=["head.*"], lr=1e-2), Stage(steps=2)]
    t = build(optimizer="adamw", stages=stages, callbacks=[counts])
    t.fit()
    head = [c["head.weight"] for c in counts.counts]
    assert head == [1, 2, 3, 4, 5, 6, 7]  # never reset: the head trains in every stage
    encoder = [c.get("encoder.weight") for c in counts.counts]
    # frozen in the second stage (not in that optimizer); it starts afresh when it trains again
    assert encoder == [1, 2, 3, None, None, 1, 2]


def test_stage_epochs_are_counted_in_steps_per_epoch():
    trace = Trace()
    t = build(optimizer="sgd", train_data=data(20), stages=[Stage(epochs=1, trainable=["head.*"]), Stage(epochs=2)],
              callbacks=[trace])
    assert t.steps_per_epoch == 3 and t.max_steps == 9  # 20 items, batch 8: 3 steps per epoch
    t.fit()
    assert t.step == 9
    assert trace.trainable == [HEAD] * 3 + [ENCODER | HEAD] * 6


def test_bad_stages_are_refused():
    with pytest.raises(ConfigError, match="exactly one of steps or epochs"):
        build(stages=[Stage()])
    with pytest.raises(ConfigError, match="exactly one of steps or epochs"):
        build(stages=[Stage(steps=2, epochs=1)])
    with pytest.raises(ConfigError, match="at least one step"):
        build(stages=[Stage(steps=0)])
    with pytest.raises(ConfigError, match=r"stages\[0\]\.lr"):
        build(stages=[Stage(steps=2, lr=0.0)])
    with pytest.raises(ConfigError, match=r"stages\[1\]"):
        build(stages=[Stage(steps=2), {"steps": 2}])
    with pytest.raises(ConfigError, match="instance"):
        model = Net()
        Trainer(model, data(), stages=[Stage(steps=2)], optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                device="cpu", progress=False)
    # epochs need a known epoch length: several sources have none
    x, y = data()
    with pytest.raises(ConfigError, match=r"stages\[0\]\.epochs"):
        build(train_data={"a": (x, y), "b": (x, y)}, stages=[Stage(epochs=1)])


@pytest.mark.parametrize("groups", [{"decoder.*": {"lr": 1e-3}}, {"encoder.*": {"lr": 1e-4}, "*.weight": {"lr": 1e-2}}],
                         ids=["no-match", "overlap"])
def test_a_later_stage_with_bad_param_groups_is_refused_before_training(groups):
    with pytest.raises(ConfigError):
        build(stages=[Stage(steps=2), Stage(steps=2, param_groups=groups)])


def resume_case(tmp_path: Path, stages: list[Stage], checkpoint_every: int, crash_at: int,
                model: type[nn.Module] = Net) -> None:
    def make(run: Path, **kw: Any) -> Trainer:
        return build(model=model(), run_dir=run, optimizer="adamw", lr=0.01, warmup_steps=2, schedule="cosine",
                     stages=stages, checkpoint_every=checkpoint_every, **kw)

    reference = make(tmp_path / "ref")
    reference.fit()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make(tmp_path / "run", callbacks=[CrashAt(crash_at)]).fit()
    resumed = make(tmp_path / "run", resume="auto")
    resumed.fit()
    assert resumed.step == reference.step
    for k, v in reference.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k
    ref_state, res_state = reference.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert ref_state.keys() == res_state.keys()
    for i in ref_state:
        for key, value in ref_state[i].items():
            assert torch.equal(value, res_state[i][key]), (i, key)


def test_resume_in_the_middle_of_the_second_stage_is_exact(tmp_path):
    stages = [Stage(steps=4, trainable=["encoder.*"]), Stage(steps=6, lr=0.003)]
    resume_case(tmp_path, stages, checkpoint_every=3, crash_at=8)  # resumes from step 6, inside stage 2


class Twins(nn.Module):
    """Two layers of the same shape: a stage on one and a stage on the other have same-sized optimizers."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.encoder, self.head = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.head(torch.tanh(self.encoder(x))).sum(-1) - y).pow(2).mean()


def test_resume_from_a_checkpoint_at_a_stage_boundary_is_exact(tmp_path):
    stages = [Stage(steps=4, trainable=["encoder.*"]), Stage(steps=4)]
    # the checkpoint at step 4 holds the first stage's optimizer; the resumed run must move on to the second
    resume_case(tmp_path, stages, checkpoint_every=4, crash_at=6)


def test_resume_at_a_boundary_between_same_sized_stages_is_exact(tmp_path):
    stages = [Stage(steps=4, trainable=["encoder.*"]), Stage(steps=4, trainable=["head.*"])]
    # same-sized optimizers: loading the encoder's AdamW state onto the head would go unnoticed but for this test
    resume_case(tmp_path, stages, checkpoint_every=4, crash_at=6, model=Twins)
