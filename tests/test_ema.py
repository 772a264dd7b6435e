"""EMA of the weights: equal to ema-pytorch's EMA bit for bit over 200 steps (the package itself, a dev extra),
equal to a hand-computed reference by the same rules (fixed decay, ``update_every``, ``update_after``, the
power warm-up counted from ``update_after``), buffers averaged, ``ema.model`` usable for inference,
``validate_on``, checkpointed, exported and resumed."""

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
    """The names the EMA averages: floating-point parameters and buffers."""
    return {name for name, v in model.state_dict().items() if v.is_floating_point()}


def hand_ema(initial: dict[str, torch.Tensor], lives: list[dict[str, torch.Tensor]], params: set[str],
             decay: Any, update_every: int = 1, update_after: int = 0) -> dict[str, torch.Tensor]:
    """The EMA by ema-pytorch's rules, in float64 (``params`` holds every floating-point name, parameters and
    buffers): the update after step 1 copies; after step ``s`` with ``(s - 1) % update_every == 0`` it copies
    while ``s - 1 <= update_after``, then ``ema = d * ema + (1 - d) * live``; integer buffers stay as they were."""
    ema = {k: v.double() if k in params else v.clone() for k, v in initial.items()}
    for step, live in enumerate(lives, start=1):
        n = step - 1
        if n > 0 and n % update_every != 0:
            continue
        if n <= update_after:
            ema = {k: live[k].double() if k in params else ema[k] for k in live}
        else:
            d = decay(step)
            ema = {k: d * ema[k] + (1 - d) * live[k].double() if k in params else ema[k] for k in live}
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
    for name in params:  # step 1 copies, then ema_n = beta^(n-1) w_1 + sum_{s>=2} (1 - beta) beta^(n - s) w_s
        expected = beta ** (n - 1) * live.states[0][name].double()
        for s, state in enumerate(live.states[1:], start=2):
            expected = expected + (1 - beta) * beta ** (n - s) * state[name].double()
        torch.testing.assert_close(t.ema.model.state_dict()[name].double(), expected, rtol=1e-6, atol=1e-7)
    # and the recursive definition agrees, integer buffers included (left as they were)
    assert_matches(t.ema.model, hand_ema(initial, live.states, params, lambda s: beta))
    # the live model moved away from its EMA: the test compares something
    assert not torch.equal(t.model.net[0].weight, t.ema.model.net[0].weight)


def test_ema_update_every_and_update_after():
    every, after, n = 3, 4, 11
    ema = EMA(beta=0.8, update_every=every, update_after=after)
    # ema-pytorch's counter is step - 1: step 1 copies, steps 4 and 7 (counter 3, 6) copy while the counter is
    # <= update_after=4 -> step 4 copies, step 7 and step 10 average; the other steps do nothing
    assert [ema.action(s) for s in range(1, n + 1)] == ["copy", "skip", "skip", "copy", "skip", "skip", "average",
                                                        "skip", "skip", "average", "skip"]
    t, initial, live = run(ema, steps=n)
    params = param_names(t.model)
    assert_matches(t.ema.model, hand_ema(initial, live.states, params, lambda s: 0.8, every, after))
    # the EMA was last touched after step 10, not 11
    ema_bn, step10 = t.ema.model.net[1], live.states[9]
    expected = 0.8 * (0.8 * live.states[3]["net.1.running_mean"] + 0.2 * live.states[6]["net.1.running_mean"])
    torch.testing.assert_close(ema_bn.running_mean, expected + 0.2 * step10["net.1.running_mean"])
    assert int(ema_bn.num_batches_tracked) == 0  # integer buffers are not averaged (as in ema-pytorch)


def test_ema_with_update_after_is_a_copy_until_then():
    t, _, live = run(EMA(beta=0.99, update_after=5), steps=6)  # steps 1-6 have counters 0-5 <= 5: copies
    for k, v in t.ema.model.state_dict().items():
        if v.is_floating_point():
            assert torch.equal(v, live.states[-1][k]), k


def test_ema_power_warm_up():
    beta, power, inv_gamma, after = 0.95, 0.75, 2.0, 3
    ema = EMA(beta=beta, power=power, inv_gamma=inv_gamma, update_after=after)

    def decay(step: int) -> float:
        e = max(0, step - after - 1)
        return 0.0 if e == 0 else min(beta, 1 - (1 + e / inv_gamma) ** -power)

    for step in (1, 4, 5, 6, 9, 30, 10_000):
        assert ema.decay(step) == pytest.approx(decay(step), rel=1e-6)
    assert ema.decay(4) == 0.0  # e = 0
    assert ema.decay(10_000) == pytest.approx(beta, rel=1e-7)  # capped (in float32, as ema-pytorch)
    assert ema.decay(5) < 0.3  # early steps follow the live weights closely
    t, initial, live = run(ema, steps=12)
    assert_matches(t.ema.model, hand_ema(initial, live.states, param_names(t.model), decay, 1, after))


