"""EMA of the weights: equal to a hand-computed reference after N steps (fixed decay, ``update_every``,
``update_after``, the power warm-up), buffers copied, ``ema.model`` usable for inference, ``validate_on``,
checkpointed and exported."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from cadence import EMA, ConfigError, Trainer
from helpers import make_data

pytestmark = pytest.mark.usefixtures("one_thread")


class BNNet(nn.Module):
    """8 -> 16 (batch norm) -> 2: parameters and buffers (running statistics, a batch counter)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.net(x), y)


class LiveWeights:
    """Records the live model's state after every optimizer step (the EMA has already been updated then)."""

    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_step_end(self, trainer: Trainer) -> None:
        self.states.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})


def run(ema: EMA, steps: int = 7, **kw: Any) -> tuple[Trainer, dict[str, torch.Tensor], LiveWeights]:
    model = BNNet()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    live = LiveWeights()
    kw.setdefault("callbacks", [live])
    t = Trainer(model, make_data(40), batch_size=8, max_steps=steps, lr=0.05, ema=ema, device="cpu",
                progress=False, **kw)
    t.fit()
    return t, initial, live


def param_names(model: nn.Module) -> set[str]:
    return {name for name, _ in model.named_parameters()}


def hand_ema(initial: dict[str, torch.Tensor], lives: list[dict[str, torch.Tensor]], params: set[str],
             decay: Any, update_every: int = 1, update_after: int = 0) -> dict[str, torch.Tensor]:
    """The EMA by its definition, in float64: before ``update_after`` a copy; then every ``update_every``
    steps ``ema = d * ema + (1 - d) * live`` for parameters, buffers copied."""
    ema = {k: v.double() if k in params else v.clone() for k, v in initial.items()}
    for step, live in enumerate(lives, start=1):
        if step <= update_after:
            ema = {k: v.double() if k in params else v.clone() for k, v in live.items()}
        elif step % update_every == 0:
            d = decay(step)
            ema = {k: d * ema[k] + (1 - d) * live[k].double() if k in params else live[k].clone() for k in live}
    return ema