def test_ema_decay_at_step_110_counts_from_update_after():
    """The issue's figure: meshgpt's EMA (update_after=100, power 2/3) at step 110 decays by 0.785, not by
    the 0.957 of a warm-up that starts at step 0."""
    ema = EMA(beta=0.9999, update_every=10, update_after=100, power=2 / 3)
    assert ema.decay(110) == pytest.approx(1 - 10 ** (-2 / 3), rel=1e-6)
    assert round(ema.decay(110), 3) == 0.785
    assert ema.decay(101) == 0.0
    with pytest.raises(ConfigError, match="min_value"):
        EMA(beta=0.9, min_value=0.95)
    assert EMA(beta=0.99, power=1.0, min_value=0.6).decay(2) == pytest.approx(0.6)  # floored: e = 1 gives 0.5


def test_ema_buffers_are_averaged_like_parameters():
    t, initial, live = run(EMA(beta=0.9), steps=4)
    live_bn, ema_bn = t.model.net[1], t.ema.model.net[1]
    assert not torch.equal(live_bn.running_mean, torch.zeros(16))  # the statistics did move
    expected = live.states[0]["net.1.running_mean"]
    for state in live.states[1:]:
        expected = 0.9 * expected + 0.1 * state["net.1.running_mean"]
    torch.testing.assert_close(ema_bn.running_mean, expected)
    assert not torch.equal(ema_bn.running_mean, live_bn.running_mean)
    assert int(ema_bn.num_batches_tracked) == int(initial["net.1.num_batches_tracked"]) == 0


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


EMA_PYTORCH_CASES = [  # (update_every, update_after, power, beta, min_value)
    (3, 20, 2 / 3, 0.995, 0.0), (10, 100, 0.75, 0.9999, 0.0), (1, 0, 2 / 3, 0.9, 0.3), (4, 7, 1.0, 0.99, 0.5)]


@pytest.mark.parametrize("every, after, power, beta, min_value", EMA_PYTORCH_CASES)
def test_ema_equals_ema_pytorch_on_200_steps_of_weights(every, after, power, beta, min_value):
    """Driven on the same 200 weight updates, cadence's EMA equals ema-pytorch's, bit for bit, after every step
    (parameters, batch-norm statistics and the untouched integer counter)."""
    from ema_pytorch import EMA as ReferenceEMA

    torch.manual_seed(0)
    live = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    ours = EMA(beta=beta, update_every=every, update_after=after, power=power, min_value=min_value)
    ours.attach(live)
    theirs = ReferenceEMA(live, beta=beta, update_every=every, update_after_step=after, power=power,
                          min_value=min_value)
    for step in range(1, 201):
        with torch.no_grad():
            for p in live.parameters():
                p.add_(torch.randn_like(p))
            live[1].running_mean.add_(torch.randn(8))
            live[1].num_batches_tracked += 1
        ours.update(step)
        theirs.update()
        expected = theirs.ema_model.state_dict()
        for k, v in ours.model.state_dict().items():
            assert torch.equal(v, expected[k]), f"step {step}: {k} differs"
        if step == 110:
            assert ours.decay(step) == theirs.get_current_decay()
    assert not torch.equal(ours.model[0].weight, live[0].weight)  # it averaged, it did not just copy


class ReferenceCallback:
    """Updates ema-pytorch's EMA of the trainer's live model after every optimizer step, as meshgpt does."""

    def __init__(self, reference: Any) -> None:
        self.reference = reference

    def on_step_end(self, trainer: Trainer) -> None:
        self.reference.update()


def test_trained_ema_equals_ema_pytorch_over_200_steps():
    from ema_pytorch import EMA as ReferenceEMA

    model = BNNet()
    reference = ReferenceEMA(model, beta=0.99, update_every=5, update_after_step=30, power=2 / 3)
    t = Trainer(model, make_data(64), batch_size=8, max_steps=200, lr=0.05, device="cpu", progress=False,
                ema=EMA(beta=0.99, update_every=5, update_after=30, power=2 / 3),
                callbacks=[ReferenceCallback(reference)])
    t.fit()
    expected = reference.ema_model.state_dict()
    for k, v in t.ema.model.state_dict().items():
        assert torch.equal(v, expected[k]), k
    assert not torch.equal(t.ema.model.net[0].weight, t.model.net[0].weight)


def test_ema_with_update_every_and_after_resumes_exactly(tmp_path):
    class Crash:
        def on_step_end(self, trainer: Trainer) -> None:
            if trainer.step == 13:
                raise RuntimeError("simulated crash")

    def ema() -> EMA:
        return EMA(beta=0.95, update_every=3, update_after=4, power=2 / 3)

    reference, _, _ = run(ema(), steps=20, run_dir=tmp_path / "ref", checkpoint_every=5)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(ema(), steps=20, run_dir=tmp_path / "run", checkpoint_every=5, callbacks=[Crash()])
    resumed, _, _ = run(ema(), steps=20, run_dir=tmp_path / "run", checkpoint_every=5, resume="auto")
    sa, sb = reference.ema.model.state_dict(), resumed.ema.model.state_dict()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