def assert_matches(ema_model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    got = ema_model.state_dict()
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        if v.is_floating_point():
            torch.testing.assert_close(got[k].double(), v.double(), rtol=1e-6, atol=1e-7, msg=f"EMA {k} differs")
        else:
            assert torch.equal(got[k], v), f"EMA buffer {k} differs"


def test_ema_equals_the_closed_form_after_n_steps():
    beta, n = 0.9, 7
    t, initial, live = run(EMA(beta=beta), steps=n)
    assert len(live.states) == n
    params = param_names(t.model)
    for name in params:  # ema_n = beta^n w_0 + sum_s (1 - beta) beta^(n - s) w_s
        expected = beta ** n * initial[name].double()
        for s, state in enumerate(live.states, start=1):
            expected = expected + (1 - beta) * beta ** (n - s) * state[name].double()
        torch.testing.assert_close(t.ema.model.state_dict()[name].double(), expected, rtol=1e-6, atol=1e-7)
    # and the recursive definition agrees, buffers included (copied from the live model)
    assert_matches(t.ema.model, hand_ema(initial, live.states, params, lambda s: beta))
    # the live model moved away from its EMA: the test compares something
    assert not torch.equal(t.model.net[0].weight, t.ema.model.net[0].weight)


def test_ema_update_every_and_update_after():
    every, after, n = 3, 2, 10
    t, initial, live = run(EMA(beta=0.8, update_every=every, update_after=after), steps=n)
    params = param_names(t.model)
    assert_matches(t.ema.model, hand_ema(initial, live.states, params, lambda s: 0.8, every, after))
    # buffers were last copied at step 9 (the last multiple of 3), not at step 10
    ema_bn, step9, step10 = t.ema.model.net[1], live.states[8], live.states[9]
    assert torch.equal(ema_bn.running_mean, step9["net.1.running_mean"])
    assert not torch.equal(ema_bn.running_mean, step10["net.1.running_mean"])
    assert int(ema_bn.num_batches_tracked) == 9


def test_ema_with_update_after_is_a_copy_until_then():
    t, _, live = run(EMA(beta=0.99, update_after=5), steps=5)
    for k, v in t.ema.model.state_dict().items():
        assert torch.equal(v, live.states[-1][k]), k


def test_ema_power_warm_up():
    beta, power, inv_gamma = 0.95, 0.75, 2.0
    ema = EMA(beta=beta, power=power, inv_gamma=inv_gamma)

    def decay(step: int) -> float:
        return min(beta, 1 - (1 + step / inv_gamma) ** -power)

    for step in (1, 2, 5, 30, 10_000):
        assert ema.decay(step) == pytest.approx(decay(step), rel=1e-12)
    assert ema.decay(10_000) == beta  # capped
    assert ema.decay(1) < 0.3  # early steps follow the live weights closely
    t, initial, live = run(ema, steps=8)
    assert_matches(t.ema.model, hand_ema(initial, live.states, param_names(t.model), decay))


def test_ema_buffers_are_copied():
    t, _, live = run(EMA(beta=0.9), steps=4)
    live_bn, ema_bn = t.model.net[1], t.ema.model.net[1]
    assert not torch.equal(live_bn.running_mean, torch.zeros(16))  # the statistics did move
    assert torch.equal(ema_bn.running_mean, live_bn.running_mean)
    assert torch.equal(ema_bn.running_var, live_bn.running_var)
    assert int(ema_bn.num_batches_tracked) == 4


def test_ema_model_is_usable_for_inference():
    t, _, _ = run(EMA(beta=0.9), steps=3)
    ema_model = t.ema.model
    assert ema_model is not t.model
    assert not ema_model.training
    assert not any(p.requires_grad for p in ema_model.parameters())
    x, y = make_data(5, seed=9)
    logits = ema_model.net(x)  # batch norm in eval mode: a batch of any size, even one item
    assert logits.shape == (5, 2)
    assert ema_model.net(x[:1]).shape == (1, 2)
    assert ema_model(x, y).ndim == 0


def test_bad_ema_arguments_are_refused():
    for beta in (1.0, -0.1, 1.5):
        with pytest.raises(ConfigError, match="beta"):
            EMA(beta=beta)
    with pytest.raises(ConfigError, match="update_every"):
        EMA(update_every=0)
    with pytest.raises(ConfigError, match="power"):
        EMA(power=-1.0)
    x, y = make_data(16)
    with pytest.raises(ConfigError, match="validate_on"):
        Trainer(BNNet(), (x, y), val_data=(x, y), max_steps=1, validate_on="ema", device="cpu", progress=False)
    with pytest.raises(ConfigError, match="validate_on"):
        Trainer(BNNet(), (x, y), val_data=(x, y), max_steps=1, ema=EMA(), validate_on="best", device="cpu",
                progress=False)
    with pytest.raises(ConfigError, match="ema"):
        Trainer(BNNet(), (x, y), max_steps=1, ema=0.999, device="cpu", progress=False)


def hand_val_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    was = model.training
    model.eval()
    with torch.no_grad():
        loss = F.cross_entropy(model.net(x), y).item()
    model.train(was)
    return loss


def test_validate_on_ema_measures_the_ema_model():
    xv, yv = make_data(12, seed=5)
    t, _, _ = run(EMA(beta=0.9), steps=6, val_data=(xv, yv), val_every=3, validate_on="ema")
    assert len(t.history["val/loss"]) == 2  # steps 3 and 6
    assert t.history["val_ema/loss"] == []
    assert t.history["val/loss"][-1] == pytest.approx(hand_val_loss(t.ema.model, xv, yv), rel=1e-5)
    metrics = t.validate()
    assert metrics["val/loss"] == pytest.approx(hand_val_loss(t.ema.model, xv, yv), rel=1e-5)
    assert metrics["val/loss"] != pytest.approx(hand_val_loss(t.model, xv, yv), rel=1e-5)
    assert not t.ema.model.training and t.model.training


def test_validate_on_both_logs_val_and_val_ema():
    xv, yv = make_data(12, seed=5)
    t, _, _ = run(EMA(beta=0.9), steps=6, val_data=(xv, yv), val_every=3, validate_on="both")
    assert len(t.history["val/loss"]) == len(t.history["val_ema/loss"]) == 2
    assert t.history["val/loss"][-1] == pytest.approx(hand_val_loss(t.model, xv, yv), rel=1e-5)
    assert t.history["val_ema/loss"][-1] == pytest.approx(hand_val_loss(t.ema.model, xv, yv), rel=1e-5)
    assert set(t.last_val_metrics) == {"val/loss", "val_ema/loss"}


def test_ema_weights_are_checkpointed_and_exported(tmp_path, capsys):
    from cadence.cli.main import main

    run_dir = tmp_path / "run"
    t, _, _ = run(EMA(beta=0.9), steps=8, run_dir=run_dir, checkpoint_every=4)
    ema_state = t.ema.model.state_dict()
    for step in (4, 8):
        assert (run_dir / "checkpoints" / f"step-{step:09d}" / "ema.safetensors").is_file()
    for path in (run_dir / "checkpoints" / "step-000000008" / "ema.safetensors", run_dir / "final" / "ema.safetensors"):
        saved = load_file(str(path))
        assert saved.keys() == ema_state.keys()
        for k in saved:
            assert torch.equal(saved[k], ema_state[k]), k
    # the live weights are saved separately and differ
    assert not torch.equal(load_file(str(run_dir / "final" / "model.safetensors"))["net.0.weight"],
                           ema_state["net.0.weight"])

    out = tmp_path / "ema.safetensors"
    assert main(["export", str(run_dir), "--ema", "-o", str(out)]) == 0
    exported = load_file(str(out))
    for k in ema_state:
        assert torch.equal(exported[k], ema_state[k]), k
    # without --ema: the live model
    plain = tmp_path / "model.safetensors"
    assert main(["export", str(run_dir), "-o", str(plain)]) == 0
    assert torch.equal(load_file(str(plain))["net.0.weight"], t.model.state_dict()["net.0.weight"])
    capsys.readouterr()


def test_export_ema_of_a_run_without_ema_says_why(tmp_path, capsys):
    from cadence.cli.main import main

    x, y = make_data(16)
    Trainer(BNNet(), (x, y), batch_size=8, max_steps=2, run_dir=tmp_path / "run", device="cpu", progress=False).fit()
    assert main(["export", str(tmp_path / "run"), "--ema", "-o", str(tmp_path / "out.safetensors")]) == 2
    assert "EMA" in capsys.readouterr().err


def test_ema_resumes_exactly(tmp_path):
    class Crash:
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step == 6:
                raise RuntimeError("simulated crash")

    reference, _, _ = run(EMA(beta=0.9, power=0.5), steps=9, run_dir=tmp_path / "ref", checkpoint_every=4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(EMA(beta=0.9, power=0.5), steps=9, run_dir=tmp_path / "run", checkpoint_every=4, callbacks=[Crash()])
    resumed, _, _ = run(EMA(beta=0.9, power=0.5), steps=9, run_dir=tmp_path / "run", checkpoint_every=4,
                        resume="auto")
    for a, b in ((reference.ema.model, resumed.ema.model), (reference.model, resumed.model)):
        sa, sb = a.state_dict(), b.state_dict()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), k
